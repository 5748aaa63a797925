//! Source, exact to first order for the run that happened: the linear regression of
//! `source_exact` trained by full-batch gradient descent with what real runs do — gradient
//! clipping active at every step, heavy-ball momentum, AdamW's bias-corrected first moment
//! (with a fixed preconditioner, the linear model the Adam form assumes), decoupled weight
//! decay, a loss normalised per token — one document up-weighted by ε and the whole run
//! re-trained by brute force, against the pipeline's own plan (per-step weights, step groups,
//! gradient points) and walk with the exact Hessian. Each run is also scored the way Source
//! scored it before (segment-average weights, scale-only clipping, gradients at the
//! segment's checkpoints θ_1 … θ_T, per-document units), which these runs contradict. The
//! clip directions ĝ_k reach the walk the way the score stage reads them: written into the
//! checkpoint folders as the finetune stage saves them, read back by
//! `attribution::step_groups`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use source_tda::attribution::plan::{plan_segments, AttributionPlan, PlanSource};
use source_tda::attribution::{
    source_walk, step_groups, AdamCurvature, Curvature, Damping, DenseCurvature, SegmentCurvature,
};
use source_tda::config::{LossNormalization, MethodKind};
use source_tda::train::checkpoint::{write_safetensors, CLIP_DIRECTION};
use source_tda::train::{CheckpointRef, LrMass, OptimizerInfo, Segment, Trajectory};

use super::source_exact::{dot, f_query, grad_doc, problem, rel_err, to_tensor, Problem, N, P};

#[derive(Clone, Copy)]
enum Opt {
    Sgd,
    Momentum(f64),
    /// θ ← θ − η P m̂ with m̂ Adam's bias-corrected first moment (β₁) and P fixed:
    /// P_i = p (1 + spread (2i/(P−1) − 1)), even for spread = 0.
    AdamFixedP {
        beta1: f64,
        p: f64,
        spread: f64,
    },
}

/// Adam's fixed P_i.
fn p_i(p: f64, spread: f64, i: usize) -> f64 {
    p * (1.0 + spread * (2.0 * i as f64 / (P - 1) as f64 - 1.0))
}

#[derive(Clone)]
struct Run {
    opt: Opt,
    lrs: Vec<f64>,
    weight_decay: f64,
    max_norm: Option<f64>,
    /// Loss tokens per document (mean_per_token) or None (sum_per_document, one each).
    tokens: Option<Vec<f64>>,
    /// A checkpoint every this many steps.
    every: usize,
}

fn tok(run: &Run, m: usize) -> f64 {
    run.tokens.as_ref().map_or(1.0, |t| t[m])
}

/// L_m = t_m (x_mᵀθ − y_m)² / 2 (t_m loss tokens alike), so ∇L_m = t_m ∇(one token).
fn grad_l(p: &Problem, run: &Run, m: usize, th: &[f64; P]) -> [f64; P] {
    let g = grad_doc(p, m, th);
    std::array::from_fn(|i| tok(run, m) * g[i])
}

/// Trains with document `target`'s loss weighted 1 + ε; returns θ_0 … θ_T and, per step,
/// the clip factor c_k and the unit batch gradient ĝ_k (before clipping).
#[allow(clippy::type_complexity)]
fn train(
    p: &Problem,
    run: &Run,
    target: usize,
    eps: f64,
) -> (Vec<[f64; P]>, Vec<f64>, Vec<[f64; P]>) {
    let denom = match run.tokens {
        Some(ref t) => t.iter().sum::<f64>(),
        None => N as f64,
    };
    let (mut th, mut buf) = (p.theta0, [0f64; P]);
    let (mut out, mut cs, mut dirs) = (vec![th], Vec::new(), Vec::new());
    for (k, &lr) in run.lrs.iter().enumerate() {
        let mut g = [0f64; P];
        for m in 0..N {
            let w = if m == target { 1.0 + eps } else { 1.0 };
            let gm = grad_l(p, run, m, &th);
            for i in 0..P {
                g[i] += w * gm[i] / denom;
            }
        }
        let norm = dot(&g, &g).sqrt();
        let c = run.max_norm.map_or(1.0, |mx| (mx / (norm + 1e-6)).min(1.0));
        cs.push(c);
        dirs.push(std::array::from_fn(|i| g[i] / norm));
        for i in 0..P {
            th[i] *= 1.0 - lr * run.weight_decay;
            let gi = c * g[i];
            th[i] -= lr
                * match run.opt {
                    Opt::Sgd => gi,
                    Opt::Momentum(beta) => {
                        buf[i] = beta * buf[i] + gi;
                        buf[i]
                    }
                    Opt::AdamFixedP { beta1, p, spread } => {
                        buf[i] = beta1 * buf[i] + (1.0 - beta1) * gi;
                        p_i(p, spread, i) * buf[i] / (1.0 - beta1.powi(k as i32 + 1))
                    }
                };
        }
        out.push(th);
    }
    (out, cs, dirs)
}

/// τ(q, m) = −df/dε by central differences of the whole run.
fn brute_force(p: &Problem, run: &Run) -> Vec<f64> {
    let h = 1e-5;
    (0..N)
        .map(|m| {
            let up = *train(p, run, m, h).0.last().unwrap();
            let down = *train(p, run, m, -h).0.last().unwrap();
            -(f_query(p, &up) - f_query(p, &down)) / (2.0 * h)
        })
        .collect()
}

/// The recorded trajectory of the unperturbed run (one fine-tuning segment, a checkpoint
/// every `run.every` steps and at the end, folders `root/STEP`) and its Source plan.
fn plan(run: &Run, clip: &[f64], root: &Path) -> (Trajectory, AttributionPlan) {
    let t = run.lrs.len() as u64;
    let mut steps: Vec<u64> = (1..=t).filter(|k| k % run.every as u64 == 0).collect();
    if steps.last() != Some(&t) {
        steps.push(t);
    }
    let traj = Trajectory {
        version: source_tda::train::TRAJECTORY_VERSION,
        base_model: "quadratic".into(),
        base_commit: None,
        loss_normalization: match run.tokens {
            Some(_) => LossNormalization::MeanPerToken,
            None => LossNormalization::SumPerDocument,
        },
        segments: vec![Segment {
            stage: "finetune".into(),
            step_start: 0,
            step_end: t,
            lr_mass: LrMass::Finite(run.lrs.iter().sum()),
            clip_factors: if run.max_norm.is_some() {
                clip.to_vec()
            } else {
                Vec::new()
            },
            learning_rates: run.lrs.clone(),
            optimizer: match run.opt {
                Opt::Sgd => OptimizerInfo::Sgd {
                    weight_decay: run.weight_decay,
                },
                Opt::Momentum(beta) => OptimizerInfo::Momentum {
                    beta,
                    weight_decay: run.weight_decay,
                },
                Opt::AdamFixedP { beta1, .. } => OptimizerInfo::AdamW {
                    beta1,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: run.weight_decay,
                },
            },
            dataset: "train".into(),
            n_docs: N as u64,
            checkpoints: steps
                .iter()
                .map(|&s| CheckpointRef {
                    step: s,
                    path: s.to_string(),
                    optimizer_state: None,
                })
                .collect(),
            visit_order: None,
        }],
    };
    let t_bar = (0..N).map(|m| tok(run, m)).sum::<f64>() / N as f64;
    let plan = plan_segments(
        MethodKind::Source,
        &PlanSource {
            trajectory: &traj,
            resolve: &|s| root.join(s),
            prepared: &|_| true,
            n_train: &|| Ok(N as u64),
            base: &|| Ok(root.join("0")),
            tokens_per_doc: &|_| Ok(t_bar),
        },
    )
    .unwrap();
    (traj, plan)
}

/// The step a plan folder `root/STEP` holds the model after.
fn step_of(folder: &Path) -> usize {
    folder
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Scores of `plan` on the run: the walk with the exact Hessian H̄ = (1/N) Σ ∇²L_m (seen
/// through P for the Adam form), clip directions ĝ_k on one-step groups when `project`
/// (saved in the checkpoint after each clipped step, as the finetune stage does, and read
/// back with the score stage's `step_groups`), and the scoring passes at the plan's
/// gradient points.
fn scores(p: &Problem, run: &Run, plan: &AttributionPlan, project: bool) -> Vec<f64> {
    let (traj, clip, dirs) = train(p, run, usize::MAX, 0.0);
    let mut h = vec![0f64; P * P];
    for (m, x) in p.x.iter().enumerate() {
        for i in 0..P {
            for j in 0..P {
                h[i * P + j] += tok(run, m) * x[i] * x[j] / N as f64;
            }
        }
    }
    let dense = DenseCurvature::new(&Tensor::from_vec(h, (P, P), &Device::Cpu).unwrap()).unwrap();
    let adam = match run.opt {
        Opt::AdamFixedP { p: pv, spread, .. } => Some(AdamCurvature {
            inner: &dense,
            p_bar: vec![Tensor::from_vec(
                (0..P).map(|i| p_i(pv, spread, i)).collect::<Vec<_>>(),
                (1, P),
                &Device::Cpu,
            )
            .unwrap()],
        }),
        _ => None,
    };
    let factors: &dyn Curvature = match &adam {
        Some(a) => a,
        None => &dense,
    };
    let seg = &plan.segments[0];
    for g in &seg.groups {
        let k0 = step_of(&g.from);
        let to = g.to.as_ref().unwrap();
        std::fs::create_dir_all(to).unwrap();
        let file = to.join(CLIP_DIRECTION);
        let _ = std::fs::remove_file(&file);
        if g.steps == 1 && clip[k0] < 1.0 {
            let dir = Tensor::from_vec(dirs[k0].to_vec(), (1, P), &Device::Cpu).unwrap();
            write_safetensors(&file, &[("l.weight".into(), dir)], HashMap::new()).unwrap();
        }
    }
    let (groups, projected) = step_groups(seg, project, &["l".into()], &[(1, P)]).unwrap();
    let one_step_clipped = seg
        .groups
        .iter()
        .filter(|g| g.steps == 1 && clip[step_of(&g.from)] < 1.0)
        .count();
    assert_eq!(projected, if project { one_step_clipped } else { 0 });
    let segs = [SegmentCurvature {
        factors,
        mass: seg.mass,
        groups,
    }];
    let th_final = traj[run.lrs.len()];
    let r = dot(&p.xq, &th_final) - p.yq;
    let v: [f64; P] = std::array::from_fn(|i| r * p.xq[i]);
    let u = source_walk(&[to_tensor(&v)], &segs, Damping::Absolute(0.0)).unwrap();
    let mut tau = vec![0f64; N];
    for pt in plan.score_points() {
        let k = step_of(&pt.model);
        let mut ut = [0f64; P];
        for (j, c) in pt.terms {
            let uj: Vec<f64> = u[0][j][0].flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..P {
                ut[i] += c * uj[i];
            }
        }
        for (m, t) in tau.iter_mut().enumerate() {
            *t += dot(&ut, &grad_l(p, run, m, &traj[k])) / N as f64;
        }
    }
    tau
}

/// (error of Source as planned now, error of the form it had before), both relative to the
/// brute-force truth's largest |τ|.
fn errors(run: &Run) -> (f64, f64) {
    let p = problem();
    let truth = brute_force(&p, run);
    let (_, clip, _) = train(&p, run, usize::MAX, 0.0);
    let root = tempfile::tempdir().unwrap();
    let (traj, plan_now) = plan(run, &clip, root.path());
    let now = scores(&p, run, &plan_now, true);
    // Before: one group per segment weighted by its effective mass, gradients averaged
    // over its checkpoints, clipping as a scale, per-document units.
    let mut before = plan_now.clone();
    before.segments[0].groups.clear();
    before.segments[0].mass = traj.segments[0].effective_mass();
    let old = scores(&p, run, &before, false);
    (rel_err(&now, &truth), rel_err(&old, &truth))
}

fn sgd(lrs: Vec<f64>) -> Run {
    Run {
        opt: Opt::Sgd,
        lrs,
        weight_decay: 0.0,
        max_norm: None,
        tokens: None,
        every: 1,
    }
}

/// For a run whose every step is clipped (asserted): the relative errors of (now, the earlier
/// segment-average form, now with the clip as a scale only — the projection left out).
fn clipped_errors(run: &Run) -> (f64, f64, f64) {
    let p = problem();
    let (_, clip, _) = train(&p, run, usize::MAX, 0.0);
    assert!(
        clip.iter().all(|c| *c < 0.5),
        "clipping is active: {clip:?}"
    );
    let (now, old) = errors(run);
    let truth = brute_force(&p, run);
    let root = tempfile::tempdir().unwrap();
    let (_, plan_now) = plan(run, &clip, root.path());
    let scale_only = rel_err(&scores(&p, run, &plan_now, false), &truth);
    (now, old, scale_only)
}

#[test]
fn clipped_steps_match_brute_force_with_the_clip_derivative() {
    // ‖g‖ ≈ 0.3–1 on this problem: max_norm 0.05 clips every step (c ≈ 0.05–0.2).
    let run = Run {
        max_norm: Some(0.05),
        ..sgd(vec![0.2; 100])
    };
    let (now, old, scale_only) = clipped_errors(&run);
    // Measured: now 7.0e-3 (1.5e-2 with the projection before the injection), scale-only
    // 0.50, before 0.88.
    eprintln!("clipped SGD: now {now:.2e}, scale-only {scale_only:.2e}, before {old:.2e}");
    assert!(now < 2e-2, "{now}");
    assert!(
        scale_only > 5.0 * now && old > 5.0 * now,
        "{scale_only} {old}"
    );
}

/// Momentum's finite-horizon weights and decay are exact; its buffer's transient under
/// curvature is not (μ_k, the weight of a gradient change H δθ, is exact to first order in
/// H only). Measured (relative error now / before), β = 0.9, λ = 0.5, T = 16: η = 0.002:
/// 3.3e-2 / 0.68, with clipping 3.1e-4 / 4.6; η = 0.01: 0.15 / 0.20, with clipping
/// 8.0e-3 / 4.4. Asserted at η = 0.002, printed at η = 0.01.
#[test]
fn momentum_and_weight_decay_use_exact_finite_horizon_weights() {
    for (lr, clip, tol) in [
        (0.002, None, 5e-2),
        (0.002, Some(0.02), 5e-2),
        (0.01, None, 1.0),
        (0.01, Some(0.1), 1.0),
    ] {
        let run = Run {
            opt: Opt::Momentum(0.9),
            weight_decay: 0.5,
            max_norm: clip,
            ..sgd(vec![lr; 16])
        };
        let (now, old) = errors(&run);
        eprintln!("momentum 0.9 + decay, T = 16, η = {lr}, max_norm {clip:?}: now {now:.2e}, before {old:.2e}");
        assert!(now < tol && now < old, "{now} {old}");
        if tol < 1.0 {
            assert!(old > 5.0 * now, "{old}");
        }
    }
}

/// Adam's bias-corrected m̂ weights (≈ 2.8 η for the first of 16 steps, 0.12 η for the
/// last) and AdamW's decay, with a fixed P (the Adam form's linear model). Measured (now /
/// before), λ = 1, P = 1.7: η = 0.004: 1.7e-2 / 2.3e-2; η = 0.02: 7.7e-2 / 0.11; η = 0.05:
/// 0.15 / 0.31 (the residual is m̂'s transient under curvature, as with momentum).
#[test]
fn adam_first_moment_weights_and_decoupled_decay_match_brute_force() {
    for (lr, tol) in [(0.004, 2.5e-2), (0.02, 1.0), (0.05, 1.0)] {
        let run = Run {
            opt: Opt::AdamFixedP {
                beta1: 0.9,
                p: 1.7,
                spread: 0.0,
            },
            weight_decay: 1.0,
            ..sgd(vec![lr; 16])
        };
        let (now, old) = errors(&run);
        eprintln!("Adam m̂ (fixed P) + decay, T = 16, η = {lr}: now {now:.2e}, before {old:.2e}");
        assert!(now < tol && now < old, "{now} {old}");
    }
}

/// Clipping under Adam with an uneven P: the clip acts on the gradient before P, so a clipped
/// step injects u = Π P v, not P Π v (which differs at first order when P is not a multiple
/// of I); the walk projects after the injection. Measured: 5.0e-4, scale-only 0.75, and 1.45
/// with the projection before the injection (P Π v).
#[test]
fn clipped_adam_steps_project_after_the_preconditioner() {
    let run = Run {
        opt: Opt::AdamFixedP {
            beta1: 0.9,
            p: 1.7,
            spread: 0.8,
        },
        max_norm: Some(0.05),
        ..sgd(vec![0.004; 16])
    };
    let (now, old, scale_only) = clipped_errors(&run);
    eprintln!(
        "clipped Adam, uneven P: now {now:.2e}, scale-only {scale_only:.2e}, before {old:.2e}"
    );
    assert!(now < 5e-2, "{now}");
    assert!(
        scale_only > 5.0 * now && old > 5.0 * now,
        "{scale_only} {old}"
    );
}

#[test]
fn mean_per_token_loss_is_scored_in_the_units_it_was_trained_in() {
    let tokens: Vec<f64> = (0..N).map(|m| (1 + m % 7) as f64 * 3.0).collect();
    let run = Run {
        tokens: Some(tokens),
        ..sgd(vec![0.2; 40])
    };
    let (now, old) = errors(&run);
    // Measured: now 6.5e-3, before 4.2 (s σ and the weights off by T̄ ≈ 12).
    eprintln!("mean_per_token: now {now:.2e}, before {old:.2e}");
    assert!(now < 2e-2, "{now}");
    assert!(old > 5.0 * now, "{old}");
}

/// Gradients at the right θ: with a checkpoint at every step the step-k term is scored at
/// θ_{k−1} (exact); with sparser checkpoints a group is scored at its end. Measured on a
/// decaying schedule with η σ up to ≈ 0.4 per step (relative error now / before):
/// checkpoints every step 6.7e-3 / 0.15, every 4 steps 7.4e-2 / 0.15, every 20 steps
/// 0.13 / 0.14 (the linear interpolation between a group's ends, tried first: 3.7e-2 and
/// 0.47; docs/design.md §2).
#[test]
fn per_step_checkpoints_score_each_step_at_the_model_it_took_its_gradient_at() {
    let lrs: Vec<f64> = (0..40).map(|k| 0.6 * (1.0 - k as f64 / 50.0)).collect();
    let errs: Vec<(f64, f64)> = [1, 4, 20]
        .iter()
        .map(|&every| {
            errors(&Run {
                every,
                ..sgd(lrs.clone())
            })
        })
        .collect();
    eprintln!("SGD, checkpoints every 1 / 4 / 20 steps (now, before): {errs:?}");
    assert!(errs[0].0 < 1e-2, "{errs:?}");
    assert!(errs[0].1 > 5.0 * errs[0].0, "{errs:?}");
    assert!(errs[0].0 < errs[1].0 && errs[1].0 < errs[2].0, "{errs:?}");
}
