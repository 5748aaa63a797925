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

/// Source with the exact Hessian H = (1/N) Σ x xᵀ, `segments` equal segments, the
/// document gradient averaged over the points where the segment's steps evaluated it.
fn source(p: &Problem, lrs: &[f64], beta: f64, segments: usize) -> Vec<f64> {
    let traj = train(p, lrs, beta, usize::MAX, 0.0);
    let mut h = vec![0f64; P * P];
    for x in &p.x {
        for i in 0..P {
            for j in 0..P {
                h[i * P + j] += x[i] * x[j] / N as f64;
            }
        }
    }
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
    (0..N)
        .map(|m| {
            (0..segments)
                .map(|s| {
                    let mut g = [0f64; P];
                    for th in &traj[s * per..(s + 1) * per] {
                        let gm = grad_doc(p, m, th);
                        for i in 0..P {
                            g[i] += gm[i] / per as f64;
                        }
                    }
                    let ul: Vec<f64> = u[s][0].flatten_all().unwrap().to_vec1().unwrap();
                    ul.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>() / N as f64
                })
                .sum()
        })
        .collect()
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
