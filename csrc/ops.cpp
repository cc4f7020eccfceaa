// Operator layer of the cpp backend: TORCH_LIBRARY schemas, argument checks, dtype
// routing and the run-time choice of the instruction set. The kernels themselves are in
// csrc/cpu/kernels_impl.h (compiled once per instruction set) and see raw pointers only.
//
// Registered ops (namespace kalman_kernels; fake implementations are registered from
// Python in kalman_kernels/backends/cpp_backend.py):
//   innovation_cov_dense(Tensor jac, Tensor cov, float forgetting, float process_noise) -> Tensor
//   innovation_cov_kron(Tensor inputs, Tensor grad_outputs, Tensor cov, float, float) -> Tensor
//   fused_update_dense_(Tensor(a!) param, Tensor(b!) cov, Tensor jac, Tensor coef,
//                       Tensor whitening, float, float, float, float, bool) -> ()
//   fused_update_kron_(Tensor(a!) weight, Tensor(b!) cov, Tensor inputs, Tensor grad_outputs,
//                      Tensor coef, Tensor whitening, float, float, float, float, bool) -> ()
//   loss_quad_form(Tensor[] grads, Tensor[] covs, float, float) -> Tensor        (0-d float64)
//   loss_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] covs, Tensor coef,
//              Tensor weight, float, float, float, float, bool) -> ()
//   _isa() -> str ; _set_isa(str isa) -> ()
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "kk_kernels.h"

namespace kalman_kernels {
namespace {

// ---------------------------------------------------------------------------------------
// Instruction-set choice. Starts at the baseline; kalman_kernels/backends/cpp_backend.py
// sets it at import from torch.backends.cpu.get_cpu_capability(). Asking for an
// instruction set this CPU lacks is refused (it would die with SIGILL).
// ---------------------------------------------------------------------------------------
std::atomic<const KernelTable*> g_table{nullptr};

bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == "AVX2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  if (isa == "AVX512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  }
#endif
  return isa == "DEFAULT";
}

const KernelTable* table_for(const std::string& isa) {
#if defined(KK_HAVE_X86_KERNELS)
  if (isa == "AVX512") return kernel_table_AVX512();
  if (isa == "AVX2") return kernel_table_AVX2();
#endif
  if (isa == "DEFAULT") return kernel_table_DEFAULT();
  return nullptr;
}

const KernelTable* table() {
  const KernelTable* t = g_table.load();
  if (t == nullptr) {
    t = kernel_table_DEFAULT();
    g_table.store(t);
  }
  return t;
}

std::string isa_op() { return table()->name; }

void set_isa_op(std::string isa) {
  for (auto& ch : isa) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  if (isa == "AVX512_BF16" || isa == "AVX512_VNNI" || isa == "AVX512_AMX" ||
      isa == "AVX512_FP16") {
    isa = "AVX512";  // finer torch capabilities map onto the AVX-512 kernels
  }
  if (isa == "NO AVX" || isa == "NONE") isa = "DEFAULT";
  const KernelTable* t = table_for(isa);
  TORCH_CHECK(t != nullptr, "kalman_kernels: no kernels compiled for instruction set '", isa,
              "' (have DEFAULT, AVX2, AVX512 on x86-64, DEFAULT elsewhere)");
  TORCH_CHECK(cpu_has(isa), "kalman_kernels: this CPU does not support ", isa,
              "; use DEFAULT or AVX2");
  g_table.store(t);
}

// ---------------------------------------------------------------------------------------
// Checks and dtype routing
// ---------------------------------------------------------------------------------------
KKType kk_type(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return KKType::F32;
    case at::kDouble:
      return KKType::F64;
    case at::kBFloat16:
      return KKType::BF16;
    case at::kHalf:
      return KKType::F16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float64, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

KKType cov_type(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " (a covariance) must be float32 or float64, got ", t.scalar_type());
  return t.scalar_type() == at::kFloat ? KKType::F32 : KKType::F64;
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device(),
              " (the cpp backend is CPU-only)");
}

// Tensors updated in place must be contiguous: a copy would silently drop the update.
void check_inplace(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " is updated in place and must be contiguous ",
              "(got sizes ", t.sizes(), ", strides ", t.strides(), "); pass a contiguous "
              "tensor, e.g. keep the state in its own .contiguous() storage");
}

// A (m, n) Jacobian with unit column stride (any row stride) is read in place;
// anything else is made contiguous (a copy of the input, never written).
at::Tensor jac_rows(const at::Tensor& jac, int64_t* ld) {
  at::Tensor j = jac;
  if (j.size(1) > 1 && j.stride(1) != 1) j = j.contiguous();
  if (j.size(0) > 1 && j.stride(0) < j.size(1)) j = j.contiguous();
  *ld = j.size(0) > 1 ? j.stride(0) : j.size(1);
  return j;
}

double inv(double forgetting) { return 1.0 / forgetting; }

void check_scalars(const char* op, double forgetting, double process_noise) {
  TORCH_CHECK(forgetting > 0.0 && std::isfinite(forgetting), op,
              ": forgetting must be finite and > 0, got ", forgetting);
  TORCH_CHECK(std::isfinite(process_noise), op, ": process_noise must be finite, got ",
              process_noise);
}

at::Tensor f64_contig(const at::Tensor& t) {
  return t.to(at::kDouble).contiguous();
}

// ---------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------
at::Tensor innovation_cov_dense(const at::Tensor& jac, const at::Tensor& cov, double forgetting,
                                double process_noise) {
  const char* op = "innovation_cov_dense";
  check_cpu(jac, op, "jac");
  check_cpu(cov, op, "cov");
  check_scalars(op, forgetting, process_noise);
  TORCH_CHECK(jac.dim() == 2, op, ": jac must be (m, n), got shape ", jac.sizes());
  const int64_t m = jac.size(0), n = jac.size(1);
  TORCH_CHECK(cov.numel() == n, op, ": cov has ", cov.numel(), " elements but jac has n = ", n,
              " columns");
  const KKType jt = kk_type(jac, op, "jac");
  const KKType ct = cov_type(cov, op, "cov");
  int64_t ld = 0;
  at::Tensor j = jac_rows(jac, &ld);
  at::Tensor c = cov.contiguous();
  at::Tensor out = at::empty({m, m}, jac.options().dtype(at::kDouble));
  const bool acc64 = jt == KKType::F64 || ct == KKType::F64;
  table()->innovation_dense(j.const_data_ptr(), jt, ld, c.const_data_ptr(), ct, m, n,
                            inv(forgetting), process_noise, acc64, out.mutable_data_ptr<double>());
  return out;
}

void check_kron(const char* op, const at::Tensor& a, const at::Tensor& d, const at::Tensor& cov) {
  check_cpu(a, op, "inputs");
  check_cpu(d, op, "grad_outputs");
  TORCH_CHECK(a.dim() == 2 && d.dim() == 2, op, ": inputs (m, d_in) and grad_outputs (m, d_out)"
              " must be 2-D, got ", a.sizes(), " and ", d.sizes());
  TORCH_CHECK(a.size(0) == d.size(0), op, ": inputs has ", a.size(0), " rows, grad_outputs ",
              d.size(0));
  TORCH_CHECK(cov.dim() == 2 && cov.size(0) == d.size(1) && cov.size(1) == a.size(1), op,
              ": cov must be (d_out, d_in) = (", d.size(1), ", ", a.size(1), "), got ",
              cov.sizes());
}

at::Tensor innovation_cov_kron(const at::Tensor& inputs, const at::Tensor& grad_outputs,
                               const at::Tensor& cov, double forgetting, double process_noise) {
  const char* op = "innovation_cov_kron";
  check_kron(op, inputs, grad_outputs, cov);
  check_cpu(cov, op, "cov");
  check_scalars(op, forgetting, process_noise);
  const KKType at_ = kk_type(inputs, op, "inputs");
  const KKType dt = kk_type(grad_outputs, op, "grad_outputs");
  const KKType ct = cov_type(cov, op, "cov");
  at::Tensor a = inputs.contiguous(), d = grad_outputs.contiguous(), c = cov.contiguous();
  const int64_t m = a.size(0), d_in = a.size(1), d_out = d.size(1);
  at::Tensor out = at::empty({m, m}, inputs.options().dtype(at::kDouble));
  const bool acc64 = at_ == KKType::F64 || dt == KKType::F64 || ct == KKType::F64;
  table()->innovation_kron(a.const_data_ptr(), at_, d.const_data_ptr(), dt, c.const_data_ptr(),
                           ct, m, d_out, d_in, inv(forgetting), process_noise, acc64,
                           out.mutable_data_ptr<double>());
  return out;
}

UpdateScalars update_scalars(const char* op, double forgetting, double process_noise,
                             double cov_floor, double cov_ceiling, bool information, bool acc64) {
  check_scalars(op, forgetting, process_noise);
  TORCH_CHECK(!std::isnan(cov_floor) && !std::isnan(cov_ceiling), op,
              ": cov_floor / cov_ceiling must not be NaN");
  return UpdateScalars{inv(forgetting), process_noise, cov_floor, cov_ceiling, information, acc64};
}

void check_whitening(const char* op, int64_t m, const at::Tensor& coef, const at::Tensor& f) {
  check_cpu(coef, op, "coef");
  check_cpu(f, op, "whitening");
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == m, op, ": coef must be (m,) = (", m,
              ",), got ", coef.sizes());
  TORCH_CHECK(f.dim() == 2 && f.size(0) == m && f.size(1) == m, op, ": whitening must be (m, m) ="
              " (", m, ", ", m, "), got ", f.sizes());
}

void fused_update_dense_(const at::Tensor& param, const at::Tensor& cov, const at::Tensor& jac,
                         const at::Tensor& coef, const at::Tensor& whitening, double forgetting,
                         double process_noise, double cov_floor, double cov_ceiling,
                         bool information) {
  const char* op = "fused_update_dense_";
  check_inplace(param, op, "param");
  check_inplace(cov, op, "cov");
  check_cpu(jac, op, "jac");
  TORCH_CHECK(jac.dim() == 2, op, ": jac must be (m, n), got shape ", jac.sizes());
  const int64_t m = jac.size(0), n = jac.size(1);
  TORCH_CHECK(param.numel() == n && cov.numel() == n, op, ": param and cov must have n = ", n,
              " elements (jac columns), got ", param.numel(), " and ", cov.numel());
  check_whitening(op, m, coef, whitening);
  const KKType pt = kk_type(param, op, "param");
  const KKType ct = cov_type(cov, op, "cov");
  const KKType jt = kk_type(jac, op, "jac");
  int64_t ld = 0;
  at::Tensor j = jac_rows(jac, &ld);
  at::Tensor c64 = f64_contig(coef), f64 = f64_contig(whitening);
  const bool acc64 = pt == KKType::F64 || ct == KKType::F64 || jt == KKType::F64;
  const UpdateScalars s =
      update_scalars(op, forgetting, process_noise, cov_floor, cov_ceiling, information, acc64);
  table()->update_dense(param.mutable_data_ptr(), pt, cov.mutable_data_ptr(), ct,
                        j.const_data_ptr(), jt, ld, m, n, c64.const_data_ptr<double>(),
                        f64.const_data_ptr<double>(), s);
}

void fused_update_kron_(const at::Tensor& weight, const at::Tensor& cov, const at::Tensor& inputs,
                        const at::Tensor& grad_outputs, const at::Tensor& coef,
                        const at::Tensor& whitening, double forgetting, double process_noise,
                        double cov_floor, double cov_ceiling, bool information) {
  const char* op = "fused_update_kron_";
  check_inplace(weight, op, "weight");
  check_inplace(cov, op, "cov");
  check_kron(op, inputs, grad_outputs, cov);
  TORCH_CHECK(weight.sizes() == cov.sizes(), op, ": weight and cov must have the same shape, got ",
              weight.sizes(), " and ", cov.sizes());
  const int64_t m = inputs.size(0);
  check_whitening(op, m, coef, whitening);
  const KKType wt = kk_type(weight, op, "weight");
  const KKType ct = cov_type(cov, op, "cov");
  const KKType at_ = kk_type(inputs, op, "inputs");
  const KKType dt = kk_type(grad_outputs, op, "grad_outputs");
  at::Tensor a = inputs.contiguous(), d = grad_outputs.contiguous();
  at::Tensor c64 = f64_contig(coef), f64 = f64_contig(whitening);
  const bool acc64 = wt == KKType::F64 || ct == KKType::F64 || at_ == KKType::F64 ||
                     dt == KKType::F64;
  const UpdateScalars s =
      update_scalars(op, forgetting, process_noise, cov_floor, cov_ceiling, information, acc64);
  table()->update_kron(weight.mutable_data_ptr(), wt, cov.mutable_data_ptr(), ct,
                       a.const_data_ptr(), at_, d.const_data_ptr(), dt, m, d.size(1), a.size(1),
                       c64.const_data_ptr<double>(), f64.const_data_ptr<double>(), s);
}

at::Tensor loss_quad_form(at::TensorList grads, at::TensorList covs, double forgetting,
                          double process_noise) {
  const char* op = "loss_quad_form";
  check_scalars(op, forgetting, process_noise);
  TORCH_CHECK(grads.size() == covs.size(), op, ": got ", grads.size(), " grads and ", covs.size(),
              " covs");
  const size_t count = grads.size();
  std::vector<at::Tensor> g(count), c(count);
  std::vector<const void*> gp(count), cp(count);
  std::vector<KKType> gt(count), ct(count);
  std::vector<int64_t> numel(count);
  for (size_t i = 0; i < count; ++i) {
    const std::string gi = "grads[" + std::to_string(i) + "]";
    const std::string ci = "covs[" + std::to_string(i) + "]";
    check_cpu(grads[i], op, gi.c_str());
    check_cpu(covs[i], op, ci.c_str());
    TORCH_CHECK(grads[i].numel() == covs[i].numel(), op, ": ", gi, " has ", grads[i].numel(),
                " elements, ", ci, " ", covs[i].numel());
    g[i] = grads[i].contiguous();
    c[i] = covs[i].contiguous();
    gp[i] = g[i].const_data_ptr();
    cp[i] = c[i].const_data_ptr();
    gt[i] = kk_type(g[i], op, gi.c_str());
    ct[i] = cov_type(c[i], op, ci.c_str());
    numel[i] = g[i].numel();
  }
  const double total = table()->quad_form(static_cast<int64_t>(count), gp.data(), gt.data(),
                                          cp.data(), ct.data(), numel.data(), inv(forgetting),
                                          process_noise);
  at::TensorOptions opts = at::TensorOptions().dtype(at::kDouble).device(at::kCPU);
  return at::scalar_tensor(total, opts);
}

double scalar_arg(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 1-element tensor, got shape ",
              t.sizes());
  return t.item<double>();
}

void loss_step_(at::TensorList params, at::TensorList grads, at::TensorList covs,
                const at::Tensor& coef, const at::Tensor& weight, double forgetting,
                double process_noise, double cov_floor, double cov_ceiling, bool information) {
  const char* op = "loss_step_";
  TORCH_CHECK(params.size() == grads.size() && params.size() == covs.size(), op, ": got ",
              params.size(), " params, ", grads.size(), " grads and ", covs.size(), " covs");
  const size_t count = params.size();
  std::vector<at::Tensor> g(count);
  std::vector<void*> pp(count), cp(count);
  std::vector<const void*> gp(count);
  std::vector<KKType> pt(count), gt(count), ct(count);
  std::vector<int64_t> numel(count);
  bool any64 = false;
  for (size_t i = 0; i < count; ++i) {
    const std::string pi = "params[" + std::to_string(i) + "]";
    const std::string gi = "grads[" + std::to_string(i) + "]";
    const std::string ci = "covs[" + std::to_string(i) + "]";
    check_inplace(params[i], op, pi);
    check_inplace(covs[i], op, ci);
    check_cpu(grads[i], op, gi.c_str());
    TORCH_CHECK(grads[i].numel() == params[i].numel() && covs[i].numel() == params[i].numel(), op,
                ": ", pi, ", ", gi, " and ", ci, " must have the same number of elements, got ",
                params[i].numel(), ", ", grads[i].numel(), " and ", covs[i].numel());
    g[i] = grads[i].contiguous();
    pp[i] = params[i].mutable_data_ptr();
    cp[i] = covs[i].mutable_data_ptr();
    gp[i] = g[i].const_data_ptr();
    pt[i] = kk_type(params[i], op, pi.c_str());
    gt[i] = kk_type(g[i], op, gi.c_str());
    ct[i] = cov_type(covs[i], op, ci.c_str());
    numel[i] = params[i].numel();
    any64 = any64 || pt[i] == KKType::F64 || ct[i] == KKType::F64;
  }
  const UpdateScalars s = update_scalars(op, forgetting, process_noise, cov_floor, cov_ceiling,
                                         information, any64);
  const double c = scalar_arg(coef, op, "coef"), w = scalar_arg(weight, op, "weight");
  table()->loss_step(static_cast<int64_t>(count), pp.data(), pt.data(), gp.data(), gt.data(),
                     cp.data(), ct.data(), numel.data(), c, w, s);
}

}  // namespace

TORCH_LIBRARY(kalman_kernels, m) {
  m.def("innovation_cov_dense(Tensor jac, Tensor cov, float forgetting, float process_noise)"
        " -> Tensor");
  m.def("innovation_cov_kron(Tensor inputs, Tensor grad_outputs, Tensor cov, float forgetting,"
        " float process_noise) -> Tensor");
  m.def("fused_update_dense_(Tensor(a!) param, Tensor(b!) cov, Tensor jac, Tensor coef,"
        " Tensor whitening, float forgetting, float process_noise, float cov_floor,"
        " float cov_ceiling, bool information) -> ()");
  m.def("fused_update_kron_(Tensor(a!) weight, Tensor(b!) cov, Tensor inputs,"
        " Tensor grad_outputs, Tensor coef, Tensor whitening, float forgetting,"
        " float process_noise, float cov_floor, float cov_ceiling, bool information) -> ()");
  m.def("loss_quad_form(Tensor[] grads, Tensor[] covs, float forgetting, float process_noise)"
        " -> Tensor");
  m.def("loss_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] covs, Tensor coef,"
        " Tensor weight, float forgetting, float process_noise, float cov_floor,"
        " float cov_ceiling, bool information) -> ()");
  m.def("_isa() -> str", &isa_op);
  m.def("_set_isa(str isa) -> ()", &set_isa_op);
}

TORCH_LIBRARY_IMPL(kalman_kernels, CPU, m) {
  m.impl("innovation_cov_dense", &innovation_cov_dense);
  m.impl("innovation_cov_kron", &innovation_cov_kron);
  m.impl("fused_update_dense_", &fused_update_dense_);
  m.impl("fused_update_kron_", &fused_update_kron_);
  m.impl("loss_quad_form", &loss_quad_form);
  m.impl("loss_step_", &loss_step_);
}

}  // namespace kalman_kernels

// `import kalman_kernels._C` loads this library, which runs the registrations above.
static struct PyModuleDef kk_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "kalman_kernels C++ CPU kernels (torch.ops.kalman_kernels)",
                                       -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kk_module); }
