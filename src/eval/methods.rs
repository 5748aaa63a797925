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
