//! Owns `diff_values` and `KeyChange`: key-by-key differences between two configs.
//! Layer: ground — may import error and util; no sibling.
//!
//! Key-by-key differences between two configs, for the message that refuses to reuse a run
//! directory made with a different config.

use std::collections::BTreeMap;

use serde_json::Value;

/// One key whose value differs between two configs.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyChange {
    /// Dotted key path, e.g. `data.train.max_length`.
    pub key: String,
    /// The value in the old config (`None`: absent).
    pub old: Option<String>,
    /// The value in the new config (`None`: absent).
    pub new: Option<String>,
}

impl std::fmt::Display for KeyChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".to_string());
        write!(f, "{}: {} → {}", self.key, show(&self.old), show(&self.new))
    }
}

/// The keys whose values differ between `old` and `new`, sorted by key.
pub fn diff_values(old: &Value, new: &Value) -> Vec<KeyChange> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| KeyChange {
            key: k.clone(),
            old: a.get(k).cloned(),
            new: b.get(k).cloned(),
        })
        .collect()
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::Null => {}
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_changed_added_and_removed_keys() {
        let old = json!({"model": {"id": "a", "revision": "main"}, "data": {"x": 1}});
        let new = json!({"model": {"id": "a", "revision": "v2"}, "data": {"y": 2}});
        let d = diff_values(&old, &new);
        let keys: Vec<_> = d.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["data.x", "data.y", "model.revision"]);
        assert_eq!(d[2].to_string(), "model.revision: \"main\" → \"v2\"");
        assert_eq!(d[0].new, None);
    }

    #[test]
    fn equal_values_have_no_diff() {
        let v = json!({"a": [1, 2], "b": {"c": null}});
        assert!(diff_values(&v, &v).is_empty());
    }
}
