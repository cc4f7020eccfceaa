// Interface between the operator layer of the cuda backend (ops_impl.h: at::Tensor
// arguments, checks, dtype and layout decisions, workspaces) and its kernels (kernels.cuh,
// compiled by nvcc in kernels.cu). Plain C++: no torch and no CUDA headers, so the nvcc
// translation unit stays light. Pointers are device pointers; `stream` is a cudaStream_t.
// Every launcher throws std::runtime_error when a launch fails.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../kk_dtype.h"  // KKType, the storage dtype of an array (shared with the CPU kernels)

namespace kalman_kernels {
namespace cuda {
// The emulated build (tests) gets its own symbol names, so it never interposes on, or is
// interposed by, the real extension when both are loaded into one process.
#if defined(KK_CUDA_EMULATE)
inline namespace emulated {
#endif

// Scratch memory for one op call (the caching allocator behind it is stream-ordered, so a
// workspace may be released as soon as the launches that use it are queued).
struct Workspace {
  virtual ~Workspace() = default;
  virtual void* get(size_t bytes) = 0;
};

// Hyper-parameters of an in-place update: P- = cov * inv_lam + q, clamp(., lo, hi).
struct Update {
  double inv_lam;
  double q;
  double lo;
  double hi;
  bool information;
};

struct Launch {
  int sms;       // multiprocessors of the device (sizes the grids)
  void* stream;  // cudaStream_t
};

// ---- innovation covariance -----------------------------------------------------------
// out (m x m, float64, row-major) = H diag(P-) H^T. H: m rows of n elements, row stride
// ld, unit column stride, dtype jt; cov: n contiguous elements of the accumulation type
// (float64 when acc64, else float32; jt is then F64 when acc64).
void innovation_dense(KKType jt, const void* jac, int64_t ld, int64_t m, int64_t n, const void* cov,
                      bool acc64, double inv_lam, double q, double* out, Workspace& ws,
                      const Launch& l);

// out (B K x B K, float64) for A (B x d_in, row stride lda), D (B x K x d_out, strides
// sd0, sd1, unit last stride), cov (d_out x d_in contiguous, accumulation type); A and D
// have dtype t (F64 when acc64).
void innovation_kron(KKType t, const void* a, int64_t lda, const void* d, int64_t sd0, int64_t sd1,
                     int64_t b, int64_t k, int64_t d_out, int64_t d_in, const void* cov,
                     bool acc64, double inv_lam, double q, double* out, Workspace& ws,
                     const Launch& l);

// ---- fused updates and step terms ----------------------------------------------------
// The in-place target of a fused update (param, cov contiguous, n elements) or, when
// `param` is null, the step-terms outputs u, d (n elements of the accumulation type).
struct Target {
  void* param = nullptr;
  KKType param_t = KKType::F32;
  void* cov = nullptr;
  KKType cov_t = KKType::F32;
  const bool* ok = nullptr;
  Update hyper{1.0, 0.0, 0.0, 0.0, false};
  void* u = nullptr;
  void* d = nullptr;
};

// Dense block: jac as in innovation_dense; coef (m,) with stride cs, whitening F (m x m)
// with strides ws0, ws1, both float64.
void dense_update(KKType jt, const void* jac, int64_t ld, int64_t m, int64_t n, const double* coef,
                  int64_t cs, const double* whitening, int64_t ws0, int64_t ws1, bool acc64,
                  const Target& target, Workspace& ws, const Launch& l);

// Kronecker block: A, D as in innovation_kron; coef (B K,) contiguous; gram = F^T F
// (B K x B K, float64, contiguous). The target is (d_out x d_in), row-major.
void kron_update(KKType t, const void* a, int64_t lda, const void* d, int64_t sd0, int64_t sd1,
                 int64_t b, int64_t k, int64_t d_out, int64_t d_in, const double* coef,
                 const double* gram, bool acc64, const Target& target, Workspace& ws,
                 const Launch& l);

// param += P- * direction ; cov = rule(P-, diag), n contiguous elements each; direction and
// diag have dtype tt (F32 or F64).
void apply_terms(void* param, KKType pt, void* cov, KKType ct, const void* direction,
                 const void* diag, KKType tt, int64_t n, const bool* ok, const Update& u,
                 const Launch& l);

// ---- loss-observation mode: multi-tensor launches -------------------------------------
// One tensor of a multi-tensor call: contiguous arrays of `numel` elements.
struct LossTensor {
  void* param;        // null for the reduction
  const void* grad;
  void* cov;
  int64_t numel;
};

// Elements per block of the multi-tensor kernels (a multiple of the 4-element vector).
constexpr int64_t kLossChunk = 16384;

// out[0] (float64) = sum over every tensor of g^T P- g. Tensors are grouped by the caller
// into runs of one (grad, cov) dtype pair; `groups` lists them in order.
struct LossGroup {
  KKType param_t;
  KKType grad_t;
  KKType cov_t;
  std::vector<LossTensor> tensors;
};
void loss_quad_form(const std::vector<LossGroup>& groups, double inv_lam, double q, double* out,
                    Workspace& ws, const Launch& l);

// In place over every tensor when *ok: param += coef P- g; cov = rule(P-, weight g^2).
// grad_t equals param_t in every group. coef, weight: float64 device scalars.
void loss_step(const std::vector<LossGroup>& groups, const double* coef, const double* weight,
               const bool* ok, const Update& u, const Launch& l);

// The architectures the kernels were compiled for, e.g. "800,900" (nvcc's
// __CUDA_ARCH_LIST__), or "emulated".
const char* compiled_archs();

#if defined(KK_CUDA_EMULATE)
}  // namespace emulated
#endif
}  // namespace cuda
}  // namespace kalman_kernels
