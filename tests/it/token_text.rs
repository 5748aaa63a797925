//! Token text from the tokenizer's offsets (`data::token_texts`) on the demo's byte-level BPE
//! (760 tokens, so most non-ASCII characters are split into byte tokens): accents, CJK and
//! emoji show whole, never "�", and a text's token pieces join back to it exactly.

use source_tda::data::{token_char_ranges, token_texts};
use tokenizers::Tokenizer;

use crate::common;

const TEXTS: [&str; 5] = [
    "Café naïve résumé: déjà vu.",
    "東京タワーは高い。",
    "I 🦀 Rust, 👩‍🔬 too!",
    "  mixed: é東🦀 end  ",
    "plain ascii text",
];

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(common::demo_tokenizer()).unwrap()
}

#[test]
fn token_texts_join_back_to_the_text_and_never_show_a_replacement_character() {
    let tok = tokenizer();
    for text in TEXTS {
        for special in [false, true] {
            let ids = tok.encode(text, special).unwrap().get_ids().to_vec();
            let pieces = token_texts(&tok, text, &ids, special).expect("the text's own ids");
            assert_eq!(pieces.len(), ids.len(), "{text:?}");
            assert_eq!(pieces.concat(), text, "{text:?}: {pieces:?}");
            assert!(
                pieces.iter().all(|p| !p.contains('\u{FFFD}')),
                "{text:?}: {pieces:?}"
            );
        }
    }
}

#[test]
fn token_char_ranges_tile_the_text_in_characters_and_cut_the_same_pieces() {
    let tok = tokenizer();
    for text in TEXTS {
        let chars: Vec<char> = text.chars().collect();
        for special in [false, true] {
            let ids = tok.encode(text, special).unwrap().get_ids().to_vec();
            let ranges = token_char_ranges(&tok, text, &ids, special).unwrap();
            let pieces = token_texts(&tok, text, &ids, special).unwrap();
            assert_eq!(ranges.len(), ids.len());
            let mut next = 0;
            for (r, p) in ranges.iter().zip(&pieces) {
                match r {
                    // A special token (BOS) has no place in the text.
                    None => assert_eq!(Some(p.as_str()), tok.id_to_token(0).as_deref()),
                    Some((a, b)) => {
                        assert_eq!(*a, next, "{text:?}: {ranges:?}");
                        assert!(b >= a);
                        assert_eq!(&chars[*a..*b].iter().collect::<String>(), p);
                        next = *b;
                    }
                }
            }
            assert_eq!(next, chars.len(), "{text:?}: the ranges reach the end");
        }
    }
}

#[test]
fn decoding_a_byte_token_alone_shows_a_replacement_character_where_offsets_show_the_character() {
    let tok = tokenizer();
    for text in ["🦀", "東", "é"] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let alone: Vec<String> = ids
            .iter()
            .map(|&i| tok.decode(&[i], false).unwrap())
            .collect();
        assert!(
            alone.iter().any(|s| s.contains('\u{FFFD}')),
            "{text:?} is split into byte tokens by this vocabulary: {alone:?}"
        );
        let pieces = token_texts(&tok, text, &ids, false).unwrap();
        // The character goes whole to the first token that reaches it; the rest are empty.
        assert_eq!(pieces.iter().find(|p| !p.is_empty()).unwrap(), text);
        assert_eq!(pieces.concat(), text);
    }
}

#[test]
fn truncated_ids_give_a_prefix_and_foreign_ids_give_none() {
    let tok = tokenizer();
    let text = TEXTS[3];
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    let cut = &ids[..ids.len() - 2];
    let pieces = token_texts(&tok, text, cut, false).unwrap();
    assert_eq!(pieces.len(), cut.len());
    let joined = pieces.concat();
    assert!(
        text.starts_with(&joined) && joined.len() < text.len(),
        "{joined:?}"
    );
    let other = tok
        .encode("something else", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(token_texts(&tok, text, &other, false), None);
}
