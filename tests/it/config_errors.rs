//! Config and pipeline files: typed, validated on load, and every error names the file, the
//! key and what is allowed.

use crate::common;

use std::path::Path;

use source_tda::config::{Config, DocShape, EigenPrecision, Pipeline, SourceKind};

const GOOD: &str = r#"
[model]
id = "org/model"

[data.train]
id = "org/data"
"#;

fn load(text: &str) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).map_err(|e| e.to_string())
}

#[test]
fn minimal_config_gets_defaults() {
    let c = load(GOOD).unwrap();
    assert_eq!(c.model.revision, "main");
    assert_eq!(c.model.source, SourceKind::Hub);
    assert_eq!(c.data.train.split, "train");
    assert_eq!(c.data.train.shape, DocShape::Text);
    assert_eq!(c.data.train.max_length, 512);
    assert_eq!(c.batching.token_budget, 4096);
    assert_eq!(c.run.name.as_deref(), Some("cfg"));
    assert!(c.data.query.is_none());
}

#[test]
fn unknown_key_names_file_line_key_and_allowed_keys() {
    let e = load(&format!("{GOOD}max_lenght = 3\n")).unwrap_err();
    assert!(e.contains("cfg.toml"), "{e}");
    assert!(e.contains("line 7"), "{e}");
    assert!(e.contains("key `data.train.max_lenght`"), "{e}");
    assert!(e.contains("unknown field `max_lenght`"), "{e}");
    assert!(e.contains("`max_length`"), "lists what is allowed: {e}");

    let e = load(&format!("[trainingg]\nlr = 1\n{GOOD}")).unwrap_err();
    assert!(e.contains("unknown field `trainingg`"), "{e}");
    assert!(e.contains("`model`") && e.contains("`data`"), "{e}");
}

#[test]
fn wrong_type_names_key_and_expected_type() {
    let e = load(&format!("{GOOD}max_length = \"long\"\n")).unwrap_err();
    assert!(e.contains("key `data.train.max_length`"), "{e}");
    assert!(e.contains("invalid type: string \"long\""), "{e}");
    assert!(e.contains("line 7"), "{e}");

    let e = load(&format!("{GOOD}shape = \"poem\"\n")).unwrap_err();
    assert!(e.contains("key `data.train.shape`"), "{e}");
    assert!(
        e.contains("`text`") && e.contains("`prompt_completion`"),
        "{e}"
    );
}

#[test]
fn out_of_range_values_say_what_is_allowed() {
    let e = load(&format!("{GOOD}max_length = 1\n")).unwrap_err();
    assert!(e.contains("cfg.toml"), "{e}");
    assert!(e.contains("key `data.train.max_length`"), "{e}");
    assert!(e.contains("allowed: 2 ..= 1048576"), "{e}");

    let e = load(&format!("{GOOD}max_length = 9000\n")).unwrap_err();
    assert!(e.contains("exceeds `batching.token_budget` = 4096"), "{e}");

    let e = load(&format!("{GOOD}\n[batching]\nmax_batch_size = 0\n")).unwrap_err();
    assert!(e.contains("key `batching.max_batch_size`: is 0"), "{e}");

    let e = load(&format!("{GOOD}\n[hub]\nconnect_timeout_s = -1.0\n")).unwrap_err();
    assert!(e.contains("key `hub.connect_timeout_s`"), "{e}");

    let e = load(&format!("{GOOD}chat_template = \"chatml\"\n")).unwrap_err();
    assert!(e.contains("key `data.train.chat_template`"), "{e}");
    assert!(e.contains("shape = \"prompt_completion\""), "{e}");

    let e = load(&format!(
        "{GOOD}shape = \"prompt_completion\"\nchat_template = \"<s>{{question}}\"\n"
    ))
    .unwrap_err();
    assert!(e.contains("`{prompt}`"), "{e}");

    let e =
        load("[model]\nid = \"not a repo id!\"\n[data.train]\nid = \"org/data\"\n").unwrap_err();
    assert!(e.contains("key `model.id`"), "{e}");
    assert!(e.contains("not a hub repo id"), "{e}");
}

#[test]
fn missing_required_key_is_named() {
    let e = load("[data.train]\nid = \"org/data\"\n").unwrap_err();
    assert!(e.contains("missing field `model`"), "{e}");
}

#[test]
fn local_paths_resolve_against_the_config_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("models/m")).unwrap();
    std::fs::create_dir_all(dir.path().join("cfg")).unwrap();
    let path = dir.path().join("cfg/c.toml");
    std::fs::write(
        &path,
        "[hub]\ncache_dir = \"../cache\"\n[model]\nid = \"../models/m\"\n[data.train]\nid = \"./d.jsonl\"\n",
    )
    .unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.model.source, SourceKind::Local);
    assert_eq!(Path::new(&c.model.id), dir.path().join("models/m"));
    assert_eq!(c.data.train.source, SourceKind::Local);
    assert_eq!(Path::new(&c.data.train.id), dir.path().join("cfg/d.jsonl"));
    assert_eq!(
        c.hub.cache_dir.as_deref(),
        Some(dir.path().join("cache").as_path())
    );
}

#[test]
fn resolved_config_round_trips_through_toml() {
    let c = load(GOOD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let again = Config::from_str_at(&c.to_toml(), &dir.path().join("x.toml"), dir.path()).unwrap();
    assert_eq!(c, again);
}

#[test]
fn pipeline_errors_name_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(
        &p,
        "config = \"c.toml\"\nstages = [\"fetch\", \"tokenise\"]\n",
    )
    .unwrap();
    let e = Pipeline::load(&p).unwrap_err().to_string();
    assert!(e.contains("unknown stage `tokenise`"), "{e}");
    assert!(e.contains("fetch, prepare, finetune"), "{e}");

    std::fs::write(
        &p,
        "config = \"c.toml\"\nstages = [\"prepare\", \"fetch\"]\n",
    )
    .unwrap();
    let e = Pipeline::load(&p).unwrap_err().to_string();
    assert!(e.contains("out of order"), "{e}");

    std::fs::write(
        &p,
        "config = \"c.toml\"\nstages = [\"fetch\"]\nrundir = \"x\"\n",
    )
    .unwrap();
    let e = Pipeline::load(&p).unwrap_err().to_string();
    assert!(e.contains("unknown field `rundir`"), "{e}");
    assert!(e.contains("`run_dir`"), "{e}");

    std::fs::write(
        &p,
        "config = \"../c.toml\"\nstages = [\"fetch\", \"prepare\"]\n",
    )
    .unwrap();
    let pl = Pipeline::load(&p).unwrap();
    assert_eq!(pl.config, dir.path().parent().unwrap().join("c.toml"));
    assert_eq!(pl.stages, ["fetch", "prepare"]);
}

#[test]
fn shipped_configs_and_pipelines_are_valid() {
    let root = common::repo_root();
    for dir in ["configs", "pipelines"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                if dir == "configs" {
                    Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                } else {
                    let p = Pipeline::load(&path).unwrap_or_else(|e| panic!("{e}"));
                    Config::load(&p.config).unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
    }
}

#[test]
fn eval_section_has_defaults_and_bad_values_name_the_key() {
    let c = load(GOOD).unwrap();
    assert_eq!(c.eval.subsets, 64);
    assert_eq!(c.eval.alpha, 0.5);
    assert_eq!(c.eval.seeds, 1);
    assert_eq!(c.eval.k, vec![1, 5, 10]);
    assert_eq!(c.eval.methods.len(), 3);
    assert_eq!(c.eval.known_sources_column, "known_sources");

    let cases = [
        ("alpha = 1.0", "key `eval.alpha`", "a fraction in (0, 1)"),
        ("alpha = 0.0", "key `eval.alpha`", "a fraction in (0, 1)"),
        ("subsets = 2", "key `eval.subsets`", "3 or more"),
        ("seeds = 0", "key `eval.seeds`", "1 or more"),
        ("k = []", "key `eval.k`", "integers ≥ 1"),
        ("k = [1, 0]", "key `eval.k`", "integers ≥ 1"),
        ("methods = []", "key `eval.methods`", "\"gradient_dot\""),
        (
            "methods = [\"source\", \"source\"]",
            "key `eval.methods`",
            "twice",
        ),
        ("bootstrap = 5", "key `eval.bootstrap`", "10 or more"),
        (
            "known_sources_column = \" \"",
            "key `eval.known_sources_column`",
            "is empty",
        ),
    ];
    for (line, key, allowed) in cases {
        let e = load(&format!("{GOOD}\n[eval]\n{line}\n")).unwrap_err();
        assert!(e.contains("cfg.toml"), "{line}: {e}");
        assert!(e.contains(key), "{line}: {e}");
        assert!(e.contains(allowed), "{line}: {e}");
    }
    let e = load(&format!("{GOOD}\n[eval]\nmethods = [\"tracin\"]\n")).unwrap_err();
    assert!(e.contains("eval.methods"), "{e}");
    assert!(
        e.contains("\"gradient_dot\"") && e.contains("\"influence+refined\""),
        "lists what is allowed: {e}"
    );
    let e = load(&format!("{GOOD}\n[eval]\nsubset = 3\n")).unwrap_err();
    assert!(e.contains("unknown field `subset`"), "{e}");
}

#[test]
fn attribution_refine_is_checked() {
    let c = load(&format!(
        "{GOOD}\n[attribution]\nrefine = {{ iterations = 5 }}\n"
    ))
    .unwrap();
    let r = c.attribution.refine.unwrap();
    assert_eq!((r.iterations, r.documents, r.tolerance), (5, 1024, 1e-2));
    assert!(load(GOOD).unwrap().attribution.refine.is_none());
    for (line, want) in [
        (
            "refine = { documents = 0 }",
            "key `attribution.refine.documents`: is 0",
        ),
        (
            "refine = { tolerance = -1.0 }",
            "key `attribution.refine.tolerance`",
        ),
        ("refine = { method = \"astra\" }", "`cg`"),
        ("refine = { iteration = 3 }", "unknown field `iteration`"),
    ] {
        let e = load(&format!("{GOOD}\n[attribution]\n{line}\n")).unwrap_err();
        assert!(e.contains(want), "{line}: {e}");
    }
}

/// `[attribution.generated]`: defaults, partial tables, and errors that name the key; the
/// default is left out of the resolved config (older runs keep their `score` records).
#[test]
fn attribution_generated_is_checked() {
    let c = load(GOOD).unwrap();
    let g = c.attribution.generated;
    assert!(g.enabled);
    assert_eq!((g.top_k, g.detail_docs, g.detail_budget), (5, 3, 200_000));
    let resolved = serde_json::to_value(&c.attribution).unwrap();
    assert!(resolved.get("generated").is_none(), "{resolved}");
    let c = load(&format!(
        "{GOOD}\n[attribution.generated]\nenabled = false\ntop_k = 0\n"
    ))
    .unwrap();
    assert!(!c.attribution.generated.enabled);
    assert_eq!(c.attribution.generated.top_k, 0);
    assert_eq!(c.attribution.generated.detail_docs, 3, "0 = all documents");
    for (line, want) in [
        (
            "generated = { top_k = 2, detail_docs = 3 }",
            "key `attribution.generated.detail_docs`: 3 is more than",
        ),
        (
            "generated = { detail_budget = 0 }",
            "key `attribution.generated.detail_budget`: is 0",
        ),
        ("generated = { topk = 3 }", "unknown field `topk`"),
    ] {
        let e = load(&format!("{GOOD}\n[attribution]\n{line}\n")).unwrap_err();
        assert!(e.contains(want), "{line}: {e}");
    }
}

#[test]
fn attribution_query_rank_and_factor_cache_are_checked_and_resolved() {
    let e = load(&format!("{GOOD}\n[attribution]\nquery_rank = 0\n")).unwrap_err();
    assert!(e.contains("key `attribution.query_rank`: is 0"), "{e}");
    assert!(e.contains("allowed: 1 or more"), "{e}");
    let e = load(&format!("{GOOD}\n[attribution]\nquery_rank = -2\n")).unwrap_err();
    assert!(e.contains("attribution.query_rank"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg/c.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        &path,
        "[model]\nid = \"org/m\"\n[data.train]\nid = \"org/d\"\n\
         [attribution]\nquery_rank = 4\nfactor_cache = \"../factor-cache\"\n",
    )
    .unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.attribution.query_rank, Some(4));
    assert_eq!(
        c.attribution.factor_cache.as_deref(),
        Some(dir.path().join("factor-cache").as_path())
    );
}

#[test]
fn eigendecomposition_precision_is_checked_and_left_out_of_resolved_configs_by_default() {
    let e = load(&format!(
        "{GOOD}\n[attribution]\neigendecomposition = \"f16\"\n"
    ))
    .unwrap_err();
    assert!(e.contains("attribution.eigendecomposition"), "{e}");
    assert!(
        e.contains("`f64`") && e.contains("`f32`"),
        "lists what is allowed: {e}"
    );
    let c = load(&format!(
        "{GOOD}\n[attribution]\neigendecomposition = \"f32\"\n"
    ))
    .unwrap();
    assert_eq!(c.attribution.eigendecomposition, EigenPrecision::F32);
    let resolved = toml::to_string(&c.attribution).unwrap();
    assert!(
        resolved.contains("eigendecomposition = \"f32\""),
        "{resolved}"
    );
    // The default (f64) is not written, so existing runs' config hashes do not change.
    let c = load(GOOD).unwrap();
    assert_eq!(c.attribution.eigendecomposition, EigenPrecision::F64);
    assert!(!toml::to_string(&c.attribution)
        .unwrap()
        .contains("eigendecomposition"));
}

#[test]
fn query_generation_keys_and_the_prompt_shape_are_checked() {
    let e = load(&format!("{GOOD}shape = \"prompt\"\n")).unwrap_err();
    assert!(e.contains("key `data.train.shape`"), "{e}");
    assert!(e.contains("`[data.query]` only"), "{e}");

    let q = "[data.query]\nid = \"org/q\"\nshape = \"prompt\"\n";
    let c = load(&format!("{GOOD}{q}")).unwrap();
    assert_eq!(c.data.query.as_ref().unwrap().shape, DocShape::Prompt);
    assert_eq!(c.query.max_new_tokens, 32);
    assert_eq!(c.query.temperature, 0.0);

    let e = load(&format!("{GOOD}{q}[query]\nmax_new_tokens = 0\n")).unwrap_err();
    assert!(e.contains("key `query.max_new_tokens`"), "{e}");
    assert!(e.contains("allowed: 1 ..= 4096"), "{e}");
    let e = load(&format!("{GOOD}{q}[query]\ntemperature = -1.0\n")).unwrap_err();
    assert!(e.contains("key `query.temperature`"), "{e}");
    let e = load(&format!("{GOOD}{q}[query]\ntop_p = 0.9\n")).unwrap_err();
    assert!(
        e.contains("key `query.top_p`") && e.contains("temperature is 0"),
        "{e}"
    );
    let e = load(&format!("{GOOD}{q}[query]\nstop_at_eos = 1\n")).unwrap_err();
    assert!(e.contains("query.stop_at_eos"), "{e}");
    let e = load(&format!("{GOOD}{q}[query]\nmax_tokens = 3\n")).unwrap_err();
    assert!(e.contains("max_tokens"), "{e}");
    assert!(c.query.stop.is_empty());
    let c = load(&format!("{GOOD}{q}[query]\nstop = [\".\", \"\\n\"]\n")).unwrap();
    assert_eq!(c.query.stop, [".", "\n"]);
    let e = load(&format!("{GOOD}{q}[query]\nstop = [\".\", \"\"]\n")).unwrap_err();
    assert!(
        e.contains("key `query.stop[1]`") && e.contains("is empty"),
        "{e}"
    );
}

#[test]
fn run_device_and_precision_are_checked_and_left_out_of_cpu_configs() {
    use source_tda::config::{DeviceKind, PrecisionKind};
    let c = load(GOOD).unwrap();
    assert_eq!(c.run.device, DeviceKind::Cpu);
    assert_eq!(c.run.precision, PrecisionKind::F32);
    // The CPU defaults are not written into the resolved config (its hash is unchanged).
    let j = c.to_json();
    assert!(j["run"].get("device").is_none() && j["run"].get("precision").is_none());

    let c = load(&format!(
        "[run]\ndevice = \"cuda\"\nprecision = \"tf32\"\n{GOOD}"
    ))
    .unwrap();
    assert_eq!(c.run.device, DeviceKind::Cuda);
    assert_eq!(c.run.precision, PrecisionKind::Tf32);
    assert_eq!(c.to_json()["run"]["device"], "cuda");

    let e = load(&format!("[run]\ndevice = \"gpu\"\n{GOOD}")).unwrap_err();
    assert!(e.contains("key `run.device`"), "{e}");
    assert!(
        e.contains("unknown variant `gpu`") && e.contains("`cuda`"),
        "{e}"
    );
    let e = load(&format!("[run]\nprecision = \"fp16\"\n{GOOD}")).unwrap_err();
    assert!(
        e.contains("key `run.precision`") && e.contains("`bf16`"),
        "{e}"
    );
    let e = load(&format!("[run]\nprecision = \"bf16\"\n{GOOD}")).unwrap_err();
    assert!(e.contains("key `run.precision`"), "{e}");
    assert!(e.contains("needs `device = \"cuda\"`"), "{e}");
}

#[test]
fn fisher_is_accepted_as_the_readme_writes_it() {
    use source_tda::config::FisherKind;
    for (text, want) in [
        ("true", FisherKind::True),
        ("\"true\"", FisherKind::True),
        ("\"empirical\"", FisherKind::Empirical),
    ] {
        let c = load(&format!("{GOOD}\n[attribution]\nfisher = {text}\n"))
            .unwrap_or_else(|e| panic!("fisher = {text}: {e}"));
        assert_eq!(c.attribution.fisher, want, "fisher = {text}");
        // The resolved config writes the string form, which reads back the same.
        let again: Config = source_tda::config::parse_toml(Path::new("r.toml"), &c.to_toml())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.attribution.fisher, want);
    }
    for text in ["false", "\"sampled\"", "1"] {
        let e = load(&format!("{GOOD}\n[attribution]\nfisher = {text}\n")).unwrap_err();
        assert!(e.contains("key `attribution.fisher`"), "{text}: {e}");
        assert!(
            e.contains("true, \"true\"") && e.contains("\"empirical\""),
            "names the accepted spellings: {e}"
        );
    }
}

#[test]
fn warmup_segments_and_checkpoints_must_fit_in_max_steps() {
    let train = |keys: &str| load(&format!("{GOOD}\n[train]\n{keys}\n"));
    let e = train("max_steps = 57\nwarmup_steps = 1000").unwrap_err();
    assert!(e.contains("key `train.warmup_steps`"), "{e}");
    assert!(
        e.contains("T = 57") && e.contains("allowed: 0 ..= 57"),
        "{e}"
    );
    train("max_steps = 57\nwarmup_steps = 57").unwrap();

    let e = train("max_steps = 2\nsegments = 3").unwrap_err();
    assert!(e.contains("key `train.segments`"), "{e}");
    assert!(e.contains("allowed: 1 ..= 2"), "{e}");

    // 10 steps in 3 segments: K = 3, 3, 4.
    let e = train("max_steps = 10\nsegments = 3\ncheckpoints_per_segment = 4").unwrap_err();
    assert!(e.contains("key `train.checkpoints_per_segment`"), "{e}");
    assert!(e.contains("K = 3 steps of segment 0"), "{e}");
    train("max_steps = 10\nsegments = 3\ncheckpoints_per_segment = 3").unwrap();

    let e = train("max_steps = 10\nsegment_boundaries = [2, 9]\ncheckpoints_per_segment = 2")
        .unwrap_err();
    assert!(e.contains("key `train.checkpoints_per_segment`"), "{e}");
    assert!(e.contains("K = 1 steps of segment 2"), "{e}");
    let e = train("max_steps = 10\nsegment_boundaries = [2, 10]").unwrap_err();
    assert!(e.contains("key `train.segment_boundaries`"), "{e}");

    // A stage's own steps: the key names the stage entry.
    let e = load(&format!(
        "{GOOD}\n[train]\nwarmup_steps = 20\n\n[[train.stages]]\nname = \"a\"\nmax_steps = 5\n"
    ))
    .unwrap_err();
    assert!(e.contains("key `train.stages[0].warmup_steps`"), "{e}");
    assert!(e.contains("(stage `a`)"), "{e}");
}

#[test]
fn total_steps_are_bounded_by_what_a_trajectory_holds() {
    use source_tda::config::MAX_TOTAL_STEPS;
    let train = |keys: &str| load(&format!("{GOOD}\n[train]\n{keys}\n"));
    let e = train("max_steps = 4294967295").unwrap_err();
    assert!(e.contains("key `train.max_steps`"), "{e}");
    assert!(
        e.contains(&format!("allowed: 1 ..= {MAX_TOTAL_STEPS}")),
        "{e}"
    );
    train(&format!("max_steps = {MAX_TOTAL_STEPS}")).unwrap();
    let e = train(&format!("max_steps = {}", MAX_TOTAL_STEPS + 1)).unwrap_err();
    assert!(e.contains("key `train.max_steps`"), "{e}");
    let e = train("segment_boundaries = [5, 4294967295]").unwrap_err();
    assert!(e.contains("key `train.segment_boundaries`"), "{e}");
    let e = train("warmup_steps = 4294967295").unwrap_err();
    assert!(e.contains("key `train.warmup_steps`"), "{e}");
}

/// With `epochs`, T is known once `prepare` has counted the documents: the schedule's
/// builder (`plan`, before the first step) refuses a warm-up longer than T and a T beyond the
/// bound, naming the key.
#[test]
fn steps_from_epochs_are_checked_where_the_schedule_is_built() {
    use source_tda::train::finetune::plan;
    let c = load(&format!(
        "{GOOD}\n[train]\nwarmup_steps = 1000\nbatch_size = 8\nepochs = 1\n"
    ))
    .unwrap();
    let e = plan(&c.train, 57 * 8).unwrap_err().to_string();
    assert!(e.contains("key `train.warmup_steps`"), "{e}");
    assert!(e.contains("T = 57"), "{e}");
    assert!(
        e.contains("1 epochs × ⌈456 documents / batch_size 8⌉"),
        "{e}"
    );
    let (schedule, _) = plan(&c.train, 1000 * 8).unwrap();
    assert_eq!(schedule.total, 1000);

    let c = load(&format!(
        "{GOOD}\n[train]\nbatch_size = 1\nepochs = 4000000\n"
    ))
    .unwrap();
    let e = plan(&c.train, 1).unwrap_err().to_string();
    assert!(e.contains("key `train.epochs`"), "{e}");
    assert!(e.contains("T = 4000000"), "{e}");
    let c = load(&format!(
        "{GOOD}\n[train]\nepochs = 1\nsegments = 3\ncheckpoints_per_segment = 2\n"
    ))
    .unwrap();
    let e = plan(&c.train, 8 * 5).unwrap_err().to_string();
    assert!(e.contains("key `train.checkpoints_per_segment`"), "{e}");
}

#[test]
fn top_k_above_the_document_count_is_noted() {
    let c = load(&format!("{GOOD}\n[attribution]\ntop_k = 50\n")).unwrap();
    let note = c.attribution.top_k_note(24).expect("a note");
    assert!(note.contains("key `attribution.top_k` = 50"), "{note}");
    assert!(note.contains("24 documents"), "{note}");
    assert_eq!(c.attribution.top_k_note(50), None);
    let c = load(&format!("{GOOD}\n[attribution]\ntop_k = 0\n")).unwrap();
    assert_eq!(c.attribution.top_k_note(3), None, "0 means all documents");
    let c = load(&format!(
        "{GOOD}\n[attribution]\ntop_k = 50\nall_token_scores = true\n"
    ))
    .unwrap();
    assert_eq!(c.attribution.top_k_note(3), None);
}

#[test]
fn known_source_ids_that_name_no_document_are_reported() {
    use source_tda::report::{unknown_known_sources, unknown_known_sources_note};
    let known: std::collections::BTreeMap<String, Vec<String>> = [
        (
            "q0".to_string(),
            vec!["d1".to_string(), "d-typo".to_string()],
        ),
        ("q1".to_string(), vec!["d2".to_string()]),
    ]
    .into_iter()
    .collect();
    let scored: std::collections::HashSet<&str> = ["d1", "d2", "d3"].into_iter().collect();
    assert_eq!(
        unknown_known_sources(&known, &scored),
        vec![("q0", "d-typo")]
    );
    let note = unknown_known_sources_note(&known, &scored).unwrap();
    assert!(note.contains("query `q0` lists `d-typo`"), "{note}");
    let all: std::collections::HashSet<&str> = ["d1", "d2", "d-typo"].into_iter().collect();
    assert_eq!(unknown_known_sources_note(&known, &all), None);
}

#[test]
fn keep_top_bottom_is_checked_and_left_out_when_unset() {
    let c = load(&format!("{GOOD}\n[attribution]\nkeep_top_bottom = 50\n")).unwrap();
    assert_eq!(c.attribution.keep_top_bottom, Some(50));
    assert!(load(GOOD).unwrap().attribution.keep_top_bottom.is_none());
    assert!(
        !load(GOOD).unwrap().to_json()["attribution"]
            .as_object()
            .unwrap()
            .contains_key("keep_top_bottom"),
        "unset, it leaves the config hash of existing runs alone"
    );
    let e = load(&format!("{GOOD}\n[attribution]\nkeep_top_bottom = 0\n")).unwrap_err();
    assert!(e.contains("key `attribution.keep_top_bottom`: is 0"), "{e}");
    assert!(e.contains("allowed: 1 or more"), "{e}");
    for (bad, says) in [("-3", "-3"), ("\"ten\"", "invalid type: string")] {
        let e = load(&format!("{GOOD}\n[attribution]\nkeep_top_bottom = {bad}\n")).unwrap_err();
        assert!(e.contains("attribution.keep_top_bottom"), "{e}");
        assert!(e.contains(says), "{e}");
    }
}
