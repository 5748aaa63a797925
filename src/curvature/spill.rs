//! Owns `CaptureSpill`: a fit's captures kept on disk between its two passes.
//! Layer: curvature — may import every floor from the ground up to passes; no sibling.
//!
//! The covariance pass and the eigenvalue-correction pass of a checkpoint run the same
//! forward and backward over the same batches with the same labels (sampled ones are keyed
//! by document, [`crate::model::Labels`]), so they capture the same a and δ. The second
//! pass cannot run with the first (Λ needs the eigenbasis of all the data's covariances),
//! but it can read the first pass's captures back instead of recomputing them: a capture is
//! about 1 MB per token for SmolLM2-135M, written once and read once at memory speed while
//! it stays in the page cache, against a forward and a backward through the whole model.
//!
//! [`CaptureSpill`] writes each batch's captures, from a thread of its own, to an unnamed
//! temporary file (removed by the OS when dropped, also on a crash) and reads them back,
//! exact copies.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, IoContext, Result};
use crate::model::{Capture, LayerCapture};
use crate::util::tensors::with_f32;

/// One tensor's place in the file.
#[derive(Debug, Clone)]
struct Slot {
    offset: u64,
    dims: Vec<usize>,
    dtype: DType,
}

/// What one batch wrote: per layer the slots of a (shared between layers with one input)
/// and δ, plus the batch's masks, targets, losses and document lengths.
#[derive(Debug, Clone)]
struct BatchRecord {
    a: Vec<usize>,
    delta: Vec<usize>,
    slots: Vec<Slot>,
    targets: Slot,
    attention_mask: Slot,
    prediction_mask: Slot,
    losses: Vec<f32>,
    lengths: Vec<usize>,
}

/// Captures of a pass's batches on disk, in the order they were pushed.
pub struct CaptureSpill {
    file: FileState,
    end: u64,
    /// Per layer: module name and whether `a` carries the bias column.
    layers: Vec<(String, bool)>,
    batches: Vec<BatchRecord>,
}

/// The file, or the thread writing to it: [`CaptureSpill::push`] hands each batch's tensors
/// to a writer thread (handed over when the writer is free: one batch at a time beyond the
/// one being captured), so the copy into the page cache overlaps
/// the next batch's forward and backward; the first read waits for it to finish.
enum FileState {
    Writing {
        tx: std::sync::mpsc::SyncSender<Vec<Tensor>>,
        handle: std::thread::JoinHandle<Result<File>>,
    },
    Done(File),
    Failed(String),
}

impl CaptureSpill {
    /// An empty spill in a new unnamed temporary file in `dir`.
    pub fn create(dir: &Path) -> Result<CaptureSpill> {
        let mut file = tempfile::tempfile_in(dir).ctx("creating a temporary file in", dir)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Tensor>>(0);
        let handle = std::thread::Builder::new()
            .name("capture-spill".into())
            .spawn(move || -> Result<File> {
                for batch in rx {
                    for t in &batch {
                        write_tensor(&mut file, t)?;
                    }
                }
                Ok(file)
            })
            .map_err(|e| Error::Numeric(format!("capture spill: starting its writer: {e}")))?;
        Ok(CaptureSpill {
            file: FileState::Writing { tx, handle },
            end: 0,
            layers: Vec::new(),
            batches: Vec::new(),
        })
    }

    /// Batches pushed.
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Bytes of the batches pushed so far (some may still be on their way to the file).
    pub fn bytes(&self) -> u64 {
        self.end
    }

    /// Appends one batch's capture (host tensors) and its documents' token counts. An input
    /// shared by several layers (the same tensor) is written once.
    pub fn push(&mut self, cap: &Capture, lengths: &[usize]) -> Result<()> {
        let layers: Vec<(String, bool)> = (cap.layers.iter())
            .map(|l| (l.name.clone(), l.has_bias))
            .collect();
        if self.batches.is_empty() {
            self.layers = layers;
        } else if layers != self.layers {
            return Err(Error::Numeric(
                "capture spill: a batch tracked other layers than the first".into(),
            ));
        }
        let mut out: Vec<Tensor> = Vec::new();
        let mut slots = Vec::new();
        let mut a: Vec<usize> = Vec::with_capacity(cap.layers.len());
        for (l, first) in cap.input_groups().into_iter().enumerate() {
            if first == l {
                slots.push(self.place(&cap.layers[l].a, &mut out)?);
                a.push(slots.len() - 1);
            } else {
                a.push(a[first]);
            }
        }
        let mut delta = Vec::with_capacity(cap.layers.len());
        for l in &cap.layers {
            slots.push(self.place(&l.delta, &mut out)?);
            delta.push(slots.len() - 1);
        }
        let record = BatchRecord {
            a,
            delta,
            slots,
            targets: self.place(&cap.targets, &mut out)?,
            attention_mask: self.place(&cap.attention_mask, &mut out)?,
            prediction_mask: self.place(&cap.prediction_mask, &mut out)?,
            losses: cap.losses.clone(),
            lengths: lengths.to_vec(),
        };
        match &self.file {
            FileState::Writing { tx, .. } => {
                if tx.send(out).is_err() {
                    // The writer stopped on an error: collect it.
                    self.finish()?;
                }
            }
            FileState::Done(_) => {
                return Err(Error::Numeric(
                    "capture spill: a batch pushed after reading started".into(),
                ))
            }
            FileState::Failed(e) => return Err(Error::Numeric(e.clone())),
        }
        self.batches.push(record);
        Ok(())
    }

    /// Waits until every pushed batch is written; `Err` when a write failed (the spill is
    /// then unusable).
    pub fn wait(&mut self) -> Result<()> {
        self.finish().map(|_| ())
    }

    /// Waits for the writer; the file is then ready to read (or the write's error).
    fn finish(&mut self) -> Result<&mut File> {
        let state = std::mem::replace(&mut self.file, FileState::Failed(String::new()));
        self.file = match state {
            FileState::Writing { tx, handle } => {
                drop(tx);
                match handle.join() {
                    Ok(Ok(f)) => FileState::Done(f),
                    Ok(Err(e)) => FileState::Failed(e.to_string()),
                    Err(_) => FileState::Failed("capture spill: its writer panicked".into()),
                }
            }
            other => other,
        };
        match &mut self.file {
            FileState::Done(f) => Ok(f),
            FileState::Failed(e) => Err(Error::Numeric(e.clone())),
            FileState::Writing { .. } => unreachable!("the writer was just joined"),
        }
    }

    /// Batch `i`'s capture, on the CPU (layers that shared an input share one tensor again),
    /// and its documents' token counts.
    pub fn read(&mut self, i: usize) -> Result<(Capture, Vec<usize>)> {
        let r = self.batches.get(i).cloned().ok_or_else(|| {
            Error::Numeric(format!(
                "capture spill: batch {i} of {}",
                self.batches.len()
            ))
        })?;
        let tensors: Vec<Tensor> = (r.slots.iter())
            .map(|s| self.load(s))
            .collect::<Result<_>>()?;
        let layers = (self.layers.iter().enumerate())
            .map(|(l, (name, has_bias))| LayerCapture {
                name: name.clone(),
                a: tensors[r.a[l]].clone(),
                delta: tensors[r.delta[l]].clone(),
                has_bias: *has_bias,
            })
            .collect();
        let cap = Capture {
            layers,
            losses: r.losses.clone(),
            targets: self.load(&r.targets)?,
            attention_mask: self.load(&r.attention_mask)?,
            prediction_mask: self.load(&r.prediction_mask)?,
        };
        Ok((cap, r.lengths))
    }

    /// Reserves `t`'s bytes at the end of the file and queues it in `out` for the writer.
    fn place(&mut self, t: &Tensor, out: &mut Vec<Tensor>) -> Result<Slot> {
        if !matches!(t.dtype(), DType::F32 | DType::U32) || !t.device().is_cpu() {
            return Err(Error::Numeric(format!(
                "capture spill: cannot keep a {:?} tensor on {:?}",
                t.dtype(),
                t.device().location()
            )));
        }
        let slot = Slot {
            offset: self.end,
            dims: t.dims().to_vec(),
            dtype: t.dtype(),
        };
        self.end += 4 * t.elem_count() as u64;
        out.push(t.clone());
        Ok(slot)
    }

    fn load(&mut self, s: &Slot) -> Result<Tensor> {
        let n: usize = s.dims.iter().product();
        let io = |e: std::io::Error| Error::Numeric(format!("capture spill: reading back: {e}"));
        let file = self.finish()?;
        file.seek(SeekFrom::Start(s.offset)).map_err(io)?;
        Ok(match s.dtype {
            DType::F32 => {
                let mut v = vec![0f32; n];
                file.read_exact(bytemuck::cast_slice_mut(&mut v))
                    .map_err(io)?;
                Tensor::from_vec(v, s.dims.as_slice(), &Device::Cpu)?
            }
            _ => {
                let mut v = vec![0u32; n];
                file.read_exact(bytemuck::cast_slice_mut(&mut v))
                    .map_err(io)?;
                Tensor::from_vec(v, s.dims.as_slice(), &Device::Cpu)?
            }
        })
    }
}

/// Captures kept for the eigenvalue correction: one spill per checkpoint, while their
/// bytes stay within a budget.
pub(super) struct Spills {
    dir: Option<PathBuf>,
    budget: u64,
    /// One entry per checkpoint whose covariance pass ran, `None` where none is kept.
    pub(super) kept: Vec<Option<CaptureSpill>>,
}

impl Spills {
    /// Spills in `dir` (none without one or off the CPU), within half the memory
    /// available now.
    pub(super) fn new(dir: Option<PathBuf>, on_cpu: bool) -> Spills {
        let dir = dir.filter(|_| on_cpu);
        let budget = crate::util::mem::available_memory_bytes().unwrap_or(0) / 2;
        Spills {
            dir,
            budget,
            kept: Vec::new(),
        }
    }

    /// A new spill for the next checkpoint, if spilling is on.
    pub(super) fn open(&mut self) -> Option<CaptureSpill> {
        let dir = self.dir.as_ref()?;
        match CaptureSpill::create(dir) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("fit: captures will be recomputed for Λ: {e}");
                self.dir = None;
                None
            }
        }
    }

    /// Adds a batch to `spill`, or drops it (and spills no more) when that would exceed the
    /// budget or the write fails.
    pub(super) fn push(
        &mut self,
        spill: &mut Option<CaptureSpill>,
        cap: &Capture,
        lengths: &[usize],
    ) {
        let Some(s) = spill else { return };
        let used: u64 = self.kept.iter().flatten().map(CaptureSpill::bytes).sum();
        let res = s.push(cap, lengths);
        let over = used + s.bytes() > self.budget;
        if over || res.is_err() {
            match res {
                Err(e) => tracing::warn!("fit: captures will be recomputed for Λ: {e}"),
                Ok(()) => tracing::info!(
                    "fit: the captures outgrow half the available memory ({}); Λ recomputes them",
                    crate::util::mem::human_bytes(self.budget)
                ),
            }
            *spill = None;
            self.dir = None;
            for k in &mut self.kept {
                *k = None;
            }
        }
    }
}

/// Appends `t`'s elements (f32 or u32, host memory) to `file`, little-endian as in memory.
fn write_tensor(file: &mut File, t: &Tensor) -> Result<()> {
    let io = |e: std::io::Error| Error::Numeric(format!("capture spill: writing: {e}"));
    match t.dtype() {
        DType::F32 => with_f32(t, |v| file.write_all(bytemuck::cast_slice(v)))?.map_err(io),
        _ => {
            let v: Vec<u32> = t.flatten_all()?.to_vec1()?;
            file.write_all(bytemuck::cast_slice(&v)).map_err(io)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(seed: f32) -> Capture {
        let dev = Device::Cpu;
        let t = |dims: &[usize], k: f32| {
            let n: usize = dims.iter().product();
            Tensor::from_vec(
                (0..n)
                    .map(|i| (i as f32 * 0.37 + k).sin())
                    .collect::<Vec<f32>>(),
                dims,
                &dev,
            )
            .unwrap()
        };
        let shared = t(&[2, 3, 4], seed);
        let layer = |name: &str, a: Tensor, d_out: usize, k: f32| LayerCapture {
            name: name.into(),
            a,
            delta: t(&[2, 3, d_out], k),
            has_bias: false,
        };
        Capture {
            layers: vec![
                layer("q", shared.clone(), 4, seed + 1.0),
                layer("k", shared, 2, seed + 2.0),
                layer("o", t(&[2, 3, 5], seed + 3.0), 4, seed + 4.0),
            ],
            losses: vec![seed, seed + 0.5],
            targets: Tensor::from_vec(vec![1u32, 2, 0, 3, 0, 0], (2, 3), &dev).unwrap(),
            attention_mask: Tensor::from_vec(vec![1f32, 1., 1., 1., 1., 0.], (2, 3), &dev).unwrap(),
            prediction_mask: Tensor::from_vec(vec![1f32, 1., 0., 1., 0., 0.], (2, 3), &dev)
                .unwrap(),
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        match t.dtype() {
            DType::U32 => t.flatten_all().unwrap().to_vec1().unwrap(),
            _ => (t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .iter()
                .map(|x| x.to_bits())
                .collect(),
        }
    }

    #[test]
    fn spills_stop_at_their_budget_and_then_keep_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // One batch is 528 bytes: room for one, not two.
        let mut spills = Spills {
            dir: Some(dir.path().to_path_buf()),
            budget: 800,
            kept: Vec::new(),
        };
        let mut first = spills.open();
        spills.push(&mut first, &capture(0.0), &[3, 2]);
        assert_eq!(first.as_ref().map(CaptureSpill::len), Some(1));
        spills.kept.push(first);
        let mut second = spills.open();
        spills.push(&mut second, &capture(1.0), &[3, 2]);
        spills.push(&mut second, &capture(2.0), &[3, 2]);
        // Over budget: this checkpoint's spill and the earlier ones are dropped, and no
        // later checkpoint spills.
        assert!(second.is_none());
        assert!(spills.kept.iter().all(Option::is_none));
        assert!(spills.open().is_none());
        // Off the CPU nothing is spilled.
        assert!(Spills::new(Some(dir.path().to_path_buf()), false)
            .open()
            .is_none());
    }

    #[test]
    fn batches_come_back_exactly_with_shared_inputs_shared() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = CaptureSpill::create(dir.path()).unwrap();
        let caps = [capture(0.0), capture(1.0)];
        s.push(&caps[0], &[3, 2]).unwrap();
        s.push(&caps[1], &[3, 1]).unwrap();
        assert_eq!(s.len(), 2);
        // Written once: the shared input (24 floats), the other input (30), three δ
        // (24 + 12 + 24), targets and two masks (6 each): 132 values of 4 bytes per batch.
        assert_eq!(s.bytes(), 2 * 132 * 4);
        // Read out of order: each batch is found by its own offsets.
        for i in [1, 0] {
            let (got, lengths) = s.read(i).unwrap();
            let want = &caps[i];
            assert_eq!(lengths, [vec![3, 2], vec![3, 1]][i]);
            assert_eq!(got.losses, want.losses);
            for (g, w) in got.layers.iter().zip(&want.layers) {
                assert_eq!((&g.name, g.has_bias), (&w.name, w.has_bias));
                assert_eq!(g.a.dims(), w.a.dims());
                assert_eq!(bits(&g.a), bits(&w.a));
                assert_eq!(bits(&g.delta), bits(&w.delta));
            }
            assert_eq!(got.input_groups(), want.input_groups());
            assert_eq!(got.input_groups(), vec![0, 0, 2]);
            assert_eq!(bits(&got.targets), bits(&want.targets));
            assert_eq!(bits(&got.attention_mask), bits(&want.attention_mask));
            assert_eq!(bits(&got.prediction_mask), bits(&want.prediction_mask));
        }
        assert!(s.read(2).is_err());
        // Another set of layers is refused.
        let mut other = capture(2.0);
        other.layers.pop();
        assert!(s.push(&other, &[3, 3]).is_err());
    }
}
