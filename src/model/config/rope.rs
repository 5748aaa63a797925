//! Owns RoPE's parameters as config.json states them: `rope_theta` / `rope_scaling`, or
//! transformers 5's `rope_parameters` (`RopeParameters`), and the scaling they describe
//! (`RopeScaling`).
//! Layer: model — may import the ground; no sibling.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// RoPE frequency scaling (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: inv_freq_i = θ^(−2i/d).
    None,
    /// `linear`: positions divided by `factor`.
    Linear {
        /// Position divisor.
        factor: f64,
    },
    /// `llama3`: low frequencies divided by `factor`, high kept, smooth blend between.
    Llama3 {
        /// Divisor for low frequencies.
        factor: f64,
        /// Wavelengths above original_max / low_freq_factor are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths below original_max / high_freq_factor are kept.
        high_freq_factor: f64,
        /// Context length of the original model.
        original_max_position_embeddings: usize,
    },
}

/// `rope_parameters` (transformers ≥ 5 writes RoPE's θ and scaling there instead of
/// `rope_theta` and `rope_scaling`): one object for every layer, or one per layer type
/// (`full_attention`, `sliding_attention`) for models with local layers.
pub(super) struct RopeParameters<'a> {
    /// The parameters of the global (full-attention) layers.
    pub(super) global: Option<&'a Map<String, Value>>,
    /// Those of the sliding-window layers, when given per layer type.
    local: Option<&'a Map<String, Value>>,
}

impl<'a> RopeParameters<'a> {
    pub(super) fn parse(obj: &'a Map<String, Value>) -> Result<RopeParameters<'a>> {
        let m = match obj.get("rope_parameters") {
            None | Some(Value::Null) => {
                return Ok(RopeParameters {
                    global: None,
                    local: None,
                })
            }
            Some(Value::Object(m)) => m,
            Some(_) => {
                return Err(Error::Model(
                    "key `rope_parameters`: must be an object or null".into(),
                ))
            }
        };
        let per_type = |k: &str| -> Result<Option<&'a Map<String, Value>>> {
            match m.get(k) {
                None => Ok(None),
                Some(Value::Object(x)) => Ok(Some(x)),
                Some(_) => Err(Error::Model(format!(
                    "key `rope_parameters.{k}`: must be an object"
                ))),
            }
        };
        if m.contains_key("full_attention") || m.contains_key("sliding_attention") {
            Ok(RopeParameters {
                global: per_type("full_attention")?,
                local: per_type("sliding_attention")?,
            })
        } else {
            Ok(RopeParameters {
                global: Some(m),
                local: None,
            })
        }
    }

    fn theta(m: Option<&Map<String, Value>>, key: &str) -> Result<Option<f64>> {
        match m.and_then(|m| m.get("rope_theta")) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::Model(format!("key `{key}.rope_theta`: must be a number"))),
        }
    }

    /// θ of the global layers.
    pub(super) fn global_theta(&self) -> Result<Option<f64>> {
        let key = if self.local.is_some() {
            "rope_parameters.full_attention"
        } else {
            "rope_parameters"
        };
        Self::theta(self.global, key)
    }

    /// θ of the sliding-window layers.
    pub(super) fn local_theta(&self) -> Result<Option<f64>> {
        Self::theta(self.local, "rope_parameters.sliding_attention")
    }
}

pub(super) fn parse_rope_scaling(obj: &Map<String, Value>) -> Result<RopeScaling> {
    match obj.get("rope_scaling") {
        None | Some(Value::Null) => Ok(RopeScaling::None),
        Some(Value::Object(m)) => scaling_from(m, "rope_scaling"),
        Some(_) => Err(Error::Model(
            "key `rope_scaling`: must be an object or null".into(),
        )),
    }
}

/// The RoPE scaling an object `rs` (config key `at`) describes.
pub(super) fn scaling_from(rs: &Map<String, Value>, at: &str) -> Result<RopeScaling> {
    // Newer configs write `rope_type`, older ones `type`.
    let (key, kind) = match (rs.get("rope_type"), rs.get("type")) {
        (Some(Value::String(s)), _) => (format!("{at}.rope_type"), s.as_str()),
        (None, Some(Value::String(s))) => (format!("{at}.type"), s.as_str()),
        _ => {
            return Err(Error::Model(format!(
                "key `{at}.rope_type`: missing (expected a string)"
            )))
        }
    };
    let factor = |m: &Map<String, Value>| -> Result<f64> {
        m.get("factor")
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::Model(format!("key `{at}.factor`: missing or not a number")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: factor(rs)?,
        }),
        "llama3" => {
            let num = |k: &str| -> Result<f64> {
                rs.get(k)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| Error::Model(format!("key `{at}.{k}`: missing or not a number")))
            };
            Ok(RopeScaling::Llama3 {
                factor: factor(rs)?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            })
        }
        other => Err(Error::Model(format!(
            "key `{key}`: unsupported RoPE scaling `{other}`; supported: default, linear, llama3"
        ))),
    }
}
