//! Pretraining the demo model on the demo's pretraining text with the project's own training
//! loop ([`source_tda::train::train`]: the optimizer, schedule, loss and model code the
//! `finetune` stage uses), and recording its trajectory so that a run can attribute to
//! pretraining documents as a segment with its real learning-rate mass.
//!
//! The loop is deterministic (fixed visit order, fixed initial weights, fixed arithmetic), so
//! the pretrained weights are the same bytes on every run on the same machine.

use std::path::Path;

use candle_core::Device;
use source_tda::config::{
    BatchingConfig, LossNormalization, OptimizerKind, ScheduleKind, TrainConfig,
};
use source_tda::data::PreparedDoc;
use source_tda::model::{LoadOptions, Model, TokenBatch};
use source_tda::train::{
    train, CheckpointRef, LrMass, Segment, TrainJob, Trajectory, TRAJECTORY_VERSION,
};

/// The pretraining recipe: AdamW with a cosine schedule over a few epochs.
pub struct Recipe {
    /// Peak learning rate η.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Documents per optimizer step.
    pub batch_size: usize,
    /// Passes over the pretraining text.
    pub epochs: u32,
    /// Longest document in tokens (the demo config's `max_length`).
    pub max_length: usize,
}

/// What pretraining produced: the files shipped in the model repo.
pub struct Pretrained {
    /// `model.safetensors`: θ after pretraining.
    pub weights: Vec<u8>,
    /// `training/optimizer.safetensors`: AdamW's bias-corrected second moments v̂ at the end
    /// (`exp_avg_sq.NAME`), which Source's Adam variant needs for the pretrain segment. The
    /// checkpoint's m̂ (`exp_avg.NAME`, read by `adam_response = "full"`) is left out: the
    /// committed assets predate it, and the pretrain segment falls back to v̂ alone.
    pub optimizer_state: Vec<u8>,
    /// `training/trajectory.json`: the pretraining segment (η_k, s = Σ η_k, steps, data).
    pub trajectory: Vec<u8>,
    /// Per-step training loss J_k (summed per document, averaged over the step's documents).
    pub losses: Vec<f64>,
}

/// A document with loss on every token after the first (the `text` shape of `prepare`).
pub fn text_doc(id: String, ids: Vec<u32>, max_length: usize) -> PreparedDoc {
    let mut ids = ids;
    let truncated = ids.len().saturating_sub(max_length) as u32;
    ids.truncate(max_length);
    let mut mask = vec![1u8; ids.len()];
    if let Some(m) = mask.first_mut() {
        *m = 0;
    }
    PreparedDoc {
        doc_id: id,
        text: String::new(),
        prompt: None,
        completion: None,
        input_ids: ids,
        loss_mask: mask,
        truncated_tokens: truncated,
        source: String::new(),
    }
}

/// Pretrains the model in `init_dir` (config.json, tokenizer.json, model.safetensors) on
/// `docs`, with checkpoints in `work_dir`.
pub fn pretrain(
    init_dir: &Path,
    work_dir: &Path,
    docs: &[PreparedDoc],
    recipe: &Recipe,
) -> Result<Pretrained, Box<dyn std::error::Error>> {
    let config = TrainConfig {
        dataset: "pretrain".into(),
        optimizer: OptimizerKind::AdamW,
        lr: recipe.lr,
        beta1: Some(0.9),
        beta2: Some(0.999),
        eps: Some(1e-8),
        weight_decay: 0.0,
        schedule: ScheduleKind::Cosine,
        warmup_steps: recipe.warmup_steps,
        batch_size: recipe.batch_size,
        epochs: recipe.epochs,
        max_grad_norm: Some(1.0),
        seed: Some(0),
        loss_normalization: LossNormalization::SumPerDocument,
        segments: Some(1),
        checkpoints_per_segment: 1,
        ..TrainConfig::default()
    };
    let batching = BatchingConfig {
        token_budget: 4096,
        max_batch_size: 64,
    };
    let out = train(&TrainJob {
        base_dir: init_dir,
        docs,
        train: &config,
        batching: &batching,
        work_dir,
        device: &Device::Cpu,
        step_offset: 0,
        optimizer_from: None,
        hook: &|_| Ok(()),
    })?;
    let (step, dir) = out
        .checkpoints
        .last()
        .ok_or("pretraining saved no checkpoint")?;
    let steps = out.rates.len() as u64;
    let trajectory = Trajectory {
        version: TRAJECTORY_VERSION,
        base_model: "random initialisation (make_demo_assets, seed 0x3E160004)".into(),
        base_commit: None,
        loss_normalization: config.loss_normalization,
        segments: vec![Segment {
            stage: "pretrain".into(),
            step_start: 0,
            step_end: steps,
            lr_mass: LrMass::Finite(out.rates.iter().sum()),
            clip_factors: Vec::new(),
            learning_rates: out.rates.clone(),
            optimizer: out.optimizer.clone(),
            dataset: "source-tda/demo-facts data/pretrain.jsonl".into(),
            n_docs: docs.len() as u64,
            // Paths relative to the model folder: the final weights and their v̂.
            checkpoints: vec![CheckpointRef {
                step: *step,
                path: ".".into(),
                optimizer_state: Some("training/optimizer.safetensors".into()),
            }],
            visit_order: None,
        }],
    };
    trajectory.validate()?;
    Ok(Pretrained {
        weights: std::fs::read(dir.join("model.safetensors"))?,
        optimizer_state: second_moments_only(&dir.join("optimizer.safetensors"))?,
        trajectory: (serde_json::to_string_pretty(&trajectory)? + "\n").into_bytes(),
        losses: out.log.iter().map(|l| l.loss).collect(),
    })
}

/// Mean loss per target token of the model in `dir` on `docs` (nats/token).
pub fn loss_per_token(dir: &Path, docs: &[PreparedDoc]) -> Result<f64, Box<dyn std::error::Error>> {
    let model = Model::load(dir, &LoadOptions::default(), &Device::Cpu)?;
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in docs.chunks(32) {
        let rows: Vec<(&[u32], &[u8])> = chunk
            .iter()
            .map(|d| (d.input_ids.as_slice(), d.loss_mask.as_slice()))
            .collect();
        let batch = TokenBatch::new(&rows, 0, None, &Device::Cpu)?;
        sum += model
            .doc_losses(&batch)?
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>();
        n += chunk.iter().map(|d| d.n_loss_tokens()).sum::<usize>();
    }
    Ok(sum / n.max(1) as f64)
}

/// The checkpoint's `optimizer.safetensors` with only its `exp_avg_sq.*` tensors (same
/// metadata, same writer), as the bytes of a safetensors file.
fn second_moments_only(path: &Path) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let bytes = std::fs::read(path)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let mut kept: Vec<(String, candle_core::Tensor)> =
        source_tda::train::checkpoint::read_safetensors(path, &Device::Cpu)?
            .into_iter()
            .filter(|(k, _)| k.starts_with("exp_avg_sq."))
            .collect();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    let out = path.with_extension("second-moments.safetensors");
    source_tda::train::checkpoint::write_safetensors(&out, &kept, metadata)?;
    Ok(std::fs::read(&out)?)
}
