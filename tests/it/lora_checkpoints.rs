//! LoRA fine-tune checkpoints are checked like full ones: `step-N/checksums.json` lists the
//! adapter files (and the optimizer's), a damaged or torn adapter file fails
//! `verify_checkpoint` naming the file, and a resumed run discards that checkpoint and every
//! later one, falling back to the one before and ending bitwise where the uninterrupted run
//! ended. On GPT-2 (Conv1D projections) the adapter config says `fan_in_fan_out = true`, as
//! PEFT writes it for that model.

use std::path::Path;

use candle_core::Device;
use source_tda::config::{
    BatchingConfig, LoraTargets, LoraTrainConfig, OptimizerKind, ScheduleKind, TrainConfig,
};
use source_tda::data::PreparedDoc;
use source_tda::error::Error;
use source_tda::train::checkpoint::verify_checkpoint;
use source_tda::train::{train, TrainJob, TrainOutcome};

use crate::common::model_fixtures::*;

fn docs(n: usize, vocab: usize) -> Vec<PreparedDoc> {
    (0..n)
        .map(|i| {
            let len = 5 + i % 4;
            let ids: Vec<u32> = (0..len).map(|t| ((i * 7 + t * 5) % vocab) as u32).collect();
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

fn run(
    base: &Path,
    work: &Path,
    d: &[PreparedDoc],
    hook: &dyn Fn(&str) -> source_tda::Result<()>,
) -> source_tda::Result<TrainOutcome> {
    let t = TrainConfig {
        optimizer: OptimizerKind::AdamW,
        lr: 1e-2,
        schedule: ScheduleKind::Constant,
        batch_size: 4,
        max_steps: Some(3),
        segments: Some(1),
        checkpoints_per_segment: 3,
        seed: Some(1),
        lora: Some(LoraTrainConfig {
            r: 2,
            alpha: 4.0,
            target_modules: LoraTargets::Names(vec!["c_attn".into(), "c_fc".into()]),
            use_rslora: false,
            seed: Some(3),
        }),
        ..Default::default()
    };
    train(&TrainJob {
        base_dir: base,
        docs: d,
        train: &t,
        batching: &BatchingConfig {
            token_budget: 64,
            max_batch_size: 64,
        },
        work_dir: work,
        device: &Device::Cpu,
        step_offset: 0,
        optimizer_from: None,
        hook,
    })
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn a_damaged_lora_checkpoint_is_refused_and_training_falls_back_to_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Gpt2Cfg::default();
    let base = tmp.path().join("base");
    write_checkpoint(&base, &cfg.config_json(), &cfg.tensors(2));
    let d = docs(8, cfg.vocab);
    let no_hook = |_: &str| Ok(());
    let full = run(&base, &tmp.path().join("full"), &d, &no_hook).unwrap();
    assert_eq!(full.checkpoints.len(), 3);
    for (_, dir) in &full.checkpoints {
        verify_checkpoint(dir).unwrap();
        let sums: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("checksums.json")).unwrap()).unwrap();
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.safetensors",
            "state.json",
        ] {
            assert!(sums["sha256"][f].is_string(), "{f} not in {sums}");
        }
        assert!(!dir.join("model.safetensors").exists());
        let ac: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(ac["fan_in_fan_out"], true, "GPT-2's Conv1D");
    }
    let want = adapter_bytes(&full.checkpoints[2].1);
    let crash = |p: &str| match p {
        "step-3" => Err(Error::Injected(p.into())),
        _ => Ok(()),
    };
    for (file, torn) in [
        ("adapter_model.safetensors", false),
        ("adapter_model.safetensors", true),
        ("adapter_config.json", false),
    ] {
        let case = format!("{file}-{}", if torn { "torn" } else { "flipped" });
        let work = tmp.path().join(&case);
        run(&base, &work, &d, &crash).unwrap_err();
        let p = work.join("step-000002").join(file);
        let mut bytes = std::fs::read(&p).unwrap();
        if torn {
            bytes.truncate(bytes.len() / 2);
        } else {
            let i = bytes.len() - 3;
            bytes[i] ^= 0x04;
        }
        std::fs::write(&p, bytes).unwrap();
        let why = verify_checkpoint(p.parent().unwrap()).unwrap_err();
        assert!(
            why.contains(file) && why.contains("does not match its checksum"),
            "{case}: {why}"
        );
        let resumed = run(&base, &work, &d, &no_hook).unwrap();
        assert_eq!(resumed.resumed_from, 1, "{case}: falls back to step 1");
        assert_eq!(resumed.log, full.log, "{case}: same log");
        assert!(
            adapter_bytes(&resumed.checkpoints[2].1) == want,
            "{case}: same final adapter"
        );
    }
}
