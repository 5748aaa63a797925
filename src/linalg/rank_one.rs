//! Rank-one corrections of a linear map on layer gradients, (I + α u wᵀ) v, batched over the
//! vectors v [Q, d_out, d_in] like the eigenbasis primitive, so the two compose (e.g. the
//! derivative of a clipped step, c (I − ĝ ĝᵀ), is `RankOne::projection(ĝ)` scaled by c).
//! Layer: linalg — may import only the ground.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// The map v ↦ v + α u ⟨w, v⟩ for u, w [d_out, d_in] (f32), applied to every v of a batch.
#[derive(Debug, Clone)]
pub struct RankOne {
    /// u: the direction added.
    pub u: Tensor,
    /// w: the direction read.
    pub w: Tensor,
    /// α.
    pub alpha: f64,
}

impl RankOne {
    /// I − ĝ ĝᵀ with ĝ = g / ‖g‖: removes the component along `g` (the identity if g = 0).
    pub fn projection(g: &Tensor) -> Result<RankOne> {
        let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        let g_hat = if norm > 0.0 {
            (g / norm as f64)?
        } else {
            g.zeros_like()?
        };
        Ok(RankOne {
            u: g_hat.clone(),
            w: g_hat,
            alpha: -1.0,
        })
    }

    /// v + α u ⟨w, v⟩ for `v` [d_out, d_in] or [Q, d_out, d_in].
    pub fn apply(&self, v: &Tensor) -> Result<Tensor> {
        let d = v.dims();
        if d.len() < 2 || &d[d.len() - 2..] != self.u.dims() || self.u.dims() != self.w.dims() {
            return Err(Error::Numeric(format!(
                "rank-one correction of shape {:?} applied to {:?}",
                self.u.dims(),
                d
            )));
        }
        let per = self.u.elem_count();
        let q = v.elem_count() / per;
        let flat = v.reshape((q, per))?;
        // ⟨w, v_q⟩ for every q: [Q, 1].
        let dots = flat.matmul(&self.w.reshape((per, 1))?)?;
        let update = (dots.matmul(&self.u.reshape((1, per))?)? * self.alpha)?;
        Ok((flat + update)?.reshape(d)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::test_support::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn projection_removes_the_direction_and_keeps_the_rest() {
        let dev = Device::Cpu;
        let g = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (5, 3, 4), &dev).unwrap();
        let p = RankOne::projection(&g).unwrap();
        let y = p.apply(&v).unwrap();
        // ⟨g, P v_q⟩ = 0 for every q, and P is idempotent.
        let dots: Vec<f32> = y
            .reshape((5, 12))
            .unwrap()
            .matmul(&g.reshape((12, 1)).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(dots.iter().all(|d| d.abs() < 1e-5), "{dots:?}");
        let yy = p.apply(&y).unwrap();
        assert!(max_abs_diff(&yy, &y) < 1e-5, "the projection is idempotent");
        // A vector orthogonal to g (here P v itself) is unchanged.
        let y0 = y.get(0).unwrap();
        assert!(max_abs_diff(&p.apply(&y0).unwrap(), &y0) < 1e-5);
        // v + α u ⟨w, v⟩ against the explicit form.
        let r = RankOne {
            u: Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap(),
            w: g.clone(),
            alpha: 0.5,
        };
        let v0 = v.get(0).unwrap();
        let dot: f32 = (&r.w * &v0)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let want = (&v0 + (&r.u * (0.5 * dot as f64)).unwrap()).unwrap();
        assert!(max_abs_diff(&r.apply(&v0).unwrap(), &want) < 1e-5);
    }
}
