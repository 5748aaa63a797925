//! Owns the compared methods' names as configs and evaluation tables spell them.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution; no sibling.
//!
//! The compared methods' names, as configs and the evaluation tables spell them.

use crate::config::EvalMethod;

/// The method's name as configs spell it (`source`, `influence`, `influence+refined`,
/// `gradient_dot`).
pub fn method_name(m: EvalMethod) -> String {
    m.name()
}
