//! Owns the text of each token of a document as the tables and the report show it.
//! Layer: data — may import the ground, linalg, backend, model and, in this folder, docs.rs.
//!
//! A token's text is cut from the document's own string at the tokenizer's byte offsets, not
//! decoded from its id alone: a byte-level BPE token that holds part of a multi-byte
//! character (an accent, a CJK character, an emoji) decodes alone to "�", while its offsets
//! point at the whole character. Each byte of the string goes to the first token whose span
//! reaches it, and a gap the offsets leave out (a space some tokenizers trim off a token's
//! span) goes to the token after it, so the pieces of a document's tokens, joined, give back
//! its text exactly (the second token of a split character is ""). A special token the
//! tokenizer inserted (BOS; no span in the string) shows its vocabulary entry (`<s>`).

use tokenizers::Tokenizer;

/// Where each token of a document sits in its text: a byte range of the string, or a
/// special token the tokenizer inserted (no span in the string).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Bytes(usize, usize),
    Special(u32),
}

/// Each of `ids`' piece of `text`, the partition [`token_texts`] cuts (`None` when `text`
/// does not tokenise to `ids`).
fn pieces(
    tokenizer: &Tokenizer,
    text: &str,
    ids: &[u32],
    add_special_tokens: bool,
) -> Option<Vec<Piece>> {
    let enc = tokenizer.encode(text, add_special_tokens).ok()?;
    let all = enc.get_ids();
    if all.len() < ids.len() || &all[..ids.len()] != ids {
        return None;
    }
    let offsets = enc.get_offsets();
    let special = enc.get_special_tokens_mask();
    let mut cursor = 0usize;
    let mut last_piece = None;
    let mut out = Vec::with_capacity(ids.len());
    for (t, &id) in ids.iter().enumerate() {
        let (start, end) = offsets[t];
        if start == end && special.get(t) == Some(&1) {
            out.push(Piece::Special(id));
            continue;
        }
        let mut stop = end.max(cursor).min(text.len());
        while !text.is_char_boundary(stop) {
            stop += 1;
        }
        out.push(Piece::Bytes(cursor, stop));
        last_piece = Some(t);
        cursor = stop;
    }
    // Untruncated: what no span reaches at the end (trailing space) belongs to the last token.
    if let (true, Some(t)) = (all.len() == ids.len(), last_piece) {
        if let Piece::Bytes(start, _) = out[t] {
            out[t] = Piece::Bytes(start, text.len());
        }
    }
    Some(out)
}

/// The text of each of `ids`, the tokenisation of `text` (with `add_special_tokens` as it was
/// tokenised; `ids` may be cut short by truncation). `None` when `text` does not tokenise to
/// `ids` (another tokenizer made them): the caller decodes instead.
pub fn token_texts(
    tokenizer: &Tokenizer,
    text: &str,
    ids: &[u32],
    add_special_tokens: bool,
) -> Option<Vec<String>> {
    let out = pieces(tokenizer, text, ids, add_special_tokens)?
        .into_iter()
        .map(|p| match p {
            Piece::Bytes(a, b) => text[a..b].to_string(),
            Piece::Special(id) => tokenizer.id_to_token(id).unwrap_or_default(),
        })
        .collect();
    Some(out)
}

/// The character range `[start, end)` of `text` (counted in Unicode scalar values, as
/// Python's `str` counts) that each of `ids` holds, by the same partition as [`token_texts`]
/// (so the ranges of a document's tokens tile its text); `None` for a special token the
/// tokenizer inserted, and an empty range for the second byte-token of a split character.
/// `None` overall when `text` does not tokenise to `ids`.
#[allow(clippy::type_complexity)]
pub fn token_char_ranges(
    tokenizer: &Tokenizer,
    text: &str,
    ids: &[u32],
    add_special_tokens: bool,
) -> Option<Vec<Option<(usize, usize)>>> {
    let p = pieces(tokenizer, text, ids, add_special_tokens)?;
    // Byte offset → character offset, for every char boundary (and the end).
    let mut chars_before = vec![0usize; text.len() + 1];
    let mut n = 0;
    for (b, _) in text.char_indices() {
        chars_before[b] = n;
        n += 1;
    }
    chars_before[text.len()] = n;
    Some(
        p.into_iter()
            .map(|p| match p {
                Piece::Bytes(a, b) => Some((chars_before[a], chars_before[b])),
                Piece::Special(_) => None,
            })
            .collect(),
    )
}

/// The text of each generated token of `ids` (a completion the model produced, which has no
/// source string to cut): token j's text is what decoding `ids[..=j]` adds to decoding
/// `ids[..j]`. A token that ends inside a multi-byte character adds nothing ("") and the
/// token that completes the character shows it whole, so the pieces, joined, give back
/// `decode(ids)`; a decoder whose prefixes are not prefixes of longer decodes (not expected)
/// falls back to decoding the rest one id at a time.
pub fn generated_token_texts(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let decode = |s: &[u32]| tokenizer.decode(s, false).unwrap_or_default();
    let mut out = Vec::with_capacity(ids.len());
    let mut shown = String::new();
    for j in 0..ids.len() {
        let full = decode(&ids[..=j]);
        if full.ends_with('\u{FFFD}') && j + 1 < ids.len() {
            out.push(String::new());
            continue;
        }
        match full.strip_prefix(shown.as_str()) {
            Some(rest) => {
                out.push(rest.to_string());
                shown = full;
            }
            None => {
                out.extend(ids[j..].iter().map(|&id| decode(&[id])));
                return out;
            }
        }
    }
    out
}
