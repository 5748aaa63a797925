//! Owns progress reporting: indicatif bars on a terminal, plain periodic lines in a log file.
//! Layer: ground — may import error; siblings `mem`, `num`.
//!
//! On a terminal each [`bar`] is an indicatif bar. When stderr is not a terminal (Slurm, CI,
//! `nohup`, `2> log`), bars are hidden and every bar instead logs one plain line at a steady
//! interval (`SOURCE_TDA_PROGRESS_INTERVAL` seconds, default 20):
//!
//! ```text
//! INFO progress: score · segment 2/3 · scoring 1,200/3,000 (41.3/s, ETA 44 s)
//! ```
//!
//! naming the stage ([`set_stage`]), the part of it under way ([`set_part`], e.g. the
//! segment), the bar's label, done/total, the rate since the line before, and the time left
//! at that rate. `--quiet` turns both off.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::mem::human_bytes;
use super::num::{count, duration, rate};

static QUIET: AtomicBool = AtomicBool::new(false);

/// The stage and the part of it under way, prefixed to each plain progress line.
static CONTEXT: Mutex<(String, String)> = Mutex::new((String::new(), String::new()));

/// The environment variable that sets the plain lines' interval in seconds.
pub const INTERVAL_VAR: &str = "SOURCE_TDA_PROGRESS_INTERVAL";

/// The interval of plain progress lines when [`INTERVAL_VAR`] is not set.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(20);

/// Turns all progress bars off (`--quiet`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether progress bars are off.
pub fn is_quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Names the stage now running (and forgets the part of the one before).
pub fn set_stage(stage: &str) {
    let mut c = CONTEXT.lock().unwrap_or_else(|e| e.into_inner());
    *c = (stage.to_string(), String::new());
}

/// Names the part of the stage under way (e.g. `segment 2/3`); empty for none.
pub fn set_part(part: impl Into<String>) {
    CONTEXT.lock().unwrap_or_else(|e| e.into_inner()).1 = part.into();
}

/// The plain lines' interval: [`INTERVAL_VAR`] in seconds (a positive number), else
/// [`DEFAULT_INTERVAL`].
pub fn interval() -> Duration {
    parse_interval(std::env::var(INTERVAL_VAR).ok().as_deref()).unwrap_or(DEFAULT_INTERVAL)
}

fn parse_interval(v: Option<&str>) -> Option<Duration> {
    let s: f64 = v?.trim().parse().ok()?;
    (s.is_finite() && s > 0.0).then(|| Duration::from_secs_f64(s))
}

/// Whether stderr is a terminal (so bars draw and logs may use colour).
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// Whether logs may use ANSI colour: only on a terminal, and never when `NO_COLOR` is set to
/// anything non-empty (<https://no-color.org>).
pub fn colour_allowed(no_color: Option<&std::ffi::OsStr>, terminal: bool) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// A bar over `len` items, labelled `what`.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    styled(
        len,
        what,
        "{msg:>12} [{elapsed_precise}] [{wide_bar}] {human_pos}/{human_len} ({per_sec}, eta {eta})",
        Unit::Items,
    )
}

/// A bar over `len` bytes, labelled `what`.
pub fn bytes_bar(len: u64, what: &str) -> ProgressBar {
    styled(
        len,
        what,
        "{msg:>12} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        Unit::Bytes,
    )
}

#[derive(Clone, Copy)]
enum Unit {
    Items,
    Bytes,
}

fn styled(len: u64, what: &str, template: &str, unit: Unit) -> ProgressBar {
    let terminal = stderr_is_terminal();
    let pb = if is_quiet() || !terminal {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(len)
    };
    pb.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    if !is_quiet() && !terminal {
        spawn_plain_lines(&pb, what.to_string(), unit, interval());
    }
    pb
}

/// Logs [`plain_line`] for `pb` every `every` until the bar is finished or dropped.
fn spawn_plain_lines(pb: &ProgressBar, what: String, unit: Unit, every: Duration) {
    let weak = pb.downgrade();
    let poll = every.min(Duration::from_millis(200));
    let spawned = std::thread::Builder::new()
        .name("progress-lines".into())
        .spawn(move || {
            // The first sample is taken after one poll, so a position set right after the
            // bar was made (a resumed fine-tune) does not count as progress.
            std::thread::sleep(poll);
            let Some(first) = weak.upgrade() else { return };
            let (mut last_t, mut last_pos) = (Instant::now(), first.position());
            drop(first);
            loop {
                std::thread::sleep(poll);
                let Some(pb) = weak.upgrade() else { return };
                if pb.is_finished() {
                    return;
                }
                if last_t.elapsed() < every {
                    continue;
                }
                let (now, pos) = (Instant::now(), pb.position());
                let per_s = (pos.saturating_sub(last_pos)) as f64
                    / now.duration_since(last_t).as_secs_f64().max(1e-9);
                let (stage, part) = CONTEXT.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let line = plain_line(&stage, &part, &what, pos, pb.length(), per_s, unit);
                tracing::info!("{line}");
                (last_t, last_pos) = (now, pos);
            }
        });
    if let Err(e) = spawned {
        tracing::debug!("no progress lines: {e}");
    }
}

/// `progress: STAGE · PART · WHAT DONE/TOTAL (RATE, ETA T)`, leaving out what is unknown.
fn plain_line(
    stage: &str,
    part: &str,
    what: &str,
    pos: u64,
    len: Option<u64>,
    per_s: f64,
    unit: Unit,
) -> String {
    let amount = |n: u64| match unit {
        Unit::Items => count(n),
        Unit::Bytes => human_bytes(n),
    };
    let mut head: Vec<&str> = vec![stage, part];
    head.retain(|s| !s.is_empty());
    let mut line = String::from("progress: ");
    for h in head {
        line.push_str(h);
        line.push_str(" · ");
    }
    line.push_str(what);
    line.push(' ');
    line.push_str(&amount(pos));
    if let Some(len) = len {
        line.push('/');
        line.push_str(&amount(len));
    }
    let speed = match unit {
        Unit::Items => rate(per_s),
        Unit::Bytes => format!("{}/s", human_bytes(per_s as u64)),
    };
    let eta = match len {
        Some(len) if per_s > 0.0 => duration(len.saturating_sub(pos) as f64 / per_s),
        Some(len) if len <= pos => duration(0.0),
        _ => "unknown".into(),
    };
    line.push_str(&format!(" ({speed}, ETA {eta})"));
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_line_names_stage_part_counts_rate_and_eta() {
        let l = plain_line(
            "score",
            "segment 2/3",
            "scoring",
            1200,
            Some(3000),
            40.0,
            Unit::Items,
        );
        assert_eq!(
            l,
            "progress: score · segment 2/3 · scoring 1,200/3,000 (40.0/s, ETA 45 s)"
        );
        let l = plain_line(
            "fetch",
            "",
            "sha256",
            1 << 20,
            Some(3 << 20),
            0.0,
            Unit::Bytes,
        );
        assert_eq!(
            l,
            "progress: fetch · sha256 1.0 MiB/3.0 MiB (0 B/s, ETA unknown)"
        );
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour_allowed(None, true));
        assert!(colour_allowed(Some(OsStr::new("")), true));
        assert!(!colour_allowed(Some(OsStr::new("1")), true));
        assert!(!colour_allowed(None, false));
    }

    #[test]
    fn interval_is_a_positive_number_of_seconds() {
        assert_eq!(
            parse_interval(Some("0.5")),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_interval(Some(" 30 ")), Some(Duration::from_secs(30)));
        for bad in [None, Some("0"), Some("-1"), Some("soon"), Some("inf")] {
            assert_eq!(parse_interval(bad), None, "{bad:?}");
        }
    }
}
