//! Owns reading a clipped step's direction ĝ for the Source walk: `clip_direction`, `step_groups`.
//! Layer: attribution — may import ground, backend, model, train, curvature and, in this
//! folder, plan.rs, source.rs.
//!
//! A clipped step k updates with c_k g_k, whose derivative in g is c_k (I − ĝ_k ĝ_kᵀ),
//! ĝ_k = g_k / ‖g_k‖ (docs/design.md §2). The finetune stage saves ĝ_k of every clipped step
//! that is a one-step group (`train::checkpoint::CLIP_DIRECTION` in the checkpoint after it,
//! one tensor per parameter); this file reads the tracked layers' part of it, shaped like
//! their gradients [d_out, d_in(+1)] (a bias as the last column), and turns a segment's
//! planned groups into the walk's [`StepGroup`]s.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::train::checkpoint::CLIP_DIRECTION;

use super::plan::PlannedSegment;
use super::source::StepGroup;

/// ĝ of the step that produced the model in `folder`, for the layers `names` whose
/// gradients are `shapes` [d_out, d_in] (d_in counts the bias column): None when the folder
/// has no clip direction (the step was not clipped, is part of a longer group, or was
/// trained by a build that did not save it). The entries of ĝ outside the tracked layers are
/// left out: the query has none there (docs/design.md §2).
pub fn clip_direction(
    folder: &Path,
    names: &[String],
    shapes: &[(usize, usize)],
) -> Result<Option<Vec<Tensor>>> {
    let path = folder.join(CLIP_DIRECTION);
    if !path.is_file() {
        return Ok(None);
    }
    // SAFETY: checkpoints are written atomically and only read afterwards.
    let map = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }?;
    let get = |k: &str| -> Result<Tensor> {
        map.load(k, &Device::Cpu).map_err(|_| {
            Error::Pipeline(format!(
                "{}: tensor `{k}` is missing; delete the file to score the step with its clip \
                 factor only, or rerun the finetune stage",
                path.display()
            ))
        })
    };
    let mut out = Vec::with_capacity(names.len());
    for (name, &(d_out, d_total)) in names.iter().zip(shapes) {
        let mut w = get(&format!("{name}.weight"))?.to_dtype(candle_core::DType::F32)?;
        // GPT-2's Conv1D keeps its weight as [in, out].
        if w.rank() == 2 && w.dims()[0] != d_out {
            w = w.t()?.contiguous()?;
        }
        if w.dim(1)? + 1 == d_total {
            let b = get(&format!("{name}.bias"))?.to_dtype(candle_core::DType::F32)?;
            w = Tensor::cat(&[&w, &b.reshape((d_out, 1))?], 1)?;
        }
        if w.dims() != [d_out, d_total] {
            return Err(Error::Pipeline(format!(
                "{}: the direction of layer `{name}` is {:?}, its gradient [{d_out}, {d_total}]",
                path.display(),
                w.dims()
            )));
        }
        out.push(w);
    }
    Ok(Some(out))
}

/// The walk's step groups of a planned segment. With `project`, a one-step group whose
/// model after it carries a clip direction gets ĝ for the layers `names` (gradients shaped
/// `shapes`); otherwise (or with `project` false) its clipping is the scale c alone. Also
/// how many groups got a direction.
pub fn step_groups(
    seg: &PlannedSegment,
    project: bool,
    names: &[String],
    shapes: &[(usize, usize)],
) -> Result<(Vec<StepGroup>, usize)> {
    let mut projected = 0;
    let groups = seg
        .groups
        .iter()
        .map(|g| {
            let dir = match (project, g.steps, &g.to) {
                (true, 1, Some(to)) => clip_direction(to, names, shapes)?,
                _ => None,
            };
            projected += usize::from(dir.is_some());
            Ok(StepGroup {
                mass: g.mass,
                weight: g.weight,
                steps: g.steps,
                clip_direction: dir,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((groups, projected))
}

/// Whether any one-step group of `seg` has a saved clip direction.
pub fn has_clip_directions(seg: &PlannedSegment) -> bool {
    seg.groups.iter().any(|g| {
        g.steps == 1
            && g.to
                .as_ref()
                .is_some_and(|to| to.join(CLIP_DIRECTION).is_file())
    })
}
