//! Kronecker factors of one layer: A = E[a aᵀ] over kept token positions and S = E[δ δᵀ],
//! normalised per token (DESIGN.md §3.1), accumulated per diagonal block.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

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

/// Running sums Σ a aᵀ and Σ δ δᵀ (f64, per block) and the token count.
#[derive(Debug, Clone)]
pub struct CovarianceSums {
    /// Blocks of the input dimension.
    pub a_layout: BlockLayout,
    /// Blocks of the output dimension.
    pub s_layout: BlockLayout,
    a: Vec<Tensor>,
    s: Vec<Tensor>,
    /// Tokens added.
    pub tokens: u64,
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
    /// Empty sums for a layer with `d_in` inputs (bias column included) and `d_out` outputs.
    pub fn new(d_in: usize, d_out: usize, block: Option<usize>, device: &Device) -> Result<Self> {
        let a_layout = BlockLayout::new(d_in, block);
        let s_layout = BlockLayout::new(d_out, block);
        let zeros = |l: &BlockLayout| -> Result<Vec<Tensor>> {
            l.ranges
                .iter()
                .map(|(_, n)| Ok(Tensor::zeros((*n, *n), DType::F64, device)?))
                .collect()
        };
        Ok(CovarianceSums {
            a: zeros(&a_layout)?,
            s: zeros(&s_layout)?,
            a_layout,
            s_layout,
            tokens: 0,
        })
    }

    /// Adds kept tokens: `a` [N, d_in], `delta` [N, d_out] (f32). Each block's product is
    /// computed in f32 and accumulated in f64.
    pub fn add(&mut self, a: &Tensor, delta: &Tensor) -> Result<()> {
        let (n, _) = a.dims2()?;
        let (n2, _) = delta.dims2()?;
        if n != n2 {
            return Err(Error::Numeric(format!(
                "covariance: {n} activation rows but {n2} gradient rows"
            )));
        }
        accumulate(&mut self.a, &self.a_layout, a)?;
        accumulate(&mut self.s, &self.s_layout, delta)?;
        self.tokens += n as u64;
        Ok(())
    }

    /// Adds sums computed elsewhere (a GPU backend): `a_blocks[k]` = Σ_t m_t a_t a_tᵀ over
    /// block k of A and `s_blocks[k]` the same for S (f64 or f32, on any device), over
    /// `tokens` kept positions.
    pub fn add_block_sums(
        &mut self,
        a_blocks: &[Tensor],
        s_blocks: &[Tensor],
        tokens: u64,
    ) -> Result<()> {
        if a_blocks.len() != self.a.len() || s_blocks.len() != self.s.len() {
            return Err(Error::Numeric(format!(
                "covariance: {} + {} block sums for a layout of {} + {} blocks",
                a_blocks.len(),
                s_blocks.len(),
                self.a.len(),
                self.s.len()
            )));
        }
        for (sum, add) in self
            .a
            .iter_mut()
            .zip(a_blocks)
            .chain(self.s.iter_mut().zip(s_blocks))
        {
            if sum.dims() != add.dims() {
                return Err(Error::Numeric(format!(
                    "covariance: a block sum of shape {:?} for a block of {:?}",
                    add.dims(),
                    sum.dims()
                )));
            }
            let add = add.to_device(sum.device())?.to_dtype(DType::F64)?;
            *sum = (&*sum + add)?;
        }
        self.tokens += tokens;
        Ok(())
    }

    /// Divides by the token count and symmetrises.
    pub fn normalized(&self) -> Result<Covariances> {
        let n = self.tokens.max(1) as f64;
        let norm = |v: &[Tensor]| -> Result<Vec<Tensor>> {
            v.iter().map(|c| Ok(((c + c.t()?)? * (0.5 / n))?)).collect()
        };
        Ok(Covariances {
            a_layout: self.a_layout.clone(),
            s_layout: self.s_layout.clone(),
            a: norm(&self.a)?,
            s: norm(&self.s)?,
        })
    }
}

fn accumulate(sums: &mut [Tensor], layout: &BlockLayout, x: &Tensor) -> Result<()> {
    for ((off, len), sum) in layout.ranges.iter().zip(sums.iter_mut()) {
        let xb = x.narrow(1, *off, *len)?.contiguous()?;
        let prod = xb.t()?.matmul(&xb)?.to_dtype(DType::F64)?;
        *sum = (&*sum + prod)?;
    }
    Ok(())
}

impl Covariances {
    /// The mean of several checkpoints' factors (DESIGN.md §3.1: averaged over the segment's
    /// checkpoints).
    pub fn mean(list: &[Covariances]) -> Result<Covariances> {
        let first = list
            .first()
            .ok_or_else(|| Error::Numeric("no covariances to average".into()))?;
        let k = list.len() as f64;
        let avg = |get: &dyn Fn(&Covariances) -> &Vec<Tensor>| -> Result<Vec<Tensor>> {
            (0..get(first).len())
                .map(|i| {
                    let mut acc = get(first)[i].clone();
                    for c in &list[1..] {
                        acc = (acc + &get(c)[i])?;
                    }
                    Ok((acc / k)?)
                })
                .collect()
        };
        Ok(Covariances {
            a_layout: first.a_layout.clone(),
            s_layout: first.s_layout.clone(),
            a: avg(&|c| &c.a)?,
            s: avg(&|c| &c.s)?,
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
