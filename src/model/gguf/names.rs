//! Owns GGUF ↔ Hugging Face tensor names, expected shapes, and llama.cpp's q/k row permutation.
//! Layer: model — may import the ground, linalg, backend and, in gguf/, hf.rs.

use super::hf::LlamaHfConfig;

/// The HF name of a GGUF tensor of a Llama-family model, or `None` for a name that has no HF
/// counterpart here (e.g. `rope_freqs.weight`).
///
/// `token_embd.weight` → `model.embed_tokens.weight`, `output.weight` → `lm_head.weight`,
/// `output_norm.weight` → `model.norm.weight`, and `blk.L.X.weight` →
/// `model.layers.L.<module>.weight` for X in `attn_norm`, `attn_q`, `attn_k`, `attn_v`,
/// `attn_output`, `ffn_norm`, `ffn_gate`, `ffn_up`, `ffn_down`.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.split_once('.')?;
    if suffix != "weight" {
        return None;
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.weight"))
}

/// The GGUF tensors a model with `cfg` needs (its first `cfg.num_hidden_layers` layers), each
/// with its expected shape as `[out, in]` (HF order).
pub(super) fn wanted_tensors(cfg: &LlamaHfConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let ff = cfg.intermediate_size;
    let mut out = vec![("token_embd.weight".to_string(), vec![cfg.vocab_size, h])];
    for l in 0..cfg.num_hidden_layers {
        for (m, shape) in [
            ("attn_norm", vec![h]),
            ("attn_q", vec![q, h]),
            ("attn_k", vec![kv, h]),
            ("attn_v", vec![kv, h]),
            ("attn_output", vec![h, q]),
            ("ffn_norm", vec![h]),
            ("ffn_gate", vec![ff, h]),
            ("ffn_up", vec![ff, h]),
            ("ffn_down", vec![h, ff]),
        ] {
            out.push((format!("blk.{l}.{m}.weight"), shape));
        }
    }
    out.push(("output_norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("output.weight".into(), vec![cfg.vocab_size, h]));
    }
    out
}

/// For `attn_q` / `attn_k`, the number of heads whose rows llama.cpp permuted.
pub(super) fn qk_heads(gguf: &str, cfg: &LlamaHfConfig) -> Option<usize> {
    if gguf.ends_with(".attn_q.weight") {
        Some(cfg.num_attention_heads)
    } else if gguf.ends_with(".attn_k.weight") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    }
}

/// Undoes llama.cpp's rotary row permutation of a q or k projection (`[heads·head_dim, cols]`,
/// row-major): within each head, GGUF row `2i` holds HF row `i` and GGUF row `2i+1` holds HF
/// row `head_dim/2 + i`. Returns the rows in HF order (rotate-half RoPE).
///
/// # Panics
/// If `data.len() != heads * head_dim * cols` or `head_dim` is odd.
pub fn unpermute_qk_rows(data: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    reorder_rows(data, heads, head_dim, cols, |i, j| {
        (2 * i + j, j * head_dim / 2 + i)
    })
}

/// llama.cpp's permutation itself (HF order → GGUF order), the inverse of
/// [`unpermute_qk_rows`]: within each head, HF row `i` goes to GGUF row `2i` and HF row
/// `head_dim/2 + i` to GGUF row `2i+1`.
///
/// # Panics
/// As [`unpermute_qk_rows`].
pub fn permute_qk_rows(data: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    reorder_rows(data, heads, head_dim, cols, |i, j| {
        (j * head_dim / 2 + i, 2 * i + j)
    })
}

/// Copies rows within each head: `map(i, j)` gives (source row, destination row) within the
/// head for pair index `i < head_dim/2` and half `j ∈ {0, 1}`.
fn reorder_rows(
    data: &[f32],
    heads: usize,
    head_dim: usize,
    cols: usize,
    map: impl Fn(usize, usize) -> (usize, usize),
) -> Vec<f32> {
    assert_eq!(data.len(), heads * head_dim * cols, "q/k matrix size");
    assert!(head_dim % 2 == 0, "head_dim must be even for RoPE");
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..head_dim / 2 {
            for j in 0..2 {
                let (src, dst) = map(i, j);
                let src = (h * head_dim + src) * cols;
                let dst = (h * head_dim + dst) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_like_the_reference_table() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            ("output_norm.weight", "model.norm.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.1.attn_q.weight",
                "model.layers.1.self_attn.q_proj.weight",
            ),
            (
                "blk.12.attn_k.weight",
                "model.layers.12.self_attn.k_proj.weight",
            ),
            (
                "blk.0.attn_v.weight",
                "model.layers.0.self_attn.v_proj.weight",
            ),
            (
                "blk.0.attn_output.weight",
                "model.layers.0.self_attn.o_proj.weight",
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            (
                "blk.0.ffn_gate.weight",
                "model.layers.0.mlp.gate_proj.weight",
            ),
            ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
            (
                "blk.29.ffn_down.weight",
                "model.layers.29.mlp.down_proj.weight",
            ),
        ];
        for (g, h) in cases {
            assert_eq!(hf_name(g).as_deref(), Some(h), "{g}");
        }
        for g in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.0.attn_q.bias",
            "blk.0",
        ] {
            assert_eq!(hf_name(g), None, "{g}");
        }
    }

    #[test]
    fn unpermute_matches_the_stated_rule_and_inverts_permute() {
        // 2 heads of head_dim 8, 3 columns; each value encodes (row, col).
        let (heads, hd, cols) = (2, 8, 3);
        let gguf: Vec<f32> = (0..heads * hd * cols).map(|v| v as f32).collect();
        let hf = unpermute_qk_rows(&gguf, heads, hd, cols);
        for h in 0..heads {
            for i in 0..hd / 2 {
                for c in 0..cols {
                    // GGUF row 2i → HF row i; GGUF row 2i+1 → HF row hd/2 + i.
                    let g0 = gguf[(h * hd + 2 * i) * cols + c];
                    let g1 = gguf[(h * hd + 2 * i + 1) * cols + c];
                    assert_eq!(hf[(h * hd + i) * cols + c], g0);
                    assert_eq!(hf[(h * hd + hd / 2 + i) * cols + c], g1);
                }
            }
        }
        assert_ne!(hf, gguf);
        assert_eq!(permute_qk_rows(&hf, heads, hd, cols), gguf);
    }
}
