// Interface between the operator layer (ops.cpp: tensors, checks, dispatch) and the
// CPU kernels (kernels_impl.h, compiled once per instruction set: DEFAULT, AVX2, AVX512).
// Kernels see raw pointers only, so their translation units stay light and carry no
// at::Tensor code; each compiled copy exports one KernelTable.
#pragma once
#include <cstdint>

#include "kk_dtype.h"  // KKType, the storage dtype of one array

namespace kalman_kernels {

namespace {
// Bytes per element of a storage dtype. (Internal linkage: the kernels are compiled once per
// instruction set, and the linker must never hand one copy's code to another.)
inline int64_t kk_size(KKType t) {
  return t == KKType::F64 ? 8 : (t == KKType::F32 ? 4 : 2);
}
}  // namespace

// Hyper-parameters of one in-place update (P- = cov * inv_lam + q).
struct UpdateScalars {
  double inv_lam;
  double q;
  double cov_floor;
  double cov_ceiling;
  bool information;
  bool acc64;  // accumulate in float64 (any float64 operand), else float32
};

struct KernelTable {
  const char* name;

  // out (m x m, row-major, float64) = H diag(P-) H^T; jac rows have stride ld.
  void (*innovation_dense)(const void* jac, KKType jt, int64_t ld, const void* cov, KKType ct,
                           int64_t m, int64_t n, double inv_lam, double q, bool acc64,
                           double* out);
  // In place: param += P- (jac^T coef); cov = rule(P-, sum_l (F jac)[l, i]^2).
  // coef (m) and F (m x m, row-major) are float64.
  void (*update_dense)(void* param, KKType pt, void* cov, KKType ct, const void* jac, KKType jt,
                       int64_t ld, int64_t m, int64_t n, const double* coef, const double* f,
                       const UpdateScalars& s);
  // The two column terms of update_dense written out (float64 when acc64, else float32):
  // dir = jac^T coef, diag = sum_l (F jac)[l, :]^2 (the distributed step terms,
  // docs/design.md, 2.5).
  void (*terms_dense)(const void* jac, KKType jt, int64_t ld, int64_t m, int64_t n,
                      const double* coef, const double* f, bool acc64, void* dir, void* diag);
  // In place over n elements: param += P- dir ; cov = rule(P-, diag).
  void (*apply_terms)(void* param, KKType pt, void* cov, KKType ct, const void* dir, KKType ut,
                      const void* diag, KKType dt, int64_t n, const UpdateScalars& s);
  // One row tile of the grouped Kronecker update, elements [off, off + len): as apply_terms
  // with the tile's step and diagonal (accumulation dtype, indexed from 0), the diagonal
  // clamped at 0. Runs on the calling thread.
  void (*kron_epilogue)(void* weight, KKType wt, void* cov, KKType ct, int64_t off, int64_t len,
                        const void* step, const void* diag, const UpdateScalars& s);
  // Grouped Kronecker innovation, per pair t = (iu[t], ju[t]) of samples: the K x K block
  // S[j, j', k, k'] = sum_o D[j,k,o] Q[t,o] D[j',k',o] and its transpose at (j', j), into
  // s (B, B, K, K) float64. D (B, K, d_out) and Q (T, d_out) in the accumulation dtype.
  void (*pair_sandwich)(const void* d, bool acc64, int64_t b, int64_t k, int64_t d_out,
                        const int64_t* iu, const int64_t* ju, int64_t tcount, const void* q,
                        double* s);
  // Grouped Kronecker update: g[t, o] = mult[t] sum_{k,k'} w[t,k,k'] D[j,k,o] D[j',k',o],
  // g (T, d_out), w (T, K, K), mult (T,), all in the accumulation dtype.
  void (*pair_weights)(const void* d, bool acc64, int64_t k, int64_t d_out, const int64_t* iu,
                       const int64_t* ju, int64_t tcount, const void* w, const void* mult,
                       void* g);
  // sum over tensors of g^T P- g.
  double (*quad_form)(int64_t count, const void* const* grads, const KKType* gt,
                      const void* const* covs, const KKType* ct, const int64_t* numel,
                      double inv_lam, double q);
  // In place per tensor: param += coef P- g ; cov = rule(P-, weight g^2).
  void (*loss_step)(int64_t count, void* const* params, const KKType* pt,
                    const void* const* grads, const KKType* gt, void* const* covs,
                    const KKType* ct, const int64_t* numel, double coef, double weight,
                    const UpdateScalars& s);
};

// One table per compiled instruction set (see csrc/cpu/kernels_*.cpp).
const KernelTable* kernel_table_DEFAULT();
const KernelTable* kernel_table_AVX2();
const KernelTable* kernel_table_AVX512();

}  // namespace kalman_kernels
