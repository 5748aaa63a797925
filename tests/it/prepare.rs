//! `prepare`: every data format and document shape, loss masks, truncation counts, the
//! Parquet table, and bad input as clear errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray};
use arrow_schema::{Field, Schema};
use source_tda::config::DatasetConfig;
use source_tda::data::tokenize::load_tokenizer;
use source_tda::data::{load_docs, read_prepared, tokenize_docs, write_prepared, Content};

use crate::common::{demo_tokenizer, write};

fn ds(extra: &str) -> DatasetConfig {
    toml::from_str(&format!("id = \"x\"\n{extra}")).unwrap()
}

fn err_of(files: &[&Path], d: &DatasetConfig) -> String {
    load_docs(files, d).unwrap_err().to_string()
}

fn parquet_file(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap();
    source_tda::output::parquet::write_batches(path, &[batch], None).unwrap();
}

fn texts(docs: &[source_tda::data::RawDoc]) -> Vec<String> {
    docs.iter()
        .map(|d| match &d.content {
            Content::Text(t) => t.clone(),
            Content::PromptCompletion { prompt, completion } => format!("{prompt}|{completion}"),
            Content::Messages(m) => serde_json::to_string(m).unwrap(),
        })
        .collect()
}

#[test]
fn jsonl_json_array_csv_and_parquet_read_the_same_documents() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write(
        &p.join("a.jsonl"),
        "{\"text\": \"first doc\", \"id\": 7}\n\n{\"text\": \"second, \\\"quoted\\\"\", \"id\": 8}\n",
    );
    write(
        &p.join("a.json"),
        "[{\"text\": \"first doc\", \"id\": 7}, {\"text\": \"second, \\\"quoted\\\"\", \"id\": 8}]",
    );
    write(
        &p.join("a.csv"),
        "id,text\n7,first doc\n8,\"second, \"\"quoted\"\"\"\n",
    );
    parquet_file(
        &p.join("a.parquet"),
        vec![
            (
                "text",
                Arc::new(StringArray::from(vec!["first doc", "second, \"quoted\""])) as ArrayRef,
            ),
            ("id", Arc::new(Int64Array::from(vec![7, 8])) as ArrayRef),
        ],
    );
    let d = ds("id_column = \"id\"\n");
    let want = vec!["first doc".to_string(), "second, \"quoted\"".to_string()];
    for f in ["a.jsonl", "a.json", "a.csv", "a.parquet"] {
        let docs = load_docs(&[&p.join(f)], &d).unwrap();
        assert_eq!(texts(&docs), want, "{f}");
        assert_eq!(docs[0].id, "7", "{f}");
        assert_eq!(docs[1].id, "8", "{f}");
    }
    // Without an id column, ids are SPLIT-ROW across files.
    let docs = load_docs(&[&p.join("a.jsonl"), &p.join("a.csv")], &ds("")).unwrap();
    let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["train-0", "train-1", "train-2", "train-3"]);
    assert!(
        docs[1].location.ends_with("a.jsonl:3"),
        "{}",
        docs[1].location
    );
    assert!(
        docs[3].location.ends_with("a.csv:3"),
        "{}",
        docs[3].location
    );
    // max_documents.
    let docs = load_docs(
        &[&p.join("a.jsonl"), &p.join("a.csv")],
        &ds("max_documents = 3\n"),
    )
    .unwrap();
    assert_eq!(docs.len(), 3);
}

#[test]
fn custom_columns_and_prompt_completion_shape() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("q.jsonl");
    write(&f, "{\"q\": \"Capital of France?\", \"a\": \" Paris\"}\n");
    let d = ds("shape = \"prompt_completion\"\nprompt_column = \"q\"\ncompletion_column = \"a\"\n");
    let docs = load_docs(&[&f], &d).unwrap();
    assert_eq!(texts(&docs), ["Capital of France?| Paris"]);
}

#[test]
fn bad_input_is_a_clear_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = ds("");

    write(
        &p.join("bad.jsonl"),
        "{\"text\": \"ok\"}\n{\"text\": \"oops\"\n",
    );
    let e = err_of(&[&p.join("bad.jsonl")], &d);
    assert!(e.contains("bad.jsonl:2: malformed JSON line"), "{e}");

    write(
        &p.join("empty.jsonl"),
        "{\"text\": \"ok\"}\n{\"text\": \"   \"}\n",
    );
    let e = err_of(&[&p.join("empty.jsonl")], &d);
    assert!(e.contains("empty.jsonl:2") && e.contains("is empty"), "{e}");

    write(&p.join("col.jsonl"), "{\"body\": \"x\"}\n");
    let e = err_of(&[&p.join("col.jsonl")], &d);
    assert!(
        e.contains("col.jsonl:1: no column `text`; columns present: body"),
        "{e}"
    );

    let mut bytes = b"{\"text\": \"ok\"}\n{\"text\": \"caf".to_vec();
    bytes.extend([0xE9, b'"', b'}', b'\n']); // Latin-1 é: not UTF-8
    write(&p.join("latin1.jsonl"), &bytes);
    let e = err_of(&[&p.join("latin1.jsonl")], &d);
    assert!(e.contains("latin1.jsonl:2: not valid UTF-8"), "{e}");

    let mut bytes = b"text\nok\ncaf".to_vec();
    bytes.extend([0xE9, b'\n']);
    write(&p.join("latin1.csv"), &bytes);
    let e = err_of(&[&p.join("latin1.csv")], &d);
    assert!(
        e.contains("latin1.csv:3: column `text` is not valid UTF-8"),
        "{e}"
    );

    write(&p.join("nocol.csv"), "body\nx\n");
    let e = err_of(&[&p.join("nocol.csv")], &d);
    assert!(
        e.contains("nocol.csv:1: no column `text`; columns present: body"),
        "{e}"
    );

    write(&p.join("null.jsonl"), "{\"text\": null}\n");
    let e = err_of(&[&p.join("null.jsonl")], &d);
    assert!(e.contains("null.jsonl:1: column `text` is null"), "{e}");

    write(&p.join("num.jsonl"), "{\"text\": [1, 2]}\n");
    let e = err_of(&[&p.join("num.jsonl")], &d);
    assert!(
        e.contains("num.jsonl:1: column `text` holds an array"),
        "{e}"
    );

    write(
        &p.join("dup.jsonl"),
        "{\"text\": \"a\", \"id\": \"x\"}\n{\"text\": \"b\", \"id\": \"x\"}\n",
    );
    let e = err_of(&[&p.join("dup.jsonl")], &ds("id_column = \"id\"\n"));
    assert!(
        e.contains("dup.jsonl:2: document id `x` appears twice"),
        "{e}"
    );

    write(
        &p.join("nocompl.jsonl"),
        "{\"prompt\": \"a\", \"completion\": \"\"}\n",
    );
    let e = err_of(
        &[&p.join("nocompl.jsonl")],
        &ds("shape = \"prompt_completion\"\n"),
    );
    assert!(
        e.contains("nocompl.jsonl:1") && e.contains("empty completion"),
        "{e}"
    );

    let bin = BinaryArray::from(vec![&b"ok"[..], &[0xFFu8, 0xFE][..]]);
    parquet_file(
        &p.join("bin.parquet"),
        vec![("text", Arc::new(bin) as ArrayRef)],
    );
    let e = err_of(&[&p.join("bin.parquet")], &d);
    assert!(
        e.contains("bin.parquet:row 1: column `text` is not valid UTF-8"),
        "{e}"
    );

    parquet_file(
        &p.join("other.parquet"),
        vec![("body", Arc::new(StringArray::from(vec!["x"])) as ArrayRef)],
    );
    let e = err_of(&[&p.join("other.parquet")], &d);
    assert!(
        e.contains("other.parquet: no column `text`; columns present: body"),
        "{e}"
    );

    write(&p.join("none.jsonl"), "\n\n");
    let e = err_of(&[&p.join("none.jsonl")], &d);
    assert!(e.contains("has no documents"), "{e}");

    write(&p.join("data.txt"), "hello");
    let e = err_of(&[&p.join("data.txt")], &d);
    assert!(e.contains("cannot tell the format"), "{e}");
}

fn tokenize(d: &DatasetConfig, lines: &str) -> source_tda::data::Prepared {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.jsonl");
    write(&f, lines);
    let docs = load_docs(&[&f], d).unwrap();
    let tok_path: PathBuf = demo_tokenizer();
    let tok = load_tokenizer(&tok_path).unwrap();
    tokenize_docs(&tok, &tok_path, &docs, d, None, "test").unwrap()
}

#[test]
fn text_documents_target_every_token_but_the_first() {
    let p = tokenize(&ds(""), "{\"text\": \"The river flows into the lake.\"}\n");
    let doc = &p.docs[0];
    let tok = load_tokenizer(&demo_tokenizer()).unwrap();
    let ids = tok
        .encode("The river flows into the lake.", true)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(doc.input_ids, ids);
    assert!(ids.len() > 3);
    let mut want = vec![1u8; ids.len()];
    want[0] = 0;
    assert_eq!(doc.loss_mask, want);
    assert_eq!(p.stats.loss_tokens, ids.len() - 1);
    assert_eq!(p.stats.truncated_documents, 0);
}

#[test]
fn prompt_completion_masks_only_completion_tokens() {
    let d = ds("shape = \"prompt_completion\"\n");
    let p = tokenize(
        &d,
        "{\"prompt\": \"The river Navo flows into\", \"completion\": \" Lake Tarsk.\"}\n",
    );
    let doc = &p.docs[0];
    let tok = load_tokenizer(&demo_tokenizer()).unwrap();
    let prompt_ids = tok
        .encode("The river Navo flows into", true)
        .unwrap()
        .get_ids()
        .to_vec();
    let full = tok
        .encode("The river Navo flows into Lake Tarsk.", true)
        .unwrap();
    assert_eq!(doc.input_ids, full.get_ids());
    assert_eq!(
        &doc.input_ids[..prompt_ids.len()],
        &prompt_ids[..],
        "prompt is a prefix here"
    );
    let n_completion = full.get_ids().len() - prompt_ids.len();
    let want: Vec<u8> = (0..full.get_ids().len())
        .map(|t| (t >= prompt_ids.len()) as u8)
        .collect();
    assert_eq!(doc.loss_mask, want);
    assert_eq!(doc.n_loss_tokens(), n_completion);
    // The decoded completion tokens are the completion.
    let completion_ids: Vec<u32> = doc
        .input_ids
        .iter()
        .zip(&doc.loss_mask)
        .filter(|(_, m)| **m == 1)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(tok.decode(&completion_ids, false).unwrap(), " Lake Tarsk.");
    assert_eq!(doc.prompt.as_deref(), Some("The river Navo flows into"));
}

#[test]
fn chat_template_wraps_the_prompt() {
    let d = ds("shape = \"prompt_completion\"\nchat_template = \"Q: {prompt}\\nA:\"\n");
    let p = tokenize(&d, "{\"prompt\": \"Where?\", \"completion\": \" Here.\"}\n");
    assert_eq!(p.docs[0].text, "Q: Where?\nA: Here.");
    assert_eq!(p.docs[0].prompt.as_deref(), Some("Where?"));
    let d = ds("shape = \"prompt_completion\"\nchat_template = \"chatml\"\n");
    let p = tokenize(&d, "{\"prompt\": \"Where?\", \"completion\": \"Here.\"}\n");
    assert_eq!(
        p.docs[0].text,
        "<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\nHere."
    );
}

#[test]
fn truncation_is_counted_never_silent() {
    let long = "word ".repeat(100);
    let lines = format!("{{\"text\": \"{long}\"}}\n{{\"text\": \"short one\"}}\n");
    let full = tokenize(&ds(""), &lines);
    let n0 = full.docs[0].n_tokens();
    assert!(n0 > 20);
    let p = tokenize(&ds("max_length = 20\n"), &lines);
    assert_eq!(p.docs[0].n_tokens(), 20);
    assert_eq!(p.docs[0].input_ids, full.docs[0].input_ids[..20]);
    assert_eq!(p.docs[0].truncated_tokens as usize, n0 - 20);
    assert_eq!(p.docs[1].truncated_tokens, 0);
    assert_eq!(p.stats.truncated_documents, 1);
    assert_eq!(p.stats.truncated_tokens, n0 - 20);
    assert_eq!(p.stats.max_tokens, 20);

    // A completion cut off entirely leaves no loss tokens: an error, not an empty document.
    let d = ds("shape = \"prompt_completion\"\nmax_length = 4\n");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.jsonl");
    write(
        &f,
        format!("{{\"prompt\": \"{long}\", \"completion\": \" end\"}}\n"),
    );
    let docs = load_docs(&[&f], &d).unwrap();
    let tok = load_tokenizer(&demo_tokenizer()).unwrap();
    let e = tokenize_docs(&tok, &demo_tokenizer(), &docs, &d, None, "t")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no loss tokens") && e.contains("raise max_length"),
        "{e}"
    );
}

#[test]
fn prepared_table_round_trips_with_metadata() {
    let p = tokenize(
        &ds("shape = \"prompt_completion\"\n"),
        "{\"prompt\": \"a b\", \"completion\": \" c d\"}\n{\"prompt\": \"e\", \"completion\": \" f\"}\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    write_prepared(&path, &p.docs, &[("k".into(), "v".into())]).unwrap();
    let (back, meta) = read_prepared(&path).unwrap();
    assert_eq!(back, p.docs);
    assert_eq!(meta.get("k").map(String::as_str), Some("v"));
}

#[test]
fn tokenisation_is_deterministic_across_runs() {
    let lines: String = (0..1500)
        .map(|i| {
            format!(
                "{{\"text\": \"document number {i} about the river {}\"}}\n",
                i * 7
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.jsonl");
    write(&f, lines);
    let d = ds("");
    let docs = load_docs(&[&f], &d).unwrap();
    let tok = load_tokenizer(&demo_tokenizer()).unwrap();
    let a = tokenize_docs(&tok, &demo_tokenizer(), &docs, &d, None, "a").unwrap();
    let b = tokenize_docs(&tok, &demo_tokenizer(), &docs, &d, None, "b").unwrap();
    assert_eq!(a.docs.len(), 1500);
    assert!(a.docs == b.docs, "tokenisation differs between two runs");
}
