//! Owns the covariance sums: `CovarianceSums`, `Covariances`, `FactorSum` and `masked_rows`.
//! Layer: linalg — may import the ground (error, util, config, output) and, in this folder,
//! blocks.rs.
//!
//! Kronecker factors of one layer: A = E[a aᵀ] over kept token positions and S = E[δ δᵀ],
//! normalised per token (docs/design.md §3.1), accumulated per diagonal block.

use candle_core::{DType, Device, Tensor};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef};

use crate::error::{Error, Result};
use crate::util::tensors::with_f32;

use super::blocks::BlockLayout;

/// Rows of `x` [B, T, d] where `mask` [B, T] is non-zero, as [N, d] (N = kept tokens).
pub fn masked_rows(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let m: Vec<u8> = mask.to_dtype(DType::U8)?.flatten_all()?.to_vec1()?;
    if m.len() != b * t {
        return Err(Error::Numeric(format!(
            "mask has {} entries for a [{b}, {t}, {d}] tensor",
            m.len()
        )));
    }
    let idx: Vec<u32> = m
        .iter()
        .enumerate()
        .filter(|(_, &v)| v != 0)
        .map(|(i, _)| i as u32)
        .collect();
    let idx = Tensor::from_vec(idx.clone(), idx.len(), x.device())?;
    Ok(x.reshape((b * t, d))?.index_select(&idx, 0)?)
}

/// Running Σ x xᵀ of one Kronecker factor over token rows, per diagonal block. Only the
/// lower triangle is formed (faer's triangular product: half the FLOPs of a full GEMM), in
/// f32, accumulated in place by the product itself (dst ← dst + xᵀx), as kronfluence's
/// default covariance dtype does. Summing B batches in f32 adds a relative rounding error of
/// order B·2⁻²⁴ at worst (√B·2⁻²⁴ typically), far below the noise of the estimate.
#[derive(Debug, Clone)]
pub struct FactorSum {
    /// Blocks of the dimension.
    pub layout: BlockLayout,
    /// Row-major [n, n] per block; entries (i, j) with i ≥ j are valid.
    blocks: Vec<Vec<f32>>,
}

impl FactorSum {
    /// Zero sums for a factor of dimension `dim`, in blocks of at most `block`.
    pub fn new(dim: usize, block: Option<usize>) -> FactorSum {
        let layout = BlockLayout::new(dim, block);
        let blocks = layout
            .ranges
            .iter()
            .map(|(_, n)| vec![0f32; n * n])
            .collect();
        FactorSum { layout, blocks }
    }

    /// Adds x xᵀ for every row x of `rows` [n_rows, dim] (row-major). Zero rows (padding)
    /// add nothing.
    pub fn add_rows(&mut self, rows: &[f32]) -> Result<()> {
        let dim = self.layout.dim;
        if dim == 0 || rows.len() % dim != 0 {
            return Err(Error::Numeric(format!(
                "covariance: {} values are not rows of width {dim}",
                rows.len()
            )));
        }
        let x = MatRef::from_row_major_slice(rows, rows.len() / dim, dim);
        for ((off, len), buf) in self.layout.ranges.iter().zip(self.blocks.iter_mut()) {
            let xb = x.subcols(*off, *len);
            let dst = MatMut::from_row_major_slice_mut(buf, *len, *len);
            triangular::matmul(
                dst,
                BlockStructure::TriangularLower,
                Accum::Add,
                xb.transpose(),
                BlockStructure::Rectangular,
                xb,
                BlockStructure::Rectangular,
                1.0f32,
                faer::get_global_parallelism(),
            );
        }
        Ok(())
    }

    /// Adds a sum formed elsewhere (a GPU backend) to block `k`: `sum` is the block's
    /// Σ x xᵀ, row-major [n_k, n_k] (only its lower triangle is read).
    pub fn add_block(&mut self, k: usize, sum: &[f32]) -> Result<()> {
        let (buf, n) = match (self.blocks.get_mut(k), self.layout.ranges.get(k)) {
            (Some(buf), Some((_, n))) => (buf, *n),
            _ => {
                return Err(Error::Numeric(format!(
                    "covariance: block {k} of a factor with {} blocks",
                    self.blocks.len()
                )))
            }
        };
        if sum.len() != n * n {
            return Err(Error::Numeric(format!(
                "covariance: {} values for block {k} of size {n} × {n}",
                sum.len()
            )));
        }
        for i in 0..n {
            for j in 0..=i {
                buf[i * n + j] += sum[i * n + j];
            }
        }
        Ok(())
    }

    /// The running sums, one row-major [n_k, n_k] block per block of the layout (entries
    /// with i ≥ j are valid): what a shard of the pass stores (docs/design.md §11).
    pub fn blocks(&self) -> &[Vec<f32>] {
        &self.blocks
    }

    /// Sums formed elsewhere (the shards of a pass, added): `blocks` must be one row-major
    /// [n_k, n_k] block per block of `layout`.
    pub fn from_blocks(layout: BlockLayout, blocks: Vec<Vec<f32>>) -> Result<FactorSum> {
        let fits = blocks.len() == layout.ranges.len()
            && (blocks.iter().zip(&layout.ranges)).all(|(b, (_, n))| b.len() == n * n);
        if !fits {
            return Err(Error::Numeric(format!(
                "covariance: {} blocks of {:?} values for a layout of blocks {:?}",
                blocks.len(),
                blocks.iter().map(Vec::len).collect::<Vec<_>>(),
                layout.ranges
            )));
        }
        Ok(FactorSum { layout, blocks })
    }

    /// The first diagonal index whose sum is NaN or ±Inf: any non-finite entry of an added
    /// row makes its column's diagonal entry Σ x_j² non-finite, so this detects them all.
    pub fn first_non_finite(&self) -> Option<usize> {
        let mut base = 0;
        for ((_, len), buf) in self.layout.ranges.iter().zip(&self.blocks) {
            if let Some(i) = (0..*len).find(|&i| !buf[i * len + i].is_finite()) {
                return Some(base + i);
            }
            base += len;
        }
        None
    }

    /// Each block of Σ / `n` as a full symmetric f64 matrix (row-major).
    pub fn normalized_f64(&self, n: f64) -> Vec<Vec<f64>> {
        self.layout
            .ranges
            .iter()
            .zip(&self.blocks)
            .map(|((_, len), buf)| {
                let len = *len;
                let mut out = vec![0f64; len * len];
                for i in 0..len {
                    for j in 0..=i {
                        let v = buf[i * len + j] as f64 / n;
                        out[i * len + j] = v;
                        out[j * len + i] = v;
                    }
                }
                out
            })
            .collect()
    }

    /// Blocks of Σ / `n` as f64 tensors [n_k, n_k] on `device`.
    pub fn normalized_tensors(&self, n: f64, device: &Device) -> Result<Vec<Tensor>> {
        self.normalized_f64(n)
            .into_iter()
            .zip(&self.layout.ranges)
            .map(|(v, (_, len))| Ok(Tensor::from_vec(v, (*len, *len), device)?))
            .collect()
    }
}

/// Running sums Σ a aᵀ and Σ δ δᵀ of one layer (per block, see [`FactorSum`]) and the token
/// count.
#[derive(Debug, Clone)]
pub struct CovarianceSums {
    /// Σ a aᵀ.
    pub a: FactorSum,
    /// Σ δ δᵀ.
    pub s: FactorSum,
    /// Tokens added.
    pub tokens: u64,
    device: Device,
}

/// Normalised factors of one layer (per block, f64): A = Σ a aᵀ / n_tok, S = Σ δ δᵀ / n_tok.
#[derive(Debug, Clone)]
pub struct Covariances {
    /// Blocks of the input dimension.
    pub a_layout: BlockLayout,
    /// Blocks of the output dimension.
    pub s_layout: BlockLayout,
    /// A's diagonal blocks, f64.
    pub a: Vec<Tensor>,
    /// S's diagonal blocks, f64.
    pub s: Vec<Tensor>,
}

impl CovarianceSums {
    /// Empty sums for a layer with `d_in` inputs (bias column included) and `d_out` outputs;
    /// [`normalized`](Self::normalized) puts its tensors on `device`.
    pub fn new(d_in: usize, d_out: usize, block: Option<usize>, device: &Device) -> Result<Self> {
        Ok(CovarianceSums {
            a: FactorSum::new(d_in, block),
            s: FactorSum::new(d_out, block),
            tokens: 0,
            device: device.clone(),
        })
    }

    /// Adds kept tokens: `a` [N, d_in], `delta` [N, d_out] (f32).
    pub fn add(&mut self, a: &Tensor, delta: &Tensor) -> Result<()> {
        let (n, _) = a.dims2()?;
        let (n2, _) = delta.dims2()?;
        if n != n2 {
            return Err(Error::Numeric(format!(
                "covariance: {n} activation rows but {n2} gradient rows"
            )));
        }
        with_f32(a, |x| self.a.add_rows(x))??;
        with_f32(delta, |x| self.s.add_rows(x))??;
        self.tokens += n as u64;
        Ok(())
    }

    /// Divides by the token count (symmetric f64 blocks).
    pub fn normalized(&self) -> Result<Covariances> {
        let n = self.tokens.max(1) as f64;
        Ok(Covariances {
            a_layout: self.a.layout.clone(),
            s_layout: self.s.layout.clone(),
            a: self.a.normalized_tensors(n, &self.device)?,
            s: self.s.normalized_tensors(n, &self.device)?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // brute-force references index like the math
mod tests {
    use super::*;

    fn brute_cov(x: &[Vec<f32>]) -> Vec<Vec<f64>> {
        let d = x[0].len();
        let mut c = vec![vec![0.0; d]; d];
        for row in x {
            for i in 0..d {
                for j in 0..d {
                    c[i][j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        let n = x.len() as f64;
        c.iter()
            .map(|r| r.iter().map(|v| v / n).collect())
            .collect()
    }

    #[test]
    fn matches_brute_force_with_masks_blocks_and_batches() {
        let dev = Device::Cpu;
        let (b, t, din, dout) = (3, 5, 6, 4);
        let a = Tensor::randn(0f32, 1.0, (b, t, din), &dev).unwrap();
        let d = Tensor::randn(0f32, 1.0, (b, t, dout), &dev).unwrap();
        let mask_v: Vec<u8> = (0..b * t).map(|i| (i % 4 != 3) as u8).collect();
        let mask = Tensor::from_vec(mask_v.clone(), (b, t), &dev).unwrap();
        let ar = masked_rows(&a, &mask).unwrap();
        let dr = masked_rows(&d, &mask).unwrap();
        let rows_a: Vec<Vec<f32>> = ar.to_vec2().unwrap();
        let rows_d: Vec<Vec<f32>> = dr.to_vec2().unwrap();
        assert_eq!(rows_a.len(), mask_v.iter().filter(|&&m| m == 1).count());
        let want_a = brute_cov(&rows_a);
        let want_s = brute_cov(&rows_d);

        // Whole, in one batch.
        let mut whole = CovarianceSums::new(din, dout, None, &dev).unwrap();
        whole.add(&ar, &dr).unwrap();
        let c = whole.normalized().unwrap();
        let got: Vec<Vec<f64>> = c.a[0].to_vec2().unwrap();
        for i in 0..din {
            for j in 0..din {
                assert!((got[i][j] - want_a[i][j]).abs() < 1e-5);
            }
        }
        let got_s: Vec<Vec<f64>> = c.s[0].to_vec2().unwrap();
        assert!((got_s[1][2] - want_s[1][2]).abs() < 1e-5);

        // In two batches and with blocks of 4: the diagonal blocks of the same matrix.
        let mut split = CovarianceSums::new(din, dout, Some(4), &dev).unwrap();
        let n = ar.dim(0).unwrap();
        split
            .add(&ar.narrow(0, 0, 5).unwrap(), &dr.narrow(0, 0, 5).unwrap())
            .unwrap();
        split
            .add(
                &ar.narrow(0, 5, n - 5).unwrap(),
                &dr.narrow(0, 5, n - 5).unwrap(),
            )
            .unwrap();
        let c = split.normalized().unwrap();
        assert_eq!(c.a.len(), 2);
        let blk: Vec<Vec<f64>> = c.a[1].to_vec2().unwrap();
        for i in 0..2 {
            for j in 0..2 {
                assert!((blk[i][j] - want_a[4 + i][4 + j]).abs() < 1e-5);
            }
        }
    }
}
