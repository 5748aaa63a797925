//! Owns this process's memory figures: peak and current RSS, available memory, `human_bytes`.
//! Layer: ground — may import error; no sibling.
//!
//! Resident memory of this process, for the manifest's per-stage peak RSS.
//!
//! Linux exposes the peak resident set size as `VmHWM` in `/proc/self/status`, and lets a
//! process reset it by writing `5` to `/proc/self/clear_refs`. A stage resets it when it
//! starts and reads it when it ends, so each stage reports its own peak.

/// Resets the peak-RSS counter. Returns false where the platform does not allow it (the
/// next reading is then the process-wide peak).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// Peak resident set size of this process in bytes since the last reset, when known.
pub fn peak_rss_bytes() -> Option<u64> {
    status_field_kib("VmHWM:").map(|kib| kib * 1024)
}

/// Current resident set size in bytes, when known.
pub fn current_rss_bytes() -> Option<u64> {
    status_field_kib("VmRSS:").map(|kib| kib * 1024)
}

fn status_field_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
}

/// Memory the system can still give this process (`MemAvailable` in `/proc/meminfo`), when
/// known.
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line["MemAvailable:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Bytes as a short human string (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_at_least_current_and_grows_with_allocation() {
        let Some(before) = peak_rss_bytes() else {
            eprintln!("SKIPPED: /proc/self/status is not available on this platform");
            return;
        };
        assert!(before >= current_rss_bytes().unwrap_or(0) / 2);
        let big = std::hint::black_box(vec![1u8; 64 << 20]);
        let touched: u64 = big.iter().step_by(4096).map(|&b| b as u64).sum();
        assert_eq!(touched, (64 << 20) / 4096);
        let after = peak_rss_bytes().unwrap();
        assert!(after >= 64 << 20, "peak {after} after touching 64 MiB");
        drop(big);
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
