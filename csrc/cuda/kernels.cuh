// The kernels of the cuda backend and their launchers (the functions of launch.h).
//
// Compiled by nvcc in kernels.cu; tests/cuda_emulation.py also compiles this file with a
// host compiler and KK_CUDA_EMULATE (compat.cuh, emulate.h) to run the same kernels on a
// machine without a GPU.
//
// Conventions shared by every kernel:
//   * 256 threads per block; every reduction has a fixed shape (per-thread serial sums,
//     xor-butterfly warp sums, warps summed in index order, chunk partials summed in chunk
//     order), never atomics: the same inputs give the same bits on every run;
//   * ACC is the accumulation type: double when any operand is float64, else float; the
//     per-element formulas are those of csrc/kk_math.h, shared with the CPU kernels;
//   * P- = cov * inv_lam + q is computed where cov is read, never stored;
//   * an in-place kernel reads the device predicate `ok` first and returns when it is
//     false, before any barrier (the whole block returns), so nothing is written;
//   * NaN / Inf propagate: no term is skipped because a factor is zero, padding is exact
//     zeros in positions that reach no output.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../kk_math.h"
#include "compat.cuh"
#include "launch.h"

namespace kalman_kernels {
namespace cuda {
#if defined(KK_CUDA_EMULATE)
inline namespace emulated {
#endif
namespace {

namespace km = ::kalman_kernels::math;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------------------
// Element conversions and small helpers
// ---------------------------------------------------------------------------------------
template <typename ACC> KK_DEVICE ACC to_acc(float x) { return static_cast<ACC>(x); }
template <typename ACC> KK_DEVICE ACC to_acc(double x) { return static_cast<ACC>(x); }
template <typename ACC> KK_DEVICE ACC to_acc(kk_half x) { return static_cast<ACC>(kk_to_float(x)); }
template <typename ACC> KK_DEVICE ACC to_acc(kk_bf16 x) { return static_cast<ACC>(kk_to_float(x)); }

template <typename T>
struct FromAcc {
  template <typename ACC>
  KK_DEVICE static T cvt(ACC v) { return static_cast<T>(v); }
};
template <>
struct FromAcc<kk_half> {
  template <typename ACC>
  KK_DEVICE static kk_half cvt(ACC v) { return kk_half_from_float(static_cast<float>(v)); }
};
template <>
struct FromAcc<kk_bf16> {
  template <typename ACC>
  KK_DEVICE static kk_bf16 cvt(ACC v) { return kk_bf16_from_float(static_cast<float>(v)); }
};
template <typename T, typename ACC>
KK_DEVICE T from_acc(ACC v) { return FromAcc<T>::cvt(v); }

template <typename ACC, typename T>
KK_DEVICE ACC ld(const T* p) { return to_acc<ACC>(*p); }

// Loads / stores of an array whose dtype is known only at run time (epilogues: one switch
// per element, uniform across the grid).
template <typename ACC>
KK_DEVICE ACC ld_dyn(const void* p, KKType t, int64_t i) {
  switch (t) {
    case KKType::F32: return ld<ACC>(static_cast<const float*>(p) + i);
    case KKType::F64: return ld<ACC>(static_cast<const double*>(p) + i);
    case KKType::F16: return ld<ACC>(static_cast<const kk_half*>(p) + i);
    default: return ld<ACC>(static_cast<const kk_bf16*>(p) + i);
  }
}
template <typename ACC>
KK_DEVICE void st_dyn(void* p, KKType t, int64_t i, ACC v) {
  switch (t) {
    case KKType::F32: static_cast<float*>(p)[i] = from_acc<float>(v); break;
    case KKType::F64: static_cast<double*>(p)[i] = from_acc<double>(v); break;
    case KKType::F16: static_cast<kk_half*>(p)[i] = from_acc<kk_half>(v); break;
    default: static_cast<kk_bf16*>(p)[i] = from_acc<kk_bf16>(v); break;
  }
}

// Four consecutive elements moved as one access: 128 bits for float32, 2 x 128 for float64,
// 64 for the 16-bit types. Used only where the base pointer is aligned to the vector.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};
template <typename T>
KK_DEVICE bool aligned4(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Vec4<T>) == 0;
}
template <typename T>
KK_DEVICE Vec4<T> load4(const T* p) {
  kk_check_aligned(p, sizeof(Vec4<T>), "load4");
  return *reinterpret_cast<const Vec4<T>*>(p);
}
template <typename T>
KK_DEVICE void store4(T* p, const Vec4<T>& v) {
  kk_check_aligned(p, sizeof(Vec4<T>), "store4");
  *reinterpret_cast<Vec4<T>*>(p) = v;
}

KK_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Sum over the 32 lanes of a warp; every lane ends with the same bits (xor butterfly:
// lanes i and i^s add the same two numbers).
template <typename T>
KK_DEVICE T warp_sum(T v) {
  for (int s = 16; s > 0; s >>= 1) v += kk_shfl_xor(v, s);
  return v;
}

// Sum over the block; `red` is block-shared with kWarps entries. Every thread gets the
// result. Must be reached by every thread of the block.
KK_DEVICE double block_sum(double v, double* red) {
  v = warp_sum(v);
  const int tid = kk_tid();
  if (tid % 32 == 0) red[tid / 32] = v;
  kk_sync();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

// Pair (j, j2), j <= j2 < B, of the row-major upper triangle, and back.
KK_DEVICE void pair_of(int64_t p, int64_t b, int64_t& j, int64_t& j2) {
  j = 0;
  int64_t rem = p;
  while (rem >= b - j) {
    rem -= b - j;
    ++j;
  }
  j2 = j + rem;
}
KK_DEVICE int64_t pair_index(int64_t j, int64_t j2, int64_t b) {
  return j * b - j * (j - 1) / 2 + (j2 - j);
}

// The epilogue of the fused updates: element i of the target gets u = (H^T coef)_i and
// d = diag(H^T F^T F H)_i. Either the in-place update (param += P- u; cov = rule(P-, d))
// or, for the step terms, u and d stored as they are.
template <typename ACC>
KK_DEVICE void finish_element(const Target& t, int64_t i, ACC u, ACC d) {
  if (t.param == nullptr) {
    static_cast<ACC*>(t.u)[i] = u;
    static_cast<ACC*>(t.d)[i] = d;
    return;
  }
  const ACC one = ACC(1), lo = static_cast<ACC>(t.hyper.lo), hi = static_cast<ACC>(t.hyper.hi);
  const ACC p = km::predict(ld_dyn<ACC>(t.cov, t.cov_t, i), static_cast<ACC>(t.hyper.inv_lam),
                            static_cast<ACC>(t.hyper.q));
  const ACC w = km::mean_step(ld_dyn<ACC>(t.param, t.param_t, i), p, u);
  const ACC c = t.hyper.information ? km::cov_rule<true>(p, d, one, lo, hi)
                                    : km::cov_rule<false>(p, d, one, lo, hi);
  st_dyn<ACC>(t.param, t.param_t, i, w);
  st_dyn<ACC>(t.cov, t.cov_t, i, c);
}

KK_DEVICE bool skip(const bool* ok) { return ok != nullptr && !*ok; }

// ---------------------------------------------------------------------------------------
// innovation_cov_dense: S = H diag(P-) H^T
// ---------------------------------------------------------------------------------------
// Column chunks; each block writes the upper triangle of its chunk's m x m partial sum
// (float64) to partial[chunk]; innov_finalize sums the chunks in order and mirrors.

// m <= MAXM (small m, memory bound): a thread walks the chunk's columns with all
// MAXM (MAXM + 1) / 2 products in registers.
template <typename T, typename ACC, int MAXM>
KK_GLOBAL void innov_dense_small_kernel(const T* jac, int64_t ldh, int m, int64_t n,
                                        const ACC* cov, ACC inv_lam, ACC q, int64_t cols,
                                        double* partial) {
  constexpr int NP = MAXM * (MAXM + 1) / 2;
  KK_SHARED(double, red, [kWarps][NP]);
  const int tid = kk_tid();
  const int64_t chunk = kk_bid_x();
  const int64_t c0 = chunk * cols, c1 = min64(n, c0 + cols);
  ACC acc[NP];
#pragma unroll
  for (int p = 0; p < NP; ++p) acc[p] = ACC(0);
  for (int64_t i = c0 + tid; i < c1; i += kThreads) {
    const ACC p = km::predict(cov[i], inv_lam, q);
    ACC h[MAXM];
#pragma unroll
    for (int r = 0; r < MAXM; ++r) h[r] = r < m ? ld<ACC>(jac + r * ldh + i) : ACC(0);
    int k = 0;
#pragma unroll
    for (int r = 0; r < MAXM; ++r) {
      const ACC hp = h[r] * p;
#pragma unroll
      for (int c = r; c < MAXM; ++c) acc[k++] += hp * h[c];
    }
  }
  const int warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const ACC v = warp_sum(acc[p]);
    if (lane == 0) red[warp][p] = static_cast<double>(v);
  }
  kk_sync();
  for (int p = tid; p < NP; p += kThreads) {
    int r = 0, rem = p;
    while (rem >= MAXM - r) {
      rem -= MAXM - r;
      ++r;
    }
    const int c = r + rem;
    if (c < m) {
      double s = 0.0;
      for (int w = 0; w < kWarps; ++w) s += red[w][p];
      partial[(chunk * m + r) * m + c] = s;
    }
  }
}

// m > 8: one (TM x TM) tile pair (row tile ta <= column tile tb) of S per blockIdx.y,
// staged through shared memory KT columns at a time; a thread owns an MT x MT sub-tile.
template <typename T, typename ACC, int TM>
KK_GLOBAL void innov_dense_tiled_kernel(const T* jac, int64_t ldh, int m, int64_t n,
                                        const ACC* cov, ACC inv_lam, ACC q, int64_t cols,
                                        double* partial) {
  constexpr int KT = 16, MT = TM / 16;
  KK_SHARED(ACC, as, [KT][TM + 4]);
  KK_SHARED(ACC, bs, [KT][TM + 4]);
  const int tid = kk_tid(), ty = tid / 16, tx = tid % 16;
  const int nt = (m + TM - 1) / TM;
  int ta = 0, rem = kk_bid_y();
  while (rem >= nt - ta) {
    rem -= nt - ta;
    ++ta;
  }
  const int a0 = ta * TM, b0 = (ta + rem) * TM;
  const int64_t chunk = kk_bid_x();
  const int64_t c0 = chunk * cols, c1 = min64(n, c0 + cols);
  ACC acc[MT][MT];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j) acc[i][j] = ACC(0);
  for (int64_t i0 = c0; i0 < c1; i0 += KT) {
    for (int e = tid; e < TM * KT; e += kThreads) {
      const int r = e / KT, k = e % KT;
      const int64_t i = i0 + k;
      ACC ha = ACC(0), hb = ACC(0);
      if (i < c1) {
        if (a0 + r < m) ha = ld<ACC>(jac + (a0 + r) * ldh + i) * km::predict(cov[i], inv_lam, q);
        if (b0 + r < m) hb = ld<ACC>(jac + (b0 + r) * ldh + i);
      }
      as[k][r] = ha;
      bs[k][r] = hb;
    }
    kk_sync();
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      ACC av[MT], bv[MT];
#pragma unroll
      for (int i = 0; i < MT; ++i) av[i] = as[k][ty * MT + i];
#pragma unroll
      for (int j = 0; j < MT; ++j) bv[j] = bs[k][tx * MT + j];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < MT; ++j) acc[i][j] += av[i] * bv[j];
    }
    kk_sync();
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const int r = a0 + ty * MT + i, c = b0 + tx * MT + j;
      if (r < m && c < m && r <= c) {
        partial[(chunk * m + r) * m + c] = static_cast<double>(acc[i][j]);
      }
    }
  }
}

// out[r, c] = out[c, r] = sum over chunks, in chunk order, of partial[chunk, r, c] (r <= c).
KK_GLOBAL void innov_finalize_kernel(const double* partial, int64_t nchunks, int64_t m,
                                     double* out) {
  const int64_t idx = static_cast<int64_t>(kk_bid_x()) * kThreads + kk_tid();
  if (idx >= m * m) return;
  const int64_t r = idx / m, c = idx % m;
  if (r > c) return;
  double s = 0.0;
  for (int64_t k = 0; k < nchunks; ++k) s += partial[k * m * m + idx];
  out[r * m + c] = s;
  out[c * m + r] = s;
}

// ---------------------------------------------------------------------------------------
// fused_update_dense_ / step_terms_dense: u = H^T coef, d = column sums of (F H)^2
// ---------------------------------------------------------------------------------------
struct DenseArgs {
  const void* jac;
  int64_t ld;
  int m;
  int64_t n;
  const double* coef;
  int64_t cs;
  const double* w;
  int64_t ws0, ws1;
  Target tgt;
};

// m <= MAXM <= 32: a thread per column with the column's m Jacobian entries in registers;
// F (zero padded to MAXM x MAXM) and coef in shared memory, read as warp broadcasts.
template <typename T, typename ACC, int MAXM>
KK_GLOBAL void dense_small_kernel(DenseArgs a) {
  if (skip(a.tgt.ok)) return;
  KK_SHARED(ACC, fs, [MAXM][MAXM]);
  KK_SHARED(ACC, cs, [MAXM]);
  const int tid = kk_tid(), m = a.m;
  for (int e = tid; e < MAXM * MAXM; e += kThreads) {
    const int r = e / MAXM, c = e % MAXM;
    fs[r][c] = (r < m && c < m) ? static_cast<ACC>(a.w[r * a.ws0 + c * a.ws1]) : ACC(0);
  }
  for (int e = tid; e < MAXM; e += kThreads) {
    cs[e] = e < m ? static_cast<ACC>(a.coef[e * a.cs]) : ACC(0);
  }
  kk_sync();
  const T* jac = static_cast<const T*>(a.jac);
  const int64_t stride = static_cast<int64_t>(kk_grid_x()) * kThreads;
  for (int64_t i = static_cast<int64_t>(kk_bid_x()) * kThreads + tid; i < a.n; i += stride) {
    ACC h[MAXM];
#pragma unroll
    for (int l = 0; l < MAXM; ++l) h[l] = l < m ? ld<ACC>(jac + l * a.ld + i) : ACC(0);
    ACC u = ACC(0);
#pragma unroll
    for (int l = 0; l < MAXM; ++l) u += cs[l] * h[l];
    ACC d = ACC(0);
    for (int r = 0; r < m; ++r) {
      ACC g = ACC(0);
#pragma unroll
      for (int l = 0; l < MAXM; ++l) g += fs[r][l] * h[l];
      d += g * g;
    }
    finish_element<ACC>(a.tgt, i, u, d);
  }
}

// m > 32: a block owns TN columns; G = F H for them is computed RT rows at a time as a
// shared-memory tiled product (KT-deep stages, a 4 x 4 sub-tile per thread) and squared
// into the column sums in registers; the 16 row groups are summed in order at the end.
template <typename T, typename ACC>
KK_GLOBAL void dense_tiled_kernel(DenseArgs a) {
  if (skip(a.tgt.ok)) return;
  constexpr int TN = 64, RT = 64, KT = 16;
  KK_SHARED(ACC, fs, [KT][RT + 4]);
  KK_SHARED(ACC, hs, [KT][TN + 4]);
  KK_SHARED(ACC, cs, [KT]);
  KK_SHARED(ACC, red, [16][TN]);
  KK_SHARED(ACC, us, [TN]);
  const int tid = kk_tid(), ty = tid / 16, tx = tid % 16, m = a.m;
  const int64_t c0 = static_cast<int64_t>(kk_bid_x()) * TN;
  const T* jac = static_cast<const T*>(a.jac);
  ACC dpart[4], upart[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) dpart[j] = upart[j] = ACC(0);
  for (int r0 = 0; r0 < m; r0 += RT) {
    ACC acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = ACC(0);
    for (int l0 = 0; l0 < m; l0 += KT) {
      for (int e = tid; e < RT * KT; e += kThreads) {
        const int r = e / KT, l = e % KT;
        fs[l][r] = (r0 + r < m && l0 + l < m)
                       ? static_cast<ACC>(a.w[(r0 + r) * a.ws0 + (l0 + l) * a.ws1])
                       : ACC(0);
      }
      for (int e = tid; e < KT * TN; e += kThreads) {
        const int l = e / TN, c = e % TN;
        hs[l][c] = (l0 + l < m && c0 + c < a.n) ? ld<ACC>(jac + (l0 + l) * a.ld + c0 + c)
                                                : ACC(0);
      }
      if (tid < KT) cs[tid] = (l0 + tid < m) ? static_cast<ACC>(a.coef[(l0 + tid) * a.cs]) : ACC(0);
      kk_sync();
      if (r0 == 0 && ty == 0) {
#pragma unroll
        for (int l = 0; l < KT; ++l)
#pragma unroll
          for (int j = 0; j < 4; ++j) upart[j] += cs[l] * hs[l][tx * 4 + j];
      }
#pragma unroll
      for (int l = 0; l < KT; ++l) {
        ACC fv[4], hv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) fv[i] = fs[l][ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) hv[j] = hs[l][tx * 4 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += fv[i] * hv[j];
      }
      kk_sync();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) dpart[j] += acc[i][j] * acc[i][j];
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) red[ty][tx * 4 + j] = dpart[j];
  if (ty == 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) us[tx * 4 + j] = upart[j];
  }
  kk_sync();
  if (tid < TN && c0 + tid < a.n) {
    ACC d = ACC(0);
    for (int g = 0; g < 16; ++g) d += red[g][tid];
    finish_element<ACC>(a.tgt, c0 + tid, us[tid], d);
  }
}

// ---------------------------------------------------------------------------------------
// Kronecker blocks (sample-grouped): A (B, d_in), D (B, K, d_out), pairs p = (j, j2), j <= j2
// ---------------------------------------------------------------------------------------
struct KronIn {
  const void* a;
  int64_t lda;
  const void* d;
  int64_t sd0, sd1;
  int64_t b, k, d_out, d_in;
};

// Q[split, p, o] = sum over the split's inputs i of A[j, i] A[j2, i] P-[o, i]: a tiled
// product of the pair products (formed while staging) with P- (formed while staging).
template <typename T, typename ACC>
KK_GLOBAL void kron_q_kernel(KronIn in, const ACC* cov, ACC inv_lam, ACC q, int64_t npairs,
                             int64_t split, ACC* qpart) {
  constexpr int TP = 64, TO = 64, KT = 16;
  KK_SHARED(ACC, aps, [KT][TP + 4]);
  KK_SHARED(ACC, ps, [KT][TO + 4]);
  KK_SHARED(int64_t, pj, [TP]);
  KK_SHARED(int64_t, pj2, [TP]);
  const int tid = kk_tid(), ty = tid / 16, tx = tid % 16;
  const int64_t p0 = static_cast<int64_t>(kk_bid_x()) * TP;
  const int64_t o0 = static_cast<int64_t>(kk_bid_y()) * TO;
  const int64_t s = kk_bid_z();
  const int64_t ib = s * split, ie = min64(in.d_in, ib + split);
  if (tid < TP) {
    int64_t j = -1, j2 = -1;
    if (p0 + tid < npairs) pair_of(p0 + tid, in.b, j, j2);
    pj[tid] = j;
    pj2[tid] = j2;
  }
  kk_sync();
  const T* A = static_cast<const T*>(in.a);
  ACC acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = ACC(0);
  for (int64_t i0 = ib; i0 < ie; i0 += KT) {
    for (int e = tid; e < TP * KT; e += kThreads) {
      const int pp = e / KT, k = e % KT;
      const int64_t i = i0 + k;
      ACC v = ACC(0);
      if (pj[pp] >= 0 && i < ie) {
        v = ld<ACC>(A + pj[pp] * in.lda + i) * ld<ACC>(A + pj2[pp] * in.lda + i);
      }
      aps[k][pp] = v;
    }
    for (int e = tid; e < TO * KT; e += kThreads) {
      const int o = e / KT, k = e % KT;
      const int64_t i = i0 + k;
      ps[k][o] = (o0 + o < in.d_out && i < ie)
                     ? km::predict(cov[(o0 + o) * in.d_in + i], inv_lam, q)
                     : ACC(0);
    }
    kk_sync();
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      ACC av[4], pv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = aps[k][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) pv[j] = ps[k][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * pv[j];
    }
    kk_sync();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t p = p0 + ty * 4 + i, o = o0 + tx * 4 + j;
      if (p < npairs && o < in.d_out) qpart[(s * npairs + p) * in.d_out + o] = acc[i][j];
    }
  }
}

// out[idx] = sum over splits, in order, of part[split, idx].
template <typename ACC>
KK_GLOBAL void sum_splits_kernel(const ACC* part, int64_t nsplit, int64_t count, ACC* out) {
  const int64_t idx = static_cast<int64_t>(kk_bid_x()) * kThreads + kk_tid();
  if (idx >= count) return;
  ACC s = ACC(0);
  for (int64_t k = 0; k < nsplit; ++k) s += part[k * count + idx];
  out[idx] = s;
}

// One block per pair (j, j2): the K x K block S[(j, k), (j2, k2)] =
// sum_o D[j, k, o] D[j2, k2, o] Q[p, o]; a warp per entry, lanes over o, written mirrored.
template <typename T, typename ACC>
KK_GLOBAL void kron_s_kernel(KronIn in, const ACC* qv, double* out) {
  const int tid = kk_tid(), warp = tid / 32, lane = tid % 32;
  const int64_t p = kk_bid_x();
  int64_t j, j2;
  pair_of(p, in.b, j, j2);
  const int64_t K = in.k, m = in.b * in.k;
  const T* D = static_cast<const T*>(in.d);
  const ACC* qrow = qv + p * in.d_out;
  for (int64_t e = warp; e < K * K; e += kWarps) {
    const int64_t k = e / K, k2 = e % K;
    if (j == j2 && k > k2) continue;  // warp-uniform
    const T* dj = D + j * in.sd0 + k * in.sd1;
    const T* dj2 = D + j2 * in.sd0 + k2 * in.sd1;
    ACC acc = ACC(0);
    for (int64_t o = lane; o < in.d_out; o += 32) acc += (ld<ACC>(dj + o) * ld<ACC>(dj2 + o)) * qrow[o];
    acc = warp_sum(acc);
    if (lane == 0) {
      const int64_t r = j * K + k, c = j2 * K + k2;
      out[r * m + c] = static_cast<double>(acc);
      out[c * m + r] = static_cast<double>(acc);
    }
  }
}

// For the fused Kronecker update. Gp[p, o] = c_p sum_{k,k2} W[(j,k),(j2,k2)] D[j,k,o] D[j2,k2,o]
// with c_p = 1 on the diagonal (j = j2), 2 off it (G is symmetric in (j, j2)); and, on the
// diagonal pairs, Dc[j, o] = sum_k coef[j, k] D[j, k, o]. A thread per (p, o).
template <typename T, typename ACC>
KK_GLOBAL void kron_gram_kernel(KronIn in, const double* gram, const double* coef, ACC* gp,
                                ACC* dc) {
  const int64_t p = kk_bid_x();
  const int64_t o = static_cast<int64_t>(kk_bid_y()) * kThreads + kk_tid();
  if (o >= in.d_out) return;
  int64_t j, j2;
  pair_of(p, in.b, j, j2);
  const int64_t K = in.k, m = in.b * in.k;
  const T* D = static_cast<const T*>(in.d);
  ACC g = ACC(0);
  for (int64_t k = 0; k < K; ++k) {
    const double* wrow = gram + (j * K + k) * m + j2 * K;
    ACC s = ACC(0);
    for (int64_t k2 = 0; k2 < K; ++k2) {
      s += static_cast<ACC>(wrow[k2]) * ld<ACC>(D + j2 * in.sd0 + k2 * in.sd1 + o);
    }
    g += ld<ACC>(D + j * in.sd0 + k * in.sd1 + o) * s;
  }
  gp[p * in.d_out + o] = (j == j2) ? g : ACC(2) * g;
  if (j == j2) {
    ACC c = ACC(0);
    for (int64_t k = 0; k < K; ++k) {
      c += static_cast<ACC>(coef[j * K + k]) * ld<ACC>(D + j * in.sd0 + k * in.sd1 + o);
    }
    dc[j * in.d_out + o] = c;
  }
}

// The fused Kronecker update over a TO x TI tile of the (d_out, d_in) weight:
//   d[o, i] = sum_j A[j, i] sum_{j2 >= j} Gp[(j, j2), o] A[j2, i]
//   u[o, i] = sum_j Dc[j, o] A[j, i]
// (GEMM-shaped, inner dimension B (B + 1) / 2 + B), then the elementwise epilogue.
template <typename T, typename ACC>
KK_GLOBAL void kron_update_kernel(KronIn in, const ACC* gp, const ACC* dc, Target tgt) {
  if (skip(tgt.ok)) return;
  constexpr int TO = 64, TI = 64, JC = 16;
  KK_SHARED(ACC, gs, [JC][TO + 4]);
  KK_SHARED(ACC, as, [JC][TI + 4]);
  KK_SHARED(ACC, ds, [TO]);
  const int tid = kk_tid(), ty = tid / 16, tx = tid % 16;
  const int64_t i0 = static_cast<int64_t>(kk_bid_x()) * TI;
  const int64_t o0 = static_cast<int64_t>(kk_bid_y()) * TO;
  const int64_t B = in.b;
  const T* A = static_cast<const T*>(in.a);
  ACC accd[4][4], accu[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) accd[a][b] = accu[a][b] = ACC(0);
  for (int64_t j = 0; j < B; ++j) {
    ACC t[4][4], aj[4], dcj[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      aj[a] = dcj[a] = ACC(0);
#pragma unroll
      for (int b = 0; b < 4; ++b) t[a][b] = ACC(0);
    }
    const int64_t pbase = pair_index(j, j, B);
    for (int64_t j20 = j; j20 < B; j20 += JC) {
      for (int e = tid; e < JC * TO; e += kThreads) {
        const int jj = e / TO, o = e % TO;
        gs[jj][o] = (j20 + jj < B && o0 + o < in.d_out)
                        ? gp[(pbase + (j20 - j) + jj) * in.d_out + o0 + o]
                        : ACC(0);
      }
      for (int e = tid; e < JC * TI; e += kThreads) {
        const int jj = e / TI, i = e % TI;
        as[jj][i] = (j20 + jj < B && i0 + i < in.d_in)
                        ? ld<ACC>(A + (j20 + jj) * in.lda + i0 + i)
                        : ACC(0);
      }
      if (j20 == j && tid < TO) {
        ds[tid] = (o0 + tid < in.d_out) ? dc[j * in.d_out + o0 + tid] : ACC(0);
      }
      kk_sync();
      if (j20 == j) {
#pragma unroll
        for (int b = 0; b < 4; ++b) aj[b] = as[0][tx * 4 + b];
#pragma unroll
        for (int a = 0; a < 4; ++a) dcj[a] = ds[ty * 4 + a];
      }
#pragma unroll
      for (int jj = 0; jj < JC; ++jj) {
        ACC gv[4], av[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) gv[a] = gs[jj][ty * 4 + a];
#pragma unroll
        for (int b = 0; b < 4; ++b) av[b] = as[jj][tx * 4 + b];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) t[a][b] += gv[a] * av[b];
      }
      kk_sync();
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        accd[a][b] += t[a][b] * aj[b];
        accu[a][b] += dcj[a] * aj[b];
      }
    }
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t o = o0 + ty * 4 + a, i = i0 + tx * 4 + b;
      if (o < in.d_out && i < in.d_in) finish_element<ACC>(tgt, o * in.d_in + i, accu[a][b], accd[a][b]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// apply_terms_: param += P- * direction ; cov = rule(P-, diag)
// ---------------------------------------------------------------------------------------
template <typename ACC, typename P, typename C, typename TT>
KK_DEVICE void apply_one(P& p, C& c, TT dir, TT diag, const Update& u) {
  const ACC one = ACC(1), lo = static_cast<ACC>(u.lo), hi = static_cast<ACC>(u.hi);
  const ACC pp = km::predict(to_acc<ACC>(c), static_cast<ACC>(u.inv_lam), static_cast<ACC>(u.q));
  const ACC d = to_acc<ACC>(diag);
  p = from_acc<P>(km::mean_step(to_acc<ACC>(p), pp, to_acc<ACC>(dir)));
  c = from_acc<C>(u.information ? km::cov_rule<true>(pp, d, one, lo, hi)
                                : km::cov_rule<false>(pp, d, one, lo, hi));
}

template <typename P, typename C, typename TT, typename ACC>
KK_GLOBAL void apply_terms_kernel(P* param, C* cov, const TT* dir, const TT* diag, int64_t n,
                                  const bool* ok, Update u) {
  if (skip(ok)) return;
  const int64_t stride = static_cast<int64_t>(kk_grid_x()) * kThreads;
  const int64_t first = static_cast<int64_t>(kk_bid_x()) * kThreads + kk_tid();
  int64_t done = 0;
  if (aligned4<P>(param) && aligned4<C>(cov) && aligned4<TT>(dir) && aligned4<TT>(diag)) {
    const int64_t nv = n / 4;
    for (int64_t v = first; v < nv; v += stride) {
      Vec4<P> pv = load4(param + 4 * v);
      Vec4<C> cv = load4(cov + 4 * v);
      const Vec4<TT> dv = load4(dir + 4 * v), gv = load4(diag + 4 * v);
#pragma unroll
      for (int e = 0; e < 4; ++e) apply_one<ACC>(pv.v[e], cv.v[e], dv.v[e], gv.v[e], u);
      store4(param + 4 * v, pv);
      store4(cov + 4 * v, cv);
    }
    done = nv * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) apply_one<ACC>(param[i], cov[i], dir[i], diag[i], u);
}

// ---------------------------------------------------------------------------------------
// Loss-observation mode: multi-tensor kernels (one launch per phase for up to kMaxTensors
// tensors, as apex's multi_tensor_apply: the tensor list travels in the kernel arguments,
// so a launch is self-contained and can be captured in a CUDA graph)
// ---------------------------------------------------------------------------------------
constexpr int kMaxTensors = 96;

template <int NL>
struct TensorList {
  const void* ptr[NL][kMaxTensors];
  int64_t numel[kMaxTensors];
  int block_start[kMaxTensors + 1];  // blocks of tensor t: [block_start[t], block_start[t+1])
  int count;
};
static_assert(sizeof(TensorList<3>) + 128 <= 4096, "kernel arguments must stay under 4 KB");

// The tensor of block b (block_start is increasing; binary search).
template <int NL>
KK_DEVICE int tensor_of(const TensorList<NL>& tl, int b) {
  int lo = 0, hi = tl.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tl.block_start[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// partial[b] = this block's chunk sum of g^2 P- (terms in ACC, summed in float64).
template <typename G, typename C, typename ACC>
KK_GLOBAL void quad_kernel(TensorList<2> tl, ACC inv_lam, ACC q, double* partial) {
  KK_SHARED(double, red, [kWarps]);
  const int tid = kk_tid(), b = kk_bid_x();
  const int t = tensor_of(tl, b);
  const int64_t start = static_cast<int64_t>(b - tl.block_start[t]) * kLossChunk;
  const int64_t end = min64(tl.numel[t], start + kLossChunk);
  const G* g = static_cast<const G*>(tl.ptr[0][t]);
  const C* c = static_cast<const C*>(tl.ptr[1][t]);
  double acc = 0.0;
  int64_t rest = start;
  if (aligned4<G>(g) && aligned4<C>(c)) {
    const int64_t vend = start + (end - start) / 4 * 4;
    for (int64_t v = start + 4 * tid; v < vend; v += 4 * kThreads) {
      const Vec4<G> gv = load4(g + v);
      const Vec4<C> cv = load4(c + v);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc += static_cast<double>(km::quad_term(to_acc<ACC>(gv.v[e]), to_acc<ACC>(cv.v[e]), inv_lam, q));
      }
    }
    rest = vend;
  }
  for (int64_t i = rest + tid; i < end; i += kThreads) {
    acc += static_cast<double>(km::quad_term(ld<ACC>(g + i), ld<ACC>(c + i), inv_lam, q));
  }
  const double total = block_sum(acc, red);
  if (tid == 0) partial[b] = total;
}

// out[0] = sum of partial[0 .. count) in a fixed order (one block).
KK_GLOBAL void sum_partials_kernel(const double* partial, int64_t count, double* out) {
  KK_SHARED(double, red, [kWarps]);
  double acc = 0.0;
  for (int64_t i = kk_tid(); i < count; i += kThreads) acc += partial[i];
  const double total = block_sum(acc, red);
  if (kk_tid() == 0) out[0] = total;
}

template <typename ACC, typename P, typename C>
KK_DEVICE void loss_one(P& p, C& c, P g, ACC coef, ACC weight, ACC inv_lam, ACC q, ACC lo,
                        ACC hi, bool information) {
  ACC pa = to_acc<ACC>(p), ca = to_acc<ACC>(c);
  const ACC ga = to_acc<ACC>(g);
  if (information) {
    km::loss_update<true>(pa, ca, ga, coef, weight, inv_lam, q, ACC(1), lo, hi);
  } else {
    km::loss_update<false>(pa, ca, ga, coef, weight, inv_lam, q, ACC(1), lo, hi);
  }
  p = from_acc<P>(pa);
  c = from_acc<C>(ca);
}

// In place, when *ok: param += coef P- g ; cov = rule(P-, weight g^2), one chunk per block.
template <typename P, typename C, typename ACC>
KK_GLOBAL void loss_step_kernel(TensorList<3> tl, const double* coef_p, const double* weight_p,
                                const bool* ok, Update u) {
  if (skip(ok)) return;
  const ACC coef = static_cast<ACC>(*coef_p), weight = static_cast<ACC>(*weight_p);
  const ACC inv_lam = static_cast<ACC>(u.inv_lam), q = static_cast<ACC>(u.q);
  const ACC lo = static_cast<ACC>(u.lo), hi = static_cast<ACC>(u.hi);
  const int tid = kk_tid(), b = kk_bid_x();
  const int t = tensor_of(tl, b);
  const int64_t start = static_cast<int64_t>(b - tl.block_start[t]) * kLossChunk;
  const int64_t end = min64(tl.numel[t], start + kLossChunk);
  P* p = static_cast<P*>(const_cast<void*>(tl.ptr[0][t]));
  const P* g = static_cast<const P*>(tl.ptr[1][t]);
  C* c = static_cast<C*>(const_cast<void*>(tl.ptr[2][t]));
  int64_t rest = start;
  if (aligned4<P>(p) && aligned4<P>(g) && aligned4<C>(c)) {
    const int64_t vend = start + (end - start) / 4 * 4;
    for (int64_t v = start + 4 * tid; v < vend; v += 4 * kThreads) {
      Vec4<P> pv = load4(p + v);
      const Vec4<P> gv = load4(g + v);
      Vec4<C> cv = load4(c + v);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        loss_one<ACC>(pv.v[e], cv.v[e], gv.v[e], coef, weight, inv_lam, q, lo, hi, u.information);
      }
      store4(p + v, pv);
      store4(c + v, cv);
    }
    rest = vend;
  }
  for (int64_t i = rest + tid; i < end; i += kThreads) {
    loss_one<ACC>(p[i], c[i], g[i], coef, weight, inv_lam, q, lo, hi, u.information);
  }
}

// ---------------------------------------------------------------------------------------
// Host side: dtype dispatch, grid sizes, workspaces
// ---------------------------------------------------------------------------------------
template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}, Tag<ACC>{}) for the input dtype: float64 inputs accumulate in float64,
// the others in float32 (acc64 requires float64 inputs: the operator layer converts).
template <typename F>
void dispatch_in(KKType t, bool acc64, F&& f) {
  if (acc64 != (t == KKType::F64)) {
    throw std::runtime_error("kalman_kernels cuda: internal error: float64 accumulation needs "
                             "float64 inputs");
  }
  switch (t) {
    case KKType::F32: f(Tag<float>{}, Tag<float>{}); break;
    case KKType::F64: f(Tag<double>{}, Tag<double>{}); break;
    case KKType::F16: f(Tag<kk_half>{}, Tag<float>{}); break;
    case KKType::BF16: f(Tag<kk_bf16>{}, Tag<float>{}); break;
  }
}

template <typename F>
void dispatch_any(KKType t, F&& f) {
  switch (t) {
    case KKType::F32: f(Tag<float>{}); break;
    case KKType::F64: f(Tag<double>{}); break;
    case KKType::F16: f(Tag<kk_half>{}); break;
    case KKType::BF16: f(Tag<kk_bf16>{}); break;
  }
}

template <typename F>
void dispatch_cov(KKType t, F&& f) {  // covariances and step terms: float32 or float64
  switch (t) {
    case KKType::F32: f(Tag<float>{}); break;
    case KKType::F64: f(Tag<double>{}); break;
    default: throw std::runtime_error("kalman_kernels cuda: covariances must be float32 or float64");
  }
}

template <typename A, typename B, typename C = float>
using Acc3 = typename std::conditional<std::is_same<A, double>::value ||
                                           std::is_same<B, double>::value ||
                                           std::is_same<C, double>::value,
                                       double, float>::type;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

KkDim3 make_grid(int64_t x, int64_t y = 1, int64_t z = 1) {
  if (x < 1 || y < 1 || z < 1 || x > 2147483647LL || y > 65535 || z > 65535) {
    throw std::runtime_error("kalman_kernels cuda: problem too large for one launch (grid " +
                             std::to_string(x) + " x " + std::to_string(y) + " x " +
                             std::to_string(z) + ")");
  }
  KkDim3 g;
  g.x = static_cast<unsigned>(x);
  g.y = static_cast<unsigned>(y);
  g.z = static_cast<unsigned>(z);
  return g;
}

template <typename T>
T* ws_get(Workspace& ws, int64_t count) {
  return static_cast<T*>(ws.get(static_cast<size_t>(count > 0 ? count : 1) * sizeof(T)));
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The launchers of launch.h
// ---------------------------------------------------------------------------------------
void innovation_dense(KKType jt, const void* jac, int64_t ld, int64_t m, int64_t n, const void* cov,
                      bool acc64, double inv_lam, double q, double* out, Workspace& ws,
                      const Launch& l) {
  if (m == 0) return;
  dispatch_in(jt, acc64, [&](auto tt, auto ta) {
    using T = typename decltype(tt)::type;
    using ACC = typename decltype(ta)::type;
    const T* h = static_cast<const T*>(jac);
    const ACC* c = static_cast<const ACC*>(cov);
    const int tm = m <= 8 ? 0 : (m <= 32 ? 32 : 64);
    const int64_t nt = tm == 0 ? 1 : ceil_div(m, tm);
    const int64_t npairs = nt * (nt + 1) / 2;
    const int64_t target = 4 * static_cast<int64_t>(l.sms);
    const int64_t min_cols = tm == 0 ? 2048 : 256;
    int64_t nchunks = std::max<int64_t>(1, std::min(ceil_div(n, min_cols), ceil_div(target, npairs)));
    // at most 64 MB of partial sums
    nchunks = std::max<int64_t>(1, std::min(nchunks, (int64_t(64) << 20) / (8 * m * m)));
    const int64_t cols = round_up(std::max<int64_t>(1, ceil_div(n, nchunks)), kThreads);
    nchunks = std::max<int64_t>(1, ceil_div(n, cols));
    double* partial = ws_get<double>(ws, nchunks * m * m);
    const int mi = static_cast<int>(m);
    const ACC il = static_cast<ACC>(inv_lam), qq = static_cast<ACC>(q);
    if (tm == 0) {
      auto kernel = m <= 2 ? innov_dense_small_kernel<T, ACC, 2> : innov_dense_small_kernel<T, ACC, 8>;
      kk_launch(kernel, make_grid(nchunks), kThreads, l.stream, h, ld, mi, n, c, il, qq, cols, partial);
    } else {
      auto kernel = tm == 32 ? innov_dense_tiled_kernel<T, ACC, 32> : innov_dense_tiled_kernel<T, ACC, 64>;
      kk_launch(kernel, make_grid(nchunks, npairs), kThreads, l.stream, h, ld, mi, n, c, il, qq, cols,
                partial);
    }
    kk_launch(innov_finalize_kernel, make_grid(ceil_div(m * m, kThreads)), kThreads, l.stream,
              static_cast<const double*>(partial), nchunks, m, out);
  });
}

void innovation_kron(KKType t, const void* a, int64_t lda, const void* d, int64_t sd0, int64_t sd1,
                     int64_t b, int64_t k, int64_t d_out, int64_t d_in, const void* cov,
                     bool acc64, double inv_lam, double q, double* out, Workspace& ws,
                     const Launch& l) {
  if (b == 0 || k == 0 || d_out == 0 || d_in == 0) {
    throw std::runtime_error("kalman_kernels cuda: innovation_kron called with an empty block");
  }
  dispatch_in(t, acc64, [&](auto tt, auto ta) {
    using T = typename decltype(tt)::type;
    using ACC = typename decltype(ta)::type;
    const KronIn in{a, lda, d, sd0, sd1, b, k, d_out, d_in};
    const int64_t npairs = b * (b + 1) / 2;
    const int64_t base = ceil_div(npairs, 64) * ceil_div(d_out, 64);
    int64_t nsplit = std::max<int64_t>(1, std::min(ceil_div(2 * int64_t(l.sms), base), ceil_div(d_in, 256)));
    nsplit = std::min<int64_t>(nsplit, 64);
    const int64_t split = round_up(ceil_div(d_in, nsplit), 16);
    nsplit = ceil_div(d_in, split);
    const int64_t count = npairs * d_out;
    ACC* qpart = ws_get<ACC>(ws, nsplit * count);
    kk_launch(kron_q_kernel<T, ACC>, make_grid(ceil_div(npairs, 64), ceil_div(d_out, 64), nsplit),
              kThreads, l.stream, in, static_cast<const ACC*>(cov), static_cast<ACC>(inv_lam),
              static_cast<ACC>(q), npairs, split, qpart);
    ACC* qsum = qpart;
    if (nsplit > 1) {
      qsum = ws_get<ACC>(ws, count);
      kk_launch(sum_splits_kernel<ACC>, make_grid(ceil_div(count, kThreads)), kThreads, l.stream,
                static_cast<const ACC*>(qpart), nsplit, count, qsum);
    }
    kk_launch(kron_s_kernel<T, ACC>, make_grid(npairs), kThreads, l.stream, in,
              static_cast<const ACC*>(qsum), out);
  });
}

void dense_update(KKType jt, const void* jac, int64_t ld, int64_t m, int64_t n, const double* coef,
                  int64_t cs, const double* whitening, int64_t ws0, int64_t ws1, bool acc64,
                  const Target& target, Workspace& /*ws*/, const Launch& l) {
  if (n == 0) return;
  dispatch_in(jt, acc64, [&](auto tt, auto ta) {
    using T = typename decltype(tt)::type;
    using ACC = typename decltype(ta)::type;
    const DenseArgs args{jac, ld, static_cast<int>(m), n, coef, cs, whitening, ws0, ws1, target};
    if (m <= 32) {
      auto kernel = m <= 2 ? dense_small_kernel<T, ACC, 2>
                           : (m <= 8 ? dense_small_kernel<T, ACC, 8> : dense_small_kernel<T, ACC, 32>);
      const int64_t blocks = std::min(ceil_div(n, kThreads), 8 * int64_t(l.sms));
      kk_launch(kernel, make_grid(blocks), kThreads, l.stream, args);
    } else {
      kk_launch(dense_tiled_kernel<T, ACC>, make_grid(ceil_div(n, 64)), kThreads, l.stream, args);
    }
  });
}

void kron_update(KKType t, const void* a, int64_t lda, const void* d, int64_t sd0, int64_t sd1,
                 int64_t b, int64_t k, int64_t d_out, int64_t d_in, const double* coef,
                 const double* gram, bool acc64, const Target& target, Workspace& ws,
                 const Launch& l) {
  if (d_out == 0 || d_in == 0) return;
  dispatch_in(t, acc64, [&](auto tt, auto ta) {
    using T = typename decltype(tt)::type;
    using ACC = typename decltype(ta)::type;
    const KronIn in{a, lda, d, sd0, sd1, b, k, d_out, d_in};
    const int64_t npairs = b * (b + 1) / 2;
    ACC* gp = ws_get<ACC>(ws, npairs * d_out);
    ACC* dc = ws_get<ACC>(ws, b * d_out);
    if (npairs > 0) {
      kk_launch(kron_gram_kernel<T, ACC>, make_grid(npairs, ceil_div(d_out, kThreads)), kThreads,
                l.stream, in, gram, coef, gp, dc);
    }
    kk_launch(kron_update_kernel<T, ACC>, make_grid(ceil_div(d_in, 64), ceil_div(d_out, 64)),
              kThreads, l.stream, in, static_cast<const ACC*>(gp), static_cast<const ACC*>(dc),
              target);
  });
}

void apply_terms(void* param, KKType pt, void* cov, KKType ct, const void* direction,
                 const void* diag, KKType tt, int64_t n, const bool* ok, const Update& u,
                 const Launch& l) {
  if (n == 0) return;
  dispatch_any(pt, [&](auto ptag) {
    dispatch_cov(ct, [&](auto ctag) {
      dispatch_cov(tt, [&](auto ttag) {
        using P = typename decltype(ptag)::type;
        using C = typename decltype(ctag)::type;
        using TT = typename decltype(ttag)::type;
        using ACC = Acc3<P, C, TT>;
        const int64_t blocks = std::min(ceil_div(n, 4 * kThreads), 16 * int64_t(l.sms));
        kk_launch(apply_terms_kernel<P, C, TT, ACC>, make_grid(blocks), kThreads, l.stream,
                  static_cast<P*>(param), static_cast<C*>(cov), static_cast<const TT*>(direction),
                  static_cast<const TT*>(diag), n, ok, u);
      });
    });
  });
}

namespace {

// Packs the non-empty tensors of `tensors` into tensor lists of at most kMaxTensors and
// calls launch(list, blocks, first block's global index) for each.
template <int NL, typename F>
void for_each_list(const std::vector<LossTensor>& tensors, F&& launch) {
  TensorList<NL> tl{};
  int64_t blocks = 0, offset = 0;
  auto flush = [&]() {
    if (tl.count == 0) return;
    tl.block_start[tl.count] = static_cast<int>(blocks);
    launch(tl, blocks, offset);
    offset += blocks;
    blocks = 0;
    tl = TensorList<NL>{};
  };
  for (const LossTensor& t : tensors) {
    if (t.numel == 0) continue;
    const int64_t chunks = ceil_div(t.numel, kLossChunk);
    if (blocks + chunks > 2147483647LL) {
      throw std::runtime_error("kalman_kernels cuda: loss step too large for one launch");
    }
    const void* ptrs[3] = {t.param, t.grad, t.cov};
    const int first = NL == 3 ? 0 : 1;  // the reduction has no param list
    for (int li = 0; li < NL; ++li) tl.ptr[li][tl.count] = ptrs[first + li];
    tl.numel[tl.count] = t.numel;
    tl.block_start[tl.count] = static_cast<int>(blocks);
    ++tl.count;
    blocks += chunks;
    if (tl.count == kMaxTensors) flush();
  }
  flush();
}

}  // namespace

void loss_quad_form(const std::vector<LossGroup>& groups, double inv_lam, double q, double* out,
                    Workspace& ws, const Launch& l) {
  int64_t total = 0;
  for (const LossGroup& g : groups)
    for (const LossTensor& t : g.tensors) total += ceil_div(t.numel, kLossChunk);
  double* partial = ws_get<double>(ws, total);
  int64_t offset = 0;
  for (const LossGroup& g : groups) {
    dispatch_any(g.grad_t, [&](auto gtag) {
      dispatch_cov(g.cov_t, [&](auto ctag) {
        using G = typename decltype(gtag)::type;
        using C = typename decltype(ctag)::type;
        using ACC = Acc3<G, C>;
        for_each_list<2>(g.tensors, [&](const TensorList<2>& tl, int64_t blocks, int64_t) {
          kk_launch(quad_kernel<G, C, ACC>, make_grid(blocks), kThreads, l.stream, tl,
                    static_cast<ACC>(inv_lam), static_cast<ACC>(q), partial + offset);
          offset += blocks;
        });
      });
    });
  }
  kk_launch(sum_partials_kernel, make_grid(1), kThreads, l.stream,
            static_cast<const double*>(partial), offset, out);
}

void loss_step(const std::vector<LossGroup>& groups, const double* coef, const double* weight,
               const bool* ok, const Update& u, const Launch& l) {
  for (const LossGroup& g : groups) {
    if (g.grad_t != g.param_t) {
      throw std::runtime_error("kalman_kernels cuda: internal error: grad and param dtypes differ");
    }
    dispatch_any(g.param_t, [&](auto ptag) {
      dispatch_cov(g.cov_t, [&](auto ctag) {
        using P = typename decltype(ptag)::type;
        using C = typename decltype(ctag)::type;
        using ACC = Acc3<P, C>;
        for_each_list<3>(g.tensors, [&](const TensorList<3>& tl, int64_t blocks, int64_t) {
          kk_launch(loss_step_kernel<P, C, ACC>, make_grid(blocks), kThreads, l.stream, tl, coef,
                    weight, ok, u);
        });
      });
    });
  }
}

#define KK_STRINGIFY_(...) #__VA_ARGS__
#define KK_STRINGIFY(...) KK_STRINGIFY_(__VA_ARGS__)
const char* compiled_archs() {
#if defined(KK_CUDA_EMULATE)
  return "emulated";
#elif defined(__CUDA_ARCH_LIST__)
  return KK_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

#if defined(KK_CUDA_EMULATE)
}  // namespace emulated
#endif
}  // namespace cuda
}  // namespace kalman_kernels
