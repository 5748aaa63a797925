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

/// Sets candle's worker spin limit to [`SPIN_LIMIT`] unless `CANDLE_BARRIER_POOL_SPIN_LIMIT`
/// is set already. Call it first thing in `main`, while the process has one thread (changing
/// the environment is not safe once other threads may read it), before any tensor operation.
pub fn configure_for_compute() {
    if std::env::var_os(CANDLE_SPIN_VAR).is_none() {
        std::env::set_var(CANDLE_SPIN_VAR, SPIN_LIMIT.to_string());
    }
}
