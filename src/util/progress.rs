//! Owns progress bars (indicatif) that respect `--quiet` and stay out of the way of logs.
//! Layer: ground — may import error; no sibling.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Turns all progress bars off (`--quiet`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether progress bars are off.
pub fn is_quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// A bar over `len` items, labelled `what`. Hidden when quiet or when stderr is not a
/// terminal (indicatif's default draw target does the latter).
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = if is_quiet() {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(len)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{elapsed_precise}] [{wide_bar}] {human_pos}/{human_len} ({per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// A bar over `len` bytes, labelled `what`.
pub fn bytes_bar(len: u64, what: &str) -> ProgressBar {
    let pb = bar(len, what);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}
