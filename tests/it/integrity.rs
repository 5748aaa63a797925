//! What changed on disk is never trusted: a recorded output whose bytes differ from the
//! manifest's sha256 makes its stage stale (rerun, shown by `status`, reported by `verify`),
//! and a stage never reads such an output of a stage outside the run.

use std::path::Path;

use crate::common::{cli, stderr};
use crate::resume::{ok, Setup};

/// Flips 16 bytes in the middle of `path`, keeping its size (and so passing a size check).
fn flip_bytes(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let len = bytes.len();
    let mid = len / 2;
    for b in &mut bytes[mid.saturating_sub(8)..(mid + 8).min(len)] {
        *b ^= 0x5a;
    }
    std::fs::write(path, &bytes).unwrap();
    assert_eq!(std::fs::metadata(path).unwrap().len() as usize, len);
}

fn verify(s: &Setup) -> std::process::Output {
    cli(s.dir.path(), &["verify", "--run-dir", "run"], &[])
}

fn status_text(s: &Setup) -> String {
    let o = cli(s.dir.path(), &["status", "--run-dir", "run"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn an_unchanged_run_verifies_and_its_rerun_skips() {
    let s = Setup::new();
    ok(&s.run(&[], &[]));
    let o = verify(&s);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("of 2 complete stage(s) checked; 0 differ"),
        "{out}"
    );
    let e = ok(&s.run(&[], &[]));
    assert!(e.contains("fetch: up to date (skipped)"), "{e}");
    assert!(e.contains("prepare: up to date (skipped)"), "{e}");
}

#[test]
fn a_same_size_corruption_makes_the_stage_stale_and_it_reruns() {
    let s = Setup::new();
    ok(&s.run(&[], &[]));
    let good = std::fs::read(s.path("run/prepare/train.parquet")).unwrap();
    flip_bytes(&s.path("run/prepare/train.parquet"));

    let text = status_text(&s);
    assert!(
        text.contains(
            "stale: prepare/train.parquet changed on disk (sha256 differs from the manifest)"
        ),
        "{text}"
    );
    let fetch_line = text.lines().find(|l| l.starts_with("fetch")).unwrap();
    assert!(fetch_line.ends_with("complete"), "{text}");

    let o = verify(&s);
    assert!(!o.status.success(), "verify passed a changed file");
    let out = String::from_utf8_lossy(&o.stdout);
    let e = stderr(&o);
    assert!(
        out.contains("prepare/train.parquet changed on disk (sha256 differs from the manifest)"),
        "{out}"
    );
    assert!(e.contains("1 of"), "{e}");
    assert!(e.contains("prepare/train.parquet"), "{e}");

    let e = ok(&s.run(&[], &[]));
    assert!(e.contains("fetch: up to date (skipped)"), "{e}");
    assert!(e.contains("prepare: done"), "{e}");
    assert!(
        e.contains("prepare/train.parquet changed on disk"),
        "the rerun says why: {e}"
    );
    assert_eq!(
        std::fs::read(s.path("run/prepare/train.parquet")).unwrap(),
        good,
        "the rerun rewrote the file"
    );
    assert!(verify(&s).status.success());
    assert!(status_text(&s).contains("complete"));
}

#[test]
fn a_stage_never_reads_a_changed_output_of_a_stage_outside_the_run() {
    let s = Setup::new();
    ok(&s.run(&[], &[]));
    let m = s.manifest();
    let fetched = m["stages"]["fetch"]["outputs"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    flip_bytes(&s.path("run").join(&fetched));

    // Only `prepare` is run, forced: it reads fetch's outputs, which changed.
    let o = cli(
        s.dir.path(),
        &[
            "prepare",
            "--config",
            "c.toml",
            "--run-dir",
            "run",
            "--force",
            "prepare",
        ],
        &[],
    );
    assert!(!o.status.success(), "prepare read a changed input");
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "stage `prepare` reads the outputs of `fetch`, but {fetched} changed on disk"
        )),
        "{e}"
    );
    assert!(e.contains("rerun `fetch` first"), "{e}");

    // A run that includes fetch redoes it; prepare's inputs are then whole again.
    let e = ok(&s.run(&[], &[]));
    assert!(e.contains("fetch: done"), "{e}");
    assert!(verify(&s).status.success());
}

#[test]
fn a_run_directory_of_another_format_is_refused_with_advice() {
    let s = Setup::new();
    ok(&s.run(&[], &[]));
    // The manifest and the tables carry the format.
    let mut m = s.manifest();
    assert_eq!(m["format_version"], source_tda::FORMAT_VERSION);
    let (_, metadata) =
        source_tda::output::parquet::open_table(&s.path("run/prepare/train.parquet")).unwrap();
    assert_eq!(
        metadata[source_tda::output::parquet::FORMAT_KEY],
        source_tda::FORMAT_VERSION.to_string()
    );

    let other = source_tda::FORMAT_VERSION + 1;
    m["format_version"] = other.into();
    std::fs::write(s.path("run/manifest.json"), m.to_string()).unwrap();
    let run_dir = std::path::absolute(s.path("run")).unwrap();
    let want = format!(
        "run directory {} was written by format {other}, this build reads format {}: rerun \
         into a new --run-dir or delete it",
        run_dir.display(),
        source_tda::FORMAT_VERSION
    );
    let refused = |o: std::process::Output, what: &str| {
        assert!(!o.status.success(), "{what} accepted another format");
        assert!(stderr(&o).contains(&want), "{what}: {}", stderr(&o));
    };
    refused(s.run(&[], &[]), "run");
    refused(
        cli(s.dir.path(), &["status", "--run-dir", "run"], &[]),
        "status",
    );
    refused(verify(&s), "verify");
    assert_eq!(s.manifest()["format_version"], other, "left as it was");
}
