// Operator layer of the cuda backend: the kernels of the ops of
// kalman_kernels/backends/library.py (defined there, from Python; semantics in
// kalman_kernels/backends/README.md). Argument checks (csrc/kk_checks.h, shared with the
// CPU operator layer), dtype and layout decisions, workspaces; the kernels are behind
// launch.h.
//
// Included by ops.cpp (the CUDA build: the kernels registered for the CUDA dispatch key of
// kalman_kernels::*) and by emulated.cpp (tests: the same code on CPU tensors through the
// kernel emulator). The includer defines before including:
//   KK_OPS_DEVICE_TYPE    the device type the tensors must have (c10::DeviceType::CUDA)
//   KK_OPS_LABEL          how messages name the backend ("cuda")
//   and the functions kk_ops_env::stream(device) -> void*, kk_ops_env::sms(device) -> int.
//
// Layout and dtype rules (none of them reads a tensor's value on the host):
//   * in-place tensors (param, weight, cov, params[i], covs[i]) must be contiguous; an error
//     names the argument otherwise;
//   * read-only inputs may be strided: a Jacobian / inputs / grad_outputs with unit stride
//     in the last dimension is read in place (any row stride), otherwise copied contiguous;
//   * accumulation is float64 when any operand is float64, else float32. Read-only inputs
//     are converted (copied) when the kernels need another dtype: a float32 Jacobian with
//     a float64 covariance is read as float64; Kronecker inputs A and D of different 16/32-bit
//     dtypes are read as float32; a loss-step gradient whose dtype differs from its
//     parameter's is converted to the parameter's dtype;
//   * coef, whitening and the loss step's coef / weight are read as float64 on the device.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "../kk_checks.h"
#include "launch.h"

namespace kalman_kernels {
namespace cuda_ops {
namespace {

namespace kc = ::kalman_kernels::cuda;

// Workspace memory from the tensors' allocator (the CUDA caching allocator: stream ordered,
// so it may be released once the launches are queued; graph-capture safe).
struct TensorWorkspace final : kc::Workspace {
  explicit TensorWorkspace(const at::TensorOptions& options) : options_(options.dtype(at::kByte)) {}
  void* get(size_t bytes) override {
    held_.push_back(at::empty({static_cast<int64_t>(bytes)}, options_));
    return held_.back().data_ptr();
  }

 private:
  at::TensorOptions options_;
  std::vector<at::Tensor> held_;
};

kc::Launch launch_for(const at::Device& device) {
  return kc::Launch{kk_ops_env::sms(device), kk_ops_env::stream(device)};
}

checks::Site site(const char* op) { return checks::Site{op, KK_OPS_LABEL, KK_OPS_DEVICE_TYPE}; }

bool is64(const at::Tensor& t) { return t.scalar_type() == at::kDouble; }
at::ScalarType acc_type(bool acc64) { return acc64 ? at::kDouble : at::kFloat; }
KKType kk(const at::Tensor& t, const char* op) { return checks::dtype_of(site(op), t, "input"); }

// A 2-D read-only input with unit stride in its last dimension, in the dtype the kernels
// read: float64 when accumulating in float64.
at::Tensor rows_input(at::Tensor t, bool acc64) {
  if (acc64 && !is64(t)) t = t.to(at::kDouble);
  if (t.size(-1) > 1 && t.stride(-1) != 1) t = t.contiguous();
  return t;
}

// Kronecker inputs A (B, d_in), D (B, K, d_out) in one dtype the kernels read.
std::pair<at::Tensor, at::Tensor> kron_inputs(at::Tensor a, at::Tensor d, bool acc64) {
  if (acc64) {
    a = a.to(at::kDouble);
    d = d.to(at::kDouble);
  } else if (a.scalar_type() != d.scalar_type()) {
    a = a.to(at::kFloat);
    d = d.to(at::kFloat);
  }
  return {rows_input(a, false), rows_input(d, false)};
}

kc::Update update_of(double forgetting, double process_noise, double cov_floor,
                     double cov_ceiling, bool information) {
  return kc::Update{1.0 / forgetting, process_noise, cov_floor, cov_ceiling, information};
}

// ---------------------------------------------------------------------------------------
at::Tensor innovation_cov_dense(const at::Tensor& jac, const at::Tensor& cov, double forgetting,
                                double process_noise) {
  const char* op = "innovation_cov_dense";
  const checks::Innovation x =
      checks::innovation_cov_dense(site(op), jac, cov, forgetting, process_noise);
  const int64_t m = jac.size(0), n = jac.size(1);
  const at::Tensor h = rows_input(jac, x.acc64);
  const at::Tensor c = cov.reshape({-1}).to(acc_type(x.acc64)).contiguous();
  c10::OptionalDeviceGuard guard(x.device);
  at::Tensor out = at::empty({m, m}, jac.options().dtype(at::kDouble));
  if (m == 0) return out;
  if (n == 0) return out.zero_();
  TensorWorkspace ws(jac.options());
  kc::innovation_dense(kk(h, op), h.const_data_ptr(), h.stride(0), m, n, c.const_data_ptr(),
                       x.acc64, 1.0 / forgetting, process_noise, out.mutable_data_ptr<double>(),
                       ws, launch_for(x.device));
  return out;
}

at::Tensor innovation_cov_kron(const at::Tensor& inputs, const at::Tensor& grad_outputs,
                               const at::Tensor& cov, double forgetting, double process_noise) {
  const char* op = "innovation_cov_kron";
  const checks::Innovation x =
      checks::innovation_cov_kron(site(op), inputs, grad_outputs, cov, forgetting, process_noise);
  const int64_t d_out = cov.size(0), d_in = cov.size(1);
  const auto ad = kron_inputs(inputs, grad_outputs, x.acc64);
  const at::Tensor& a = ad.first;
  const at::Tensor& d = ad.second;
  const at::Tensor c = cov.to(acc_type(x.acc64)).contiguous();
  const int64_t b = d.size(0), k = d.size(1), m = b * k;
  c10::OptionalDeviceGuard guard(x.device);
  at::Tensor out = at::empty({m, m}, inputs.options().dtype(at::kDouble));
  if (m == 0) return out;
  if (d_out == 0 || d_in == 0) return out.zero_();
  TensorWorkspace ws(inputs.options());
  kc::innovation_kron(kk(a, op), a.const_data_ptr(), a.stride(0), d.const_data_ptr(),
                      d.stride(0), d.stride(1), b, k, d_out, d_in, c.const_data_ptr(), x.acc64,
                      1.0 / forgetting, process_noise, out.mutable_data_ptr<double>(), ws,
                      launch_for(x.device));
  return out;
}

// Shared by fused_update_dense_ (target: param, cov) and step_terms_dense (target: u, d).
void dense_pass(const at::Tensor& jac, const at::Tensor& coef, const at::Tensor& whitening,
                bool acc64, const kc::Target& target, const at::Device& device, const char* op) {
  const at::Tensor h = rows_input(jac, acc64);
  const at::Tensor cf = coef.to(at::kDouble);
  const at::Tensor w = whitening.to(at::kDouble);
  TensorWorkspace ws(jac.options());
  kc::dense_update(kk(h, op), h.const_data_ptr(), h.stride(0), h.size(0), h.size(1),
                   cf.const_data_ptr<double>(), cf.stride(0), w.const_data_ptr<double>(),
                   w.stride(0), w.stride(1), acc64, target, ws, launch_for(device));
}

void fused_update_dense_(const at::Tensor& param, const at::Tensor& cov, const at::Tensor& jac,
                         const at::Tensor& coef, const at::Tensor& whitening, const at::Tensor& ok,
                         double forgetting, double process_noise, double cov_floor,
                         double cov_ceiling, bool information) {
  const char* op = "fused_update_dense_";
  const checks::Update x =
      checks::fused_update_dense_(site(op), param, cov, jac, coef, whitening, ok, forgetting,
                                  process_noise, cov_floor, cov_ceiling);
  kc::Target t;
  t.param = param.mutable_data_ptr();
  t.param_t = x.param;
  t.cov = cov.mutable_data_ptr();
  t.cov_t = x.cov;
  t.ok = ok.const_data_ptr<bool>();
  t.hyper = update_of(forgetting, process_noise, cov_floor, cov_ceiling, information);
  c10::OptionalDeviceGuard guard(x.device);
  dense_pass(jac, coef, whitening, x.acc64, t, x.device, op);
}

std::tuple<at::Tensor, at::Tensor> step_terms_dense(const at::Tensor& jac, const at::Tensor& coef,
                                                    const at::Tensor& whitening) {
  const char* op = "step_terms_dense";
  const checks::Terms x = checks::step_terms_dense(site(op), jac, coef, whitening);
  const int64_t n = jac.size(1);
  c10::OptionalDeviceGuard guard(x.device);
  at::Tensor u = at::empty({n}, jac.options().dtype(acc_type(x.acc64)));
  at::Tensor d = at::empty({n}, jac.options().dtype(acc_type(x.acc64)));
  kc::Target t;
  t.u = u.mutable_data_ptr();
  t.d = d.mutable_data_ptr();
  dense_pass(jac, coef, whitening, x.acc64, t, x.device, op);
  return {u, d};
}

// Shared by fused_update_kron_ and step_terms_kron.
void kron_pass(const at::Tensor& inputs, const at::Tensor& grad_outputs, const at::Tensor& coef,
               const at::Tensor& whitening, bool acc64, const kc::Target& target,
               const at::Device& device, const char* op) {
  const auto ad = kron_inputs(inputs, grad_outputs, acc64);
  const at::Tensor& a = ad.first;
  const at::Tensor& d = ad.second;
  const at::Tensor cf = coef.to(at::kDouble).contiguous();
  const at::Tensor w = whitening.to(at::kDouble);
  const at::Tensor gram = at::mm(w.t(), w).contiguous();  // W = F^T F (m x m, float64)
  TensorWorkspace ws(inputs.options());
  kc::kron_update(kk(a, op), a.const_data_ptr(), a.stride(0), d.const_data_ptr(), d.stride(0),
                  d.stride(1), d.size(0), d.size(1), d.size(2), a.size(1),
                  cf.const_data_ptr<double>(), gram.const_data_ptr<double>(), acc64, target, ws,
                  launch_for(device));
}

void fused_update_kron_(const at::Tensor& weight, const at::Tensor& cov, const at::Tensor& inputs,
                        const at::Tensor& grad_outputs, const at::Tensor& coef,
                        const at::Tensor& whitening, const at::Tensor& ok, double forgetting,
                        double process_noise, double cov_floor, double cov_ceiling,
                        bool information) {
  const char* op = "fused_update_kron_";
  const checks::Update x =
      checks::fused_update_kron_(site(op), weight, cov, inputs, grad_outputs, coef, whitening, ok,
                                 forgetting, process_noise, cov_floor, cov_ceiling);
  kc::Target t;
  t.param = weight.mutable_data_ptr();
  t.param_t = x.param;
  t.cov = cov.mutable_data_ptr();
  t.cov_t = x.cov;
  t.ok = ok.const_data_ptr<bool>();
  t.hyper = update_of(forgetting, process_noise, cov_floor, cov_ceiling, information);
  c10::OptionalDeviceGuard guard(x.device);
  kron_pass(inputs, grad_outputs, coef, whitening, x.acc64, t, x.device, op);
}

std::tuple<at::Tensor, at::Tensor> step_terms_kron(const at::Tensor& inputs,
                                                   const at::Tensor& grad_outputs,
                                                   const at::Tensor& coef,
                                                   const at::Tensor& whitening) {
  const char* op = "step_terms_kron";
  const checks::Terms x = checks::step_terms_kron(site(op), inputs, grad_outputs, coef, whitening);
  const int64_t d_out = grad_outputs.size(2), d_in = inputs.size(1);
  c10::OptionalDeviceGuard guard(x.device);
  at::Tensor u = at::empty({d_out, d_in}, inputs.options().dtype(acc_type(x.acc64)));
  at::Tensor d = at::empty({d_out, d_in}, inputs.options().dtype(acc_type(x.acc64)));
  kc::Target t;
  t.u = u.mutable_data_ptr();
  t.d = d.mutable_data_ptr();
  kron_pass(inputs, grad_outputs, coef, whitening, x.acc64, t, x.device, op);
  return {u, d};
}

void apply_terms_(const at::Tensor& param, const at::Tensor& cov, const at::Tensor& direction,
                  const at::Tensor& diag_term, const at::Tensor& ok, double forgetting,
                  double process_noise, double cov_floor, double cov_ceiling, bool information) {
  const checks::Apply x =
      checks::apply_terms_(site("apply_terms_"), param, cov, direction, diag_term, ok, forgetting,
                           process_noise, cov_floor, cov_ceiling);
  const at::Tensor dir = direction.reshape({-1}).to(acc_type(x.terms64)).contiguous();
  const at::Tensor diag = diag_term.reshape({-1}).to(acc_type(x.terms64)).contiguous();
  c10::OptionalDeviceGuard guard(x.device);
  kc::apply_terms(param.mutable_data_ptr(), x.param, cov.mutable_data_ptr(), x.cov,
                  dir.const_data_ptr(), diag.const_data_ptr(),
                  x.terms64 ? KKType::F64 : KKType::F32, param.numel(), ok.const_data_ptr<bool>(),
                  update_of(forgetting, process_noise, cov_floor, cov_ceiling, information),
                  launch_for(x.device));
}

// Tensors of a multi-tensor call grouped by dtypes, in order of first appearance; `keep`
// holds converted copies alive until the launches are queued.
std::vector<kc::LossGroup> group_tensors(const std::vector<kc::LossGroup>& singles) {
  std::vector<kc::LossGroup> groups;
  for (const kc::LossGroup& s : singles) {
    kc::LossGroup* found = nullptr;
    for (kc::LossGroup& g : groups) {
      if (g.param_t == s.param_t && g.grad_t == s.grad_t && g.cov_t == s.cov_t) found = &g;
    }
    if (found == nullptr) {
      groups.push_back(kc::LossGroup{s.param_t, s.grad_t, s.cov_t, {}});
      found = &groups.back();
    }
    found->tensors.insert(found->tensors.end(), s.tensors.begin(), s.tensors.end());
  }
  return groups;
}

at::Tensor loss_quad_form(at::TensorList grads, at::TensorList covs, double forgetting,
                          double process_noise) {
  const checks::Lists x =
      checks::loss_quad_form(site("loss_quad_form"), grads, covs, forgetting, process_noise);
  std::vector<at::Tensor> keep;
  std::vector<kc::LossGroup> singles;
  for (size_t i = 0; i < grads.size(); ++i) {
    keep.push_back(grads[i].contiguous());
    keep.push_back(covs[i].contiguous());
    const at::Tensor& g = keep[keep.size() - 2];
    const at::Tensor& c = keep.back();
    singles.push_back(kc::LossGroup{x.grad[i], x.grad[i], x.cov[i],
                                    {kc::LossTensor{nullptr, g.const_data_ptr(),
                                                    const_cast<void*>(c.const_data_ptr()),
                                                    g.numel()}}});
  }
  c10::OptionalDeviceGuard guard(x.device);
  at::Tensor out = at::empty({}, grads[0].options().dtype(at::kDouble));
  TensorWorkspace ws(grads[0].options());
  kc::loss_quad_form(group_tensors(singles), 1.0 / forgetting, process_noise,
                     out.mutable_data_ptr<double>(), ws, launch_for(x.device));
  return out;
}

void loss_step_(at::TensorList params, at::TensorList grads, at::TensorList covs,
                const at::Tensor& coef, const at::Tensor& weight, const at::Tensor& ok,
                double forgetting, double process_noise, double cov_floor, double cov_ceiling,
                bool information) {
  const checks::Lists x =
      checks::loss_step_(site("loss_step_"), params, grads, covs, coef, weight, ok, forgetting,
                         process_noise, cov_floor, cov_ceiling);
  if (params.empty()) return;
  const at::Tensor cf = coef.to(at::kDouble).contiguous();
  const at::Tensor wt = weight.to(at::kDouble).contiguous();
  std::vector<at::Tensor> keep;
  std::vector<kc::LossGroup> singles;
  for (size_t i = 0; i < params.size(); ++i) {
    // a gradient whose dtype differs from its parameter's is read in the parameter's
    keep.push_back(grads[i].to(params[i].scalar_type()).contiguous());
    singles.push_back(kc::LossGroup{x.param[i], x.param[i], x.cov[i],
                                    {kc::LossTensor{params[i].mutable_data_ptr(),
                                                    keep.back().const_data_ptr(),
                                                    covs[i].mutable_data_ptr(),
                                                    params[i].numel()}}});
  }
  c10::OptionalDeviceGuard guard(x.device);
  kc::loss_step(group_tensors(singles), cf.const_data_ptr<double>(), wt.const_data_ptr<double>(),
                ok.const_data_ptr<bool>(),
                update_of(forgetting, process_noise, cov_floor, cov_ceiling, information),
                launch_for(x.device));
}

void register_kernels(torch::Library& m) {
  m.impl("innovation_cov_dense", &innovation_cov_dense);
  m.impl("innovation_cov_kron", &innovation_cov_kron);
  m.impl("fused_update_dense_", &fused_update_dense_);
  m.impl("fused_update_kron_", &fused_update_kron_);
  m.impl("loss_quad_form", &loss_quad_form);
  m.impl("loss_step_", &loss_step_);
  m.impl("step_terms_dense", &step_terms_dense);
  m.impl("step_terms_kron", &step_terms_kron);
  m.impl("apply_terms_", &apply_terms_);
}

}  // namespace
}  // namespace cuda_ops
}  // namespace kalman_kernels
