//! Owns the candidate index: sketched document gradients on disk (`IndexHeader`, `write_point`)
//! and the search that picks each query's candidates (`add_sketched_scores`, `select`).
//! Layer: attribution — may import every floor from the ground up to curvature; no sibling.
//!
//! For a corpus far larger than the query set, `score` need not run the model over every
//! document for every new query set. The `index` stage sketches each document m's gradient at
//! every scoring model x_p once: row_p(m) = ŝ(W ⊙ Q_Sᵀ G(m; x_p) Q_A), the count sketch
//! ([`GradientSketch`]) in D buckets of all its tracked layers' gradients, rotated into the
//! segment's EK-FAC eigenbasis and whitened by W ([`Whitening`]). A query set's
//! preconditioned u_p is sketched as û_p = ŝ(W⁻¹ ⊙ Q_Sᵀ U_p Q_A), so that ⟨û_p, row_p⟩
//! estimates Σ_ℓ ⟨u_p,ℓ, G_ℓ(m; x_p)⟩ without bias (the rotation is orthogonal and W cancels).
//! The whitening changes only the estimate's noise, ≈ ‖W⁻¹ rot(u)‖‖W rot(g)‖/√D: a
//! preconditioned query lives in the directions of small curvature, where raw document
//! gradients have little mass, so raw gradients are nearly orthogonal to it (on the demo
//! |⟨u, g⟩| ≈ 0.002‖u‖‖g‖, below a 4096-bucket sketch's noise); in the whitened coordinates
//! both sides carry their mass in the same directions. The gradient dot product has no
//! curvature and sketches the raw gradients. ŝ(q, m) = Σ_p ⟨û_p(q), row_p(m)⟩; the documents
//! at either end of each query's ŝ ranking are then scored exactly.
//!
//! A point's file is N rows of D little-endian f32 in document order, no header; index.json
//! holds the layout, the seed and each file's SHA-256, checked while the file is read.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::PreparedDoc;
use crate::error::{Error, IoContext, Result};
use crate::linalg::sketch::GradientSketch;
use crate::linalg::{EigenBasis, LayerQuery, TokenFactors};
use crate::model::{Labels, Model};
use crate::passes::{for_each_batch, PassOptions};

/// The format written into index.json.
pub const INDEX_FORMAT: u32 = 1;

/// One tracked layer: its name and gradient shape (d_in counts the bias column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SketchLayer {
    pub name: String,
    pub d_out: usize,
    pub d_in: usize,
}

/// One scoring model's sketches: which segment and model, the data role whose documents are
/// the rows, and the file with its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPoint {
    /// Position of the segment in the attribution plan.
    pub segment: usize,
    /// The model's folder, as the plan names it.
    pub model: String,
    /// The data role (`train`, `pretrain`, …) of the rows.
    pub role: String,
    /// N, the rows.
    pub documents: usize,
    /// The file, relative to the index folder.
    pub file: String,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// The whitening W per layer (`w.LAYER`, safetensors) and its SHA-256; None for raw
    /// gradients (the gradient dot product).
    pub whitening: Option<(String, String)>,
}

/// `index/index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexHeader {
    pub format: u32,
    /// The seed of the signs.
    pub seed: u64,
    /// D, the numbers per row: `exact` coordinates kept as they are, then D − `exact`
    /// count-sketch buckets.
    pub dims: usize,
    /// R, the exact coordinates of a row (0 for raw gradients).
    pub exact: usize,
    /// The outputs hash of the `fit` stage whose factors whitened the rows (None: the
    /// gradient dot product, raw gradients).
    pub fit_outputs: Option<String>,
    pub layers: Vec<SketchLayer>,
    pub points: Vec<IndexPoint>,
}

/// `model`'s tracked layers as the sketch sees them.
pub fn sketch_layers(model: &Model) -> Vec<SketchLayer> {
    model
        .tracked_layers()
        .iter()
        .map(|l| SketchLayer {
            name: l.name.clone(),
            d_out: l.d_out,
            d_in: l.d_in + l.has_bias as usize,
        })
        .collect()
}

/// The sketches of `layers` into `dims` buckets, drawn from `seed`.
pub fn sketches(layers: &[SketchLayer], seed: u64, dims: usize) -> Result<Vec<GradientSketch>> {
    layers
        .iter()
        .map(|l| GradientSketch::new(seed, &l.name, l.d_out, l.d_in, dims))
        .collect()
}

/// A layer's coordinates for the sketch: its EK-FAC eigenbasis and the whitening W.
///
/// Any W leaves ⟨û, row⟩ unbiased; W decides the noise ‖W⁻¹ rot(u)‖‖W rot(g)‖/√D. With
/// c = E[rot(u)²] the preconditioned queries' energy per eigenbasis coordinate and
/// Λ = E[rot(g)²] the documents', the diagonal W minimising E‖W⁻¹ rot(u)‖² E‖W rot(g)‖²
/// (Cauchy–Schwarz) is W² ∝ √(c / Λ). For the influence function, u = (Λ + λ)⁻¹ rot(g_q) and
/// W² = 1/(Λ + λ); for Source the walk mixes segments' bases, so c is measured
/// ([`Whitening::from_energies`]) on training documents taken as queries.
///
/// The coordinates of largest expected product √(c Λ) over all layers are kept exactly in the
/// row (`exact`, half of D by default): the sketch's noise then comes only from the rest,
/// ‖rest of W⁻¹ rot(u)‖‖rest of W rot(g)‖/√(D − R), which on a concentrated spectrum is a
/// small part of the whole.
#[derive(Debug, Clone)]
pub struct Whitening {
    basis: EigenBasis,
    /// W: [d_out, d_in] (f32).
    w: Tensor,
    /// Flat indices (row-major in [d_out, d_in]) of the coordinates kept exactly, ascending.
    exact: Vec<u32>,
    /// Where this layer's exact coordinates start in a row.
    offset: usize,
}

impl Whitening {
    /// W² = √(c / Λ) from the queries' energy `c` and the documents' `lambda` per eigenbasis
    /// coordinate ([d_out, d_in] each), each floored at 10⁻⁶ of its mean so that W and W⁻¹
    /// stay finite.
    pub fn from_energies(basis: EigenBasis, lambda: &Tensor, c: &Tensor) -> Result<Whitening> {
        let floored = |t: &Tensor| -> Result<Tensor> {
            let t = t.to_dtype(DType::F64)?;
            let mean: f64 = t.mean_all()?.to_scalar()?;
            Ok(t.maximum((1e-6 * mean).max(1e-30))?)
        };
        let w = (floored(c)? / floored(lambda)?)?
            .sqrt()?
            .sqrt()?
            .to_dtype(DType::F32)?;
        Whitening::new(basis, w)
    }

    /// The whitening W [d_out, d_in] in `basis`.
    pub fn new(basis: EigenBasis, w: Tensor) -> Result<Whitening> {
        let want = (basis.q_s.layout.dim, basis.q_a.layout.dim);
        if w.dims2()? != want {
            return Err(Error::Numeric(format!(
                "whitening of shape {:?} for an eigenbasis of [{}, {}]",
                w.dims(),
                want.0,
                want.1
            )));
        }
        Ok(Whitening {
            basis,
            w,
            exact: Vec::new(),
            offset: 0,
        })
    }

    /// The coordinates kept exactly (flat indices, ascending).
    pub fn exact(&self) -> &[u32] {
        &self.exact
    }

    /// Keeps the coordinates `exact` (flat indices, any order) exactly, at `offset` in a row.
    pub fn with_exact(mut self, mut exact: Vec<u32>, offset: usize) -> Result<Whitening> {
        exact.sort_unstable();
        exact.dedup();
        let n = self.w.elem_count();
        if exact.last().is_some_and(|&i| i as usize >= n) {
            return Err(Error::Numeric(format!(
                "exact coordinate {} outside a layer of {n}",
                exact[exact.len() - 1]
            )));
        }
        self.exact = exact;
        self.offset = offset;
        Ok(self)
    }

    /// W: [d_out, d_in].
    pub fn weights(&self) -> &Tensor {
        &self.w
    }

    /// W ⊙ Q_Sᵀ G_b Q_A for the documents of a batch ([B, d_out, d_in]), from their tokens'
    /// a [B, T, d_in] and δ [B, T, d_out] (rotating the token rows when that is cheaper).
    fn documents(&self, a: &Tensor, delta: &Tensor) -> Result<Tensor> {
        let tf = TokenFactors::new(delta.to_dtype(DType::F32)?, a.to_dtype(DType::F32)?)?;
        let rotated = if tf.rotation_is_cheaper()? {
            tf.rotate(&self.basis)?
        } else {
            self.basis.rotate(&tf.dense()?)?
        };
        Ok(rotated.broadcast_mul(&self.w)?)
    }

    /// W⁻¹ ⊙ Q_Sᵀ U Q_A for queries U [Q, d_out, d_in].
    fn queries(&self, u: &Tensor) -> Result<Tensor> {
        Ok(self
            .basis
            .rotate(&u.to_dtype(DType::F32)?)?
            .broadcast_div(&self.w)?)
    }
}

/// Marks the `r` coordinates of largest `energy` (per layer [d_out, d_in], e.g. √(c Λ)) over
/// all layers as exact, giving each layer its place in a row (layer order).
pub fn choose_exact(
    whitenings: Vec<Whitening>,
    energy: &[Tensor],
    r: usize,
) -> Result<Vec<Whitening>> {
    let per: Vec<Vec<f32>> = energy
        .iter()
        .map(|e| Ok(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
        .collect::<Result<_>>()?;
    let mut all: Vec<f32> = per.iter().flatten().copied().collect();
    let r = r.min(all.len());
    // The r-th largest value; coordinates above it are taken, then ties in layer order.
    let threshold = if r == 0 {
        f32::INFINITY
    } else {
        let (_, t, _) = all.select_nth_unstable_by(r - 1, |a, b| b.total_cmp(a));
        *t
    };
    drop(all);
    let mut above: usize = per
        .iter()
        .map(|e| e.iter().filter(|&&x| x > threshold).count())
        .sum();
    let mut offset = 0;
    let mut out = Vec::with_capacity(whitenings.len());
    for (wh, e) in whitenings.into_iter().zip(&per) {
        let mut idx: Vec<u32> = Vec::new();
        for (i, &x) in e.iter().enumerate() {
            if x > threshold || (x == threshold && above < r) {
                if x == threshold {
                    above += 1;
                }
                idx.push(i as u32);
            }
        }
        let n = idx.len();
        out.push(wh.with_exact(idx, offset)?);
        offset += n;
    }
    Ok(out)
}

/// R, the exact coordinates of a row.
fn exact_total(whiten: Option<&[Whitening]>) -> usize {
    whiten.map_or(0, |w| w.iter().map(|x| x.exact.len()).sum())
}

/// Adds K gradients `g` ([K, d_out, d_in]) into `rows`, one per gradient: the exact
/// coordinates of `wh` at their place, the rest count-sketched after the `r` exact ones.
fn add_all(
    s: &GradientSketch,
    wh: Option<&Whitening>,
    g: &Tensor,
    rows: &mut [Vec<f32>],
    r: usize,
) -> Result<()> {
    let flat: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let per = s.d_out() * s.d_in();
    let exact = wh.map_or(&[][..], |w| &w.exact[..]);
    let offset = wh.map_or(0, |w| w.offset);
    let mut rest = vec![0f32; if exact.is_empty() { 0 } else { per }];
    for (row, gk) in rows.iter_mut().zip(flat.chunks_exact(per)) {
        if exact.is_empty() {
            s.add(gk, &mut row[r..]);
            continue;
        }
        rest.copy_from_slice(gk);
        for (k, &i) in exact.iter().enumerate() {
            row[offset + k] = gk[i as usize];
            rest[i as usize] = 0.0;
        }
        s.add(&rest, &mut row[r..]);
    }
    Ok(())
}

/// Sketches every document of `docs` at `model` (whitened per layer by `whiten` when given)
/// and writes the rows, in document order, to `path` (N × D f32); returns the file's hex
/// SHA-256.
pub fn write_point(
    model: &Model,
    docs: &[PreparedDoc],
    sketches: &[GradientSketch],
    whiten: Option<&[Whitening]>,
    opts: &PassOptions,
    path: &Path,
) -> Result<String> {
    let r = exact_total(whiten);
    let d = r + sketches.first().map_or(0, |s| s.buckets);
    let row_bytes = (d * 4) as u64;
    let mut file = std::fs::File::create(path).ctx("creating", path)?;
    file.set_len(row_bytes * docs.len() as u64)
        .ctx("sizing", path)?;
    for_each_batch(model, docs, opts, "index", |batch, idx| {
        let cap = model.capture(batch, Labels::Data)?;
        let mut rows = vec![vec![0f32; d]; idx.len()];
        for (l, (layer, s)) in cap.layers.iter().zip(sketches).enumerate() {
            // G_b = Σ_t δ_t a_tᵀ: [B, d_out, d_in] (a and δ are zero on padding).
            let g = match whiten {
                Some(w) => w[l].documents(&layer.a, &layer.delta)?,
                None => layer
                    .delta
                    .transpose(1, 2)?
                    .contiguous()?
                    .matmul(&layer.a.contiguous()?)?,
            };
            add_all(s, whiten.map(|w| &w[l]), &g, &mut rows, r)?;
        }
        for (row, &i) in rows.iter().zip(idx) {
            let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
            file.seek(SeekFrom::Start(row_bytes * i as u64))
                .ctx("seeking in", path)?;
            file.write_all(&bytes).ctx("writing", path)?;
        }
        Ok(())
    })?;
    file.sync_all().ctx("syncing", path)?;
    drop(file);
    crate::util::hash::sha256_file(path)
}

/// The queries' sketches û(q) = ŝ(U(q)) over every layer (whitened coordinates
/// W⁻¹ ⊙ Q_Sᵀ U Q_A with `whiten`): [Q, D].
pub fn sketch_queries(
    sketches: &[GradientSketch],
    whiten: Option<&[Whitening]>,
    u: &[LayerQuery],
) -> Result<Tensor> {
    let q = u.first().map(LayerQuery::queries).transpose()?.unwrap_or(0);
    let r = exact_total(whiten);
    let d = r + sketches.first().map_or(0, |s| s.buckets);
    let mut rows = vec![vec![0f32; d]; q];
    for (l, (s, ul)) in sketches.iter().zip(u).enumerate() {
        let dense = match ul {
            LayerQuery::Dense(t) => t.clone(),
            // U = Σ_k σ_k p_k r_kᵀ: [Q, d_out, r] × [Q, r, d_in].
            LayerQuery::LowRank(l) => l.p_scaled.matmul(&l.r.transpose(1, 2)?.contiguous()?)?,
        }
        .to_device(&Device::Cpu)?;
        let coords = match whiten {
            Some(w) => w[l].queries(&dense)?,
            None => dense,
        };
        add_all(s, whiten.map(|w| &w[l]), &coords, &mut rows, r)?;
    }
    Ok(Tensor::from_vec(rows.concat(), (q, d), &Device::Cpu)?)
}

/// Adds ŝ(q, m) = ⟨û(q), row(m)⟩ of one point's file to `acc` ([Q][N]), reading the file in
/// chunks of rows (memory independent of N beyond `acc`) and checking its SHA-256.
pub fn add_sketched_scores(
    dir: &Path,
    point: &IndexPoint,
    width: usize,
    uq: &Tensor,
    acc: &mut [Vec<f32>],
) -> Result<()> {
    let path = dir.join(&point.file);
    let n = point.documents;
    let rerun = "rerun the index stage (`source-tda index --config C --run-dir R`)";
    let len = std::fs::metadata(&path).ctx("reading", &path)?.len();
    if len != (n * width * 4) as u64 {
        return Err(Error::Pipeline(format!(
            "{}: {len} bytes, expected {n} rows of {width} f32 ({} bytes); {rerun}",
            path.display(),
            n * width * 4
        )));
    }
    let q = uq.dim(0)?;
    let ut = uq.t()?.contiguous()?; // [D, Q]
    let mut file = std::fs::File::open(&path).ctx("opening", &path)?;
    let mut hasher = Sha256::new();
    let chunk = (1usize << 22) / (width * 4).max(1) + 1; // ≈ 4 MiB of rows
    let mut buf = Vec::new();
    let mut m = 0;
    while m < n {
        let c = chunk.min(n - m);
        buf.resize(c * width * 4, 0u8);
        file.read_exact(&mut buf).ctx("reading", &path)?;
        hasher.update(&buf);
        let vals: Vec<f32> = buf
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let s: Vec<Vec<f32>> = Tensor::from_vec(vals, (c, width), &Device::Cpu)?
            .matmul(&ut)?
            .to_vec2()?;
        for (r, row) in s.iter().enumerate() {
            for qi in 0..q {
                acc[qi][m + r] += row[qi];
            }
        }
        m += c;
    }
    let got = hex::encode(hasher.finalize());
    if got != point.sha256 {
        return Err(Error::Pipeline(format!(
            "{}: SHA-256 {got} differs from index.json's {}; the file is damaged, {rerun}",
            path.display(),
            point.sha256
        )));
    }
    Ok(())
}

/// The candidates: per data role, the documents among each query's `per_query` highest and
/// `per_query` lowest ŝ within that role (ties broken by document order). Each role is
/// ranked on its own: roles are different segments, whose sketches differ in noise (a
/// pretraining segment reached through the later segments' walk is typically much noisier
/// than the fine-tuning data's), so one noisy role must not crowd out another's candidates.
/// `sketched` holds each role's ŝ, [Q][N_role].
pub fn select(
    sketched: &BTreeMap<String, Vec<Vec<f32>>>,
    per_query: usize,
) -> BTreeMap<String, BTreeSet<usize>> {
    sketched
        .iter()
        .map(|(role, s)| {
            let mut keep = BTreeSet::new();
            for row in s {
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                let k = per_query.min(order.len());
                keep.extend(&order[..k]);
                keep.extend(&order[order.len() - k..]);
            }
            (role.clone(), keep)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_takes_both_ends_of_each_query_in_each_role() {
        let mut s = BTreeMap::new();
        s.insert(
            "pretrain".to_string(),
            vec![vec![5.0, -1.0, 0.0, 2.0], vec![0.0, 0.5, 9.0, 1.0]],
        );
        s.insert(
            "train".to_string(),
            vec![vec![3.0, -7.0, 0.1], vec![-2.0, 1.0, 0.0]],
        );
        let c = select(&s, 1);
        // pretrain: query 0 highest 0 (5), lowest 1 (−1); query 1 highest 2 (9), lowest 0 (0).
        // train: query 0 highest 0, lowest 1; query 1 highest 1, lowest 0.
        assert_eq!(c["pretrain"], BTreeSet::from([0, 1, 2]));
        assert_eq!(c["train"], BTreeSet::from([0, 1]));
        // More candidates than documents: every document.
        let all = select(&s, 10);
        assert_eq!(all["pretrain"].len(), 4);
        assert_eq!(all["train"].len(), 3);
    }
}
