// source-tda CUDA kernels, compiled at run time by NVRTC (src/cuda/nvrtc.rs) for the GPU
// found, and to PTX for sm_90 by the CPU-only test tests/cuda_ptx.rs. No headers: bf16 is
// read as raw 16-bit words, TF32 rounding is one PTX instruction.
//
// Every kernel is a 64×64 output tile per block of 256 threads (4×4 outputs per thread),
// k-chunks of 16 staged in shared memory, f32 accumulation. Matrices are addressed by
// (row stride, column stride), so transposes are free. Row-major everywhere on the host side.
//
// Precision modes (argument `tf32`): 0 = exact f32 products; 1 = both operands rounded to
// TF32 (10-bit mantissa, round to nearest away) before the product, the numerics of a TF32
// tensor-core GEMM. bf16 inputs are the *_bf16 entry points (a, δ stored as bf16).

typedef unsigned short bf16_t;

#define TILE 64
#define KC 16
#define THREADS 256

__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const bf16_t* p, long long i) {
  return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ float round_tf32(float x) {
  unsigned int r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
}

// acc[r][c] += Σ_{k in [k0, k1)} A(m0 + ty + 16 r, k) · w(k) · B(k, n0 + tx + 16 c)
// A(m, k) = A[m * ars + k * acs] (m < M), B(k, n) = B[k * brs + n * bcs] (n < N),
// w = nullptr means weights 1. Out-of-range entries read as 0.
template <typename TA, typename TB>
__device__ void mac_tile(float acc[4][4], const TA* A, long long ars, long long acs,
                         const TB* B, long long brs, long long bcs, const float* w, int M,
                         int N, long long k0, long long k1, int m0, int n0, int tf32) {
  __shared__ float As[KC][TILE + 1];
  __shared__ float Bs[KC][TILE + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  for (long long kb = k0; kb < k1; kb += KC) {
    // 1024 entries per operand tile, 4 per thread. Consecutive threads walk the operand's
    // unit-stride dimension: the 64-wide one when it has unit stride, else k (16 at a time).
    const bool a_k_fast = (acs == 1 && ars != 1);
    const bool b_k_fast = (brs == 1 && bcs != 1);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int idx = tid + e * THREADS;
      const int ka = a_k_fast ? idx % KC : idx / TILE;
      const int ma = a_k_fast ? idx / KC : idx % TILE;
      const int kb2 = b_k_fast ? idx % KC : idx / TILE;
      const int nb = b_k_fast ? idx / KC : idx % TILE;
      float av = 0.f, bv = 0.f;
      const long long k_a = kb + ka, k_b = kb + kb2;
      const int m = m0 + ma, n = n0 + nb;
      if (k_a < k1 && m < M) av = load_f(A, (long long)m * ars + k_a * acs) * (w ? w[k_a] : 1.f);
      if (k_b < k1 && n < N) bv = load_f(B, k_b * brs + (long long)n * bcs);
      if (tf32) {
        av = round_tf32(av);
        bv = round_tf32(bv);
      }
      As[ka][ma] = av;
      Bs[kb2][nb] = bv;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KC; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = As[kk][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = Bs[kk][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
    }
    __syncthreads();
  }
}

__device__ __forceinline__ void zero_acc(float acc[4][4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
}

// ---------------------------------------------------------------------------------------
// 1. Masked covariance accumulation, lower triangle, several layers per launch.
//    out_l[i, j] += Σ_t mask[t] · X_l[t, i] · X_l[t, j] for tiles with tile(i) ≥ tile(j).
//    Layer l: X_l = xs[l] ([n, dims[l]] row-major), out_l = outs[l] ([dims[l]²] f32).
//    tile_start[l] = first global tile index of layer l (prefix sums of T_l (T_l + 1) / 2,
//    T_l = ceil(dims[l] / 64)); blockIdx.x is the global tile. Only lower-triangle tiles are
//    computed; entries above the diagonal inside diagonal tiles are written too (the host
//    mirrors the lower triangle).
template <typename T>
__device__ void masked_syrk(const unsigned long long* xs, float* const* outs, const int* dims,
                            const long long* tile_start, int layers, const float* mask,
                            long long n, int tf32) {
  long long g = blockIdx.x;
  int l = 0;
  while (l + 1 < layers && tile_start[l + 1] <= g) ++l;
  long long local = g - tile_start[l];
  // local → (ti, tj), tj ≤ ti, row-major over the lower triangle of tiles.
  int ti = (int)((sqrt(8.0 * (double)local + 1.0) - 1.0) * 0.5);
  while ((long long)(ti + 1) * (ti + 2) / 2 <= local) ++ti;
  while ((long long)ti * (ti + 1) / 2 > local) --ti;
  int tj = (int)(local - (long long)ti * (ti + 1) / 2);
  const int d = dims[l];
  const T* x = (const T*)xs[l];
  float* out = outs[l];
  float acc[4][4];
  zero_acc(acc);
  // A(i, t) = X[t, i]: row stride 1, column stride d. B(t, j) = X[t, j].
  mac_tile<T, T>(acc, x, 1, d, x, d, 1, mask, d, d, 0, n, ti * TILE, tj * TILE, tf32);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      int i = ti * TILE + ty + 16 * r, j = tj * TILE + tx + 16 * c;
      if (i < d && j < d) out[(long long)i * d + j] += acc[r][c];
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    masked_syrk_f32(const unsigned long long* xs, float* const* outs, const int* dims,
                    const long long* tile_start, int layers, const float* mask, long long n,
                    int tf32) {
  masked_syrk<float>(xs, outs, dims, tile_start, layers, mask, n, tf32);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    masked_syrk_bf16(const unsigned long long* xs, float* const* outs, const int* dims,
                     const long long* tile_start, int layers, const float* mask, long long n,
                     int tf32) {
  masked_syrk<bf16_t>(xs, outs, dims, tile_start, layers, mask, n, tf32);
}

// ---------------------------------------------------------------------------------------
// 2. Eigenvalue correction. dr = δ Q_S [B·T, d_out], ar = a Q_A [B·T, d_in] (already in the
//    eigenbasis), mask [B·T]. out[i, j] += Σ_b (Σ_{t in doc b} mask · dr[t, i] · ar[t, j])²:
//    each document's rotated gradient tile lives only in registers, never in global memory.
template <typename T>
__device__ void eig_correction(const T* dr, const T* ar, const float* mask, float* out,
                               int d_out, int d_in, int docs, int seq, int tf32) {
  const int i0 = blockIdx.y * TILE, j0 = blockIdx.x * TILE;
  float sq[4][4], acc[4][4];
  zero_acc(sq);
  for (int b = 0; b < docs; ++b) {
    zero_acc(acc);
    long long k0 = (long long)b * seq;
    mac_tile<T, T>(acc, dr, 1, d_out, ar, d_in, 1, mask, d_out, d_in, k0, k0 + seq, i0, j0,
                   tf32);
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) sq[r][c] = fmaf(acc[r][c], acc[r][c], sq[r][c]);
  }
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      int i = i0 + ty + 16 * r, j = j0 + tx + 16 * c;
      if (i < d_out && j < d_in) out[(long long)i * d_in + j] += sq[r][c];
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    eig_correction_f32(const float* dr, const float* ar, const float* mask, float* out,
                       int d_out, int d_in, int docs, int seq, int tf32) {
  eig_correction<float>(dr, ar, mask, out, d_out, d_in, docs, seq, tf32);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    eig_correction_bf16(const bf16_t* dr, const bf16_t* ar, const float* mask, float* out,
                        int d_out, int d_in, int docs, int seq, int tf32) {
  eig_correction<bf16_t>(dr, ar, mask, out, d_out, d_in, docs, seq, tf32);
}

// ---------------------------------------------------------------------------------------
// 3. Fused Source scoring contraction. For queries U [Q, d_out, d_in] (f32), activations
//    a [B·T, d_in], output gradients δ [B·T, d_out], mask [B·T]:
//      tok[q, t] += mask[t] · δ_tᵀ U_q a_t,   doc[q, b] += Σ_{t in doc b} (same)
//    grid: x = token tiles, y = Q · ceil(d_out / 64). The block computes the 64×64 tile
//    (U_q a_t)[o] for its tokens and outputs, dots it with δ in registers, reduces over the
//    16 threads of a row with warp shuffles, and adds one value per token and tile.
template <typename T>
__device__ void score_tokens(const float* u, const T* a, const T* delta, const float* mask,
                             float* tok, float* doc, int queries, int d_out, int d_in,
                             long long n, int seq, int tf32) {
  const int o_tiles = (d_out + TILE - 1) / TILE;
  const int q = blockIdx.y / o_tiles;
  const int o0 = (blockIdx.y % o_tiles) * TILE;
  const long long t0 = (long long)blockIdx.x * TILE;
  const float* uq = u + (long long)q * d_out * d_in;
  float acc[4][4];
  zero_acc(acc);
  // Z(t, o) = Σ_i a[t, i] U_q[o, i]: A(t, i) = a[t·d_in + i], B(i, o) = U_q[o·d_in + i].
  // Token offsets are folded into the A pointer so that rows are tile-local.
  const long long rows = n - t0 < TILE ? n - t0 : TILE;
  mac_tile<T, float>(acc, a + t0 * d_in, d_in, 1, uq, 1, d_in, nullptr, (int)rows, d_out, 0,
                     d_in, 0, o0, tf32);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    long long t = t0 + ty + 16 * r;
    float part = 0.f;
    if (t < n) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        int o = o0 + tx + 16 * c;
        if (o < d_out) {
          float dv = load_f(delta, t * d_out + o);
          if (tf32) dv = round_tf32(dv);
          part = fmaf(acc[r][c], dv, part);
        }
      }
    }
    // The 16 threads sharing ty are 16 consecutive lanes of one warp.
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off, 16);
    if (tx == 0 && t < n) {
      float v = part * mask[t];
      if (v != 0.f) {
        atomicAdd(&tok[(long long)q * n + t], v);
        long long docs = (n + seq - 1) / seq;
        atomicAdd(&doc[(long long)q * docs + t / seq], v);
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    score_tokens_f32(const float* u, const float* a, const float* delta, const float* mask,
                     float* tok, float* doc, int queries, int d_out, int d_in, long long n,
                     int seq, int tf32) {
  score_tokens<float>(u, a, delta, mask, tok, doc, queries, d_out, d_in, n, seq, tf32);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    score_tokens_bf16(const float* u, const bf16_t* a, const bf16_t* delta, const float* mask,
                      float* tok, float* doc, int queries, int d_out, int d_in, long long n,
                      int seq, int tf32) {
  score_tokens<bf16_t>(u, a, delta, mask, tok, doc, queries, d_out, d_in, n, seq, tf32);
}

// ---------------------------------------------------------------------------------------
// 3b. The same contraction for a low-rank query U_q = P_q R_qᵀ (P_q = σ-scaled left singular
//     vectors [d_out, r], R_q right singular vectors [d_in, r], both f32, stored [Q, d, r]):
//       tok[q, t] += mask[t] · Σ_k (δ_tᵀ P_q)[k] · (a_tᵀ R_q)[k],  doc[q, b] += its sum.
//     grid: x = token tiles, y = Q · ceil(r / 64). The block forms the two 64×64 tiles
//     (δ P_q) and (a R_q) for its tokens and rank columns in registers, multiplies them
//     elementwise, reduces over the rank columns with warp shuffles and adds one value per
//     token: two thin GEMMs of width r instead of a d_out × d_in product per token.
template <typename T>
__device__ void score_tokens_lowrank(const float* p, const float* r, const T* a,
                                     const T* delta, const float* mask, float* tok,
                                     float* doc, int queries, int d_out, int d_in, int rank,
                                     long long n, int seq, int tf32) {
  const int k_tiles = (rank + TILE - 1) / TILE;
  const int q = blockIdx.y / k_tiles;
  const int c0 = (blockIdx.y % k_tiles) * TILE;
  const long long t0 = (long long)blockIdx.x * TILE;
  const long long rows = n - t0 < TILE ? n - t0 : TILE;
  float dp[4][4], ar[4][4];
  zero_acc(dp);
  zero_acc(ar);
  // DP(t, c) = Σ_o δ[t, o] P_q[o, c];  AR(t, c) = Σ_i a[t, i] R_q[i, c].
  mac_tile<T, float>(dp, delta + t0 * d_out, d_out, 1, p + (long long)q * d_out * rank, rank,
                     1, nullptr, (int)rows, rank, 0, d_out, 0, c0, tf32);
  mac_tile<T, float>(ar, a + t0 * d_in, d_in, 1, r + (long long)q * d_in * rank, rank, 1,
                     nullptr, (int)rows, rank, 0, d_in, 0, c0, tf32);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    long long t = t0 + ty + 16 * rr;
    float part = 0.f;
#pragma unroll
    for (int c = 0; c < 4; ++c) part = fmaf(dp[rr][c], ar[rr][c], part);  // 0 beyond rank
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off, 16);
    if (tx == 0 && t < n) {
      float v = part * mask[t];
      if (v != 0.f) {
        atomicAdd(&tok[(long long)q * n + t], v);
        long long docs = (n + seq - 1) / seq;
        atomicAdd(&doc[(long long)q * docs + t / seq], v);
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    score_tokens_lowrank_f32(const float* p, const float* r, const float* a,
                             const float* delta, const float* mask, float* tok, float* doc,
                             int queries, int d_out, int d_in, int rank, long long n, int seq,
                             int tf32) {
  score_tokens_lowrank<float>(p, r, a, delta, mask, tok, doc, queries, d_out, d_in, rank, n,
                              seq, tf32);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    score_tokens_lowrank_bf16(const float* p, const float* r, const bf16_t* a,
                              const bf16_t* delta, const float* mask, float* tok, float* doc,
                              int queries, int d_out, int d_in, int rank, long long n, int seq,
                              int tf32) {
  score_tokens_lowrank<bf16_t>(p, r, a, delta, mask, tok, doc, queries, d_out, d_in, rank, n,
                               seq, tf32);
}

// ---------------------------------------------------------------------------------------
// 3c. f32 → bf16 (round to nearest even; NaN stays NaN), the input conversion of the bf16
//     mode, on the device. Same bits as the host's reference::to_bf16.
extern "C" __global__ void __launch_bounds__(THREADS)
    f32_to_bf16(const float* x, bf16_t* y, long long n) {
  for (long long i = (long long)blockIdx.x * THREADS + threadIdx.x; i < n;
       i += (long long)gridDim.x * THREADS) {
    unsigned int b = __float_as_uint(x[i]);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
      y[i] = (bf16_t)((b >> 16) | 0x40u);
    } else {
      y[i] = (bf16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
    }
  }
}

// ---------------------------------------------------------------------------------------
// 4. Batched GEMM with an optional spectral epilogue, the building block of the eigenbasis
//    function application Q_S (F(Λ) ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ (four GEMMs, the F(Λ) product
//    fused into the second):
//      C[b](m, n) = A[b](m, k) B[b](k, n) · (lambda ? F(lambda[m, n]) : 1)
//    A(m, k) = A[b·sa + m·ars + k·acs], B(k, n) = B[b·sb + k·brs + n·bcs], C row-major
//    [M, N] with batch stride M·N. grid: x = N tiles, y = M tiles, z = batch.
//    F (evaluated in f64, docs/design.md §2; `kind`): 0 identity, 1 propagate exp(−s σ⁺),
//    2 inject s·(−expm1(−x)/x) with x = s σ⁺ (s (1 − x/2) below x = 1e-10),
//    3 inverse 1/(σ + p). σ⁺ = max(σ, 0).
__device__ __forceinline__ float spectral(float sigma_f, int kind, double p) {
  double sigma = (double)sigma_f;
  double sp = sigma > 0.0 ? sigma : 0.0;
  switch (kind) {
    case 1:
      return (float)exp(-p * sp);
    case 2: {
      double x = p * sp;
      if (x < 1e-10) return (float)(p * (1.0 - 0.5 * x));
      return (float)(p * (-expm1(-x) / x));
    }
    case 3:
      return (float)(1.0 / (sigma + p));
    default:
      return 1.f;
  }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    gemm_spectral(const float* A, long long sa, long long ars, long long acs, const float* B,
                  long long sb, long long brs, long long bcs, float* C, int M, int N, int K,
                  const float* lambda, int kind, double p, int tf32) {
  const int m0 = blockIdx.y * TILE, n0 = blockIdx.x * TILE;
  const long long b = blockIdx.z;
  float acc[4][4];
  zero_acc(acc);
  mac_tile<float, float>(acc, A + b * sa, ars, acs, B + b * sb, brs, bcs, nullptr, M, N, 0, K,
                         m0, n0, tf32);
  float* c = C + b * (long long)M * N;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) {
      int m = m0 + ty + 16 * r, n = n0 + tx + 16 * cc;
      if (m < M && n < N) {
        float v = acc[r][cc];
        if (lambda) v *= spectral(lambda[(long long)m * N + n], kind, p);
        c[(long long)m * N + n] = v;
      }
    }
}
