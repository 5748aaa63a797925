//! Owns `configure_for_compute`: the thread settings made before the first tensor operation.
//! Layer: ground — may import error; no sibling.
//!
//! Thread settings that must be made before the first tensor operation.
//!
//! candle's CPU backend runs elementwise operations on its own pool of `threads − 1` workers
//! (`candle-bp-*`), besides the rayon pool its matrix products use. After each operation a
//! worker spins (25,000 iterations by default) before it sleeps. In a capture an elementwise
//! operation is followed by a matrix product almost every time, so on a machine with as many
//! cores as threads the spinning worker takes a core from the product: profiled on the
//! 2-core benchmark machine, 23% of a SmolLM2-135M capture's samples were that spin.

/// The environment variable candle reads (once, at its pool's creation) for the spin limit.
pub const CANDLE_SPIN_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// The spin limit set when the user has not set one: workers sleep almost at once, waking
/// costs a futex call (microseconds) against operations of milliseconds.
pub const SPIN_LIMIT: u32 = 0;

/// glibc's allocator hands allocations above its mmap threshold to fresh pages from the
/// kernel and gives them back when freed. Every tensor of a small model's training step is
/// such an allocation, so each step paid page faults and page clearing for all of them (16%
/// of a demo fine-tune's CPU time was kernel time, profiled). Allocations up to
/// [`MMAP_THRESHOLD`] (glibc's largest) are reused from the heap instead, which is trimmed
/// only once [`TRIM_THRESHOLD`] is free at its top.
pub const MMAP_THRESHOLD: i32 = 32 << 20;

/// See [`MMAP_THRESHOLD`].
pub const TRIM_THRESHOLD: i32 = 256 << 20;

/// Sets candle's worker spin limit to [`SPIN_LIMIT`] unless `CANDLE_BARRIER_POOL_SPIN_LIMIT`
/// is set already, and the allocator thresholds ([`MMAP_THRESHOLD`], [`TRIM_THRESHOLD`])
/// unless glibc's `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` is set. Call it first
/// thing in `main`, while the process has one thread (changing the environment is not safe
/// once other threads may read it), before any tensor operation.
pub fn configure_for_compute() {
    if std::env::var_os(CANDLE_SPIN_VAR).is_none() {
        std::env::set_var(CANDLE_SPIN_VAR, SPIN_LIMIT.to_string());
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
        && std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none()
    {
        // SAFETY: mallopt only changes the allocator's parameters; it is called before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// Pins a child process to `threads` compute threads: candle's elementwise pool
/// (`CANDLE_NUM_THREADS`) and the rayon pool of its matrix products and the project's
/// kernels (`RAYON_NUM_THREADS`), both read once when the child starts.
pub fn pin_threads(cmd: &mut std::process::Command, threads: usize) {
    let n = threads.max(1).to_string();
    cmd.env("CANDLE_NUM_THREADS", &n)
        .env("RAYON_NUM_THREADS", &n);
}
