//! The refined inverse (G + λ)⁻¹ v on a tiny model with fitted EK-FAC factors: zero
//! iterations give the EK-FAC answer bit for bit, iterations drive the true residual
//! (recomputed here from per-document products) below the tolerance, and the document
//! sample is a seeded subset whose mean product is the mean of its documents' products.

use crate::common::model_fixtures as fixtures;

use candle_core::{Device, Tensor};
use fixtures::*;
use source_tda::attribution::{
    layer_dampings, query_gradients, refine_inverse, Curvature, Damping, GaussNewtonSample,
};
use source_tda::curvature::fit_factors;
use source_tda::data::PreparedDoc;
use source_tda::linalg::CgOptions;
use source_tda::model::{LoadOptions, Model, TokenBatch};
use source_tda::passes::{Fisher, PassOptions};

fn doc(ids: Vec<u32>, prompt_len: usize) -> PreparedDoc {
    let n = ids.len();
    PreparedDoc {
        doc_id: format!("d{}-{n}", ids[0]),
        text: String::new(),
        prompt: None,
        completion: None,
        loss_mask: (0..n).map(|t| (t >= prompt_len.max(1)) as u8).collect(),
        input_ids: ids,
        truncated_tokens: 0,
        source: "test".into(),
    }
}

fn opts() -> PassOptions {
    PassOptions {
        fisher: Fisher::True { seed: 3 },
        block_size: None,
        token_budget: 64,
        max_batch_size: 4,
        pad_id: 0,
        eigen_precision: Default::default(),
        capture_dir: None,
    }
}

fn norm(v: &[Tensor]) -> Vec<f64> {
    let q = v[0].dim(0).unwrap();
    (0..q)
        .map(|i| {
            v.iter()
                .map(|t| {
                    t.get(i)
                        .unwrap()
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap() as f64
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

#[test]
fn refined_inverse_starts_at_ekfac_and_reaches_the_tolerance() {
    let cfg = LlamaCfg::default();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &cfg.config_json(), &cfg.tensors(13));
    let model = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let mut rng = Rng::new(17);
    let train: Vec<PreparedDoc> = (0..12)
        .map(|i| doc(rng.tokens(5 + i % 4, cfg.vocab), 0))
        .collect();
    let queries: Vec<PreparedDoc> = (0..3)
        .map(|i| doc(rng.tokens(6 + i, cfg.vocab), 3))
        .collect();
    let o = opts();
    let factors = fit_factors(&[&model], &train, &o, "t").unwrap();
    let qg = query_gradients(&model, &queries, &o).unwrap();
    let v = qg.layers.clone();
    // A well-conditioned system (λ = 10 mean(Λ)): this random model's G is far from EK-FAC
    // (cross-layer terms about as large as the blocks), and the solver is what is checked.
    let damping = Damping::MeanLambda(10.0);
    let lambdas = layer_dampings(&factors, damping).unwrap();
    let ggn = GaussNewtonSample::new(&model, &train, 100, 0, &o).unwrap();
    assert_eq!(ggn.len(), 12);

    let zero = refine_inverse(
        &factors,
        &lambdas,
        damping,
        &ggn,
        &v,
        None,
        CgOptions {
            iterations: 0,
            tolerance: 0.0,
        },
    )
    .unwrap();
    let ekfac = factors.inverse(&v, damping).unwrap();
    for (a, b) in zero.x.iter().zip(&ekfac) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
    // Started from the token factors, as the score stage's influence function computes it.
    let zero = refine_inverse(
        &factors,
        &lambdas,
        damping,
        &ggn,
        &v,
        Some(&qg.factors),
        CgOptions {
            iterations: 0,
            tolerance: 0.0,
        },
    )
    .unwrap();
    let ekfac = factors.inverse_factored(&qg.factors, damping).unwrap();
    for (a, b) in zero.x.iter().zip(&ekfac) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }

    let tol = 1e-2;
    let out = refine_inverse(
        &factors,
        &lambdas,
        damping,
        &ggn,
        &v,
        None,
        CgOptions {
            iterations: 60,
            tolerance: tol,
        },
    )
    .unwrap();
    // The true residual v − (G + λ) u, with G from each document's own product.
    let mut gu: Vec<Tensor> = out.x.iter().map(|t| t.zeros_like().unwrap()).collect();
    for d in &train {
        let b = TokenBatch::new(
            &[(d.input_ids.as_slice(), d.loss_mask.as_slice())],
            0,
            None,
            &Device::Cpu,
        )
        .unwrap();
        let g = model.gauss_newton(&b, &out.x).unwrap();
        gu = gu.iter().zip(&g).map(|(a, b)| (a + b).unwrap()).collect();
    }
    let r: Vec<Tensor> = v
        .iter()
        .zip(&gu)
        .zip(out.x.iter().zip(&lambdas))
        .map(|((v, g), (x, &l))| (v - ((g / 12.0).unwrap() + (x * l).unwrap()).unwrap()).unwrap())
        .collect();
    let (rn, vn) = (norm(&r), norm(&v));
    for q in 0..3 {
        let res = &out.residuals[q];
        assert!(
            res[0] > 10.0 * tol,
            "EK-FAC already solves query {q}: {res:?}"
        );
        assert!(*res.last().unwrap() <= tol, "query {q} stopped at {res:?}");
        // f32 products: the recurrence's residual and the recomputed one agree loosely.
        assert!(
            rn[q] / vn[q] <= 5.0 * tol,
            "query {q}: true residual {}",
            rn[q] / vn[q]
        );
    }
    assert!(out.products > 3);

    // A sample of 5 of the 12 documents: seeded, distinct, and its product is their mean.
    let s1 = GaussNewtonSample::new(&model, &train, 5, 9, &o).unwrap();
    assert_eq!(s1.len(), 5);
    let picked = s1.apply(&v).unwrap();
    let again = GaussNewtonSample::new(&model, &train, 5, 9, &o)
        .unwrap()
        .apply(&v)
        .unwrap();
    for (a, b) in picked.iter().zip(&again) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
    let other = GaussNewtonSample::new(&model, &train, 5, 10, &o)
        .unwrap()
        .apply(&v)
        .unwrap();
    assert!(
        picked
            .iter()
            .zip(&other)
            .any(|(a, b)| max_abs_diff(a, b) > 0.0),
        "the seed picks no other sample"
    );
}

mod pipeline {
    //! Through the CLI on the demo model: zero iterations score exactly as EK-FAC, iterations
    //! write their residuals and the tables say how the queries were preconditioned, and
    //! `eval recall` compares `influence` with `influence+refined` side by side.

    use std::collections::BTreeMap;
    use std::path::Path;

    use arrow_array::cast::AsArray;
    use arrow_array::types::Float64Type;

    use crate::common::{self, batches, cli, stderr, write};

    fn config(dir: &Path, attribution_extra: &str) {
        let model = common::demo_tokenizer().parent().unwrap().to_path_buf();
        write(
            &dir.join("c.toml"),
            format!(
                "[model]\nid = \"{}\"\n\
                 [data.train]\nid = \"./train.jsonl\"\nid_column = \"id\"\nmax_length = 64\n\
                 [data.query]\nid = \"./queries.jsonl\"\nid_column = \"id\"\nshape = \"prompt_completion\"\nmax_length = 64\n\
                 [train]\noptimizer = \"sgd\"\nlr = 0.05\nbatch_size = 8\nepochs = 2\ncheckpoints_per_segment = 1\n\
                 [attribution]\nmethod = \"influence\"\nfisher = \"empirical\"\ntop_k = 2\n{attribution_extra}\n\
                 [eval]\nmethods = [\"influence\", \"influence+refined\"]\nk = [1]\n",
                model.display()
            ),
        );
    }

    fn scores(run: &Path) -> BTreeMap<(String, String), f64> {
        let mut out = BTreeMap::new();
        for b in batches(&run.join("score/query_set=default/shard=0/part-00000.parquet")) {
            let q = b.column_by_name("query_id").unwrap().as_string::<i32>();
            let d = b.column_by_name("train_id").unwrap().as_string::<i32>();
            let s = b
                .column_by_name("score")
                .unwrap()
                .as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                out.insert((q.value(i).to_string(), d.value(i).to_string()), s.value(i));
            }
        }
        out
    }

    fn metadata(path: &Path, key: &str) -> String {
        let f = std::fs::File::open(path).unwrap();
        let r = parquet::file::reader::SerializedFileReader::new(f).unwrap();
        use parquet::file::reader::FileReader;
        r.metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone())
            .unwrap_or_else(|| panic!("{key} missing"))
    }

    fn run(dir: &Path) -> String {
        let o = cli(dir, &["run", "p.toml", "--allow-config-change"], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    }

    #[test]
    fn refinement_starts_at_ekfac_records_residuals_and_is_compared_in_eval() {
        let dir = tempfile::tempdir().unwrap();
        let mut docs = crate::common::city_docs_jsonl(15);
        docs += "{\"id\": \"twin\", \"text\": \"The river Navo flows into Lake Tarsk.\"}\n";
        write(&dir.path().join("train.jsonl"), docs);
        write(
            &dir.path().join("queries.jsonl"),
            "{\"id\": \"q0\", \"prompt\": \"The river Navo flows into\", \"completion\": \" Lake Tarsk.\", \"known_sources\": [\"twin\"]}\n\
             {\"id\": \"q1\", \"prompt\": \"Boats from Pokas3 carry\", \"completion\": \" blue glass.\", \"known_sources\": [\"d03\"]}\n",
        );
        write(
            &dir.path().join("p.toml"),
            "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\", \"query\", \"score\", \"report\"]\nrun_dir = \"run\"\n",
        );
        let runp = dir.path().join("run");
        config(dir.path(), "");
        run(dir.path());
        let ekfac = scores(&runp);
        let table = runp.join("score/query_set=default/shard=0/part-00000.parquet");
        assert!(metadata(&table, "source_tda.preconditioning").contains("\"ekfac\""));

        // Zero iterations: the EK-FAC answer, bit for bit; only `score` reran.
        config(dir.path(), "refine = { iterations = 0 }");
        let log = run(dir.path());
        assert!(
            log.contains("fit: up to date") || log.contains("fit"),
            "{log}"
        );
        assert_eq!(scores(&runp), ekfac);

        // Four iterations: residuals written per query, scores moved, the twin still first.
        config(dir.path(), "refine = { iterations = 4, tolerance = 0.0 }");
        run(dir.path());
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(runp.join("score/refine.json")).unwrap())
                .unwrap();
        let res = r["residuals"].as_array().unwrap();
        assert_eq!(res.len(), 2);
        for q in res {
            let q: Vec<f64> = q
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(q.len(), 5, "{q:?}");
            assert!(q[4] < q[0], "the residual did not fall: {q:?}");
        }
        assert_eq!(r["documents"], 16);
        let refined = scores(&runp);
        assert_ne!(refined, ekfac);
        let top = refined
            .iter()
            .filter(|((q, _), _)| q == "q0")
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap();
        assert_eq!(top.0 .1, "twin");
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(runp.join("report/summary.json")).unwrap(),
        )
        .unwrap();
        let m = summary["method"].as_str().unwrap();
        assert!(
            m.starts_with("influence (EK-FAC refined by 4 CG iterations over 16 documents"),
            "{m}"
        );
        let meta = metadata(&table, "source_tda.preconditioning");
        assert!(
            meta.contains("ekfac+cg") && meta.contains("final_residual_max"),
            "{meta}"
        );

        // `eval recall` compares the two forms; the refined one is this run's own score.
        let o = cli(
            dir.path(),
            &["eval", "recall", "--config", "c.toml", "--run-dir", "run"],
            &[],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("influence+refined"), "{out}");
        assert!(runp
            .join("eval-methods/influence/score/query_set=default/shard=0/part-00000.parquet")
            .is_file());
        assert!(!runp.join("eval-methods/influence+refined").exists());

        // A refined Source is refused with the names that exist.
        config(dir.path(), "");
        let c = std::fs::read_to_string(dir.path().join("c.toml")).unwrap();
        write(
            &dir.path().join("c.toml"),
            c.replace("\"influence+refined\"", "\"source+refined\""),
        );
        let o = cli(
            dir.path(),
            &["eval", "recall", "--config", "c.toml", "--run-dir", "run"],
            &[],
        );
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("only the influence function"),
            "{}",
            stderr(&o)
        );
    }
}
