//! LoRA adapters against independent truth.
//!
//! * PEFT's own files (tests/data/peft-lora-tiny/, made by the `peft` package with its
//!   make_reference.py): our logits equal PEFT's to 1e-5, and the gradients of the adapter
//!   matrices formed from the capture's (a, δ) equal torch autograd's.
//! * A dense reference on a tiny random Llama: the LoRA model's logits equal those of the
//!   merged model W' = W + s B A, and each document's capture-based ∂L/∂A, ∂L/∂B equal the
//!   chain rule on the merged model's autograd gradient G = ∂L/∂W' (∂L/∂A = s Bᵀ G,
//!   ∂L/∂B = s G Aᵀ); tracking the base layers gives G itself.
//! * Fine-tuning: two SGD steps of a fresh adapter equal the same steps computed by hand from
//!   the dense model's gradients; checkpoints are PEFT adapter folders that reload exactly.
//! * Refusals name the field or tensor.

use crate::common::model_fixtures as fixtures;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fixtures::*;
use source_tda::config::{
    BatchingConfig, LoraTargets, LoraTrack, LoraTrainConfig, OptimizerKind, ScheduleKind,
    TrainConfig,
};
use source_tda::data::PreparedDoc;
use source_tda::model::{Labels, LoadOptions, Model, TokenBatch};
use source_tda::train::checkpoint::write_safetensors;
use source_tda::train::{train, train_in_memory, TrainJob};

fn peft_dir() -> PathBuf {
    crate::common::repo_root().join("tests/data/peft-lora-tiny")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(peft_dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// max |got − want| / max(1, max |want|).
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    max_abs_diff(got, want) / max_abs(want).max(1.0)
}

/// The reference's documents as (ids, loss mask): every token but the first is a target.
fn reference_docs(r: &HashMap<String, Tensor>) -> Vec<(Vec<u32>, Vec<u8>)> {
    let ids: Vec<Vec<u32>> = r["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    ids.into_iter()
        .map(|d| {
            let mut m = vec![1u8; d.len()];
            m[0] = 0;
            (d, m)
        })
        .collect()
}

#[test]
fn peft_adapters_give_peft_logits() {
    let r = reference();
    let docs = reference_docs(&r);
    let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &Device::Cpu).unwrap();
    for name in ["a", "b"] {
        let dir = peft_dir().join(format!("adapter-{name}"));
        let m = Model::load(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
        let logits = m.forward(&batch.input_ids).unwrap();
        let err = max_abs_diff(&logits, &r[&format!("logits.{name}")]);
        assert!(err <= 1e-5, "adapter {name}: max |ours − peft| = {err}");
        assert!(max_abs(&logits) > 0.05, "degenerate logits");
    }
    // adapter-a: 5 modules × 2 layers, A and B each; the merged model agrees as well.
    let m = Model::load(
        &peft_dir().join("adapter-a"),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(m.params().len(), 20);
    assert_eq!(m.lora().unwrap().scale(), 2.0);
    let logits = m.forward(&batch.input_ids).unwrap();
    assert!(max_abs_diff(&logits, &r["merged.a"]) <= 1e-5);
    // The base model alone differs: the adapter matters.
    let base = Model::load(
        &peft_dir().join("base"),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    assert!(max_abs_diff(&base.forward(&batch.input_ids).unwrap(), &logits) > 1e-3);
}

#[test]
fn capture_gradients_equal_torch_autograd_through_peft() {
    let r = reference();
    let docs = reference_docs(&r);
    let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &Device::Cpu).unwrap();
    let dir = peft_dir().join("adapter-a");
    let m = Model::load(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    // Default tracking on a LoRA model: every lora_A and lora_B, nothing else.
    assert_eq!(m.tracked_layers().len(), 20);
    let cap = m.capture(&batch, Labels::Data).unwrap();
    let mut worst = 0f32;
    for l in &cap.layers {
        assert!(l.name.contains(".lora_"), "{}", l.name);
        let mut g = l.doc_gradient(0).unwrap();
        for b in 1..docs.len() {
            g = (g + l.doc_gradient(b).unwrap()).unwrap();
        }
        let want = &r[&format!("grad.{}.weight", l.name)];
        worst = worst.max(rel_err(&g, want));
    }
    assert!(
        worst <= 1e-5,
        "capture vs torch autograd: relative error {worst}"
    );
    // q, k and v's lora_A read the same x: one shared input (one activation factor).
    let groups = cap.input_groups();
    let idx = |n: &str| {
        cap.layers
            .iter()
            .position(|l| l.name == format!("base_model.model.model.layers.1.self_attn.{n}"))
            .unwrap()
    };
    let q = groups[idx("q_proj.lora_A")];
    assert_eq!(groups[idx("k_proj.lora_A")], q);
    assert_eq!(groups[idx("v_proj.lora_A")], q);
    assert_ne!(groups[idx("o_proj.lora_A")], q);
}

const MODULES: [&str; 2] = ["self_attn.q_proj", "mlp.down_proj"];

/// A tiny random Llama with a random (nonzero) adapter on q_proj and down_proj of every
/// layer: (base folder, adapter folder, merged folder).
fn dense_setup(root: &Path) -> (PathBuf, PathBuf, PathBuf, f64) {
    let cfg = LlamaCfg::default();
    let tensors = cfg.tensors(5);
    let base = root.join("base");
    write_checkpoint(&base, &cfg.config_json(), &tensors);
    let (r, alpha) = (3usize, 4.5f64);
    let s = alpha / r as f64;
    let mut rng = Rng::new(77);
    let mut adapter = Vec::new();
    let mut merged = tensors.clone();
    for li in 0..cfg.layers {
        for m in MODULES {
            let key = format!("model.layers.{li}.{m}.weight");
            let w = &tensors[&key];
            let (d_out, d_in) = w.dims2().unwrap();
            let a = randn(&mut rng, &[r, d_in], 0.0, 0.3);
            let b = randn(&mut rng, &[d_out, r], 0.0, 0.3);
            let delta = b.matmul(&a).unwrap().affine(s, 0.0).unwrap();
            merged.insert(key, (w + delta).unwrap());
            let p = format!("base_model.model.model.layers.{li}.{m}");
            adapter.push((format!("{p}.lora_A.weight"), a));
            adapter.push((format!("{p}.lora_B.weight"), b));
        }
    }
    let ad = root.join("adapter");
    std::fs::create_dir_all(&ad).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "base_model_name_or_path": "../base",
        "target_modules": ".*\\.(q_proj|down_proj)", "bias": "none", "lora_dropout": 0.1,
        "modules_to_save": null, "use_dora": false,
    });
    std::fs::write(ad.join("adapter_config.json"), config.to_string()).unwrap();
    write_safetensors(
        &ad.join("adapter_model.safetensors"),
        &adapter,
        HashMap::new(),
    )
    .unwrap();
    let mdir = root.join("merged");
    write_checkpoint(&mdir, &cfg.config_json(), &merged);
    (base, ad, mdir, s)
}

/// ∂(Σ of `docs`' losses)/∂W for the named weights of a plain model, by autograd.
fn dense_grads(m: &Model, docs: &[(Vec<u32>, Vec<u8>)], names: &[String]) -> Vec<Tensor> {
    let batch = TokenBatch::new(&doc_refs(docs), 0, None, &Device::Cpu).unwrap();
    let grads = m
        .loss_tensor(&batch)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    names
        .iter()
        .map(|n| {
            let p = m.params().iter().find(|p| &p.name == n).unwrap();
            grads.get(p.var.as_tensor()).unwrap().clone()
        })
        .collect()
}

fn param(m: &Model, name: &str) -> Tensor {
    m.params()
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no parameter {name}"))
        .var
        .as_tensor()
        .clone()
}

#[test]
fn adapter_gradients_equal_the_chain_rule_on_the_merged_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, ad, mdir, s) = dense_setup(tmp.path());
    let dev = Device::Cpu;
    let lora = Model::load(&ad, &LoadOptions::default(), &dev).unwrap();
    let dense = Model::load(&mdir, &LoadOptions::default(), &dev).unwrap();
    let mut rng = Rng::new(3);
    let docs = random_docs(&mut rng, &[9, 5, 12], 61);
    let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &dev).unwrap();
    let (lo, de) = (
        lora.forward(&batch.input_ids).unwrap(),
        dense.forward(&batch.input_ids).unwrap(),
    );
    assert!(max_abs_diff(&lo, &de) <= 1e-5, "LoRA vs merged logits");

    let cap = lora.capture(&batch, Labels::Data).unwrap();
    let mut base_opts = LoadOptions {
        lora_track: LoraTrack::Base,
        ..LoadOptions::default()
    };
    let base_cap = Model::load(&ad, &base_opts, &dev)
        .unwrap()
        .capture(&batch, Labels::Data)
        .unwrap();
    assert_eq!(cap.layers.len(), 8);
    assert_eq!(base_cap.layers.len(), 4);
    let (mut worst, mut biggest) = (0f32, 0f32);
    for (b, doc) in docs.iter().enumerate() {
        let modules: Vec<String> = (0..2)
            .flat_map(|li| MODULES.map(|m| format!("model.layers.{li}.{m}")))
            .collect();
        let names: Vec<String> = modules.iter().map(|m| format!("{m}.weight")).collect();
        let g = dense_grads(&dense, std::slice::from_ref(doc), &names);
        for (m, g) in modules.iter().zip(&g) {
            let p = format!("base_model.model.{m}");
            let (a, bm) = (
                param(&lora, &format!("{p}.lora_A.weight")),
                param(&lora, &format!("{p}.lora_B.weight")),
            );
            let want_a = bm.t().unwrap().matmul(g).unwrap().affine(s, 0.0).unwrap();
            let want_b = g.matmul(&a.t().unwrap()).unwrap().affine(s, 0.0).unwrap();
            let layer = |c: &source_tda::model::Capture, n: &str| {
                c.layers
                    .iter()
                    .find(|l| l.name == n)
                    .unwrap()
                    .doc_gradient(b)
                    .unwrap()
            };
            worst = worst
                .max(rel_err(&layer(&cap, &format!("{p}.lora_A")), &want_a))
                .max(rel_err(&layer(&cap, &format!("{p}.lora_B")), &want_b))
                .max(rel_err(&layer(&base_cap, m), g));
            biggest = biggest.max(max_abs(&want_a));
        }
    }
    assert!(worst <= 1e-5, "capture vs merged-model chain rule: {worst}");
    assert!(biggest > 1e-3, "degenerate gradients");
    // `[attribution] layers` patterns select among the adapter layers too.
    base_opts.lora_track = LoraTrack::Adapter;
    base_opts.tracking =
        source_tda::model::Tracking::Patterns(vec!["*.mlp.down_proj.lora_B".into()]);
    let m = Model::load(&ad, &base_opts, &dev).unwrap();
    assert_eq!(m.tracked_layers().len(), 2);
}

fn lora_docs(n: usize) -> Vec<PreparedDoc> {
    (0..n)
        .map(|i| {
            let len = 5 + i % 4;
            let ids: Vec<u32> = (0..len).map(|t| ((i * 11 + t * 3) % 61) as u32).collect();
            let mut mask = vec![1u8; len];
            mask[0] = 0;
            PreparedDoc {
                doc_id: format!("d{i}"),
                text: String::new(),
                prompt: None,
                completion: None,
                input_ids: ids,
                loss_mask: mask,
                truncated_tokens: 0,
                source: format!("test:{i}"),
            }
        })
        .collect()
}

fn lora_train_config() -> TrainConfig {
    TrainConfig {
        optimizer: OptimizerKind::Sgd,
        lr: 0.5,
        schedule: ScheduleKind::Constant,
        batch_size: 4,
        max_steps: Some(2),
        segments: Some(1),
        checkpoints_per_segment: 1,
        seed: Some(1),
        lora: Some(LoraTrainConfig {
            r: 2,
            alpha: 3.0,
            target_modules: LoraTargets::Names(MODULES.iter().map(|m| m.to_string()).collect()),
            use_rslora: false,
            seed: Some(9),
        }),
        ..Default::default()
    }
}

#[test]
fn lora_sgd_steps_equal_hand_steps_on_the_dense_model_and_checkpoints_are_peft_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _, _, _) = dense_setup(tmp.path());
    let dev = Device::Cpu;
    let docs = lora_docs(4);
    let t = lora_train_config();
    let batching = BatchingConfig {
        token_budget: 64,
        max_batch_size: 64,
    };
    let (trained, log) = train_in_memory(&base, &docs, &t, &batching, &dev).unwrap();
    assert_eq!(log.len(), 2);

    // By hand: θ = (A, B) per module; J = (1/n) Σ L; G = ∂J/∂W' on the merged model.
    let (eta, s) = (t.lr, 3.0 / 2.0);
    let fresh = Model::load(
        &base,
        &source_tda::train::finetune::train_load_options(&t),
        &dev,
    )
    .unwrap();
    let cfg = LlamaCfg::default();
    let mut base_tensors = cfg.tensors(5);
    let modules: Vec<String> = (0..2)
        .flat_map(|li| MODULES.map(|m| format!("model.layers.{li}.{m}")))
        .collect();
    let mut ab: Vec<(Tensor, Tensor)> = modules
        .iter()
        .map(|m| {
            let p = format!("base_model.model.{m}");
            let a = param(&fresh, &format!("{p}.lora_A.weight"));
            let b = param(&fresh, &format!("{p}.lora_B.weight"));
            (a, b)
        })
        .collect();
    // PEFT's initialisation: B = 0, A uniform within ±1/√d_in.
    for (a, b) in &ab {
        assert_eq!(max_abs(b), 0.0);
        let bound = 1.0 / (a.dims()[1] as f32).sqrt();
        assert!(max_abs(a) <= bound && max_abs(a) > 0.5 * bound);
    }
    let raw: Vec<(Vec<u32>, Vec<u8>)> = docs
        .iter()
        .map(|d| (d.input_ids.clone(), d.loss_mask.clone()))
        .collect();
    let names: Vec<String> = modules.iter().map(|m| format!("{m}.weight")).collect();
    let original: Vec<Tensor> = names.iter().map(|n| base_tensors[n].clone()).collect();
    for _step in 0..2 {
        for ((n, w), (a, b)) in names.iter().zip(&original).zip(&ab) {
            let delta = b.matmul(a).unwrap().affine(s, 0.0).unwrap();
            base_tensors.insert(n.clone(), (w + delta).unwrap());
        }
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &cfg.config_json(), &base_tensors);
        let dense = Model::load(dir.path(), &LoadOptions::default(), &dev).unwrap();
        let g = dense_grads(&dense, &raw, &names);
        ab = ab
            .iter()
            .zip(&g)
            .map(|((a, b), g)| {
                let g = g.affine(1.0 / docs.len() as f64, 0.0).unwrap();
                let ga = b.t().unwrap().matmul(&g).unwrap().affine(s, 0.0).unwrap();
                let gb = g.matmul(&a.t().unwrap()).unwrap().affine(s, 0.0).unwrap();
                (
                    (a - ga.affine(eta, 0.0).unwrap()).unwrap(),
                    (b - gb.affine(eta, 0.0).unwrap()).unwrap(),
                )
            })
            .collect();
    }
    let mut worst = 0f32;
    for (m, (a, b)) in modules.iter().zip(&ab) {
        let p = format!("base_model.model.{m}");
        worst = worst
            .max(rel_err(&param(&trained, &format!("{p}.lora_A.weight")), a))
            .max(rel_err(&param(&trained, &format!("{p}.lora_B.weight")), b));
    }
    assert!(worst <= 1e-5, "LoRA steps vs hand steps: {worst}");
    assert!(max_abs(&ab[0].1) > 1e-3, "B did not move");

    // The checkpointed run: its last checkpoint is a PEFT adapter folder that reloads to the
    // in-memory model's logits, bit for bit.
    let work = tmp.path().join("work");
    let out = train(&TrainJob {
        base_dir: &base,
        docs: &docs,
        train: &t,
        batching: &batching,
        work_dir: &work,
        device: &dev,
        step_offset: 0,
        optimizer_from: None,
        hook: &|_| Ok(()),
    })
    .unwrap();
    let ckpt = &out.checkpoints.last().unwrap().1;
    assert!(!ckpt.join("model.safetensors").exists());
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(saved["r"], 2);
    assert_eq!(saved["lora_alpha"], 3.0);
    assert_eq!(saved["peft_type"], "LORA");
    let reloaded = Model::load(ckpt, &LoadOptions::default(), &dev).unwrap();
    let batch = TokenBatch::new(&doc_refs(&raw), 0, None, &dev).unwrap();
    let (x, y) = (
        reloaded.forward(&batch.input_ids).unwrap(),
        trained.forward(&batch.input_ids).unwrap(),
    );
    assert_eq!(max_abs_diff(&x, &y), 0.0);
    // Only the adapter was trained: the base weights are the base folder's.
    let base_model = Model::load(&base, &LoadOptions::default(), &dev).unwrap();
    assert!(max_abs_diff(&base_model.forward(&batch.input_ids).unwrap(), &y) > 1e-4);
}

/// A copy of PEFT's adapter-a whose adapter_config.json is changed by `edit`.
fn edited_adapter(root: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let src = peft_dir().join("adapter-a");
    let dir = root.join("ad");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    cfg["base_model_name_or_path"] = peft_dir().join("base").display().to_string().into();
    edit(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    dir
}

#[test]
fn unsupported_adapters_are_refused_naming_the_field() {
    let load = |d: &Path| {
        Model::load(d, &LoadOptions::default(), &Device::Cpu)
            .err()
            .map(|e| e.to_string())
    };
    let tmp = tempfile::tempdir().unwrap();
    // An absolute base path loads.
    assert_eq!(load(&edited_adapter(tmp.path(), |_| {})), None);
    for (field, value) in [
        ("use_dora", serde_json::json!(true)),
        ("bias", serde_json::json!("lora_only")),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("layers_to_transform", serde_json::json!([0])),
        ("base_model_name_or_path", serde_json::json!("org/not-here")),
        ("target_modules", serde_json::json!(["no_such_proj"])),
    ] {
        let t = tempfile::tempdir().unwrap();
        let d = edited_adapter(t.path(), |c| c[field] = value.clone());
        let e = load(&d).unwrap_or_else(|| panic!("{field} = {value} loaded"));
        assert!(
            e.contains(field) || e.contains("no_such_proj"),
            "{field}: {e}"
        );
    }
    // Fewer targets than the file holds: the k_proj tensors are left over.
    let t = tempfile::tempdir().unwrap();
    let d = edited_adapter(t.path(), |c| {
        c["target_modules"] = serde_json::json!(["q_proj", "v_proj", "o_proj", "down_proj"])
    });
    let e = load(&d).unwrap();
    assert!(e.contains("k_proj.lora_A.weight"), "{e}");
    // The weights in PyTorch's pickle format only.
    std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
    let e = load(&d).unwrap();
    assert!(e.contains("adapter_model.safetensors"), "{e}");
}

#[test]
fn a_trainer_peft_run_imports_as_adapters_over_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let trainer = tmp.path().join("output_dir");
    let src = peft_dir().join("adapter-a");
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    for step in [2u64, 4] {
        let c = trainer.join(format!("checkpoint-{step}"));
        std::fs::create_dir_all(&c).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(src.join(f), c.join(f)).unwrap();
        }
        // The export names parameters as PEFT's named_parameters() does (`.default.`).
        let v = Tensor::full(0.5f32, (4, 16), &Device::Cpu).unwrap();
        write_safetensors(
            &c.join("exp_avg_sq.safetensors"),
            &[(format!("{q}.lora_A.default.weight"), v)],
            HashMap::new(),
        )
        .unwrap();
        let logs: Vec<serde_json::Value> = (1..=step)
            .map(|s| serde_json::json!({"step": s, "learning_rate": 1e-3, "loss": 1.0}))
            .collect();
        let state = serde_json::json!({"global_step": step, "max_steps": 4, "log_history": logs});
        std::fs::write(c.join("trainer_state.json"), state.to_string()).unwrap();
    }
    let t = TrainConfig {
        optimizer: OptimizerKind::AdamW,
        lr: 1e-3,
        schedule: ScheduleKind::Constant,
        beta1: Some(0.9),
        beta2: Some(0.99),
        eps: Some(1e-8),
        segments: Some(2),
        loss_normalization: source_tda::config::LossNormalization::MeanPerToken,
        ..Default::default()
    };
    let run = tmp.path().join("run");
    let imp = source_tda::train::import::import_trainer(
        &trainer,
        &t,
        "train",
        10,
        &peft_dir().join("base"),
        &run,
        Path::new("finetune"),
    )
    .unwrap();
    let ck = &imp.segments[0].checkpoints[0];
    assert_eq!(Path::new(&ck.path), run.join("adapters/checkpoint-2"));
    let r = reference();
    let docs = reference_docs(&r);
    let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &Device::Cpu).unwrap();
    let m = Model::load(Path::new(&ck.path), &LoadOptions::default(), &Device::Cpu).unwrap();
    let err = max_abs_diff(&m.forward(&batch.input_ids).unwrap(), &r["logits.a"]);
    assert!(err <= 1e-5, "{err}");
    // v̂ = v / (1 − β₂²) under this tool's name of lora_A.
    let opt = candle_core::safetensors::load(
        run.join("optimizer/checkpoint-2.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let v = &opt[&format!("exp_avg_sq.{q}.lora_A.weight")];
    let want = 0.5 / (1.0 - 0.99f64 * 0.99);
    assert!((max_abs(v) as f64 - want).abs() < 1e-3 * want);
}

#[test]
fn the_lora_demo_pipeline_attributes_through_the_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = crate::common::cli(
        &crate::common::repo_root(),
        &[
            "run",
            "pipelines/lora-demo.toml",
            "--run-dir",
            run.to_str().unwrap(),
        ],
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:1"),
            ("HOME", dir.path().to_str().unwrap()),
        ],
    );
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    // Every checkpoint is a PEFT adapter folder; the step-1 group is scored at θ₀, the base
    // with the fresh adapter the fine-tune started from.
    let traj = source_tda::train::Trajectory::load(&run.join("finetune/trajectory.json")).unwrap();
    for c in traj.segments.iter().flat_map(|s| &s.checkpoints) {
        let p = run.join(&c.path);
        assert!(
            p.join("adapter_model.safetensors").is_file(),
            "{}",
            p.display()
        );
        assert!(!p.join("model.safetensors").exists());
    }
    // The query gradients and the fitted factors are the adapters' (4 attention projections
    // × A, B × the demo's layers), nothing else.
    let g = candle_core::safetensors::load(run.join("query/gradients.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(!g.is_empty() && g.len() % 8 == 0, "{}", g.len());
    assert!(
        g.keys().all(|k| k.contains("_proj.lora_")),
        "{:?}",
        g.keys()
    );
    let f = candle_core::safetensors::load(run.join("fit/segment-0.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(f.keys().all(|k| k.contains(".lora_")), "{:?}", f.keys());
}
