//! Model test fixtures: deterministic random checkpoints written as Hugging Face
//! directories (config.json + model.safetensors).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

/// Deterministic normal samples (the library's SplitMix64 + Box–Muller).
pub struct Rng(source_tda::util::rng::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(source_tda::util::rng::SplitMix64::new(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03,
        ))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next_u64() % vocab as u64) as u32)
            .collect()
    }
}

/// mean + std · N(0, 1) values of `shape`.
pub fn randn(rng: &mut Rng, shape: &[usize], mean: f64, std: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (mean + std * rng.normal()) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A small Llama-family test model.
#[derive(Debug, Clone)]
pub struct LlamaCfg {
    pub model_type: &'static str,
    pub hidden: usize,
    pub inter: usize,
    pub vocab: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tied: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub rope_scaling: Value,
    /// `head_dim` written into config.json (else d / H).
    pub head_dim: Option<usize>,
}

impl Default for LlamaCfg {
    fn default() -> Self {
        Self {
            model_type: "llama",
            hidden: 32,
            inter: 48,
            vocab: 61,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            tied: false,
            attention_bias: false,
            mlp_bias: false,
            rope_scaling: Value::Null,
            head_dim: None,
        }
    }
}

impl LlamaCfg {
    pub fn config_json(&self) -> Value {
        let mut c = json!({
            "model_type": self.model_type, "hidden_size": self.hidden,
            "intermediate_size": self.inter, "vocab_size": self.vocab,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": self.tied,
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
            "max_position_embeddings": 256, "rope_scaling": self.rope_scaling,
            "hidden_act": "silu",
        });
        if let Some(hd) = self.head_dim {
            c["head_dim"] = json!(hd);
        }
        if self.model_type == "qwen3" {
            c["max_window_layers"] = json!(self.layers);
            c["use_sliding_window"] = json!(false);
            c["sliding_window"] = Value::Null;
        }
        if self.model_type == "phi3" {
            c["sliding_window"] = json!(2047);
            c["original_max_position_embeddings"] = json!(256);
        }
        if self.model_type == "gemma3_text" {
            // Two kinds of layers (pattern 2: layer 0 slides, layer 1 attends globally), a
            // window shorter than the test documents, distinct RoPE bases, and (unlike
            // Gemma 2) no soft caps. candle-transformers scales scores by head_dim^-1/2,
            // transformers by query_pre_attn_scalar^-1/2: equal here.
            let hd = self.head_dim.unwrap_or(self.hidden / self.heads);
            c["hidden_activation"] = json!("gelu_pytorch_tanh");
            c["query_pre_attn_scalar"] = json!(hd);
            c["attn_logit_softcapping"] = Value::Null;
            c["final_logit_softcapping"] = Value::Null;
            c["sliding_window"] = json!(4);
            c["sliding_window_pattern"] = json!(2);
            c["rope_theta"] = json!(1_000_000.0);
            c["rope_local_base_freq"] = json!(10_000.0);
            c["head_dim"] = json!(hd);
        }
        if self.model_type == "gemma2" {
            // Caps small enough that tanh bends; the window longer than any test sequence
            // (candle-transformers applies it to every layer, transformers to even ones).
            let hd = self.head_dim.unwrap_or(self.hidden / self.heads);
            c["hidden_activation"] = json!("gelu_pytorch_tanh");
            c["query_pre_attn_scalar"] = json!(hd);
            c["attn_logit_softcapping"] = json!(2.0);
            c["final_logit_softcapping"] = json!(3.0);
            c["sliding_window"] = json!(4096);
            c["head_dim"] = json!(hd);
        }
        c
    }

    /// Random weights named as in Hugging Face checkpoints.
    pub fn tensors(&self, seed: u64) -> HashMap<String, Tensor> {
        let mut rng = Rng::new(seed);
        let (d, f, v) = (self.hidden, self.inter, self.vocab);
        let hd = self.head_dim.unwrap_or(d / self.heads);
        let (dq, dkv) = (self.heads * hd, self.kv_heads * hd);
        let qkv_bias = self.attention_bias || self.model_type == "qwen2";
        let mut m = HashMap::new();
        let mut put = |m: &mut HashMap<String, Tensor>, n: String, s: &[usize], mean, std| {
            m.insert(n, randn(&mut rng, s, mean, std));
        };
        put(
            &mut m,
            "model.embed_tokens.weight".into(),
            &[v, d],
            0.0,
            0.5,
        );
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            put(
                &mut m,
                format!("{p}.input_layernorm.weight"),
                &[d],
                1.0,
                0.1,
            );
            put(
                &mut m,
                format!("{p}.post_attention_layernorm.weight"),
                &[d],
                1.0,
                0.1,
            );
            if matches!(self.model_type, "gemma2" | "gemma3_text") {
                for n in ["pre_feedforward_layernorm", "post_feedforward_layernorm"] {
                    put(&mut m, format!("{p}.{n}.weight"), &[d], 0.0, 0.3);
                }
            }
            let lin = [
                ("self_attn.q_proj", d, dq, qkv_bias),
                ("self_attn.k_proj", d, dkv, qkv_bias),
                ("self_attn.v_proj", d, dkv, qkv_bias),
                ("self_attn.o_proj", dq, d, self.attention_bias),
                ("mlp.gate_proj", d, f, self.mlp_bias),
                ("mlp.up_proj", d, f, self.mlp_bias),
                ("mlp.down_proj", f, d, self.mlp_bias),
            ];
            for (n, din, dout, bias) in lin {
                let std = 1.0 / (din as f64).sqrt();
                put(&mut m, format!("{p}.{n}.weight"), &[dout, din], 0.0, std);
                if bias {
                    put(&mut m, format!("{p}.{n}.bias"), &[dout], 0.0, 0.1);
                }
            }
        }
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            if matches!(self.model_type, "qwen3" | "gemma3_text") {
                // Gemma's norms scale by 1 + w: weights around 0 there.
                let mean = if self.model_type == "qwen3" { 1.0 } else { 0.0 };
                for n in ["q_norm", "k_norm"] {
                    put(
                        &mut m,
                        format!("{p}.self_attn.{n}.weight"),
                        &[hd],
                        mean,
                        0.3,
                    );
                }
            }
            if self.model_type == "phi3" {
                // Phi-3 stacks q, k, v and gate, up into one layer each.
                let mut fuse = |parts: &[&str], into: &str| {
                    let ts: Vec<Tensor> = parts
                        .iter()
                        .map(|n| m.remove(&format!("{p}.{n}.weight")).unwrap())
                        .collect();
                    m.insert(format!("{p}.{into}.weight"), Tensor::cat(&ts, 0).unwrap());
                };
                fuse(
                    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                    "self_attn.qkv_proj",
                );
                fuse(&["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_up_proj");
            }
        }
        put(&mut m, "model.norm.weight".into(), &[d], 1.0, 0.1);
        if !self.tied {
            put(&mut m, "lm_head.weight".into(), &[v, d], 0.0, 0.3);
        }
        m
    }
}

/// A small GPT-2 test model.
#[derive(Debug, Clone)]
pub struct Gpt2Cfg {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub vocab: usize,
    /// Name tensors `transformer.h.0...` (GPT2LMHeadModel) instead of `h.0...`.
    pub prefixed: bool,
}

impl Default for Gpt2Cfg {
    fn default() -> Self {
        Self {
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            n_positions: 64,
            vocab: 53,
            prefixed: false,
        }
    }
}

impl Gpt2Cfg {
    pub fn config_json(&self) -> Value {
        json!({"model_type": "gpt2", "n_embd": self.n_embd, "n_layer": self.n_layer,
               "n_head": self.n_head, "n_positions": self.n_positions,
               "vocab_size": self.vocab, "layer_norm_epsilon": 1e-5,
               "activation_function": "gelu_new", "n_inner": null})
    }

    /// Random weights named and shaped as in HF GPT-2 checkpoints (Conv1D: [in, out]).
    pub fn tensors(&self, seed: u64) -> HashMap<String, Tensor> {
        let mut rng = Rng::new(seed);
        let d = self.n_embd;
        let pre = if self.prefixed { "transformer." } else { "" };
        let mut m = HashMap::new();
        let mut put = |m: &mut HashMap<String, Tensor>, n: String, s: &[usize], mean, std| {
            m.insert(n, randn(&mut rng, s, mean, std));
        };
        put(
            &mut m,
            format!("{pre}wte.weight"),
            &[self.vocab, d],
            0.0,
            0.5,
        );
        put(
            &mut m,
            format!("{pre}wpe.weight"),
            &[self.n_positions, d],
            0.0,
            0.2,
        );
        for i in 0..self.n_layer {
            let p = format!("{pre}h.{i}");
            for ln in ["ln_1", "ln_2"] {
                put(&mut m, format!("{p}.{ln}.weight"), &[d], 1.0, 0.1);
                put(&mut m, format!("{p}.{ln}.bias"), &[d], 0.0, 0.1);
            }
            let conv = [
                ("attn.c_attn", d, 3 * d),
                ("attn.c_proj", d, d),
                ("mlp.c_fc", d, 4 * d),
                ("mlp.c_proj", 4 * d, d),
            ];
            for (n, din, dout) in conv {
                let std = 1.0 / (din as f64).sqrt();
                put(&mut m, format!("{p}.{n}.weight"), &[din, dout], 0.0, std);
                put(&mut m, format!("{p}.{n}.bias"), &[dout], 0.0, 0.1);
            }
        }
        put(&mut m, format!("{pre}ln_f.weight"), &[d], 1.0, 0.1);
        put(&mut m, format!("{pre}ln_f.bias"), &[d], 0.0, 0.1);
        m
    }
}

/// Writes `config.json` and `model.safetensors` into `dir`.
pub fn write_checkpoint(dir: &Path, config: &Value, tensors: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
}

/// Max |a − b| over all entries.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Max |a| over all entries.
pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Random documents of the given lengths, every token after the first a target.
pub fn random_docs(rng: &mut Rng, lengths: &[usize], vocab: usize) -> Vec<(Vec<u32>, Vec<u8>)> {
    lengths
        .iter()
        .map(|&n| {
            let ids = rng.tokens(n, vocab);
            let mut mask = vec![1u8; n];
            mask[0] = 0;
            (ids, mask)
        })
        .collect()
}

/// Borrowed view of documents for `TokenBatch::new`.
pub fn doc_refs(docs: &[(Vec<u32>, Vec<u8>)]) -> Vec<(&[u32], &[u8])> {
    docs.iter()
        .map(|(i, m)| (i.as_slice(), m.as_slice()))
        .collect()
}

/// The families and variants every check runs on: (label, config.json, tensors).
pub fn family_variants() -> Vec<(
    &'static str,
    serde_json::Value,
    std::collections::HashMap<String, Tensor>,
)> {
    let llama = LlamaCfg::default();
    let tied = LlamaCfg {
        tied: true,
        ..LlamaCfg::default()
    };
    let qwen2 = LlamaCfg {
        model_type: "qwen2",
        mlp_bias: true,
        ..LlamaCfg::default()
    };
    let biased = LlamaCfg {
        attention_bias: true,
        kv_heads: 4,
        ..LlamaCfg::default()
    };
    let qwen3 = LlamaCfg {
        model_type: "qwen3",
        head_dim: Some(16),
        ..LlamaCfg::default()
    };
    let phi3 = LlamaCfg {
        model_type: "phi3",
        ..LlamaCfg::default()
    };
    let gemma2 = LlamaCfg {
        model_type: "gemma2",
        tied: true,
        ..LlamaCfg::default()
    };
    let gemma3 = LlamaCfg {
        model_type: "gemma3_text",
        tied: true,
        head_dim: Some(16),
        ..LlamaCfg::default()
    };
    let gpt2 = Gpt2Cfg::default();
    vec![
        ("gemma3", gemma3.config_json(), gemma3.tensors(29)),
        ("qwen3", qwen3.config_json(), qwen3.tensors(26)),
        ("gemma2", gemma2.config_json(), gemma2.tensors(28)),
        ("phi3", phi3.config_json(), phi3.tensors(27)),
        ("llama", llama.config_json(), llama.tensors(21)),
        ("llama-tied", tied.config_json(), tied.tensors(22)),
        ("qwen2+mlp_bias", qwen2.config_json(), qwen2.tensors(23)),
        (
            "llama+attention_bias",
            biased.config_json(),
            biased.tensors(24),
        ),
        ("gpt2", gpt2.config_json(), gpt2.tensors(25)),
    ]
}
