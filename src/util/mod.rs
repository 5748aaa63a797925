//! Util: hashing, atomic writes, memory, number formatting, progress, phase timing, RNG, scratch matrices, shards, tensor files, threads.
//! Layer: ground — may import error only.

pub mod fsx;
pub mod hash;
pub mod mem;
pub mod num;
pub mod phase;
pub mod progress;
pub mod rng;
pub mod scratch;
pub mod shard;
pub mod tensors;
pub mod threads;

/// The current UTC time as RFC 3339 with milliseconds (`2026-11-29T09:00:00.123Z`).
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let ms = now.nanosecond() / 1_000_000 * 1_000_000;
    now.replace_nanosecond(ms)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".to_string())
}
