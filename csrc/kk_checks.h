// Argument checks of the kernel ops, for both C++ operator layers: csrc/ops.cpp (cpp backend,
// CPU) and csrc/cuda/ops_impl.h (cuda backend, and its CPU emulation). The rules and the
// messages are those of the checks in kalman_kernels/backends/library.py, which the fakes,
// the default kernel and the Triton launchers run (docs/design.md, 4.3): one function per op
// checks devices, shapes, dtypes, in-place contiguity, `ok` and the hyper-parameters, and
// returns what the kernels route on (the device, each operand's KKType, whether to
// accumulate in float64: when any operand is float64). Metadata only: nothing here reads a
// tensor's value.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "kk_dtype.h"

namespace kalman_kernels {
namespace checks {
// Internal linkage: the CPU extension and the emulated CUDA build (tests) may both be
// loaded into one process, each with the copy it was compiled with.
namespace {

// Where a check runs: the op (messages name it), the backend, the device type it serves.
struct Site {
  const char* op;
  const char* backend;
  c10::DeviceType device_type;
};

#define KK_ARG_CHECK(site, cond, ...) \
  TORCH_CHECK((cond), "kalman_kernels::", (site).op, ": ", __VA_ARGS__)

inline bool is64(KKType t) { return t == KKType::F64; }

// Parameters, Jacobians, gradients, Kronecker factors: the four floating dtypes.
inline KKType dtype_of(const Site& s, const at::Tensor& t, const std::string& name) {
  switch (t.scalar_type()) {
    case at::kFloat: return KKType::F32;
    case at::kDouble: return KKType::F64;
    case at::kBFloat16: return KKType::BF16;
    case at::kHalf: return KKType::F16;
    default:
      KK_ARG_CHECK(s, false, name, " must be float32, float64, float16 or bfloat16, got ",
                   t.scalar_type());
  }
  return KKType::F32;  // not reached
}

// Covariances, filter terms, step terms: float32 or float64.
inline KKType cov_dtype_of(const Site& s, const at::Tensor& t, const std::string& name) {
  KK_ARG_CHECK(s, t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
               " must be float32 or float64, got ", t.scalar_type());
  return t.scalar_type() == at::kDouble ? KKType::F64 : KKType::F32;
}

// The device of the op's first tensor, which must be of the backend's device type.
inline at::Device device_of(const Site& s, const at::Tensor& first, const std::string& name) {
  TORCH_CHECK(first.device().type() == s.device_type, "kalman_kernels::", s.op, " (", s.backend,
              " backend): ", name, " is a ", first.device().type(),
              " tensor; every tensor must be on a ", c10::DeviceType(s.device_type), " device");
  return first.device();
}

inline void on(const Site& s, const at::Tensor& t, const at::Device& device,
               const std::string& name) {
  KK_ARG_CHECK(s, t.device() == device, "all tensors must be on one device; ", name, " is on ",
               t.device(), ", the first tensor on ", device);
}

// Updated in place: a kernel writes the storage as one flat array, and a copy would drop
// the update.
inline void inplace(const Site& s, const at::Tensor& t, const std::string& name) {
  KK_ARG_CHECK(s, t.is_contiguous(), name, " is updated in place and must be contiguous (shape ",
               t.sizes(), ", strides ", t.strides(), "); keep the state in contiguous storage");
}

inline void ok_arg(const Site& s, const at::Tensor& ok, const at::Device& device) {
  on(s, ok, device, "ok");
  KK_ARG_CHECK(s, ok.dim() == 0 && ok.scalar_type() == at::kBool,
               "ok must be a 0-d bool tensor (the step's skip predicate), got ", ok.scalar_type(),
               " of shape ", ok.sizes());
}

inline void hyper(const Site& s, double forgetting, double process_noise) {
  KK_ARG_CHECK(s, std::isfinite(forgetting) && forgetting > 0.0,
               "forgetting must be finite and > 0, got ", forgetting);
  KK_ARG_CHECK(s, std::isfinite(process_noise), "process_noise must be finite, got ",
               process_noise);
}

inline void update_hyper(const Site& s, double forgetting, double process_noise,
                         double cov_floor, double cov_ceiling) {
  hyper(s, forgetting, process_noise);
  KK_ARG_CHECK(s, !std::isnan(cov_floor) && !std::isnan(cov_ceiling),
               "cov_floor / cov_ceiling must not be NaN");
}

inline KKType dense(const Site& s, const at::Tensor& jac, int64_t n, const char* n_from) {
  KK_ARG_CHECK(s, jac.dim() == 2, "jac must be (m, n), got ", jac.sizes());
  KK_ARG_CHECK(s, jac.size(1) == n, "jac must be (m, n) with n = ", n, " (", n_from, "), got ",
               jac.sizes());
  return dtype_of(s, jac, "jac");
}

// inputs (B, d_in) and grad_outputs (B, K, d_out); `what` (the covariance or the weight),
// when given, must be (d_out, d_in).
inline void kron(const Site& s, const at::Tensor& inputs, const at::Tensor& grad_outputs,
                 const at::Tensor* what = nullptr, const char* what_name = nullptr) {
  KK_ARG_CHECK(s, inputs.dim() == 2 && grad_outputs.dim() == 3,
               "inputs must be (B, d_in) and grad_outputs (B, K, d_out), got ", inputs.sizes(),
               " and ", grad_outputs.sizes());
  KK_ARG_CHECK(s, inputs.size(0) == grad_outputs.size(0), "inputs has ", inputs.size(0),
               " rows, grad_outputs ", grad_outputs.size(0));
  if (what != nullptr) {
    KK_ARG_CHECK(s, what->dim() == 2 && what->size(0) == grad_outputs.size(2) &&
                        what->size(1) == inputs.size(1),
                 what_name, " must be (d_out, d_in) = (", grad_outputs.size(2), ", ",
                 inputs.size(1), ") for inputs (B, d_in) and grad_outputs (B, K, d_out), got ",
                 what->sizes());
  }
}

inline void terms(const Site& s, const at::Tensor& coef, const at::Tensor& whitening, int64_t m,
                  const at::Device& device) {
  on(s, coef, device, "coef");
  on(s, whitening, device, "whitening");
  KK_ARG_CHECK(s, coef.dim() == 1 && coef.size(0) == m, "coef must be (m,) = (", m, ",), got ",
               coef.sizes());
  KK_ARG_CHECK(s, whitening.dim() == 2 && whitening.size(0) == m && whitening.size(1) == m,
               "whitening must be (m, m) = (", m, ", ", m, "), got ", whitening.sizes());
  cov_dtype_of(s, coef, "coef");
  cov_dtype_of(s, whitening, "whitening");
}

inline void numel(const Site& s, const at::Tensor& t, int64_t n, const char* name) {
  KK_ARG_CHECK(s, t.numel() == n, name, " has ", t.numel(), " elements, the parameter ", n);
}

inline std::string item(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

// ---------------------------------------------------------------------------------------
// One function per op (the signatures of kalman_kernels/backends/library.py's SCHEMAS)
// ---------------------------------------------------------------------------------------
struct Innovation {
  at::Device device;
  KKType a, b, cov;  // dense: a = jac; Kronecker: a = inputs, b = grad_outputs
  bool acc64;
};

inline Innovation innovation_cov_dense(const Site& s, const at::Tensor& jac, const at::Tensor& cov,
                                       double forgetting, double process_noise) {
  const at::Device device = device_of(s, jac, "jac");
  on(s, cov, device, "cov");
  const KKType jt = dense(s, jac, cov.numel(), "cov's elements");
  const KKType ct = cov_dtype_of(s, cov, "cov");
  hyper(s, forgetting, process_noise);
  return Innovation{device, jt, jt, ct, is64(jt) || is64(ct)};
}

inline Innovation innovation_cov_kron(const Site& s, const at::Tensor& inputs,
                                      const at::Tensor& grad_outputs, const at::Tensor& cov,
                                      double forgetting, double process_noise) {
  const at::Device device = device_of(s, inputs, "inputs");
  on(s, grad_outputs, device, "grad_outputs");
  on(s, cov, device, "cov");
  kron(s, inputs, grad_outputs, &cov, "cov");
  const KKType at_ = dtype_of(s, inputs, "inputs");
  const KKType dt = dtype_of(s, grad_outputs, "grad_outputs");
  const KKType ct = cov_dtype_of(s, cov, "cov");
  hyper(s, forgetting, process_noise);
  return Innovation{device, at_, dt, ct, is64(at_) || is64(dt) || is64(ct)};
}

struct Update {
  at::Device device;
  KKType param, cov, a, b;  // dense: a = jac; Kronecker: a = inputs, b = grad_outputs
  bool acc64;
};

inline Update fused_update_dense_(const Site& s, const at::Tensor& param, const at::Tensor& cov,
                                  const at::Tensor& jac, const at::Tensor& coef,
                                  const at::Tensor& whitening, const at::Tensor& ok,
                                  double forgetting, double process_noise, double cov_floor,
                                  double cov_ceiling) {
  const at::Device device = device_of(s, param, "param");
  on(s, cov, device, "cov");
  on(s, jac, device, "jac");
  inplace(s, param, "param");
  inplace(s, cov, "cov");
  numel(s, cov, param.numel(), "cov");
  const KKType jt = dense(s, jac, param.numel(), "the parameter's elements");
  terms(s, coef, whitening, jac.size(0), device);
  ok_arg(s, ok, device);
  const KKType pt = dtype_of(s, param, "param");
  const KKType ct = cov_dtype_of(s, cov, "cov");
  update_hyper(s, forgetting, process_noise, cov_floor, cov_ceiling);
  return Update{device, pt, ct, jt, jt, is64(pt) || is64(ct) || is64(jt)};
}

inline Update fused_update_kron_(const Site& s, const at::Tensor& weight, const at::Tensor& cov,
                                 const at::Tensor& inputs, const at::Tensor& grad_outputs,
                                 const at::Tensor& coef, const at::Tensor& whitening,
                                 const at::Tensor& ok, double forgetting, double process_noise,
                                 double cov_floor, double cov_ceiling) {
  const at::Device device = device_of(s, weight, "weight");
  on(s, cov, device, "cov");
  on(s, inputs, device, "inputs");
  on(s, grad_outputs, device, "grad_outputs");
  KK_ARG_CHECK(s, weight.dim() == 2 && cov.sizes() == weight.sizes(),
               "weight must be 2-D and cov of its shape, got ", weight.sizes(), " and ",
               cov.sizes());
  inplace(s, weight, "weight");
  inplace(s, cov, "cov");
  kron(s, inputs, grad_outputs, &weight, "weight");
  terms(s, coef, whitening, grad_outputs.size(0) * grad_outputs.size(1), device);
  ok_arg(s, ok, device);
  const KKType at_ = dtype_of(s, inputs, "inputs");
  const KKType dt = dtype_of(s, grad_outputs, "grad_outputs");
  const KKType wt = dtype_of(s, weight, "weight");
  const KKType ct = cov_dtype_of(s, cov, "cov");
  update_hyper(s, forgetting, process_noise, cov_floor, cov_ceiling);
  return Update{device, wt, ct, at_, dt, is64(wt) || is64(ct) || is64(at_) || is64(dt)};
}

struct Terms {
  at::Device device;
  KKType a, b;  // dense: a = jac; Kronecker: a = inputs, b = grad_outputs
  bool acc64;
};

inline Terms step_terms_dense(const Site& s, const at::Tensor& jac, const at::Tensor& coef,
                              const at::Tensor& whitening) {
  const at::Device device = device_of(s, jac, "jac");
  KK_ARG_CHECK(s, jac.dim() == 2, "jac must be (m, n), got ", jac.sizes());
  const KKType jt = dtype_of(s, jac, "jac");
  terms(s, coef, whitening, jac.size(0), device);
  return Terms{device, jt, jt, is64(jt)};
}

inline Terms step_terms_kron(const Site& s, const at::Tensor& inputs,
                             const at::Tensor& grad_outputs, const at::Tensor& coef,
                             const at::Tensor& whitening) {
  const at::Device device = device_of(s, inputs, "inputs");
  on(s, grad_outputs, device, "grad_outputs");
  kron(s, inputs, grad_outputs);
  const KKType at_ = dtype_of(s, inputs, "inputs");
  const KKType dt = dtype_of(s, grad_outputs, "grad_outputs");
  terms(s, coef, whitening, grad_outputs.size(0) * grad_outputs.size(1), device);
  return Terms{device, at_, dt, is64(at_) || is64(dt)};
}

struct Apply {
  at::Device device;
  KKType param, cov, direction, diag_term;
  bool acc64;    // any operand float64
  bool terms64;  // direction or diag_term float64
};

inline Apply apply_terms_(const Site& s, const at::Tensor& param, const at::Tensor& cov,
                          const at::Tensor& direction, const at::Tensor& diag_term,
                          const at::Tensor& ok, double forgetting, double process_noise,
                          double cov_floor, double cov_ceiling) {
  const at::Device device = device_of(s, param, "param");
  on(s, cov, device, "cov");
  on(s, direction, device, "direction");
  on(s, diag_term, device, "diag_term");
  inplace(s, param, "param");
  inplace(s, cov, "cov");
  const int64_t n = param.numel();
  numel(s, cov, n, "cov");
  numel(s, direction, n, "direction");
  numel(s, diag_term, n, "diag_term");
  ok_arg(s, ok, device);
  const KKType pt = dtype_of(s, param, "param");
  const KKType ct = cov_dtype_of(s, cov, "cov");
  const KKType ut = cov_dtype_of(s, direction, "direction");
  const KKType dt = cov_dtype_of(s, diag_term, "diag_term");
  update_hyper(s, forgetting, process_noise, cov_floor, cov_ceiling);
  return Apply{device, pt, ct, ut, dt, is64(pt) || is64(ct) || is64(ut) || is64(dt),
               is64(ut) || is64(dt)};
}

// Tensor lists: per tensor the dtypes of (param, grad, cov), any of them float64.
struct Lists {
  at::Device device;
  std::vector<KKType> param, grad, cov;
  bool any64;
};

inline Lists loss_quad_form(const Site& s, at::TensorList grads, at::TensorList covs,
                            double forgetting, double process_noise) {
  KK_ARG_CHECK(s, grads.size() == covs.size(), "grads, covs differ in length (", grads.size(),
               ", ", covs.size(), ")");
  KK_ARG_CHECK(s, !grads.empty(), "empty tensor lists (the wrapper answers them without a "
               "kernel)");
  Lists out{device_of(s, grads[0], "grads[0]"), {}, {}, {}, false};
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::string gi = item("grads", i), ci = item("covs", i);
    on(s, grads[i], out.device, gi);
    on(s, covs[i], out.device, ci);
    KK_ARG_CHECK(s, covs[i].numel() == grads[i].numel(), ci, " has ", covs[i].numel(),
                 " elements, ", gi, " ", grads[i].numel());
    out.grad.push_back(dtype_of(s, grads[i], gi));
    out.cov.push_back(cov_dtype_of(s, covs[i], ci));
    out.any64 = out.any64 || is64(out.grad.back()) || is64(out.cov.back());
  }
  hyper(s, forgetting, process_noise);
  return out;
}

inline Lists loss_step_(const Site& s, at::TensorList params, at::TensorList grads,
                        at::TensorList covs, const at::Tensor& coef, const at::Tensor& weight,
                        const at::Tensor& ok, double forgetting, double process_noise,
                        double cov_floor, double cov_ceiling) {
  KK_ARG_CHECK(s, params.size() == grads.size() && params.size() == covs.size(),
               "params, grads, covs differ in length (", params.size(), ", ", grads.size(), ", ",
               covs.size(), ")");
  const at::Device device = params.empty() ? ok.device() : device_of(s, params[0], "params[0]");
  Lists out{device, {}, {}, {}, false};
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string pi = item("params", i), gi = item("grads", i), ci = item("covs", i);
    on(s, params[i], device, pi);
    on(s, grads[i], device, gi);
    on(s, covs[i], device, ci);
    inplace(s, params[i], pi);
    inplace(s, covs[i], ci);
    KK_ARG_CHECK(s, grads[i].numel() == params[i].numel(), gi, " has ", grads[i].numel(),
                 " elements, ", pi, " ", params[i].numel());
    KK_ARG_CHECK(s, covs[i].numel() == params[i].numel(), ci, " has ", covs[i].numel(),
                 " elements, ", pi, " ", params[i].numel());
    out.param.push_back(dtype_of(s, params[i], pi));
    out.grad.push_back(dtype_of(s, grads[i], gi));
    out.cov.push_back(cov_dtype_of(s, covs[i], ci));
    out.any64 = out.any64 || is64(out.param.back()) || is64(out.cov.back());
  }
  on(s, coef, device, "coef");
  on(s, weight, device, "weight");
  KK_ARG_CHECK(s, coef.numel() == 1 && weight.numel() == 1,
               "coef and weight must be scalars, got ", coef.sizes(), " and ", weight.sizes());
  ok_arg(s, ok, device);
  update_hyper(s, forgetting, process_noise, cov_floor, cov_ceiling);
  return out;
}

#undef KK_ARG_CHECK

}  // namespace
}  // namespace checks
}  // namespace kalman_kernels
