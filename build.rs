//! Records the git commit the binary is built from (for run manifests), when known:
//! `SOURCE_TDA_GIT_COMMIT` = the commit, with `-dirty` when the files the crate is built from
//! (`BUILD_INPUTS`) differ from it.
//!
//! The script reruns only when one of those inputs or the commit can have changed: HEAD, the
//! checked-out branch's ref and `packed-refs`, and the build inputs themselves (a change there
//! recompiles the crate anyway). It never watches git's index, which every `git status`
//! rewrites: watching it made each `git status` cost a release rebuild.
use std::path::Path;
use std::process::Command;

/// What the crate is compiled from; the dirty mark looks at these only.
const BUILD_INPUTS: [&str; 4] = ["src", "build.rs", "Cargo.toml", "Cargo.lock"];

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Watches `path` if it exists (cargo reruns a script on every build while a watched path is
/// missing) and returns whether it does.
fn watch(path: &str) -> bool {
    let exists = Path::new(path).exists();
    if exists {
        println!("cargo:rerun-if-changed={path}");
    }
    exists
}

fn main() {
    for input in BUILD_INPUTS {
        println!("cargo:rerun-if-changed={input}");
    }
    // Paths from --git-path are right in a linked worktree too: HEAD is the worktree's own,
    // branch refs and packed-refs are the common repository's.
    let git_path = |p: &str| git(&["rev-parse", "--git-path", p]);
    if let Some(head) = git_path("HEAD") {
        watch(&head);
    }
    if let Some(packed) = git_path("packed-refs") {
        watch(&packed);
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(loose) = git_path(&branch) {
            // A branch kept only in packed-refs gets a loose ref at its next commit: until
            // then, watch the folder that file will appear in.
            if !watch(&loose) {
                if let Some(dir) = Path::new(&loose).parent().and_then(Path::to_str) {
                    watch(dir);
                }
            }
        }
    }

    let Some(commit) = git(&["rev-parse", "HEAD"]).filter(|s| s.len() == 40) else {
        return;
    };
    let mut status = vec!["status", "--porcelain", "--untracked-files=no", "--"];
    status.extend(BUILD_INPUTS);
    let dirty = git(&status).map(|s| !s.is_empty()).unwrap_or(false);
    let suffix = if dirty { "-dirty" } else { "" };
    println!("cargo:rustc-env=SOURCE_TDA_GIT_COMMIT={commit}{suffix}");
}
