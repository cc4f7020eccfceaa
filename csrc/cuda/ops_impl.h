// Operator layer of the cuda backend: the kernels of the ops of
// kalman_kernels/backends/schema.py (defined there, from Python; semantics in
// kalman_kernels/backends/README.md). Argument checks with messages that name the
// argument, dtype and layout decisions, workspaces; the kernels are behind launch.h.
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

void check_device(const at::Tensor& t, const at::Device& device, const char* op,
                  const char* name) {
  TORCH_CHECK(t.device().type() == KK_OPS_DEVICE_TYPE, "kalman_kernels::", op, " (", KK_OPS_LABEL,
              " backend): ", name, " is a ", t.device().type(), " tensor; every tensor must be on a ",
              c10::DeviceType(KK_OPS_DEVICE_TYPE), " device");
  TORCH_CHECK(t.device() == device, "kalman_kernels::", op, ": all tensors must be on one device; ",
              name, " is on ", t.device(), ", the first tensor on ", device);
}

kc::Dt dt_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kc::Dt::F32;
    case at::kDouble: return kc::Dt::F64;
    case at::kHalf: return kc::Dt::F16;
    case at::kBFloat16: return kc::Dt::BF16;
    default:
      TORCH_CHECK(false, "kalman_kernels::", op, ": ", name,
                  " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

kc::Dt cov_dt(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "kalman_kernels::", op, ": ", name, " must be float32 or float64, got ",
              t.scalar_type());
  return t.scalar_type() == at::kDouble ? kc::Dt::F64 : kc::Dt::F32;
}

void check_inplace(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK(t.is_contiguous(), "kalman_kernels::", op, " (", KK_OPS_LABEL, " backend): ", name,
              " is updated in place and must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), "); keep the state in contiguous storage");
}

void check_ok(const at::Tensor& ok, const at::Device& device, const char* op) {
  check_device(ok, device, op, "ok");
  TORCH_CHECK(ok.dim() == 0 && ok.scalar_type() == at::kBool, "kalman_kernels::", op,
              ": ok must be a 0-d bool tensor, got ", ok.scalar_type(), " of shape ", ok.sizes());
}

void check_hyper(double forgetting, const char* op) {
  TORCH_CHECK(forgetting > 0.0, "kalman_kernels::", op, ": forgetting must be > 0, got ",
              forgetting);
}

bool is64(const at::Tensor& t) { return t.scalar_type() == at::kDouble; }
at::ScalarType acc_type(bool acc64) { return acc64 ? at::kDouble : at::kFloat; }

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

void check_kron(const at::Tensor& inputs, const at::Tensor& grad_outputs, int64_t d_out,
                int64_t d_in, const char* op) {
  TORCH_CHECK(inputs.dim() == 2, "kalman_kernels::", op, ": inputs must be (B, d_in), got ",
              inputs.sizes());
  TORCH_CHECK(grad_outputs.dim() == 3, "kalman_kernels::", op,
              ": grad_outputs must be (B, K, d_out), got ", grad_outputs.sizes());
  TORCH_CHECK(inputs.size(0) == grad_outputs.size(0), "kalman_kernels::", op, ": inputs has ",
              inputs.size(0), " rows, grad_outputs ", grad_outputs.size(0));
  TORCH_CHECK(inputs.size(1) == d_in && grad_outputs.size(2) == d_out, "kalman_kernels::", op,
              ": inputs (B, ", inputs.size(1), ") and grad_outputs (B, K, ", grad_outputs.size(2),
              ") do not match a (", d_out, ", ", d_in, ") weight");
}

void check_coef(const at::Tensor& coef, const at::Tensor& whitening, int64_t m,
                const at::Device& device, const char* op) {
  check_device(coef, device, op, "coef");
  check_device(whitening, device, op, "whitening");
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == m, "kalman_kernels::", op,
              ": coef must be (m,) = (", m, ",), got ", coef.sizes());
  TORCH_CHECK(whitening.dim() == 2 && whitening.size(0) == m && whitening.size(1) == m,
              "kalman_kernels::", op, ": whitening must be (m, m) = (", m, ", ", m, "), got ",
              whitening.sizes());
  dt_of(coef, op, "coef");
  dt_of(whitening, op, "whitening");
}

kc::Update update_of(double forgetting, double process_noise, double cov_floor,
                     double cov_ceiling, bool information) {
  return kc::Update{1.0 / forgetting, process_noise, cov_floor, cov_ceiling, information};
}

// ---------------------------------------------------------------------------------------
at::Tensor innovation_cov_dense(const at::Tensor& jac, const at::Tensor& cov, double forgetting,
                                double process_noise) {
  const char* op = "innovation_cov_dense";
  const at::Device device = jac.device();
  check_device(jac, device, op, "jac");
  check_device(cov, device, op, "cov");
  check_hyper(forgetting, op);
  TORCH_CHECK(jac.dim() == 2, "kalman_kernels::", op, ": jac must be (m, n), got ", jac.sizes());
  const int64_t m = jac.size(0), n = jac.size(1);
  TORCH_CHECK(cov.numel() == n, "kalman_kernels::", op, ": jac has ", n, " columns, cov ",
              cov.numel(), " elements");
  dt_of(jac, op, "jac");
  cov_dt(cov, op, "cov");
  const bool acc64 = is64(jac) || is64(cov);
  const at::Tensor h = rows_input(jac, acc64);
  const at::Tensor c = cov.reshape({-1}).to(acc_type(acc64)).contiguous();
  c10::OptionalDeviceGuard guard(device);
  at::Tensor out = at::empty({m, m}, jac.options().dtype(at::kDouble));
  if (m == 0) return out;
  if (n == 0) return out.zero_();
  TensorWorkspace ws(jac.options());
  kc::innovation_dense(dt_of(h, op, "jac"), h.const_data_ptr(), h.stride(0), m, n,
                       c.const_data_ptr(), acc64, 1.0 / forgetting, process_noise,
                       out.mutable_data_ptr<double>(), ws, launch_for(device));
  return out;
}

at::Tensor innovation_cov_kron(const at::Tensor& inputs, const at::Tensor& grad_outputs,
                               const at::Tensor& cov, double forgetting, double process_noise) {
  const char* op = "innovation_cov_kron";
  const at::Device device = inputs.device();
  check_device(inputs, device, op, "inputs");
  check_device(grad_outputs, device, op, "grad_outputs");
  check_device(cov, device, op, "cov");
  check_hyper(forgetting, op);
  TORCH_CHECK(cov.dim() == 2, "kalman_kernels::", op, ": cov must be (d_out, d_in), got ",
              cov.sizes());
  const int64_t d_out = cov.size(0), d_in = cov.size(1);
  check_kron(inputs, grad_outputs, d_out, d_in, op);
  dt_of(inputs, op, "inputs");
  dt_of(grad_outputs, op, "grad_outputs");
  cov_dt(cov, op, "cov");
  const bool acc64 = is64(inputs) || is64(grad_outputs) || is64(cov);
  const auto ad = kron_inputs(inputs, grad_outputs, acc64);
  const at::Tensor& a = ad.first;
  const at::Tensor& d = ad.second;
  const at::Tensor c = cov.to(acc_type(acc64)).contiguous();
  const int64_t b = d.size(0), k = d.size(1), m = b * k;
  c10::OptionalDeviceGuard guard(device);
  at::Tensor out = at::empty({m, m}, inputs.options().dtype(at::kDouble));
  if (m == 0) return out;
  if (d_out == 0 || d_in == 0) return out.zero_();
  TensorWorkspace ws(inputs.options());
  kc::innovation_kron(dt_of(a, op, "inputs"), a.const_data_ptr(), a.stride(0), d.const_data_ptr(),
                      d.stride(0), d.stride(1), b, k, d_out, d_in, c.const_data_ptr(), acc64,
                      1.0 / forgetting, process_noise, out.mutable_data_ptr<double>(), ws,
                      launch_for(device));
  return out;
}

// Shared by fused_update_dense_ (target: param, cov) and step_terms_dense (target: u, d).
void dense_pass(const at::Tensor& jac, const at::Tensor& coef, const at::Tensor& whitening,
                bool acc64, const kc::Target& target, const at::Device& device, const char* op) {
  const at::Tensor h = rows_input(jac, acc64);
  const at::Tensor cf = coef.to(at::kDouble);
  const at::Tensor w = whitening.to(at::kDouble);
  TensorWorkspace ws(jac.options());
  kc::dense_update(dt_of(h, op, "jac"), h.const_data_ptr(), h.stride(0), h.size(0), h.size(1),
                   cf.const_data_ptr<double>(), cf.stride(0), w.const_data_ptr<double>(),
                   w.stride(0), w.stride(1), acc64, target, ws, launch_for(device));
}

void fused_update_dense_(const at::Tensor& param, const at::Tensor& cov, const at::Tensor& jac,
                         const at::Tensor& coef, const at::Tensor& whitening, const at::Tensor& ok,
                         double forgetting, double process_noise, double cov_floor,
                         double cov_ceiling, bool information) {
  const char* op = "fused_update_dense_";
  const at::Device device = param.device();
  check_device(param, device, op, "param");
  check_device(cov, device, op, "cov");
  check_device(jac, device, op, "jac");
  check_inplace(param, op, "param");
  check_inplace(cov, op, "cov");
  check_hyper(forgetting, op);
  const int64_t n = param.numel();
  TORCH_CHECK(cov.numel() == n, "kalman_kernels::", op, ": cov has ", cov.numel(),
              " elements, param ", n);
  TORCH_CHECK(jac.dim() == 2 && jac.size(1) == n, "kalman_kernels::", op,
              ": jac must be (m, ", n, ") for a parameter of ", n, " elements, got ", jac.sizes());
  check_coef(coef, whitening, jac.size(0), device, op);
  check_ok(ok, device, op);
  dt_of(jac, op, "jac");
  kc::Target t;
  t.param = param.mutable_data_ptr();
  t.param_t = dt_of(param, op, "param");
  t.cov = cov.mutable_data_ptr();
  t.cov_t = cov_dt(cov, op, "cov");
  t.ok = ok.const_data_ptr<bool>();
  t.hyper = update_of(forgetting, process_noise, cov_floor, cov_ceiling, information);
  c10::OptionalDeviceGuard guard(device);
  dense_pass(jac, coef, whitening, is64(param) || is64(cov) || is64(jac), t, device, op);
}

std::tuple<at::Tensor, at::Tensor> step_terms_dense(const at::Tensor& jac, const at::Tensor& coef,
                                                    const at::Tensor& whitening) {
  const char* op = "step_terms_dense";
  const at::Device device = jac.device();
  check_device(jac, device, op, "jac");
  TORCH_CHECK(jac.dim() == 2, "kalman_kernels::", op, ": jac must be (m, n), got ", jac.sizes());
  check_coef(coef, whitening, jac.size(0), device, op);
  dt_of(jac, op, "jac");
  const bool acc64 = is64(jac);
  const int64_t n = jac.size(1);
  c10::OptionalDeviceGuard guard(device);
  at::Tensor u = at::empty({n}, jac.options().dtype(acc_type(acc64)));
  at::Tensor d = at::empty({n}, jac.options().dtype(acc_type(acc64)));
  kc::Target t;
  t.u = u.mutable_data_ptr();
  t.d = d.mutable_data_ptr();
  dense_pass(jac, coef, whitening, acc64, t, device, op);
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
  kc::kron_update(dt_of(a, op, "inputs"), a.const_data_ptr(), a.stride(0), d.const_data_ptr(),
                  d.stride(0), d.stride(1), d.size(0), d.size(1), d.size(2), a.size(1),
                  cf.const_data_ptr<double>(), gram.const_data_ptr<double>(), acc64, target, ws,
                  launch_for(device));
}

void fused_update_kron_(const at::Tensor& weight, const at::Tensor& cov, const at::Tensor& inputs,
                        const at::Tensor& grad_outputs, const at::Tensor& coef,
                        const at::Tensor& whitening, const at::Tensor& ok, double forgetting,
                        double process_noise, double cov_floor, double cov_ceiling,
                        bool information) {
  const char* op = "fused_update_kron_";
  const at::Device device = weight.device();
  check_device(weight, device, op, "weight");
  check_device(cov, device, op, "cov");
  check_device(inputs, device, op, "inputs");
  check_device(grad_outputs, device, op, "grad_outputs");
  check_inplace(weight, op, "weight");
  check_inplace(cov, op, "cov");
  check_hyper(forgetting, op);
  TORCH_CHECK(weight.dim() == 2, "kalman_kernels::", op, ": weight must be 2-D, got ",
              weight.sizes());
  TORCH_CHECK(cov.sizes() == weight.sizes(), "kalman_kernels::", op, ": cov ", cov.sizes(),
              " and weight ", weight.sizes(), " differ in shape");
  check_kron(inputs, grad_outputs, weight.size(0), weight.size(1), op);
  check_coef(coef, whitening, grad_outputs.size(0) * grad_outputs.size(1), device, op);
  check_ok(ok, device, op);
  dt_of(inputs, op, "inputs");
  dt_of(grad_outputs, op, "grad_outputs");
  kc::Target t;
  t.param = weight.mutable_data_ptr();
  t.param_t = dt_of(weight, op, "weight");
  t.cov = cov.mutable_data_ptr();
  t.cov_t = cov_dt(cov, op, "cov");
  t.ok = ok.const_data_ptr<bool>();
  t.hyper = update_of(forgetting, process_noise, cov_floor, cov_ceiling, information);
  const bool acc64 = is64(weight) || is64(cov) || is64(inputs) || is64(grad_outputs);
  c10::OptionalDeviceGuard guard(device);
  kron_pass(inputs, grad_outputs, coef, whitening, acc64, t, device, op);
}

std::tuple<at::Tensor, at::Tensor> step_terms_kron(const at::Tensor& inputs,
                                                   const at::Tensor& grad_outputs,
                                                   const at::Tensor& coef,
                                                   const at::Tensor& whitening) {
  const char* op = "step_terms_kron";
  const at::Device device = inputs.device();
  check_device(inputs, device, op, "inputs");
  check_device(grad_outputs, device, op, "grad_outputs");
  TORCH_CHECK(grad_outputs.dim() == 3, "kalman_kernels::", op,
              ": grad_outputs must be (B, K, d_out), got ", grad_outputs.sizes());
  TORCH_CHECK(inputs.dim() == 2, "kalman_kernels::", op, ": inputs must be (B, d_in), got ",
              inputs.sizes());
  const int64_t d_out = grad_outputs.size(2), d_in = inputs.size(1);
  check_kron(inputs, grad_outputs, d_out, d_in, op);
  check_coef(coef, whitening, grad_outputs.size(0) * grad_outputs.size(1), device, op);
  dt_of(inputs, op, "inputs");
  dt_of(grad_outputs, op, "grad_outputs");
  const bool acc64 = is64(inputs) || is64(grad_outputs);
  c10::OptionalDeviceGuard guard(device);
  at::Tensor u = at::empty({d_out, d_in}, inputs.options().dtype(acc_type(acc64)));
  at::Tensor d = at::empty({d_out, d_in}, inputs.options().dtype(acc_type(acc64)));
  kc::Target t;
  t.u = u.mutable_data_ptr();
  t.d = d.mutable_data_ptr();
  kron_pass(inputs, grad_outputs, coef, whitening, acc64, t, device, op);
  return {u, d};
}

void apply_terms_(const at::Tensor& param, const at::Tensor& cov, const at::Tensor& direction,
                  const at::Tensor& diag_term, const at::Tensor& ok, double forgetting,
                  double process_noise, double cov_floor, double cov_ceiling, bool information) {
  const char* op = "apply_terms_";
  const at::Device device = param.device();
  check_device(param, device, op, "param");
  check_device(cov, device, op, "cov");
  check_device(direction, device, op, "direction");
  check_device(diag_term, device, op, "diag_term");
  check_inplace(param, op, "param");
  check_inplace(cov, op, "cov");
  check_ok(ok, device, op);
  check_hyper(forgetting, op);
  const int64_t n = param.numel();
  TORCH_CHECK(cov.numel() == n && direction.numel() == n && diag_term.numel() == n,
              "kalman_kernels::", op, ": cov, direction and diag_term must have the parameter's ",
              n, " elements, got ", cov.numel(), ", ", direction.numel(), ", ", diag_term.numel());
  dt_of(direction, op, "direction");
  dt_of(diag_term, op, "diag_term");
  const bool terms64 = is64(direction) || is64(diag_term);
  const at::Tensor dir = direction.reshape({-1}).to(acc_type(terms64)).contiguous();
  const at::Tensor diag = diag_term.reshape({-1}).to(acc_type(terms64)).contiguous();
  c10::OptionalDeviceGuard guard(device);
  kc::apply_terms(param.mutable_data_ptr(), dt_of(param, op, "param"), cov.mutable_data_ptr(),
                  cov_dt(cov, op, "cov"), dir.const_data_ptr(), diag.const_data_ptr(),
                  terms64 ? kc::Dt::F64 : kc::Dt::F32, n, ok.const_data_ptr<bool>(),
                  update_of(forgetting, process_noise, cov_floor, cov_ceiling, information),
                  launch_for(device));
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
  const char* op = "loss_quad_form";
  TORCH_CHECK(grads.size() == covs.size(), "kalman_kernels::", op, ": ", grads.size(),
              " grads but ", covs.size(), " covs");
  TORCH_CHECK(!grads.empty(), "kalman_kernels::", op, ": empty tensor lists");
  check_hyper(forgetting, op);
  const at::Device device = grads[0].device();
  std::vector<at::Tensor> keep;
  std::vector<kc::LossGroup> singles;
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::string gi = "grads[" + std::to_string(i) + "]";
    const std::string ci = "covs[" + std::to_string(i) + "]";
    check_device(grads[i], device, op, gi.c_str());
    check_device(covs[i], device, op, ci.c_str());
    TORCH_CHECK(grads[i].numel() == covs[i].numel(), "kalman_kernels::", op, ": ", gi, " has ",
                grads[i].numel(), " elements, ", ci, " ", covs[i].numel());
    keep.push_back(grads[i].contiguous());
    keep.push_back(covs[i].contiguous());
    const at::Tensor& g = keep[keep.size() - 2];
    const at::Tensor& c = keep.back();
    const kc::Dt gt = dt_of(g, op, gi.c_str());
    singles.push_back(kc::LossGroup{gt, gt, cov_dt(c, op, ci.c_str()),
                                    {kc::LossTensor{nullptr, g.const_data_ptr(),
                                                    const_cast<void*>(c.const_data_ptr()),
                                                    g.numel()}}});
  }
  c10::OptionalDeviceGuard guard(device);
  at::Tensor out = at::empty({}, grads[0].options().dtype(at::kDouble));
  TensorWorkspace ws(grads[0].options());
  kc::loss_quad_form(group_tensors(singles), 1.0 / forgetting, process_noise,
                     out.mutable_data_ptr<double>(), ws, launch_for(device));
  return out;
}

void loss_step_(at::TensorList params, at::TensorList grads, at::TensorList covs,
                const at::Tensor& coef, const at::Tensor& weight, const at::Tensor& ok,
                double forgetting, double process_noise, double cov_floor, double cov_ceiling,
                bool information) {
  const char* op = "loss_step_";
  TORCH_CHECK(params.size() == grads.size() && params.size() == covs.size(), "kalman_kernels::",
              op, ": params, grads and covs differ in length (", params.size(), ", ", grads.size(),
              ", ", covs.size(), ")");
  if (params.empty()) return;
  check_hyper(forgetting, op);
  const at::Device device = params[0].device();
  check_device(coef, device, op, "coef");
  check_device(weight, device, op, "weight");
  check_ok(ok, device, op);
  TORCH_CHECK(coef.numel() == 1 && weight.numel() == 1, "kalman_kernels::", op,
              ": coef and weight must be scalars, got ", coef.sizes(), " and ", weight.sizes());
  const at::Tensor cf = coef.to(at::kDouble).contiguous();
  const at::Tensor wt = weight.to(at::kDouble).contiguous();
  std::vector<at::Tensor> keep;
  std::vector<kc::LossGroup> singles;
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string pi = "params[" + std::to_string(i) + "]";
    const std::string gi = "grads[" + std::to_string(i) + "]";
    const std::string ci = "covs[" + std::to_string(i) + "]";
    check_device(params[i], device, op, pi.c_str());
    check_device(grads[i], device, op, gi.c_str());
    check_device(covs[i], device, op, ci.c_str());
    check_inplace(params[i], op, pi);
    check_inplace(covs[i], op, ci);
    const int64_t n = params[i].numel();
    TORCH_CHECK(grads[i].numel() == n && covs[i].numel() == n, "kalman_kernels::", op, ": ", pi,
                " has ", n, " elements, ", gi, " ", grads[i].numel(), ", ", ci, " ",
                covs[i].numel());
    const kc::Dt pt = dt_of(params[i], op, pi.c_str());
    dt_of(grads[i], op, gi.c_str());
    keep.push_back(grads[i].to(params[i].scalar_type()).contiguous());
    singles.push_back(kc::LossGroup{pt, pt, cov_dt(covs[i], op, ci.c_str()),
                                    {kc::LossTensor{params[i].mutable_data_ptr(),
                                                    keep.back().const_data_ptr(),
                                                    covs[i].mutable_data_ptr(), n}}});
  }
  c10::OptionalDeviceGuard guard(device);
  kc::loss_step(group_tensors(singles), cf.const_data_ptr<double>(), wt.const_data_ptr<double>(),
                ok.const_data_ptr<bool>(),
                update_of(forgetting, process_noise, cov_floor, cov_ceiling, information),
                launch_for(device));
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
