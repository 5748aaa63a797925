//! Owns `ModelSpec`: Hugging Face `config.json` → a typed architecture spec.
//! Layer: model — may import the ground, linalg and backend; no sibling.
//!
//! Supported `model_type`s: the Llama family (`llama`, `mistral`, `qwen2`, `qwen3`, `phi3`,
//! `gemma2`, `gemma3_text`) and `gpt2`.
//! Every error names the key that is missing or wrong.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, IoContext, Result};

mod attention;
mod json;
mod rope;

pub use attention::SlidingLayers;
use json::{opt_bool, opt_f64, opt_usize, req_str, req_usize};
pub use rope::RopeScaling;
use rope::{parse_rope_scaling, scaling_from, RopeParameters};

/// The `model_type`s this crate can build.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3_text",
    "gpt2",
];

/// A parsed architecture.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 and 3: RMSNorm, RoPE, GQA attention, gated
    /// MLP.
    Llama(LlamaSpec),
    /// GPT-2: LayerNorm, learned positions, Conv1D layers with biases, GELU MLP.
    Gpt2(Gpt2Spec),
}

/// Llama-family hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaSpec {
    /// `model_type` as written (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text).
    pub model_type: String,
    /// Residual width d.
    pub hidden_size: usize,
    /// MLP width d_ff.
    pub intermediate_size: usize,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads H.
    pub num_heads: usize,
    /// Key/value heads H_kv (H_kv divides H).
    pub num_kv_heads: usize,
    /// Per-head width D (`head_dim`, else d / H).
    pub head_dim: usize,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// RMSNorm ε.
    pub rms_norm_eps: f64,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (qwen2, or `attention_bias`).
    pub qkv_bias: bool,
    /// o projection has a bias (`attention_bias`).
    pub o_bias: bool,
    /// gate/up/down projections have biases (`mlp_bias`).
    pub mlp_bias: bool,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// Sliding attention window (mistral, phi3, gemma; qwen2/qwen3 with `use_sliding_window`):
    /// a query at position p sees keys j with p − j < window.
    pub sliding_window: Option<usize>,
    /// Which layers use the window.
    pub sliding_layers: SlidingLayers,
    /// RoPE base of the sliding layers (`rope_local_base_freq`, Gemma 3), which use no RoPE
    /// scaling; None: every layer uses `rope_theta` and `rope_scaling`.
    pub rope_local_theta: Option<f64>,
    /// RMSNorm over each head's queries and keys before RoPE (`q_norm`, `k_norm`: qwen3,
    /// gemma3_text).
    pub qk_norm: bool,
    /// q, k, v in one `qkv_proj` and gate, up in one `gate_up_proj` (phi3).
    pub fused_projections: bool,
    /// Gemma's particulars: RMSNorm scales by (1 + w); the embeddings are multiplied by √d;
    /// each block also normalises its attention output (`post_attention_layernorm`), its MLP
    /// input (`pre_feedforward_layernorm`) and output (`post_feedforward_layernorm`)
    /// (gemma2, gemma3_text).
    pub gemma: bool,
    /// The gated MLP's activation on the gate.
    pub mlp_activation: MlpActivation,
    /// Attention scores s = scale · q kᵀ: `query_pre_attn_scalar`^{−1/2} (gemma2), else
    /// head_dim^{−1/2}.
    pub attn_scale: f64,
    /// Attention scores soft-capped to c·tanh(s/c) (`attn_logit_softcapping`, gemma2).
    pub attn_softcap: Option<f64>,
    /// Logits soft-capped to c·tanh(z/c) (`final_logit_softcapping`, gemma2).
    pub final_softcap: Option<f64>,
}

/// The activation of a gated MLP: down(act(gate(x)) ⊙ up(x)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpActivation {
    /// x σ(x) (SwiGLU: Llama, Mistral, Qwen, Phi-3).
    Silu,
    /// The tanh approximation of GELU (`gelu_pytorch_tanh`: Gemma's GeGLU).
    GeluTanh,
}

/// MLP activation of GPT-2 (`activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpt2Activation {
    /// `gelu_new` / `gelu_pytorch_tanh`: 0.5x(1 + tanh(√(2/π)(x + 0.044715x³))).
    GeluTanh,
    /// `gelu`: x Φ(x) with the exact erf.
    GeluErf,
}

/// GPT-2 hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Spec {
    /// Residual width d (`n_embd`).
    pub n_embd: usize,
    /// Blocks (`n_layer`).
    pub n_layer: usize,
    /// Heads (`n_head`).
    pub n_head: usize,
    /// Learned positions (`n_positions`).
    pub n_positions: usize,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// MLP width (`n_inner`, else 4d).
    pub n_inner: usize,
    /// LayerNorm ε (`layer_norm_epsilon`).
    pub layer_norm_epsilon: f64,
    /// MLP activation.
    pub activation: Gpt2Activation,
}

impl ModelSpec {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).ctx("reading", path)?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: not valid JSON: {e}", path.display())))?;
        Self::from_json(&value).map_err(|e| Error::Model(format!("{}: {e}", path.display())))
    }

    /// Parses a config.json value.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::Model("config.json must be a JSON object".into()))?;
        let model_type = req_str(obj, "model_type")?;
        match model_type {
            "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "gemma2" | "gemma3_text" => {
                Ok(ModelSpec::Llama(parse_llama(obj, model_type)?))
            }
            "gemma3" => Err(Error::Model(
                "key `model_type`: `gemma3` is Gemma 3's multimodal checkpoint (a vision tower \
                 beside the language model, its settings under `text_config`); attribute a \
                 text-only Gemma 3 checkpoint (model_type `gemma3_text`, e.g. \
                 google/gemma-3-1b-pt or -1b-it) instead"
                    .into(),
            )),
            "gpt2" => Ok(ModelSpec::Gpt2(parse_gpt2(obj)?)),
            other => Err(Error::Model(format!(
                "key `model_type`: unsupported model type `{other}`; supported: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            ))),
        }
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelSpec::Llama(s) => s.num_layers,
            ModelSpec::Gpt2(s) => s.n_layer,
        }
    }

    /// c of the logits' soft-capping c·tanh(z/c), when the model has one.
    pub fn final_softcap(&self) -> Option<f64> {
        match self {
            ModelSpec::Llama(s) => s.final_softcap,
            ModelSpec::Gpt2(_) => None,
        }
    }

    /// Vocabulary size V.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelSpec::Llama(s) => s.vocab_size,
            ModelSpec::Gpt2(s) => s.vocab_size,
        }
    }

    /// The same spec with only the first `n` decoder layers (n ≥ 1, n ≤ num_layers).
    pub fn truncated(&self, n: usize) -> Result<Self> {
        if n == 0 || n > self.num_layers() {
            return Err(Error::Model(format!(
                "cannot truncate to {n} layers: the model has {} (allowed 1..={})",
                self.num_layers(),
                self.num_layers()
            )));
        }
        let mut s = self.clone();
        match &mut s {
            ModelSpec::Llama(l) => l.num_layers = n,
            ModelSpec::Gpt2(g) => g.n_layer = n,
        }
        Ok(s)
    }
}

fn parse_llama(obj: &Map<String, Value>, model_type: &str) -> Result<LlamaSpec> {
    let hidden_size = req_usize(obj, "hidden_size")?;
    let num_heads = req_usize(obj, "num_attention_heads")?;
    let num_kv_heads = opt_usize(obj, "num_key_value_heads")?.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(Error::Model(format!(
            "key `num_key_value_heads`: {num_kv_heads} must be ≥ 1 and divide \
             num_attention_heads = {num_heads}"
        )));
    }
    let head_dim = match opt_usize(obj, "head_dim")? {
        Some(d) => d,
        None => {
            if hidden_size % num_heads != 0 {
                return Err(Error::Model(format!(
                    "key `hidden_size`: {hidden_size} is not divisible by num_attention_heads \
                     = {num_heads} and `head_dim` is not given"
                )));
            }
            hidden_size / num_heads
        }
    };
    if head_dim % 2 != 0 {
        return Err(Error::Model(format!(
            "key `head_dim`: {head_dim} must be even for RoPE"
        )));
    }
    let attention_bias = opt_bool(obj, "attention_bias")?.unwrap_or(false);
    let is_qwen2 = model_type == "qwen2";
    let gemma = matches!(model_type, "gemma2" | "gemma3_text");
    let gemma3 = model_type == "gemma3_text";
    let num_layers = req_usize(obj, "num_hidden_layers")?;
    // Gemma writes `hidden_activation` (older files `hidden_act`); the others `hidden_act`.
    let act_key = if obj.contains_key("hidden_activation") {
        "hidden_activation"
    } else {
        "hidden_act"
    };
    let mlp_activation = match obj.get(act_key).and_then(Value::as_str) {
        None if gemma => MlpActivation::GeluTanh,
        None | Some("silu") | Some("swish") => MlpActivation::Silu,
        Some("gelu_pytorch_tanh") | Some("gelu_new") => MlpActivation::GeluTanh,
        Some(other) => {
            return Err(Error::Model(format!(
                "key `{act_key}`: unsupported activation `{other}`; supported: silu, \
                 gelu_pytorch_tanh"
            )))
        }
    };
    let sliding_window = match model_type {
        "mistral" | "phi3" | "gemma2" => opt_usize(obj, "sliding_window")?,
        // transformers' Gemma3TextConfig: 4096 unless given.
        "gemma3_text" => Some(opt_usize(obj, "sliding_window")?.unwrap_or(4096)),
        "qwen2" | "qwen3" if opt_bool(obj, "use_sliding_window")?.unwrap_or(false) => {
            opt_usize(obj, "sliding_window")?
        }
        _ => None,
    };
    if let Some(f) = opt_f64(obj, "partial_rotary_factor")? {
        if f != 1.0 {
            return Err(Error::Model(format!(
                "key `partial_rotary_factor`: {f} (RoPE on part of each head) is not supported;                  supported: 1.0"
            )));
        }
    }
    let rope = RopeParameters::parse(obj)?;
    Ok(LlamaSpec {
        model_type: model_type.to_string(),
        hidden_size,
        intermediate_size: req_usize(obj, "intermediate_size")?,
        vocab_size: req_usize(obj, "vocab_size")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        // Gemma 3's global layers default to 1e6 (Gemma3TextConfig), the others to 1e4.
        rope_theta: match opt_f64(obj, "rope_theta")? {
            Some(t) => t,
            None => rope
                .global_theta()?
                .unwrap_or(if gemma3 { 1e6 } else { 1e4 }),
        },
        rope_scaling: match obj.get("rope_scaling") {
            None | Some(Value::Null) => match rope.global {
                Some(g) if g.contains_key("rope_type") || g.contains_key("type") => {
                    scaling_from(g, "rope_parameters")?
                }
                _ => RopeScaling::None,
            },
            Some(_) => parse_rope_scaling(obj)?,
        },
        rms_norm_eps: opt_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6),
        // Gemma ties by default (transformers' Gemma2Config), the others do not.
        tie_word_embeddings: opt_bool(obj, "tie_word_embeddings")?.unwrap_or(gemma),
        qkv_bias: attention_bias || is_qwen2,
        o_bias: attention_bias,
        mlp_bias: opt_bool(obj, "mlp_bias")?.unwrap_or(false),
        max_position_embeddings: opt_usize(obj, "max_position_embeddings")?.unwrap_or(2048),
        sliding_window,
        sliding_layers: SlidingLayers::parse(obj, model_type, num_layers)?,
        rope_local_theta: if gemma3 {
            Some(match opt_f64(obj, "rope_local_base_freq")? {
                Some(t) => t,
                None => rope.local_theta()?.unwrap_or(1e4),
            })
        } else {
            None
        },
        qk_norm: model_type == "qwen3" || gemma3,
        fused_projections: model_type == "phi3",
        gemma,
        mlp_activation,
        // Gemma3TextConfig's query_pre_attn_scalar defaults to 256, not head_dim.
        attn_scale: 1.0
            / (opt_f64(obj, "query_pre_attn_scalar")?.unwrap_or(if gemma3 {
                256.0
            } else {
                head_dim as f64
            }))
            .sqrt(),
        attn_softcap: if gemma {
            opt_f64(obj, "attn_logit_softcapping")?
        } else {
            None
        },
        final_softcap: if gemma {
            opt_f64(obj, "final_logit_softcapping")?
        } else {
            None
        },
    })
}

fn parse_gpt2(obj: &Map<String, Value>) -> Result<Gpt2Spec> {
    let n_embd = req_usize(obj, "n_embd")?;
    let n_head = req_usize(obj, "n_head")?;
    if n_head == 0 || n_embd % n_head != 0 {
        return Err(Error::Model(format!(
            "key `n_head`: {n_head} must be ≥ 1 and divide n_embd = {n_embd}"
        )));
    }
    let activation = match obj.get("activation_function").and_then(Value::as_str) {
        None | Some("gelu_new") | Some("gelu_pytorch_tanh") => Gpt2Activation::GeluTanh,
        Some("gelu") => Gpt2Activation::GeluErf,
        Some(other) => {
            return Err(Error::Model(format!(
                "key `activation_function`: unsupported `{other}`; supported: gelu_new, \
                 gelu_pytorch_tanh, gelu"
            )))
        }
    };
    Ok(Gpt2Spec {
        n_embd,
        n_layer: req_usize(obj, "n_layer")?,
        n_head,
        n_positions: req_usize(obj, "n_positions")?,
        vocab_size: req_usize(obj, "vocab_size")?,
        n_inner: opt_usize(obj, "n_inner")?.unwrap_or(4 * n_embd),
        layer_norm_epsilon: opt_f64(obj, "layer_norm_epsilon")?.unwrap_or(1e-5),
        activation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smollm() -> Value {
        json!({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
               "vocab_size": 49152, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
               "tie_word_embeddings": true, "max_position_embeddings": 8192})
    }

    #[test]
    fn parses_smollm2_shape() {
        let ModelSpec::Llama(s) = ModelSpec::from_json(&smollm()).unwrap() else {
            panic!("not llama")
        };
        assert_eq!((s.num_heads, s.num_kv_heads, s.head_dim), (9, 3, 64));
        assert!(s.tie_word_embeddings && !s.qkv_bias && !s.mlp_bias);
        assert_eq!(s.rope_theta, 100000.0);
        assert_eq!(s.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn gemma3_text_takes_transformers_defaults() {
        // google/gemma-3-1b-pt's config.json writes these out; the defaults are
        // Gemma3TextConfig's.
        let v = json!({"model_type": "gemma3_text", "hidden_size": 1152,
                       "intermediate_size": 6912, "vocab_size": 262144,
                       "num_hidden_layers": 26, "num_attention_heads": 4,
                       "num_key_value_heads": 1, "head_dim": 256});
        let ModelSpec::Llama(s) = ModelSpec::from_json(&v).unwrap() else {
            panic!()
        };
        assert!(s.gemma && s.qk_norm && s.tie_word_embeddings);
        assert_eq!((s.rope_theta, s.rope_local_theta), (1e6, Some(1e4)));
        assert_eq!(s.sliding_window, Some(4096));
        assert_eq!(s.sliding_layers, SlidingLayers::AllButEvery(6));
        assert_eq!(s.attn_scale, 1.0 / 16.0);
        assert_eq!((s.attn_softcap, s.final_softcap), (None, None));
        assert_eq!(s.mlp_activation, MlpActivation::GeluTanh);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_explicit_head_dim_wins() {
        let mut v = smollm();
        v["model_type"] = json!("qwen2");
        v["head_dim"] = json!(32);
        let ModelSpec::Llama(s) = ModelSpec::from_json(&v).unwrap() else {
            panic!()
        };
        assert!(s.qkv_bias && !s.o_bias);
        assert_eq!(s.head_dim, 32);
    }

    #[test]
    fn gemma2_reads_its_particulars_as_transformers_does() {
        // google/gemma-2-2b's values: scores scaled by query_pre_attn_scalar^-1/2 (not
        // head_dim's), both soft caps, a tied head unless the file says otherwise, GeGLU.
        let mut v = smollm();
        v["model_type"] = json!("gemma2");
        v["head_dim"] = json!(256);
        v["query_pre_attn_scalar"] = json!(224);
        v["attn_logit_softcapping"] = json!(50.0);
        v["final_logit_softcapping"] = json!(30.0);
        v["hidden_activation"] = json!("gelu_pytorch_tanh");
        v["sliding_window"] = json!(4096);
        v.as_object_mut().unwrap().remove("tie_word_embeddings");
        let ModelSpec::Llama(s) = ModelSpec::from_json(&v).unwrap() else {
            panic!()
        };
        assert!(s.gemma && s.tie_word_embeddings);
        assert_eq!(s.attn_scale, 1.0 / 224f64.sqrt());
        assert_eq!((s.attn_softcap, s.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(s.mlp_activation, MlpActivation::GeluTanh);
        assert_eq!(s.sliding_window, Some(4096));
        // Elsewhere the scale is head_dim's and an unknown activation names its key.
        let mut w = smollm();
        w["hidden_act"] = json!("relu2");
        let e = ModelSpec::from_json(&w).unwrap_err().to_string();
        assert!(e.contains("hidden_act") && e.contains("relu2"), "{e}");
    }

    /// transformers ≥ 5 writes θ and the scaling under `rope_parameters`: the same spec as
    /// the older top-level keys, for one object and for one per layer type (Gemma 3).
    #[test]
    fn rope_parameters_of_transformers_5_equal_the_older_keys() {
        let spec = |v: &Value| -> LlamaSpec {
            let ModelSpec::Llama(s) = ModelSpec::from_json(v).unwrap() else {
                panic!("not llama")
            };
            s
        };
        let mut old = smollm();
        old["rope_theta"] = json!(500000.0);
        old["rope_scaling"] = json!({"rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let mut new = smollm();
        new.as_object_mut().unwrap().remove("rope_theta");
        new["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0,
            "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let (a, b) = (spec(&old), spec(&new));
        assert_eq!(
            (a.rope_theta, &a.rope_scaling),
            (b.rope_theta, &b.rope_scaling)
        );
        assert_eq!(b.rope_theta, 500000.0);
        assert!(matches!(b.rope_scaling, RopeScaling::Llama3 { .. }));
        // Default RoPE: θ only.
        new["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 250000.0});
        let c = spec(&new);
        assert_eq!(
            (c.rope_theta, &c.rope_scaling),
            (250000.0, &RopeScaling::None)
        );
        // A wrong type names the key.
        new["rope_parameters"] = json!({"rope_type": "default", "rope_theta": "big"});
        let e = ModelSpec::from_json(&new).unwrap_err().to_string();
        assert!(e.contains("rope_parameters.rope_theta"), "{e}");
        // Gemma 3 in transformers 5: one object per layer type.
        let g = json!({"model_type": "gemma3_text", "hidden_size": 1152,
                       "intermediate_size": 6912, "vocab_size": 262144,
                       "num_hidden_layers": 26, "num_attention_heads": 4,
                       "num_key_value_heads": 1, "head_dim": 256,
                       "rope_parameters": {
                           "full_attention": {"rope_type": "linear", "factor": 8.0,
                                              "rope_theta": 1000000.0},
                           "sliding_attention": {"rope_type": "default",
                                                 "rope_theta": 10000.0}}});
        let s = spec(&g);
        assert_eq!((s.rope_theta, s.rope_local_theta), (1e6, Some(1e4)));
        assert_eq!(s.rope_scaling, RopeScaling::Linear { factor: 8.0 });
    }

    #[test]
    fn rope_scaling_types() {
        let mut v = smollm();
        v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        let ModelSpec::Llama(s) = ModelSpec::from_json(&v).unwrap() else {
            panic!()
        };
        assert_eq!(s.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        assert!(ModelSpec::from_json(&v).is_ok());
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 8.0});
        let e = ModelSpec::from_json(&v).unwrap_err().to_string();
        assert!(
            e.contains("rope_scaling.rope_type") && e.contains("yarn"),
            "{e}"
        );
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        let e = ModelSpec::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.low_freq_factor"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let mut v = smollm();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelSpec::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("`hidden_size`"), "{e}");
        let mut v = smollm();
        v["num_key_value_heads"] = json!(4);
        let e = ModelSpec::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut v = smollm();
        v["rms_norm_eps"] = json!("small");
        let e = ModelSpec::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("rms_norm_eps"), "{e}");
    }

    #[test]
    fn unsupported_model_type_lists_supported() {
        let e = ModelSpec::from_json(&json!({"model_type": "bert"}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bert") && e.contains("llama") && e.contains("gpt2"),
            "{e}"
        );
    }

    #[test]
    fn gpt2_defaults_and_truncation() {
        let v = json!({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
                       "n_positions": 1024, "vocab_size": 50257, "n_inner": null});
        let spec = ModelSpec::from_json(&v).unwrap();
        let ModelSpec::Gpt2(g) = &spec else { panic!() };
        assert_eq!(g.n_inner, 3072);
        assert_eq!(g.activation, Gpt2Activation::GeluTanh);
        assert_eq!(spec.truncated(2).unwrap().num_layers(), 2);
        assert!(spec.truncated(13).is_err());
        assert!(spec.truncated(0).is_err());
    }
}
