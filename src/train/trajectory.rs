//! Owns `Trajectory` (`trajectory.json`): its segments, `LrMass`, `OptimizerInfo`, checkpoints.
//! Layer: train — may import the ground, linalg, backend, model, data and hub; no sibling.
//!
//! `trajectory.json`: the training trajectory that Source attributes through
//! (docs/design.md §2).
//!
//! The trajectory θ_0 … θ_T is cut into segments. Each segment records its optimizer steps,
//! their learning rates and the sum s = Σ η_k, the optimizer that produced it, the data set
//! it trained on (and its size N), the checkpoints saved inside it, and the order documents
//! were visited. A pretrained model enters as a `pretrain` segment whose s is declared
//! (possibly `converged`, s → ∞). Paths are relative to the run directory.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::util::fsx::write_json_atomic;

/// Version of the file format.
pub const TRAJECTORY_VERSION: u32 = 1;

/// The loss normalisation is a `[train]` key, so its type lives in the ground floor's
/// config; the trajectory records it.
use crate::config::LossNormalization;

/// The optimizer of a segment with its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerInfo {
    /// Plain SGD.
    Sgd {
        /// Decoupled weight decay (0 for none).
        #[serde(default)]
        weight_decay: f64,
    },
    /// SGD with heavy-ball momentum β; the effective mass is s / (1 − β).
    Momentum {
        /// β.
        beta: f64,
        /// Decoupled weight decay (0 for none).
        #[serde(default)]
        weight_decay: f64,
    },
    /// AdamW; checkpoints carry the bias-corrected second moments.
    AdamW {
        /// β₁.
        beta1: f64,
        /// β₂.
        beta2: f64,
        /// ε.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// Unknown (e.g. a declared pretraining segment); the score stage treats it as SGD.
    Unknown,
}

/// The learning-rate mass of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrMass {
    /// s = Σ η_k (before any momentum correction).
    Finite(f64),
    /// s → ∞: the segment converged (influence-function form with damping).
    Converged,
}

/// One checkpoint inside a segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRef {
    /// Optimizer steps taken when it was saved (global step).
    pub step: u64,
    /// Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer.json),
    /// relative to the run directory (or absolute for an imported or fetched model).
    pub path: String,
    /// Optimizer state file (safetensors: `exp_avg_sq.<param>` bias-corrected second moments
    /// for AdamW, `momentum.<param>` for momentum SGD), relative like `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_state: Option<String>,
}

/// One segment of the trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// Stage name: `pretrain`, `finetune`, or a configured stage name.
    pub stage: String,
    /// Global steps [start, end) this segment covers (empty for a declared pretrain segment).
    pub step_start: u64,
    /// End of the step range (exclusive).
    pub step_end: u64,
    /// The learning rate of each optimizer step in the segment (empty when declared).
    #[serde(default)]
    pub learning_rates: Vec<f64>,
    /// s: the sum of `learning_rates`, or the declared mass.
    pub lr_mass: LrMass,
    /// c_k = min(1, max_grad_norm / (‖g_k‖ + 1e-6)): the factor gradient clipping scaled
    /// each step's gradient by (empty: no clipping recorded, c_k = 1). The optimizer stepped
    /// on c_k J_k, so the step Jacobian is I − η_k c_k (P) H and the effective mass is
    /// Σ η_k c_k (docs/design.md §2: the curvature and mass of the objective actually
    /// stepped on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clip_factors: Vec<f64>,
    /// The optimizer.
    pub optimizer: OptimizerInfo,
    /// The data role it trained on (`train`, `pretrain`) as prepared in the run.
    pub dataset: String,
    /// N: documents in that data set.
    pub n_docs: u64,
    /// Checkpoints saved inside the segment, in step order (the last at its end by default).
    pub checkpoints: Vec<CheckpointRef>,
    /// Document indices visited by each optimizer step, when recorded (file relative to the
    /// run directory: Parquet with columns step, doc_index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visit_order: Option<String>,
}

impl Segment {
    /// K: optimizer steps in the segment.
    pub fn steps(&self) -> u64 {
        self.step_end - self.step_start
    }

    /// The effective learning-rate mass: s = Σ η_k c_k with the recorded clip factors c_k
    /// (Σ η_k without them), divided by (1 − β) with heavy-ball momentum.
    pub fn effective_mass(&self) -> LrMass {
        let m = match self.lr_mass {
            LrMass::Finite(_) if !self.clip_factors.is_empty() => LrMass::Finite(
                self.learning_rates
                    .iter()
                    .zip(&self.clip_factors)
                    .map(|(e, c)| e * c)
                    .sum(),
            ),
            m => m,
        };
        match (m, &self.optimizer) {
            (LrMass::Finite(s), OptimizerInfo::Momentum { beta, .. }) => {
                LrMass::Finite(s / (1.0 - beta))
            }
            (m, _) => m,
        }
    }
}

/// The whole trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    /// [`TRAJECTORY_VERSION`].
    pub version: u32,
    /// The model it started from (hub id or path) and its commit when known.
    pub base_model: String,
    /// Commit of the base model, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_commit: Option<String>,
    /// How the training loss was normalised.
    pub loss_normalization: LossNormalization,
    /// Segments in training order (pretraining first).
    pub segments: Vec<Segment>,
}

impl Trajectory {
    /// Reads and checks `trajectory.json`.
    pub fn load(path: &Path) -> Result<Trajectory> {
        let text = std::fs::read_to_string(path).ctx("reading", path)?;
        let t: Trajectory = serde_json::from_str(&text).map_err(|e| {
            Error::Pipeline(format!("{}: not a valid trajectory ({e})", path.display()))
        })?;
        t.validate()
            .map_err(|e| Error::Pipeline(format!("{}: {e}", path.display())))?;
        Ok(t)
    }

    /// Writes it atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.validate().map_err(Error::Pipeline)?;
        write_json_atomic(path, self)
    }

    /// Consistency checks: version, non-empty, s = Σ η, checkpoints inside their segment.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.version != TRAJECTORY_VERSION {
            return Err(format!(
                "trajectory version {} is not supported (expected {TRAJECTORY_VERSION})",
                self.version
            ));
        }
        if self.segments.is_empty() {
            return Err("the trajectory has no segments".into());
        }
        for (i, s) in self.segments.iter().enumerate() {
            if s.step_end < s.step_start {
                return Err(format!("segment {i}: step range is reversed"));
            }
            if !s.learning_rates.is_empty() && s.learning_rates.len() as u64 != s.steps() {
                return Err(format!(
                    "segment {i}: {} learning rates for {} steps",
                    s.learning_rates.len(),
                    s.steps()
                ));
            }
            if !s.clip_factors.is_empty() {
                if s.clip_factors.len() != s.learning_rates.len() {
                    return Err(format!(
                        "segment {i}: {} clip factors for {} learning rates",
                        s.clip_factors.len(),
                        s.learning_rates.len()
                    ));
                }
                if let Some(c) = s.clip_factors.iter().find(|c| !(**c > 0.0 && **c <= 1.0)) {
                    return Err(format!("segment {i}: clip factor {c} is outside (0, 1]"));
                }
            }
            if let LrMass::Finite(mass) = s.lr_mass {
                if !(mass.is_finite() && mass >= 0.0) {
                    return Err(format!("segment {i}: learning-rate mass {mass} is invalid"));
                }
                if !s.learning_rates.is_empty() {
                    let sum: f64 = s.learning_rates.iter().sum();
                    if (sum - mass).abs() > 1e-9 * sum.abs().max(1.0) {
                        return Err(format!(
                            "segment {i}: learning-rate mass {mass} is not the sum of its rates \
                             ({sum})"
                        ));
                    }
                }
            }
            if s.n_docs == 0 {
                return Err(format!("segment {i}: N = 0 documents"));
            }
            if s.checkpoints.is_empty() {
                return Err(format!("segment {i} ({}) has no checkpoint", s.stage));
            }
            for c in &s.checkpoints {
                if s.steps() > 0 && !(s.step_start < c.step && c.step <= s.step_end) {
                    return Err(format!(
                        "segment {i}: checkpoint at step {} lies outside steps ({}, {}]",
                        c.step, s.step_start, s.step_end
                    ));
                }
            }
        }
        Ok(())
    }

    /// The last checkpoint of the last segment: the final model θ_T.
    pub fn final_checkpoint(&self) -> &CheckpointRef {
        self.segments
            .last()
            .and_then(|s| s.checkpoints.last())
            .expect("validated: segments have checkpoints")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(lrs: Vec<f64>, start: u64) -> Segment {
        let end = start + lrs.len() as u64;
        Segment {
            stage: "finetune".into(),
            step_start: start,
            step_end: end,
            lr_mass: LrMass::Finite(lrs.iter().sum()),
            clip_factors: Vec::new(),
            learning_rates: lrs,
            optimizer: OptimizerInfo::Momentum {
                beta: 0.9,
                weight_decay: 0.0,
            },
            dataset: "train".into(),
            n_docs: 10,
            checkpoints: vec![CheckpointRef {
                step: end,
                path: "c".into(),
                optimizer_state: None,
            }],
            visit_order: None,
        }
    }

    #[test]
    fn round_trip_and_checks() {
        let t = Trajectory {
            version: TRAJECTORY_VERSION,
            base_model: "org/m".into(),
            base_commit: None,
            loss_normalization: LossNormalization::SumPerDocument,
            segments: vec![seg(vec![0.1, 0.2], 0), seg(vec![0.3], 2)],
        };
        t.validate().unwrap();
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Trajectory>(&json).unwrap(), t);
        let LrMass::Finite(m) = t.segments[0].effective_mass() else {
            panic!("finite")
        };
        assert!((m - 0.3 / (1.0 - 0.9)).abs() < 1e-12, "s / (1 − β): {m}");
        assert_eq!(t.final_checkpoint().step, 3);

        let mut bad = t.clone();
        bad.segments[0].lr_mass = LrMass::Finite(1.0);
        assert!(bad.validate().unwrap_err().contains("not the sum"));
        let mut bad = t.clone();
        bad.segments[1].checkpoints[0].step = 1;
        assert!(bad.validate().unwrap_err().contains("outside steps"));
    }

    #[test]
    fn clip_factors_scale_the_mass_and_are_checked() {
        let mut t = Trajectory {
            version: TRAJECTORY_VERSION,
            base_model: "org/m".into(),
            base_commit: None,
            loss_normalization: LossNormalization::SumPerDocument,
            segments: vec![seg(vec![0.1, 0.2], 0)],
        };
        t.segments[0].clip_factors = vec![0.5, 0.25];
        t.validate().unwrap();
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.contains("clip_factors"));
        assert_eq!(serde_json::from_str::<Trajectory>(&json).unwrap(), t);
        let LrMass::Finite(m) = t.segments[0].effective_mass() else {
            panic!("finite")
        };
        // (0.1 · 0.5 + 0.2 · 0.25) / (1 − 0.9); the recorded Σ η stays 0.3.
        assert!((m - 0.1 / 0.1).abs() < 1e-12, "Σ η c / (1 − β): {m}");
        assert_eq!(t.segments[0].lr_mass, LrMass::Finite(0.1 + 0.2));
        // Without clip factors the file has no such key (older trajectories read unchanged).
        let plain = seg(vec![0.1], 0);
        assert!(!serde_json::to_string(&plain)
            .unwrap()
            .contains("clip_factors"));

        let mut bad = t.clone();
        bad.segments[0].clip_factors = vec![0.5];
        assert!(bad.validate().unwrap_err().contains("1 clip factors for 2"));
        let mut bad = t.clone();
        bad.segments[0].clip_factors = vec![0.5, 1.5];
        assert!(bad.validate().unwrap_err().contains("outside (0, 1]"));
    }
}
