//! Owns tokenisation into ids and loss masks: `PreparedDoc`, `tokenize_docs`, `load_tokenizer`.
//! Layer: data — may import the ground, linalg, backend, model and, in this folder, docs.rs,
//! chat.rs.
//!
//! Tokenisation with the model's `tokenizer.json` (tokenizers crate) into token ids and loss
//! masks.
//!
//! Loss mask convention: `loss_mask[t] = 1` when token t is a *target*, i.e. the model's
//! prediction of token t from tokens `< t` counts in the loss. Token 0 has no context and is
//! never a target. For `text` documents every other token is a target; for
//! `prompt_completion` documents, the tokens of the completion are. Prompt and completion are
//! tokenised as one string (the model sees the natural tokenisation); a token that straddles
//! the boundary counts as completion, and such tokens are counted.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::config::{DatasetConfig, DocShape};
use crate::error::{Error, Result};
use crate::util::progress;

use super::chat::ChatTemplate;
use super::docs::{Content, RawDoc};

/// A tokenised document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedDoc {
    /// Document id.
    pub doc_id: String,
    /// The text as tokenised (for prompt/completion: templated prompt + completion).
    pub text: String,
    /// The prompt before templating (prompt/completion documents).
    pub prompt: Option<String>,
    /// The completion (prompt/completion documents).
    pub completion: Option<String>,
    /// Token ids, at most `max_length`.
    pub input_ids: Vec<u32>,
    /// 1 where the token is a loss target (see module docs), else 0.
    pub loss_mask: Vec<u8>,
    /// Tokens cut off by truncation.
    pub truncated_tokens: u32,
    /// `FILE:LINE` the document came from.
    pub source: String,
}

impl PreparedDoc {
    /// Number of tokens.
    pub fn n_tokens(&self) -> usize {
        self.input_ids.len()
    }

    /// Number of loss targets.
    pub fn n_loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m != 0).count()
    }
}

/// Counts over one data set's tokenisation, for the stage summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenizeStats {
    /// Documents.
    pub documents: usize,
    /// Tokens kept.
    pub tokens: usize,
    /// Loss targets.
    pub loss_tokens: usize,
    /// Documents that were truncated.
    pub truncated_documents: usize,
    /// Tokens cut off in total.
    pub truncated_tokens: usize,
    /// Longest document (tokens, after truncation).
    pub max_tokens: usize,
    /// Tokens that straddle the prompt/completion boundary (counted as completion).
    pub boundary_straddles: usize,
}

/// A tokenised data set.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The documents, in data-set order.
    pub docs: Vec<PreparedDoc>,
    /// Counts.
    pub stats: TokenizeStats,
}

/// Loads `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
        path: path.to_path_buf(),
        message: format!("cannot load: {e}"),
    })
}

/// Which bytes of a document's text hold its loss targets.
enum Targets {
    /// Every token (text documents).
    All,
    /// The tokens ending after this byte (the completion).
    After(usize),
    /// The assistant turns (byte ranges from [`ChatTemplate::assistant_spans`]).
    Turns(Vec<std::ops::Range<usize>>),
}

/// The loss mask of a conversation: the non-special tokens that overlap an assistant span,
/// and the special token right after each span's end when there is one (the end-of-turn
/// marker: `<|im_end|>`, `<|eot_id|>`), so the model learns to stop. Also returns how many
/// tokens straddle a span's start.
fn turn_mask(
    offsets: &[(usize, usize)],
    special: &[u32],
    spans: &[std::ops::Range<usize>],
) -> (Vec<u8>, usize) {
    let mut mask = vec![0u8; offsets.len()];
    let mut straddles = 0;
    for span in spans {
        for (t, &(s, e)) in offsets.iter().enumerate() {
            if special[t] == 0 && s < span.end && e > span.start {
                mask[t] = 1;
                straddles += usize::from(s < span.start);
            }
        }
        if let Some(t) = offsets.iter().position(|&(s, _)| s >= span.end) {
            if special[t] != 0 {
                mask[t] = 1;
            }
        }
    }
    (mask, straddles)
}

/// Tokenises `docs` (in parallel, deterministic), truncating to `ds.max_length`; `chat` is
/// the model's chat template, which `messages` documents need.
pub fn tokenize_docs(
    tokenizer: &Tokenizer,
    tokenizer_path: &Path,
    docs: &[RawDoc],
    ds: &DatasetConfig,
    chat: Option<&ChatTemplate>,
    label: &str,
) -> Result<Prepared> {
    let template = ds.template();
    // (full text, the byte ranges whose tokens are targets)
    let inputs: Vec<(String, Targets)> = docs
        .iter()
        .map(|d| match &d.content {
            Content::Text(t) => Ok((t.clone(), Targets::All)),
            Content::PromptCompletion { prompt, completion } => {
                let p = match template {
                    Some(t) => t.replace("{prompt}", prompt),
                    None => prompt.clone(),
                };
                let boundary = p.len();
                Ok((p + completion, Targets::After(boundary)))
            }
            Content::Messages(messages) => {
                let chat = chat.ok_or_else(|| {
                    Error::Data(format!(
                        "{}: a `messages` document needs the model's chat template, and the model \
                         has none (no `chat_template` in tokenizer_config.json, no \
                         chat_template.jinja); add one to the model folder",
                        d.location
                    ))
                })?;
                let (text, spans) = chat
                    .assistant_spans(messages)
                    .map_err(|e| Error::Data(format!("{}: {e}", d.location)))?;
                Ok((text, Targets::Turns(spans)))
            }
        })
        .collect::<Result<_>>()?;
    // A chat template writes the special tokens itself (transformers tokenises its text with
    // add_special_tokens=False).
    let add_special = ds.add_special_tokens && ds.shape != DocShape::Messages;

    let pb = progress::bar(docs.len() as u64, label);
    let mut out = Vec::with_capacity(docs.len());
    let mut stats = TokenizeStats::default();
    const CHUNK: usize = 512;
    for (chunk_i, chunk) in inputs.chunks(CHUNK).enumerate() {
        let texts: Vec<&str> = chunk.iter().map(|(t, _)| t.as_str()).collect();
        let encodings =
            tokenizer
                .encode_batch(texts, add_special)
                .map_err(|e| Error::Tokenizer {
                    path: tokenizer_path.to_path_buf(),
                    message: format!("encoding failed: {e}"),
                })?;
        for (k, (enc, (text, boundary))) in encodings.iter().zip(chunk).enumerate() {
            let doc = &docs[chunk_i * CHUNK + k];
            let mut ids = enc.get_ids().to_vec();
            let offsets = enc.get_offsets();
            let special = enc.get_special_tokens_mask();
            let mut mask: Vec<u8> = match boundary {
                Targets::All => vec![1; ids.len()],
                Targets::After(b) => offsets
                    .iter()
                    .zip(special)
                    .map(|(&(s, e), &sp)| {
                        let completion = sp == 0 && e > *b;
                        if completion && s < *b {
                            stats.boundary_straddles += 1;
                        }
                        completion as u8
                    })
                    .collect(),
                Targets::Turns(spans) => {
                    // Special: added by the post-processor, or a special added token in the
                    // text (`<|im_end|>`, `<|eot_id|>`).
                    let added = tokenizer.get_added_vocabulary();
                    let special: Vec<u32> = enc
                        .get_tokens()
                        .iter()
                        .zip(special)
                        .map(|(t, &sp)| u32::from(sp != 0 || added.is_special_token(t)))
                        .collect();
                    let (mask, straddles) = turn_mask(offsets, &special, spans);
                    stats.boundary_straddles += straddles;
                    mask
                }
            };
            if let Some(m) = mask.first_mut() {
                *m = 0; // token 0 has no context: never a target
            }
            if ids.is_empty() {
                return Err(Error::Data(format!(
                    "{}: document `{}` tokenises to nothing",
                    doc.location, doc.id
                )));
            }
            let truncated = ids.len().saturating_sub(ds.max_length);
            if truncated > 0 {
                ids.truncate(ds.max_length);
                mask.truncate(ds.max_length);
                stats.truncated_documents += 1;
                stats.truncated_tokens += truncated;
            }
            let (prompt, completion) = match &doc.content {
                Content::Text(_) | Content::Messages(_) => (None, None),
                Content::PromptCompletion { prompt, completion } => {
                    (Some(prompt.clone()), Some(completion.clone()))
                }
            };
            let prepared = PreparedDoc {
                doc_id: doc.id.clone(),
                text: text.clone(),
                prompt,
                completion,
                input_ids: ids,
                loss_mask: mask,
                truncated_tokens: truncated as u32,
                source: doc.location.clone(),
            };
            // A prompt-only query has no completion yet (the query stage generates it).
            if prepared.n_loss_tokens() == 0 && ds.shape != DocShape::Prompt {
                return Err(Error::Data(format!(
                    "{}: document `{}` has no loss tokens after tokenisation{} (it has {} tokens); \
                     raise max_length (now {}) or shorten the prompt",
                    doc.location,
                    doc.id,
                    if truncated > 0 {
                        format!(" and truncation of {truncated} tokens")
                    } else {
                        String::new()
                    },
                    prepared.n_tokens(),
                    ds.max_length
                )));
            }
            stats.documents += 1;
            stats.tokens += prepared.n_tokens();
            stats.loss_tokens += prepared.n_loss_tokens();
            stats.max_tokens = stats.max_tokens.max(prepared.n_tokens());
            out.push(prepared);
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    if stats.truncated_documents > 0 {
        tracing::warn!(
            "{label}: {} of {} documents were longer than max_length = {} and were truncated \
             ({} tokens cut); raise `max_length` to keep them whole",
            stats.truncated_documents,
            stats.documents,
            ds.max_length,
            stats.truncated_tokens
        );
    }
    Ok(Prepared { docs: out, stats })
}
