//! Owns `SlidingLayers`: which decoder layers attend through the sliding window, as
//! config.json says.
//! Layer: model — may import the ground; in this folder, json.rs.
//!
//! transformers decides per layer: Mistral, Phi-3 (and Qwen with `use_sliding_window`) slide
//! in every layer, Gemma 2 in even layers, Gemma 3 in all but every `sliding_window_pattern`-th
//! (layer i attends globally when (i + 1) mod n = 0); newer configs list each layer in
//! `layer_types` ("sliding_attention" or "full_attention"), which then decides.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

use super::json::opt_usize;

/// Which layers use the sliding attention window; the others attend to every earlier key.
/// Only meaningful when the spec has a window.
#[derive(Debug, Clone, PartialEq)]
pub enum SlidingLayers {
    /// Every layer.
    All,
    /// Layers 0, 2, 4, … (Gemma 2).
    Even,
    /// Every layer but those with (i + 1) mod n = 0 (Gemma 3's `sliding_window_pattern` n).
    AllButEvery(usize),
    /// One flag per layer (`layer_types`).
    Listed(Vec<bool>),
}

impl SlidingLayers {
    /// Whether layer `layer` (0-based) attends through the window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        match self {
            SlidingLayers::All => true,
            SlidingLayers::Even => layer % 2 == 0,
            SlidingLayers::AllButEvery(n) => (layer + 1) % n != 0,
            SlidingLayers::Listed(v) => v.get(layer).copied().unwrap_or(false),
        }
    }

    /// Reads `layer_types` when given, else the family's rule (`sliding_window_pattern` for
    /// Gemma 3, default 6 as in transformers' Gemma3TextConfig).
    pub fn parse(
        obj: &Map<String, Value>,
        model_type: &str,
        num_layers: usize,
    ) -> Result<SlidingLayers> {
        if let Some(v) = obj.get("layer_types").filter(|v| !v.is_null()) {
            let list = v.as_array().ok_or_else(|| {
                Error::Model(format!(
                    "key `layer_types`: expected a list of strings, got {v}"
                ))
            })?;
            if list.len() != num_layers {
                return Err(Error::Model(format!(
                    "key `layer_types`: {} entries for num_hidden_layers = {num_layers}; it \
                     needs one per layer",
                    list.len()
                )));
            }
            let flags = list
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(Error::Model(format!(
                        "key `layer_types[{i}]`: {t} is not \"sliding_attention\" or \
                         \"full_attention\""
                    ))),
                })
                .collect::<Result<_>>()?;
            return Ok(SlidingLayers::Listed(flags));
        }
        Ok(match model_type {
            "gemma2" => SlidingLayers::Even,
            "gemma3_text" => {
                let n = opt_usize(obj, "sliding_window_pattern")?.unwrap_or(6);
                if n == 0 {
                    return Err(Error::Model(
                        "key `sliding_window_pattern`: must be ≥ 1 (1: every layer attends \
                         globally)"
                            .into(),
                    ));
                }
                SlidingLayers::AllButEvery(n)
            }
            _ => SlidingLayers::All,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value, model_type: &str, n: usize) -> Result<SlidingLayers> {
        SlidingLayers::parse(v.as_object().unwrap(), model_type, n)
    }

    #[test]
    fn families_follow_transformers_rules() {
        let g3 = parse(json!({}), "gemma3_text", 12).unwrap();
        let sliding: Vec<bool> = (0..12).map(|i| g3.is_sliding(i)).collect();
        // gemma-3-1b: layers 5 and 11 global.
        assert_eq!(sliding.iter().filter(|s| !**s).count(), 2);
        assert!(!sliding[5] && !sliding[11] && sliding[0] && sliding[4]);
        let g3 = parse(json!({"sliding_window_pattern": 2}), "gemma3_text", 4).unwrap();
        assert_eq!(
            (0..4).map(|i| g3.is_sliding(i)).collect::<Vec<_>>(),
            [true, false, true, false]
        );
        let g2 = parse(json!({}), "gemma2", 4).unwrap();
        assert!(g2.is_sliding(0) && !g2.is_sliding(1) && g2.is_sliding(2));
        assert!(parse(json!({}), "mistral", 4).unwrap().is_sliding(3));
    }

    #[test]
    fn layer_types_decide_and_are_checked() {
        let l = parse(
            json!({"layer_types": ["full_attention", "sliding_attention"],
                   "sliding_window_pattern": 6}),
            "gemma3_text",
            2,
        )
        .unwrap();
        assert!(!l.is_sliding(0) && l.is_sliding(1));
        let short = parse(json!({"layer_types": ["full_attention"]}), "gemma3_text", 2);
        assert!(format!("{}", short.unwrap_err()).contains("one per layer"));
        let bad = parse(json!({"layer_types": ["full", "x"]}), "gemma3_text", 2);
        assert!(format!("{}", bad.unwrap_err()).contains("layer_types[0]"));
        let zero = parse(json!({"sliding_window_pattern": 0}), "gemma3_text", 2);
        assert!(zero.is_err());
    }
}
