//! `[train]` and `[pretrain]`: defaults are resolved explicitly, and bad values are errors
//! naming the key and what is allowed.

use std::path::Path;

use source_tda::config::{Config, MassSpec, OptimizerKind};

fn load(extra: &str) -> Result<Config, String> {
    let text = format!(
        "[model]\nid = \"org/m\"\n[data.train]\nid = \"org/d\"\n[data.pretrain]\nid = \"org/p\"\n{extra}"
    );
    Config::from_str_at(&text, Path::new("c.toml"), Path::new("/")).map_err(|e| e.to_string())
}

#[test]
fn defaults_are_resolved_per_optimizer() {
    let c = load("[run]\nseed = 7\n").unwrap();
    assert_eq!(c.train.optimizer, OptimizerKind::AdamW);
    assert_eq!(
        (c.train.beta1, c.train.beta2, c.train.eps),
        (Some(0.9), Some(0.999), Some(1e-8))
    );
    assert_eq!(c.train.seed, Some(7));
    assert_eq!(c.train.segments, Some(3));
    assert_eq!(c.train.checkpoints_per_segment, 2);
    let c = load("[train]\noptimizer = \"momentum\"\nsegment_boundaries = [5, 9]\n").unwrap();
    assert_eq!(c.train.momentum, Some(0.9));
    assert_eq!(c.train.beta1, None);
    assert_eq!(c.train.segments, Some(3));
    // The resolved config reloads to itself.
    let again = Config::from_str_at(&c.to_toml(), Path::new("c.toml"), Path::new("/")).unwrap();
    assert_eq!(again, c);
    let c = load("[pretrain]\nlr_mass = 12.5\n").unwrap();
    let p = c.pretrain.unwrap();
    assert_eq!(p.lr_mass, MassSpec::Value(12.5));
    assert_eq!(p.dataset.as_deref(), Some("pretrain"));
}

#[test]
fn bad_values_name_the_key_and_the_allowed_values() {
    for (extra, key, allowed) in [
        ("[train]\nlr = 0\n", "train.lr", "a number > 0"),
        ("[train]\nbeta2 = 1.0\n", "train.beta2", "0 ≤ β < 1"),
        (
            "[train]\noptimizer = \"sgd\"\nbeta1 = 0.9\n",
            "train.beta1",
            "remove it",
        ),
        ("[train]\nbatch_size = 0\n", "train.batch_size", "1 or more"),
        (
            "[train]\nsegment_boundaries = [5, 3]\n",
            "train.segment_boundaries",
            "strictly",
        ),
        (
            "[train]\nsegments = 2\nsegment_boundaries = [5, 8]\n",
            "train.segments",
            "disagrees",
        ),
        ("[train]\ndataset = \"query\"\n", "train.dataset", "allowed"),
        (
            "[train]\nmax_grad_norm = -1\n",
            "train.max_grad_norm",
            "a number > 0",
        ),
        (
            "[pretrain]\nlr_mass = \"forever\"\n",
            "pretrain.lr_mass",
            "converged",
        ),
        ("[pretrain]\nlr_mass = -2\n", "pretrain.lr_mass", "≥ 0"),
        (
            "[train]\nschedule = \"step\"\n",
            "train.schedule",
            "constant",
        ),
        ("[train]\nlearning_rate = 1\n", "train", "learning_rate"),
    ] {
        let e = load(extra).unwrap_err();
        assert!(e.contains(key) && e.contains(allowed), "{extra}: {e}");
        assert!(e.starts_with("c.toml"), "{e}");
    }
}
