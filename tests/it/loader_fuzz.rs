//! Property tests of the loaders: random configs (a valid config whose values, around the real
//! schema, are replaced by random integers, floats, strings, booleans and lists, plus unknown
//! keys) and random data rows (JSONL and CSV) give an error or a value, never a panic; a
//! config that loads writes a resolved config that loads again to the same config.
//!
//! 256 cases per property, a few seconds in all.

use std::path::Path;

use proptest::prelude::*;
use source_tda::config::{Config, DataFormat};
use source_tda::data::read::read_rows;

/// A valid config using most sections; every case starts from it.
const BASE: &str = r#"
[run]
seed = 3

[model]
id = "org/model"

[data.train]
id = "org/data"
shape = "text"
max_length = 64

[data.query]
id = "org/data"
split = "queries"
shape = "prompt_completion"
id_column = "id"

[train]
optimizer = "adamw"
lr = 1e-3
warmup_steps = 2
batch_size = 4
max_steps = 12
segments = 2
checkpoints_per_segment = 2

[pretrain]
lr_mass = "converged"

[attribution]
method = "source"
fisher = "true"
top_k = 5

[eval]
subsets = 8
alpha = 0.5
k = [1, 5]
"#;

/// Keys of the real schema (and a few near misses) that the cases overwrite.
const KEYS: &[&str] = &[
    "run.seed",
    "run.name",
    "run.device",
    "run.precision",
    "hub.offline",
    "hub.connect_timeout_s",
    "hub.endpoint",
    "model.id",
    "model.revision",
    "model.source",
    "data.train.id",
    "data.train.split",
    "data.train.shape",
    "data.train.format",
    "data.train.max_length",
    "data.train.max_documents",
    "data.train.text_column",
    "data.train.files",
    "data.query.shape",
    "data.query.id_column",
    "data.pretrain.id",
    "batching.token_budget",
    "batching.max_batch_size",
    "train.optimizer",
    "train.lr",
    "train.momentum",
    "train.beta1",
    "train.beta2",
    "train.eps",
    "train.weight_decay",
    "train.schedule",
    "train.warmup_steps",
    "train.batch_size",
    "train.epochs",
    "train.max_steps",
    "train.max_grad_norm",
    "train.loss_normalization",
    "train.segments",
    "train.checkpoints_per_segment",
    "train.segment_boundaries",
    "train.dataset",
    "pretrain.lr_mass",
    "pretrain.dataset",
    "attribution.method",
    "attribution.fisher",
    "attribution.damping",
    "attribution.damping_factor",
    "attribution.block_size",
    "attribution.top_k",
    "attribution.query_rank",
    "attribution.memory_limit_gib",
    "attribution.eigendecomposition",
    "attribution.adam_response",
    "eval.methods",
    "eval.k",
    "eval.subsets",
    "eval.alpha",
    "eval.seeds",
    "eval.bootstrap",
    "query.max_new_tokens",
    "query.temperature",
    "query.top_p",
    "train.no_such_key",
    "nosuchsection.x",
];

/// Strings near the schema's words, and odd ones.
const WORDS: &[&str] = &[
    "",
    " ",
    "true",
    "empirical",
    "adamw",
    "sgd",
    "momentum",
    "cosine",
    "linear",
    "constant",
    "source",
    "influence",
    "gradient_dot",
    "converged",
    "from_model",
    "train",
    "query",
    "pretrain",
    "text",
    "prompt_completion",
    "jsonl",
    "csv",
    "parquet",
    "auto",
    "hub",
    "local",
    "cpu",
    "cuda",
    "f32",
    "bf16",
    "f64",
    "full",
    "fixed_v",
    "org/x",
    "./nope",
    "/",
    "..",
    "~",
    "http://x",
    "é\u{0}\u{202e}",
    "sum_per_document",
    "mean_per_token",
];

fn value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(toml::Value::Integer),
        (-3i64..70).prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        (-2.0f64..2.0).prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        prop::sample::select(WORDS).prop_map(|s| toml::Value::String(s.to_string())),
        "[a-z/._ -]{0,12}".prop_map(toml::Value::String),
    ];
    prop_oneof![
        4 => leaf.clone(),
        1 => prop::collection::vec(leaf, 0..4).prop_map(toml::Value::Array),
    ]
}

/// Sets `dotted` in `table`, making tables on the way (a non-table on the way is replaced).
fn set(table: &mut toml::Table, dotted: &str, v: toml::Value) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().expect("a key");
    let mut t = table;
    for p in parts {
        let slot = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !slot.is_table() {
            *slot = toml::Value::Table(toml::Table::new());
        }
        t = slot.as_table_mut().expect("made a table");
    }
    t.insert(last.to_string(), v);
}

fn load_in(dir: &Path, text: &str) -> Result<Config, String> {
    let path = dir.join("cfg.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_configs_load_or_fail_without_panicking(
        edits in prop::collection::vec((prop::sample::select(KEYS), value()), 1..6),
        stages in prop::option::of(prop::collection::vec(
            (prop::sample::select(&["lr", "max_steps", "epochs", "segments", "warmup_steps",
                                    "checkpoints_per_segment", "dataset", "optimizer"][..]),
             value()), 0..3)),
    ) {
        let mut table: toml::Table = toml::from_str(BASE).unwrap();
        for (k, v) in edits {
            set(&mut table, k, v);
        }
        if let Some(stage_keys) = stages {
            let mut entry = toml::Table::new();
            entry.insert("name".into(), toml::Value::String("s1".into()));
            for (k, v) in stage_keys {
                entry.insert(k.to_string(), v);
            }
            set(&mut table, "train.stages", toml::Value::Array(vec![toml::Value::Table(entry)]));
        }
        let text = toml::to_string(&table).unwrap();
        let dir = tempfile::tempdir().unwrap();
        if let Ok(config) = load_in(dir.path(), &text) {
            // A valid config: its resolved form loads again, to the same config.
            let again = Config::from_str_at(&config.to_toml(), &dir.path().join("r.toml"), dir.path());
            let why = again.as_ref().err().map(|e| e.to_string());
            prop_assert_eq!(again.ok(), Some(config), "{:?}\n{}", why, text);
        }
    }

    #[test]
    fn random_jsonl_rows_read_or_fail_without_panicking(
        lines in prop::collection::vec(prop_oneof![
            // Objects with the columns holding values of any JSON type.
            (prop::option::of(json_value()), prop::option::of(json_value())).prop_map(|(id, text)| {
                let mut o = serde_json::Map::new();
                if let Some(v) = id { o.insert("id".into(), v); }
                if let Some(v) = text { o.insert("text".into(), v); }
                serde_json::Value::Object(o).to_string().into_bytes()
            }),
            json_value().prop_map(|v| v.to_string().into_bytes()),
            prop::collection::vec(any::<u8>(), 0..24),
        ], 0..8),
        array in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.jsonl");
        let mut bytes = Vec::new();
        if array {
            bytes.push(b'[');
        }
        for (i, l) in lines.iter().enumerate() {
            if array && i > 0 {
                bytes.push(b',');
            }
            bytes.extend_from_slice(l);
            bytes.push(b'\n');
        }
        if array {
            bytes.push(b']');
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(rows) = read_rows(&path, DataFormat::Auto, &["id", "text"], &[true, false]) {
            prop_assert!(rows.iter().all(|r| r.values.len() == 2 && r.values[0].is_some()));
        }
    }

    #[test]
    fn random_csv_rows_read_or_fail_without_panicking(
        header in prop::sample::select(&["id,text", "text,id", "id", "text", "", "id,text,extra"][..]),
        rows in prop::collection::vec(prop_oneof![
            "[a-z0-9,\"\n ]{0,16}".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..16),
        ], 0..8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.csv");
        let mut bytes = header.as_bytes().to_vec();
        for r in &rows {
            bytes.push(b'\n');
            bytes.extend_from_slice(r);
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(read) = read_rows(&path, DataFormat::Auto, &["id", "text"], &[true, false]) {
            prop_assert!(read.iter().all(|r| r.values.len() == 2 && r.values[0].is_some()));
        }
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|i| serde_json::json!(i)),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,10}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..3)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// proptest's shrunk counterexample, kept: a null in a required JSON column is refused with
/// the row and the column, not read as a missing value.
#[test]
fn a_null_in_a_required_jsonl_column_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.jsonl");
    std::fs::write(&path, "{\"id\": \"a\", \"text\": \"x\"}\n{\"id\":null}\n").unwrap();
    let e = read_rows(&path, DataFormat::Auto, &["id", "text"], &[true, false])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rows.jsonl:2") && e.contains("column `id` is null"),
        "{e}"
    );
    // An optional column may be null.
    std::fs::write(&path, "{\"id\": \"a\", \"text\": null}\n").unwrap();
    let rows = read_rows(&path, DataFormat::Auto, &["id", "text"], &[true, false]).unwrap();
    assert_eq!(rows[0].values, [Some("a".to_string()), None]);
}
