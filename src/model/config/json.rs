//! Owns the typed readers of config.json keys (`req_str`, `opt_usize`, …), whose errors name
//! the key.
//! Layer: model — may import the ground; no sibling.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub(super) fn req_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str> {
    obj.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Model(format!("key `{key}`: missing or not a string")))
}

pub(super) fn req_usize(obj: &Map<String, Value>, key: &str) -> Result<usize> {
    opt_usize(obj, key)?
        .ok_or_else(|| Error::Model(format!("key `{key}`: missing (expected an integer)")))
}

pub(super) fn opt_usize(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            Error::Model(format!(
                "key `{key}`: expected a non-negative integer, got {v}"
            ))
        }),
    }
}

pub(super) fn opt_f64(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::Model(format!("key `{key}`: expected a number, got {v}"))),
    }
}

pub(super) fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| Error::Model(format!("key `{key}`: expected true or false, got {v}"))),
    }
}
