"""Workloads, ceilings and the timing harness shared by the pytest-benchmark files and
``python -m benchmarks.report`` (docs/design.md, section 6).

Every figure is a ratio measured in the same run: cpp against the reference backend, the
loss step against ``torch.optim.AdamW(fused=True)`` on the same parameters, and every kernel
against this machine's own ceilings measured in the same process:

* memory bandwidth: an in-place ``x.add_(y)`` whose two arrays together have the kernel's
  working-set size (reads x and y, writes x: 1.5x the working set moved);
* compute: a ``torch.matmul`` of the kernel's GEMM shape (``H @ H.T`` for the innovation
  covariance, ``F @ H`` for the fused update; float32, MKL).

The fraction of the ceiling is ``max(bytes / bandwidth, flops / matmul rate) / time``: the
roofline floor of the kernel divided by its measured time.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import kalman_kernels.reference as ref

F32, F64 = torch.float32, torch.float64
#: the skip predicate of a step that applies (the kernels' ``ok`` argument)
OK = torch.ones((), dtype=torch.bool)


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
@dataclass
class Timing:
    times: List[float] = field(default_factory=list)   # seconds, one per timed call

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self):
        if len(self.times) < 4:
            return (min(self.times), max(self.times))
        q = statistics.quantiles(self.times, n=4)
        return (q[0], q[2])

    @property
    def best(self) -> float:
        return min(self.times)


def measure_group(fns: Dict[str, Callable[[], object]], rounds: int, inner: int = 1,
                  warmup: int = 1, budget_s: Optional[float] = None) -> Dict[str, Timing]:
    """Round-robin timing: every round runs each function ``warmup`` times untimed, then
    ``inner`` timed calls, so slow drifts of a shared machine hit all variants alike.
    ``budget_s`` caps the total time (at least 3 rounds are run)."""
    out = {name: Timing() for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(inner):
                t0 = time.perf_counter()
                fn()
                out[name].times.append(time.perf_counter() - t0)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return out


# --------------------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------------------
_BW_CACHE: Dict[tuple, float] = {}


def add_bandwidth(working_set_bytes: int, rounds: int = 7) -> float:
    """GB/s of x.add_(y) (float32) with x and y together ``working_set_bytes`` large."""
    key = (int(working_set_bytes) >> 16, torch.get_num_threads())
    if key in _BW_CACHE:
        return _BW_CACHE[key]
    n = max(1024, int(working_set_bytes) // 8)
    x, y = torch.randn(n), torch.randn(n)
    inner = max(1, min(200, int(2e6 // n)))
    t = measure_group({"add": lambda: x.add_(y)}, rounds, inner=inner)["add"]
    gbs = 12 * n / t.median / 1e9
    _BW_CACHE[key] = gbs
    return gbs


def matmul_rate(a: torch.Tensor, b: torch.Tensor, rounds: int = 5) -> float:
    """GFLOP/s of torch.matmul(a, b) (2 * M * N * K flops)."""
    m, k = a.shape
    n = b.shape[1]
    inner = max(1, min(100, int(2e8 // max(1, m * n * k))))
    t = measure_group({"mm": lambda: torch.matmul(a, b)}, rounds, inner=inner)["mm"]
    return 2.0 * m * n * k / t.median / 1e9


_PEAK_CACHE: Dict[int, float] = {}


def square_matmul_peak(rounds: int = 5) -> float:
    """GFLOP/s of a 1024^3 float32 torch.matmul: the machine's practical compute peak."""
    key = torch.get_num_threads()
    if key not in _PEAK_CACHE:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        _PEAK_CACHE[key] = matmul_rate(a, b, rounds)
    return _PEAK_CACHE[key]


def compute_ceiling(same_shape_gflops: float) -> float:
    """The compute ceiling used for the roofline floor: the faster of a matmul of the
    kernel's own GEMM shape (docs/design.md, 6) and the square-matmul peak (a skinny or degenerate
    shape, e.g. m = 1, runs far below the machine's peak and would flatter the kernel)."""
    return max(same_shape_gflops, square_matmul_peak())


def roofline_fraction(seconds: float, nbytes: float, flops: float, gbs: float,
                      gflops: float) -> float:
    floor = max(nbytes / (gbs * 1e9), flops / (gflops * 1e9))
    return floor / seconds


# --------------------------------------------------------------------------------------
# Workloads (fresh random inputs; never zeros)
# --------------------------------------------------------------------------------------
def cpp_module():
    from kalman_kernels.backends import cpp_backend
    return cpp_backend


def filter_terms(hph: torch.Tensor, r: float = 0.1):
    """coef = S^-1 e and F = L^-1 for S = hph + r I, as ops computes them."""
    m = hph.shape[0]
    s = hph + r * torch.eye(m, dtype=F64)
    factor = torch.linalg.cholesky(s)
    e = torch.randn(m, dtype=F64)
    coef = torch.cholesky_solve(e[:, None], factor).reshape(-1)
    return coef, ref.whitening_matrix(factor)


class DenseCase:
    """A dense block of n float32 parameters with an (m, n) Jacobian."""

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m
        self.jac = torch.randn(m, n)
        self.param = torch.randn(n)
        self.cov = torch.rand(n) * 1e-3 + 1e-4
        hph = ref.innovation_cov_dense(self.jac[:, : min(n, 100_000)],
                                       self.cov[: min(n, 100_000)])
        self.coef, self.whitening = filter_terms(hph * (n / min(n, 100_000)))

    # bytes / flops of each kernel (float32 storage)
    def innovation_bytes(self):
        return 4.0 * (self.m * self.n + self.n)

    def innovation_flops(self):
        return float(self.m * (self.m + 1) * self.n + 2 * self.n)

    def update_bytes(self):
        return 4.0 * (self.m * self.n + 4 * self.n)

    def update_flops(self):
        m, n = self.m, self.n
        return float(m * (m + 1) * n + 4 * m * n + 10 * n)

    def innovation(self, backend):
        return lambda: backend.innovation_cov_dense(self.jac, self.cov, 1.0, 0.0)

    def update(self, backend):
        return lambda: backend.fused_update_dense_(self.param, self.cov, self.jac, self.coef,
                                                   self.whitening, OK, 1.0, 0.0, 1e-8, 1.0,
                                                   False)

    def step(self, backend):
        """innovation_cov + the m x m work + fused_update_: one whole dense Kalman step."""
        def run():
            hph = backend.innovation_cov_dense(self.jac, self.cov, 1.0, 0.0)
            coef, whitening = filter_terms(hph)
            backend.fused_update_dense_(self.param, self.cov, self.jac, coef, whitening, OK, 1.0,
                                        0.0, 1e-8, 1.0, False)
        return run

    def matmul_rates(self, rounds=3):
        jt = self.jac.T.contiguous()
        g_innov = matmul_rate(self.jac, jt, rounds)
        g_update = matmul_rate(self.whitening.float(), self.jac, rounds)
        return compute_ceiling(g_innov), compute_ceiling(g_update), (g_innov, g_update)


class KronCase:
    """An nn.Linear weight (d_out, d_in) observed through a sample-grouped Kronecker block:
    inputs A (B, d_in), grad_outputs D (B, K, d_out), m = B K observations.

    The work is GEMMs against the T = B (B + 1) / 2 pairwise products of the inputs
    (docs/design.md, 2.6): the innovation's Q = Ap P^T and the update's diagonal G^T Ap, each
    2 T d_in d_out flops (the dominant contraction), plus O(T K^2 d_out) per-pair work and
    the update's step GEMM (2 B d_in d_out)."""

    def __init__(self, d_out: int, d_in: int, batch: int, k: int = 1):
        self.d_out, self.d_in, self.b, self.k = d_out, d_in, batch, k
        self.m = batch * k
        self.weight = torch.randn(d_out, d_in)
        self.cov = torch.rand(d_out, d_in) * 1e-3 + 1e-4
        self.inputs = torch.randn(batch, d_in)
        self.grad_outputs = torch.randn(batch, k, d_out)

    @property
    def n(self):
        return self.d_out * self.d_in

    @property
    def pairs(self):
        return self.b * (self.b + 1) // 2

    def dominant_flops(self):
        """The two T x d_in x d_out GEMMs of one step."""
        return float(2 * 2 * self.pairs * self.n)

    def flops(self):
        t, k = self.pairs, self.k
        return self.dominant_flops() + float(2 * t * k * k * self.d_out * 2
                                             + 2 * self.b * self.n + 12 * self.n)

    def nbytes(self):
        return 4.0 * 5 * self.n   # cov read twice (two kernels), weight and cov r/w

    def kron_step(self, backend):
        def run():
            hph = backend.innovation_cov_kron(self.inputs, self.grad_outputs, self.cov, 1.0, 0.0)
            coef, whitening = filter_terms(hph)
            backend.fused_update_kron_(self.weight, self.cov, self.inputs, self.grad_outputs,
                                       coef, whitening, OK, 1.0, 0.0, 1e-8, 1.0, False)
        return run

    def ungrouped(self):
        """The same observations as the previous release's blocks: every input row repeated
        K times, K = 1 (its cost grows as (B K)^2, not B^2)."""
        case = KronCase.__new__(KronCase)
        case.__dict__.update(self.__dict__)
        case.inputs = self.inputs.repeat_interleave(self.k, 0)
        case.grad_outputs = self.grad_outputs.reshape(self.m, 1, self.d_out)
        case.b, case.k = self.m, 1
        return case

    def build_jacobian(self):
        return torch.einsum("jko,ji->jkoi", self.grad_outputs, self.inputs).reshape(self.m, -1)

    def dense_step(self, backend):
        """Build H (m x d_out*d_in) explicitly, then the dense kernels."""
        def run():
            jac = self.build_jacobian()
            hph = backend.innovation_cov_dense(jac, self.cov, 1.0, 0.0)
            coef, whitening = filter_terms(hph)
            backend.fused_update_dense_(self.weight, self.cov, jac, coef, whitening, OK, 1.0, 0.0,
                                        1e-8, 1.0, False)
        return run

    def mm_rate(self, rounds=3):
        """torch.mm's GFLOP/s for the dominant contraction's shape (T x d_in) @ (d_in x d_out)."""
        ap = torch.randn(self.pairs, self.d_in)
        return matmul_rate(ap, self.cov.T, rounds)


class TimedLinearLoss:
    """torch.optim's closure over ``self.params`` for the synthetic loss sum_i <p_i, x_i>
    (``self.xs``): zero the gradients, backward, return the loss; its own time (the backward
    and any hooks the optimizer put there) is left in ``self.closure_seconds``."""

    params: List[torch.Tensor]
    xs: List[torch.Tensor]
    closure_seconds: float = 0.0

    def _closure(self):
        t0 = time.perf_counter()
        for p in self.params:
            p.grad = None
        loss = sum((p * x).sum() for p, x in zip(self.params, self.xs))
        loss.backward()
        self.closure_seconds = time.perf_counter() - t0
        return loss


class LossCase:
    """n float32 parameters in ``tensors`` tensors with gradients and covariances."""

    def __init__(self, n: int, tensors: int = 4, dtype=F32):
        sizes = [n // tensors + (1 if i < n % tensors else 0) for i in range(tensors)]
        self.n = n
        self.params = [torch.randn(s, dtype=dtype) for s in sizes]
        self.grads = [torch.randn(s, dtype=dtype) * 1e-2 for s in sizes]
        self.covs = [torch.rand(s) * 1e-3 + 1e-4 for s in sizes]
        self.r = 1.0

    def full(self, backend):
        """The whole loss-mode step: reduction g^T P- g, then the elementwise pass."""
        def run():
            quad = backend.loss_quad_form(self.grads, self.covs, 1.0, 0.0)
            s = quad + self.r
            backend.loss_step_(self.params, self.grads, self.covs, -1e-3 / s, 1.0 / s, OK, 1.0,
                               0.0, 1e-8, 1.0, False)
        return run

    def step_only(self, backend, quad: float = 0.5):
        """The elementwise pass alone (the reduction was accumulated during backward)."""
        s = torch.tensor(quad + self.r, dtype=F64)
        coef, weight = -1e-3 / s, 1.0 / s

        def run():
            backend.loss_step_(self.params, self.grads, self.covs, coef, weight, OK, 1.0, 0.0,
                               1e-8, 1.0, False)
        return run

    def adamw(self):
        ps = [torch.nn.Parameter(p.clone()) for p in self.params]
        for p, g in zip(ps, self.grads):
            p.grad = g.clone()
        opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)
        opt.step()   # allocate the state outside the timed region
        return opt.step

    def ivon(self):
        """ivon-opt's per-iteration optimizer work without forward/backward: draw the
        weight sample, collect the gradient sample, update (IVON.step)."""
        import ivon
        ps = [torch.nn.Parameter(p.clone()) for p in self.params]
        for p, g in zip(ps, self.grads):
            p.grad = g.clone()
        opt = ivon.IVON(ps, lr=0.1, ess=1e4)

        def run():
            with opt.sampled_params(train=True):
                pass
            opt.step()
        return run

    def working_set_bytes(self):
        return 3 * 4 * self.n       # params, grads, covs

    def bytes_full(self):
        return 7 * 4.0 * self.n     # reduction reads g, P; update reads p, g, P, writes p, P

    def bytes_step(self):
        return 5 * 4.0 * self.n


def have_cpp() -> bool:
    import kalman_kernels as kk
    return bool(kk.backends()["cpp"])


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def sizes_label(n: int) -> str:
    e = int(round(math.log10(n)))
    return f"1e{e}" if 10 ** e == n else str(n)
