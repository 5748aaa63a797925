//! The house rule, checked on the sources: every module of `src/` sits on one floor of
//! [`FLOORS`] and imports only from its own floor and the floors below it, and no files import
//! each other in a circle (inside a folder or across folders).
//!
//! The check reads `src/**/*.rs` as text: every `use` statement (braces expanded) and every
//! `crate::…` / `super::…` path in code, with comments and each file's trailing
//! `#[cfg(test)]` section left out (test code may use fixtures from anywhere). A path is
//! followed to the file that defines the item it names, through `pub use` re-exports; a
//! folder's `mod.rs` re-exporting its children is its facade, not an arrow.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The floors, bottom first. A module may import from its own floor and below.
const FLOORS: &[&[&str]] = &[
    &["error"],
    &["util"],
    &["config"],
    &["output"],
    &["linalg"],
    &["backend"],
    &["model"],
    &["data"],
    &["hub"],
    &["train"],
    &["passes"],
    &["curvature"],
    &["attribution"],
    &["eval"],
    &["pipeline"],
    &["report"],
    &["stages"],
];

type ModPath = Vec<String>;

struct Crate {
    /// Module path → file (relative to src/).
    files: BTreeMap<ModPath, String>,
    /// File → code without comments and without its trailing test section.
    code: HashMap<String, String>,
    /// File → names of the items it defines.
    defs: HashMap<String, BTreeSet<String>>,
    /// Module path → re-exported name → absolute path it names.
    reexports: HashMap<ModPath, HashMap<String, ModPath>>,
}

fn module_path(rel: &str) -> ModPath {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            walk(&p, root, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(
                p.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/"),
            );
        }
    }
}

/// The code of a file without comments and without its test section.
fn strip(src: &str) -> String {
    let mut out = String::new();
    for line in src.lines() {
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        // A trailing comment, unless the line has a string that might contain "//".
        let code = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Names defined at the start of a line: `pub? (struct|enum|fn|trait|type|const|static) NAME`.
fn definitions(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let mut words = line.split_whitespace().peekable();
        if let Some(w) = words.peek() {
            if w.starts_with("pub") {
                words.next();
            }
        }
        if words.peek() == Some(&"unsafe") {
            words.next();
        }
        if let (Some(kw), Some(name)) = (words.next(), words.next()) {
            if ["struct", "enum", "fn", "trait", "type", "const", "static"].contains(&kw) {
                let name: String = name.chars().take_while(|&c| is_ident_char(c)).collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

/// The `use` statements of a file: (is `pub`, body without `use` and `;`).
fn use_statements(code: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = find_use(rest) {
        let before = rest[..i].trim_end();
        let public = before.ends_with("pub") || before.ends_with(')') && before.contains("pub(");
        let after = &rest[i + 4..];
        let end = after.find(';').unwrap_or(after.len());
        out.push((public, after[..end].to_string()));
        rest = &after[end..];
    }
    out
}

/// The position of the next `use ` that starts a statement.
fn find_use(s: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(j) = s[from..].find("use ") {
        let i = from + j;
        let prev = s[..i].chars().last();
        if prev.is_none_or(|c| !is_ident_char(c)) {
            return Some(i);
        }
        from = i + 4;
    }
    None
}

/// Expands `a::{b, c::{d as e}}` into (path, alias) pairs.
fn expand(prefix: &[String], s: &str, out: &mut Vec<(ModPath, String)>) {
    let s = s.trim();
    if s.is_empty() {
        return;
    }
    match s.find('{') {
        None => {
            let (path, alias) = match s.split_once(" as ") {
                Some((p, a)) => (p, Some(a.trim().to_string())),
                None => (s, None),
            };
            let mut full = prefix.to_vec();
            full.extend(
                path.split("::")
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty()),
            );
            let alias = alias.or_else(|| full.last().cloned()).unwrap_or_default();
            out.push((full, alias));
        }
        Some(i) => {
            let mut pre = prefix.to_vec();
            pre.extend(
                s[..i]
                    .split("::")
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty()),
            );
            let inner = &s[i + 1..s.rfind('}').unwrap_or(s.len())];
            let (mut depth, mut cur) = (0, String::new());
            for c in inner.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if c == ',' && depth == 0 {
                    expand(&pre, &cur, out);
                    cur.clear();
                } else {
                    cur.push(c);
                }
            }
            expand(&pre, &cur, out);
        }
    }
}

/// `crate::…` and `super::…` paths written in code.
fn inline_paths(code: &str) -> Vec<ModPath> {
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(j) = code[from..].find(start) {
            let i = from + j;
            from = i + start.len();
            if code[..i].chars().last().is_some_and(is_ident_char) {
                continue;
            }
            let tail: String = code[i..]
                .chars()
                .take_while(|&c| is_ident_char(c) || c == ':')
                .collect();
            out.push(
                tail.split("::")
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect(),
            );
        }
    }
    out
}

impl Crate {
    fn read(src: &Path) -> Crate {
        let mut rels = Vec::new();
        walk(src, src, &mut rels);
        let mut c = Crate {
            files: BTreeMap::new(),
            code: HashMap::new(),
            defs: HashMap::new(),
            reexports: HashMap::new(),
        };
        for rel in rels.into_iter().filter(|r| r != "main.rs") {
            let code = strip(&std::fs::read_to_string(src.join(&rel)).unwrap());
            c.defs.insert(rel.clone(), definitions(&code));
            c.code.insert(rel.clone(), code);
            c.files.insert(module_path(&rel), rel);
        }
        let mut reexports: HashMap<ModPath, HashMap<String, ModPath>> = HashMap::new();
        for (m, rel) in &c.files {
            for (public, body) in use_statements(&c.code[rel]) {
                if !public {
                    continue;
                }
                let mut pairs = Vec::new();
                expand(&[], &body, &mut pairs);
                for (path, alias) in pairs {
                    if let Some(abs) = c.absolute(m, &path) {
                        reexports.entry(m.clone()).or_default().insert(alias, abs);
                    }
                }
            }
        }
        c.reexports = reexports;
        c
    }

    /// `path` as written in module `m`, from the crate root; None for other crates.
    fn absolute(&self, m: &ModPath, path: &[String]) -> Option<ModPath> {
        let first = path.first()?;
        match first.as_str() {
            "crate" => Some(path[1..].to_vec()),
            "self" => Some(m.iter().chain(&path[1..]).cloned().collect()),
            "super" => {
                let mut base = m.clone();
                let mut rest = path;
                while rest.first().is_some_and(|p| p == "super") {
                    base.pop();
                    rest = &rest[1..];
                }
                Some(base.into_iter().chain(rest.iter().cloned()).collect())
            }
            _ => {
                let child: ModPath = m.iter().chain([first]).cloned().collect();
                self.files
                    .contains_key(&child)
                    .then(|| m.iter().chain(path).cloned().collect())
            }
        }
    }

    /// The file defining what an absolute path names (following re-exports).
    fn resolve(&self, path: &[String], depth: usize) -> Option<&String> {
        let mut m: ModPath = Vec::new();
        let mut i = 0;
        while i < path.len() {
            let next: ModPath = m.iter().chain([&path[i]]).cloned().collect();
            if !self.files.contains_key(&next) {
                break;
            }
            m = next;
            i += 1;
        }
        let file = self.files.get(&m)?;
        if i < path.len() && depth < 16 && !self.defs[file].contains(&path[i]) {
            if let Some(target) = self.reexports.get(&m).and_then(|r| r.get(&path[i])) {
                let full: ModPath = target.iter().chain(&path[i + 1..]).cloned().collect();
                return self.resolve(&full, depth + 1);
            }
        }
        Some(file)
    }

    /// File → the files it imports from.
    fn arrows(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (m, rel) in &self.files {
            let code = &self.code[rel];
            let facade = rel.ends_with("mod.rs") || rel == "lib.rs";
            let mut paths = Vec::new();
            for (public, body) in use_statements(code) {
                if public && facade {
                    continue;
                }
                let mut pairs = Vec::new();
                expand(&[], &body, &mut pairs);
                paths.extend(pairs.into_iter().map(|(p, _)| p));
            }
            paths.extend(inline_paths(code));
            for p in paths {
                let Some(abs) = self.absolute(m, &p) else {
                    continue;
                };
                if let Some(target) = self.resolve(&abs, 0) {
                    if target != rel {
                        out.entry(rel.clone()).or_default().insert(target.clone());
                    }
                }
            }
        }
        out
    }
}

fn floor_of(file: &str) -> Option<(usize, &str)> {
    let room = file.split('/').next()?.trim_end_matches(".rs");
    FLOORS
        .iter()
        .position(|f| f.contains(&room))
        .map(|i| (i, FLOORS[i].iter().find(|r| **r == room).copied().unwrap()))
}

/// The circles of a directed graph (Tarjan's strongly connected components of size > 1).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        if let Some(ws) = t.g.get(v) {
            for w in ws {
                if !t.index.contains_key(w.as_str()) {
                    visit(t, w);
                    let lw = t.low[w.as_str()];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(lw));
                } else if t.on.contains(w.as_str()) {
                    let iw = t.index[w.as_str()];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(iw));
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn every_import_looks_down_and_none_runs_in_a_circle() {
    let krate = Crate::read(&src_dir());
    let arrows = krate.arrows();
    let mut problems = Vec::new();
    for (from, tos) in &arrows {
        for to in tos {
            if from == "lib.rs" || to == "lib.rs" {
                continue;
            }
            match (floor_of(from), floor_of(to)) {
                (Some((a, ra)), Some((b, rb))) if ra != rb && b > a => problems.push(format!(
                    "{from} ({ra}) imports {to} ({rb}), a floor above it"
                )),
                (None, _) => problems.push(format!("{from}: its module is on no floor of FLOORS")),
                _ => {}
            }
        }
    }
    for c in circles(&arrows) {
        problems.push(format!("circle: {}", c.join(" ↔ ")));
    }
    assert!(
        problems.is_empty(),
        "the import graph breaks the house rule (tests/it/layers.rs):\n{}",
        problems.join("\n")
    );
    // The check sees the imports it is meant to see.
    let n: usize = arrows.values().map(BTreeSet::len).sum();
    assert!(n > 200, "only {n} arrows found: the parser misses imports");
}

#[test]
fn the_parser_finds_upward_arrows_and_circles() {
    // An upward arrow (backend → attribution) and a circle (a ↔ b) in a made-up crate.
    let dir = tempfile::tempdir().unwrap();
    let w = |rel: &str, text: &str| {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    w("lib.rs", "pub mod attribution;\npub mod backend;\n");
    w(
        "attribution/mod.rs",
        "mod a;\nmod b;\npub use a::{Walk, X};\n",
    );
    w(
        "attribution/a.rs",
        "use super::b::Y;\npub struct Walk;\npub struct X;\n",
    );
    w(
        "attribution/b.rs",
        "pub struct Y;\nfn f() { let _ = crate::attribution::X; }\n",
    );
    w(
        "backend/mod.rs",
        "use crate::attribution::Walk as W;\n#[cfg(test)]\nmod tests { use crate::stages::Z; }\n",
    );
    let krate = Crate::read(dir.path());
    let arrows = krate.arrows();
    assert!(
        arrows["backend/mod.rs"].contains("attribution/a.rs"),
        "{arrows:?}"
    );
    assert_eq!(
        arrows["backend/mod.rs"].len(),
        1,
        "test code is not an arrow: {arrows:?}"
    );
    assert_eq!(
        circles(&arrows),
        vec![vec![
            "attribution/a.rs".to_string(),
            "attribution/b.rs".to_string()
        ]]
    );
    assert!(
        !arrows.contains_key("attribution/mod.rs"),
        "a facade is not an arrow"
    );
}
