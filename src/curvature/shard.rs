//! Owns a sharded fit's partial sums: a shard's covariance sums and their merge into the
//! eigenbases, a shard's Λ sums and their merge into the factors (docs/design.md §11).
//! Layer: curvature — may import every floor from the ground up to passes and, in this folder,
//! fit.rs and spill.rs.
//!
//! The fit's two passes are sums over the batches of the segment's plan at each checkpoint
//! (docs/design.md §3.1, §3.3): A = Σ_t a aᵀ, S = Σ_t δ δᵀ with their token count, and
//! Σ_m (Q_Sᵀ G_m Q_A)² with its document count. A shard `i/n` adds the batches k ≡ i − 1
//! (mod n) of the same plan ([`crate::passes::shard_batches`]), so each batch is the same
//! batch as in the unsharded pass; its sums are kept unnormalised (f32, as the pass
//! accumulates them) with their counts. The merge adds the shards' sums in f64, in shard
//! order, and only then normalises: the result differs from the unsharded fit's by the f32
//! rounding of the summation order alone (relative ~ batches · 2⁻²⁴).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::config::EigenPrecision;
use crate::data::PreparedDoc;
use crate::error::{Error, Result};
use crate::linalg::{
    BlockDiag, BlockLayout, Covariances, EigenBasis, FactorSum, LambdaSums, LayerFactors,
};
use crate::model::Model;
use crate::passes::PassOptions;
use crate::util::shard::Shard;

use super::fit::{
    accumulate_covariances, accumulate_lambda, bases_from_sums, input_factor_of, FitSums,
};
use super::spill::Spills;

/// One tracked layer's shape: the input width with its bias column, and d_out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    /// Module name.
    pub name: String,
    /// d_in (+ 1 with a bias).
    pub d_in: usize,
    /// d_out.
    pub d_out: usize,
}

/// What a segment's covariance sums hold: the layers, how they share inputs, the block
/// size, and what was added (over every checkpoint of the segment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SumsInfo {
    /// The tracked layers, in order (empty: this shard owned no batch).
    pub layers: Vec<LayerShape>,
    /// For each layer, the first layer reading the same input (q/k/v, gate/up).
    pub groups: Vec<usize>,
    /// `[attribution] block_size`.
    pub block_size: Option<usize>,
    /// Real tokens added.
    pub tokens: u64,
    /// Documents added.
    pub documents: u64,
    /// Batches added.
    pub batches: u64,
}

/// A segment's unnormalised covariance sums, from one shard or merged.
pub struct PartialCovariances {
    /// What they hold.
    pub info: SumsInfo,
    a: Vec<FactorSum>,
    s: Vec<FactorSum>,
}

/// The covariance pass of shard `shard` over `docs` at every checkpoint (in order): the
/// sums of the batches it owns, unnormalised. `what` names the segment in errors.
pub fn covariance_shard(
    backend: &dyn Backend,
    checkpoints: &[&Model],
    docs: &[PreparedDoc],
    opts: &PassOptions,
    what: &str,
    shard: Shard,
) -> Result<PartialCovariances> {
    let first = checkpoints
        .first()
        .ok_or_else(|| Error::Numeric(format!("{what}: no checkpoint to fit")))?;
    let mut sums: Option<FitSums> = None;
    // The captures are not kept: the Λ pass runs in another process, after the merge.
    let mut spills = Spills::new(None, false);
    for (c, m) in checkpoints.iter().enumerate() {
        let label = format!("{what} checkpoint {c}");
        accumulate_covariances(
            backend,
            m,
            (docs, Some(shard)),
            opts,
            &mut sums,
            &label,
            &mut spills,
        )?;
    }
    let Some(sums) = sums else {
        return Ok(PartialCovariances {
            info: SumsInfo {
                layers: Vec::new(),
                groups: Vec::new(),
                block_size: opts.block_size,
                tokens: 0,
                documents: 0,
                batches: 0,
            },
            a: Vec::new(),
            s: Vec::new(),
        });
    };
    let layers = first
        .tracked_layers()
        .iter()
        .map(|l| LayerShape {
            name: l.name.clone(),
            d_in: l.d_in + l.has_bias as usize,
            d_out: l.d_out,
        })
        .collect();
    Ok(PartialCovariances {
        info: SumsInfo {
            layers,
            groups: sums.groups,
            block_size: opts.block_size,
            tokens: sums.tokens,
            documents: sums.documents,
            batches: sums.batches,
        },
        a: sums.a,
        s: sums.s,
    })
}

/// Reads `name` from `map` as f32 values, checking its element count.
fn f32_values(map: &HashMap<String, Tensor>, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = map
        .get(name)
        .ok_or_else(|| Error::Numeric(format!("partial sums: tensor `{name}` is missing")))?;
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if v.len() != len {
        return Err(Error::Numeric(format!(
            "partial sums: tensor `{name}` holds {} values, {len} expected",
            v.len()
        )));
    }
    Ok(v)
}

/// Reads `name` from `map` as f64 values.
fn f64_values(map: &HashMap<String, Tensor>, name: &str) -> Result<Vec<f64>> {
    let t = map
        .get(name)
        .ok_or_else(|| Error::Numeric(format!("partial sums: tensor `{name}` is missing")))?;
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

impl PartialCovariances {
    /// The sums as tensors named `PREFIX.a.J.B` (distinct input J, block B) and
    /// `PREFIX.s.L.B` (layer L), f32 [n_B, n_B] (lower triangles valid).
    pub fn tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor, DType)>> {
        let mut out = Vec::new();
        for (side, sums) in [("a", &self.a), ("s", &self.s)] {
            for (j, sum) in sums.iter().enumerate() {
                for (b, (block, (_, n))) in sum.blocks().iter().zip(&sum.layout.ranges).enumerate()
                {
                    let t = Tensor::from_vec(block.clone(), (*n, *n), &Device::Cpu)?;
                    out.push((format!("{prefix}.{side}.{j}.{b}"), t, DType::F32));
                }
            }
        }
        Ok(out)
    }

    /// The sums [`tensors`](Self::tensors) wrote, read back from `map` as `info` describes.
    pub fn from_tensors(
        info: SumsInfo,
        map: &HashMap<String, Tensor>,
        prefix: &str,
    ) -> Result<PartialCovariances> {
        let read = |side: &str, j: usize, dim: usize| -> Result<FactorSum> {
            let layout = BlockLayout::new(dim, info.block_size);
            let blocks = (layout.ranges.iter().enumerate())
                .map(|(b, (_, n))| f32_values(map, &format!("{prefix}.{side}.{j}.{b}"), n * n))
                .collect::<Result<Vec<_>>>()?;
            FactorSum::from_blocks(layout, blocks)
        };
        let a = (info.layers.iter().enumerate())
            .filter(|(l, _)| info.groups.get(*l) == Some(l))
            .enumerate()
            .map(|(j, (_, shape))| read("a", j, shape.d_in))
            .collect::<Result<Vec<_>>>()?;
        let s = (info.layers.iter().enumerate())
            .map(|(l, shape)| read("s", l, shape.d_out))
            .collect::<Result<Vec<_>>>()?;
        Ok(PartialCovariances { info, a, s })
    }

    /// The sum of `parts` (shards of one segment, added in the order given, in f64, rounded
    /// to f32 once), with their counts added. Shards that owned no batch add nothing.
    /// Errors when two shards tracked different layers or blocks.
    pub fn merge(parts: Vec<PartialCovariances>, what: &str) -> Result<PartialCovariances> {
        let mut parts: Vec<PartialCovariances> =
            parts.into_iter().filter(|p| p.info.batches > 0).collect();
        if parts.is_empty() {
            return Err(Error::Numeric(format!(
                "{what}: no shard added any document"
            )));
        }
        let first = parts.remove(0);
        let shape = |i: &SumsInfo| (i.layers.clone(), i.groups.clone(), i.block_size);
        if let Some(p) = parts.iter().find(|p| shape(&p.info) != shape(&first.info)) {
            return Err(Error::Numeric(format!(
                "{what}: two shards tracked different layers or blocks ({} and {} layers); \
                 they were made with different configs or models: rerun every shard",
                first.info.layers.len(),
                p.info.layers.len()
            )));
        }
        let add =
            |pick: &dyn Fn(&PartialCovariances) -> &Vec<FactorSum>| -> Result<Vec<FactorSum>> {
                (pick(&first).iter().enumerate())
                    .map(|(j, sum)| {
                        let blocks = (sum.blocks().iter().enumerate())
                            .map(|(b, block)| {
                                let mut acc: Vec<f64> = block.iter().map(|&x| x as f64).collect();
                                for p in &parts {
                                    for (t, &x) in acc.iter_mut().zip(&pick(p)[j].blocks()[b]) {
                                        *t += x as f64;
                                    }
                                }
                                acc.into_iter().map(|x| x as f32).collect()
                            })
                            .collect();
                        FactorSum::from_blocks(sum.layout.clone(), blocks)
                    })
                    .collect()
            };
        let a = add(&|p| &p.a)?;
        let s = add(&|p| &p.s)?;
        let mut info = first.info.clone();
        for p in &parts {
            info.tokens += p.info.tokens;
            info.documents += p.info.documents;
            info.batches += p.info.batches;
        }
        Ok(PartialCovariances { info, a, s })
    }

    /// The eigenbasis of every layer from these (merged) sums, normalised by their token
    /// count as the unsharded fit does (docs/design.md §3.2).
    pub fn bases(
        self,
        backend: &dyn Backend,
        what: &str,
        precision: EigenPrecision,
    ) -> Result<Vec<EigenBasis>> {
        let names: Vec<String> = self.info.layers.iter().map(|l| l.name.clone()).collect();
        let mut sums = FitSums {
            a_of: input_factor_of(&self.info.groups),
            groups: self.info.groups,
            a: self.a,
            s: self.s,
            tokens: self.info.tokens,
            documents: self.info.documents,
            batches: self.info.batches,
        };
        let (bases, _) = bases_from_sums(backend, &mut sums, &names, what, false, precision)?;
        backend.release();
        Ok(bases)
    }
}

/// Every layer's eigenbasis as tensors `PREFIX.L.q_a.B`, `PREFIX.L.q_s.B` (f32) and
/// `PREFIX.L.eig_a`, `PREFIX.L.eig_s` (f64), L the layer's index.
pub fn basis_tensors(bases: &[EigenBasis], prefix: &str) -> Result<Vec<(String, Tensor, DType)>> {
    let mut out = Vec::new();
    for (l, b) in bases.iter().enumerate() {
        for (k, q) in b.q_a.blocks.iter().enumerate() {
            out.push((format!("{prefix}.{l}.q_a.{k}"), q.clone(), DType::F32));
        }
        for (k, q) in b.q_s.blocks.iter().enumerate() {
            out.push((format!("{prefix}.{l}.q_s.{k}"), q.clone(), DType::F32));
        }
        for (side, v) in [("eig_a", &b.eig_a), ("eig_s", &b.eig_s)] {
            let t = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?;
            out.push((format!("{prefix}.{l}.{side}"), t, DType::F64));
        }
    }
    Ok(out)
}

/// The eigenbases [`basis_tensors`] wrote, for the layers of `info`.
pub fn bases_from_tensors(
    info: &SumsInfo,
    map: &HashMap<String, Tensor>,
    prefix: &str,
) -> Result<Vec<EigenBasis>> {
    let side = |l: usize, name: &str, dim: usize| -> Result<BlockDiag> {
        let layout = BlockLayout::new(dim, info.block_size);
        let blocks = (layout.ranges.iter().enumerate())
            .map(|(k, (_, n))| {
                let v = f32_values(map, &format!("{prefix}.{l}.{name}.{k}"), n * n)?;
                Ok(Tensor::from_vec(v, (*n, *n), &Device::Cpu)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BlockDiag { layout, blocks })
    };
    (info.layers.iter().enumerate())
        .map(|(l, shape)| {
            Ok(EigenBasis {
                q_a: side(l, "q_a", shape.d_in)?,
                q_s: side(l, "q_s", shape.d_out)?,
                eig_a: f64_values(map, &format!("{prefix}.{l}.eig_a"))?,
                eig_s: f64_values(map, &format!("{prefix}.{l}.eig_s"))?,
            })
        })
        .collect()
}

/// A segment's unnormalised Λ sums Σ_m (Q_Sᵀ G_m Q_A)² per layer, from one shard.
pub struct PartialLambda {
    /// Documents added (over every checkpoint).
    pub documents: u64,
    /// Batches added (over every checkpoint).
    pub batches: u64,
    sums: Vec<Vec<f32>>,
}

/// The eigenvalue-correction pass of shard `shard` over `docs` at every checkpoint, in the
/// merged `bases` of the layers `info` describes.
pub fn lambda_shard(
    backend: &dyn Backend,
    checkpoints: &[&Model],
    docs: &[PreparedDoc],
    opts: &PassOptions,
    (bases, info): (&[EigenBasis], &SumsInfo),
    shard: Shard,
) -> Result<PartialLambda> {
    let mut lambda: Vec<LambdaSums> = (info.layers.iter())
        .map(|l| LambdaSums::new(l.d_out, l.d_in, &Device::Cpu))
        .collect::<Result<_>>()?;
    let mut batches = 0;
    for m in checkpoints {
        let fitted = (bases, &info.groups[..]);
        batches += accumulate_lambda(backend, m, (docs, Some(shard)), opts, fitted, &mut lambda)?;
    }
    backend.release();
    Ok(PartialLambda {
        documents: lambda.first().map_or(0, |l| l.docs),
        batches,
        sums: lambda.iter().map(|l| l.sums().to_vec()).collect(),
    })
}

impl PartialLambda {
    /// The sums as tensors `PREFIX.L.lambda`, f32 [d_out, d_in].
    pub fn tensors(&self, info: &SumsInfo, prefix: &str) -> Result<Vec<(String, Tensor, DType)>> {
        (self.sums.iter().zip(&info.layers).enumerate())
            .map(|(l, (v, shape))| {
                let t = Tensor::from_vec(v.clone(), (shape.d_out, shape.d_in), &Device::Cpu)?;
                Ok((format!("{prefix}.{l}.lambda"), t, DType::F32))
            })
            .collect()
    }

    /// The sums [`tensors`](Self::tensors) wrote, with their counts.
    pub fn from_tensors(
        info: &SumsInfo,
        map: &HashMap<String, Tensor>,
        prefix: &str,
        (documents, batches): (u64, u64),
    ) -> Result<PartialLambda> {
        let sums = (info.layers.iter().enumerate())
            .map(|(l, s)| f32_values(map, &format!("{prefix}.{l}.lambda"), s.d_out * s.d_in))
            .collect::<Result<_>>()?;
        Ok(PartialLambda {
            documents,
            batches,
            sums,
        })
    }
}

/// The factors of a segment: its merged `bases` and Λ = Σ_shards sums / Σ_shards documents
/// (added in f64 in the order given; docs/design.md §3.3), for the layers of `info`.
pub fn factors_from_shards(
    info: &SumsInfo,
    bases: Vec<EigenBasis>,
    parts: &[PartialLambda],
    what: &str,
) -> Result<Vec<LayerFactors>> {
    let documents: u64 = parts.iter().map(|p| p.documents).sum();
    if documents == 0 {
        return Err(Error::Numeric(format!(
            "{what}: the eigenvalue correction saw no documents"
        )));
    }
    let n = documents as f64;
    (info.layers.iter().zip(bases).enumerate())
        .map(|(l, (shape, basis))| {
            let mut acc = vec![0f64; shape.d_out * shape.d_in];
            for p in parts {
                for (t, &x) in acc.iter_mut().zip(&p.sums[l]) {
                    *t += x as f64;
                }
            }
            let lambda: Vec<f64> = acc.into_iter().map(|x| x / n).collect();
            Ok(LayerFactors {
                name: shape.name.clone(),
                covariances: Covariances {
                    a_layout: basis.q_a.layout.clone(),
                    s_layout: basis.q_s.layout.clone(),
                    a: Vec::new(),
                    s: Vec::new(),
                },
                basis,
                lambda: Tensor::from_vec(lambda, (shape.d_out, shape.d_in), &Device::Cpu)?,
            })
        })
        .collect()
}
