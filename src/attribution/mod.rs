//! Attribution math (DESIGN.md §2): the segment functions F_S and F_r, the damped inverse of
//! the influence function, the eigenbasis primitive they share, and the token-level scoring
//! contraction.

pub mod contract;
pub mod functions;
pub mod precondition;

pub use contract::token_scores;
pub use functions::{inject, SpectralFn};
pub use precondition::{apply_in_basis, spectral_weights};
