// Interface between the operator layer (ops.cpp: tensors, checks, dispatch) and the
// CPU kernels (kernels_impl.h, compiled once per instruction set: DEFAULT, AVX2, AVX512).
// Kernels see raw pointers only, so their translation units stay light and carry no
// at::Tensor code; each compiled copy exports one KernelTable.
#pragma once
#include <cstdint>

namespace kalman_kernels {

// Storage dtype of one array, decided at run time.
enum class KKType : int32_t { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

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
  // out = sum_{o,i} P-[o,i] D[j,o] D[k,o] A[j,i] A[k,i]; A (m x d_in), D (m x d_out) contiguous.
  void (*innovation_kron)(const void* a, KKType at, const void* d, KKType dt, const void* cov,
                          KKType ct, int64_t m, int64_t d_out, int64_t d_in, double inv_lam,
                          double q, bool acc64, double* out);
  // In place: param += P- (jac^T coef); cov = rule(P-, sum_l (F jac)[l, i]^2).
  // coef (m) and F (m x m, row-major) are float64.
  void (*update_dense)(void* param, KKType pt, void* cov, KKType ct, const void* jac, KKType jt,
                       int64_t ld, int64_t m, int64_t n, const double* coef, const double* f,
                       const UpdateScalars& s);
  // The Kronecker form: H rows vec(D_j A_j^T), never materialised.
  void (*update_kron)(void* weight, KKType wt, void* cov, KKType ct, const void* a, KKType at,
                      const void* d, KKType dt, int64_t m, int64_t d_out, int64_t d_in,
                      const double* coef, const double* f, const UpdateScalars& s);
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
