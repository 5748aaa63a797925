//! Exactness of the Source formula on a quadratic: linear regression trained by full-batch
//! gradient descent (and heavy-ball momentum), one document up-weighted by ε and the whole
//! training re-run by brute force, against the Source walk with the exact Hessian (dense
//! path). The only approximations left are (1 − ησ)^K ≈ exp(−Kησ) and the segment-averaged
//! document gradient; both vanish as segments shorten (DESIGN.md §2).

use candle_core::{Device, Tensor};
use source_tda::attribution::{source_walk, Damping, DenseCurvature, SegmentCurvature};
use source_tda::train::LrMass;

const P: usize = 6;
const N: usize = 12;

struct Problem {
    x: Vec<[f64; P]>,
    y: Vec<f64>,
    xq: [f64; P],
    yq: f64,
    theta0: [f64; P],
}

fn lcg(state: &mut u64) -> f64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

fn problem() -> Problem {
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

fn dot(a: &[f64; P], b: &[f64; P]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// ∇L_m(θ) = (x_mᵀθ − y_m) x_m.
fn grad_doc(p: &Problem, m: usize, th: &[f64; P]) -> [f64; P] {
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

fn f_query(p: &Problem, th: &[f64; P]) -> f64 {
    0.5 * (dot(&p.xq, th) - p.yq).powi(2)
}

fn to_tensor(v: &[f64; P]) -> Tensor {
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
fn taus(p: &Problem, traj: &[[f64; P]], u: &[Vec<Tensor>], per: usize) -> Vec<f64> {
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
                    let ul: Vec<f64> = us[0].flatten_all().unwrap().to_vec1().unwrap();
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
        })
        .collect();
    let th_final = traj[k];
    let r = dot(&p.xq, &th_final) - p.yq;
    let v: [f64; P] = std::array::from_fn(|i| r * p.xq[i]);
    let u = source_walk(&[to_tensor(&v)], &segs, Damping::Absolute(0.0)).unwrap();
    taus(p, &traj, &u, per)
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
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

/// Source's Adam variant (σ_p = p̄ ⊙ diag(H), elementwise propagation and injection, then
/// H⁻¹) on an Adam trajectory, against brute-force retraining with Adam: the diagonal
/// approximation is not exact, so the check is the ranking (Spearman ≥ 0.9), and that it
/// ranks better than the plain SGD form on the same trajectory.
#[test]
fn adam_variant_ranks_documents_like_brute_force() {
    use source_tda::attribution::{AdamCurvature, Curvature};
    let p = problem();
    // η = 0.02 for 300 steps: Adam well past its first, sign-like steps. (Measured: at
    // η = 0.01 both the Adam variant and the SGD form reach only Spearman ≈ 0.8; at
    // η = 0.03–0.05 the Adam variant gives 1.0 and the SGD form 0.89.)
    let lrs = vec![0.02; 300];
    let segments = 30;
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
    let diag: Vec<f64> = (0..P).map(|i| hm[i * P + i]).collect();
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
            let sigma: Vec<f64> = pbar.iter().zip(&diag).map(|(a, b)| a * b).collect();
            AdamCurvature {
                inner: &dense,
                sigma: vec![Tensor::from_vec(sigma, (1, P), &Device::Cpu).unwrap()],
                damping: Damping::Absolute(0.0),
            }
        })
        .collect();
    let segs: Vec<SegmentCurvature> = adams
        .iter()
        .enumerate()
        .map(|(s, a)| SegmentCurvature {
            factors: a as &dyn Curvature,
            mass: LrMass::Finite(lrs[s * per..(s + 1) * per].iter().sum()),
        })
        .collect();
    let th_final = traj[lrs.len()];
    let r = dot(&p.xq, &th_final) - p.yq;
    let v: [f64; P] = std::array::from_fn(|i| r * p.xq[i]);
    let u = source_walk(&[to_tensor(&v)], &segs, Damping::Absolute(0.0)).unwrap();
    let tau = taus(&p, &traj, &u, per);
    let rho = spearman(&tau, &truth);
    // The plain SGD form on the same trajectory, for comparison.
    let sgd_segs: Vec<SegmentCurvature> = (0..segments)
        .map(|s| SegmentCurvature {
            factors: &dense as &dyn Curvature,
            mass: LrMass::Finite(lrs[s * per..(s + 1) * per].iter().sum()),
        })
        .collect();
    let u_sgd = source_walk(&[to_tensor(&v)], &sgd_segs, Damping::Absolute(0.0)).unwrap();
    let tau_sgd = taus(&p, &traj, &u_sgd, per);
    let rho_sgd = spearman(&tau_sgd, &truth);
    eprintln!("Adam variant vs brute force: Spearman {rho:.4} (SGD form: {rho_sgd:.4})");
    assert!(rho >= 0.9, "Spearman {rho}");
    assert!(
        rho > rho_sgd,
        "the Adam variant must beat the SGD form on an Adam trajectory"
    );
}
