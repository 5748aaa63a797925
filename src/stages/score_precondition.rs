//! The preconditioned queries u_ℓ of the `score` stage (DESIGN.md §2): the Source walk (or
//! the influence function's inverse) applied to the query gradients, one layer group at a
//! time so that only that group's factors are in memory (issue 5 §5), with Source's Adam
//! variant for segments trained with AdamW.

use candle_core::{Device, Tensor};

use crate::attribution::{source_walk, AdamCurvature, Curvature, Damping, SegmentCurvature};
use crate::backend::{Backend, OnBackend};
use crate::config::MethodKind;
use crate::curvature::{FactorFile, LayerFactors};
use crate::error::{Error, Result};
use crate::pipeline::StageContext;

use super::attribute::{AttributionPlan, FactorGroups, PlannedSegment};

/// u_ℓ for every planned segment, computed one layer group at a time: for each group, only
/// that group's factors of every segment are read (memory-mapped), the walk runs on the
/// group's layers (it is block-diagonal per layer) and the factors are dropped.
pub(super) fn preconditioned(
    ctx: &StageContext,
    backend: &dyn Backend,
    p: &AttributionPlan,
    files: &[FactorFile],
    v: &[Tensor],
    layers: &[String],
    groups: &FactorGroups,
) -> Result<Vec<Vec<Tensor>>> {
    if p.method == MethodKind::GradientDot {
        return Ok(vec![v.to_vec()]);
    }
    let mut out: Vec<Vec<Tensor>> = vec![Vec::with_capacity(layers.len()); p.segments.len()];
    for &(start, end) in &groups.groups {
        let names = &layers[start..end];
        let f: Vec<Vec<LayerFactors>> = files
            .iter()
            .map(|file| file.load_layers(names, &Device::Cpu))
            .collect::<Result<_>>()?;
        let u = precondition_group(ctx, backend, p, &f, &v[start..end])?;
        for (seg, u_seg) in out.iter_mut().zip(u) {
            seg.extend(u_seg);
        }
    }
    Ok(out)
}

/// u_ℓ for every segment for one group of layers, given that group's factors `f` per segment.
fn precondition_group(
    ctx: &StageContext,
    backend: &dyn Backend,
    p: &AttributionPlan,
    f: &[Vec<LayerFactors>],
    v: &[Tensor],
) -> Result<Vec<Vec<Tensor>>> {
    // Every eigenbasis function application goes through the backend.
    let on: Vec<OnBackend> = f
        .iter()
        .map(|factors| OnBackend { factors, backend })
        .collect();
    let a = &ctx.config.attribution;
    let damping = match a.damping {
        Some(d) => Damping::Absolute(d),
        None => Damping::MeanLambda(a.damping_factor),
    };
    Ok(match p.method {
        MethodKind::GradientDot => vec![v.to_vec()],
        MethodKind::Influence => vec![on[0].inverse(v, damping)?],
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
                        p_bar: adam_p_bar(s, f, eps)?,
                    }))
                })
                .collect::<Result<_>>()?;
            let segs: Vec<SegmentCurvature> = on
                .iter()
                .zip(&adam)
                .zip(&p.segments)
                .map(|((f, a), s)| SegmentCurvature {
                    factors: match a {
                        Some(a) => a as &dyn Curvature,
                        None => f as &dyn Curvature,
                    },
                    mass: s.mass,
                })
                .collect();
            source_walk(v, &segs, damping)?
        }
    })
}

/// p̄ = the segment's average of 1/(√v̂ + ε) over its checkpoints, per layer, shaped like the
/// layer's gradient [d_out, d_in(+1)] (the bias's entries as the last column). Only the
/// given layers' moments are read.
fn adam_p_bar(seg: &PlannedSegment, factors: &[LayerFactors], eps: f64) -> Result<Vec<Tensor>> {
    let mut sums: Vec<Option<Tensor>> = vec![None; factors.len()];
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
        for (l, f) in factors.iter().enumerate() {
            let (d_out, d_total) = f.lambda.dims2()?;
            let mut w = get(&format!("exp_avg_sq.{}.weight", f.name))?;
            if w.dims()[0] != d_out {
                w = w.t()?.contiguous()?; // stored [in, out] (GPT-2 Conv1D)
            }
            let recip = |t: &Tensor| -> Result<Tensor> { Ok((t.sqrt()? + eps)?.recip()?) };
            let mut pl = recip(&w)?;
            if d_total == w.dim(1)? + 1 {
                let b = get(&format!("exp_avg_sq.{}.bias", f.name))?.reshape((d_out, 1))?;
                pl = Tensor::cat(&[&pl, &recip(&b)?], 1)?;
            }
            sums[l] = Some(match sums[l].take() {
                None => pl,
                Some(s) => (s + pl)?,
            });
        }
    }
    let c = seg.checkpoints.len().max(1) as f64;
    sums.into_iter()
        .map(|s| Ok((s.expect("one checkpoint at least") / c)?))
        .collect()
}
