//! Owns u_ℓ per method (Source walk, IF inverse, gradient dot), Adam's p̄, query forms.
//! Layer: attribution — may import ground, backend, model, train, curvature;
//! never eval, pipeline, report or stages.
//!
//! The preconditioned queries u_ℓ of each method (docs/design.md §2): the Source walk (or the
//! influence function's inverse, or nothing for the gradient dot product) applied to the
//! query gradients, one layer group at a time so that only that group's factors are in
//! memory, with Source's Adam variant (p̄ from the checkpoints' `optimizer.safetensors`) for
//! segments trained with AdamW; and the form u takes for the scoring pass.

use candle_core::{Device, Tensor};

use crate::backend::Backend;
use crate::config::{AdamResponse, AttributionConfig, MethodKind};
use crate::curvature::FactorFile;
use crate::error::{Error, Result};
use crate::linalg::{LayerFactors, LayerQuery, TokenFactors};

use super::adam::{adam_p_eff, AdamCurvature};
use super::clip::{has_clip_directions, step_groups};
use super::curvature::{Curvature, Damping, OnBackend};
use super::plan::{AttributionPlan, FactorGroups, PlannedSegment};
use super::source::{source_walk, SegmentCurvature};

/// u_ℓ for every planned segment, computed one layer group at a time: for each group, only
/// that group's factors of every segment are read (memory-mapped), the walk runs on the
/// group's layers (it is block-diagonal per layer) and the factors are dropped. `a`: the
/// run's `[attribution]` (damping, Adam response). `tokens`: the same query gradients as
/// token factors, when known; the influence function's inverse then rotates them into each
/// eigenbasis instead of the dense `v` where that is cheaper (the same value up to f32
/// rounding).
#[allow(clippy::too_many_arguments)]
pub fn preconditioned(
    a: &AttributionConfig,
    backend: &dyn Backend,
    p: &AttributionPlan,
    files: &[FactorFile],
    v: &[Tensor],
    tokens: Option<&[TokenFactors]>,
    layers: &[String],
    groups: &FactorGroups,
) -> Result<Vec<Vec<Tensor>>> {
    let points = p.score_points();
    if p.method == MethodKind::GradientDot {
        return Ok(vec![v.to_vec(); points.len()]);
    }
    let mut out: Vec<Vec<Tensor>> = vec![Vec::with_capacity(layers.len()); points.len()];
    // The clip projection's ⟨ĝ, v⟩ sums over every tracked layer, so it needs the walk over
    // all layers at once (one factor group).
    let clipped = p.method == MethodKind::Source && p.segments.iter().any(has_clip_directions);
    let project = clipped && groups.groups.len() == 1;
    if clipped && !project {
        tracing::warn!(
            "score: the clipped steps' directions ĝ are saved, but the clip projection needs \
             every layer's factors at once and the memory plan splits them into {} groups: \
             clipped steps are scaled by c only (raise attribution.memory_limit_gib to project)",
            groups.groups.len()
        );
    }
    for &(start, end) in &groups.groups {
        let names = &layers[start..end];
        let f: Vec<Vec<LayerFactors>> = files
            .iter()
            .map(|file| file.load_layers(names, &Device::Cpu))
            .collect::<Result<_>>()?;
        let tokens = tokens.map(|t| &t[start..end]);
        let clip = ClipDirections { project, names };
        let u = precondition_group(a, backend, p, &f, &v[start..end], tokens, start == 0, &clip)?;
        for (point, u_point) in out.iter_mut().zip(&points) {
            // Layer l of this group: Σ coefficient · u_{segment, group}[l].
            #[allow(clippy::needless_range_loop)]
            for l in 0..end - start {
                let mut acc: Option<Tensor> = None;
                for &(j, c) in &u_point.terms {
                    let t = (&u[u_point.segment][j][l] * c)?;
                    acc = Some(match acc {
                        None => t,
                        Some(a) => (a + t)?,
                    });
                }
                point.push(acc.ok_or_else(|| {
                    Error::Pipeline(format!(
                        "scoring at {} has no step group to contract with",
                        u_point.model.display()
                    ))
                })?);
            }
        }
    }
    Ok(out)
}

/// Whether the walk projects clipped one-step groups along their saved ĝ, and the layers it
/// runs on (all tracked layers when it does).
struct ClipDirections<'a> {
    project: bool,
    names: &'a [String],
}

/// u for every segment and each of its step groups, for one group of layers, given that
/// group's factors `f` per segment (`tokens`: `v` as token factors, if known). `first`: the
/// first group (which logs what holds for every group).
#[allow(clippy::too_many_arguments)]
fn precondition_group(
    a: &AttributionConfig,
    backend: &dyn Backend,
    p: &AttributionPlan,
    f: &[Vec<LayerFactors>],
    v: &[Tensor],
    tokens: Option<&[TokenFactors]>,
    first: bool,
    clip: &ClipDirections,
) -> Result<Vec<Vec<Vec<Tensor>>>> {
    // Every eigenbasis function application goes through the backend.
    let on: Vec<OnBackend> = f
        .iter()
        .map(|factors| OnBackend { factors, backend })
        .collect();
    let damping = match a.damping {
        Some(d) => Damping::Absolute(d),
        None => Damping::MeanLambda(a.damping_factor),
    };
    Ok(match p.method {
        MethodKind::GradientDot => vec![vec![v.to_vec()]],
        MethodKind::Influence => vec![vec![match tokens {
            Some(t) => on[0].inverse_factored(t, damping)?,
            None => on[0].inverse(v, damping)?,
        }]],
        MethodKind::Source => {
            // Segments trained with AdamW see H̄ through Adam's preconditioner.
            let adam: Vec<Option<AdamCurvature>> = f
                .iter()
                .zip(&p.segments)
                .enumerate()
                .map(|(i, (f, s))| -> Result<Option<AdamCurvature>> {
                    let Some(eps) = s.adam_eps else {
                        return Ok(None);
                    };
                    Ok(Some(AdamCurvature {
                        inner: &on[i] as &dyn Curvature,
                        p_bar: adam_p_bar(s, f, eps, a.adam_response, first)?,
                    }))
                })
                .collect::<Result<_>>()?;
            let shapes: Vec<(usize, usize)> = v
                .iter()
                .map(|t| {
                    let d = t.dims();
                    (d[d.len() - 2], d[d.len() - 1])
                })
                .collect();
            let mut segs: Vec<SegmentCurvature> = Vec::with_capacity(p.segments.len());
            for ((f, a), s) in on.iter().zip(&adam).zip(&p.segments) {
                let (groups, projected) = step_groups(s, clip.project, clip.names, &shapes)?;
                if first && projected > 0 {
                    tracing::info!(
                        "segment {} (`{}`): {projected} clipped step(s) projected along their \
                         batch gradient ĝ (the clip's derivative c (I − ĝ ĝᵀ))",
                        s.index,
                        s.stage
                    );
                }
                segs.push(SegmentCurvature {
                    factors: match a {
                        Some(a) => a as &dyn Curvature,
                        None => f as &dyn Curvature,
                    },
                    mass: s.mass,
                    groups,
                });
            }
            source_walk(v, &segs, damping)?
        }
    })
}

/// [`adam_p_bar`] of a segment trained with AdamW (its ε from the plan), None for any other
/// optimizer; quiet about falling back. What the fit and score diagnostics weigh σ with.
pub fn segment_p_bar(
    seg: &PlannedSegment,
    factors: &[LayerFactors],
    response: AdamResponse,
) -> Result<Option<Vec<Tensor>>> {
    seg.adam_eps
        .map(|eps| adam_p_bar(seg, factors, eps, response, false))
        .transpose()
}

/// p̄ = the segment's average of Adam's preconditioner over its checkpoints, per layer,
/// shaped like the layer's gradient [d_out, d_in(+1)] (the bias's entries as the last
/// column): of P = 1/(√v̂ + ε) (`fixed_v`), or of P_eff ([`adam_p_eff`], `full`) where the
/// checkpoints carry m̂ (`exp_avg.NAME`; otherwise P, with a log line). Only the given
/// layers' moments are read; `log`: say so when `full` falls back.
pub fn adam_p_bar(
    seg: &PlannedSegment,
    factors: &[LayerFactors],
    eps: f64,
    response: AdamResponse,
    log: bool,
) -> Result<Vec<Tensor>> {
    let mut sums: Vec<Option<Tensor>> = vec![None; factors.len()];
    let mut fell_back = false;
    for ckpt in &seg.checkpoints {
        let path = ckpt.join("optimizer.safetensors");
        if !path.exists() {
            return Err(Error::Pipeline(format!(
                "segment {} was trained with AdamW but {} is missing: the Adam variant needs \
                 the saved second moments (rerun the finetune stage)",
                seg.index,
                path.display()
            )));
        }
        // SAFETY: checkpoints are written atomically and only read afterwards.
        let map = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }?;
        let get = |k: &str| -> Result<Tensor> {
            map.load(k, &Device::Cpu).map_err(|_| {
                Error::Pipeline(format!("{}: tensor `{k}` is missing", path.display()))
            })
        };
        let has_m = factors
            .first()
            .is_some_and(|f| map.get(&format!("exp_avg.{}.weight", f.name)).is_ok());
        let use_m = response == AdamResponse::Full && has_m;
        fell_back |= response == AdamResponse::Full && !has_m;
        for (l, f) in factors.iter().enumerate() {
            let (d_out, d_total) = f.lambda.dims2()?;
            // One parameter's P or P_eff, [d_out, …] (stored [in, out] for GPT-2 Conv1D).
            let p_of = |param: &str| -> Result<Tensor> {
                let v = get(&format!("exp_avg_sq.{}.{param}", f.name))?;
                let m = use_m
                    .then(|| get(&format!("exp_avg.{}.{param}", f.name)))
                    .transpose()?;
                let p = adam_p_eff(&v, m.as_ref(), eps)?;
                Ok(if p.rank() == 2 && p.dims()[0] != d_out {
                    p.t()?.contiguous()?
                } else {
                    p
                })
            };
            let mut pl = p_of("weight")?;
            if d_total == pl.dim(1)? + 1 {
                pl = Tensor::cat(&[&pl, &p_of("bias")?.reshape((d_out, 1))?], 1)?;
            }
            sums[l] = Some(match sums[l].take() {
                None => pl,
                Some(s) => (s + pl)?,
            });
        }
    }
    if fell_back && log {
        tracing::info!(
            "segment {} (`{}`): its checkpoints carry no Adam first moment m̂ (`exp_avg.*`), \
             so `adam_response = \"full\"` falls back to v̂ held fixed (P = 1/(√v̂ + ε))",
            seg.index,
            seg.stage
        );
    }
    let c = seg.checkpoints.len().max(1) as f64;
    sums.into_iter()
        .map(|s| Ok((s.expect("one checkpoint at least") / c)?))
        .collect()
}

/// Each segment's u in the form the scoring pass contracts with: dense, or (with `rank`)
/// its truncated SVD per query and layer. Also the mean fraction of ‖u‖² the truncation kept.
pub fn query_forms(
    u: Vec<Vec<Tensor>>,
    rank: Option<usize>,
) -> Result<(Vec<Vec<LayerQuery>>, Option<f64>)> {
    let (mut kept, mut count) = (0f64, 0usize);
    let forms = u
        .into_iter()
        .map(|seg| {
            seg.into_iter()
                .map(|ul| {
                    let f = LayerQuery::new(ul, rank)?;
                    if let (LayerQuery::LowRank(l), Some(r)) = (&f, rank) {
                        for sv in &l.singular_values {
                            let all: f64 = sv.iter().map(|s| s * s).sum();
                            let top: f64 = sv.iter().take(r).map(|s| s * s).sum();
                            kept += if all > 0.0 { top / all } else { 1.0 };
                            count += 1;
                        }
                    }
                    Ok(f)
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((forms, (count > 0).then(|| kept / count as f64)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::linalg::test_support::{max_abs_diff, random_factors};
    use crate::train::checkpoint::write_safetensors;
    use crate::train::LrMass;

    fn segment(checkpoints: Vec<std::path::PathBuf>) -> PlannedSegment {
        PlannedSegment {
            index: 0,
            stage: "finetune".into(),
            role: "train".into(),
            n_docs: 4,
            mass: LrMass::Finite(1.0),
            checkpoints,
            adam_eps: Some(1e-8),
            groups: Vec::new(),
        }
    }

    fn bits(t: &[Tensor]) -> Vec<u32> {
        t.iter()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(f32::to_bits)
            .collect()
    }

    #[test]
    fn full_response_reduces_to_fixed_v_for_zero_or_missing_first_moments() {
        let f = vec![random_factors("l", (6, 5, 4, 3), None)];
        let dir = tempfile::tempdir().unwrap();
        let v = Tensor::rand(1e-9f32, 1e-2, (3, 4), &Device::Cpu).unwrap();
        let m = Tensor::rand(-1e-2f32, 1e-2, (3, 4), &Device::Cpu).unwrap();
        let write = |name: &str, tensors: Vec<(&str, &Tensor)>| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            let t: Vec<(String, Tensor)> = tensors
                .into_iter()
                .map(|(k, t)| (k.to_string(), t.clone()))
                .collect();
            write_safetensors(&d.join("optimizer.safetensors"), &t, HashMap::new()).unwrap();
            d
        };
        let zero = m.zeros_like().unwrap();
        let only_v = write("only-v", vec![("exp_avg_sq.l.weight", &v)]);
        let zero_m = write(
            "zero-m",
            vec![("exp_avg_sq.l.weight", &v), ("exp_avg.l.weight", &zero)],
        );
        let with_m = write(
            "with-m",
            vec![("exp_avg_sq.l.weight", &v), ("exp_avg.l.weight", &m)],
        );
        let p_bar =
            |ckpt: &std::path::Path, r| adam_p_bar(&segment(vec![ckpt.into()]), &f, 1e-8, r, true);
        let fixed = p_bar(&only_v, AdamResponse::FixedV).unwrap();
        for (what, ckpt) in [("m̂ = 0", &zero_m), ("m̂ missing", &only_v)] {
            let full = p_bar(ckpt, AdamResponse::Full).unwrap();
            assert_eq!(bits(&full), bits(&fixed), "{what}");
        }
        // fixed_v ignores m̂; full uses it (P_eff ≤ P, somewhere strictly).
        assert_eq!(
            bits(&p_bar(&with_m, AdamResponse::FixedV).unwrap()),
            bits(&fixed)
        );
        let full = p_bar(&with_m, AdamResponse::Full).unwrap();
        let want = adam_p_eff(&v, Some(&m), 1e-8).unwrap();
        assert_eq!(bits(&full), bits(&[want]));
        let gap: f32 = (&fixed[0] - &full[0])
            .unwrap()
            .min_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(gap >= 0.0);
        // The segment average is over its checkpoints.
        let two = adam_p_bar(
            &segment(vec![with_m.clone(), zero_m]),
            &f,
            1e-8,
            AdamResponse::Full,
            true,
        )
        .unwrap();
        let mean = ((&full[0] + &fixed[0]).unwrap() / 2.0).unwrap();
        let diff = max_abs_diff(&two[0], &mean);
        assert!(diff <= 1e-6 * fixed[0].max_all().unwrap().to_scalar::<f32>().unwrap());
    }
}
