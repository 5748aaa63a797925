//! Block-diagonal matrices: a layer's factor split into diagonal blocks of a configured size
//! (DESIGN.md §3.5), so that very wide layers fit in memory. A whole (unsplit) factor is the
//! one-block case.

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

    fn apply(&self, x: &Tensor, transpose: bool) -> Result<Tensor> {
        let last = x.rank() - 1;
        let mut parts = Vec::with_capacity(self.blocks.len());
        for ((off, len), q) in self.layout.ranges.iter().zip(&self.blocks) {
            let xb = x.narrow(last, *off, *len)?;
            let q = if transpose { q.t()? } else { q.clone() };
            parts.push(xb.broadcast_matmul(&q)?);
        }
        Ok(if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, last)?
        })
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
        for d in [d1, d2] {
            let e: f32 = d.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(e < 1e-5, "{e}");
        }
    }
}
