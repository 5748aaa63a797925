//! Owns writing a converted GGUF model as a Hugging Face checkpoint directory.
//! Layer: model — may import the ground, linalg, backend and, in gguf/, hf.rs.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::hf::{F32Tensor, GgufLlama};
use crate::error::{Error, IoContext, Result};
use crate::util::fsx::{temp_sibling, write_json_atomic};

/// What [`GgufLlama::write_hf_dir`] wrote.
#[derive(Debug, Clone)]
pub struct WrittenCheckpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// `config.json`.
    pub config_json: PathBuf,
    /// `model.safetensors` (f32).
    pub model_safetensors: PathBuf,
    /// `tokenizer.json`, when a tokenizer was given.
    pub tokenizer_json: Option<PathBuf>,
    /// Number of tensors written.
    pub n_tensors: usize,
    /// Number of parameters written (tied head counted once).
    pub n_params: usize,
}

/// Safetensors view of an f32 tensor; the little-endian bytes are made one tensor at a time
/// while the file is written, so the whole model is never held twice.
struct View<'a>(&'a F32Tensor);

impl safetensors::View for View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

impl GgufLlama {
    /// Writes `config.json`, `model.safetensors` (f32, HF names, tied head not duplicated)
    /// and `conversion.json` (where the weights came from) into `dir`, creating it. With
    /// `tokenizer`, first checks it with [`check_tokenizer`] and copies it in as
    /// `tokenizer.json`. Existing files of those names are replaced atomically.
    pub fn write_hf_dir(&self, dir: &Path, tokenizer: Option<&Path>) -> Result<WrittenCheckpoint> {
        std::fs::create_dir_all(dir).ctx("creating directory", dir)?;
        let tokenizer_json = match tokenizer {
            Some(src) => {
                check_tokenizer(src, self.vocab.as_deref(), self.config.vocab_size)?;
                let dst = dir.join("tokenizer.json");
                let tmp = temp_sibling(&dst);
                std::fs::copy(src, &tmp).ctx("copying tokenizer to", &tmp)?;
                make_writable(&tmp)?;
                std::fs::rename(&tmp, &dst).ctx("renaming into place", &dst)?;
                Some(dst)
            }
            None => None,
        };

        let model = dir.join("model.safetensors");
        let tmp = temp_sibling(&model);
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (
                "source".to_string(),
                format!("source-tda convert-gguf {}", file_name(&self.source)),
            ),
        ]);
        let views = self.tensors.iter().map(|(k, t)| (k.as_str(), View(t)));
        safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| {
            Error::io(
                "writing safetensors",
                &tmp,
                std::io::Error::other(e.to_string()),
            )
        })?;
        make_writable(&tmp)?;
        std::fs::rename(&tmp, &model).ctx("renaming into place", &model)?;

        let config_json = dir.join("config.json");
        write_json_atomic(&config_json, &self.config.to_hf_json())?;
        let origin: serde_json::Map<String, serde_json::Value> = self
            .origin
            .iter()
            .map(|(hf, (g, t))| (hf.clone(), json!({"gguf": g, "type": t})))
            .collect();
        write_json_atomic(
            &dir.join("conversion.json"),
            &json!({
                "tool": format!("source-tda {}", crate::VERSION),
                "gguf": self.source.display().to_string(),
                "num_hidden_layers_kept": self.config.num_hidden_layers,
                "dequantised_to": "f32",
                "qk_rows": "un-permuted from llama.cpp's rotary layout to HF rotate-half order",
                "tensors": origin,
            }),
        )?;
        Ok(WrittenCheckpoint {
            dir: dir.to_path_buf(),
            config_json,
            model_safetensors: model,
            tokenizer_json,
            n_tensors: self.tensors.len(),
            n_params: self.tensors.values().map(|t| t.data.len()).sum(),
        })
    }
}

/// Gives a written file ordinary permissions (a copy keeps a read-only source's mode, and
/// the safetensors crate creates files owner-only).
fn make_writable(path: &Path) -> Result<()> {
    let mut perms = std::fs::metadata(path)
        .ctx("reading metadata of", path)?
        .permissions();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        perms.set_mode(0o644);
    }
    #[cfg(not(unix))]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).ctx("setting permissions of", path)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Checks that the `tokenizer.json` at `path` loads with the `tokenizers` crate, that its
/// vocabulary fits a model with `vocab_size` embeddings and, given the GGUF's own token list
/// (`tokenizer.ggml.tokens`), that every id maps to the same token string.
pub fn check_tokenizer(
    path: &Path,
    gguf_vocab: Option<&[String]>,
    vocab_size: usize,
) -> Result<()> {
    let err = |message: String| Error::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let tok =
        tokenizers::Tokenizer::from_file(path).map_err(|e| err(format!("cannot load: {e}")))?;
    let n = tok.get_vocab_size(true);
    if n > vocab_size {
        return Err(err(format!(
            "has {n} tokens but the model has only {vocab_size} embeddings; it is not this \
             model's tokenizer"
        )));
    }
    if let Some(vocab) = gguf_vocab {
        for (id, want) in vocab.iter().enumerate() {
            let got = tok.id_to_token(id as u32);
            if got.as_deref() != Some(want.as_str()) {
                return Err(err(format!(
                    "token id {id} is {got:?} here but {want:?} in the GGUF's \
                     tokenizer.ggml.tokens; it is not this model's tokenizer (for \
                     SmolLM2-135M use tests/data/kronfluence-smollm2-2l/tokenizer.json)"
                )));
            }
        }
    }
    Ok(())
}
