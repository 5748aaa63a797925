//! Owns the fine-tuning logs as Parquet: `write_loss_parquet` and `write_visits_parquet`.
//! Layer: train — may import the ground, linalg, backend, model, data, hub and, in this folder,
//! checkpoint.rs.
//!
//! The fine-tuning logs as Parquet (zstd): `loss.parquet`, one row per optimizer step
//! (step, lr, loss, grad_norm, n_docs, n_tokens, micro_batches), and `visit_order.parquet`,
//! one row per document visit (step, doc_index, doc_id) in the order training saw them; and
//! the mean loss per epoch, [`epoch_means`].

use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;

use crate::error::{Error, IoContext, Result};

use super::checkpoint::StepLog;

fn write(path: &Path, schema: Arc<Schema>, columns: Vec<ArrayRef>) -> Result<()> {
    let file = std::fs::File::create(path).ctx("creating", path)?;
    let props = crate::output::parquet::writer_properties(&[(
        "source_tda.version".into(),
        crate::VERSION.to_string(),
    )]);
    let batch =
        RecordBatch::try_new(schema.clone(), columns).map_err(|e| Error::parquet(path, e))?;
    let mut w =
        ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| Error::parquet(path, e))?;
    w.write(&batch).map_err(|e| Error::parquet(path, e))?;
    w.close().map_err(|e| Error::parquet(path, e))?;
    Ok(())
}

/// `values` as a signed column (the tables hold no UINT64, which Spark reads as a decimal); a
/// value past i64::MAX is refused naming the file and column.
fn signed(path: &Path, column: &str, values: impl Iterator<Item = u64>) -> Result<Int64Array> {
    values
        .map(|v| {
            i64::try_from(v).map_err(|_| {
                Error::parquet(
                    path,
                    format!("column `{column}`: {v} does not fit a signed 64-bit integer"),
                )
            })
        })
        .collect::<Result<Vec<i64>>>()
        .map(Int64Array::from)
}

/// Writes the per-step log.
pub fn write_loss_parquet(path: &Path, log: &[StepLog]) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("step", DataType::Int64, false),
        Field::new("lr", DataType::Float64, false),
        Field::new("loss", DataType::Float64, false),
        Field::new("grad_norm", DataType::Float64, false),
        Field::new("n_docs", DataType::UInt32, false),
        Field::new("n_tokens", DataType::Int64, false),
        Field::new("micro_batches", DataType::UInt32, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(signed(path, "step", log.iter().map(|r| r.step))?),
        Arc::new(Float64Array::from_iter_values(log.iter().map(|r| r.lr))),
        Arc::new(Float64Array::from_iter_values(log.iter().map(|r| r.loss))),
        Arc::new(Float64Array::from_iter_values(
            log.iter().map(|r| r.grad_norm),
        )),
        Arc::new(UInt32Array::from_iter_values(log.iter().map(|r| r.n_docs))),
        Arc::new(signed(path, "n_tokens", log.iter().map(|r| r.n_tokens))?),
        Arc::new(UInt32Array::from_iter_values(
            log.iter().map(|r| r.micro_batches),
        )),
    ];
    write(path, schema, columns)
}

/// The mean of the step losses J of each epoch of `log` (one stage's steps, in order from its
/// first): epoch e holds the steps e·spe + 1 ..= (e + 1)·spe counted from the stage's start.
/// A last, partial epoch (a `max_steps` cut) gets the mean of the steps it has.
pub fn epoch_means(log: &[StepLog], steps_per_epoch: u64) -> Vec<f64> {
    let spe = steps_per_epoch.max(1);
    let Some(first) = log.first().map(|r| r.step) else {
        return Vec::new();
    };
    let mut sums: Vec<(f64, u64)> = Vec::new();
    for r in log {
        let e = ((r.step - first) / spe) as usize;
        if sums.len() <= e {
            sums.resize(e + 1, (0.0, 0));
        }
        sums[e].0 += r.loss;
        sums[e].1 += 1;
    }
    sums.iter()
        .map(|&(s, n)| if n == 0 { f64::NAN } else { s / n as f64 })
        .collect()
}

/// Writes the visit order: (step, doc_index) pairs with the document ids.
pub fn write_visits_parquet(path: &Path, visits: &[(u64, u32)], doc_ids: &[String]) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("step", DataType::Int64, false),
        Field::new("doc_index", DataType::UInt32, false),
        Field::new("doc_id", DataType::Utf8, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(signed(path, "step", visits.iter().map(|v| v.0))?),
        Arc::new(UInt32Array::from_iter_values(visits.iter().map(|v| v.1))),
        Arc::new(StringArray::from_iter_values(
            visits.iter().map(|v| doc_ids[v.1 as usize].as_str()),
        )),
    ];
    write(path, schema, columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64, loss: f64) -> StepLog {
        StepLog {
            step,
            lr: 0.1,
            loss,
            grad_norm: 1.0,
            n_docs: 2,
            n_tokens: 10,
            micro_batches: 1,
        }
    }

    #[test]
    fn epoch_means_group_steps_from_the_stage_start() {
        // A second stage starting at global step 11, 3 steps per epoch, 7 steps (max_steps).
        let losses = [6.0, 3.0, 9.0, 2.0, 2.0, 5.0, 1.0];
        let log: Vec<StepLog> = (0..7).map(|i| step(11 + i, losses[i as usize])).collect();
        assert_eq!(epoch_means(&log, 3), vec![6.0, 3.0, 1.0]);
        assert_eq!(epoch_means(&log, 100), vec![28.0 / 7.0]);
        assert!(epoch_means(&[], 3).is_empty());
    }

    #[test]
    fn steps_and_token_counts_are_signed_and_overflow_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.parquet");
        write_loss_parquet(&path, &[step(1, 2.0), step(2, 1.0)]).unwrap();
        let b = &crate::output::parquet::read_batches(&path).unwrap()[0];
        for c in ["step", "n_tokens"] {
            assert_eq!(
                b.schema().field_with_name(c).unwrap().data_type(),
                &DataType::Int64
            );
        }
        let visits = dir.path().join("visits.parquet");
        write_visits_parquet(&visits, &[(3, 0)], &["a".into()]).unwrap();
        let b = &crate::output::parquet::read_batches(&visits).unwrap()[0];
        assert_eq!(
            b.schema().field_with_name("step").unwrap().data_type(),
            &DataType::Int64
        );
        let e = write_visits_parquet(&visits, &[(u64::MAX, 0)], &["a".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("visits.parquet") && e.contains("`step`"), "{e}");
        assert!(e.contains("does not fit a signed 64-bit integer"), "{e}");
    }
}
