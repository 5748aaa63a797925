//! Owns the attribution plan (segments) and the score stage's memory plan (layer groups).
//! Layer: attribution — may import ground, backend, model, train, curvature;
//! never eval, pipeline, report or stages.
//!
//! What an attribution run works on, and how `score` fits it in memory: the segment plan
//! (derived from `[attribution] method` and a recorded trajectory: which segments, their
//! data, N, effective learning-rate mass and checkpoints) and the layer groups that bound
//! the factors held at once. Planning only: reading the trajectory and the prepared data is
//! the caller's (the `fit`, `query` and `score` stages).

use std::path::PathBuf;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::MethodKind;
use crate::curvature::FactorFile;
use crate::error::{Error, Result};
use crate::train::{LrMass, OptimizerInfo, Trajectory};

/// One segment the attribution works on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedSegment {
    /// Position in the plan (and the factor file `fit/segment-K.safetensors`).
    pub index: usize,
    /// Stage name (`pretrain`, `finetune`, …).
    pub stage: String,
    /// Data role whose documents it trained on (`train`, `pretrain`, …).
    pub role: String,
    /// N_ℓ.
    pub n_docs: u64,
    /// Effective learning-rate mass (momentum folded in).
    pub mass: LrMass,
    /// Checkpoint folders (absolute), in step order.
    pub checkpoints: Vec<PathBuf>,
    /// AdamW's ε when the segment was trained with AdamW (its checkpoints then carry the
    /// bias-corrected second moments in `optimizer.safetensors`).
    #[serde(default)]
    pub adam_eps: Option<f64>,
    /// The recorded steps grouped between consecutive gradient points (the segment's start
    /// and its checkpoints), in step order; empty for a declared segment (then u_ℓ = F_r(H̄) v
    /// is scored at the average of its checkpoints).
    #[serde(default)]
    pub groups: Vec<PlannedGroup>,
}

/// Steps (a, b] of a segment between two saved models θ_a and θ_b: step k took its gradient
/// at θ_{k−1}, so one step (b = a + 1) is scored exactly at θ_a. A longer group is scored at
/// θ_b (its last step's model, one step late): the linear interpolation between θ_a and θ_b
/// was tried and put (K + 1)/2K of the weight on θ_a, where a fresh fine-tune's gradients are
/// largest and fall fastest (on the demo model it moved a planted document from rank 1 to
/// 11, where scoring every step at its own θ_{k−1} keeps it at 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedGroup {
    /// K = b − a.
    pub steps: u64,
    /// Σ μ_k over the group ([`crate::train::StepWeight`]).
    pub mass: f64,
    /// Σ ω_k over the group.
    pub weight: f64,
    /// θ_a (absolute folder).
    pub from: PathBuf,
    /// θ_b, when saved (a group after the segment's last checkpoint has none).
    pub to: Option<PathBuf>,
}

impl PlannedGroup {
    /// (weight on θ_a, weight on θ_b) of the group's gradient.
    pub fn endpoint_weights(&self) -> (f64, f64) {
        match (self.steps, &self.to) {
            (2.., Some(_)) => (0.0, 1.0),
            _ => (1.0, 0.0),
        }
    }
}

impl PlannedSegment {
    /// The models a segment is scored at, each with the (group index, coefficient) pairs
    /// whose u it is contracted with: u at model x is Σ coefficient · u_group. Without
    /// groups: every checkpoint with 1/C of the segment's one u.
    pub fn score_points(&self) -> Vec<(PathBuf, Vec<(usize, f64)>)> {
        if self.groups.is_empty() {
            let c = self.checkpoints.len().max(1) as f64;
            return self
                .checkpoints
                .iter()
                .map(|p| (p.clone(), vec![(0, 1.0 / c)]))
                .collect();
        }
        let mut out: Vec<(PathBuf, Vec<(usize, f64)>)> = Vec::new();
        let mut add = |path: &PathBuf, j: usize, w: f64| {
            if w == 0.0 {
                return;
            }
            match out.iter_mut().find(|(p, _)| p == path) {
                Some((_, v)) => v.push((j, w)),
                None => out.push((path.clone(), vec![(j, w)])),
            }
        };
        for (j, g) in self.groups.iter().enumerate() {
            let (a, b) = g.endpoint_weights();
            add(&g.from, j, a);
            if let Some(to) = &g.to {
                add(to, j, b);
            }
        }
        out
    }
}

/// The plan of an attribution run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttributionPlan {
    /// The method.
    pub method: MethodKind,
    /// Segments in training order.
    pub segments: Vec<PlannedSegment>,
    /// The final model θ_T (absolute folder).
    pub final_checkpoint: PathBuf,
}

/// A model the scoring pass runs at, with the u it contracts with:
/// u = Σ coefficient · u_{segment, group}.
#[derive(Debug, Clone, PartialEq)]
pub struct ScorePoint {
    /// Position of the segment in [`AttributionPlan::segments`].
    pub segment: usize,
    /// The model's folder.
    pub model: PathBuf,
    /// (group index within the segment, coefficient).
    pub terms: Vec<(usize, f64)>,
}

impl AttributionPlan {
    /// Whether the method needs EK-FAC factors.
    pub fn needs_factors(&self) -> bool {
        self.method != MethodKind::GradientDot
    }

    /// Every scoring pass of the plan, segment by segment.
    pub fn score_points(&self) -> Vec<ScorePoint> {
        self.segments
            .iter()
            .enumerate()
            .flat_map(|(l, s)| {
                s.score_points()
                    .into_iter()
                    .map(move |(model, terms)| ScorePoint {
                        segment: l,
                        model,
                        terms,
                    })
            })
            .collect()
    }
}

/// What [`plan_segments`] asks of the run it plans for.
pub struct PlanSource<'a> {
    /// The recorded trajectory.
    pub trajectory: &'a Trajectory,
    /// A trajectory path (relative to the run directory, or absolute) made absolute.
    pub resolve: &'a dyn Fn(&str) -> PathBuf,
    /// Whether a data role was prepared.
    pub prepared: &'a dyn Fn(&str) -> bool,
    /// The number of prepared `train` documents (asked only by the influence function and
    /// the gradient dot product, which score the final model's `train` set).
    pub n_train: &'a dyn Fn() -> Result<u64>,
    /// The model the trajectory started from θ_0 (absolute folder), where the first recorded
    /// step took its gradient.
    pub base: &'a dyn Fn() -> Result<PathBuf>,
    /// T̄: the mean number of loss tokens per document of a prepared data role (asked only
    /// when the run normalised its loss per token).
    pub tokens_per_doc: &'a dyn Fn(&str) -> Result<f64>,
}

/// The plan of `method` over a recorded trajectory. Source plans every segment with prepared
/// data (a first segment without data is left out: it contributes no scores and propagates
/// nothing further back); the other methods plan one converged segment at the final model.
pub fn plan_segments(method: MethodKind, src: &PlanSource) -> Result<AttributionPlan> {
    let traj = src.trajectory;
    let final_checkpoint = (src.resolve)(&traj.final_checkpoint().path);
    let segments = match method {
        MethodKind::Source => {
            let tokens: Vec<f64> = match traj.loss_normalization {
                crate::config::LossNormalization::MeanPerToken => traj
                    .segments
                    .iter()
                    .map(|s| match (src.prepared)(&s.dataset) {
                        true => (src.tokens_per_doc)(&s.dataset),
                        false => Ok(1.0),
                    })
                    .collect::<Result<_>>()?,
                crate::config::LossNormalization::SumPerDocument => {
                    vec![1.0; traj.segments.len()]
                }
            };
            let weights = traj.step_weights(&|l| tokens[l]);
            let mut out = Vec::new();
            for (i, s) in traj.segments.iter().enumerate() {
                if !(src.prepared)(&s.dataset) {
                    if i == 0 {
                        continue;
                    }
                    return Err(Error::Pipeline(format!(
                        "segment {i} (`{}`) trained on data role `{}`, which was not prepared; \
                         its curvature cannot be fitted without it",
                        s.stage, s.dataset
                    )));
                }
                let groups = step_groups(traj, i, &weights[i], src)?;
                let mass = match groups.is_empty() {
                    true => s.effective_mass(),
                    false => LrMass::Finite(groups.iter().map(|g| g.mass).sum()),
                };
                out.push(PlannedSegment {
                    index: out.len(),
                    stage: s.stage.clone(),
                    role: s.dataset.clone(),
                    n_docs: s.n_docs,
                    mass,
                    groups,
                    checkpoints: s
                        .checkpoints
                        .iter()
                        .map(|c| (src.resolve)(&c.path))
                        .collect(),
                    adam_eps: match &s.optimizer {
                        OptimizerInfo::AdamW { eps, .. } => Some(*eps),
                        _ => None,
                    },
                });
            }
            out
        }
        MethodKind::Influence | MethodKind::GradientDot => {
            vec![PlannedSegment {
                index: 0,
                stage: "final".into(),
                role: "train".into(),
                n_docs: (src.n_train)()?,
                mass: LrMass::Converged,
                checkpoints: vec![final_checkpoint.clone()],
                adam_eps: None,
                groups: Vec::new(),
            }]
        }
    };
    if segments.is_empty() {
        return Err(Error::Pipeline(
            "the trajectory has no segment with prepared data to attribute to".into(),
        ));
    }
    Ok(AttributionPlan {
        method,
        segments,
        final_checkpoint,
    })
}

/// Segment `i`'s recorded steps (`w`, one per step) grouped between its gradient points:
/// θ at the segment's start (the previous segment's last checkpoint, or the base model) and
/// each of its checkpoints, plus the steps after the last checkpoint.
fn step_groups(
    traj: &Trajectory,
    i: usize,
    w: &[crate::train::StepWeight],
    src: &PlanSource,
) -> Result<Vec<PlannedGroup>> {
    let s = &traj.segments[i];
    if w.is_empty() {
        return Ok(Vec::new());
    }
    let start = match i
        .checked_sub(1)
        .and_then(|p| traj.segments[p].checkpoints.last())
    {
        Some(c) if c.step == s.step_start => (src.resolve)(&c.path),
        Some(c) => {
            return Err(Error::Pipeline(format!(
                "segment {i} (`{}`) starts at step {} but the segment before it ends with a \
                 checkpoint at step {}: the model its first step took its gradient at is not \
                 saved",
                s.stage, s.step_start, c.step
            )))
        }
        None => (src.base)()?,
    };
    let mut points: Vec<(u64, PathBuf)> = vec![(s.step_start, start)];
    points.extend(
        s.checkpoints
            .iter()
            .map(|c| (c.step, (src.resolve)(&c.path))),
    );
    let mut groups = Vec::new();
    for (j, (a, from)) in points.iter().enumerate() {
        let b = points.get(j + 1).map(|p| p.0).unwrap_or(s.step_end);
        if b <= *a {
            continue;
        }
        let steps = w.iter().filter(|x| x.step > *a && x.step <= b);
        groups.push(PlannedGroup {
            steps: b - a,
            mass: steps.clone().map(|x| x.mass).sum(),
            weight: steps.map(|x| x.weight).sum(),
            from: from.clone(),
            to: points.get(j + 1).map(|p| p.1.clone()),
        });
    }
    Ok(groups)
}

/// How `score` loads factors: the Source walk is block-diagonal per layer, so u_ℓ is
/// computed one group of consecutive layers at a time, with only that group's factors of
/// every segment in memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FactorGroups {
    /// Layer index ranges [start, end), in layer order, covering every layer.
    pub groups: Vec<(usize, usize)>,
    /// Factor bytes of each group (all segments).
    pub group_bytes: Vec<u64>,
    /// The bytes a group may take.
    pub budget: u64,
}

impl FactorGroups {
    /// The largest group's layer count and bytes.
    pub fn largest(&self) -> (usize, u64) {
        let n = self.groups.iter().map(|(a, b)| b - a).max().unwrap_or(0);
        (n, self.group_bytes.iter().copied().max().unwrap_or(0))
    }

    /// A one-line description: `factors: 3 groups of ≤ 10 layers, ≤ 1.2 GiB each`.
    pub fn describe(&self) -> String {
        let (n, b) = self.largest();
        let h = crate::util::mem::human_bytes;
        if self.groups.len() == 1 {
            format!("factors: all {n} layers at once, {}", h(b))
        } else {
            format!(
                "factors: {} groups of ≤ {n} layers, ≤ {} each (budget {})",
                self.groups.len(),
                h(b),
                h(self.budget)
            )
        }
    }
}

/// Cuts `layers` (names, with the factor bytes each needs over all segments) into
/// consecutive groups of at most `budget` bytes. `limit` says where the budget came from, for
/// the refusal when one layer alone does not fit.
pub fn plan_factor_groups(
    layers: &[String],
    layer_bytes: &[u64],
    budget: u64,
    limit: &str,
) -> Result<FactorGroups> {
    let h = crate::util::mem::human_bytes;
    let (mut groups, mut group_bytes) = (Vec::new(), Vec::new());
    let (mut start, mut acc) = (0usize, 0u64);
    for (i, (name, &b)) in layers.iter().zip(layer_bytes).enumerate() {
        if b > budget {
            return Err(Error::Resource(format!(
                "score: the factors of layer `{name}` alone need {} (all segments), more than \
                 the {} left for factors under {limit}; raise the limit, lower \
                 batching.token_budget, or set attribution.block_size to store smaller \
                 eigenvector blocks",
                h(b),
                h(budget)
            )));
        }
        if i > start && acc + b > budget {
            groups.push((start, i));
            group_bytes.push(acc);
            (start, acc) = (i, 0);
        }
        acc += b;
    }
    if start < layers.len() {
        groups.push((start, layers.len()));
        group_bytes.push(acc);
    }
    Ok(FactorGroups {
        groups,
        group_bytes,
        budget,
    })
}

/// What scoring holds besides the model pass: per layer, its stored factors in every
/// segment's `files` plus f32 working copies of [d_out, d_in] (spectral weights, Adam's p̄
/// and σ_p) per segment; and the queries: v, the walk's v and u per segment
/// (`n_segments`), f32. `v`: the query gradients [Q, d_out, d_in] per layer of `layers`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreNeeds {
    /// Factor bytes of each layer over all segments.
    pub layer_bytes: Vec<u64>,
    /// Bytes of the query gradients and the preconditioned queries.
    pub query_bytes: u64,
}

impl ScoreNeeds {
    /// The needs of scoring `v` against `files` over `n_segments` segments.
    pub fn of(
        files: &[FactorFile],
        layers: &[String],
        v: &[Tensor],
        n_segments: usize,
    ) -> Result<ScoreNeeds> {
        let q = v.first().map(|t| t.dim(0)).transpose()?.unwrap_or(0);
        let mut layer_bytes = Vec::with_capacity(layers.len());
        let mut grad_elems = 0u64;
        for (name, vl) in layers.iter().zip(v) {
            let (_, o, i) = vl.dims3()?;
            grad_elems += (o * i) as u64;
            let mut b = 0u64;
            for f in files {
                b += f.layer_bytes(name)? + 12 * (o * i) as u64;
            }
            layer_bytes.push(b);
        }
        let query_bytes = 4 * q as u64 * grad_elems * (n_segments as u64 + 2);
        Ok(ScoreNeeds {
            layer_bytes,
            query_bytes,
        })
    }
}

/// The `score` stage's memory plan: logs the estimate and the layer groups, and refuses
/// when the model pass (`model_pass_bytes`) and the queries alone exceed `memory_limit_gib`,
/// or when one layer's factors do not fit in what is left. Without a limit, groups are sized
/// to half the available memory. Returns the estimated peak and the groups.
pub fn plan_score_memory(
    model_pass_bytes: u64,
    memory_limit_gib: Option<f64>,
    layers: &[String],
    needs: &ScoreNeeds,
) -> Result<(u64, FactorGroups)> {
    let h = crate::util::mem::human_bytes;
    let (layer_bytes, query_bytes) = (&needs.layer_bytes, needs.query_bytes);
    let base = model_pass_bytes + query_bytes;
    let (total, limit) = match memory_limit_gib {
        Some(l) => (
            (l * (1u64 << 30) as f64) as u64,
            format!("attribution.memory_limit_gib = {l}"),
        ),
        None => {
            let avail = crate::util::mem::available_memory_bytes().unwrap_or(8 << 30);
            (
                avail / 2,
                format!("half the available memory ({})", h(avail)),
            )
        }
    };
    if base > total && memory_limit_gib.is_some() {
        return Err(Error::Resource(format!(
            "score: the model pass and the queries alone are estimated at {} (before any \
             factors), more than {limit}; lower batching.token_budget, use fewer queries or \
             attribution.query_rank, or raise the limit",
            h(base)
        )));
    }
    // Without a configured limit, never plan below one layer per group.
    let max_layer = layer_bytes.iter().copied().max().unwrap_or(0);
    let budget = match memory_limit_gib {
        Some(_) => total - base,
        None => total.saturating_sub(base).max(max_layer),
    };
    let groups = plan_factor_groups(layers, layer_bytes, budget, &limit)?;
    let est = base + groups.largest().1;
    tracing::info!(
        "score: estimated peak memory {} (model pass {}, queries {}, {})",
        h(est),
        h(model_pass_bytes),
        h(query_bytes),
        groups.describe()
    );
    Ok((est, groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_groups_fill_the_budget_in_order_and_refuse_a_layer_that_cannot_fit() {
        let names: Vec<String> = (0..5).map(|i| format!("l{i}")).collect();
        let g = plan_factor_groups(&names, &[3, 3, 3, 1, 5], 6, "the test limit").unwrap();
        assert_eq!(g.groups, vec![(0, 2), (2, 4), (4, 5)]);
        assert_eq!(g.group_bytes, vec![6, 4, 5]);
        assert!(
            g.describe().starts_with("factors: 3 groups of ≤ 2 layers"),
            "{}",
            g.describe()
        );
        let one = plan_factor_groups(&names, &[1; 5], 100, "x").unwrap();
        assert_eq!(one.groups, vec![(0, 5)]);
        let e = plan_factor_groups(&names, &[3, 3, 9, 1, 5], 6, "the test limit")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer `l2`") && e.contains("the test limit"),
            "{e}"
        );
    }
}
