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
    let c = load("[pretrain]\nlr_mass = \"from_model\"\n").unwrap();
    assert_eq!(
        c.pretrain.unwrap().lr_mass,
        MassSpec::Word("from_model".into())
    );
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
            "[pretrain]\nlr_mass = \"from-model\"\n",
            "pretrain.lr_mass",
            "\"from_model\" (the model's recorded training/trajectory.json)",
        ),
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

#[test]
fn stages_inherit_from_train_by_key_and_by_group() {
    let c = load(
        "[data.domain]\nid = \"org/x\"\n[train]\nlr = 1e-3\nbeta2 = 0.95\nmax_steps = 50\n\
         max_grad_norm = 1.0\nsegment_boundaries = [10]\n\
         [[train.stages]]\nname = \"a\"\n\
         [[train.stages]]\nname = \"b\"\ndataset = \"domain\"\noptimizer = \"momentum\"\n\
         epochs = 2\nsegments = 4\ncontinue_optimizer = false\n\
         [[train.stages]]\nname = \"c\"\ndataset = \"domain\"\noptimizer = \"momentum\"\n\
         momentum = 0.5\ncontinue_optimizer = true\nlr = 2e-3\n",
    )
    .unwrap();
    let s = c.train.stage_list();
    let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    // `a` inherits everything.
    assert_eq!(s[0].train.dataset, "train");
    assert_eq!(
        (s[0].train.lr, s[0].train.beta2, s[0].train.max_steps),
        (1e-3, Some(0.95), Some(50))
    );
    assert_eq!(s[0].train.segment_boundaries, Some(vec![10]));
    assert_eq!(s[0].train.segments, Some(2));
    // `b` changes the optimizer (no Adam keys), epochs (no inherited max_steps) and segments
    // (no inherited boundaries); the rest is inherited.
    let b = &s[1].train;
    assert_eq!(b.dataset, "domain");
    assert_eq!(
        (b.momentum, b.beta1, b.beta2, b.eps),
        (Some(0.9), None, None, None)
    );
    assert_eq!((b.epochs, b.max_steps), (2, None));
    assert_eq!((b.segments, b.segment_boundaries.clone()), (Some(4), None));
    assert_eq!((b.lr, b.max_grad_norm), (1e-3, Some(1.0)));
    assert!(!s[1].continue_optimizer);
    assert_eq!((s[2].train.momentum, s[2].train.lr), (Some(0.5), 2e-3));
    assert!(s[2].continue_optimizer);
    // The resolved config states the stages as written and reloads to itself.
    let text = c.to_toml();
    assert!(text.contains("[[train.stages]]"), "{text}");
    let again = Config::from_str_at(&text, Path::new("c.toml"), Path::new("/")).unwrap();
    assert_eq!(again, c);
    assert_eq!(again.train.stage_list(), s);
    // Without stages, [train] is the one stage `finetune`.
    let c = load("").unwrap();
    let s = c.train.stage_list();
    assert_eq!((s.len(), s[0].name.as_str()), (1, "finetune"));
    assert_eq!(s[0].train, c.train);
}

#[test]
fn bad_stages_and_data_sets_name_the_key_and_the_fix() {
    let st = |extra: &str| format!("[data.domain]\nid = \"org/x\"\n{extra}");
    for (extra, key, allowed) in [
        (
            st("[[train.stages]]\nname = \"a\"\ndataset = \"domain\"\n[[train.stages]]\nname = \"a\"\n"),
            "train.stages[1].name",
            "unique",
        ),
        (
            st("[[train.stages]]\nname = \"pretrain\"\ndataset = \"domain\"\n"),
            "train.stages[0].name",
            "not `pretrain`",
        ),
        (
            st("[[train.stages]]\nname = \"a\"\ndataset = \"nope\"\n"),
            "train.stages[0].dataset",
            "`domain`",
        ),
        (
            st("[[train.stages]]\nname = \"a\"\ndataset = \"domain\"\nlr = -1\n"),
            "train.stages[0].lr",
            "stage `a`",
        ),
        (
            st("[[train.stages]]\nname = \"a\"\n[[train.stages]]\nname = \"b\"\n\
                dataset = \"domain\"\noptimizer = \"sgd\"\ncontinue_optimizer = true\n"),
            "train.stages[1].continue_optimizer",
            "same optimizer",
        ),
        (
            st("[[train.stages]]\nname = \"a\"\ndataset = \"domain\"\nloss_normalization = \"mean_per_token\"\n"),
            "train.stages",
            "unknown field",
        ),
        (
            st("[train]\nimport_from = \"/x\"\n[[train.stages]]\nname = \"a\"\ndataset = \"domain\"\n"),
            "train.import_from",
            "cannot be combined",
        ),
        (st(""), "data.domain", "is not used"),
        (
            "[data.\"a b\"]\nid = \"org/x\"\n".to_string(),
            "data",
            "letters, digits",
        ),
    ] {
        let e = load(&extra).unwrap_err();
        assert!(e.contains(key) && e.contains(allowed), "{extra}: {e}");
    }
}
