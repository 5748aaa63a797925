//! Owns the compared methods' names as configs and evaluation tables spell them.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution; no sibling.
//!
//! The compared methods' names, as configs and the evaluation tables spell them.

use crate::config::MethodKind;

/// The method's name as configs spell it (`source`, `influence`, `gradient_dot`).
pub fn method_name(m: MethodKind) -> &'static str {
    match m {
        MethodKind::Source => "source",
        MethodKind::Influence => "influence",
        MethodKind::GradientDot => "gradient_dot",
    }
}
