// Operator layer of the cpp backend: argument checks, dtype routing, the sample-grouped
// Kronecker ops (GEMMs through ATen / MKL around a per-ISA elementwise epilogue) and the
// run-time choice of the instruction set. The per-parameter kernels are in
// csrc/cpu/kernels_impl.h (compiled once per instruction set) and see raw pointers only.
//
// The ops are defined once, in Python (kalman_kernels/backends/library.py, namespace
// kalman_kernels: schemas, fakes, the default kernel and the one wrapper); this library only
// registers CPU kernels for them (TORCH_LIBRARY_IMPL), plus the fragment ops _isa() /
// _set_isa(str). Their argument checks are csrc/kk_checks.h's, shared with the CUDA operator
// layer. Every in-place op takes a 0-d bool ``ok``: when false it writes nothing. Reading it
// costs nothing here (a CPU tensor).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "kk_checks.h"
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
// Checks (csrc/kk_checks.h) and layout
// ---------------------------------------------------------------------------------------
checks::Site site(const char* op) { return checks::Site{op, "cpp", c10::DeviceType::CPU}; }

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

at::Tensor f64_contig(const at::Tensor& t) {
  return t.to(at::kDouble).contiguous();
}

// ---------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------
at::Tensor innovation_cov_dense(const at::Tensor& jac, const at::Tensor& cov, double forgetting,
                                double process_noise) {
  const checks::Innovation x =
      checks::innovation_cov_dense(site("innovation_cov_dense"), jac, cov, forgetting,
                                   process_noise);
  const int64_t m = jac.size(0), n = jac.size(1);
  int64_t ld = 0;
  at::Tensor j = jac_rows(jac, &ld);
  at::Tensor c = cov.contiguous();
  at::Tensor out = at::empty({m, m}, jac.options().dtype(at::kDouble));
  table()->innovation_dense(j.const_data_ptr(), x.a, ld, c.const_data_ptr(), x.cov, m, n,
                            inv(forgetting), process_noise, x.acc64,
                            out.mutable_data_ptr<double>());
  return out;
}

// ---------------------------------------------------------------------------------------
// The skip predicate and the hyper-parameters (checked before: csrc/kk_checks.h)
// ---------------------------------------------------------------------------------------
bool ok_value(const at::Tensor& ok) { return ok.item<bool>(); }

UpdateScalars update_scalars(double forgetting, double process_noise, double cov_floor,
                             double cov_ceiling, bool information, bool acc64) {
  return UpdateScalars{inv(forgetting), process_noise, cov_floor, cov_ceiling, information, acc64};
}

// ---------------------------------------------------------------------------------------
// Dense blocks
// ---------------------------------------------------------------------------------------
void fused_update_dense_(const at::Tensor& param, const at::Tensor& cov, const at::Tensor& jac,
                         const at::Tensor& coef, const at::Tensor& whitening, const at::Tensor& ok,
                         double forgetting, double process_noise, double cov_floor,
                         double cov_ceiling, bool information) {
  const checks::Update x =
      checks::fused_update_dense_(site("fused_update_dense_"), param, cov, jac, coef, whitening,
                                  ok, forgetting, process_noise, cov_floor, cov_ceiling);
  const UpdateScalars s =
      update_scalars(forgetting, process_noise, cov_floor, cov_ceiling, information, x.acc64);
  if (!ok_value(ok)) return;
  const int64_t m = jac.size(0), n = jac.size(1);
  int64_t ld = 0;
  at::Tensor j = jac_rows(jac, &ld);
  at::Tensor c64 = f64_contig(coef), f64 = f64_contig(whitening);
  table()->update_dense(param.mutable_data_ptr(), x.param, cov.mutable_data_ptr(), x.cov,
                        j.const_data_ptr(), x.a, ld, m, n, c64.const_data_ptr<double>(),
                        f64.const_data_ptr<double>(), s);
}

std::tuple<at::Tensor, at::Tensor> step_terms_dense(const at::Tensor& jac, const at::Tensor& coef,
                                                    const at::Tensor& whitening) {
  const checks::Terms x = checks::step_terms_dense(site("step_terms_dense"), jac, coef, whitening);
  const int64_t m = jac.size(0), n = jac.size(1);
  const bool acc64 = x.acc64;
  at::TensorOptions opts = jac.options().dtype(acc64 ? at::kDouble : at::kFloat);
  at::Tensor dir = at::empty({n}, opts), diag = at::empty({n}, opts);
  int64_t ld = 0;
  at::Tensor j = jac_rows(jac, &ld);
  at::Tensor c64 = f64_contig(coef), f64 = f64_contig(whitening);
  table()->terms_dense(j.const_data_ptr(), x.a, ld, m, n, c64.const_data_ptr<double>(),
                       f64.const_data_ptr<double>(), acc64, dir.mutable_data_ptr(),
                       diag.mutable_data_ptr());
  return {dir, diag};
}

void apply_terms_(const at::Tensor& param, const at::Tensor& cov, const at::Tensor& direction,
                  const at::Tensor& diag_term, const at::Tensor& ok, double forgetting,
                  double process_noise, double cov_floor, double cov_ceiling, bool information) {
  const checks::Apply x =
      checks::apply_terms_(site("apply_terms_"), param, cov, direction, diag_term, ok, forgetting,
                           process_noise, cov_floor, cov_ceiling);
  const UpdateScalars s =
      update_scalars(forgetting, process_noise, cov_floor, cov_ceiling, information, x.acc64);
  if (!ok_value(ok)) return;
  at::Tensor u = direction.contiguous(), d = diag_term.contiguous();
  table()->apply_terms(param.mutable_data_ptr(), x.param, cov.mutable_data_ptr(), x.cov,
                       u.const_data_ptr(), x.direction, d.const_data_ptr(), x.diag_term,
                       param.numel(), s);
}

// ---------------------------------------------------------------------------------------
// Sample-grouped Kronecker blocks (docs/design.md, 2.1 and 2.6)
//
// A (B, d_in) holds one input row per sample, D (B, K, d_out) the K observations' output
// gradients of each sample; observation (j, k) has the Jacobian row vec(D[j,k] A[j]^T).
// Everything is a GEMM against the pairwise products of the inputs, over the pairs
// j <= j' (T = B (B + 1) / 2 of them):
//   Ap[t, i]   = A[j, i] A[j', i]
//   Q[t, o]    = sum_i P-[o, i] Ap[t, i]          = inv_lam (Ap P^T)[t, o] + q rowsum(Ap)[t]
//   S[(j,k),(j',k')] = sum_o D[j,k,o] D[j',k',o] Q[t, o]   (a K x K block per pair)
//   G[t, o]    = mult_t sum_{k,k'} W[(j,k),(j',k')] D[j,k,o] D[j',k',o],  W = F^T F,
//                mult_t = 2 for j != j' (the pair (j', j) gives the same term)
//   diag[o, i] = sum_t G[t, o] Ap[t, i]           (G^T Ap)
//   step[o, i] = sum_j Dc[j, o] A[j, i],  Dc[j, o] = sum_k coef[j, k] D[j, k, o]
// Work O(B^2 d_in d_out + B^2 K^2 d_out); memory O(B^2 (d_in + d_out) + (B K)^2): pairs are
// processed in blocks of bounded size, the weight in row tiles whose step and diagonal live
// only in per-thread buffers (the elementwise epilogue is kernels_impl.h's kron_epilogue).
// ---------------------------------------------------------------------------------------
constexpr int64_t kPairBlockBytes = int64_t(32) << 20;   // working set of one pair block
constexpr int64_t kTileBytes = int64_t(256) << 10;        // step + diag of one row tile

// Pairs (j, j') with j <= j', in row-major order, and their multiplicities (1 or 2).
struct Pairs {
  at::Tensor iu, ju, mult;   // (T,) int64, int64, acc dtype
  int64_t count;
};

Pairs make_pairs(int64_t b, at::ScalarType acc) {
  std::vector<int64_t> iu, ju;
  std::vector<double> mult;
  for (int64_t j = 0; j < b; ++j)
    for (int64_t k = j; k < b; ++k) {
      iu.push_back(j);
      ju.push_back(k);
      mult.push_back(j == k ? 1.0 : 2.0);
    }
  const int64_t t = static_cast<int64_t>(iu.size());
  auto i64 = at::TensorOptions().dtype(at::kLong);
  return Pairs{at::tensor(iu, i64), at::tensor(ju, i64),
               at::tensor(mult, at::TensorOptions().dtype(at::kDouble)).to(acc), t};
}

int64_t pair_block(int64_t t, int64_t per_pair_elems, int64_t elem_size) {
  const int64_t per = std::max<int64_t>(1, per_pair_elems * elem_size);
  return std::max<int64_t>(1, std::min(t, kPairBlockBytes / per));
}

struct KronOperands {
  at::Tensor a, d;   // (B, d_in), (B, K, d_out), accumulation dtype, contiguous
  at::ScalarType acc;
  int64_t b, k, d_out, d_in;
};

KronOperands kron_operands(const at::Tensor& inputs, const at::Tensor& grad_outputs, bool acc64) {
  const at::ScalarType acc = acc64 ? at::kDouble : at::kFloat;
  return KronOperands{inputs.to(acc).contiguous(), grad_outputs.to(acc).contiguous(), acc,
                      inputs.size(0), grad_outputs.size(1), grad_outputs.size(2),
                      inputs.size(1)};
}

at::Tensor innovation_cov_kron(const at::Tensor& inputs, const at::Tensor& grad_outputs,
                               const at::Tensor& cov, double forgetting, double process_noise) {
  const bool acc64 = checks::innovation_cov_kron(site("innovation_cov_kron"), inputs,
                                                 grad_outputs, cov, forgetting, process_noise)
                         .acc64;
  const KronOperands x = kron_operands(inputs, grad_outputs, acc64);
  const int64_t m = x.b * x.k;
  at::Tensor p = cov.to(x.acc).contiguous();           // a view unless the dtype differs
  const Pairs pairs = make_pairs(x.b, x.acc);
  // S viewed as (B, B, K, K): block (j, j') holds S[(j, k), (j', k')].
  at::Tensor s = at::zeros({x.b, x.b, x.k, x.k}, inputs.options().dtype(at::kDouble));
  const int64_t esz = acc64 ? 8 : 4;
  const int64_t blk = pair_block(pairs.count, x.d_in + x.d_out, esz);
  const double inv_lam = inv(forgetting);
  for (int64_t t0 = 0; t0 < pairs.count; t0 += blk) {
    const int64_t t1 = std::min(pairs.count, t0 + blk);
    at::Tensor iu = pairs.iu.slice(0, t0, t1), ju = pairs.ju.slice(0, t0, t1);
    at::Tensor ap = x.a.index_select(0, iu).mul_(x.a.index_select(0, ju));      // (Tb, d_in)
    at::Tensor q = at::mm(ap, p.t());                                          // (Tb, d_out)
    if (inv_lam != 1.0) q.mul_(inv_lam);
    if (process_noise != 0.0) q.add_(ap.sum(1, /*keepdim=*/true), process_noise);
    // K x K block of every pair (and its transpose): sum_o D[j,k,o] Q[t,o] D[j',k',o]
    table()->pair_sandwich(x.d.const_data_ptr(), acc64, x.b, x.k, x.d_out,
                           iu.const_data_ptr<int64_t>(), ju.const_data_ptr<int64_t>(), t1 - t0,
                           q.contiguous().const_data_ptr(), s.mutable_data_ptr<double>());
  }
  at::Tensor out = s.permute({0, 2, 1, 3}).reshape({m, m});
  return out.add(out.t()).mul_(0.5);   // exactly symmetric (a diagonal block j = j is summed
                                       // in its own order for (k, k') and (k', k))
}

// The step term's Dc (B, d_out), transposed to (d_out, B), and G^T (d_out, T) with the pair
// multiplicities folded in; both in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> kron_update_terms(const KronOperands& x, const Pairs& pairs,
                                                     const at::Tensor& coef,
                                                     const at::Tensor& whitening) {
  at::Tensor c = coef.to(x.acc).reshape({x.b, 1, x.k});
  at::Tensor dct = at::bmm(c, x.d).reshape({x.b, x.d_out}).t().contiguous();   // (d_out, B)
  at::Tensor f = whitening.to(at::kDouble);
  at::Tensor w4 = at::mm(f.t(), f).reshape({x.b, x.k, x.b, x.k}).permute({0, 2, 1, 3});
  at::Tensor gt = at::empty({x.d_out, pairs.count}, x.d.options());
  const int64_t esz = x.acc == at::kDouble ? 8 : 4;
  const int64_t blk = pair_block(pairs.count, x.k * x.k + x.d_out, esz);
  for (int64_t t0 = 0; t0 < pairs.count; t0 += blk) {
    const int64_t t1 = std::min(pairs.count, t0 + blk);
    at::Tensor iu = pairs.iu.slice(0, t0, t1), ju = pairs.ju.slice(0, t0, t1);
    at::Tensor wt = at::index(w4, {iu, ju}).to(x.acc).contiguous();            // (Tb, K, K)
    at::Tensor mult = pairs.mult.slice(0, t0, t1).contiguous();
    at::Tensor g = at::empty({t1 - t0, x.d_out}, x.d.options());
    table()->pair_weights(x.d.const_data_ptr(), x.acc == at::kDouble, x.k, x.d_out,
                          iu.const_data_ptr<int64_t>(), ju.const_data_ptr<int64_t>(), t1 - t0,
                          wt.const_data_ptr(), mult.const_data_ptr(), g.mutable_data_ptr());
    gt.slice(1, t0, t1).copy_(g.t());
  }
  return {dct, gt};
}

// The diagonal term G^T Ap at full size (d_out, d_in), accumulated over blocks of pairs so
// that their input products never exist all at once (many samples; the distributed terms).
at::Tensor diag_over_pair_blocks(const KronOperands& x, const Pairs& pairs, const at::Tensor& gt) {
  at::Tensor diag = at::zeros({x.d_out, x.d_in}, x.a.options());
  const int64_t esz = x.acc == at::kDouble ? 8 : 4;
  const int64_t blk = pair_block(pairs.count, x.d_in, esz);
  for (int64_t t0 = 0; t0 < pairs.count; t0 += blk) {
    const int64_t t1 = std::min(pairs.count, t0 + blk);
    at::Tensor ap = x.a.index_select(0, pairs.iu.slice(0, t0, t1))
                        .mul_(x.a.index_select(0, pairs.ju.slice(0, t0, t1)));
    diag.addmm_(gt.slice(1, t0, t1), ap);
  }
  return diag;
}

// Rows of the weight per tile: the tile's step and diagonal stay in cache.
int64_t tile_rows(int64_t d_out, int64_t d_in, int64_t esz) {
  const int64_t rows = kTileBytes / std::max<int64_t>(1, 2 * d_in * esz);
  return std::max<int64_t>(1, std::min(d_out, rows));
}

void fused_update_kron_(const at::Tensor& weight, const at::Tensor& cov, const at::Tensor& inputs,
                        const at::Tensor& grad_outputs, const at::Tensor& coef,
                        const at::Tensor& whitening, const at::Tensor& ok, double forgetting,
                        double process_noise, double cov_floor, double cov_ceiling,
                        bool information) {
  const checks::Update checked =
      checks::fused_update_kron_(site("fused_update_kron_"), weight, cov, inputs, grad_outputs,
                                 coef, whitening, ok, forgetting, process_noise, cov_floor,
                                 cov_ceiling);
  const KKType wt = checked.param, ct = checked.cov;
  const bool acc64 = checked.acc64;
  const UpdateScalars s =
      update_scalars(forgetting, process_noise, cov_floor, cov_ceiling, information, acc64);
  if (!ok_value(ok)) return;
  const KronOperands x = kron_operands(inputs, grad_outputs, acc64);
  const Pairs pairs = make_pairs(x.b, x.acc);
  at::Tensor dct, gt;
  std::tie(dct, gt) = kron_update_terms(x, pairs, coef, whitening);
  const int64_t esz = acc64 ? 8 : 4;
  void* wp = weight.mutable_data_ptr();
  void* cp = cov.mutable_data_ptr();
  const KernelTable* kt = table();
  if (pairs.count * x.d_in * esz > kPairBlockBytes) {
    // Too many pairs to keep their products: accumulate the diagonal term over pair blocks
    // into one (d_out, d_in) buffer, then one epilogue pass.
    at::Tensor diag = diag_over_pair_blocks(x, pairs, gt);
    at::Tensor step = at::mm(dct, x.a);
    kt->kron_epilogue(wp, wt, cp, ct, 0, x.d_out * x.d_in, step.const_data_ptr(),
                      diag.const_data_ptr(), s);
    return;
  }
  at::Tensor ap = x.a.index_select(0, pairs.iu).mul_(x.a.index_select(0, pairs.ju));  // (T, d_in)
  const int64_t rows = tile_rows(x.d_out, x.d_in, esz);
  const int64_t ntiles = (x.d_out + rows - 1) / rows;
  // Row tiles over threads; each tile: two small GEMMs (MKL runs single-threaded inside a
  // parallel region) and the elementwise epilogue while both terms are still in cache.
  at::parallel_for(0, ntiles, 1, [&](int64_t t_begin, int64_t t_end) {
    at::Tensor step = at::empty({rows, x.d_in}, x.a.options());
    at::Tensor diag = at::empty({rows, x.d_in}, x.a.options());
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t o0 = t * rows, o1 = std::min(x.d_out, o0 + rows);
      at::Tensor st = step.slice(0, 0, o1 - o0), dg = diag.slice(0, 0, o1 - o0);
      at::mm_out(st, dct.slice(0, o0, o1), x.a);
      at::mm_out(dg, gt.slice(0, o0, o1), ap);
      kt->kron_epilogue(wp, wt, cp, ct, o0 * x.d_in, (o1 - o0) * x.d_in, st.const_data_ptr(),
                        dg.const_data_ptr(), s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> step_terms_kron(const at::Tensor& inputs,
                                                   const at::Tensor& grad_outputs,
                                                   const at::Tensor& coef,
                                                   const at::Tensor& whitening) {
  const bool acc64 =
      checks::step_terms_kron(site("step_terms_kron"), inputs, grad_outputs, coef, whitening)
          .acc64;
  const KronOperands x = kron_operands(inputs, grad_outputs, acc64);
  const Pairs pairs = make_pairs(x.b, x.acc);
  at::Tensor dct, gt;
  std::tie(dct, gt) = kron_update_terms(x, pairs, coef, whitening);
  return {at::mm(dct, x.a), diag_over_pair_blocks(x, pairs, gt)};
}

// ---------------------------------------------------------------------------------------
// Loss-observation mode
// ---------------------------------------------------------------------------------------
at::Tensor loss_quad_form(at::TensorList grads, at::TensorList covs, double forgetting,
                          double process_noise) {
  const checks::Lists x =
      checks::loss_quad_form(site("loss_quad_form"), grads, covs, forgetting, process_noise);
  const size_t count = grads.size();
  std::vector<at::Tensor> g(count), c(count);
  std::vector<const void*> gp(count), cp(count);
  std::vector<int64_t> numel(count);
  for (size_t i = 0; i < count; ++i) {
    g[i] = grads[i].contiguous();
    c[i] = covs[i].contiguous();
    gp[i] = g[i].const_data_ptr();
    cp[i] = c[i].const_data_ptr();
    numel[i] = g[i].numel();
  }
  const double total = table()->quad_form(static_cast<int64_t>(count), gp.data(), x.grad.data(),
                                          cp.data(), x.cov.data(), numel.data(), inv(forgetting),
                                          process_noise);
  at::TensorOptions opts = at::TensorOptions().dtype(at::kDouble).device(at::kCPU);
  return at::scalar_tensor(total, opts);
}

void loss_step_(at::TensorList params, at::TensorList grads, at::TensorList covs,
                const at::Tensor& coef, const at::Tensor& weight, const at::Tensor& ok,
                double forgetting, double process_noise, double cov_floor, double cov_ceiling,
                bool information) {
  const checks::Lists x =
      checks::loss_step_(site("loss_step_"), params, grads, covs, coef, weight, ok, forgetting,
                         process_noise, cov_floor, cov_ceiling);
  const UpdateScalars s =
      update_scalars(forgetting, process_noise, cov_floor, cov_ceiling, information, x.any64);
  if (!ok_value(ok)) return;
  const size_t count = params.size();
  std::vector<at::Tensor> g(count);
  std::vector<void*> pp(count), cp(count);
  std::vector<const void*> gp(count);
  std::vector<int64_t> numel(count);
  for (size_t i = 0; i < count; ++i) {
    g[i] = grads[i].contiguous();
    pp[i] = params[i].mutable_data_ptr();
    cp[i] = covs[i].mutable_data_ptr();
    gp[i] = g[i].const_data_ptr();
    numel[i] = params[i].numel();
  }
  const double c = coef.item<double>(), w = weight.item<double>();
  table()->loss_step(static_cast<int64_t>(count), pp.data(), x.param.data(), gp.data(),
                     x.grad.data(), cp.data(), x.cov.data(), numel.data(), c, w, s);
}

}  // namespace

// The ops' schemas (and fakes) are defined in kalman_kernels/backends/library.py; this library
// adds only its two instruction-set ops to the namespace and the CPU kernels of the others.
TORCH_LIBRARY_FRAGMENT(kalman_kernels, m) {
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
  m.impl("step_terms_dense", &step_terms_dense);
  m.impl("step_terms_kron", &step_terms_kron);
  m.impl("apply_terms_", &apply_terms_);
}

}  // namespace kalman_kernels

// `import kalman_kernels._C` loads this library, which runs the registrations above.
static struct PyModuleDef kk_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "kalman_kernels C++ CPU kernels (torch.ops.kalman_kernels)",
                                       -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kk_module); }
