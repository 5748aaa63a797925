//! Owns `read_toml` and `parse_toml`: a TOML file into a typed struct, with located errors.
//! Layer: ground — may import error and util; no sibling.
//!
//! Reading a TOML file into a typed struct, with errors that name the file, the line, the
//! key and what is allowed.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, IoContext, Result};

/// Parses `text` (the content of `file`) into `T`. Unknown keys and wrong types are errors
/// of the form `FILE:LINE:COL: key `a.b.c`: MESSAGE`.
pub fn parse_toml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T> {
    let de = toml::de::Deserializer::parse(text).map_err(|e| toml_error(file, text, "", &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        toml_error(file, text, &path, e.inner())
    })
}

/// Reads and parses a TOML file.
pub fn read_toml<T: DeserializeOwned>(file: &Path) -> Result<T> {
    let text = std::fs::read_to_string(file).ctx("reading", file)?;
    parse_toml(file, &text)
}

fn toml_error(file: &Path, text: &str, path: &str, e: &toml::de::Error) -> Error {
    let location = e
        .span()
        .map(|span| {
            let (line, col) = line_col(text, span.start);
            format!("line {line}, column {col}: ")
        })
        .unwrap_or_default();
    // serde's messages name the offending field for unknown keys; the path says where it is.
    let key = if path.is_empty() || path == "." {
        String::new()
    } else {
        format!("key `{path}`: ")
    };
    let message = e.message().trim().replace('\n', " ");
    Error::config(file, format!("{location}{key}{message}"))
}

/// 1-based line and column of byte offset `pos` in `text`.
fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| pos - i).unwrap_or(pos + 1);
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
