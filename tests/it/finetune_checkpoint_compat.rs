//! A fine-tuned checkpoint is a Hugging Face checkpoint other tools load: candle-transformers'
//! Llama (an independent implementation that reads HF names and config.json the way
//! `transformers` does) loads `model.safetensors` + `config.json` written by the `finetune`
//! stage and gives the same logits as this crate's model; `tokenizer.json` loads too.

use crate::common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::llama as ref_llama;
use source_tda::model::{LoadOptions, Model};
use source_tda::train::Trajectory;

#[test]
fn finetuned_checkpoint_loads_in_candle_transformers_with_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::demo_tokenizer().parent().unwrap().to_path_buf();
    let docs: String = (0..16)
        .map(|i| format!("{{\"text\": \"The river Navo{i} flows into Lake Tarsk.\"}}\n"))
        .collect();
    common::write(&dir.path().join("train.jsonl"), docs);
    common::write(
        &dir.path().join("c.toml"),
        format!(
            "[model]\nid = \"{}\"\n[data.train]\nid = \"./train.jsonl\"\nmax_length = 32\n\
             [train]\noptimizer = \"adamw\"\nlr = 1e-2\nbatch_size = 4\nepochs = 1\nsegments = 1\n\
             checkpoints_per_segment = 1\n",
            model.display()
        ),
    );
    for stage in ["fetch", "prepare", "finetune"] {
        let o = common::cli(
            dir.path(),
            &["-q", stage, "--config", "c.toml", "--run-dir", "run"],
            &[],
        );
        assert!(o.status.success(), "{stage}: {}", common::stderr(&o));
    }
    let run = dir.path().join("run");
    let traj = Trajectory::load(&run.join("finetune/trajectory.json")).unwrap();
    let ckpt = run.join(&traj.final_checkpoint().path);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(ckpt.join(f).exists(), "{f} in {}", ckpt.display());
    }
    tokenizers::Tokenizer::from_file(ckpt.join("tokenizer.json")).unwrap();

    let dev = Device::Cpu;
    let ours = Model::load(&ckpt, &LoadOptions::default(), &dev).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    let ref_cfg: ref_llama::LlamaConfig = serde_json::from_value(config).unwrap();
    let ref_cfg = ref_cfg.into_config(false);
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[ckpt.join("model.safetensors")],
            DType::F32,
            &dev,
        )
    }
    .unwrap();
    let reference = ref_llama::Llama::load(vb, &ref_cfg).unwrap();

    // The weights did change in fine-tuning (the check is not vacuous).
    let base = Model::load(&model, &LoadOptions::default(), &dev).unwrap();
    let ids: Vec<u32> = vec![5, 17, 42, 99, 3, 250, 7];
    let x = Tensor::new(ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let got = ours.forward(&x).unwrap().i((0, ids.len() - 1)).unwrap();
    let before = base.forward(&x).unwrap().i((0, ids.len() - 1)).unwrap();
    let mut cache = ref_llama::Cache::new(false, DType::F32, &ref_cfg, &dev).unwrap();
    let want = reference
        .forward(&x, 0, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert!(
        diff(&got, &want) <= 1e-4,
        "ours vs candle-transformers: {}",
        diff(&got, &want)
    );
    assert!(diff(&got, &before) > 1e-3, "fine-tuning changed nothing");
}
