//! Exactness of the Source formula on a quadratic: linear regression trained by full-batch
//! gradient descent (and heavy-ball momentum), one document up-weighted by ε and the whole
//! training re-run by brute force, against the Source walk with the exact Hessian (dense
//! path). The only approximations left are (1 − ησ)^K ≈ exp(−Kησ) and the segment-averaged
//! document gradient; both vanish as segments shorten (docs/design.md §2).

use candle_core::{Device, Tensor};
use source_tda::attribution::{source_walk, Curvature, Damping, DenseCurvature, SegmentCurvature};
use source_tda::linalg::SpectralFn;
use source_tda::train::LrMass;

pub const P: usize = 6;
pub const N: usize = 12;

pub struct Problem {
    pub x: Vec<[f64; P]>,
    pub y: Vec<f64>,
    pub xq: [f64; P],
    pub yq: f64,
    pub theta0: [f64; P],
}

pub fn lcg(state: &mut u64) -> f64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

pub fn problem() -> Problem {
    let mut s = 42u64;
    let vec = |s: &mut u64| -> [f64; P] { std::array::from_fn(|_| lcg(s)) };
    let x: Vec<[f64; P]> = (0..N).map(|_| vec(&mut s)).collect();
    let y = (0..N).map(|_| lcg(&mut s)).collect();
    let xq = vec(&mut s);
    let yq = lcg(&mut s);
    let theta0 = vec(&mut s);
    Problem {
        x,
        y,
        xq,
        yq,
        theta0,
    }
}

pub fn dot(a: &[f64; P], b: &[f64; P]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// ∇L_m(θ) = (x_mᵀθ − y_m) x_m.
pub fn grad_doc(p: &Problem, m: usize, th: &[f64; P]) -> [f64; P] {
    let r = dot(&p.x[m], th) - p.y[m];
    std::array::from_fn(|i| r * p.x[m][i])
}

/// Trains J_ε = (1/N) Σ L + (ε/N) L_target for the given learning rates; returns every θ_k
/// (k = 0..=K).
fn train(p: &Problem, lrs: &[f64], beta: f64, target: usize, eps: f64) -> Vec<[f64; P]> {
    let mut th = p.theta0;
    let mut buf = [0f64; P];
    let mut out = vec![th];
    for &lr in lrs {
        let mut g = [0f64; P];
        for m in 0..N {
            let w = if m == target { 1.0 + eps } else { 1.0 };
            let gm = grad_doc(p, m, &th);
            for i in 0..P {
                g[i] += w * gm[i] / N as f64;
            }
        }
        for i in 0..P {
            buf[i] = beta * buf[i] + g[i];
            th[i] -= lr * buf[i];
        }
        out.push(th);
    }
    out
}

pub fn f_query(p: &Problem, th: &[f64; P]) -> f64 {
    0.5 * (dot(&p.xq, th) - p.yq).powi(2)
}

pub fn to_tensor(v: &[f64; P]) -> Tensor {
    Tensor::from_vec(v.to_vec(), (1, 1, P), &Device::Cpu).unwrap()
}

/// τ(q, m) ≈ f(without m) − f(with m) = −df/dε at ε = 0, by central differences.
fn brute_force(p: &Problem, lrs: &[f64], beta: f64) -> Vec<f64> {
    let h = 1e-5;
    (0..N)
        .map(|m| {
            let up = *train(p, lrs, beta, m, h).last().unwrap();
            let down = *train(p, lrs, beta, m, -h).last().unwrap();
            -(f_query(p, &up) - f_query(p, &down)) / (2.0 * h)
        })
        .collect()
}

/// H = (1/N) Σ x xᵀ, row-major.
fn hessian(p: &Problem) -> Vec<f64> {
    let mut h = vec![0f64; P * P];
    for x in &p.x {
        for i in 0..P {
            for j in 0..P {
                h[i * P + j] += x[i] * x[j] / N as f64;
            }
        }
    }
    h
}

/// τ(q, m) = Σ_ℓ (1/N) ⟨u_ℓ, ḡ_ℓ(m)⟩ with ḡ_ℓ the document gradient averaged over the points
/// where segment ℓ's `per` steps evaluated it.
fn taus(p: &Problem, traj: &[[f64; P]], u: &[Vec<Vec<Tensor>>], per: usize) -> Vec<f64> {
    (0..N)
        .map(|m| {
            u.iter()
                .enumerate()
                .map(|(s, us)| {
                    let mut g = [0f64; P];
                    for th in &traj[s * per..(s + 1) * per] {
                        let gm = grad_doc(p, m, th);
                        for i in 0..P {
                            g[i] += gm[i] / per as f64;
                        }
                    }
                    let ul: Vec<f64> = us[0][0].flatten_all().unwrap().to_vec1().unwrap();
                    ul.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>() / N as f64
                })
                .sum()
        })
        .collect()
}

/// Source with the exact Hessian H = (1/N) Σ x xᵀ, `segments` equal segments, the
/// document gradient averaged over the points where the segment's steps evaluated it.
fn source(p: &Problem, lrs: &[f64], beta: f64, segments: usize) -> Vec<f64> {
    let traj = train(p, lrs, beta, usize::MAX, 0.0);
    let h = hessian(p);
    let curv = DenseCurvature::new(&Tensor::from_vec(h, (P, P), &Device::Cpu).unwrap()).unwrap();
    let k = lrs.len();
    let per = k / segments;
    let segs: Vec<SegmentCurvature> = (0..segments)
        .map(|s| SegmentCurvature {
            factors: &curv,
            mass: LrMass::Finite(lrs[s * per..(s + 1) * per].iter().sum::<f64>() / (1.0 - beta)),
            groups: Vec::new(),
        })
        .collect();
    let th_final = traj[k];
    let r = dot(&p.xq, &th_final) - p.yq;
    let v: [f64; P] = std::array::from_fn(|i| r * p.xq[i]);
    let u = source_walk(&[to_tensor(&v)], &segs, Damping::Absolute(0.0)).unwrap();
    taus(p, &traj, &u, per)
}

pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max)
        / scale
}

#[test]
fn gradient_descent_matches_brute_force_and_converges_with_shorter_segments() {
    let p = problem();
    // A decaying schedule: segments see different learning rates.
    let lrs: Vec<f64> = (0..240).map(|k| 0.2 * (1.0 - k as f64 / 300.0)).collect();
    let truth = brute_force(&p, &lrs, 0.0);
    let errs: Vec<f64> = [4, 24, 240]
        .iter()
        .map(|&segs| rel_err(&source(&p, &lrs, 0.0, segs), &truth))
        .collect();
    eprintln!("relative error for 4, 24, 240 segments: {errs:?}");
    assert!(errs[1] < 1e-2, "{errs:?}");
    assert!(
        errs[2] < errs[1] && errs[1] < errs[0],
        "error shrinks with segments: {errs:?}"
    );
    // The sign: the largest |τ| have the same sign as the truth.
    for (s, t) in source(&p, &lrs, 0.0, 24).iter().zip(&truth) {
        if t.abs() > 0.1 * truth.iter().fold(0f64, |m, v| m.max(v.abs())) {
            assert_eq!(s.signum(), t.signum());
        }
    }
}

#[test]
fn heavy_ball_momentum_matches_brute_force() {
    let p = problem();
    let lrs = vec![0.02; 400];
    let truth = brute_force(&p, &lrs, 0.5);
    let err = rel_err(&source(&p, &lrs, 0.5, 40), &truth);
    eprintln!("momentum β = 0.5, 40 segments: relative error {err}");
    assert!(err < 1e-2, "{err}");
}

/// Adam on the same problem: returns θ_k (k = 0..=K) and, per step, the preconditioner
/// 1/(√v̂ + ε) it applied.
#[allow(clippy::type_complexity)]
fn train_adam(
    p: &Problem,
    lrs: &[f64],
    target: usize,
    eps_w: f64,
) -> (Vec<[f64; P]>, Vec<[f64; P]>) {
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    let mut th = p.theta0;
    let (mut m, mut v) = ([0f64; P], [0f64; P]);
    let mut thetas = vec![th];
    let mut precs = Vec::new();
    for (k, &lr) in lrs.iter().enumerate() {
        let t = (k + 1) as i32;
        let mut g = [0f64; P];
        for d in 0..N {
            let w = if d == target { 1.0 + eps_w } else { 1.0 };
            let gd = grad_doc(p, d, &th);
            for i in 0..P {
                g[i] += w * gd[i] / N as f64;
            }
        }
        let mut prec = [0f64; P];
        for i in 0..P {
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let mh = m[i] / (1.0 - b1.powi(t));
            let vh = v[i] / (1.0 - b2.powi(t));
            prec[i] = 1.0 / (vh.sqrt() + eps);
            th[i] -= lr * mh * prec[i];
        }
        precs.push(prec);
        thetas.push(th);
    }
    (thetas, precs)
}

fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let rank = |v: &[f64]| -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        for (k, &i) in idx.iter().enumerate() {
            r[i] = k as f64;
        }
        r
    };
    let (ra, rb) = (rank(a), rank(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Source's Adam variant (P = diag(p̄) held fixed per segment, HP taken diagonal in H̄'s
/// eigenbasis) and the plain SGD form on one Adam trajectory (`steps` at constant η, cut
/// into `segments`), each as Spearman's ρ against brute-force retraining with Adam (which
/// also moves v̂, so neither is exact): (ρ Adam variant, ρ SGD form).
fn adam_vs_brute_force(steps: usize, lr: f64, segments: usize) -> (f64, f64) {
    use source_tda::attribution::AdamCurvature;
    let p = problem();
    let lrs = vec![lr; steps];
    let per = lrs.len() / segments;
    // Brute force: −df/dε by central differences of the whole Adam run.
    let h = 1e-5;
    let truth: Vec<f64> = (0..N)
        .map(|m| {
            let up = *train_adam(&p, &lrs, m, h).0.last().unwrap();
            let down = *train_adam(&p, &lrs, m, -h).0.last().unwrap();
            -(f_query(&p, &up) - f_query(&p, &down)) / (2.0 * h)
        })
        .collect();

    let (traj, precs) = train_adam(&p, &lrs, usize::MAX, 0.0);
    let hm = hessian(&p);
    let dense = DenseCurvature::new(&Tensor::from_vec(hm, (P, P), &Device::Cpu).unwrap()).unwrap();
    let adams: Vec<AdamCurvature> = (0..segments)
        .map(|s| {
            let pbar: Vec<f64> = (0..P)
                .map(|i| {
                    precs[s * per..(s + 1) * per]
                        .iter()
                        .map(|pr| pr[i])
                        .sum::<f64>()
                        / per as f64
                })
                .collect();
            AdamCurvature {
                inner: &dense,
                p_bar: vec![Tensor::from_vec(pbar, (1, P), &Device::Cpu).unwrap()],
            }
        })
        .collect();
    let mass = |s: usize| LrMass::Finite(lrs[s * per..(s + 1) * per].iter().sum());
    let th_final = traj[lrs.len()];
    let r = dot(&p.xq, &th_final) - p.yq;
    let v: [f64; P] = std::array::from_fn(|i| r * p.xq[i]);
    let rho = |segs: Vec<SegmentCurvature>| -> f64 {
        let u = source_walk(&[to_tensor(&v)], &segs, Damping::Absolute(0.0)).unwrap();
        spearman(&taus(&p, &traj, &u, per), &truth)
    };
    let adam = rho((0..segments)
        .map(|s| SegmentCurvature {
            factors: &adams[s] as &dyn Curvature,
            mass: mass(s),
            groups: Vec::new(),
        })
        .collect());
    let sgd = rho((0..segments)
        .map(|s| SegmentCurvature {
            factors: &dense as &dyn Curvature,
            mass: mass(s),
            groups: Vec::new(),
        })
        .collect());
    (adam, sgd)
}

/// Short Adam runs (the non-converged fine-tunes Source is for): the Adam variant ranks
/// documents like brute-force retraining and better than the SGD form. Measured (ρ Adam
/// variant / earlier elementwise-then-H⁻¹ form / SGD form): 20 steps at η = 0.02:
/// 0.71 / 0.45 / 0.47; 20 at 0.005: 0.65 / 0.26 / 0.51; 60 at 0.01: 0.92 / 0.39 / 0.73.
/// Long runs, where Adam's v̂ feedback (sign-like steps) dominates, are a known weak spot:
/// 300 steps at η = 0.02: 0.63 / 0.99 / 0.66; 300 at 0.01: 0.50 / 0.78 / 0.83.
#[test]
fn adam_variant_ranks_documents_like_brute_force_on_short_runs() {
    for (steps, lr, segments, min_rho) in [(20, 0.02, 4, 0.65), (60, 0.01, 6, 0.9)] {
        let (adam, sgd) = adam_vs_brute_force(steps, lr, segments);
        eprintln!("Adam, {steps} steps at η = {lr}: Spearman {adam:.4} (SGD form: {sgd:.4})");
        assert!(
            adam >= min_rho,
            "{steps} steps at η = {lr}: Spearman {adam}"
        );
        assert!(
            adam > sgd,
            "the Adam variant must beat the SGD form on a short Adam trajectory"
        );
    }
}

/// Preconditioned gradient descent θ ← θ − η P ∇J_ε(θ) with a fixed, non-uniform diagonal
/// P: the linear model Source's Adam variant assumes, so brute-force retraining is its
/// independent truth. Returns θ_k (k = 0..=K).
fn train_preconditioned(
    p: &Problem,
    lrs: &[f64],
    prec: &[f64; P],
    target: usize,
    eps: f64,
) -> Vec<[f64; P]> {
    let mut th = p.theta0;
    let mut out = vec![th];
    for &lr in lrs {
        let mut g = [0f64; P];
        for m in 0..N {
            let w = if m == target { 1.0 + eps } else { 1.0 };
            let gm = grad_doc(p, m, &th);
            for i in 0..P {
                g[i] += w * gm[i] / N as f64;
            }
        }
        for i in 0..P {
            th[i] -= lr * prec[i] * g[i];
        }
        out.push(th);
    }
    out
}

/// The earlier Adam form, kept here only as the comparison: σ_p = p ⊙ diag(H) elementwise,
/// propagation exp(−s σ_p), injection (1 − exp(−s σ_p)) followed by H⁻¹.
struct ElementwiseThenInverse<'a> {
    dense: &'a DenseCurvature,
    sigma: Vec<f64>,
}

impl Curvature for ElementwiseThenInverse<'_> {
    fn apply(&self, v: &[Tensor], f: SpectralFn) -> source_tda::Result<Vec<Tensor>> {
        let x: Vec<f64> = v[0].flatten_all()?.to_vec1()?;
        let w = |g: &dyn Fn(f64) -> f64| -> Vec<f64> {
            x.iter().zip(&self.sigma).map(|(a, s)| a * g(*s)).collect()
        };
        let t = |y: Vec<f64>| Tensor::from_vec(y, v[0].dims(), &Device::Cpu).unwrap();
        match f {
            SpectralFn::Propagate { s } => Ok(vec![t(w(&|sig| (-s * sig).exp()))]),
            SpectralFn::Inject { s } => self
                .dense
                .inverse(&[t(w(&|sig| -(-s * sig).exp_m1()))], Damping::Absolute(0.0)),
            _ => unreachable!("the walk uses only F_S and F_r"),
        }
    }
    fn inverse(&self, v: &[Tensor], d: Damping) -> source_tda::Result<Vec<Tensor>> {
        self.dense.inverse(v, d)
    }
    fn apply_preconditioned(
        &self,
        v: &[Tensor],
        p: &[Tensor],
        f: &dyn Fn(f64, f64) -> f64,
    ) -> source_tda::Result<Vec<Tensor>> {
        self.dense.apply_preconditioned(v, p, f)
    }
}

/// Source's Adam variant against brute-force retraining with a fixed diagonal
/// preconditioner (the linear model it assumes), from a short (s σ ≪ 1: a non-converged
/// fine-tune) to a long trajectory, next to the elementwise-then-H⁻¹ form. Short:
/// the variant reduces to s P ∇L and matches brute force; P = c I: exact like the SGD form
/// at every length. Measured relative errors (variant / elementwise form): P spread 0.2–4.5,
/// Σ η = 0.05: 4.8e-3 / 0.54; Σ η = 2: 0.49 / 0.78; Σ η = 40: 0.98 / 0.41 (long runs with a
/// very uneven P are where the eigenbasis-diagonal stand-in for P is weakest); P = 1.7 I:
/// ≤ 1.2e-3 / 0.09–2.7.
#[test]
fn adam_variant_matches_preconditioned_descent_by_brute_force() {
    use source_tda::attribution::AdamCurvature;
    let p = problem();
    let hm = hessian(&p);
    let diag: Vec<f64> = (0..P).map(|i| hm[i * P + i]).collect();
    let dense = DenseCurvature::new(&Tensor::from_vec(hm, (P, P), &Device::Cpu).unwrap()).unwrap();
    let mut st = 7u64;
    let spread: [f64; P] = std::array::from_fn(|_| (1.5 * lcg(&mut st)).exp()); // 0.22 … 4.5
    let uniform = [1.7; P];
    let segments = 24;
    let mut report = Vec::new();
    for (name, prec) in [("non-uniform", spread), ("uniform", uniform)] {
        for total in [0.05, 2.0, 40.0] {
            let lrs = vec![total / 240.0; 240];
            let per = lrs.len() / segments;
            let h = 1e-5;
            let truth: Vec<f64> = (0..N)
                .map(|m| {
                    let up = *train_preconditioned(&p, &lrs, &prec, m, h).last().unwrap();
                    let down = *train_preconditioned(&p, &lrs, &prec, m, -h).last().unwrap();
                    -(f_query(&p, &up) - f_query(&p, &down)) / (2.0 * h)
                })
                .collect();
            let traj = train_preconditioned(&p, &lrs, &prec, usize::MAX, 0.0);
            let r = dot(&p.xq, &traj[lrs.len()]) - p.yq;
            let v: [f64; P] = std::array::from_fn(|i| r * p.xq[i]);
            let mass = |s: usize| LrMass::Finite(lrs[s * per..(s + 1) * per].iter().sum());
            let adam = AdamCurvature {
                inner: &dense,
                p_bar: vec![Tensor::from_vec(prec.to_vec(), (1, P), &Device::Cpu).unwrap()],
            };
            let old = ElementwiseThenInverse {
                dense: &dense,
                sigma: prec.iter().zip(&diag).map(|(a, b)| a * b).collect(),
            };
            let walk = |c: &dyn Curvature| -> Vec<f64> {
                let segs: Vec<SegmentCurvature> = (0..segments)
                    .map(|s| SegmentCurvature {
                        factors: c,
                        mass: mass(s),
                        groups: Vec::new(),
                    })
                    .collect();
                let u = source_walk(&[to_tensor(&v)], &segs, Damping::Absolute(0.0)).unwrap();
                taus(&p, &traj, &u, per)
            };
            let (e_new, e_old) = (rel_err(&walk(&adam), &truth), rel_err(&walk(&old), &truth));
            report.push(format!(
                "{name} Σ η = {total}: new {e_new:.2e}, old {e_old:.2e}"
            ));
            if name == "uniform" {
                assert!(
                    e_new < 5e-3,
                    "P = c I, Σ η = {total}: relative error {e_new}"
                );
            } else if total < 1.0 {
                assert!(e_new < 1e-2, "short, Σ η = {total}: relative error {e_new}");
                assert!(
                    e_new < 0.1 * e_old,
                    "short: variant {e_new} vs earlier {e_old}"
                );
            }
        }
    }
    eprintln!(
        "Adam variant vs brute force (relative error):\n  {}",
        report.join("\n  ")
    );
}
