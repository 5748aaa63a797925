//! Owns `BlockLayout` and `BlockDiag`: block-diagonal factors of a configured block size.
//! Layer: linalg — may import the ground (error, util, config, output); no sibling.
//!
//! Block-diagonal matrices: a layer's factor split into diagonal blocks of a configured size
//! (docs/design.md §3.5), so that very wide layers fit in memory. A whole (unsplit) factor is
//! the one-block case.

use candle_core::Tensor;

use crate::error::Result;

/// How a dimension `dim` is cut into consecutive blocks of `block` (the last may be shorter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// The full dimension.
    pub dim: usize,
    /// (offset, length) of each block.
    pub ranges: Vec<(usize, usize)>,
}

impl BlockLayout {
    /// Blocks of at most `block` (None or ≥ dim: one block).
    pub fn new(dim: usize, block: Option<usize>) -> BlockLayout {
        let b = block.filter(|&b| b > 0 && b < dim).unwrap_or(dim.max(1));
        let ranges = (0..dim)
            .step_by(b)
            .map(|off| (off, b.min(dim - off)))
            .collect();
        BlockLayout { dim, ranges }
    }
}

/// A block-diagonal square matrix Q = diag(Q_1, …, Q_k), each block f32 [b_i, b_i].
#[derive(Debug, Clone)]
pub struct BlockDiag {
    /// The layout.
    pub layout: BlockLayout,
    /// The diagonal blocks.
    pub blocks: Vec<Tensor>,
}

impl BlockDiag {
    /// x Q for x [..., dim]: each block of columns multiplied by its block.
    pub fn right_mul(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    /// x Qᵀ for x [..., dim].
    pub fn right_mul_t(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    /// Q x for x [..., dim, k]: each block of rows multiplied by its block.
    pub fn left_mul(&self, x: &Tensor) -> Result<Tensor> {
        self.apply_left(x, false)
    }

    /// Qᵀ x for x [..., dim, k].
    pub fn left_mul_t(&self, x: &Tensor) -> Result<Tensor> {
        self.apply_left(x, true)
    }

    fn apply(&self, x: &Tensor, transpose: bool) -> Result<Tensor> {
        self.per_block(x, x.rank() - 1, |xb, q| {
            let q = if transpose { q.t()? } else { q.clone() };
            matmul_shared_rhs(xb, &q)
        })
    }

    fn apply_left(&self, x: &Tensor, transpose: bool) -> Result<Tensor> {
        let rows = x.rank() - 2;
        self.per_block(x, rows, |xb, q| {
            let q = if transpose { q.t()? } else { q.clone() };
            // A stride-0 batch on the left: candle loops over the batch without copying Q.
            Ok(q.broadcast_left(&xb.dims()[..rows])?.matmul(xb)?)
        })
    }

    /// `mul(x_k, Q_k)` for each block k of x's `axis` (x itself when there is one block),
    /// concatenated back along `axis`.
    fn per_block(
        &self,
        x: &Tensor,
        axis: usize,
        mul: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if let [q] = self.blocks.as_slice() {
            return mul(x, q);
        }
        let parts = self
            .layout
            .ranges
            .iter()
            .zip(&self.blocks)
            .map(|((off, len), q)| mul(&x.narrow(axis, *off, *len)?, q))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, axis)?)
    }

    /// The dense matrix (for tests and small layers).
    pub fn to_dense(&self) -> Result<Tensor> {
        let n = self.layout.dim;
        let dev = self.blocks[0].device();
        let mut dense = Tensor::zeros((n, n), self.blocks[0].dtype(), dev)?;
        for ((off, len), q) in self.layout.ranges.iter().zip(&self.blocks) {
            dense = dense.slice_assign(&[*off..off + len, *off..off + len], q)?;
        }
        Ok(dense)
    }
}

/// x q for x [..., m, k] and a matrix q [k, n] shared by every batch entry, without copying
/// q per entry (candle's `broadcast_matmul` makes the broadcast rhs contiguous, i.e. one copy
/// of q per entry, whenever x is not contiguous): a contiguous x is folded into one
/// [batch·m, k] product, any other x is multiplied against a stride-0 view of q.
pub(crate) fn matmul_shared_rhs(x: &Tensor, q: &Tensor) -> Result<Tensor> {
    let r = x.rank();
    if r == 2 {
        return Ok(x.matmul(q)?);
    }
    if x.is_contiguous() {
        return Ok(x.broadcast_matmul(q)?);
    }
    let mut dims = x.dims()[..r - 2].to_vec();
    dims.extend_from_slice(q.dims());
    Ok(x.matmul(&q.broadcast_as(dims)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layouts() {
        assert_eq!(BlockLayout::new(10, None).ranges, vec![(0, 10)]);
        assert_eq!(
            BlockLayout::new(10, Some(4)).ranges,
            vec![(0, 4), (4, 4), (8, 2)]
        );
        assert_eq!(BlockLayout::new(10, Some(10)).ranges, vec![(0, 10)]);
    }

    #[test]
    fn block_products_equal_dense_products() {
        let dev = Device::Cpu;
        let layout = BlockLayout::new(5, Some(2));
        let blocks: Vec<Tensor> = layout
            .ranges
            .iter()
            .map(|(_, l)| Tensor::randn(0f32, 1.0, (*l, *l), &dev).unwrap())
            .collect();
        let q = BlockDiag { layout, blocks };
        let dense = q.to_dense().unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 7, 5), &dev).unwrap();
        let d1 = (q.right_mul(&x).unwrap() - x.broadcast_matmul(&dense).unwrap()).unwrap();
        let d2 = (q.right_mul_t(&x).unwrap() - x.broadcast_matmul(&dense.t().unwrap()).unwrap())
            .unwrap();
        let y = Tensor::randn(0f32, 1.0, (3, 5, 7), &dev).unwrap();
        let d3 = (q.left_mul(&y).unwrap() - dense.broadcast_matmul(&y).unwrap()).unwrap();
        let d4 =
            (q.left_mul_t(&y).unwrap() - dense.t().unwrap().broadcast_matmul(&y).unwrap()).unwrap();
        // Non-contiguous inputs (a transposed view) take the stride-0 path.
        let xt = y.transpose(1, 2).unwrap();
        let d5 = (q.right_mul(&xt).unwrap()
            - xt.contiguous().unwrap().broadcast_matmul(&dense).unwrap())
        .unwrap();
        for d in [d1, d2, d3, d4, d5] {
            let e: f32 = d.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(e < 1e-5, "{e}");
        }
    }
}
