//! Owns the prepared-documents table: `write_prepared`, `read_prepared`, and its streamed
//! reading (`for_each_prepared`, `count_prepared`).
//! Layer: data — may import the ground, linalg, backend, model and, in this folder, tokenize.rs.
//!
//! The prepared-documents table (`prepare/ROLE.parquet`, zstd):
//!
//! | column | type | meaning |
//! |---|---|---|
//! | doc_id | utf8 | document id |
//! | text | utf8 | the text as tokenised (templated prompt + completion for that shape) |
//! | prompt, completion | utf8, nullable | prompt/completion documents |
//! | input_ids | `list<uint32>` | token ids |
//! | loss_mask | `list<uint8>` | 1 where the token is a loss target |
//! | n_tokens, n_loss_tokens, truncated_tokens | uint32 | counts |
//! | source | utf8 | `FILE:LINE` of the document |

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, UInt32Builder, UInt8Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{UInt32Type, UInt8Type};
use arrow_array::{Array, ArrayRef, RecordBatch, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;

use crate::error::{Error, IoContext, Result};

use super::tokenize::PreparedDoc;

/// Rows per Parquet row group.
const ROW_GROUP: usize = 4096;

fn schema() -> Arc<Schema> {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    Arc::new(Schema::new(vec![
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, true),
        Field::new("completion", DataType::Utf8, true),
        Field::new("input_ids", list(DataType::UInt32), false),
        Field::new("loss_mask", list(DataType::UInt8), false),
        Field::new("n_tokens", DataType::UInt32, false),
        Field::new("n_loss_tokens", DataType::UInt32, false),
        Field::new("truncated_tokens", DataType::UInt32, false),
        Field::new("source", DataType::Utf8, false),
    ]))
}

/// Writes `docs` to `path` (zstd, row groups of 4096) with key-value `metadata`.
pub fn write_prepared(
    path: &Path,
    docs: &[PreparedDoc],
    metadata: &[(String, String)],
) -> Result<()> {
    let schema = schema();
    let file = std::fs::File::create(path).ctx("creating", path)?;
    let props = crate::output::parquet::writer_properties(metadata);
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
        .map_err(|e| Error::parquet(path, e))?;
    for chunk in docs.chunks(ROW_GROUP) {
        let batch = to_batch(&schema, chunk).map_err(|e| Error::parquet(path, e))?;
        writer.write(&batch).map_err(|e| Error::parquet(path, e))?;
        writer.flush().map_err(|e| Error::parquet(path, e))?;
    }
    writer.close().map_err(|e| Error::parquet(path, e))?;
    Ok(())
}

fn to_batch(
    schema: &Arc<Schema>,
    docs: &[PreparedDoc],
) -> std::result::Result<RecordBatch, arrow_schema::ArrowError> {
    let mut doc_id = StringBuilder::new();
    let mut text = StringBuilder::new();
    let mut prompt = StringBuilder::new();
    let mut completion = StringBuilder::new();
    let mut ids = ListBuilder::new(UInt32Builder::new());
    let mut mask = ListBuilder::new(UInt8Builder::new());
    let mut source = StringBuilder::new();
    for d in docs {
        doc_id.append_value(&d.doc_id);
        text.append_value(&d.text);
        prompt.append_option(d.prompt.as_deref());
        completion.append_option(d.completion.as_deref());
        ids.values().append_slice(&d.input_ids);
        ids.append(true);
        mask.values().append_slice(&d.loss_mask);
        mask.append(true);
        source.append_value(&d.source);
    }
    let u32s = |f: &dyn Fn(&PreparedDoc) -> u32| -> ArrayRef {
        Arc::new(UInt32Array::from_iter_values(docs.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(doc_id.finish()),
        Arc::new(text.finish()),
        Arc::new(prompt.finish()),
        Arc::new(completion.finish()),
        Arc::new(ids.finish()),
        Arc::new(mask.finish()),
        u32s(&|d| d.n_tokens() as u32),
        u32s(&|d| d.n_loss_tokens() as u32),
        u32s(&|d| d.truncated_tokens),
        Arc::new(source.finish()),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

/// Reads a prepared table back, with its key-value metadata.
pub fn read_prepared(path: &Path) -> Result<(Vec<PreparedDoc>, HashMap<String, String>)> {
    let mut docs = Vec::new();
    let metadata = for_each_prepared(path, |_, batch| {
        docs.extend(batch);
        Ok(())
    })?;
    Ok((docs, metadata))
}

/// The number of documents in a prepared table, from its footer (nothing else is read).
pub fn count_prepared(path: &Path) -> Result<usize> {
    let (builder, _) = crate::output::parquet::open_table(path)?;
    let n = builder.metadata().file_metadata().num_rows();
    usize::try_from(n).map_err(|_| Error::parquet(path, format!("{n} rows")))
}

/// Streams a prepared table: `f(first, docs)` for each record batch in file order, `first`
/// the position of `docs[0]` in the table, so that memory holds one batch (1024 rows), not
/// the table. Returns the table's key-value metadata.
pub fn for_each_prepared(
    path: &Path,
    mut f: impl FnMut(usize, Vec<PreparedDoc>) -> Result<()>,
) -> Result<HashMap<String, String>> {
    let (builder, metadata) = crate::output::parquet::open_table(path)?;
    let expected = schema();
    for field in expected.fields() {
        match builder.schema().field_with_name(field.name()) {
            Ok(have) if have.data_type() == field.data_type() => {}
            _ => {
                return Err(Error::parquet(
                    path,
                    format!(
                        "not a prepared-documents table: column `{}` ({}) is missing or has \
                         another type; rerun the prepare stage",
                        field.name(),
                        field.data_type()
                    ),
                ))
            }
        }
    }
    let reader = builder.build().map_err(|e| Error::parquet(path, e))?;
    let mut first = 0;
    for batch in reader {
        let b = batch.map_err(|e| Error::parquet(path, e))?;
        let s = |name: &str| {
            b.column_by_name(name)
                .expect("schema checked")
                .as_string::<i32>()
                .clone()
        };
        let (doc_id, text, prompt, completion, source) = (
            s("doc_id"),
            s("text"),
            s("prompt"),
            s("completion"),
            s("source"),
        );
        let ids = b
            .column_by_name("input_ids")
            .expect("schema checked")
            .as_list::<i32>()
            .clone();
        let mask = b
            .column_by_name("loss_mask")
            .expect("schema checked")
            .as_list::<i32>()
            .clone();
        let trunc = b
            .column_by_name("truncated_tokens")
            .expect("schema checked")
            .as_primitive::<UInt32Type>()
            .clone();
        let mut docs = Vec::with_capacity(b.num_rows());
        for r in 0..b.num_rows() {
            let opt =
                |a: &arrow_array::StringArray| (!a.is_null(r)).then(|| a.value(r).to_string());
            docs.push(PreparedDoc {
                doc_id: doc_id.value(r).to_string(),
                text: text.value(r).to_string(),
                prompt: opt(&prompt),
                completion: opt(&completion),
                input_ids: ids.value(r).as_primitive::<UInt32Type>().values().to_vec(),
                loss_mask: mask.value(r).as_primitive::<UInt8Type>().values().to_vec(),
                truncated_tokens: trunc.value(r),
                source: source.value(r).to_string(),
            });
        }
        let n = docs.len();
        f(first, docs)?;
        first += n;
    }
    Ok(metadata)
}
