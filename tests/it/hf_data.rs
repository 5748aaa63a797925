//! Hugging Face data as the Python libraries read it, against their own answers recorded in
//! `tests/data/hf-data/` by `make_reference.py` (datasets 5.2, transformers 5.25):
//! the files a `[data.X] config` and `split` select (`datasets.load_dataset_builder`), the
//! rows a split slice keeps (`datasets`' `ReadInstruction`), and a `messages` conversation
//! rendered with the published chat templates of Llama 3, Llama 3.2, Qwen 2.5, Qwen 3 and
//! SmolLM2 and tokenised (`transformers`' `apply_chat_template`), with the loss mask on the
//! assistant turns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use source_tda::config::{DatasetConfig, SplitSpec};
use source_tda::data::{load_docs, tokenize_docs, ChatTemplate, Content, RawDoc};
use source_tda::hub::dataset_files;
use tokenizers::{AddedToken, Tokenizer};

use crate::common::{repo_root, write};

fn pack() -> PathBuf {
    repo_root().join("tests/data/hf-data")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn dataset(split: &str, config: Option<&str>, extra: &str) -> DatasetConfig {
    let mut text = format!("id = \"x/y\"\nsplit = \"{split}\"\n{extra}");
    if let Some(c) = config {
        text.push_str(&format!("config = \"{c}\"\n"));
    }
    toml::from_str(&text).unwrap()
}

#[test]
fn file_selection_matches_datasets() {
    let cases = json(&pack().join("selection_cases.json"));
    let expected = json(&pack().join("selection_expected.json"));
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let readme = case["readme"].as_str();
        let mut names: Vec<String> = case["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        if readme.is_some() {
            names.push("README.md".into());
        }
        let queries = case["queries"].as_array().unwrap();
        let answers = expected["cases"][name].as_array().unwrap();
        for (q, want) in queries.iter().zip(answers) {
            let config = q[0].as_str();
            let split = q[1].as_str().unwrap();
            let got = dataset_files(&names, &dataset(split, config, ""), "x/y", readme);
            let what = format!("{name}: config {config:?}, split `{split}`");
            match (want.get("files"), want["module"].as_str()) {
                (Some(files), Some("json" | "csv" | "parquet")) => {
                    let files: Vec<String> = serde_json::from_value(files.clone()).unwrap();
                    assert_eq!(got.expect(&what), files, "{what}");
                }
                (Some(_), module) => {
                    let e = got.expect_err(&what).to_string();
                    assert!(
                        e.contains("format this tool does not read"),
                        "{what} ({module:?}): {e}"
                    );
                }
                (None, _) => {
                    let e = got.expect_err(&what).to_string();
                    if let Some(splits) = want["splits"].as_array() {
                        for s in splits {
                            assert!(e.contains(s.as_str().unwrap()), "{what}: {e}");
                        }
                        assert!(e.contains(&format!("no split `{split}`")), "{what}: {e}");
                    } else {
                        // The error names what the user can choose instead.
                        assert!(e.contains("config"), "{what}: {e}");
                    }
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 37);
}

#[test]
fn unknown_config_lists_the_available_ones() {
    let readme =
        "---\nconfigs:\n- config_name: en\n  data_files: en/*.jsonl\n- config_name: fr\n  \
                  data_files: fr/*.jsonl\n---\n";
    let names: Vec<String> = ["README.md", "en/a.jsonl", "fr/b.jsonl"]
        .map(String::from)
        .to_vec();
    let e = dataset_files(
        &names,
        &dataset("train", Some("de"), ""),
        "x/y",
        Some(readme),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("config `de`") && e.contains("`en`, `fr`"), "{e}");
    let folders: Vec<String> = ["a/train.jsonl", "b/train.jsonl"]
        .map(String::from)
        .to_vec();
    let e = dataset_files(&folders, &dataset("train", Some("c"), ""), "x/y", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a, b"), "{e}");
}

#[test]
fn split_slices_match_datasets() {
    let expected = json(&pack().join("slices_expected.json"));
    for row in expected["rows"].as_array().unwrap() {
        let spec = row["spec"].as_str().unwrap();
        let n = row["n"].as_u64().unwrap() as usize;
        let slice = SplitSpec::parse(spec).unwrap().slice.unwrap();
        let got = slice.rows(n);
        match (row["from"].as_i64(), row["to"].as_i64()) {
            (Some(from), Some(to)) => {
                let got = got.unwrap_or_else(|e| panic!("{spec} on {n}: {e}"));
                if from >= to {
                    assert!(got.is_empty(), "{spec} on {n}: {got:?}");
                } else {
                    assert_eq!(got, from as usize..to as usize, "{spec} on {n}");
                }
            }
            _ => assert!(got.is_err(), "{spec} on {n}: datasets refuses it"),
        }
    }
}

#[test]
fn sliced_split_reads_the_rows_across_files() {
    let d = tempfile::tempdir().unwrap();
    let rows = |from: usize, to: usize| -> String {
        (from..to)
            .map(|i| format!("{{\"text\": \"row {i}\"}}\n"))
            .collect()
    };
    write(&d.path().join("a.jsonl"), rows(0, 10));
    write(&d.path().join("b.jsonl"), rows(10, 25));
    let files = [d.path().join("a.jsonl"), d.path().join("b.jsonl")];
    let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    // 10% of 25 rows is 2.5, rounded to even: 2; 30% is 7.5: 8.
    let docs = load_docs(&files, &dataset("train[10%:30%]", None, "")).unwrap();
    let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        ["train-2", "train-3", "train-4", "train-5", "train-6", "train-7"]
    );
    let docs = load_docs(&files, &dataset("train[-3:]", None, "max_documents = 2\n")).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].content, Content::Text("row 22".into()));
    let e = load_docs(&files, &dataset("train[30:]", None, ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no documents"), "{e}");
}

/// SmolLM2's tokenizer with a family's special and added tokens, as chat_reference.py builds it.
fn family_tokenizer(fam: &Value) -> Tokenizer {
    let mut tok =
        Tokenizer::from_file(repo_root().join("tests/data/kronfluence-smollm2-2l/tokenizer.json"))
            .unwrap();
    let list = |k: &str| -> Vec<String> { serde_json::from_value(fam[k].clone()).unwrap() };
    let special: Vec<AddedToken> = list("special")
        .into_iter()
        .map(|t| AddedToken::from(t, true).normalized(false))
        .collect();
    tok.add_special_tokens(special).unwrap();
    let added: Vec<AddedToken> = list("added")
        .into_iter()
        .map(|t| AddedToken::from(t, false).normalized(false))
        .collect();
    tok.add_tokens(added).unwrap();
    tok
}

#[test]
fn chat_templates_match_transformers() {
    let chat_dir = pack().join("chat");
    let families = json(&chat_dir.join("families.json"));
    let conversations = json(&chat_dir.join("conversations.json"));
    let expected = json(&pack().join("chat_expected.json"));
    let mut checked = 0;
    for (name, fam) in families["families"].as_object().unwrap() {
        let source =
            std::fs::read_to_string(chat_dir.join(fam["template"].as_str().unwrap())).unwrap();
        let mut vars: BTreeMap<String, Value> =
            serde_json::from_value(fam["tokens"].clone()).unwrap();
        vars.extend(
            serde_json::from_value::<BTreeMap<String, Value>>(fam["kwargs"].clone()).unwrap(),
        );
        let chat = ChatTemplate::new(&source, name, vars).unwrap();
        let tok = family_tokenizer(fam);
        let eos = fam["tokens"]["eos_token"].as_str().unwrap();
        for conv in conversations.as_array().unwrap() {
            let cname = conv["name"].as_str().unwrap();
            let what = format!("{name} / {cname}");
            let want = &expected["results"][name][cname];
            let messages = conv["messages"].as_array().unwrap().clone();
            let (text, spans) = chat.assistant_spans(&messages).unwrap();
            assert_eq!(text, want["text"].as_str().unwrap(), "{what}: text");
            let want_spans: Vec<(usize, usize)> = want["turns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    assert!(t["prefix_is_prefix"].as_bool().unwrap());
                    (
                        t["start"].as_u64().unwrap() as usize,
                        t["content_end"].as_u64().unwrap() as usize,
                    )
                })
                .collect();
            let got_spans: Vec<(usize, usize)> = spans.iter().map(|r| (r.start, r.end)).collect();
            assert_eq!(got_spans, want_spans, "{what}: assistant spans");

            // End to end through the prepare stage's tokenisation.
            let ds = dataset("train", None, "shape = \"messages\"\nmax_length = 4096\n");
            let doc = RawDoc {
                id: "d".into(),
                location: what.clone(),
                content: Content::Messages(messages.clone()),
            };
            let prepared = tokenize_docs(&tok, Path::new(name), &[doc], &ds, Some(&chat), "t")
                .unwrap()
                .docs
                .remove(0);
            let want_ids: Vec<u32> = serde_json::from_value(want["ids"].clone()).unwrap();
            assert_eq!(prepared.input_ids, want_ids, "{what}: token ids");
            // The targets: the tokens inside each assistant span, then its end-of-turn token.
            let enc = tok.encode(text.as_str(), false).unwrap();
            let eos_id = tok.token_to_id(eos).unwrap();
            for (t, (&(s, e), &m)) in enc
                .get_offsets()
                .iter()
                .zip(&prepared.loss_mask)
                .enumerate()
            {
                let inside = spans.iter().any(|r| s >= r.start && e <= r.end && s < e);
                let outside = spans.iter().all(|r| e <= r.start || s >= r.end);
                let closes = spans.iter().any(|r| s == r.end) && want_ids[t] == eos_id;
                if inside || closes {
                    assert_eq!(
                        m,
                        1,
                        "{what}: token {t} `{}` is the assistant's",
                        &text[s..e]
                    );
                } else if outside {
                    assert_eq!(
                        m,
                        0,
                        "{what}: token {t} `{}` is not the assistant's",
                        &text[s..e]
                    );
                }
            }
            let closing = spans
                .iter()
                .filter(|r| {
                    enc.get_offsets()
                        .iter()
                        .zip(&want_ids)
                        .any(|(o, &id)| o.0 == r.end && id == eos_id)
                })
                .count();
            assert_eq!(closing, spans.len(), "{what}: every turn ends with `{eos}`");
            checked += 1;
        }
    }
    assert_eq!(checked, 20);
}

#[test]
fn messages_column_from_parquet_and_jsonl() {
    use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
    use arrow_schema::{DataType, Field, Fields};
    let d = tempfile::tempdir().unwrap();
    let conv = r#"[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]"#;
    write(
        &d.path().join("a.jsonl"),
        format!("{{\"messages\": {conv}}}\n"),
    );
    let fields = Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ]);
    let mut list = ListBuilder::new(StructBuilder::from_fields(fields.clone(), 2));
    for (role, content) in [("user", "Hi"), ("assistant", "Hello!")] {
        let s = list.values();
        s.field_builder::<StringBuilder>(0)
            .unwrap()
            .append_value(role);
        s.field_builder::<StringBuilder>(1)
            .unwrap()
            .append_value(content);
        s.append(true);
    }
    list.append(true);
    let array = list.finish();
    let data_type = arrow_array::Array::data_type(&array).clone();
    let schema = arrow_schema::Schema::new(vec![Field::new("messages", data_type, true)]);
    let batch = arrow_array::RecordBatch::try_new(
        std::sync::Arc::new(schema),
        vec![std::sync::Arc::new(array)],
    )
    .unwrap();
    let path = d.path().join("a.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&path).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let ds = dataset("train", None, "shape = \"messages\"\n");
    let a = load_docs(&[&d.path().join("a.jsonl")], &ds).unwrap();
    let b = load_docs(&[&path], &ds).unwrap();
    assert_eq!(a[0].content, b[0].content);
    assert_eq!(
        a[0].content,
        Content::Messages(serde_json::from_str(conv).unwrap())
    );
    write(
        &d.path().join("bad.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n",
    );
    let e = load_docs(&[&d.path().join("bad.jsonl")], &ds)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no assistant message") && e.contains("bad.jsonl:1"),
        "{e}"
    );
}
