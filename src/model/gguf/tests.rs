//! Tests for GGUF conversion (gguf.rs).
//! Layer: model (tests) — may import the ground, linalg and backend; uses its parent gguf.rs.
//!
//! Conversion of small synthetic GGUF files written with candle's GGUF writer: exact values,
//! q/k rows, tied and untied heads, truncation, and the errors for bad files.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::*;

const H: usize = 64; // hidden
const HEADS: usize = 2;
const KV: usize = 1;
const HD: usize = 32;
const FF: usize = 96;
const VOCAB: usize = 40;
const LAYERS: usize = 2;

/// Deterministic values that F16 represents exactly (multiples of 1/64 in [-2, 2)).
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 37 + seed * 101) % 256) as f32 - 128.0) / 64.0)
        .collect()
}

fn qtensor(shape: &[usize], seed: usize, dtype: GgmlDType) -> (Vec<f32>, QTensor) {
    let data = values(shape.iter().product(), seed);
    let t = Tensor::from_vec(data.clone(), shape, &Device::Cpu).unwrap();
    (data, QTensor::quantize(&t, dtype).unwrap())
}

/// A tiny Llama GGUF. `edit` may change the metadata and tensor list before writing.
/// Returns the path and the HF-order f32 values of the tensors written as F32/F16.
struct Tiny {
    meta: Vec<(String, Value)>,
    tensors: Vec<(String, QTensor)>,
    hf_values: std::collections::HashMap<String, Vec<f32>>,
}

fn tiny() -> Tiny {
    let meta = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(LAYERS as u32)),
        ("llama.context_length".into(), Value::U32(256)),
        ("llama.embedding_length".into(), Value::U32(H as u32)),
        ("llama.feed_forward_length".into(), Value::U32(FF as u32)),
        (
            "llama.attention.head_count".into(),
            Value::U32(HEADS as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(KV as u32),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-6),
        ),
        ("llama.vocab_size".into(), Value::U32(VOCAB as u32)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
    ];
    let mut tensors = vec![];
    let mut hf_values = std::collections::HashMap::new();
    let mut add = |name: String, shape: &[usize], dtype: GgmlDType, qk_heads: Option<usize>| {
        let seed = tensors.len();
        let (data, q) = qtensor(shape, seed, dtype);
        if let Some(heads) = qk_heads {
            // Store llama.cpp's order; the converter must give back `data`.
            let gguf = permute_qk_rows(&data, heads, HD, shape[1]);
            let t = Tensor::from_vec(gguf, shape, &Device::Cpu).unwrap();
            tensors.push((name.clone(), QTensor::quantize(&t, dtype).unwrap()));
        } else {
            tensors.push((name.clone(), q));
        }
        hf_values.insert(hf_name(&name).unwrap(), data);
    };
    add(
        "token_embd.weight".into(),
        &[VOCAB, H],
        GgmlDType::F16,
        None,
    );
    for l in 0..LAYERS {
        let b = |m: &str| format!("blk.{l}.{m}.weight");
        add(b("attn_norm"), &[H], GgmlDType::F32, None);
        add(b("attn_q"), &[HEADS * HD, H], GgmlDType::F32, Some(HEADS));
        add(b("attn_k"), &[KV * HD, H], GgmlDType::F16, Some(KV));
        add(b("attn_v"), &[KV * HD, H], GgmlDType::F32, None);
        add(b("attn_output"), &[H, HEADS * HD], GgmlDType::F16, None);
        add(b("ffn_norm"), &[H], GgmlDType::F32, None);
        add(b("ffn_gate"), &[FF, H], GgmlDType::Q8_0, None);
        add(b("ffn_up"), &[FF, H], GgmlDType::Q4_1, None);
        add(b("ffn_down"), &[H, FF], GgmlDType::F32, None);
    }
    add("output_norm.weight".into(), &[H], GgmlDType::F32, None);
    Tiny {
        meta,
        tensors,
        hf_values,
    }
}

impl Tiny {
    fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("tiny.gguf");
        let mut f = std::fs::File::create(&path).unwrap();
        let meta: Vec<(&str, &Value)> = self.meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &meta, &ts).unwrap();
        path
    }
    fn set_meta(&mut self, key: &str, v: Value) {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.into(), v));
    }
    fn replace(&mut self, name: &str, shape: &[usize], dtype: GgmlDType) {
        let (_, q) = qtensor(shape, 7, dtype);
        self.tensors.iter_mut().find(|(n, _)| n == name).unwrap().1 = q;
    }
}

#[test]
fn converts_exact_values_hf_qk_rows_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let t = tiny();
    let m = GgufLlama::read(&t.write(dir.path()), &ReadOptions::default()).unwrap();
    let c = &m.config;
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (H, FF, LAYERS)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (HEADS, KV, HD)
    );
    assert_eq!(
        (c.rms_norm_eps, c.rope_theta, c.vocab_size),
        (1e-6, 10000.0, VOCAB)
    );
    assert_eq!((c.bos_token_id, c.eos_token_id), (Some(1), None));
    assert!(c.tie_word_embeddings);
    assert_eq!(m.tensors.len(), 1 + 9 * LAYERS + 1);
    // F32 and F16 tensors (every value exact in f16) come back bit-exact, q/k in HF order.
    for (name, t_in) in &t.hf_values {
        let (_, ty) = &m.origin[name];
        if ty == "F32" || ty == "F16" {
            assert_eq!(&m.tensors[name].data, t_in, "{name} ({ty})");
        }
    }
    // Quantised ones are close to what was quantised (Q4_1 steps are 4/15 here).
    let up = &m.tensors["model.layers.0.mlp.up_proj.weight"];
    let want = &t.hf_values["model.layers.0.mlp.up_proj.weight"];
    let err = up
        .data
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err <= 0.14, "Q4_1 max error {err}");
    assert_eq!(m.origin["model.layers.0.mlp.gate_proj.weight"].1, "Q8_0");
}

#[test]
fn truncates_and_unties() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tiny();
    let (_, head) = qtensor(&[VOCAB, H], 99, GgmlDType::F32);
    t.tensors.push(("output.weight".into(), head));
    let m = GgufLlama::read(&t.write(dir.path()), &ReadOptions { layers: Some(1) }).unwrap();
    assert_eq!(m.config.num_hidden_layers, 1);
    assert!(!m.config.tie_word_embeddings);
    assert!(m.tensors.contains_key("lm_head.weight"));
    assert!(!m.tensors.keys().any(|k| k.starts_with("model.layers.1.")));
    let out = tempfile::tempdir().unwrap();
    let w = m.write_hf_dir(out.path(), None).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.config_json).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["num_hidden_layers"], 1);
    assert_eq!(cfg["rms_norm_eps"], 1e-6);
    assert!(w.tokenizer_json.is_none());

    for n in [0, LAYERS + 1] {
        let e = GgufLlama::read(&t.write(dir.path()), &ReadOptions { layers: Some(n) });
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.contains(&format!("--layers {n}")) && msg.contains("1 to 2"),
            "{msg}"
        );
    }
}

fn read_err(t: &Tiny) -> String {
    let dir = tempfile::tempdir().unwrap();
    GgufLlama::read(&t.write(dir.path()), &ReadOptions::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn errors_name_the_tensor_or_key() {
    let mut t = tiny();
    t.tensors.retain(|(n, _)| n != "blk.1.ffn_up.weight");
    let msg = read_err(&t);
    assert!(
        msg.contains("`blk.1.ffn_up.weight`: missing (expected shape [96, 64])"),
        "{msg}"
    );

    let mut t = tiny();
    t.replace("blk.0.attn_v.weight", &[KV * HD, H], GgmlDType::Q4_0);
    let msg = read_err(&t);
    assert!(
        msg.contains("`blk.0.attn_v.weight`: type Q4_0 is not supported"),
        "{msg}"
    );

    let mut t = tiny();
    t.replace("blk.0.attn_k.weight", &[HEADS * HD, H], GgmlDType::F32);
    let msg = read_err(&t);
    assert!(
        msg.contains("`blk.0.attn_k.weight`: shape [64, 64]"),
        "{msg}"
    );
    assert!(msg.contains("expected [32, 64]"), "{msg}");

    let mut t = tiny();
    t.set_meta("general.architecture", Value::String("qwen2".into()));
    assert!(read_err(&t).contains("architecture `qwen2` is not supported"));

    let mut t = tiny();
    t.meta.retain(|(k, _)| k != "llama.feed_forward_length");
    assert!(read_err(&t).contains("`llama.feed_forward_length`: missing"));

    let mut t = tiny();
    t.set_meta("llama.attention.head_count_kv", Value::U32(3));
    assert!(read_err(&t).contains("attention layout not supported"));

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let msg = GgufLlama::read(&junk, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("junk.gguf") && msg.contains("not a readable GGUF"),
        "{msg}"
    );
}

fn demo_tokenizer() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/hf-cache/models--source-tda--demo-llama");
    let commit = std::fs::read_to_string(repo.join("refs/main")).unwrap();
    repo.join("snapshots")
        .join(commit.trim())
        .join("tokenizer.json")
}

#[test]
fn tokenizer_is_checked_against_the_gguf_vocabulary() {
    let path = demo_tokenizer();
    let tok = tokenizers::Tokenizer::from_file(&path).unwrap();
    let n = tok.get_vocab_size(true);
    let mut vocab: Vec<String> = (0..n as u32).map(|i| tok.id_to_token(i).unwrap()).collect();
    check_tokenizer(&path, Some(&vocab), n).unwrap();
    check_tokenizer(&path, None, n + 10).unwrap();

    let msg = check_tokenizer(&path, None, n - 1).unwrap_err().to_string();
    assert!(msg.contains(&format!("has {n} tokens")), "{msg}");
    vocab[5] = "something-else".into();
    let msg = check_tokenizer(&path, Some(&vocab), n)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("token id 5") && msg.contains("something-else"),
        "{msg}"
    );
    let msg = check_tokenizer(Path::new("/nonexistent/tokenizer.json"), None, n)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("cannot load"), "{msg}");
}
