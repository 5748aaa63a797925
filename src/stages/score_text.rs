//! Owns the token text of the documents in `score/token_scores.parquet`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); no sibling.
//!
//! `token_text` is cut from each document's text at the tokenizer's offsets
//! ([`crate::data::token_texts`]), so that a token inside a multi-byte character shows the
//! character, not "�", and a document's token texts join back to its text.

use crate::data::{token_texts, PreparedDoc};
use crate::pipeline::StageContext;

/// The text of each token of `doc` (data role `role`) from the tokenizer's offsets into its
/// text ([`token_texts`]); a document its text does not tokenise back to (not expected: the
/// `prepare` stage made its ids from that text) falls back to decoding each id alone, with a
/// warning.
pub fn doc_token_texts(
    ctx: &StageContext,
    role: &str,
    doc: &PreparedDoc,
    tokenizer: &tokenizers::Tokenizer,
) -> Vec<String> {
    let special = ctx
        .config
        .data
        .roles()
        .into_iter()
        .find(|(r, _)| *r == role)
        .is_none_or(|(_, ds)| ds.add_special_tokens);
    token_texts(tokenizer, &doc.text, &doc.input_ids, special).unwrap_or_else(|| {
        tracing::warn!(
            "score: document `{}` does not tokenise back to its stored ids; its token_text is \
             each token decoded alone",
            doc.doc_id
        );
        doc.input_ids
            .iter()
            .map(|&id| tokenizer.decode(&[id], false).unwrap_or_default())
            .collect()
    })
}
