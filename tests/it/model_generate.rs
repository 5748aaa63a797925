//! Generation with the KV cache equals argmax over repeated full forwards; stop tokens and
//! seeded sampling behave.

use crate::common::model_fixtures as fixtures;

use candle_core::{Device, IndexOp, Tensor};
use fixtures::*;
use source_tda::model::{GenerateOptions, LoadOptions, Model, Sampling};

fn models() -> Vec<(&'static str, tempfile::TempDir)> {
    let llama = LlamaCfg {
        layers: 3,
        ..LlamaCfg::default()
    };
    let gpt2 = Gpt2Cfg::default();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_checkpoint(d1.path(), &llama.config_json(), &llama.tensors(81));
    // A seed whose greedy continuation is not one repeated token (random tied GPT-2s often
    // echo their input), so that the comparison exercises the cache across positions.
    write_checkpoint(d2.path(), &gpt2.config_json(), &gpt2.tensors(97));
    vec![("llama", d1), ("gpt2", d2)]
}

/// Greedy continuation by re-running the whole sequence each step (no cache).
fn greedy_by_full_forwards(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let x = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&x).unwrap();
        let last = logits.i((0, seq.len() - 1)).unwrap();
        seq.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn greedy_generation_equals_argmax_of_full_forwards() {
    for (label, dir) in models() {
        let model = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
        let prompt = [5u32, 17, 2, 40, 9];
        let opts = GenerateOptions {
            max_new_tokens: 12,
            stop_tokens: vec![],
            sampling: Sampling::Greedy,
        };
        let g = model.generate(&prompt, &opts).unwrap();
        assert_eq!(g.tokens.len(), 12);
        assert!(!g.stopped);
        let want = greedy_by_full_forwards(&model, &prompt, 12);
        assert_eq!(g.tokens, want, "{label}");
        let distinct: std::collections::BTreeSet<_> = want.iter().collect();
        assert!(
            distinct.len() > 1,
            "{label}: degenerate continuation {want:?}"
        );

        // Stopping at the 4th greedy token, which is kept.
        let stop = GenerateOptions {
            stop_tokens: vec![want[3]],
            ..opts.clone()
        };
        let first = want.iter().position(|&t| t == want[3]).unwrap();
        let g = model.generate(&prompt, &stop).unwrap();
        assert!(g.stopped);
        assert_eq!(g.tokens, want[..=first].to_vec(), "{label}");
    }
}

#[test]
fn sampled_generation_is_seeded() {
    for (label, dir) in models() {
        let model = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
        let prompt = [3u32, 1, 4];
        let opts = |seed| GenerateOptions {
            max_new_tokens: 16,
            stop_tokens: vec![],
            sampling: Sampling::Sample {
                seed,
                temperature: 1.5,
                top_p: None,
            },
        };
        let a = model.generate(&prompt, &opts(1)).unwrap();
        let b = model.generate(&prompt, &opts(1)).unwrap();
        let c = model.generate(&prompt, &opts(2)).unwrap();
        assert_eq!(a, b, "{label}");
        assert_ne!(a.tokens, c.tokens, "{label}");
        let bad = GenerateOptions {
            sampling: Sampling::Sample {
                seed: 1,
                temperature: 0.0,
                top_p: None,
            },
            ..opts(1)
        };
        assert!(model.generate(&prompt, &bad).is_err());
        assert!(model.generate(&[], &opts(1)).is_err());
    }
}
