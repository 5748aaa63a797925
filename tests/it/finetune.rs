//! The fine-tuning loop on a tiny Llama: the loss decreases, runs are bitwise reproducible,
//! an interrupted run resumes to the same weights, checkpoints reload to identical logits
//! (and carry Adam's m̂ and v̂),
//! gradient accumulation does not depend on the micro-batch split, and the learning-rate
//! mass of every segment is the exact sum of its schedule's rates.

use crate::common::model_fixtures as fixtures;

use std::path::{Path, PathBuf};

use candle_core::Device;
use fixtures::*;
use source_tda::config::LossNormalization;
use source_tda::config::{BatchingConfig, OptimizerKind, ScheduleKind, TrainConfig};
use source_tda::data::PreparedDoc;
use source_tda::error::Error;
use source_tda::model::{LoadOptions, Model, TokenBatch};
use source_tda::train::checkpoint::read_safetensors;
use source_tda::train::finetune::{plan, step_gradients};
use source_tda::train::{train, train_in_memory, TrainJob, TrainOutcome};

const VOCAB: usize = 61;

/// A base model folder with a tiny random Llama.
fn base_model(dir: &Path) -> PathBuf {
    let cfg = LlamaCfg::default();
    let base = dir.join("base");
    write_checkpoint(&base, &cfg.config_json(), &cfg.tensors(11));
    base
}

/// Learnable documents: arithmetic token sequences (next token = previous + stride).
fn docs(n: usize) -> Vec<PreparedDoc> {
    (0..n)
        .map(|i| {
            let len = 6 + i % 9;
            let (start, stride) = (i * 7 % VOCAB, 1 + i % 3);
            let ids: Vec<u32> = (0..len)
                .map(|t| ((start + t * stride) % VOCAB) as u32)
                .collect();
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

fn config(opt: OptimizerKind, steps: u64) -> TrainConfig {
    let mut t = TrainConfig {
        optimizer: opt,
        lr: 1e-2,
        batch_size: 6,
        max_steps: Some(steps),
        schedule: ScheduleKind::Cosine,
        warmup_steps: 2,
        max_grad_norm: Some(5.0),
        segments: Some(2),
        checkpoints_per_segment: 2,
        seed: Some(3),
        ..Default::default()
    };
    match opt {
        OptimizerKind::AdamW => {
            t.beta1 = Some(0.9);
            t.beta2 = Some(0.999);
            t.eps = Some(1e-8);
        }
        OptimizerKind::Momentum => t.momentum = Some(0.9),
        OptimizerKind::Sgd => {}
    }
    t
}

fn batching(budget: usize) -> BatchingConfig {
    BatchingConfig {
        token_budget: budget,
        max_batch_size: 64,
    }
}

fn run(
    base: &Path,
    work: &Path,
    t: &TrainConfig,
    d: &[PreparedDoc],
    hook: &dyn Fn(&str) -> source_tda::Result<()>,
) -> source_tda::Result<TrainOutcome> {
    train(&TrainJob {
        base_dir: base,
        docs: d,
        train: t,
        batching: &batching(64),
        work_dir: work,
        device: &Device::Cpu,
        step_offset: 0,
        optimizer_from: None,
        hook,
    })
}

fn no_hook(_: &str) -> source_tda::Result<()> {
    Ok(())
}

fn weights_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn loss_decreases_for_every_optimizer() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let d = docs(36);
    for (opt, lr) in [
        (OptimizerKind::AdamW, 1e-2),
        (OptimizerKind::Momentum, 2e-2),
        (OptimizerKind::Sgd, 1e-1),
    ] {
        let mut t = config(opt, 24);
        t.lr = lr;
        let out = run(
            &base,
            &tmp.path().join(format!("{opt:?}")),
            &t,
            &d,
            &no_hook,
        )
        .unwrap();
        let first: f64 = out.log[..3].iter().map(|r| r.loss).sum::<f64>() / 3.0;
        let last: f64 = out.log[21..].iter().map(|r| r.loss).sum::<f64>() / 3.0;
        assert!(
            last < 0.8 * first,
            "{opt:?}: loss {first:.3} → {last:.3} did not decrease by 20%"
        );
        assert_eq!(out.log.len(), 24);
        assert_eq!(out.checkpoints.len(), 4);
    }
}

#[test]
fn runs_are_bitwise_deterministic_and_checkpoints_reload_to_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let d = docs(20);
    let t = config(OptimizerKind::AdamW, 8);
    let a = run(&base, &tmp.path().join("a"), &t, &d, &no_hook).unwrap();
    let b = run(&base, &tmp.path().join("b"), &t, &d, &no_hook).unwrap();
    assert_eq!(a.log, b.log);
    for ((sa, da), (sb, db)) in a.checkpoints.iter().zip(&b.checkpoints) {
        assert_eq!(sa, sb);
        assert!(weights_bytes(da) == weights_bytes(db), "step {sa} differs");
        let oa = std::fs::read(da.join("optimizer.safetensors")).unwrap();
        assert!(oa == std::fs::read(db.join("optimizer.safetensors")).unwrap());
    }
    // Every checkpoint carries Adam's bias-corrected m̂ (`exp_avg.NAME`) beside v̂, for every
    // parameter: it reads back as the resume state's raw m / (1 − β₁ᵗ).
    for (step, dir) in &a.checkpoints {
        let read = |f: &str| read_safetensors(&dir.join(f), &Device::Cpu).unwrap();
        let (att, resume) = (read("optimizer.safetensors"), read("resume.safetensors"));
        let n_params = a.model.params().len();
        assert_eq!(
            att.len(),
            2 * n_params,
            "step {step}: v̂ and m̂ per parameter"
        );
        let bc1 = 1.0 - 0.9f64.powi(*step as i32);
        for p in a.model.params() {
            let m_hat = att[&format!("exp_avg.{}", p.name)].flatten_all().unwrap();
            let m = resume[&format!("exp_avg.{}", p.name)]
                .flatten_all()
                .unwrap();
            assert!(att.contains_key(&format!("exp_avg_sq.{}", p.name)));
            let want = (m.to_dtype(candle_core::DType::F64).unwrap() / bc1).unwrap();
            let got = m_hat.to_dtype(candle_core::DType::F64).unwrap();
            let err: f64 = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            let scale: f64 = want.abs().unwrap().max(0).unwrap().to_scalar().unwrap();
            assert!(
                err <= 1e-6 * scale.max(1e-12),
                "step {step} {}: {err:e}",
                p.name
            );
        }
    }
    // The last checkpoint reloads to bitwise the same logits as the in-memory model.
    let (_, last) = a.checkpoints.last().unwrap();
    let reloaded = Model::load(last, &LoadOptions::default(), &Device::Cpu).unwrap();
    let rows: Vec<(&[u32], &[u8])> = d[..4]
        .iter()
        .map(|x| (x.input_ids.as_slice(), x.loss_mask.as_slice()))
        .collect();
    let batch = TokenBatch::new(&rows, 0, None, &Device::Cpu).unwrap();
    let la = a.model.forward(&batch.input_ids).unwrap();
    let lb = reloaded.forward(&batch.input_ids).unwrap();
    let bits = |t: &candle_core::Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&la), bits(&lb));
    // A different seed visits documents in another order and ends elsewhere.
    let mut t2 = t.clone();
    t2.seed = Some(4);
    let c = run(&base, &tmp.path().join("c"), &t2, &d, &no_hook).unwrap();
    assert!(weights_bytes(&c.checkpoints[3].1) != weights_bytes(&a.checkpoints[3].1));
}

/// The in-memory entry point the LDS retrains with takes exactly the finetune stage's
/// steps: same log, bitwise the same final weights, for every optimizer.
#[test]
fn training_in_memory_equals_the_checkpointed_run_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let d = docs(20);
    for opt in [
        OptimizerKind::AdamW,
        OptimizerKind::Momentum,
        OptimizerKind::Sgd,
    ] {
        let t = config(opt, 7);
        let a = run(
            &base,
            &tmp.path().join(format!("{opt:?}")),
            &t,
            &d,
            &no_hook,
        )
        .unwrap();
        let (model, log) = train_in_memory(&base, &d, &t, &batching(64), &Device::Cpu).unwrap();
        assert_eq!(log, a.log, "{opt:?}");
        for (pa, pb) in a.model.params().iter().zip(model.params()) {
            let bits = |t: &candle_core::Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            assert!(
                bits(pa.var.as_tensor()) == bits(pb.var.as_tensor()),
                "{opt:?}: parameter {} differs",
                pa.name
            );
        }
    }
    let e = train_in_memory(
        &base,
        &[],
        &config(OptimizerKind::Sgd, 3),
        &batching(64),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("no documents"), "{e}");
}

#[test]
fn interrupted_runs_resume_to_bitwise_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let d = docs(20);
    for opt in [OptimizerKind::AdamW, OptimizerKind::Momentum] {
        let t = config(opt, 8); // checkpoints at 2, 4, 6, 8
        let full = run(
            &base,
            &tmp.path().join(format!("full-{opt:?}")),
            &t,
            &d,
            &no_hook,
        )
        .unwrap();
        let want = weights_bytes(&full.checkpoints[3].1);
        // Crash after step 5 (last checkpoint: 4), and while writing checkpoint 6.
        for point in ["step-5", "in-checkpoint-6", "after-checkpoint-2"] {
            let work = tmp.path().join(format!("{opt:?}-{point}"));
            let crash = |p: &str| {
                if p == point {
                    Err(Error::Injected(p.into()))
                } else {
                    Ok(())
                }
            };
            let e = run(&base, &work, &t, &d, &crash).unwrap_err();
            assert!(matches!(e, Error::Injected(_)));
            if point == "in-checkpoint-6" {
                assert!(!work.join("step-000006").exists(), "never looks complete");
                assert!(std::fs::read_dir(&work).unwrap().any(|e| e
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp-")));
            }
            let resumed = run(&base, &work, &t, &d, &no_hook).unwrap();
            let from = match point {
                "step-5" | "in-checkpoint-6" => 4,
                _ => 2,
            };
            assert_eq!(resumed.resumed_from, from, "{point}");
            assert_eq!(resumed.log, full.log, "{opt:?} {point}: same log");
            assert!(
                weights_bytes(&resumed.checkpoints[3].1) == want,
                "{opt:?} {point}: resumed weights differ"
            );
        }
    }
}

#[test]
fn gradient_accumulation_does_not_depend_on_the_split() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let model = Model::load(&base, &LoadOptions::default(), &Device::Cpu).unwrap();
    let d = docs(10);
    let refs: Vec<&PreparedDoc> = d.iter().collect();
    for norm in [
        LossNormalization::SumPerDocument,
        LossNormalization::MeanPerToken,
    ] {
        let (whole, v1, m1) = step_gradients(&model, &refs, norm, &batching(4096)).unwrap();
        let (split, v2, m2) = step_gradients(&model, &refs, norm, &batching(30)).unwrap();
        assert_eq!(m1, 1);
        assert!(
            m2 >= 5,
            "the small budget splits the step ({m2} micro-batches)"
        );
        assert!((v1 - v2).abs() < 1e-5 * v1.abs(), "{v1} vs {v2}");
        for (a, b) in whole.iter().zip(&split) {
            let scale = max_abs(a).max(1e-6);
            assert!(max_abs_diff(a, b) <= 1e-5 * scale, "{norm:?}");
        }
        // The objective's normalisation: per document vs per loss token.
        let total: f64 = model
            .doc_losses(
                &TokenBatch::new(
                    &d.iter()
                        .map(|x| (x.input_ids.as_slice(), x.loss_mask.as_slice()))
                        .collect::<Vec<_>>(),
                    0,
                    None,
                    &Device::Cpu,
                )
                .unwrap(),
            )
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .sum();
        let denom = match norm {
            LossNormalization::SumPerDocument => 10.0,
            LossNormalization::MeanPerToken => {
                d.iter().map(|x| x.n_loss_tokens()).sum::<usize>() as f64
            }
        };
        assert!((v1 - total / denom).abs() < 1e-4 * v1.abs(), "{norm:?}");
    }
}

/// The Trainer's lambdas written out independently: warm-up k/W, then the decay.
fn reference_rate(kind: ScheduleKind, eta: f64, w: u64, total: u64, k: u64) -> f64 {
    if k < w {
        return eta * k as f64 / w as f64;
    }
    let p = (k - w) as f64 / (total - w) as f64;
    eta * match kind {
        ScheduleKind::Constant => 1.0,
        ScheduleKind::Linear => 1.0 - p,
        ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}

#[test]
fn segment_masses_are_exact_sums_for_every_schedule() {
    for kind in [
        ScheduleKind::Constant,
        ScheduleKind::Linear,
        ScheduleKind::Cosine,
    ] {
        for (warmup, n_docs, bs, epochs, segs, per) in [
            (0, 100, 8, 3, 3, 2),
            (5, 37, 4, 2, 4, 3),
            (0, 10, 1, 1, 1, 1),
        ] {
            let t = TrainConfig {
                schedule: kind,
                lr: 0.25,
                warmup_steps: warmup,
                batch_size: bs,
                epochs,
                segments: Some(segs),
                checkpoints_per_segment: per,
                ..Default::default()
            };
            let (sched, plan) = plan(&t, n_docs).unwrap();
            let total = (n_docs.div_ceil(bs) as u64) * epochs as u64;
            assert_eq!(sched.total, total);
            assert_eq!(plan.len(), segs);
            assert_eq!(plan.last().unwrap().end, total);
            let rates = sched.rates();
            let mut all = 0.0;
            for s in &plan {
                assert_eq!(s.checkpoints.len(), per);
                assert_eq!(*s.checkpoints.last().unwrap(), s.end);
                let mass: f64 = rates[s.start as usize..s.end as usize].iter().sum();
                let want: f64 = (s.start..s.end)
                    .map(|k| reference_rate(kind, 0.25, warmup, total, k))
                    .sum();
                assert!(
                    (mass - want).abs() <= 1e-12 * want.max(1.0),
                    "{kind:?} segment ({}, {}]: {mass} vs {want}",
                    s.start,
                    s.end
                );
                all += mass;
            }
            if warmup == 0 {
                let tf = total as f64;
                let closed = match kind {
                    ScheduleKind::Constant => 0.25 * tf,
                    _ => 0.25 * (tf + 1.0) / 2.0,
                };
                assert!(
                    (all - closed).abs() <= 1e-12 * closed,
                    "{kind:?}: {all} vs {closed}"
                );
            }
        }
    }
}

#[test]
fn a_second_stage_continues_from_the_first_with_a_fresh_or_continued_optimizer() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let (d1, d2) = (docs(20), docs(31)[20..].to_vec());
    let mut t = config(OptimizerKind::AdamW, 4);
    t.segments = Some(1);
    let a = run(&base, &tmp.path().join("a"), &t, &d1, &no_hook).unwrap();
    let a_final = a.checkpoints.last().unwrap().1.clone();
    let stage_b = |work: &str, cont: bool, hook: &dyn Fn(&str) -> source_tda::Result<()>| {
        train(&TrainJob {
            base_dir: &a_final,
            docs: &d2,
            train: &t,
            batching: &batching(64),
            work_dir: &tmp.path().join(work),
            device: &Device::Cpu,
            step_offset: 4,
            optimizer_from: cont.then_some(a_final.as_path()),
            hook,
        })
    };
    let fresh = stage_b("fresh", false, &no_hook).unwrap();
    let cont = stage_b("cont", true, &no_hook).unwrap();
    let steps: Vec<u64> = fresh.checkpoints.iter().map(|c| c.0).collect();
    assert_eq!(steps, vec![6, 8], "global step numbers");
    assert_eq!(fresh.log.first().unwrap().step, 5);
    assert_eq!((fresh.segments[0].start, fresh.segments[0].end), (4, 8));
    let state = |o: &TrainOutcome| -> serde_json::Value {
        let p = o.checkpoints[1].1.join("state.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(state(&fresh)["optimizer_steps"], 4, "Adam's t restarts");
    assert!(
        state(&cont).get("optimizer_steps").is_none(),
        "t = 8 = step"
    );
    assert!(weights_bytes(&fresh.checkpoints[1].1) != weights_bytes(&cont.checkpoints[1].1));
    // Killed after step 7 of the continued stage: resumes from 6 with t = 6, bitwise.
    let crash = |p: &str| match p {
        "step-7" => Err(Error::Injected(p.into())),
        _ => Ok(()),
    };
    assert!(stage_b("cont2", true, &crash).is_err());
    let resumed = stage_b("cont2", true, &no_hook).unwrap();
    assert_eq!(resumed.resumed_from, 2);
    assert_eq!(resumed.log, cont.log);
    assert!(weights_bytes(&resumed.checkpoints[1].1) == weights_bytes(&cont.checkpoints[1].1));
}

#[test]
fn a_damaged_or_torn_checkpoint_is_discarded_and_training_falls_back_to_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let d = docs(20);
    let t = config(OptimizerKind::AdamW, 8); // checkpoints at 2, 4, 6, 8
    let full = run(&base, &tmp.path().join("full"), &t, &d, &no_hook).unwrap();
    let want = weights_bytes(&full.checkpoints[3].1);
    let crash = |p: &str| {
        if p == "step-5" {
            Err(Error::Injected(p.into()))
        } else {
            Ok(())
        }
    };
    // Killed after step 5 (checkpoints 2 and 4 on disk), then checkpoint 4 (or 2) damaged:
    // one byte flipped, or the file cut short (torn).
    for (ckpt, file, torn, from) in [
        (4, "resume.safetensors", false, 2),
        (4, "model.safetensors", false, 2),
        (4, "model.safetensors", true, 2),
        (4, "state.json", true, 2),
        (2, "optimizer.safetensors", false, 0),
    ] {
        let case = format!("{ckpt}-{file}-{}", if torn { "torn" } else { "flipped" });
        let work = tmp.path().join(&case);
        run(&base, &work, &t, &d, &crash).unwrap_err();
        let p = work.join(format!("step-{ckpt:06}")).join(file);
        let mut bytes = std::fs::read(&p).unwrap();
        if torn {
            bytes.truncate(bytes.len() / 2);
        } else {
            let i = bytes.len() - 5;
            bytes[i] ^= 0x10;
        }
        std::fs::write(&p, bytes).unwrap();
        assert!(
            source_tda::train::checkpoint::verify_checkpoint(p.parent().unwrap()).is_err(),
            "{case}"
        );
        let resumed = run(&base, &work, &t, &d, &no_hook).unwrap();
        assert_eq!(resumed.resumed_from, from, "{case}: falls back");
        assert_eq!(resumed.log, full.log, "{case}: same log");
        assert!(
            weights_bytes(&resumed.checkpoints[3].1) == want,
            "{case}: same final weights"
        );
        for (_, dir) in &resumed.checkpoints {
            source_tda::train::checkpoint::verify_checkpoint(dir).unwrap();
        }
    }
}

/// A clipped step scored alone (checkpoints after it and before it) saves its unit batch
/// gradient ĝ = g / ‖g‖ before clipping in the checkpoint after it: recomputed here from
/// the checkpoint before it and the documents the step visited, per parameter, with
/// ‖ĝ‖ = 1. Steps inside longer groups, and unclipped runs, save none.
#[test]
fn clipped_one_step_groups_save_their_batch_gradient_direction() {
    use source_tda::train::checkpoint::CLIP_DIRECTION;
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let d = docs(20);
    // T = 4 in 2 segments of 2 checkpoints: a checkpoint after every step; max_norm 1e-3
    // clips every step.
    let mut t = config(OptimizerKind::Momentum, 4);
    t.max_grad_norm = Some(1e-3);
    let out = run(&base, &tmp.path().join("every"), &t, &d, &no_hook).unwrap();
    assert_eq!(out.checkpoints.len(), 4);
    for (k, (step, dir)) in out.checkpoints.iter().enumerate() {
        assert_eq!(*step, k as u64 + 1);
        let before = match k {
            0 => base.clone(),
            _ => out.checkpoints[k - 1].1.clone(),
        };
        let model = Model::load(&before, &LoadOptions::default(), &Device::Cpu).unwrap();
        let visited: Vec<&PreparedDoc> = out
            .visits
            .iter()
            .filter(|(s, _)| s == step)
            .map(|(_, i)| &d[*i as usize])
            .collect();
        let (g, _, _) = step_gradients(
            &model,
            &visited,
            LossNormalization::SumPerDocument,
            &batching(64),
        )
        .unwrap();
        let norm = g
            .iter()
            .map(|x| {
                x.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            })
            .sum::<f64>()
            .sqrt();
        assert!(norm > 1e-3 * 10.0, "the step is clipped: ‖g‖ = {norm}");
        let saved = read_safetensors(&dir.join(CLIP_DIRECTION), &Device::Cpu).unwrap();
        assert_eq!(saved.len(), model.params().len());
        let mut sq = 0f64;
        for (p, gp) in model.params().iter().zip(&g) {
            let s = &saved[&p.name];
            let want = (gp / norm).unwrap();
            let diff: f32 = (s - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-6, "step {step} `{}`: {diff}", p.name);
            sq += s
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
        }
        assert!((sq - 1.0).abs() < 1e-4, "‖ĝ‖² = {sq}");
    }
    // Checkpoints every 2 steps (groups of 2), or no clipping: nothing saved.
    let mut sparse = t.clone();
    sparse.checkpoints_per_segment = 1;
    let mut unclipped = t.clone();
    unclipped.max_grad_norm = None;
    for (name, t) in [("sparse", sparse), ("unclipped", unclipped)] {
        let out = run(&base, &tmp.path().join(name), &t, &d, &no_hook).unwrap();
        for (_, dir) in &out.checkpoints {
            assert!(
                !dir.join(CLIP_DIRECTION).exists(),
                "{name}: {}",
                dir.display()
            );
        }
    }
}
