//! Generated queries: with `[data.query] shape = "prompt"` the query stage completes each
//! prompt with the final fine-tuned model and measures −log p(completion | prompt) on it. The
//! demo runs end to end that way, and each completion equals an independent greedy decode
//! (argmax over repeated full forward passes, no KV cache) of the final checkpoint.

use crate::common;

use arrow_array::cast::AsArray;
use candle_core::{Device, IndexOp, Tensor};
use source_tda::data::read_prepared;
use source_tda::model::{LoadOptions, Model};
use source_tda::output::parquet::read_batches;

use crate::common::{cli, stderr, write};

fn greedy_by_full_forwards(model: &Model, prompt: &[u32], n: usize, eos: u32) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let x = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&x).unwrap();
        let next = logits
            .i((0, seq.len() - 1))
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        seq.push(next);
        if next == eos {
            break;
        }
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn the_demo_runs_with_generated_queries_that_equal_an_independent_greedy_decode() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::repo_root();
    let cfg = std::fs::read_to_string(root.join("configs/demo.toml")).unwrap();
    let query_section =
        "split = \"queries\"                  # data/queries.jsonl\nshape = \"prompt_completion\"";
    assert!(
        cfg.contains(query_section),
        "the demo config changed: update this test"
    );
    let cfg = cfg
        .replace(query_section, "split = \"queries\"\nshape = \"prompt\"")
        .replace(
            "cache_dir = \"../assets/hf-cache\"",
            &format!("cache_dir = \"{}\"", root.join("assets/hf-cache").display()),
        )
        + "\n[query]\nmax_new_tokens = 12\n";
    write(&dir.path().join("c.toml"), cfg);
    write(
        &dir.path().join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\", \"query\", \"score\"]\nrun_dir = \"run\"\n",
    );
    let o = cli(dir.path(), &["-q", "run", "p.toml"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = dir.path().join("run");

    // queries.parquet: the completion text, and `generated` set.
    let batches = read_batches(&run.join("score/queries.parquet")).unwrap();
    let mut completions = Vec::new();
    for b in &batches {
        let c = b.column_by_name("completion").unwrap().as_string::<i32>();
        let g = b.column_by_name("generated").unwrap().as_boolean();
        let m = b
            .column_by_name("measurement")
            .unwrap()
            .as_primitive::<arrow_array::types::Float64Type>();
        for i in 0..b.num_rows() {
            assert!(g.value(i));
            assert!(m.value(i).is_finite() && m.value(i) >= 0.0);
            completions.push(c.value(i).to_string());
        }
    }

    // The same completions by an independent greedy decode of the final checkpoint.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["stages"]["query"]["summary"]["generated"], true);
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("fit/plan.json")).unwrap()).unwrap();
    let final_dir = std::path::PathBuf::from(plan["final_checkpoint"].as_str().unwrap());
    let model = Model::load(&final_dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(final_dir.join("config.json")).unwrap())
            .unwrap();
    let eos = config["eos_token_id"].as_u64().unwrap() as u32;
    let tokenizer = tokenizers::Tokenizer::from_file(common::demo_tokenizer()).unwrap();
    let (prompts, _) = read_prepared(&run.join("prepare/query.parquet")).unwrap();
    assert_eq!(prompts.len(), completions.len());
    assert!(!prompts.is_empty());
    for (p, got) in prompts.iter().zip(&completions) {
        assert_eq!(
            p.n_loss_tokens(),
            0,
            "a prompt-only query has no completion yet"
        );
        let want = greedy_by_full_forwards(&model, &p.input_ids, 12, eos);
        assert!(!want.is_empty());
        assert_eq!(
            got,
            &tokenizer.decode(&want, false).unwrap(),
            "{}",
            p.doc_id
        );
    }

    // Scores exist for every generated query.
    let rows: usize = read_batches(&run.join("score/scores.parquet"))
        .unwrap()
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert!(rows >= completions.len());
}
