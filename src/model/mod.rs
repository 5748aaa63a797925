//! Models: loading weights into the forms the tool uses.
//!
//! * [`gguf`]: Llama-family weights from a local GGUF file (llama.cpp's format), converted
//!   to a Hugging Face checkpoint directory.

pub mod gguf;
