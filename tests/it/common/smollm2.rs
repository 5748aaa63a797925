//! Shared by `tests/it/real_smollm2.rs` (asset paths come from `common/real_assets.rs`): an
//! independent raw-byte GGUF dequantiser, candle-transformers' Llama on a written checkpoint,
//! and the reference pack's loss convention.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig};
use source_tda::model::gguf::GgufLlama;

pub use crate::common::real_assets::{f32_tensor, gguf_path, i64_tensor, reference_dir};

// ---------------------------------------------------------------------------------------
// Independent dequantisation from the raw bytes (reference README, "Getting the weights").

pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((bits >> 10) & 0x1f) as i32;
    let man = (bits & 0x3ff) as f32;
    match exp {
        0 => sign * man * 2f32.powi(-24),
        31 => panic!("inf/nan scale in a test tensor"),
        e => sign * (1.0 + man / 1024.0) * 2f32.powi(e - 15),
    }
}

/// The tensor's values in GGUF storage order (row-major `[out, in]`), from the raw bytes.
pub fn raw_dequant(file: &mut File, content: &Content, name: &str) -> Vec<f32> {
    let info = &content.tensor_infos[name];
    let n = info.shape.elem_count();
    let bytes_len = n / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
    let mut raw = vec![0u8; bytes_len];
    file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
        .unwrap();
    file.read_exact(&mut raw).unwrap();
    let f16_at = |b: &[u8], i: usize| f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]));
    let mut out = Vec::with_capacity(n);
    match info.ggml_dtype {
        GgmlDType::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        ),
        GgmlDType::Q8_0 => {
            for blk in raw.chunks_exact(34) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        GgmlDType::Q4_1 => {
            for blk in raw.chunks_exact(20) {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                let qs = &blk[4..];
                out.extend(qs.iter().map(|&q| d * (q & 0xf) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
        t => panic!("{name}: unexpected type {t:?} in the SmolLM2 GGUF"),
    }
    out
}

pub fn hf_to_gguf_name(hf: &str) -> String {
    let table = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ];
    if let Some((_, g)) = table.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (l, module) = rest.split_once('.').unwrap();
    let g = match module {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        m => panic!("unexpected HF tensor {m}"),
    };
    format!("blk.{l}.{g}.weight")
}

/// Checks every tensor of `model` against the README's block formula applied to the raw GGUF
/// bytes, with q/k rows moved by the README's rule (GGUF row 2i → HF row i, 2i+1 → HF row
/// 32+i, per head of 64). Returns the GGUF types seen.
pub fn assert_equals_raw_gguf(gguf: &Path, model: &GgufLlama) -> Vec<String> {
    let mut file = File::open(gguf).unwrap();
    let content = Content::read(&mut file).unwrap();
    let mut types = std::collections::BTreeSet::new();
    for (hf, t) in &model.tensors {
        let g = hf_to_gguf_name(hf);
        types.insert(format!("{:?}", content.tensor_infos[&g].ggml_dtype));
        let raw = raw_dequant(&mut file, &content, &g);
        let cols = *t.shape.last().unwrap();
        let permuted = hf.contains("q_proj") || hf.contains("k_proj");
        let mut mismatches = 0usize;
        for (r, row) in t.data.chunks_exact(cols).enumerate() {
            let src = if permuted {
                let (h, within) = (r / 64, r % 64);
                h * 64
                    + if within < 32 {
                        2 * within
                    } else {
                        2 * (within - 32) + 1
                    }
            } else {
                r
            };
            let want = &raw[src * cols..(src + 1) * cols];
            mismatches += row
                .iter()
                .zip(want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
        }
        assert_eq!(
            mismatches, 0,
            "{hf} ({g}): values differ from the raw-byte formula"
        );
        if permuted {
            assert_ne!(t.data, raw, "{hf}: q/k rows should have been moved");
        }
    }
    types.into_iter().collect()
}

// ---------------------------------------------------------------------------------------
// Forward pass through candle-transformers' Llama on a written checkpoint.

pub fn load_llama(dir: &Path) -> (Llama, Config) {
    let cfg: LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let st = dir.join("model.safetensors");
    // SAFETY: the file was just written by this test and is not modified while mapped.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[st], DType::F32, &Device::Cpu) }.unwrap();
    (Llama::load(vb, &cfg).unwrap(), cfg)
}

/// Logits (f32) after each token of `ids`, fed one at a time through the KV cache (candle's
/// Llama returns only the last position's logits).
pub fn logits_per_position(model: &Llama, cfg: &Config, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = Cache::new(true, DType::F32, cfg, &Device::Cpu).unwrap();
    ids.iter()
        .enumerate()
        .map(|(pos, &id)| {
            let x = Tensor::new(&[[id]], &Device::Cpu).unwrap();
            let logits = model.forward(&x, pos, &mut cache).unwrap();
            logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

/// −log softmax(logits)[target], in f64.
pub fn nll(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    lse - logits[target] as f64
}

/// The README's loss: Σ_t CE(logits[t], labels[t+1]) over labels ≠ −100, per row. All rows
/// go through together, one position at a time through the KV cache (padding is on the right
/// and attention causal, so real positions never see the padding).
pub fn loss_sums(
    model: &Llama,
    cfg: &Config,
    inputs: &safetensors::SafeTensors,
    split: &str,
) -> Vec<f64> {
    let (shape, ids) = i64_tensor(inputs, &format!("{split}_input_ids"));
    let (_, labels) = i64_tensor(inputs, &format!("{split}_labels"));
    let (rows, len) = (shape[0], shape[1]);
    let mut cache = Cache::new(true, DType::F32, cfg, &Device::Cpu).unwrap();
    let mut sums = vec![0f64; rows];
    for t in 0..len - 1 {
        let col: Vec<u32> = (0..rows).map(|r| ids[r * len + t] as u32).collect();
        let x = Tensor::new(col.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let logits: Vec<Vec<f32>> = model.forward(&x, t, &mut cache).unwrap().to_vec2().unwrap();
        for (r, sum) in sums.iter_mut().enumerate() {
            let label = labels[r * len + t + 1];
            if label != -100 {
                *sum += nll(&logits[r], label as usize);
            }
        }
    }
    sums
}

pub fn max_rel_err(got: &[f64], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, &w)| (g - w as f64).abs() / (w as f64).abs())
        .fold(0.0, f64::max)
}
