//! Owns checkpoints on disk: layout, `save_checkpoint`, `latest_good_checkpoint`, `read_state`.
//! Layer: train — may import the ground, linalg, backend, model, data and hub; no sibling.
//!
//! Checkpoints: Hugging Face folders that this tool and `transformers` both load, plus the
//! optimizer state, written so that a crash never leaves one that looks complete.
//!
//! ```text
//! step-000040/
//!   config.json  tokenizer.json  (and tokenizer_config.json, … when the base model has them)
//!   model.safetensors        the weights, named and shaped as in the base checkpoint
//!                            (a LoRA fine-tune instead writes PEFT's adapter_config.json,
//!                            naming the base model's folder, and adapter_model.safetensors)
//!   optimizer.safetensors    what the attribution reads: exp_avg_sq.NAME and exp_avg.NAME
//!                            (Adam's v̂ and m̂, bias-corrected) or momentum.NAME; absent
//!                            for SGD
//!   resume.safetensors       the rest of the optimizer state (exp_avg, raw exp_avg_sq)
//!   state.json               the global step, the optimizer's step count and the step log
//!   checksums.json           the SHA-256 of every other file, written last (a LoRA
//!                            checkpoint's too: its adapter files are checked like weights)
//! ```
//!
//! A checkpoint is written into `.tmp-step-N-PID/` and renamed to `step-N/` when every file
//! is on disk: the rename is the completion marker. Folders named otherwise are ignored by
//! [`latest_good_checkpoint`] and removed by [`remove_incomplete`]. A complete folder whose files
//! no longer match `checksums.json` (torn by a crash of the file system, or damaged) fails
//! [`verify_checkpoint`]; [`latest_good_checkpoint`] discards it, with every later one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::model::Model;
use crate::util::fsx::remove_dir_if_exists;
use crate::util::hash::sha256_file;

/// The file of a checkpoint that holds the SHA-256 of each of its other files.
pub const CHECKSUMS: &str = "checksums.json";

/// A checkpoint's clip direction file: ĝ_k = g_k / ‖g_k‖ of the clipped step k that produced
/// it (g_k its batch gradient before clipping, taken at θ_{k−1}), one tensor per parameter
/// named like the parameter, f32 — the model's size again. Written only where step k is a
/// one-step group (checkpoints after steps k − 1 and k), the steps Source scores exactly.
pub const CLIP_DIRECTION: &str = "clip_direction.safetensors";

/// Files copied from the base model folder into every checkpoint, when present.
const COPIED: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// One optimizer step's record in the training log. In `state.json` the floats are stored
/// as their IEEE-754 bit patterns, so a resumed run's log is bitwise the uninterrupted one's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// Global step (1-based: the state after this many steps).
    pub step: u64,
    /// η of the step.
    #[serde(with = "f64_bits")]
    pub lr: f64,
    /// The objective J the step descended, summed over its micro-batches.
    #[serde(with = "f64_bits")]
    pub loss: f64,
    /// Global gradient norm before clipping.
    #[serde(with = "f64_bits")]
    pub grad_norm: f64,
    /// Documents in the step.
    pub n_docs: u32,
    /// Real (unpadded) tokens in the step.
    pub n_tokens: u64,
    /// Micro-batches the step was split into.
    pub micro_batches: u32,
}

/// f64 ⇄ its bit pattern as u64 (JSON numbers do not round-trip every f64 exactly).
mod f64_bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(x.to_bits())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(f64::from_bits(u64::deserialize(d)?))
    }
}

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Global optimizer steps taken (counting earlier fine-tuning stages).
    pub step: u64,
    /// This stage's steps, in order.
    pub log: Vec<StepLog>,
    /// The optimizer's own step count t (Adam's bias correction), when it differs from
    /// `step` (a stage that started with a fresh optimizer after earlier stages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_steps: Option<u64>,
}

/// The folder name of the checkpoint after `step` steps.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// Writes `tensors` as a safetensors file (f32, little-endian) with `metadata`, synced.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut bufs = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let data: Vec<u8> = t
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        bufs.push((name.clone(), t.dims().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
        .iter()
        .map(|(n, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Model(format!("{}: tensor `{n}`: {e}", path.display())))
        })
        .collect::<Result<_>>()?;
    let mut bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
    sort_metadata(&mut bytes);
    let mut f = std::fs::File::create(path).ctx("creating", path)?;
    f.write_all(&bytes).ctx("writing", path)?;
    f.sync_all().ctx("syncing", path)?;
    Ok(())
}

/// Rewrites the header of serialised safetensors `bytes` with its `__metadata__` keys in
/// sorted order: the crate writes them in `HashMap` order, which differs between runs, and a
/// checkpoint must be bitwise reproducible. The header keeps its length (same JSON, reordered;
/// padded with spaces), so the data offsets stay valid.
fn sort_metadata(bytes: &mut [u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = &bytes[8..8 + n];
    let Ok(serde_json::Value::Object(mut top)) = serde_json::from_slice(header) else {
        return;
    };
    let Some(serde_json::Value::Object(meta)) = top.remove("__metadata__") else {
        return;
    };
    let mut sorted: Vec<(String, serde_json::Value)> = meta.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = serde_json::Map::new();
    out.insert(
        "__metadata__".into(),
        serde_json::Value::Object(sorted.into_iter().collect()),
    );
    let mut tensors: Vec<(String, serde_json::Value)> = top.into_iter().collect();
    tensors.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64());
    out.extend(tensors);
    let text = serde_json::to_vec(&out).expect("JSON value serialises");
    if text.len() <= n {
        bytes[8..8 + text.len()].copy_from_slice(&text);
        bytes[8 + text.len()..8 + n].fill(b' ');
    }
}

/// Reads every tensor of a safetensors file onto `device`.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| {
        Error::Model(format!(
            "{}: not a readable safetensors file: {e}",
            path.display()
        ))
    })
}

/// The model's weights named and shaped as in its Hugging Face checkpoint (GPT-2 Conv1D
/// weights transposed back to [d_in, d_out]).
pub fn hf_weights(model: &Model) -> Result<Vec<(String, Tensor)>> {
    model
        .params()
        .iter()
        .map(|p| {
            let t = p.var.as_tensor();
            let t = if p.transposed_from_checkpoint {
                t.t()?.contiguous()?
            } else {
                t.clone()
            };
            Ok((p.name.clone(), t))
        })
        .collect()
}

/// Writes a LoRA model's adapter into `dir` as PEFT saves it: `adapter_config.json`, whose
/// `base_model_name_or_path` is the absolute folder of the base weights, and
/// `adapter_model.safetensors` with the lora_A / lora_B matrices.
pub fn write_adapter(dir: &Path, model: &Model, cfg: &crate::model::LoraConfig) -> Result<()> {
    use crate::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
    let base = model.base_dir().ok_or_else(|| {
        Error::Model("a LoRA model built in memory has no base folder to name".into())
    })?;
    let base = std::fs::canonicalize(base).ctx("resolving", base)?;
    let mut json = cfg.to_json(&base.display().to_string());
    // GPT-2's projections are Conv1D layers (weights stored [d_in, d_out]): PEFT records that
    // with fan_in_fan_out (A and B keep their [r, d_in], [d_out, r] shapes either way).
    json["fan_in_fan_out"] = matches!(model.spec(), crate::model::ModelSpec::Gpt2(_)).into();
    let text = serde_json::to_vec_pretty(&json).expect("plain data serialises");
    crate::util::fsx::write_atomic(&dir.join(ADAPTER_CONFIG), &text)?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(ADAPTER_WEIGHTS), &hf_weights(model)?, meta)
}

/// Everything one checkpoint holds besides the base model's files.
pub struct CheckpointContent<'a> {
    /// The model after `state.step` steps.
    pub model: &'a Model,
    /// The attribution state (`exp_avg_sq.*` and `exp_avg.*`, or `momentum.*`); empty for SGD.
    pub optimizer: Vec<(String, Tensor)>,
    /// The rest of the optimizer state for resuming.
    pub resume: Vec<(String, Tensor)>,
    /// Metadata recorded in optimizer.safetensors (optimizer kind, hyper-parameters).
    pub optimizer_metadata: HashMap<String, String>,
    /// ĝ = g / ‖g‖ of the step that produced this model, per parameter (its own layout),
    /// when that step was clipped and is scored alone: written to [`CLIP_DIRECTION`].
    pub clip_direction: Vec<(String, Tensor)>,
    /// Step and log.
    pub state: &'a CheckpointState,
}

/// Writes checkpoint `c` into `root/step-N/` atomically (temp folder + rename), copying
/// config and tokenizer files from `base_dir`. `before_commit` runs after every file is
/// written and before the rename (a test hook). Returns the final folder.
pub fn save_checkpoint(
    root: &Path,
    base_dir: &Path,
    c: &CheckpointContent<'_>,
    before_commit: &dyn Fn() -> Result<()>,
) -> Result<PathBuf> {
    let name = checkpoint_name(c.state.step);
    let fin = root.join(&name);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    remove_dir_if_exists(&tmp)?;
    std::fs::create_dir_all(&tmp).ctx("creating", &tmp)?;
    for f in COPIED {
        let src = base_dir.join(f);
        if src.exists() {
            std::fs::copy(&src, tmp.join(f)).ctx("copying", &src)?;
        }
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    match c.model.lora() {
        None => write_safetensors(&tmp.join("model.safetensors"), &hf_weights(c.model)?, meta)?,
        Some(cfg) => write_adapter(&tmp, c.model, cfg)?,
    }
    let mut ometa = c.optimizer_metadata.clone();
    ometa.insert("step".into(), c.state.step.to_string());
    if !c.optimizer.is_empty() {
        write_safetensors(
            &tmp.join("optimizer.safetensors"),
            &c.optimizer,
            ometa.clone(),
        )?;
    }
    if !c.resume.is_empty() {
        write_safetensors(&tmp.join("resume.safetensors"), &c.resume, ometa)?;
    }
    if !c.clip_direction.is_empty() {
        let meta = HashMap::from([
            ("step".to_string(), c.state.step.to_string()),
            (
                "clip_direction".to_string(),
                "unit batch gradient g/|g| of this step before clipping, per parameter".into(),
            ),
        ]);
        write_safetensors(&tmp.join(CLIP_DIRECTION), &c.clip_direction, meta)?;
    }
    let state = serde_json::to_vec(c.state).expect("plain data serialises");
    let sp = tmp.join("state.json");
    let mut f = std::fs::File::create(&sp).ctx("creating", &sp)?;
    f.write_all(&state).ctx("writing", &sp)?;
    f.sync_all().ctx("syncing", &sp)?;
    write_checksums(&tmp)?;
    before_commit()?;
    remove_dir_if_exists(&fin)?;
    std::fs::rename(&tmp, &fin).ctx("renaming into place", &fin)?;
    if let Ok(d) = std::fs::File::open(root) {
        let _ = d.sync_all();
    }
    Ok(fin)
}

/// `checksums.json`: file name → hex SHA-256, for every file of a checkpoint folder.
#[derive(Debug, Serialize, Deserialize)]
struct Checksums {
    sha256: std::collections::BTreeMap<String, String>,
}

/// Writes `dir/checksums.json` with the SHA-256 of every other file in `dir`, synced.
fn write_checksums(dir: &Path) -> Result<()> {
    let mut sha256 = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).ctx("listing", dir)? {
        let entry = entry.ctx("listing", dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != CHECKSUMS && entry.path().is_file() {
            sha256.insert(name, sha256_file(&entry.path())?);
        }
    }
    let p = dir.join(CHECKSUMS);
    let bytes = serde_json::to_vec_pretty(&Checksums { sha256 }).expect("plain data serialises");
    let mut f = std::fs::File::create(&p).ctx("creating", &p)?;
    f.write_all(&bytes).ctx("writing", &p)?;
    f.sync_all().ctx("syncing", &p)?;
    Ok(())
}

/// Checks a checkpoint folder's files against its `checksums.json`: `Err` says which file is
/// missing or changed. A folder without `checksums.json` (written before checkpoints carried
/// one) is accepted unchecked.
pub fn verify_checkpoint(dir: &Path) -> Result<(), String> {
    let p = dir.join(CHECKSUMS);
    let text = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{CHECKSUMS} cannot be read ({e})")),
    };
    let sums: Checksums =
        serde_json::from_slice(&text).map_err(|e| format!("{CHECKSUMS} is damaged ({e})"))?;
    for (name, want) in &sums.sha256 {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(format!("{name} is missing"));
        }
        let got = sha256_file(&path).map_err(|e| e.to_string())?;
        if got != *want {
            return Err(format!(
                "{name} does not match its checksum (SHA-256 {got}, recorded {want})"
            ));
        }
    }
    Ok(())
}

/// The complete checkpoints under `root` (folders `step-N` with a `state.json`), by step.
fn complete_checkpoints(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut complete: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            e.path()
                .join("state.json")
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    complete.sort();
    complete
}

/// The newest checkpoint under `root` such that it and every earlier one pass
/// [`verify_checkpoint`]. The first one that fails is discarded with a warning, together with
/// every later one (training from the good one before rewrites them, bitwise), so that no
/// damaged checkpoint is ever resumed from or published. `None` when no good one is left:
/// the stage starts from its beginning.
pub fn latest_good_checkpoint(root: &Path) -> Result<Option<(u64, PathBuf)>> {
    let complete = complete_checkpoints(root);
    let mut good: Option<(u64, PathBuf)> = None;
    for (i, (step, dir)) in complete.iter().enumerate() {
        let Err(why) = verify_checkpoint(dir) else {
            good = Some((*step, dir.clone()));
            continue;
        };
        let later = complete.len() - i - 1;
        tracing::warn!(
            "checkpoint {} is damaged ({why}); discarding it{} and resuming from {}",
            dir.display(),
            match later {
                0 => String::new(),
                n => format!(" and the {n} later one(s)"),
            },
            match &good {
                Some((s, _)) => format!("the checkpoint of step {s}"),
                None => "the start of the stage".to_string(),
            }
        );
        for (_, d) in &complete[i..] {
            remove_dir_if_exists(d)?;
        }
        break;
    }
    Ok(good)
}

/// Removes half-written checkpoint folders (`.tmp-*`) under `root`.
pub fn remove_incomplete(root: &Path) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(0);
    };
    let mut n = 0;
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            remove_dir_if_exists(&e.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Reads a checkpoint's `state.json`.
pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).ctx("reading", &p)?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Pipeline(format!(
            "{}: unreadable ({e}); delete the checkpoint folder to resume from the one before",
            p.display()
        ))
    })
}
