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

use super::read::read_rows;

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

/// Reads every document of a data set from its resolved files (in order), applying
/// `max_documents`.
pub fn load_docs(files: &[&Path], ds: &DatasetConfig) -> Result<Vec<RawDoc>> {
    let mut columns: Vec<&str> = match ds.shape {
        DocShape::Text => vec![ds.text_column.as_str()],
        DocShape::PromptCompletion => {
            vec![ds.prompt_column.as_str(), ds.completion_column.as_str()]
        }
        DocShape::Prompt => vec![ds.prompt_column.as_str()],
    };
    let mut required = vec![true; columns.len()];
    if let Some(id) = &ds.id_column {
        columns.push(id.as_str());
        required.push(true);
    }
    let mut docs = Vec::new();
    let mut seen = HashSet::new();
    let mut row_index = 0usize;
    'files: for file in files {
        for row in read_rows(file, ds.format, &columns, &required)? {
            if ds.max_documents.is_some_and(|m| docs.len() >= m) {
                break 'files;
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
                None => format!("{}-{row_index}", ds.split),
            };
            row_index += 1;
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
            "data set `{}` (split `{}`) has no documents in {}",
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
