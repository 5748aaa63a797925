//! Owns `Tracking`: which linear layers are tracked (name patterns, `glob_match`).
//! Layer: model — may import the ground, linalg and backend; no sibling.
//!
//! Which linear layers are tracked: name patterns with `*` wildcards, matched against the
//! layer's Hugging Face module name (the weight name without `.weight`, e.g.
//! `model.layers.3.self_attn.q_proj` or `h.0.attn.c_attn`).

use crate::error::{Error, Result};

/// The tracked-layer selection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Tracking {
    /// Every linear layer inside the transformer blocks (attention and MLP projections);
    /// embeddings and lm_head are not tracked.
    #[default]
    BlockLinears,
    /// Layers whose name matches any of these patterns (`*` matches any run of characters,
    /// dots included). Each pattern must match at least one linear layer.
    Patterns(Vec<String>),
    /// No layer (plain training or inference).
    None,
}

impl Tracking {
    /// Decides for every linear layer `(name, in_block)` whether it is tracked. Errors when a
    /// pattern matches no layer, naming the pattern and a few layer names.
    pub fn select(&self, layers: &[(String, bool)]) -> Result<Vec<bool>> {
        match self {
            Tracking::BlockLinears => Ok(layers.iter().map(|(_, b)| *b).collect()),
            Tracking::None => Ok(vec![false; layers.len()]),
            Tracking::Patterns(pats) => {
                for p in pats {
                    if !layers.iter().any(|(n, _)| glob_match(p, n)) {
                        let examples: Vec<&str> =
                            layers.iter().take(4).map(|(n, _)| n.as_str()).collect();
                        return Err(Error::Model(format!(
                            "tracking pattern `{p}` matches no linear layer; layer names look \
                             like: {}",
                            examples.join(", ")
                        )));
                    }
                }
                Ok(layers
                    .iter()
                    .map(|(n, _)| pats.iter().any(|p| glob_match(p, n)))
                    .collect())
            }
        }
    }
}

/// `*`-wildcard match of the whole `text` (no other metacharacters).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() {
        return false;
    }
    if !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match(
            "model.layers.*.mlp.*",
            "model.layers.12.mlp.down_proj"
        ));
        assert!(!glob_match(
            "model.layers.*.mlp.*",
            "model.layers.1.self_attn.q_proj"
        ));
        assert!(glob_match("*q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(glob_match("h.0.attn.c_attn", "h.0.attn.c_attn"));
        assert!(!glob_match("h.0.attn", "h.0.attn.c_attn"));
        assert!(glob_match("*", "x"));
        assert!(!glob_match("a*a", "a"));
    }

    #[test]
    fn select_default_patterns_and_errors() {
        let layers = vec![
            ("model.layers.0.self_attn.q_proj".to_string(), true),
            ("model.layers.0.mlp.up_proj".to_string(), true),
            ("lm_head".to_string(), false),
        ];
        assert_eq!(
            Tracking::BlockLinears.select(&layers).unwrap(),
            vec![true, true, false]
        );
        let t = Tracking::Patterns(vec!["*.mlp.*".into(), "lm_head".into()]);
        assert_eq!(t.select(&layers).unwrap(), vec![false, true, true]);
        let e = Tracking::Patterns(vec!["*.k_proj".into()])
            .select(&layers)
            .unwrap_err()
            .to_string();
        assert!(e.contains("*.k_proj"), "{e}");
    }
}
