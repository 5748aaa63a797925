//! Agreement with an independent implementation: kronfluence 1.0.1's EK-FAC (and KFAC and
//! identity) results for SmolLM2-135M-Instruct cut to 2 layers, on the exact token ids of
//! `tests/data/kronfluence-smollm2-2l` (its README states every convention and the tolerances
//! used here). The influence method of this crate — covariances, f64 eigenbasis,
//! Λ, damping 0.1 × mean Λ per module, pairwise, per-module and per-token scores — must
//! reproduce them, on the real GGUF weights converted by `model::gguf`.

use crate::common::real_assets;

use candle_core::{DType, Device, Tensor};
use source_tda::attribution::{
    precondition_inverse, precondition_inverse_factored, query_gradients, score_pass, Damping,
};
use source_tda::curvature::fit_factors_with_covariances;
use source_tda::data::PreparedDoc;
use source_tda::linalg::LayerFactors;
use source_tda::model::gguf::{GgufLlama, ReadOptions};
use source_tda::model::{LoadOptions, Model};
use source_tda::passes::{Fisher, PassOptions};

/// Rows of `{split}_input_ids` as documents: real tokens only, loss mask from the labels
/// (`labels[t] ≠ −100` ⇔ token t is a target).
fn docs(inputs: &safetensors::SafeTensors, split: &str) -> Vec<PreparedDoc> {
    let (shape, ids) = real_assets::i64_tensor(inputs, &format!("{split}_input_ids"));
    let (_, attn) = real_assets::i64_tensor(inputs, &format!("{split}_attention_mask"));
    let (_, labels) = real_assets::i64_tensor(inputs, &format!("{split}_labels"));
    let (rows, len) = (shape[0], shape[1]);
    (0..rows)
        .map(|r| {
            let n = (0..len).filter(|&t| attn[r * len + t] == 1).count();
            let input_ids: Vec<u32> = (0..n).map(|t| ids[r * len + t] as u32).collect();
            let loss_mask: Vec<u8> = (0..n)
                .map(|t| (t > 0 && labels[r * len + t] != -100) as u8)
                .collect();
            PreparedDoc {
                doc_id: format!("{split}-{r}"),
                text: String::new(),
                prompt: None,
                completion: None,
                input_ids,
                loss_mask,
                truncated_tokens: 0,
                source: format!("inputs.safetensors:{split}:{r}"),
            }
        })
        .collect()
}

/// max |x − ref| / max |ref|.
fn rel_to_max(got: &[f64], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .map(|(g, &w)| (g - w as f64).abs())
        .fold(0f64, f64::max)
        / scale
}

fn pearson(a: &[f64], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().sum::<f64>() / n;
    let mb = b.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut r = vec![0.0; v.len()];
    for (k, &i) in idx.iter().enumerate() {
        r[i] = k as f64;
    }
    r
}

fn spearman(a: &[f64], b: &[f32]) -> f64 {
    let rb: Vec<f32> = ranks(&b.iter().map(|&x| x as f64).collect::<Vec<_>>())
        .into_iter()
        .map(|x| x as f32)
        .collect();
    pearson(&ranks(a), &rb)
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap()
}

fn tensor_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Checks a [Q][N] score matrix against a flat [Q, N] reference.
fn check_pairwise(label: &str, got: &[Vec<f64>], want: &[f32], tol: f64) {
    let flat: Vec<f64> = got.iter().flatten().copied().collect();
    let err = rel_to_max(&flat, want);
    let r = pearson(&flat, want);
    eprintln!("{label}: max rel err {err:.2e}, Pearson {r:.7}");
    assert!(err <= tol, "{label}: max rel err {err:.3e} > {tol:e}");
    assert!(r >= 0.999, "{label}: Pearson {r}");
    let n = got[0].len();
    for (q, row) in got.iter().enumerate() {
        let wrow = &want[q * n..(q + 1) * n];
        let w64: Vec<f64> = wrow.iter().map(|&x| x as f64).collect();
        assert_eq!(
            argmax(row),
            argmax(&w64),
            "{label}: query {q} top-1 differs"
        );
        let s = spearman(row, wrow);
        assert!(s >= 0.999, "{label}: query {q} Spearman {s}");
    }
}

#[test]
fn influence_method_reproduces_kronfluence_ekfac_on_smollm2_two_layers() {
    let Some(gguf) = real_assets::gguf_path() else {
        return;
    };
    let reference = real_assets::reference_dir();
    let dir = tempfile::tempdir().unwrap();
    GgufLlama::read(&gguf, &ReadOptions { layers: Some(2) })
        .unwrap()
        .write_hf_dir(dir.path(), Some(&reference.join("tokenizer.json")))
        .unwrap();
    let model = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let names: Vec<String> = model
        .tracked_layers()
        .iter()
        .map(|l| l.name.clone())
        .collect();
    let want_names: Vec<String> = (0..2)
        .flat_map(|l| {
            [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ]
            .map(move |m| format!("model.layers.{l}.{m}"))
        })
        .collect();
    assert_eq!(
        names, want_names,
        "the 14 modules, in the reference's order"
    );

    let inputs_bytes = std::fs::read(reference.join("inputs.safetensors")).unwrap();
    let inputs = safetensors::SafeTensors::deserialize(&inputs_bytes).unwrap();
    let scores_bytes = std::fs::read(reference.join("scores.safetensors")).unwrap();
    let scores = safetensors::SafeTensors::deserialize(&scores_bytes).unwrap();
    let factors_bytes = std::fs::read(reference.join("factors.safetensors")).unwrap();
    let ref_factors = safetensors::SafeTensors::deserialize(&factors_bytes).unwrap();
    let train = docs(&inputs, "train");
    let queries = docs(&inputs, "query");
    assert_eq!(train.iter().map(|d| d.n_tokens()).sum::<usize>(), 817);

    // Batches of 8 documents, as the reference; padding id 2.
    let opts = PassOptions {
        fisher: Fisher::Empirical,
        block_size: None,
        token_budget: 8 * 48,
        max_batch_size: 8,
        pad_id: 2,
        eigen_precision: Default::default(),
        capture_dir: None,
    };

    // Forward: the summed losses.
    let qg = query_gradients(&model, &queries, &opts).unwrap();
    let q_loss: Vec<f64> = qg.measurements.iter().map(|&x| x as f64).collect();
    let err = rel_to_max(&q_loss, &real_assets::f32_tensor(&scores, "query_loss_sum"));
    assert!(err < 1e-5, "query_loss_sum: {err:e}");

    // Factors.
    let factors = fit_factors_with_covariances(&[&model], &train, &opts, "reference").unwrap();
    for (l, f) in factors.iter().enumerate() {
        let m = &f.name;
        for (ours, key, tol) in [
            (f.basis.eig_a.clone(), "activation_eigenvalues", 1e-5),
            (f.basis.eig_s.clone(), "gradient_eigenvalues", 1e-5),
        ] {
            let err = rel_to_max(
                &ours,
                &real_assets::f32_tensor(&ref_factors, &format!("{m}.{key}")),
            );
            assert!(err < tol, "{m}.{key}: {err:e}");
        }
        if m.ends_with("k_proj") || m.ends_with("v_proj") {
            let s_ref = real_assets::f32_tensor(&ref_factors, &format!("{m}.gradient_covariance"));
            let err = rel_to_max(&tensor_f64(&f.covariances.s[0]), &s_ref);
            assert!(err < 1e-5, "{m}.gradient_covariance: {err:e}");
            let lam_ref = real_assets::f32_tensor(&ref_factors, &format!("{m}.lambda_matrix"));
            let err = rel_to_max(&tensor_f64(&f.lambda), &lam_ref);
            eprintln!("{m}: lambda max rel err {err:.2e}");
            assert!(err < 1e-4, "{m}.lambda_matrix: {err:e}");
        }
        if m.ends_with("k_proj") {
            let a_ref =
                real_assets::f32_tensor(&ref_factors, &format!("{m}.activation_covariance"));
            let err = rel_to_max(&tensor_f64(&f.covariances.a[0]), &a_ref);
            assert!(err < 1e-5, "{m}.activation_covariance: {err:e}");
        }
        // Damping heuristic 0.1 × mean Λ per module, as the reference stores it.
        let want = real_assets::f64_scalar(&ref_factors, &format!("{m}.damping_heuristic_ekfac"));
        let got = Damping::MeanLambda(0.1).for_layer(&f.lambda).unwrap();
        assert!(
            (got - want).abs() <= 1e-4 * want.abs(),
            "{m} damping {got} vs {want} (layer {l})"
        );
    }

    // KFAC: Λ replaced by eigS ⊗ eigA, damping 0.1 × its mean.
    let kfac: Vec<LayerFactors> = factors
        .iter()
        .map(|f| {
            let (o, i) = (f.basis.eig_s.len(), f.basis.eig_a.len());
            let outer: Vec<f64> = f
                .basis
                .eig_s
                .iter()
                .flat_map(|s| f.basis.eig_a.iter().map(move |a| s * a))
                .collect();
            LayerFactors {
                lambda: Tensor::from_vec(outer, (o, i), &Device::Cpu).unwrap(),
                ..f.clone()
            }
        })
        .collect();
    // The query gradients' token factors multiply out to the dense gradients.
    for (l, (f, g)) in qg.factors.iter().zip(&qg.layers).enumerate() {
        crate::common::assert_factors_are_dense(f, g, &format!("layer {l}"));
    }
    // One training pass scores all four methods: their preconditioned queries are stacked
    // along the query axis (8 each): EK-FAC with the heuristic damping (preconditioned from
    // the token factors, as the score stage does), EK-FAC with 1e-3 (from the dense
    // gradients), identity, KFAC.
    let sets = [
        precondition_inverse_factored(&factors, &qg.factors, Damping::MeanLambda(0.1)).unwrap(),
        precondition_inverse(&factors, &qg.layers, Damping::Absolute(1e-3)).unwrap(),
        qg.layers.clone(),
        precondition_inverse(&kfac, &qg.layers, Damping::MeanLambda(0.1)).unwrap(),
    ];
    let u: Vec<Tensor> = (0..names.len())
        .map(|l| Tensor::cat(&sets.iter().map(|s| &s[l]).collect::<Vec<_>>(), 0).unwrap())
        .collect();
    let s = score_pass(&model, &train, &u, &opts, true).unwrap();
    let part = |k: usize| -> Vec<Vec<f64>> { s.docs[k * 8..(k + 1) * 8].to_vec() };
    check_pairwise(
        "ekfac_pairwise",
        &part(0),
        &real_assets::f32_tensor(&scores, "ekfac_pairwise"),
        1e-3,
    );
    check_pairwise(
        "ekfac_pairwise_damping_1e-3",
        &part(1),
        &real_assets::f32_tensor(&scores, "ekfac_pairwise_damping_1e-3"),
        1e-3,
    );
    check_pairwise(
        "identity_pairwise",
        &part(2),
        &real_assets::f32_tensor(&scores, "identity_pairwise"),
        1e-5,
    );
    check_pairwise(
        "kfac_pairwise",
        &part(3),
        &real_assets::f32_tensor(&scores, "kfac_pairwise"),
        1e-3,
    );

    // A pass without per-token scores contracts per document (G_m formed per batch): the
    // same pairwise scores.
    let pairwise_only = score_pass(&model, &train, &u, &opts, false).unwrap();
    assert!(pairwise_only.tokens.is_none());
    check_pairwise(
        "ekfac_pairwise (pairwise-only pass)",
        &pairwise_only.docs[..8],
        &real_assets::f32_tensor(&scores, "ekfac_pairwise"),
        1e-3,
    );

    let per_module = real_assets::f32_tensor(&scores, "ekfac_pairwise_per_module");
    let block = 8 * 32;
    for (k, layer) in s.per_layer.iter().enumerate() {
        let flat: Vec<f64> = layer[..8].iter().flatten().copied().collect();
        let err = rel_to_max(&flat, &per_module[k * block..(k + 1) * block]);
        assert!(err < 2e-3, "per-module {k} ({}): {err:e}", names[k]);
    }
    let per_token = real_assets::f32_tensor(&scores, "ekfac_per_token"); // [8, 32, 48]
    let tokens = s.tokens.as_ref().unwrap();
    let mut flat = vec![0f64; 8 * 32 * 48];
    for (m, per_q) in tokens.iter().enumerate() {
        for (q, row) in per_q[..8].iter().enumerate() {
            for (t, &v) in row.iter().enumerate() {
                flat[(q * 32 + m) * 48 + t] = v as f64;
            }
        }
    }
    let err = rel_to_max(&flat, &per_token);
    eprintln!("ekfac_per_token: max rel err {err:.2e}");
    assert!(err < 1e-3, "ekfac_per_token: {err:e}");
}
