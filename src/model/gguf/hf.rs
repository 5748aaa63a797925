//! The converted model in Hugging Face terms: the `config.json` fields a GGUF file
//! determines, f32 tensors, and the model they make up. Layer: model (gguf) — imports no
//! other file of the crate; the reader (gguf.rs), names.rs and write.rs import it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::json;

/// The fields of an HF `LlamaForCausalLM` `config.json` that a GGUF file determines.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaHfConfig {
    /// Width of the residual stream (`llama.embedding_length`).
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP (`llama.feed_forward_length`).
    pub intermediate_size: usize,
    /// Decoder layers kept (`llama.block_count`, or fewer when truncated).
    pub num_hidden_layers: usize,
    /// Query heads (`llama.attention.head_count`).
    pub num_attention_heads: usize,
    /// Key/value heads (`llama.attention.head_count_kv`; GQA when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Per-head width (`llama.rope.dimension_count`, else hidden / heads).
    pub head_dim: usize,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`).
    pub rms_norm_eps: f64,
    /// RoPE base (`llama.rope.freq_base`, default 10000).
    pub rope_theta: f64,
    /// Context length (`llama.context_length`).
    pub max_position_embeddings: usize,
    /// Vocabulary size (`llama.vocab_size`, else the number of tokens in the metadata).
    pub vocab_size: usize,
    /// True when the GGUF has no `output.weight`: the head reuses the token embeddings.
    pub tie_word_embeddings: bool,
    /// `tokenizer.ggml.bos_token_id`, if present.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`, if present.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`, if present.
    pub pad_token_id: Option<u32>,
}

impl LlamaHfConfig {
    /// The complete `config.json` object (`LlamaForCausalLM`, f32, no biases, no RoPE scaling).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("plain data serialises");
        let extra = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "rope_scaling": null,
            "pretraining_tp": 1,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        let obj = v.as_object_mut().expect("a struct serialises to an object");
        for (k, x) in extra.as_object().expect("literal object") {
            obj.insert(k.clone(), x.clone());
        }
        v
    }
}

/// A dense f32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    /// Dimensions, outermost first (HF/torch order, e.g. `[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    /// The values, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

/// A Llama-family model read from GGUF: HF config and f32 tensors under HF names.
#[derive(Debug, Clone)]
pub struct GgufLlama {
    /// The GGUF file it came from.
    pub source: PathBuf,
    /// The HF config (with `num_hidden_layers` already reduced by
    /// [`ReadOptions::layers`](super::ReadOptions::layers)).
    pub config: LlamaHfConfig,
    /// HF tensor name → tensor, q/k rows in HF order. `lm_head.weight` is present only when
    /// the GGUF has its own `output.weight` (else `config.tie_word_embeddings` is true).
    pub tensors: BTreeMap<String, F32Tensor>,
    /// HF tensor name → (GGUF tensor name, GGUF type as candle names it, e.g. `Q4_1`).
    pub origin: BTreeMap<String, (String, String)>,
    /// The vocabulary from `tokenizer.ggml.tokens`, when the file has one (used to check
    /// that a tokenizer.json fits the model).
    pub vocab: Option<Vec<String>>,
}
