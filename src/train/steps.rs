//! Owns `StepWeight` and `Trajectory::step_weights`: each optimizer step's exact first-order
//! weight in the run that happened.
//! Layer: train — may import the ground, linalg, backend, model, data, hub and, in this folder,
//! trajectory.rs.
//!
//! Linearising the recorded run around itself, a perturbation δg_k of the gradient that step
//! k took (at θ_{k−1}) reaches the final model, before any curvature acts (s σ → 0), as
//! δθ_T = −ω_k δg_k with
//!
//!   ω_k = c_k Σ_{j ≥ k} η_j a_{jk} R_j,   R_j = Π_{i > j} (1 − η_i λ_i),
//!
//! c_k the clip factor of step k (1 without clipping), a_{jk} how much of g_k the update
//! of step j still applies, and R_j the decoupled weight decay of every later step of the
//! whole run (a scalar, so it commutes with the curvature and is folded into ω exactly):
//!
//! * SGD: a_{kk} = 1, nothing later;
//! * heavy-ball momentum (b_j = β b_{j−1} + g_j): a_{jk} = β^{j−k} — at constant η and
//!   without decay ω_k = η c_k (1 − β^{T_s−k+1}) / (1 − β), T_s the stage's last step, not
//!   η c_k / (1 − β);
//! * AdamW's bias-corrected m̂_j = (1 − β₁) Σ_k β₁^{j−k} g_k / (1 − β₁ʲ):
//!   a_{jk} = (1 − β₁) β₁^{j−k} / (1 − β₁ʲ) (Adam's P is applied by the curvature, not here).
//!
//! The optimizer's state starts afresh with every stage, so a_{jk} = 0 once j leaves k's
//! stage; the decay R_j runs to the end of the run. The mass μ_k by which step k's curvature
//! acts (the walk's propagation) is the same sum without the decay, μ_k = c_k Σ_{j ≥ k} η_j
//! a_{jk}: a change H δθ of step k's gradient reaches θ_T with the same weights as δg_k
//! (first order in H; in the middle of a long momentum run μ_k = η_k c_k / (1 − β), the
//! steady state, and at its end it falls to η_k c_k). The decay itself is a scalar carried
//! by ω (the walk's v is measured in units of R).
//! With `loss_normalization = "mean_per_token"` the optimizer stepped on the summed loss
//! over the batch's loss tokens, so both ω and μ carry 1/T̄, T̄ the mean number of loss
//! tokens per document ([`Trajectory::step_weights`]'s `tokens_per_doc`).

use super::trajectory::{LrMass, OptimizerInfo, Trajectory};

/// One optimizer step's first-order weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepWeight {
    /// Global step k (1-based: the step that took θ_{k−1} to θ_k).
    pub step: u64,
    /// μ_k: the mass by which the step's curvature acts (c_k Σ_{j ≥ k} η_j a_{jk}).
    pub mass: f64,
    /// ω_k: how much of a perturbation of the step's gradient reaches θ_T.
    pub weight: f64,
}

impl OptimizerInfo {
    /// λ: the decoupled weight decay (0 for none).
    pub fn weight_decay(&self) -> f64 {
        match *self {
            OptimizerInfo::Sgd { weight_decay }
            | OptimizerInfo::Momentum { weight_decay, .. }
            | OptimizerInfo::AdamW { weight_decay, .. } => weight_decay,
            OptimizerInfo::Unknown => 0.0,
        }
    }
}

impl Trajectory {
    /// Per segment, every recorded step's [`StepWeight`] (empty for a declared segment without
    /// learning rates). `tokens_per_doc(segment)`: T̄ when the run normalised the loss per
    /// token, ignored otherwise.
    pub fn step_weights(&self, tokens_per_doc: &dyn Fn(usize) -> f64) -> Vec<Vec<StepWeight>> {
        use crate::config::LossNormalization;
        let scale = |l: usize| match self.loss_normalization {
            LossNormalization::SumPerDocument => 1.0,
            LossNormalization::MeanPerToken => 1.0 / tokens_per_doc(l).max(1.0),
        };
        // Flattened steps of the run: (segment, index in it, η, c, λ).
        let mut steps: Vec<(usize, usize, f64, f64, f64)> = Vec::new();
        for (l, s) in self.segments.iter().enumerate() {
            if !matches!(s.lr_mass, LrMass::Finite(_)) {
                continue;
            }
            let lambda = s.optimizer.weight_decay();
            for (i, &eta) in s.learning_rates.iter().enumerate() {
                let c = s.clip_factors.get(i).copied().unwrap_or(1.0);
                steps.push((l, i, eta, c, lambda));
            }
        }
        // R_j = Π_{i > j} (1 − η_i λ_i), from the end.
        let mut r = vec![1.0; steps.len()];
        for j in (0..steps.len().saturating_sub(1)).rev() {
            let (_, _, eta, _, lambda) = steps[j + 1];
            r[j] = r[j + 1] * (1.0 - eta * lambda);
        }
        // S_k = Σ_{j ≥ k, same stage} η_j a_{jk} R_j and, without the decay,
        // M_k = Σ_{j ≥ k, same stage} η_j a_{jk}, by backward recursions per stage.
        let mut out: Vec<Vec<StepWeight>> = vec![Vec::new(); self.segments.len()];
        let (mut tail, mut tail_m) = (0.0, 0.0);
        for k in (0..steps.len()).rev() {
            let (l, i, eta, c, _) = steps[k];
            let seg = &self.segments[l];
            let next_same_stage = steps
                .get(k + 1)
                .is_some_and(|n| self.segments[n.0].stage == seg.stage);
            if !next_same_stage {
                (tail, tail_m) = (0.0, 0.0);
            }
            let t = (seg.step_start + i as u64 + 1 - stage_start(self, l)) as i32;
            // (a_{kk}, β): this step's own share and how much of the tail carries back.
            let (own, beta) = match seg.optimizer {
                OptimizerInfo::Momentum { beta, .. } => (1.0, beta),
                OptimizerInfo::AdamW { beta1, .. } => {
                    ((1.0 - beta1) / (1.0 - beta1.powi(t)), beta1)
                }
                _ => (1.0, 0.0),
            };
            // Adam's a_{jk} = (1 − β₁) β₁^{j−k} / (1 − β₁ʲ): the 1/(1 − β₁ʲ) belongs to j, so
            // the recursion carries η_j (1 − β₁)/(1 − β₁ʲ) R_j and multiplies by β₁ per step.
            tail = eta * own * r[k] + beta * tail;
            tail_m = eta * own + beta * tail_m;
            out[l].push(StepWeight {
                step: seg.step_start + i as u64 + 1,
                mass: c * tail_m * scale(l),
                weight: c * tail * scale(l),
            });
        }
        for w in &mut out {
            w.reverse();
        }
        out
    }
}

/// The global step at which segment `l`'s stage began (its optimizer's t = 0).
fn stage_start(t: &Trajectory, l: usize) -> u64 {
    let stage = &t.segments[l].stage;
    let mut start = t.segments[l].step_start;
    for s in t.segments[..l].iter().rev() {
        if &s.stage != stage {
            break;
        }
        start = s.step_start;
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LossNormalization;
    use crate::train::{CheckpointRef, Segment, TRAJECTORY_VERSION};

    fn seg(stage: &str, start: u64, lrs: Vec<f64>, opt: OptimizerInfo) -> Segment {
        let end = start + lrs.len() as u64;
        Segment {
            stage: stage.into(),
            step_start: start,
            step_end: end,
            lr_mass: LrMass::Finite(lrs.iter().sum()),
            clip_factors: Vec::new(),
            learning_rates: lrs,
            optimizer: opt,
            dataset: "train".into(),
            n_docs: 4,
            checkpoints: vec![CheckpointRef {
                step: end,
                path: "c".into(),
                optimizer_state: None,
            }],
            visit_order: None,
        }
    }

    fn traj(segments: Vec<Segment>, norm: LossNormalization) -> Trajectory {
        Trajectory {
            version: TRAJECTORY_VERSION,
            base_model: "m".into(),
            base_commit: None,
            loss_normalization: norm,
            segments,
        }
    }

    #[test]
    fn momentum_weights_are_the_finite_horizon_sums_and_reset_per_stage() {
        let m = OptimizerInfo::Momentum {
            beta: 0.9,
            weight_decay: 0.0,
        };
        let t = traj(
            vec![
                seg("a", 0, vec![0.1; 3], m.clone()),
                seg("a", 3, vec![0.1; 2], m.clone()),
                seg("b", 5, vec![0.1; 2], m),
            ],
            LossNormalization::SumPerDocument,
        );
        let w = t.step_weights(&|_| 1.0);
        // Stage a ends at step 5: ω_k = η (1 − β^{5−k+1}) / (1 − β).
        for (k, sw) in w[0].iter().chain(&w[1]).enumerate() {
            let k = k as i32 + 1;
            let want = 0.1 * (1.0 - 0.9f64.powi(5 - k + 1)) / 0.1;
            assert!(
                (sw.weight - want).abs() < 1e-12,
                "step {k}: {sw:?} vs {want}"
            );
            assert!((sw.mass - want).abs() < 1e-12, "no decay: μ = ω");
        }
        assert_eq!(w[1][0].step, 4);
        // Stage b restarts: its last step applies its gradient once.
        assert!((w[2][1].weight - 0.1).abs() < 1e-12, "{:?}", w[2]);
        assert!((w[2][0].weight - 0.1 * 1.9).abs() < 1e-12, "{:?}", w[2]);
    }

    #[test]
    fn adam_weights_follow_the_bias_corrected_first_moment_and_decay_and_tokens_scale() {
        let a = OptimizerInfo::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.5,
        };
        let mut s = seg("a", 0, vec![0.01; 16], a);
        s.clip_factors = vec![0.5; 16];
        let t = traj(vec![s], LossNormalization::SumPerDocument);
        let w = &t.step_weights(&|_| 1.0)[0];
        // Brute force: ω_k = c Σ_j η (1 − β₁) β₁^{j−k} / (1 − β₁ʲ) Π_{i>j} (1 − η λ).
        for k in 1..=16i32 {
            let mut want = 0.0;
            for j in k..=16 {
                let decay = (1.0 - 0.01 * 0.5f64).powi(16 - j);
                want += 0.01 * 0.1 * 0.9f64.powi(j - k) / (1.0 - 0.9f64.powi(j)) * decay;
            }
            want *= 0.5;
            let got = w[k as usize - 1].weight;
            assert!((got - want).abs() < 1e-14, "step {k}: {got} vs {want}");
        }
        // Without decay and clipping the first step's weight is ≈ 2.8 η, the last's ≈ 0.12 η.
        let mut t2 = t.clone();
        t2.segments[0].clip_factors.clear();
        t2.segments[0].optimizer = OptimizerInfo::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let w2 = &t2.step_weights(&|_| 1.0)[0];
        assert!((w2[0].weight / 0.01 - 2.8).abs() < 0.1, "{:?}", w2[0]);
        assert!((w2[15].weight / 0.01 - 0.123).abs() < 0.01, "{:?}", w2[15]);
        // mean_per_token divides ω and μ by T̄.
        t2.loss_normalization = LossNormalization::MeanPerToken;
        let w3 = &t2.step_weights(&|_| 8.0)[0];
        for (a, b) in w2.iter().zip(w3) {
            assert!((a.weight / 8.0 - b.weight).abs() < 1e-15);
            assert!((a.mass / 8.0 - b.mass).abs() < 1e-15);
        }
    }
}
