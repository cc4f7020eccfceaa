// Per-element math of the diagonal Kalman filter (docs/design.md, section 2), shared by every
// compiled backend: the CPU kernels (this extension) and a future CUDA backend include
// this header, so the CPU tests exercise the same formulas a GPU build would run.
//
// Every function is a template over the arithmetic type T. On the CPU it is
// instantiated both for scalars (float, double) and for at::vec::Vectorized<float/double>
// (the vector kernels), which is why only +, -, *, / appear here; min/max go through the
// KkMinMax trait, which the CPU kernels specialise for Vectorized.
//
// Everything lives in an unnamed namespace (internal linkage): the CPU kernels are compiled several times
// with different instruction-set flags (baseline, AVX2, AVX-512), and an inline function
// with external linkage could be merged across those translation units by the linker,
// letting AVX-512 code run on a CPU without it.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KK_HOST_DEVICE __host__ __device__
#else
#define KK_HOST_DEVICE
#endif

#define KK_INLINE KK_HOST_DEVICE inline

namespace kalman_kernels {
namespace math {
namespace {

// min / max with NaN propagation (like torch.clamp): specialise for vector types.
template <typename T>
struct KkMinMax {
  KK_HOST_DEVICE static inline T max(T x, T lo) { return (x != x) ? x : (x < lo ? lo : x); }
  KK_HOST_DEVICE static inline T min(T x, T hi) { return (x != x) ? x : (x > hi ? hi : x); }
};

// Step 1, predict: P- = P / lam + q, with inv_lam = 1 / lam precomputed.
template <typename T>
KK_INLINE T predict(T cov, T inv_lam, T q) {
  return cov * inv_lam + q;
}

// Step 7, Kalman rule: P = P- - P-^2 d, d = diag(H^T S^-1 H)_i.
template <typename T>
KK_INLINE T cov_kalman(T p_pred, T d) {
  return p_pred - p_pred * p_pred * d;
}

// Information rule ("VD-EKF"): P = 1 / (1/P- + d), d = diag(H^T R^-1 H)_i.
template <typename T>
KK_INLINE T cov_information(T p_pred, T d, T one) {
  return one / (one / p_pred + d);
}

// clamp(x, p_min, p_max), NaN-propagating.
template <typename T>
KK_INLINE T clamp(T x, T lo, T hi) {
  return KkMinMax<T>::min(KkMinMax<T>::max(x, lo), hi);
}

// The covariance rule chosen at compile time, followed by the floor/ceiling.
template <bool INFORMATION, typename T>
KK_INLINE T cov_rule(T p_pred, T d, T one, T lo, T hi) {
  T updated = INFORMATION ? cov_information(p_pred, d, one) : cov_kalman(p_pred, d);
  return clamp(updated, lo, hi);
}

// Step 6, mean: mu + P- (.) direction, where direction already carries lr * s
// (dense / Kronecker blocks: direction = H^T coef).
template <typename T>
KK_INLINE T mean_step(T param, T p_pred, T direction) {
  return param + p_pred * direction;
}

// Loss-observation mode (docs/design.md, 2.2), one element:
//   mu += coef * P- g ;  P = rule(P-, weight * g^2)
// with coef = lr * s * e / S and weight = 1/S (Kalman) or 1/r (information).
template <bool INFORMATION, typename T>
KK_INLINE void loss_update(T& param, T& cov, T grad, T coef, T weight, T inv_lam, T q, T one,
                           T lo, T hi) {
  T p_pred = predict(cov, inv_lam, q);
  param = param + coef * p_pred * grad;
  cov = cov_rule<INFORMATION>(p_pred, weight * grad * grad, one, lo, hi);
}

// One term of the loss-mode reduction g^T P- g.
template <typename T>
KK_INLINE T quad_term(T grad, T cov, T inv_lam, T q) {
  return grad * grad * predict(cov, inv_lam, q);
}

}  // namespace
}  // namespace math
}  // namespace kalman_kernels
