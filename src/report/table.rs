//! Owns `Table`: the tool's Parquet tables read back by column name.
//! Layer: report — may import every floor from the ground up to pipeline; no sibling.
//!
//! Reading the tool's Parquet tables back by column name, with errors that name the file and
//! the column (and say which stage to rerun).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::ArrowPrimitiveType;
use arrow_array::types::{Float32Type, Float64Type, Int64Type, UInt32Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;

use crate::error::{Error, Result};

/// A Parquet file read into memory: its record batches and key-value metadata.
pub struct Table {
    path: std::path::PathBuf,
    batches: Vec<RecordBatch>,
    /// The file's key-value metadata (`source_tda.*`).
    pub metadata: HashMap<String, String>,
}

impl Table {
    /// Reads every row of `path`.
    pub fn read(path: &Path) -> Result<Table> {
        let (builder, metadata) = crate::output::parquet::open_table(path)?;
        let reader = builder.build().map_err(|e| Error::parquet(path, e))?;
        let batches = reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::parquet(path, e))?;
        Ok(Table {
            path: path.to_path_buf(),
            batches,
            metadata,
        })
    }

    /// Every row of the dataset folder `root` (a query set's scores, `shard=I/part-*.parquet`,
    /// [`crate::output::dataset::part_files`]) as one table; the metadata is the first part's.
    pub fn read_parts(root: &Path) -> Result<Table> {
        let mut parts = crate::output::dataset::part_files(root)?.into_iter();
        let first = parts.next().expect("part_files refuses an empty dataset");
        let mut t = Table::read(&first)?;
        for p in parts {
            t.batches.extend(Table::read(&p)?.batches);
        }
        t.path = root.to_path_buf();
        Ok(t)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Names of the columns, in file order.
    pub fn column_names(&self) -> Vec<String> {
        self.batches
            .first()
            .map(|b| {
                b.schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn arrays(&self, name: &str) -> Result<Vec<&dyn Array>> {
        self.batches
            .iter()
            .map(|b| {
                b.column_by_name(name).map(|a| a.as_ref()).ok_or_else(|| {
                    Error::parquet(
                        &self.path,
                        format!(
                            "no column `{name}` (columns: {}); the file was written by another \
                             version of the tool: rerun the stage that wrote it",
                            self.column_names().join(", ")
                        ),
                    )
                })
            })
            .collect()
    }

    fn wrong_type(&self, name: &str, want: &str, got: &DataType) -> Error {
        Error::parquet(
            &self.path,
            format!("column `{name}` has type {got}, expected {want}"),
        )
    }

    /// A UTF-8 column (nulls read as "").
    pub fn strings(&self, name: &str) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(self.len());
        for a in self.arrays(name)? {
            match a.data_type() {
                DataType::Utf8 => out.extend(
                    a.as_string::<i32>()
                        .iter()
                        .map(|s| s.unwrap_or_default().to_string()),
                ),
                DataType::LargeUtf8 => out.extend(
                    a.as_string::<i64>()
                        .iter()
                        .map(|s| s.unwrap_or_default().to_string()),
                ),
                other => return Err(self.wrong_type(name, "a string", other)),
            }
        }
        Ok(out)
    }

    /// A numeric column (f64, f32, u32 or i64) as f64 (nulls read as NaN).
    pub fn floats(&self, name: &str) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(self.len());
        for a in self.arrays(name)? {
            match a.data_type() {
                DataType::Float64 => out.extend(widened::<Float64Type>(a, |x| x)),
                DataType::Float32 => out.extend(widened::<Float32Type>(a, f64::from)),
                DataType::UInt32 => out.extend(widened::<UInt32Type>(a, f64::from)),
                DataType::Int64 => out.extend(widened::<Int64Type>(a, |x| x as f64)),
                other => return Err(self.wrong_type(name, "a number", other)),
            }
        }
        Ok(out)
    }

    /// A boolean column (nulls read as false).
    pub fn bools(&self, name: &str) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(self.len());
        for a in self.arrays(name)? {
            match a.data_type() {
                DataType::Boolean => {
                    let b = a.as_boolean();
                    out.extend((0..b.len()).map(|i| b.is_valid(i) && b.value(i)));
                }
                other => return Err(self.wrong_type(name, "a boolean", other)),
            }
        }
        Ok(out)
    }

    /// An unsigned integer column (u32; nulls read as 0).
    pub fn u32s(&self, name: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(self.len());
        for a in self.arrays(name)? {
            match a.data_type() {
                DataType::UInt32 => {
                    let p = a.as_primitive::<UInt32Type>();
                    out.extend((0..p.len()).map(|i| if p.is_valid(i) { p.value(i) } else { 0 }));
                }
                other => return Err(self.wrong_type(name, "u32", other)),
            }
        }
        Ok(out)
    }
}

/// The values of primitive array `a` (of type `T`) as f64 by `f`, nulls as NaN.
fn widened<'a, T: ArrowPrimitiveType>(
    a: &'a dyn Array,
    f: impl Fn(T::Native) -> f64 + 'a,
) -> impl Iterator<Item = f64> + 'a {
    let p = a.as_primitive::<T>();
    (0..p.len()).map(move |i| {
        if p.is_valid(i) {
            f(p.value(i))
        } else {
            f64::NAN
        }
    })
}

/// The text of each `wanted` (dataset, train_id) document, from the score stage's
/// `train_docs.parquet` in `dir`.
pub fn doc_texts(
    dir: &Path,
    wanted: &HashSet<(String, String)>,
) -> Result<HashMap<(String, String), String>> {
    let docs = Table::read(&dir.join("train_docs.parquet"))?;
    let mut texts = HashMap::new();
    for ((d, t), text) in docs
        .strings("dataset")?
        .into_iter()
        .zip(docs.strings("train_id")?)
        .zip(docs.strings("text")?)
    {
        let key = (d, t);
        if wanted.contains(&key) {
            texts.insert(key, text);
        }
    }
    Ok(texts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{write_table, Column};

    #[test]
    fn reads_back_what_the_writer_wrote_and_names_missing_columns() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.parquet");
        write_table(
            &p,
            &[
                ("id", Column::Str(vec!["a".into(), "b".into()])),
                ("x", Column::F32(vec![1.5, -2.0])),
                ("n", Column::U32(vec![3, 4])),
            ],
            &[("k".into(), "v".into())],
        )
        .unwrap();
        let t = Table::read(&p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.strings("id").unwrap(), ["a", "b"]);
        assert_eq!(t.floats("x").unwrap(), [1.5, -2.0]);
        assert_eq!(t.floats("n").unwrap(), [3.0, 4.0]);
        assert_eq!(t.u32s("n").unwrap(), [3, 4]);
        assert_eq!(t.metadata["k"], "v");
        let e = t.floats("y").unwrap_err().to_string();
        assert!(
            e.contains("t.parquet") && e.contains("no column `y`"),
            "{e}"
        );
        let e = t.floats("id").unwrap_err().to_string();
        assert!(e.contains("column `id` has type Utf8"), "{e}");
    }
}
