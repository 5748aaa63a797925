//! `source-tda plan`: the model built from config.json alone has the loaded model's shapes,
//! a Llama-3.2-1B-shaped config is planned (and refused under a small limit) without any
//! weights, and the plan's disk predictions match what the demo's stages write.

use std::path::Path;

use candle_core::Device;
use serde_json::{json, Value};

use crate::common;
use crate::common::model_fixtures::family_variants;

use source_tda::model::{LoadOptions, Model, ModelSpec, TensorMap, Tracking};

/// Every parameter's name and shape, and the tracked layers, of a model.
fn shapes(m: &Model) -> (Vec<(String, Vec<usize>)>, Vec<source_tda::model::LayerInfo>) {
    let params = (m.params().iter())
        .map(|p| (p.name.clone(), p.var.as_tensor().dims().to_vec()))
        .collect();
    (params, m.tracked_layers().to_vec())
}

#[test]
fn shape_only_models_have_the_loaded_models_parameters_and_layers() {
    for (label, config, tensors) in family_variants() {
        let spec = ModelSpec::from_json(&config).unwrap();
        for tracking in [
            Tracking::BlockLinears,
            Tracking::Patterns(vec!["*mlp*".into()]),
        ] {
            let opts = LoadOptions {
                tracking,
                ..LoadOptions::default()
            };
            let loaded =
                Model::from_source(&spec, &TensorMap(tensors.clone()), &opts, &Device::Cpu)
                    .unwrap();
            let planned = Model::shape_only(&spec, &opts).unwrap();
            assert_eq!(shapes(&planned), shapes(&loaded), "{label}");
            assert!(!planned.tracked_layers().is_empty(), "{label}");
        }
    }
}

/// meta-llama/Llama-3.2-1B's config.json (the fields the loader reads).
fn llama_3_2_1b() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": true,
        "attention_bias": false,
        "mlp_bias": false,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16"
    })
}

fn plan_json(cwd: &Path, args: &[&str]) -> (std::process::Output, Value) {
    let mut all = vec!["plan", "configs/demo-eval.toml", "--json"];
    all.extend_from_slice(args);
    let out = common::cli(cwd, &all, &[]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, v)
}

fn stage<'a>(plan: &'a Value, name: &str) -> &'a Value {
    (plan["stages"].as_array().unwrap().iter())
        .find(|s| s["stage"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {plan}"))
}

#[test]
fn a_1b_model_is_planned_from_its_config_alone_and_refused_under_a_small_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    common::write(&cfg, serde_json::to_vec_pretty(&llama_3_2_1b()).unwrap());
    let root = common::repo_root();
    let (out, plan) = plan_json(
        &root,
        &[
            "--model-config",
            cfg.to_str().unwrap(),
            "--documents",
            "20000",
            "--queries",
            "16",
        ],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    // Llama-3.2-1B has 1,235,814,400 parameters (tied head): 128256·2048 embeddings,
    // 16 blocks of 60,821,504, the final norm.
    let p = 1_235_814_400u64;
    assert_eq!(plan["params"], p);
    assert!(
        plan["model"].as_str().unwrap().contains("112 tracked"),
        "{plan}"
    );
    // The weights were never materialised: the planner's own peak stays far below 4 P.
    let rss = plan["planner_peak_rss_bytes"].as_u64().unwrap();
    assert!(
        rss < 4 * p / 4,
        "planner peak RSS {rss} B for a {} B model",
        4 * p
    );

    // AdamW: weights, two gradients and m, v (5 × 4 P) plus one micro-batch's graph.
    let ft = stage(&plan, "finetune");
    let peak = ft["peak_bytes"].as_u64().unwrap();
    assert!(peak > 20 * p && peak < 40 * p, "{ft}");
    // The demo's 3 epochs × ⌈20000/16⌉ steps, 3 segments × 2 checkpoints, each 12 P bytes
    // (model f32 + m, v), plus ĝ (4 P) after each clipped checkpoint that is a one-step group
    // (none here: the checkpoints are hundreds of steps apart).
    assert_eq!(ft["disk_bytes"].as_u64().unwrap(), 6 * 12 * p, "{ft}");
    // Factor files: 4 segments (3 fine-tuning + the pretraining one), each per layer
    // Q_A, Q_S f32, eigenvalues f64, Λ f32.
    let per_block: u64 = [
        (2048u64, 2048u64),
        (2048, 512),
        (2048, 512),
        (2048, 2048),
        (2048, 8192),
        (2048, 8192),
        (8192, 2048),
    ]
    .iter()
    .map(|&(i, o)| 4 * (i * i + o * o) + 8 * (i + o) + 4 * i * o)
    .sum();
    assert_eq!(
        stage(&plan, "fit")["disk_bytes"].as_u64().unwrap(),
        4 * 16 * per_block
    );
    // 16 queries' gradients: 4 · 16 · Σ i·o over the tracked layers (every block linear).
    let io: u64 = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192);
    assert_eq!(stage(&plan, "query")["disk_bytes"], 4 * 16 * io);

    // Under 16 GiB the fine-tune (≥ 20 P bytes ≈ 23 GiB) is refused, naming the stage and
    // what to change; exit status 5 (a resource limit).
    let (out, plan) = plan_json(
        &root,
        &[
            "--model-config",
            dir.path().to_str().unwrap(),
            "--documents",
            "20000",
            "--memory-limit-gib",
            "16",
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{}", common::stderr(&out));
    let err = common::stderr(&out);
    assert!(
        err.contains("finetune:") && err.contains("batching.token_budget"),
        "{err}"
    );
    assert!(plan["limit_bytes"].as_u64().unwrap() == 16 << 30, "{plan}");

    // Without counts or a run directory the command says what to pass.
    let out = common::cli(
        &root,
        &[
            "plan",
            "configs/demo-eval.toml",
            "--model-config",
            cfg.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(common::stderr(&out).contains("--documents"));
}

/// Bytes of the files named `names` anywhere under `dir`.
fn bytes_of(dir: &Path, names: &[&str]) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            total += bytes_of(&p, names);
        } else if names.iter().any(|n| p.file_name().unwrap() == *n) {
            total += std::fs::metadata(&p).unwrap().len();
        }
    }
    total
}

#[test]
fn the_plan_predicts_what_the_demo_writes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let root = common::repo_root();
    let run_s = run.to_str().unwrap();
    let pipeline = common::demo_eval_pipeline(dir.path());
    let out = common::cli(
        &root,
        &[
            "run",
            pipeline.to_str().unwrap(),
            "--run-dir",
            run_s,
            "--until",
            "fit",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    // The finetune stage logged its estimate before the first step.
    assert!(common::stderr(&out).contains("finetune: estimated peak memory"));

    let (out, plan) = plan_json(&root, &["--run-dir", run_s]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let close = |predicted: u64, actual: u64, what: &str| {
        let rel = (predicted as f64 - actual as f64).abs() / actual as f64;
        // Only the safetensors headers (names, shapes, metadata) are not predicted.
        assert!(
            rel < 0.03,
            "{what}: predicted {predicted} B, wrote {actual} B"
        );
    };
    let ckpt = bytes_of(
        &run.join("finetune/checkpoints"),
        &[
            "model.safetensors",
            "optimizer.safetensors",
            "clip_direction.safetensors",
        ],
    );
    close(
        stage(&plan, "finetune")["disk_bytes"].as_u64().unwrap(),
        ckpt,
        "checkpoints",
    );
    let factors: u64 = (std::fs::read_dir(run.join("fit")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    close(
        stage(&plan, "fit")["disk_bytes"].as_u64().unwrap(),
        factors,
        "factors",
    );
    // The fit's own estimate (fit/ summary) is the plan's.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    let seg0 = &manifest["stages"]["fit"]["summary"]["segments"][0];
    assert_eq!(
        seg0["estimated_peak_bytes"],
        stage(&plan, "fit")["peak_bytes"],
        "{seg0}"
    );
}
