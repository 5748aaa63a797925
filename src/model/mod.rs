//! Model: transformer families on candle with tracked linear layers, capture, generation.
//! Layer: model — may import ground (error, util, config, output) and linalg, backend.
//!
//! A [`Model`] is loaded from a Hugging Face checkpoint directory (`config.json` +
//! safetensors) or any [`TensorSource`]; its weights are trainable f32 `Var`s listed by
//! [`Model::params`]. [`Model::capture`] runs one forward + backward on a right-padded
//! [`TokenBatch`] and returns, for every tracked linear layer, the inputs a: [B, T, d_in(+1)]
//! and output gradients δ: [B, T, d_out] from which every attribution quantity is computed
//! (docs/design.md §2–3).
//!
//! * [`config`]: `config.json` → [`ModelSpec`] (Llama family, GPT-2).
//! * [`weights`]: safetensors directories (single file or sharded), in-memory tensor maps.
//! * [`tracking`]: which linear layers record (a, δ).
//! * [`lora`]: PEFT LoRA adapters (`adapter_config.json`, `adapter_model.safetensors`).
//! * [`batch`], [`loss`], [`capture`]: batches, losses (data, sampled, query), capture;
//!   [`head_loss`]: the output head fused with the data-label loss for a capture.
//! * [`gguf`]: Llama-family weights from a local GGUF file (llama.cpp's format), converted
//!   to a Hugging Face checkpoint directory.
//! * [`dual`] and `ggn`: forward-mode tangents J v and exact Gauss–Newton products
//!   [`Model::gauss_newton`] (G v = Jᵀ H J v).
//! * [`generate`]: greedy / seeded sampling with a KV cache and stop tokens.

pub mod batch;
pub mod capture;
pub mod config;
pub mod custom_ops;
pub mod dual;
pub mod fused;
pub mod generate;
mod ggn;
pub mod gguf;
mod gpt2;
pub mod head_loss;
mod kv_cache;
pub mod linear;
mod llama;
pub mod lm;
pub mod lora;
pub mod loss;
pub mod memory;
pub mod ops;
pub mod tracking;
pub mod weights;

pub use batch::TokenBatch;
pub use capture::{Capture, Labels, LayerCapture};
pub use config::{Gpt2Spec, LlamaSpec, MlpActivation, ModelSpec, RopeScaling};
pub use generate::{GenerateOptions, Generation, Sampling};
pub use linear::Param;
pub use lm::{LayerInfo, LoadOptions, LoraInit, Model};
pub use lora::LoraConfig;
pub use tracking::Tracking;
pub use weights::{SafetensorsDir, ShapeOnly, TensorMap, TensorSource};
