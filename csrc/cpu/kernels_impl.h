// The CPU kernels of the cpp backend, written once and compiled once per instruction set.
//
// csrc/cpu/kernels_{default,avx2,avx512}.cpp each include this file, compiled with the
// matching flags and CPU_CAPABILITY macro (see setup.py). at::vec::Vectorized then has the
// width of that instruction set, and everything here lives in the namespace
// kalman_kernels::<CPU_CAPABILITY> (plus an unnamed namespace), so the three copies never
// share a symbol. ops.cpp picks one table at run time.
//
// Structure:
//  * every pass over the parameters is tiled over columns (parameter elements): a tile of
//    the Jacobian (m x B) is packed into a contiguous, zero-padded buffer in the
//    accumulation type (converting bf16/fp16/f32/f64 on the fly), so H is read from
//    memory exactly once per kernel and no m x n temporary exists;
//  * the same tile engine writes the distributed step terms instead of applying them;
//  * sample-grouped Kronecker blocks are GEMMs against pairwise products of the batch's
//    inputs (ops.cpp, MKL through ATen); only their elementwise epilogue lives here;
//  * the elementwise math is kalman_kernels::math (kk_math.h), shared with CUDA.
#pragma once

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (see setup.py)"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kk_kernels.h"
#include "../kk_math.h"

#define KK_CAT2(a, b) a##b
#define KK_CAT(a, b) KK_CAT2(a, b)
#define KK_STR2(a) #a
#define KK_STR(a) KK_STR2(a)

namespace kalman_kernels {
namespace math {
namespace {
// NaN-propagating min / max for the vector types (at::vec::minimum/maximum propagate NaN).
template <typename T>
struct KkMinMax<at::vec::Vectorized<T>> {
  static inline at::vec::Vectorized<T> max(const at::vec::Vectorized<T>& x,
                                           const at::vec::Vectorized<T>& lo) {
    return at::vec::maximum(x, lo);
  }
  static inline at::vec::Vectorized<T> min(const at::vec::Vectorized<T>& x,
                                           const at::vec::Vectorized<T>& hi) {
    return at::vec::minimum(x, hi);
  }
};
}  // namespace
}  // namespace math

namespace CPU_CAPABILITY {
namespace {

template <typename Acc>
using Vec = at::vec::Vectorized<Acc>;

template <typename Acc>
constexpr int64_t kV = Vec<Acc>::size();

// Column groups of the whitening micro-kernel: 4 vectors with 32 vector registers
// (AVX-512), 2 otherwise.
template <typename Acc>
constexpr int kNC = sizeof(Vec<Acc>) >= 64 ? 4 : 2;

template <typename Acc>
constexpr int64_t kUnit = kV<Acc> * kNC<Acc>;  // tiles are padded to a multiple of this

constexpr int kRB = 4;  // rows per register block

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return divup(a, b) * b; }

template <typename Acc>
constexpr KKType acc_kktype() {
  return std::is_same<Acc, double>::value ? KKType::F64 : KKType::F32;
}

// ---------------------------------------------------------------------------------------
// Staging: storage dtype <-> accumulation type
// ---------------------------------------------------------------------------------------
template <typename Acc>
inline void to_acc(const void* src, KKType t, int64_t off, int64_t n, Acc* dst) {
  switch (t) {
    case KKType::F32:
      at::vec::convert(static_cast<const float*>(src) + off, dst, n);
      break;
    case KKType::F64:
      at::vec::convert(static_cast<const double*>(src) + off, dst, n);
      break;
    case KKType::BF16:
      at::vec::convert(static_cast<const c10::BFloat16*>(src) + off, dst, n);
      break;
    case KKType::F16:
      at::vec::convert(static_cast<const c10::Half*>(src) + off, dst, n);
      break;
  }
}

template <typename Acc>
inline void from_acc(const Acc* src, void* dst, KKType t, int64_t off, int64_t n) {
  switch (t) {
    case KKType::F32:
      at::vec::convert(src, static_cast<float*>(dst) + off, n);
      break;
    case KKType::F64:
      at::vec::convert(src, static_cast<double*>(dst) + off, n);
      break;
    case KKType::BF16:
      at::vec::convert(src, static_cast<c10::BFloat16*>(dst) + off, n);
      break;
    case KKType::F16:
      at::vec::convert(src, static_cast<c10::Half*>(dst) + off, n);
      break;
  }
}

// The elements [off, off + n) as Acc: the storage itself when it already is Acc (no
// copy; results may then be written in place), else a converted copy in buf.
template <typename Acc>
inline Acc* stage(const void* src, KKType t, int64_t off, int64_t n, Acc* buf) {
  if (t == acc_kktype<Acc>()) {
    return const_cast<Acc*>(static_cast<const Acc*>(src)) + off;
  }
  to_acc<Acc>(src, t, off, n, buf);
  return buf;
}

// Write back a staged array (no-op when the storage was used directly).
template <typename Acc>
inline void unstage(const Acc* staged, void* dst, KKType t, int64_t off, int64_t n) {
  if (t != acc_kktype<Acc>()) from_acc<Acc>(staged, dst, t, off, n);
}

template <typename Acc>
inline double hsum(const Vec<Acc>& v) {
  return static_cast<double>(
      at::vec::vec_reduce_all<Acc>([](Vec<Acc>& x, Vec<Acc>& y) { return x + y; }, v));
}

// Columns per tile: the packed tile (m x B in Acc) stays in L2, and there are up to
// kMaxGroups tiles to share out. Independent of the thread count, so results are too.
constexpr int64_t kMaxGroups = 16;

template <typename Acc>
int64_t tile_cols(int64_t m, int64_t n) {
  const int64_t unit = kUnit<Acc>;
  int64_t b = (128 * 1024) / (static_cast<int64_t>(sizeof(Acc)) * std::max<int64_t>(m, 1));
  b = std::min<int64_t>(std::max<int64_t>(b, 512), 8192);
  b = std::min(b, round_up(divup(n, kMaxGroups), unit));
  return std::max(round_up(b, unit), unit);
}

// Work below this many multiply-adds runs on the calling thread (waking a second thread
// costs more, and on a shared machine a preempted thread stalls the whole region).
constexpr int64_t kParallelWork = int64_t(1) << 23;

// Items [0, items) claimed one at a time by the threads of one parallel region, so a
// thread the OS preempts does not hold back work it has not started. Each thread builds
// its scratch once (make_scratch()); fn(item, scratch) does one item.
template <typename MakeScratch, typename Fn>
void run_items(int64_t items, bool parallel, const MakeScratch& make_scratch, const Fn& fn) {
  if (items <= 0) return;
  const int64_t threads =
      parallel ? std::min<int64_t>(items, std::max(1, at::get_num_threads())) : 1;
  if (threads <= 1 || at::in_parallel_region()) {
    auto scratch = make_scratch();
    for (int64_t i = 0; i < items; ++i) fn(i, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) fn(i, scratch);
  });
}

// ---------------------------------------------------------------------------------------
// Tile packers: write rows 0..m-1 of columns [c0, c0 + len) of H into buf (row stride ldb)
// in Acc, zero-padded up to lenp.
// ---------------------------------------------------------------------------------------
// A packer returns the tile's rows (row j at ptr + j * ld): the Jacobian itself when it
// is already Acc and the tile needs no padding, else the packed buffer.
template <typename Acc>
struct DensePacker {
  const void* jac;
  KKType jt;
  int64_t ld;  // row stride of jac, in elements
  int64_t m;

  const Acc* operator()(int64_t c0, int64_t len, int64_t lenp, int64_t ldb, Acc* buf,
                        int64_t* ld_out, bool allow_direct = true) const {
    if (allow_direct && jt == acc_kktype<Acc>() && len == lenp) {
      *ld_out = ld;
      return static_cast<const Acc*>(jac) + c0;
    }
    for (int64_t j = 0; j < m; ++j) {
      Acc* row = buf + j * ldb;
      to_acc<Acc>(jac, jt, j * ld + c0, len, row);
      std::fill(row + len, row + lenp, Acc(0));
    }
    *ld_out = ldb;
    return buf;
  }
};

// ---------------------------------------------------------------------------------------
// Innovation covariance: S += (H diag(P-)) H^T over one packed tile
// ---------------------------------------------------------------------------------------
// RJ x RK block of S from scaled rows a (= H_j * P-) and rows h; lenp multiple of V.
template <typename Acc, int RJ, int RK>
inline void syrk_block(const Acc* const* a, const Acc* const* h, int64_t lenp, double* s,
                       int64_t lds) {
  constexpr int64_t V = kV<Acc>;
  Vec<Acc> acc[RJ][RK];
  for (int j = 0; j < RJ; ++j)
    for (int k = 0; k < RK; ++k) acc[j][k] = Vec<Acc>(Acc(0));
  for (int64_t c = 0; c < lenp; c += V) {
    Vec<Acc> hv[RK];
    for (int k = 0; k < RK; ++k) hv[k] = Vec<Acc>::loadu(h[k] + c);
    for (int j = 0; j < RJ; ++j) {
      const Vec<Acc> av = Vec<Acc>::loadu(a[j] + c);
      for (int k = 0; k < RK; ++k) acc[j][k] = at::vec::fmadd(av, hv[k], acc[j][k]);
    }
  }
  for (int j = 0; j < RJ; ++j)
    for (int k = 0; k < RK; ++k) s[j * lds + k] += hsum<Acc>(acc[j][k]);
}

// Lower triangle (and the 4x4 diagonal blocks) of S += A H^T for one tile.
template <typename Acc>
inline void syrk_tile(const Acc* const* a, const Acc* const* h, int64_t m, int64_t lenp,
                      double* s) {
  const int64_t mb = (m / kRB) * kRB;
  for (int64_t jb = 0; jb < mb; jb += kRB)
    for (int64_t kb = 0; kb <= jb; kb += kRB)
      syrk_block<Acc, kRB, kRB>(a + jb, h + kb, lenp, s + jb * m + kb, m);
  for (int64_t j = mb; j < m; ++j) {
    for (int64_t kb = 0; kb < mb; kb += kRB)
      syrk_block<Acc, 1, kRB>(a + j, h + kb, lenp, s + j * m + kb, m);
    for (int64_t k = mb; k <= j; ++k) syrk_block<Acc, 1, 1>(a + j, h + k, lenp, s + j * m + k, m);
  }
}

template <typename Acc>
struct InnovationScratch {
  std::vector<Acc> hbuf, abuf, pbuf;
  std::vector<const Acc*> arows, hrows;
};

template <typename Acc, typename Packer>
void innovation_tiles(const Packer& pack, const void* cov, KKType ct, int64_t m, int64_t n,
                      double inv_lam_d, double q_d, double* out) {
  constexpr int64_t V = kV<Acc>;
  std::fill(out, out + m * m, 0.0);
  if (n == 0 || m == 0) return;
  const int64_t b = tile_cols<Acc>(m, n);
  const int64_t ntiles = divup(n, b);
  // Tiles form a fixed number of groups, each summed into its own partial S; the groups
  // are then added in order: the result does not depend on the thread count or schedule.
  const int64_t ngroups = std::min(ntiles, kMaxGroups);
  std::vector<double> partial(static_cast<size_t>(ngroups * m * m), 0.0);
  const Acc inv_lam = static_cast<Acc>(inv_lam_d);
  const Acc q = static_cast<Acc>(q_d);
  const bool parallel = m * n * std::max<int64_t>(m, 8) >= kParallelWork;

  auto make_scratch = [&]() {
    InnovationScratch<Acc> sc;
    sc.hbuf.resize(static_cast<size_t>(m * b));
    sc.abuf.resize(static_cast<size_t>(m * b));
    sc.pbuf.resize(static_cast<size_t>(b));
    sc.arows.resize(m);
    sc.hrows.resize(m);
    for (int64_t j = 0; j < m; ++j) sc.arows[j] = sc.abuf.data() + j * b;
    return sc;
  };
  run_items(ngroups, parallel, make_scratch, [&](int64_t g, InnovationScratch<Acc>& sc) {
    const Vec<Acc> vinv(inv_lam), vq(q);
    double* s = partial.data() + g * m * m;
    const int64_t t0 = ntiles * g / ngroups, t1 = ntiles * (g + 1) / ngroups;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * b;
      const int64_t len = std::min(b, n - c0);
      const int64_t lenp = round_up(len, kUnit<Acc>);
      int64_t ld = 0;
      const Acc* h = pack(c0, len, lenp, b, sc.hbuf.data(), &ld);
      for (int64_t j = 0; j < m; ++j) sc.hrows[j] = h + j * ld;
      // P- for the tile (zero in the padding, so padded columns add nothing)
      Acc* pm = sc.pbuf.data();
      const Acc* cv = stage<Acc>(cov, ct, c0, len, pm);
      int64_t i = 0;
      for (; i + V <= len; i += V) math::predict(Vec<Acc>::loadu(cv + i), vinv, vq).store(pm + i);
      for (; i < len; ++i) pm[i] = math::predict(cv[i], inv_lam, q);
      std::fill(pm + len, pm + lenp, Acc(0));
      // scaled rows H_j (.) P-
      for (int64_t j = 0; j < m; ++j) {
        const Acc* hr = sc.hrows[j];
        Acc* ar = sc.abuf.data() + j * b;
        for (int64_t c = 0; c < lenp; c += V)
          (Vec<Acc>::loadu(hr + c) * Vec<Acc>::loadu(pm + c)).store(ar + c);
      }
      syrk_tile<Acc>(sc.arows.data(), sc.hrows.data(), m, lenp, s);
    }
  });
  for (int64_t g = 0; g < ngroups; ++g) {
    const double* sg = partial.data() + g * m * m;
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k <= j; ++k) out[j * m + k] += sg[j * m + k];
  }
  for (int64_t j = 0; j < m; ++j)
    for (int64_t k = j + 1; k < m; ++k) out[j * m + k] = out[k * m + j];
}

// Small m (<= 8) with the Jacobian and covariance already in Acc: no tile buffers; the
// rows of H and P are streamed once and the accumulators of S stay in registers, flushed
// into float64 every kFlush columns. For m > 4 each block of kFlush columns is walked twice
// (pairs with k < 4, then pairs with k >= 4; the second walk hits L1/L2), so the
// accumulators still fit the register file. Same fixed groups as innovation_tiles, so the
// result does not depend on the thread count either.
template <typename Acc, int M>
void innovation_small(const Acc* h, int64_t ld, const Acc* cov, int64_t n, double inv_lam_d,
                      double q_d, double* out) {
  constexpr int64_t V = kV<Acc>;
  constexpr int KA = M < 4 ? M : 4;                     // k < KA in the first walk
  constexpr int NA = KA * (KA + 1) / 2 + (M - KA) * KA;  // pairs (j >= k, k < KA)
  constexpr int NB = (M - KA) * (M - KA + 1) / 2;        // pairs (j >= k >= KA)
  constexpr int64_t kFlush = 2048;
  const Acc inv_lam = static_cast<Acc>(inv_lam_d), q = static_cast<Acc>(q_d);
  const int64_t nblk = divup(n, kFlush);
  const int64_t ngroups = std::min(nblk, kMaxGroups);
  std::vector<double> partial(static_cast<size_t>(ngroups * M * M), 0.0);
  auto make_scratch = [] { return std::vector<Acc>(static_cast<size_t>(kFlush)); };
  run_items(ngroups, n * 8 * M >= kParallelWork, make_scratch,
            [&](int64_t g, std::vector<Acc>& pbuf) {
    const Vec<Acc> vinv(inv_lam), vq(q);
    double* sg = partial.data() + g * M * M;
    Acc* pmb = pbuf.data();
    const int64_t b0 = nblk * g / ngroups, b1 = nblk * (g + 1) / ngroups;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * kFlush, c1 = std::min(n, c0 + kFlush);
      const int64_t cv_end = c0 + (c1 - c0) / V * V;
      {  // walk 1: pairs with k < KA (P- is kept for walk 2)
        Vec<Acc> acc[NA];
        for (int p = 0; p < NA; ++p) acc[p] = Vec<Acc>(Acc(0));
        for (int64_t c = c0; c < cv_end; c += V) {
          const Vec<Acc> pm = math::predict(Vec<Acc>::loadu(cov + c), vinv, vq);
          if (M > KA) pm.store(pmb + (c - c0));
          Vec<Acc> hk[KA];
          for (int k = 0; k < KA; ++k) hk[k] = Vec<Acc>::loadu(h + k * ld + c);
          int p = 0;
          for (int j = 0; j < M; ++j) {
            const Vec<Acc> a = (j < KA ? hk[j] : Vec<Acc>::loadu(h + j * ld + c)) * pm;
            for (int k = 0; k <= j && k < KA; ++k, ++p) acc[p] = at::vec::fmadd(a, hk[k], acc[p]);
          }
        }
        int p = 0;
        for (int j = 0; j < M; ++j)
          for (int k = 0; k <= j && k < KA; ++k, ++p) sg[j * M + k] += hsum<Acc>(acc[p]);
      }
      if (NB > 0) {  // walk 2: pairs with j >= k >= KA
        Vec<Acc> acc[NB > 0 ? NB : 1];
        for (int p = 0; p < NB; ++p) acc[p] = Vec<Acc>(Acc(0));
        for (int64_t c = c0; c < cv_end; c += V) {
          const Vec<Acc> pm = Vec<Acc>::loadu(pmb + (c - c0));
          Vec<Acc> hv[M > KA ? M - KA : 1];
          for (int j = KA; j < M; ++j) hv[j - KA] = Vec<Acc>::loadu(h + j * ld + c);
          int p = 0;
          for (int j = KA; j < M; ++j) {
            const Vec<Acc> a = hv[j - KA] * pm;
            for (int k = KA; k <= j; ++k, ++p)
              acc[p] = at::vec::fmadd(a, hv[k - KA], acc[p]);
          }
        }
        int p = 0;
        for (int j = KA; j < M; ++j)
          for (int k = KA; k <= j; ++k, ++p) sg[j * M + k] += hsum<Acc>(acc[p]);
      }
      for (int64_t c = cv_end; c < c1; ++c) {  // fewer than V columns
        const Acc pm = math::predict(cov[c], inv_lam, q);
        for (int j = 0; j < M; ++j)
          for (int k = 0; k <= j; ++k)
            sg[j * M + k] += static_cast<double>(h[j * ld + c] * pm * h[k * ld + c]);
      }
    }
  });
  std::fill(out, out + M * M, 0.0);
  for (int64_t g = 0; g < ngroups; ++g)
    for (int j = 0; j < M; ++j)
      for (int k = 0; k <= j; ++k) out[j * M + k] += partial[g * M * M + j * M + k];
  for (int j = 0; j < M; ++j)
    for (int k = j + 1; k < M; ++k) out[j * M + k] = out[k * M + j];
}

template <typename Acc>
bool try_innovation_small(const void* jac, KKType jt, int64_t ld, const void* cov, KKType ct,
                          int64_t m, int64_t n, double inv_lam, double q, double* out) {
  if (m > 8 || m < 1 || n == 0 || jt != acc_kktype<Acc>() || ct != acc_kktype<Acc>()) {
    return false;
  }
  const Acc* h = static_cast<const Acc*>(jac);
  const Acc* c = static_cast<const Acc*>(cov);
  switch (m) {
    case 1: innovation_small<Acc, 1>(h, ld, c, n, inv_lam, q, out); break;
    case 2: innovation_small<Acc, 2>(h, ld, c, n, inv_lam, q, out); break;
    case 3: innovation_small<Acc, 3>(h, ld, c, n, inv_lam, q, out); break;
    case 4: innovation_small<Acc, 4>(h, ld, c, n, inv_lam, q, out); break;
    case 5: innovation_small<Acc, 5>(h, ld, c, n, inv_lam, q, out); break;
    case 6: innovation_small<Acc, 6>(h, ld, c, n, inv_lam, q, out); break;
    case 7: innovation_small<Acc, 7>(h, ld, c, n, inv_lam, q, out); break;
    default: innovation_small<Acc, 8>(h, ld, c, n, inv_lam, q, out); break;
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// Fused update over one packed tile: G' = F' H_tile with F' = [F; coef] ((m+1) x m, rows
// padded to a multiple of 4), d = sum_{l<m} G'[l]^2, step = G'[m]; then the elementwise
// mean / covariance update of those columns.
// ---------------------------------------------------------------------------------------
template <typename Acc>
struct Whitening {
  std::vector<Acc> f;          // F (m x m), row-major
  std::vector<Acc> coef;       // (m)
  std::vector<int64_t> kmin;   // per block of 4 rows of F: first / last non-zero column;
  std::vector<int64_t> kmax;   // the last block also spans the non-zeros of coef
  int64_t nblocks = 0;
};

template <typename Acc>
Whitening<Acc> make_whitening(const double* f, const double* coef, int64_t m) {
  Whitening<Acc> w;
  w.nblocks = divup(m, kRB);
  w.f.resize(static_cast<size_t>(m * m));
  w.coef.resize(static_cast<size_t>(m));
  for (int64_t i = 0; i < m * m; ++i) w.f[i] = static_cast<Acc>(f[i]);
  for (int64_t k = 0; k < m; ++k) w.coef[k] = static_cast<Acc>(coef[k]);
  w.kmin.assign(w.nblocks, m);
  w.kmax.assign(w.nblocks, -1);
  auto widen = [&](int64_t blk, const Acc* row) {
    for (int64_t k = 0; k < m; ++k) {
      if (row[k] != Acc(0)) {
        w.kmin[blk] = std::min(w.kmin[blk], k);
        w.kmax[blk] = std::max(w.kmax[blk], k);
      }
    }
  };
  for (int64_t l = 0; l < m; ++l) widen(l / kRB, w.f.data() + l * m);
  widen(w.nblocks - 1, w.coef.data());   // the step term rides on the last block
  return w;
}

// One block of R rows of F (R <= 4) over one column group: d += sum_r (F_r H)^2, and with
// COEF also st = coef^T H, sharing the loads of H.
template <typename Acc, int R, bool COEF>
inline void whiten_block(const Acc* frow, const Acc* coef, int64_t m, int64_t k0, int64_t k1,
                         const Acc* h, int64_t ldb, Vec<Acc>* d, Vec<Acc>* st) {
  constexpr int64_t V = kV<Acc>;
  constexpr int NC = kNC<Acc>;
  Vec<Acc> acc[R][NC];
  Vec<Acc> sacc[NC];
  for (int c = 0; c < NC; ++c) {
    sacc[c] = Vec<Acc>(Acc(0));
    for (int r = 0; r < R; ++r) acc[r][c] = Vec<Acc>(Acc(0));
  }
  for (int64_t k = k0; k <= k1; ++k) {
    const Acc* hk = h + k * ldb;
    Vec<Acc> hv[NC];
    for (int c = 0; c < NC; ++c) hv[c] = Vec<Acc>::loadu(hk + c * V);
    for (int r = 0; r < R; ++r) {
      const Vec<Acc> fv(frow[r * m + k]);
      for (int c = 0; c < NC; ++c) acc[r][c] = at::vec::fmadd(fv, hv[c], acc[r][c]);
    }
    if (COEF) {
      const Vec<Acc> cv(coef[k]);
      for (int c = 0; c < NC; ++c) sacc[c] = at::vec::fmadd(cv, hv[c], sacc[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) d[c] = at::vec::fmadd(acc[r][c], acc[r][c], d[c]);
  if (COEF)
    for (int c = 0; c < NC; ++c) st[c] = sacc[c];
}

// d = sum_l (F H)[l]^2 and st = coef^T H for every column of one tile (rows of H at
// h + k * ldb, lenp columns readable, a multiple of kUnit).
template <typename Acc>
inline void whiten_tile(const Whitening<Acc>& w, int64_t m, const Acc* h, int64_t ldb,
                        int64_t lenp, Acc* dbuf, Acc* sbuf) {
  constexpr int64_t V = kV<Acc>;
  constexpr int NC = kNC<Acc>;
  for (int64_t cg = 0; cg < lenp; cg += NC * V) {
    Vec<Acc> d[NC], st[NC];
    for (int c = 0; c < NC; ++c) {
      d[c] = Vec<Acc>(Acc(0));
      st[c] = Vec<Acc>(Acc(0));
    }
    for (int64_t lb = 0; lb < w.nblocks; ++lb) {
      const Acc* frow = w.f.data() + lb * kRB * m;
      const int64_t k0 = w.kmin[lb], k1 = w.kmax[lb];
      const int rows = static_cast<int>(std::min<int64_t>(kRB, m - lb * kRB));
      const Acc* hc = h + cg;
      const Acc* cf = w.coef.data();
      if (lb + 1 < w.nblocks) {   // full blocks of 4 rows
        whiten_block<Acc, 4, false>(frow, cf, m, k0, k1, hc, ldb, d, st);
      } else {
        switch (rows) {
          case 1: whiten_block<Acc, 1, true>(frow, cf, m, k0, k1, hc, ldb, d, st); break;
          case 2: whiten_block<Acc, 2, true>(frow, cf, m, k0, k1, hc, ldb, d, st); break;
          case 3: whiten_block<Acc, 3, true>(frow, cf, m, k0, k1, hc, ldb, d, st); break;
          default: whiten_block<Acc, 4, true>(frow, cf, m, k0, k1, hc, ldb, d, st); break;
        }
      }
    }
    for (int c = 0; c < NC; ++c) {
      d[c].store(dbuf + cg + c * V);
      st[c].store(sbuf + cg + c * V);
    }
  }
}

template <typename Acc>
struct ElemScalars {
  Acc inv_lam, q, lo, hi;
  explicit ElemScalars(const UpdateScalars& s)
      : inv_lam(static_cast<Acc>(s.inv_lam)),
        q(static_cast<Acc>(s.q)),
        lo(static_cast<Acc>(s.cov_floor)),
        hi(static_cast<Acc>(s.cov_ceiling)) {}
};

// p += P- * step ; c = rule(P-, d), for len elements (p and c may be the storage itself).
template <typename Acc, bool INFO>
inline void finalize(Acc* p, Acc* c, const Acc* step, const Acc* d, int64_t len,
                     const ElemScalars<Acc>& e) {
  constexpr int64_t V = kV<Acc>;
  const Vec<Acc> vinv(e.inv_lam), vq(e.q), vlo(e.lo), vhi(e.hi), one(Acc(1));
  int64_t i = 0;
  for (; i + V <= len; i += V) {
    const Vec<Acc> pm = math::predict(Vec<Acc>::loadu(c + i), vinv, vq);
    math::mean_step(Vec<Acc>::loadu(p + i), pm, Vec<Acc>::loadu(step + i)).store(p + i);
    math::cov_rule<INFO>(pm, Vec<Acc>::loadu(d + i), one, vlo, vhi).store(c + i);
  }
  for (; i < len; ++i) {
    const Acc pm = math::predict(c[i], e.inv_lam, e.q);
    p[i] = math::mean_step(p[i], pm, step[i]);
    c[i] = math::cov_rule<INFO>(pm, d[i], Acc(1), e.lo, e.hi);
  }
}

template <typename Acc>
struct UpdateScratch {
  std::vector<Acc> hbuf, dbuf, sbuf, pbuf, cbuf;
};

template <typename Acc, bool INFO, typename Packer>
void update_tiles(const Packer& pack, void* param, KKType pt, void* cov, KKType ct, int64_t m,
                  int64_t n, const double* coef, const double* f, const UpdateScalars& s) {
  if (n == 0 || m == 0) return;
  const Whitening<Acc> w = make_whitening<Acc>(f, coef, m);
  const ElemScalars<Acc> e(s);
  const int64_t b = tile_cols<Acc>(m, n);
  const int64_t ntiles = divup(n, b);
  const bool parallel = m * n * std::max<int64_t>(m, 8) >= kParallelWork;
  auto make_scratch = [&]() {
    UpdateScratch<Acc> sc;
    sc.hbuf.resize(static_cast<size_t>(m * b));
    for (auto* v : {&sc.dbuf, &sc.sbuf, &sc.pbuf, &sc.cbuf}) v->resize(static_cast<size_t>(b));
    return sc;
  };
  run_items(ntiles, parallel, make_scratch, [&](int64_t t, UpdateScratch<Acc>& sc) {
    const int64_t c0 = t * b;
    const int64_t len = std::min(b, n - c0);
    const int64_t lenp = round_up(len, kUnit<Acc>);
    int64_t ld = 0;
    // The whitening walks all m rows per column group: with many rows, reading them in
    // place (m strided streams) defeats the prefetchers, so the tile is packed instead.
    const Acc* h = pack(c0, len, lenp, b, sc.hbuf.data(), &ld, /*allow_direct=*/m <= 8);
    Acc* pp = stage<Acc>(param, pt, c0, len, sc.pbuf.data());
    Acc* cc = stage<Acc>(cov, ct, c0, len, sc.cbuf.data());
    // Whitening and elementwise update in sub-blocks, so the streams of H, param and cov
    // advance together (one long phase per array would restart the prefetchers).
    constexpr int64_t sub = 4 * kUnit<Acc>;
    for (int64_t c = 0; c < len; c += sub) {
      const int64_t sl = std::min(sub, len - c);
      whiten_tile<Acc>(w, m, h + c, ld, round_up(sl, kUnit<Acc>), sc.dbuf.data() + c,
                       sc.sbuf.data() + c);
      finalize<Acc, INFO>(pp + c, cc + c, sc.sbuf.data() + c, sc.dbuf.data() + c, sl, e);
    }
    unstage<Acc>(pp, param, pt, c0, len);
    unstage<Acc>(cc, cov, ct, c0, len);
  });
}

// ---------------------------------------------------------------------------------------
// Loss-observation mode (docs/design.md, 2.2): multi-tensor reduction and elementwise step
// ---------------------------------------------------------------------------------------
constexpr int64_t kChunk = int64_t(1) << 16;  // elements per parallel work item
constexpr int64_t kStage = 2048;              // elements per staged sub-block

struct Chunk {
  int64_t tensor, begin, end;
};

inline std::vector<Chunk> make_chunks(int64_t count, const int64_t* numel) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < count; ++t)
    for (int64_t b = 0; b < numel[t]; b += kChunk)
      chunks.push_back({t, b, std::min(numel[t], b + kChunk)});
  return chunks;
}

template <typename Acc>
double quad_range(const void* g, KKType gt, const void* c, KKType ct, int64_t begin,
                  int64_t end, Acc inv_lam, Acc q) {
  constexpr int64_t V = kV<Acc>;
  alignas(64) Acc gb[kStage];
  alignas(64) Acc cb[kStage];
  const Vec<Acc> vinv(inv_lam), vq(q);
  double total = 0.0;
  for (int64_t off = begin; off < end; off += kStage) {
    const int64_t len = std::min(kStage, end - off);
    const Acc* gg = stage<Acc>(g, gt, off, len, gb);
    const Acc* cc = stage<Acc>(c, ct, off, len, cb);
    Vec<Acc> a0(Acc(0)), a1(Acc(0));
    int64_t i = 0;
    for (; i + 2 * V <= len; i += 2 * V) {
      a0 = a0 + math::quad_term(Vec<Acc>::loadu(gg + i), Vec<Acc>::loadu(cc + i), vinv, vq);
      a1 = a1 + math::quad_term(Vec<Acc>::loadu(gg + i + V), Vec<Acc>::loadu(cc + i + V), vinv,
                                vq);
    }
    Acc tail = Acc(0);
    for (; i < len; ++i) tail += math::quad_term(gg[i], cc[i], inv_lam, q);
    total += hsum<Acc>(a0 + a1) + static_cast<double>(tail);
  }
  return total;
}

template <typename Acc, bool INFO>
void loss_range(void* p, KKType pt, const void* g, KKType gt, void* c, KKType ct, int64_t begin,
                int64_t end, Acc coef, Acc weight, const ElemScalars<Acc>& e) {
  constexpr int64_t V = kV<Acc>;
  alignas(64) Acc pb[kStage];
  alignas(64) Acc gb[kStage];
  alignas(64) Acc cb[kStage];
  const Vec<Acc> vinv(e.inv_lam), vq(e.q), vlo(e.lo), vhi(e.hi), one(Acc(1));
  const Vec<Acc> vcoef(coef), vweight(weight);
  for (int64_t off = begin; off < end; off += kStage) {
    const int64_t len = std::min(kStage, end - off);
    Acc* pp = stage<Acc>(p, pt, off, len, pb);
    const Acc* gg = stage<Acc>(g, gt, off, len, gb);
    Acc* cc = stage<Acc>(c, ct, off, len, cb);
    int64_t i = 0;
    for (; i + V <= len; i += V) {
      Vec<Acc> pv = Vec<Acc>::loadu(pp + i);
      Vec<Acc> cv = Vec<Acc>::loadu(cc + i);
      math::loss_update<INFO>(pv, cv, Vec<Acc>::loadu(gg + i), vcoef, vweight, vinv, vq, one,
                              vlo, vhi);
      pv.store(pp + i);
      cv.store(cc + i);
    }
    for (; i < len; ++i)
      math::loss_update<INFO>(pp[i], cc[i], gg[i], coef, weight, e.inv_lam, e.q, Acc(1), e.lo,
                              e.hi);
    unstage<Acc>(pp, p, pt, off, len);
    unstage<Acc>(cc, c, ct, off, len);
  }
}

// ---------------------------------------------------------------------------------------
// Step terms of the distributed update (docs/design.md, 2.5): the fused update's two column
// terms, written out instead of applied (dir = H^T coef, diag = sum_l (F H)[l]^2).
// ---------------------------------------------------------------------------------------
template <typename Acc, typename Packer>
void terms_tiles(const Packer& pack, int64_t m, int64_t n, const double* coef, const double* f,
                 Acc* dir, Acc* diag) {
  if (n == 0 || m == 0) return;
  const Whitening<Acc> w = make_whitening<Acc>(f, coef, m);
  const int64_t b = tile_cols<Acc>(m, n);
  const int64_t ntiles = divup(n, b);
  const bool parallel = m * n * std::max<int64_t>(m, 8) >= kParallelWork;
  auto make_scratch = [&]() {
    UpdateScratch<Acc> sc;
    sc.hbuf.resize(static_cast<size_t>(m * b));
    for (auto* v : {&sc.dbuf, &sc.sbuf}) v->resize(static_cast<size_t>(b));
    return sc;
  };
  run_items(ntiles, parallel, make_scratch, [&](int64_t t, UpdateScratch<Acc>& sc) {
    const int64_t c0 = t * b;
    const int64_t len = std::min(b, n - c0);
    const int64_t lenp = round_up(len, kUnit<Acc>);
    int64_t ld = 0;
    const Acc* h = pack(c0, len, lenp, b, sc.hbuf.data(), &ld, /*allow_direct=*/m <= 8);
    constexpr int64_t sub = 4 * kUnit<Acc>;
    for (int64_t c = 0; c < len; c += sub) {
      const int64_t sl = std::min(sub, len - c);
      whiten_tile<Acc>(w, m, h + c, ld, round_up(sl, kUnit<Acc>), sc.dbuf.data() + c,
                       sc.sbuf.data() + c);
    }
    std::memcpy(dir + c0, sc.sbuf.data(), static_cast<size_t>(len) * sizeof(Acc));
    std::memcpy(diag + c0, sc.dbuf.data(), static_cast<size_t>(len) * sizeof(Acc));
  });
}

// p += P- * u ; c = rule(P-, d) over [begin, end): the elementwise half of a step whose
// per-parameter terms u (direction) and d (diagonal) are given (apply_terms_, and the
// epilogue of the grouped Kronecker update, which first clamps d at 0).
template <typename Acc, bool INFO>
void apply_range(void* p, KKType pt, void* c, KKType ct, const void* u, KKType ut,
                 const void* d, KKType dt, int64_t begin, int64_t end, bool clamp_diag,
                 const ElemScalars<Acc>& e) {
  constexpr int64_t V = kV<Acc>;
  alignas(64) Acc pb[kStage];
  alignas(64) Acc cb[kStage];
  alignas(64) Acc ub[kStage];
  alignas(64) Acc db[kStage];
  for (int64_t off = begin; off < end; off += kStage) {
    const int64_t len = std::min(kStage, end - off);
    Acc* pp = stage<Acc>(p, pt, off, len, pb);
    Acc* cc = stage<Acc>(c, ct, off, len, cb);
    const Acc* uu = stage<Acc>(u, ut, off, len, ub);
    const Acc* dd = stage<Acc>(d, dt, off, len, db);
    if (clamp_diag) {   // a quadratic form, >= 0 up to rounding
      const Vec<Acc> zero(Acc(0));
      int64_t i = 0;
      for (; i + V <= len; i += V) at::vec::maximum(Vec<Acc>::loadu(dd + i), zero).store(db + i);
      for (; i < len; ++i) db[i] = dd[i] < Acc(0) ? Acc(0) : dd[i];
      dd = db;
    }
    finalize<Acc, INFO>(pp, cc, uu, dd, len, e);
    unstage<Acc>(pp, p, pt, off, len);
    unstage<Acc>(cc, c, ct, off, len);
  }
}

template <typename Acc>
void apply_range_rule(void* p, KKType pt, void* c, KKType ct, const void* u, KKType ut,
                      const void* d, KKType dt, int64_t begin, int64_t end, bool clamp_diag,
                      const UpdateScalars& s) {
  const ElemScalars<Acc> e(s);
  if (s.information) {
    apply_range<Acc, true>(p, pt, c, ct, u, ut, d, dt, begin, end, clamp_diag, e);
  } else {
    apply_range<Acc, false>(p, pt, c, ct, u, ut, d, dt, begin, end, clamp_diag, e);
  }
}

// ---------------------------------------------------------------------------------------
// Sample-grouped Kronecker blocks: the per-pair K x K work (ops.cpp does the GEMMs).
// Pairs t = (iu[t], ju[t]) of samples; D is (B, K, d_out) in Acc. Every pair is
// independent: threads split the pairs, so results do not depend on the thread count.
// ---------------------------------------------------------------------------------------
// dot(x, y) over n elements (vectorised, Acc accumulators, summed in double).
template <typename Acc>
inline void dots4(const Acc* x, const Acc* y0, const Acc* y1, const Acc* y2, const Acc* y3,
                  int64_t n, double* out) {
  constexpr int64_t V = kV<Acc>;
  Vec<Acc> a0(Acc(0)), a1(Acc(0)), a2(Acc(0)), a3(Acc(0));
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    const Vec<Acc> xv = Vec<Acc>::loadu(x + i);
    a0 = at::vec::fmadd(xv, Vec<Acc>::loadu(y0 + i), a0);
    a1 = at::vec::fmadd(xv, Vec<Acc>::loadu(y1 + i), a1);
    a2 = at::vec::fmadd(xv, Vec<Acc>::loadu(y2 + i), a2);
    a3 = at::vec::fmadd(xv, Vec<Acc>::loadu(y3 + i), a3);
  }
  Acc t0 = Acc(0), t1 = Acc(0), t2 = Acc(0), t3 = Acc(0);
  for (; i < n; ++i) {
    t0 += x[i] * y0[i];
    t1 += x[i] * y1[i];
    t2 += x[i] * y2[i];
    t3 += x[i] * y3[i];
  }
  out[0] = hsum<Acc>(a0) + t0;
  out[1] = hsum<Acc>(a1) + t1;
  out[2] = hsum<Acc>(a2) + t2;
  out[3] = hsum<Acc>(a3) + t3;
}

// S (B, B, K, K) float64, block (j, j') of every pair and its transpose at (j', j):
// S[j, j', k, k'] = sum_o D[j,k,o] Q[t,o] D[j',k',o].
template <typename Acc>
void pair_sandwich_t(const Acc* d, int64_t b, int64_t k, int64_t d_out, const int64_t* iu,
                     const int64_t* ju, int64_t tcount, const Acc* q, double* s) {
  constexpr int64_t V = kV<Acc>;
  const int64_t kk2 = k * k;
  const bool parallel = tcount * kk2 * d_out >= kParallelWork;
  auto make_scratch = [&] { return std::vector<Acc>(static_cast<size_t>(k * d_out)); };
  const int64_t per_item = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, kk2 * d_out));
  const int64_t items = divup(tcount, per_item);
  run_items(items, parallel, make_scratch, [&](int64_t item, std::vector<Acc>& scratch) {
    Acc* x = scratch.data();
    for (int64_t t = item * per_item; t < std::min(tcount, (item + 1) * per_item); ++t) {
      const int64_t j = iu[t], jj = ju[t];
      const Acc* qt = q + t * d_out;
      for (int64_t kk = 0; kk < k; ++kk) {     // x_k = D[j, k] (.) Q[t]
        const Acc* dr = d + (j * k + kk) * d_out;
        Acc* xr = x + kk * d_out;
        int64_t o = 0;
        for (; o + V <= d_out; o += V) (Vec<Acc>::loadu(dr + o) * Vec<Acc>::loadu(qt + o)).store(xr + o);
        for (; o < d_out; ++o) xr[o] = dr[o] * qt[o];
      }
      double* blk = s + (j * b + jj) * kk2;
      double* blk_t = s + (jj * b + j) * kk2;
      const Acc* dj = d + jj * k * d_out;
      double vals[4];
      for (int64_t kk = 0; kk < k; ++kk) {
        const Acc* xr = x + kk * d_out;
        int64_t kp = 0;
        for (; kp + 4 <= k; kp += 4) {
          dots4<Acc>(xr, dj + kp * d_out, dj + (kp + 1) * d_out, dj + (kp + 2) * d_out,
                     dj + (kp + 3) * d_out, d_out, vals);
          for (int r = 0; r < 4; ++r) blk[kk * k + kp + r] = vals[r];
        }
        for (; kp < k; ++kp) {
          const Acc* y = dj + kp * d_out;
          dots4<Acc>(xr, y, y, y, y, d_out, vals);
          blk[kk * k + kp] = vals[0];
        }
      }
      if (jj != j)
        for (int64_t kk = 0; kk < k; ++kk)
          for (int64_t kp = 0; kp < k; ++kp) blk_t[kp * k + kk] = blk[kk * k + kp];
    }
  });
}

// G (T, d_out): G[t, o] = mult[t] sum_{k,k'} W[t,k,k'] D[j,k,o] D[j',k',o].
template <typename Acc>
void pair_weights_t(const Acc* d, int64_t k, int64_t d_out, const int64_t* iu,
                    const int64_t* ju, int64_t tcount, const Acc* w, const Acc* mult, Acc* g) {
  constexpr int64_t V = kV<Acc>;
  const int64_t kk2 = k * k;
  const bool parallel = tcount * kk2 * d_out >= kParallelWork;
  auto make_scratch = [&] { return std::vector<Acc>(static_cast<size_t>(k * d_out)); };
  const int64_t per_item = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, kk2 * d_out));
  const int64_t items = divup(tcount, per_item);
  run_items(items, parallel, make_scratch, [&](int64_t item, std::vector<Acc>& z) {
    for (int64_t t = item * per_item; t < std::min(tcount, (item + 1) * per_item); ++t) {
      const int64_t j = iu[t], jj = ju[t];
      const Acc* wt = w + t * kk2;
      const Acc* dj = d + j * k * d_out;
      const Acc* djj = d + jj * k * d_out;
      // z_k = sum_k' W[t, k, k'] D[j', k']
      for (int64_t kk = 0; kk < k; ++kk) {
        Acc* zr = z.data() + kk * d_out;
        int64_t o = 0;
        for (; o + V <= d_out; o += V) {
          Vec<Acc> acc(Acc(0));
          for (int64_t kp = 0; kp < k; ++kp)
            acc = at::vec::fmadd(Vec<Acc>(wt[kk * k + kp]), Vec<Acc>::loadu(djj + kp * d_out + o), acc);
          acc.store(zr + o);
        }
        for (; o < d_out; ++o) {
          Acc acc = Acc(0);
          for (int64_t kp = 0; kp < k; ++kp) acc += wt[kk * k + kp] * djj[kp * d_out + o];
          zr[o] = acc;
        }
      }
      // g = mult * sum_k D[j, k] (.) z_k
      Acc* gt = g + t * d_out;
      const Vec<Acc> vm(mult[t]);
      int64_t o = 0;
      for (; o + V <= d_out; o += V) {
        Vec<Acc> acc(Acc(0));
        for (int64_t kk = 0; kk < k; ++kk)
          acc = at::vec::fmadd(Vec<Acc>::loadu(dj + kk * d_out + o),
                               Vec<Acc>::loadu(z.data() + kk * d_out + o), acc);
        (acc * vm).store(gt + o);
      }
      for (; o < d_out; ++o) {
        Acc acc = Acc(0);
        for (int64_t kk = 0; kk < k; ++kk) acc += dj[kk * d_out + o] * z[kk * d_out + o];
        gt[o] = acc * mult[t];
      }
    }
  });
}

inline bool is64(KKType t) { return t == KKType::F64; }

// ---------------------------------------------------------------------------------------
// Entry points (the KernelTable)
// ---------------------------------------------------------------------------------------
void innovation_dense(const void* jac, KKType jt, int64_t ld, const void* cov, KKType ct,
                      int64_t m, int64_t n, double inv_lam, double q, bool acc64, double* out) {
  if (acc64) {
    if (try_innovation_small<double>(jac, jt, ld, cov, ct, m, n, inv_lam, q, out)) return;
    innovation_tiles<double>(DensePacker<double>{jac, jt, ld, m}, cov, ct, m, n, inv_lam, q, out);
  } else {
    if (try_innovation_small<float>(jac, jt, ld, cov, ct, m, n, inv_lam, q, out)) return;
    innovation_tiles<float>(DensePacker<float>{jac, jt, ld, m}, cov, ct, m, n, inv_lam, q, out);
  }
}

template <typename Acc, typename Packer>
void update_dispatch(const Packer& pack, void* param, KKType pt, void* cov, KKType ct, int64_t m,
                     int64_t n, const double* coef, const double* f, const UpdateScalars& s) {
  if (s.information) {
    update_tiles<Acc, true>(pack, param, pt, cov, ct, m, n, coef, f, s);
  } else {
    update_tiles<Acc, false>(pack, param, pt, cov, ct, m, n, coef, f, s);
  }
}

// Small m (<= 4) with param, cov and Jacobian all in Acc: one loop streams the m rows of H,
// param and cov once; F, coef and the whitened values stay in registers (no tile buffers).
template <typename Acc, bool INFO, int M>
void update_small(Acc* param, Acc* cov, const Acc* h, int64_t ld, int64_t n, const double* coef,
                  const double* f, const UpdateScalars& s) {
  constexpr int64_t V = kV<Acc>;
  constexpr int64_t kItem = 16384;   // columns per work item
  const ElemScalars<Acc> e(s);
  Acc fa[M][M], ca[M];
  for (int l = 0; l < M; ++l) {
    ca[l] = static_cast<Acc>(coef[l]);
    for (int k = 0; k < M; ++k) fa[l][k] = static_cast<Acc>(f[l * M + k]);
  }
  const int64_t items = divup(n, kItem);
  run_items(items, n * 8 * M >= kParallelWork, [] { return 0; }, [&](int64_t it, int&) {
    const Vec<Acc> vinv(e.inv_lam), vq(e.q), vlo(e.lo), vhi(e.hi), one(Acc(1));
    const int64_t c0 = it * kItem, c1 = std::min(n, c0 + kItem);
    int64_t c = c0;
    for (; c + V <= c1; c += V) {
      Vec<Acc> hv[M];
      for (int k = 0; k < M; ++k) hv[k] = Vec<Acc>::loadu(h + k * ld + c);
      Vec<Acc> d(Acc(0)), st(Acc(0));
      for (int l = 0; l < M; ++l) {
        Vec<Acc> g(Acc(0));
        for (int k = 0; k < M; ++k) g = at::vec::fmadd(Vec<Acc>(fa[l][k]), hv[k], g);
        d = at::vec::fmadd(g, g, d);
        st = at::vec::fmadd(Vec<Acc>(ca[l]), hv[l], st);
      }
      const Vec<Acc> pm = math::predict(Vec<Acc>::loadu(cov + c), vinv, vq);
      math::mean_step(Vec<Acc>::loadu(param + c), pm, st).store(param + c);
      math::cov_rule<INFO>(pm, d, one, vlo, vhi).store(cov + c);
    }
    for (; c < c1; ++c) {
      Acc d = Acc(0), st = Acc(0);
      for (int l = 0; l < M; ++l) {
        Acc g = Acc(0);
        for (int k = 0; k < M; ++k) g += fa[l][k] * h[k * ld + c];
        d += g * g;
        st += ca[l] * h[l * ld + c];
      }
      const Acc pm = math::predict(cov[c], e.inv_lam, e.q);
      param[c] = math::mean_step(param[c], pm, st);
      cov[c] = math::cov_rule<INFO>(pm, d, Acc(1), e.lo, e.hi);
    }
  });
}

template <typename Acc>
bool try_update_small(void* param, KKType pt, void* cov, KKType ct, const void* jac, KKType jt,
                      int64_t ld, int64_t m, int64_t n, const double* coef, const double* f,
                      const UpdateScalars& s) {
  constexpr KKType A = acc_kktype<Acc>();
  if (m < 1 || m > 4 || n == 0 || pt != A || ct != A || jt != A) return false;
  Acc* p = static_cast<Acc*>(param);
  Acc* c = static_cast<Acc*>(cov);
  const Acc* h = static_cast<const Acc*>(jac);
#define KK_UPDATE_SMALL(M)                                                      \
  (s.information ? update_small<Acc, true, M>(p, c, h, ld, n, coef, f, s)       \
                 : update_small<Acc, false, M>(p, c, h, ld, n, coef, f, s))
  switch (m) {
    case 1: KK_UPDATE_SMALL(1); break;
    case 2: KK_UPDATE_SMALL(2); break;
    case 3: KK_UPDATE_SMALL(3); break;
    default: KK_UPDATE_SMALL(4); break;
  }
#undef KK_UPDATE_SMALL
  return true;
}

void update_dense(void* param, KKType pt, void* cov, KKType ct, const void* jac, KKType jt,
                  int64_t ld, int64_t m, int64_t n, const double* coef, const double* f,
                  const UpdateScalars& s) {
  if (s.acc64) {
    if (try_update_small<double>(param, pt, cov, ct, jac, jt, ld, m, n, coef, f, s)) return;
    update_dispatch<double>(DensePacker<double>{jac, jt, ld, m}, param, pt, cov, ct, m, n, coef,
                            f, s);
  } else {
    if (try_update_small<float>(param, pt, cov, ct, jac, jt, ld, m, n, coef, f, s)) return;
    update_dispatch<float>(DensePacker<float>{jac, jt, ld, m}, param, pt, cov, ct, m, n, coef, f,
                           s);
  }
}

void terms_dense(const void* jac, KKType jt, int64_t ld, int64_t m, int64_t n,
                 const double* coef, const double* f, bool acc64, void* dir, void* diag) {
  if (acc64) {
    terms_tiles<double>(DensePacker<double>{jac, jt, ld, m}, m, n, coef, f,
                        static_cast<double*>(dir), static_cast<double*>(diag));
  } else {
    terms_tiles<float>(DensePacker<float>{jac, jt, ld, m}, m, n, coef, f,
                       static_cast<float*>(dir), static_cast<float*>(diag));
  }
}

void apply_terms(void* param, KKType pt, void* cov, KKType ct, const void* dir, KKType ut,
                 const void* diag, KKType dt, int64_t n, const UpdateScalars& s) {
  const int64_t items = divup(n, kChunk);
  run_items(items, n >= 4 * kChunk, [] { return 0; }, [&](int64_t i, int&) {
    const int64_t b = i * kChunk, e = std::min(n, b + kChunk);
    if (s.acc64) {
      apply_range_rule<double>(param, pt, cov, ct, dir, ut, diag, dt, b, e, false, s);
    } else {
      apply_range_rule<float>(param, pt, cov, ct, dir, ut, diag, dt, b, e, false, s);
    }
  });
}

// One row tile of the grouped Kronecker update: elements [off, off + len) of the weight and
// its covariance, with the tile's step and diagonal terms (contiguous, accumulation type:
// float64 when s.acc64). Runs on the calling thread; the caller spreads tiles over threads.
void kron_epilogue(void* weight, KKType wt, void* cov, KKType ct, int64_t off, int64_t len,
                   const void* step, const void* diag, const UpdateScalars& s) {
  const KKType acc = s.acc64 ? KKType::F64 : KKType::F32;
  // step / diag are indexed from the tile's start: shift the weight / cov pointers instead.
  char* w = static_cast<char*>(weight) + off * kk_size(wt);
  char* c = static_cast<char*>(cov) + off * kk_size(ct);
  if (s.acc64) {
    apply_range_rule<double>(w, wt, c, ct, step, acc, diag, acc, 0, len, true, s);
  } else {
    apply_range_rule<float>(w, wt, c, ct, step, acc, diag, acc, 0, len, true, s);
  }
}

void pair_sandwich(const void* d, bool acc64, int64_t b, int64_t k, int64_t d_out,
                   const int64_t* iu, const int64_t* ju, int64_t tcount, const void* q,
                   double* s) {
  if (acc64) {
    pair_sandwich_t<double>(static_cast<const double*>(d), b, k, d_out, iu, ju, tcount,
                            static_cast<const double*>(q), s);
  } else {
    pair_sandwich_t<float>(static_cast<const float*>(d), b, k, d_out, iu, ju, tcount,
                           static_cast<const float*>(q), s);
  }
}

void pair_weights(const void* d, bool acc64, int64_t k, int64_t d_out, const int64_t* iu,
                  const int64_t* ju, int64_t tcount, const void* w, const void* mult, void* g) {
  if (acc64) {
    pair_weights_t<double>(static_cast<const double*>(d), k, d_out, iu, ju, tcount,
                           static_cast<const double*>(w), static_cast<const double*>(mult),
                           static_cast<double*>(g));
  } else {
    pair_weights_t<float>(static_cast<const float*>(d), k, d_out, iu, ju, tcount,
                          static_cast<const float*>(w), static_cast<const float*>(mult),
                          static_cast<float*>(g));
  }
}

double quad_form(int64_t count, const void* const* grads, const KKType* gt,
                 const void* const* covs, const KKType* ct, const int64_t* numel, double inv_lam,
                 double q) {
  const std::vector<Chunk> chunks = make_chunks(count, numel);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(chunks.size(), 0.0);
  int64_t total_numel = 0;
  for (int64_t t = 0; t < count; ++t) total_numel += numel[t];
  run_items(nc, total_numel >= 4 * kChunk, [] { return 0; }, [&](int64_t i, int&) {
    const Chunk& ch = chunks[i];
    const int64_t t = ch.tensor;
    if (is64(gt[t]) || is64(ct[t])) {
      partial[i] = quad_range<double>(grads[t], gt[t], covs[t], ct[t], ch.begin, ch.end,
                                      inv_lam, q);
    } else {
      partial[i] = quad_range<float>(grads[t], gt[t], covs[t], ct[t], ch.begin, ch.end,
                                     static_cast<float>(inv_lam), static_cast<float>(q));
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

template <typename Acc>
void loss_chunk(void* p, KKType pt, const void* g, KKType gt, void* c, KKType ct, int64_t b,
                int64_t e, double coef, double weight, const UpdateScalars& s) {
  const ElemScalars<Acc> es(s);
  if (s.information) {
    loss_range<Acc, true>(p, pt, g, gt, c, ct, b, e, static_cast<Acc>(coef),
                          static_cast<Acc>(weight), es);
  } else {
    loss_range<Acc, false>(p, pt, g, gt, c, ct, b, e, static_cast<Acc>(coef),
                           static_cast<Acc>(weight), es);
  }
}

void loss_step(int64_t count, void* const* params, const KKType* pt, const void* const* grads,
               const KKType* gt, void* const* covs, const KKType* ct, const int64_t* numel,
               double coef, double weight, const UpdateScalars& s) {
  const std::vector<Chunk> chunks = make_chunks(count, numel);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  // Chunks are visited in the reverse of quad_form's order: the data that pass read last
  // (still in the last-level cache) is what this pass reads first, which saves up to a
  // cache's worth of the grads / covs re-read (the reduction must finish before the step can
  // start: docs/design.md, 2.2).
  int64_t total_numel = 0;
  for (int64_t t = 0; t < count; ++t) total_numel += numel[t];
  run_items(nc, total_numel >= 4 * kChunk, [] { return 0; }, [&](int64_t i, int&) {
    const Chunk& ch = chunks[nc - 1 - i];
    const int64_t t = ch.tensor;
    if (is64(pt[t]) || is64(gt[t]) || is64(ct[t])) {
      loss_chunk<double>(params[t], pt[t], grads[t], gt[t], covs[t], ct[t], ch.begin, ch.end,
                         coef, weight, s);
    } else {
      loss_chunk<float>(params[t], pt[t], grads[t], gt[t], covs[t], ct[t], ch.begin, ch.end,
                        coef, weight, s);
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY

const KernelTable* KK_CAT(kernel_table_, CPU_CAPABILITY)() {
  static const KernelTable table = {
      KK_STR(CPU_CAPABILITY),
      &CPU_CAPABILITY::innovation_dense,
      &CPU_CAPABILITY::update_dense,
      &CPU_CAPABILITY::terms_dense,
      &CPU_CAPABILITY::apply_terms,
      &CPU_CAPABILITY::kron_epilogue,
      &CPU_CAPABILITY::pair_sandwich,
      &CPU_CAPABILITY::pair_weights,
      &CPU_CAPABILITY::quad_form,
      &CPU_CAPABILITY::loss_step,
  };
  return &table;
}

}  // namespace kalman_kernels
