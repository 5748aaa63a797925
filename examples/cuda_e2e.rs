//! End-to-end GPU benchmark of the wired-in path (scripts/gpu/gpu-check.sh runs it): fit + score
//! through `backend::CudaBackend` on random-weight Llama-family models of real shapes
//! (SmolLM2-135M at full depth, and a Llama-3.2-1B shape with 2048-wide factor blocks), the
//! model's forward/backward included. Reports tokens/s of fit (covariance pass, f64
//! eigendecompositions, eigenvalue-correction pass) and of score (the scoring pass for the
//! preconditioned queries, dense), and for the SmolLM2 shape the error of the TF32 and bf16
//! options against f32 on the document scores.
//!
//! In a `--features cuda` build the model runs on candle's CUDA device; in a
//! `cuda-kernels` build it runs on the CPU (the kernels still on the GPU), which the output
//! says: those tokens/s are not the GPU pipeline's.
//!
//!   dist/cuda/cuda_e2e          # SOURCE_TDA_E2E_TOKENS (default 16384), _QUERIES (4),
//!                               # _MODELS (smollm2,llama1b)

#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
fn main() -> anyhow::Result<()> {
    e2e::run()
}

#[cfg(not(any(feature = "cuda", feature = "cuda-kernels")))]
fn main() {
    eprintln!("cuda_e2e needs --features cuda (or cuda-kernels)");
    std::process::exit(2);
}

#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
mod e2e {
    use std::collections::HashMap;
    use std::time::Instant;

    use candle_core::{Device, Tensor};
    use serde_json::json;
    use source_tda::attribution::OnBackend;
    use source_tda::attribution::{
        query_gradients, score_pass_on, Curvature, Damping, TrainScores,
    };
    use source_tda::backend::{Backend, CudaBackend};
    use source_tda::config::PrecisionKind;
    use source_tda::curvature::fit_factors_on;
    use source_tda::data::PreparedDoc;
    use source_tda::linalg::LayerQuery;
    use source_tda::model::{LoadOptions, Model, ModelSpec, TensorMap};
    use source_tda::passes::{Fisher, PassOptions};

    struct Shape {
        name: &'static str,
        layers: usize,
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        inter: usize,
        vocab: usize,
        tied: bool,
        block: Option<usize>,
    }

    fn env(name: &str, default: usize) -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Random weights of `s`, named as in Hugging Face checkpoints, drawn on `device`.
    fn weights(s: &Shape, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
        let (d, hd) = (s.hidden, s.hidden / s.heads);
        let mut m = HashMap::new();
        let mut put = |name: String, shape: &[usize], mean: f64, std: f64| -> anyhow::Result<()> {
            let t = ((Tensor::randn(0f32, 1.0, shape, device)? * std)? + mean)?;
            m.insert(name, t);
            Ok(())
        };
        put("model.embed_tokens.weight".into(), &[s.vocab, d], 0.0, 0.5)?;
        for i in 0..s.layers {
            let p = format!("model.layers.{i}");
            put(format!("{p}.input_layernorm.weight"), &[d], 1.0, 0.1)?;
            put(
                format!("{p}.post_attention_layernorm.weight"),
                &[d],
                1.0,
                0.1,
            )?;
            for (n, din, dout) in [
                ("self_attn.q_proj", d, s.heads * hd),
                ("self_attn.k_proj", d, s.kv_heads * hd),
                ("self_attn.v_proj", d, s.kv_heads * hd),
                ("self_attn.o_proj", s.heads * hd, d),
                ("mlp.gate_proj", d, s.inter),
                ("mlp.up_proj", d, s.inter),
                ("mlp.down_proj", s.inter, d),
            ] {
                let std = 1.0 / (din as f64).sqrt();
                put(format!("{p}.{n}.weight"), &[dout, din], 0.0, std)?;
            }
        }
        put("model.norm.weight".into(), &[d], 1.0, 0.1)?;
        if !s.tied {
            put("lm_head.weight".into(), &[s.vocab, d], 0.0, 0.05)?;
        }
        Ok(m)
    }

    /// The model of `s` with weights `w`, on `device`.
    fn model(s: &Shape, w: &HashMap<String, Tensor>, device: &Device) -> anyhow::Result<Model> {
        let spec = ModelSpec::from_json(&json!({
            "model_type": "llama", "hidden_size": s.hidden, "intermediate_size": s.inter,
            "vocab_size": s.vocab, "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": s.tied,
            "max_position_embeddings": 8192,
        }))?;
        let w = w
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_device(device)?)))
            .collect::<anyhow::Result<HashMap<_, _>>>()?;
        Ok(Model::from_source(
            &spec,
            &TensorMap(w),
            &LoadOptions::default(),
            device,
        )?)
    }

    /// The wired-in GPU path against the CPU path on a small model: the same weights on both
    /// devices, fit + inverse + score, document and token scores compared (f32, tolerance
    /// 2e-3 as in tests/it/cuda_parity.rs). In a `--features cuda` build this is the parity
    /// check of the model on candle's CUDA device.
    fn parity(n_queries: usize) -> anyhow::Result<()> {
        let s = Shape {
            name: "parity",
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            inter: 96,
            vocab: 256,
            tied: false,
            block: None,
        };
        let gpu = CudaBackend::open(0, PrecisionKind::F32)?;
        let cpu = source_tda::backend::CpuBackend::new();
        let w = weights(&s, &Device::Cpu)?;
        let train = docs(12, 40, s.vocab, 3, None);
        let queries = docs(n_queries, 24, s.vocab, 5, Some(12));
        let o = PassOptions {
            fisher: Fisher::Empirical,
            block_size: None,
            token_budget: 160,
            max_batch_size: 4,
            pad_id: 0,
            eigen_precision: Default::default(),
            capture_dir: None,
        };
        let mut out = Vec::new();
        for b in [&cpu as &dyn Backend, &gpu as &dyn Backend] {
            let m = model(&s, &w, b.device())?;
            let qg = query_gradients(&m, &queries, &o)?;
            let f = fit_factors_on(b, &[&m], &train, &o, "parity")?;
            let on = OnBackend {
                factors: &f,
                backend: b,
            };
            let u = on.inverse(&qg.layers, Damping::MeanLambda(0.1))?;
            let forms: Vec<LayerQuery> = u.into_iter().map(LayerQuery::Dense).collect();
            let sc = score_pass_on(b, &m, &train, &forms, &o, true)?;
            let toks: Vec<f64> = sc
                .tokens
                .as_ref()
                .map(|t| t.iter().flatten().flatten().map(|&v| v as f64).collect())
                .unwrap_or_default();
            out.push((doc_scores(&sc), toks));
        }
        let (ed, et) = (rel(&out[1].0, &out[0].0), rel(&out[1].1, &out[0].1));
        println!(
            "parity (model on {:?}): GPU vs CPU path, documents {ed:.2e}, tokens {et:.2e} \
             (tolerance 2e-3)",
            gpu.device().location()
        );
        anyhow::ensure!(
            ed <= 2e-3 && et <= 2e-3,
            "GPU path differs from the CPU path"
        );
        Ok(())
    }

    fn docs(
        n: usize,
        len: usize,
        vocab: usize,
        seed: u64,
        prompt: Option<usize>,
    ) -> Vec<PreparedDoc> {
        let mut s = seed | 1;
        (0..n)
            .map(|k| {
                let ids: Vec<u32> = (0..len)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        (s % vocab as u64) as u32
                    })
                    .collect();
                PreparedDoc {
                    doc_id: format!("d{k}"),
                    text: String::new(),
                    prompt: None,
                    completion: None,
                    loss_mask: (0..len).map(|t| (t >= prompt.unwrap_or(1)) as u8).collect(),
                    input_ids: ids,
                    truncated_tokens: 0,
                    source: "bench".into(),
                }
            })
            .collect()
    }

    fn doc_scores(s: &TrainScores) -> Vec<f64> {
        s.docs.iter().flatten().copied().collect()
    }

    fn rel(got: &[f64], want: &[f64]) -> f64 {
        let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-300);
        got.iter()
            .zip(want)
            .fold(0f64, |m, (g, w)| m.max((g - w).abs()))
            / scale
    }

    pub fn run() -> anyhow::Result<()> {
        let tokens = env("SOURCE_TDA_E2E_TOKENS", 16384);
        let n_queries = env("SOURCE_TDA_E2E_QUERIES", 4);
        let wanted =
            std::env::var("SOURCE_TDA_E2E_MODELS").unwrap_or_else(|_| "smollm2,llama1b".into());
        let shapes = [
            Shape {
                name: "smollm2",
                layers: 30,
                hidden: 576,
                heads: 9,
                kv_heads: 3,
                inter: 1536,
                vocab: 49152,
                tied: true,
                block: None,
            },
            Shape {
                name: "llama1b",
                layers: 16,
                hidden: 2048,
                heads: 32,
                kv_heads: 8,
                inter: 8192,
                vocab: 128256,
                tied: true,
                block: Some(2048),
            },
        ];
        let seq = 512usize;
        parity(n_queries)?;
        for s in shapes
            .iter()
            .filter(|s| wanted.split(',').any(|w| w == s.name))
        {
            let base = CudaBackend::open(0, PrecisionKind::F32)?;
            let on_gpu = !base.device().is_cpu();
            println!(
                "\n== {} shape: {} layers, hidden {}, inter {}, vocab {}, blocks {:?}; model on {}",
                s.name,
                s.layers,
                s.hidden,
                s.inter,
                s.vocab,
                s.block,
                if on_gpu {
                    "the GPU (candle CUDA)"
                } else {
                    "the CPU (cuda-kernels build: tokens/s are not the GPU pipeline's)"
                }
            );
            let t0 = Instant::now();
            let m = model(s, &weights(s, base.device())?, base.device())?;
            println!("random weights: {:.1} s", t0.elapsed().as_secs_f64());
            let train = docs(tokens / seq, seq, s.vocab, 7, None);
            let queries = docs(n_queries, 64, s.vocab, 9, Some(32));
            let n_tok = (tokens / seq) * seq;
            let o = PassOptions {
                fisher: Fisher::Empirical,
                block_size: s.block,
                token_budget: 4096,
                max_batch_size: 8,
                pad_id: 0,
                eigen_precision: Default::default(),
                capture_dir: None,
            };
            let qg = query_gradients(&m, &queries, &o)?;
            let mut reference: Option<Vec<f64>> = None;
            let precisions: &[PrecisionKind] = if s.name == "smollm2" {
                &[PrecisionKind::F32, PrecisionKind::Tf32, PrecisionKind::Bf16]
            } else {
                &[PrecisionKind::F32]
            };
            for &p in precisions {
                let b = CudaBackend::open(0, p)?;
                let t = Instant::now();
                let f = fit_factors_on(&b, &[&m], &train, &o, s.name)?;
                let fit_s = t.elapsed().as_secs_f64();
                let on = OnBackend {
                    factors: &f,
                    backend: &b,
                };
                let t = Instant::now();
                let u = on.inverse(&qg.layers, Damping::MeanLambda(0.1))?;
                let pre_s = t.elapsed().as_secs_f64();
                let forms: Vec<LayerQuery> = u.into_iter().map(LayerQuery::Dense).collect();
                let t = Instant::now();
                let sc = score_pass_on(&b, &m, &train, &forms, &o, true)?;
                let score_s = t.elapsed().as_secs_f64();
                let d = doc_scores(&sc);
                let err = match &reference {
                    None => {
                        reference = Some(d);
                        String::new()
                    }
                    Some(r) => format!(", document scores vs f32: {:.2e}", rel(&d, r)),
                };
                println!(
                    "{} {:?}: fit {:.1} s = {:.0} tokens/s (2 passes + eigh); precondition {} \
                     queries {:.2} s; score {:.1} s = {:.0} tokens/s{err}",
                    s.name,
                    p,
                    fit_s,
                    n_tok as f64 / fit_s,
                    n_queries,
                    pre_s,
                    score_s,
                    n_tok as f64 / score_s
                );
            }
            drop(m);
        }
        Ok(())
    }
}
