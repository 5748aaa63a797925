//! Owns `RawDoc` and `load_docs`: documents as the data set defines them, checked.
//! Layer: data — may import the ground, linalg, backend, model and, in this folder, read.rs.
//!
//! Documents as the data set defines them: an id and either a text, or a prompt and a
//! completion. Built from the rows of the data files, with the checks that make bad input a
//! clear error (empty documents, missing columns, duplicate ids).

use std::collections::HashSet;
use std::path::Path;

use crate::config::{DatasetConfig, DocShape};
use crate::error::{Error, Result};

use super::read::read_rows_json;

/// A document's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Plain text; the loss counts every token.
    Text(String),
    /// A prompt and its completion; the loss counts completion tokens only.
    PromptCompletion {
        /// The prompt (before any chat template).
        prompt: String,
        /// The completion.
        completion: String,
    },
    /// A conversation (`{role, content, …}` objects) for the model's chat template; the
    /// loss counts the assistant turns only.
    Messages(Vec<serde_json::Value>),
}

/// One document before tokenisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDoc {
    /// Unique id: the id column's value, or `SPLIT-ROW`.
    pub id: String,
    /// `FILE:LINE` or `FILE:row N`.
    pub location: String,
    /// Text, or prompt and completion.
    pub content: Content,
}

/// A `messages` cell: a JSON list of objects with a string `role`, and at least one
/// assistant message with a non-empty string `content`.
fn parse_messages(location: &str, col: &str, text: &str) -> Result<Vec<serde_json::Value>> {
    let bad = |why: String| {
        Error::Data(format!(
            "{location}: column `{col}` {why}; a conversation is a list of {{\"role\": …, \
             \"content\": …}} with at least one assistant message"
        ))
    };
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("is not JSON ({e})")))?;
    let list = v
        .as_array()
        .ok_or_else(|| bad("is not a list".to_string()))?;
    let mut assistant = false;
    for (i, m) in list.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(|r| r.as_str())
            .ok_or_else(|| bad(format!("message {i} has no string `role`")))?;
        let content = m.get("content");
        if role == "assistant" {
            match content.and_then(|c| c.as_str()) {
                Some(c) if !c.trim().is_empty() => assistant = true,
                Some(_) => return Err(bad(format!("message {i} (assistant) is empty"))),
                None => {
                    return Err(bad(format!(
                        "message {i} (assistant) has no string `content`"
                    )))
                }
            }
        }
    }
    if !assistant {
        return Err(bad(
            "has no assistant message, so nothing to train on".into()
        ));
    }
    Ok(list.clone())
}

/// Reads the documents of a data set from its resolved files (in order): the rows the
/// split's slice keeps (`train[:2000]`, counted over all files), then at most
/// `max_documents`.
pub fn load_docs(files: &[&Path], ds: &DatasetConfig) -> Result<Vec<RawDoc>> {
    let spec = ds
        .split_spec()
        .map_err(|e| Error::Data(format!("data set `{}`: split {e}", ds.id)))?;
    let mut columns: Vec<&str> = match ds.shape {
        DocShape::Text => vec![ds.text_column.as_str()],
        DocShape::PromptCompletion => {
            vec![ds.prompt_column.as_str(), ds.completion_column.as_str()]
        }
        DocShape::Prompt => vec![ds.prompt_column.as_str()],
        DocShape::Messages => vec![ds.messages_column.as_str()],
    };
    let mut json = vec![ds.shape == DocShape::Messages; columns.len()];
    let mut required = vec![true; columns.len()];
    if let Some(id) = &ds.id_column {
        columns.push(id.as_str());
        required.push(true);
        json.push(false);
    }
    let mut rows = Vec::new();
    for file in files {
        // Without a slice, the first max_documents rows are all that is needed.
        if spec.slice.is_none() && ds.max_documents.is_some_and(|m| rows.len() >= m) {
            break;
        }
        rows.extend(read_rows_json(file, ds.format, &columns, &required, &json)?);
    }
    let keep = match &spec.slice {
        Some(slice) => slice
            .rows(rows.len())
            .map_err(|e| Error::Data(format!("data set `{}` split `{}`: {e}", ds.id, ds.split)))?,
        None => 0..rows.len(),
    };
    let mut docs = Vec::new();
    let mut seen = HashSet::new();
    for (row_index, row) in rows
        .into_iter()
        .enumerate()
        .skip(keep.start)
        .take(keep.len())
    {
        {
            if ds.max_documents.is_some_and(|m| docs.len() >= m) {
                break;
            }
            let value = |k: usize| -> Result<String> {
                match &row.values[k] {
                    Some(v) => Ok(v.clone()),
                    None => Err(Error::Data(format!(
                        "{}: column `{}` is null; every document needs it",
                        row.location, columns[k]
                    ))),
                }
            };
            let id = match &ds.id_column {
                Some(_) => value(columns.len() - 1)?,
                None => format!("{}-{row_index}", spec.name),
            };
            let content = match ds.shape {
                DocShape::Text => {
                    let text = value(0)?;
                    if text.trim().is_empty() {
                        return Err(Error::Data(format!(
                            "{}: document `{id}` is empty (column `{}`); remove it or fill it in",
                            row.location, columns[0]
                        )));
                    }
                    Content::Text(text)
                }
                DocShape::PromptCompletion => {
                    let prompt = value(0)?;
                    let completion = value(1)?;
                    if completion.trim().is_empty() {
                        return Err(Error::Data(format!(
                            "{}: document `{id}` has an empty completion (column `{}`); the loss \
                             counts completion tokens only, so it would have none",
                            row.location, columns[1]
                        )));
                    }
                    Content::PromptCompletion { prompt, completion }
                }
                DocShape::Messages => {
                    Content::Messages(parse_messages(&row.location, columns[0], &value(0)?)?)
                }
                DocShape::Prompt => {
                    let prompt = value(0)?;
                    if prompt.trim().is_empty() {
                        return Err(Error::Data(format!(
                            "{}: query `{id}` has an empty prompt (column `{}`); the model needs \
                             something to complete",
                            row.location, columns[0]
                        )));
                    }
                    // The query stage generates the completion.
                    Content::PromptCompletion {
                        prompt,
                        completion: String::new(),
                    }
                }
            };
            if !seen.insert(id.clone()) {
                return Err(Error::Data(format!(
                    "{}: document id `{id}` appears twice; ids (column `{}`) must be unique",
                    row.location,
                    ds.id_column.as_deref().unwrap_or("?")
                )));
            }
            docs.push(RawDoc {
                id,
                location: row.location,
                content,
            });
        }
    }
    if docs.is_empty() {
        return Err(Error::Data(format!(
            "data set `{}` (split `{}`) has no documents in {} (a slice past the end keeps none)",
            ds.id,
            ds.split,
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(docs)
}
