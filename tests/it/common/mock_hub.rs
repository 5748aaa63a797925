//! A minimal stand-in for the Hugging Face hub's HTTP API on 127.0.0.1, enough for
//! `hf_hub::api::sync`: repo info (`/api/{models,datasets}/ID/revision/REV`) and file resolve
//! with ranges (`/[datasets/]ID/resolve/REV/FILE`), answering with the headers the client
//! reads (`x-repo-commit`, `etag`, `content-range`). Loopback only; it lives until the test
//! process exits.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// One repo served by the mock: its commit and files.
#[derive(Clone)]
pub struct MockRepo {
    /// `models` or `datasets`.
    pub kind: &'static str,
    /// `ORG/NAME`.
    pub id: String,
    /// Revisions that resolve (branch names and the commit itself).
    pub revisions: Vec<String>,
    /// The commit all revisions point to.
    pub commit: String,
    /// Files by path.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// A running mock hub.
pub struct MockHub {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Request lines received (`GET /path`), in order.
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl MockHub {
    /// Starts serving `repos`.
    pub fn start(repos: Vec<MockRepo>) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let repos = Arc::new(repos);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let repos = repos.clone();
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &repos, &log);
                });
            }
        });
        MockHub { endpoint, requests }
    }

    /// Number of requests whose line contains `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.contains(needle))
            .count()
    }
}

fn serve(stream: TcpStream, repos: &[MockRepo], log: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // `Range: bytes=START-[END]`: the client probes metadata with 0-0, then downloads N-.
    let mut range: Option<(u64, Option<u64>)> = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            let (a, b) = v.trim().split_once('-').unwrap_or((v.trim(), ""));
            range = a.parse().ok().map(|a| (a, b.parse().ok()));
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    log.lock().unwrap().push(format!("{method} {path}"));
    let path = path.replace("%2F", "/");
    let mut out = stream;

    // Repo info.
    for r in repos {
        for rev in &r.revisions {
            if path == format!("/api/{}/{}/revision/{}", r.kind, r.id, rev) {
                let siblings: Vec<_> = r
                    .files
                    .keys()
                    .map(|f| serde_json::json!({ "rfilename": f }))
                    .collect();
                let body = serde_json::json!({"sha": r.commit, "siblings": siblings}).to_string();
                return respond(
                    &mut out,
                    "200 OK",
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                    None,
                );
            }
        }
    }
    // File resolve.
    for r in repos {
        let prefix = if r.kind == "datasets" {
            format!("/datasets/{}", r.id)
        } else {
            format!("/{}", r.id)
        };
        for rev in &r.revisions {
            let base = format!("{prefix}/resolve/{rev}/");
            if let Some(file) = path.strip_prefix(&base) {
                let Some(bytes) = r.files.get(file) else {
                    return respond(&mut out, "404 Not Found", &[], b"Entry not found", None);
                };
                let etag = format!("\"etag-{}-{}\"", bytes.len(), file.replace('/', "_"));
                let size = bytes.len() as u64;
                let headers = [
                    ("x-repo-commit", r.commit.as_str()),
                    ("etag", etag.as_str()),
                ];
                // HEAD (huggingface_hub's metadata probe): headers and the full length only.
                if method == "HEAD" {
                    return respond(&mut out, "200 OK", &headers, b"", Some(size));
                }
                let last = size.saturating_sub(1);
                let (start, end) = match range {
                    Some((s, Some(e))) => (s, e.min(last)),
                    Some((s, None)) => (s, last),
                    // No range: the whole file.
                    None => return respond(&mut out, "200 OK", &headers, bytes, None),
                };
                let body = if size == 0 {
                    &[][..]
                } else {
                    &bytes[start as usize..=end as usize]
                };
                let cr = format!("bytes {start}-{end}/{size}");
                let mut headers = headers.to_vec();
                headers.push(("content-range", &cr));
                return respond(&mut out, "206 Partial Content", &headers, body, None);
            }
        }
    }
    respond(
        &mut out,
        "404 Not Found",
        &[],
        b"Repository not found",
        None,
    )
}

/// Writes a response; `length` overrides Content-Length (for HEAD: the length a GET sends).
fn respond(
    out: &mut TcpStream,
    status: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    length: Option<u64>,
) -> std::io::Result<()> {
    let len = length.unwrap_or(body.len() as u64);
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    out.write_all(body)?;
    out.flush()
}
