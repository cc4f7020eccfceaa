"""GPU benchmark of every built GPU backend (the rules: docs/design.md, section 6).

    python -m benchmarks.gpu                      # full grid: n = 1e6, 1e7, 1e8; m = 1, 8, 32, 128
    python -m benchmarks.gpu --quick              # n = 1e6, 1e7; m = 1, 32
    python -m benchmarks.gpu --backends triton --json out.json

1. **Check.** Every op of every available backend that serves CUDA tensors (its
   ``DEVICES`` names "cuda": the Triton backend, and the CUDA C++ backend once it is built)
   is run on fresh random inputs and compared element by element with the float64
   reference (the tolerances of docs/design.md, 5: float32 1e-5 elementwise, 1e-4 for
   reductions; bf16 1e-2).
2. **Time.** CUDA events around each call, after warm-up; median and IQR over repetitions;
   inputs rotate over enough copies that the working set of consecutive calls exceeds twice
   the L2 cache (no call reads what the previous one left in L2). Raw ops and the public
   entry points (``ops.kalman_update_``, ``ops.loss_update_``, ``KalmanNGD.step``), beside
   the ceilings measured in the same run: the device-to-device copy bandwidth
   (``dst.copy_(src)``, 2 x bytes per call), ``torch.mm`` of the same inner shape, and
   ``torch.optim.AdamW(fused=True)`` on the same parameters.
3. **Report.** One table: time, GB/s (bytes of the roofline model of docs/triton_backend.md
   divided by the time), fraction of the copy bandwidth, GFLOP/s and fraction of
   ``torch.mm``'s rate for the GEMM-shaped kernels, and the ratio to fused AdamW for the
   loss step; the same rows as JSON.

Without a CUDA GPU it prints "no GPU here" and exits 0. Exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

F32, F64 = torch.float32, torch.float64

SIZES_N = [1_000_000, 10_000_000, 100_000_000]
SIZES_M = [1, 8, 32, 128]
QUICK_N = [1_000_000, 10_000_000]
QUICK_M = [1, 32]
#: skip a (n, m) dense case whose float32 Jacobian exceeds this many bytes
JAC_LIMIT = 16e9
KRON_D_IN = 1024
LOSS_TENSOR = 4_000_000      # the loss step's parameters come as tensors of up to this size


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------
def gpu_backends(only: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """name -> module of every available backend whose DEVICES names "cuda" explicitly."""
    from kalman_kernels.backends import NAMES, _load
    found = {}
    for name in NAMES:
        module, _ = _load(name)
        if module is None or "cuda" not in getattr(module, "DEVICES", {}):
            continue
        if only and name not in only:
            continue
        found[name] = module
    return found


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
@dataclass
class Timing:
    ms: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    @property
    def iqr(self):
        if len(self.ms) < 4:
            return (min(self.ms), max(self.ms))
        q = statistics.quantiles(self.ms, n=4)
        return (q[0], q[2])


#: --cpu-smoke: wall-clock timing on CPU tensors (a dry run of the code paths through
#: Triton's interpreter; the figures mean nothing)
_CPU_SMOKE = False


def cuda_time(fn: Callable[[int], object], copies: int, reps: int, warmup: int = 3) -> Timing:
    """Milliseconds per call of ``fn(i)`` (i: which rotating copy of the inputs), timed with
    CUDA events, one pair per call, synchronised once at the end."""
    for i in range(1 if _CPU_SMOKE else warmup):
        fn(i % copies)
    if _CPU_SMOKE:
        ms = []
        for r in range(reps):
            t0 = time.perf_counter()
            fn(r % copies)
            ms.append((time.perf_counter() - t0) * 1e3)
        return Timing(ms)
    torch.cuda.synchronize()
    events = []
    for r in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(r % copies)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return Timing([s.elapsed_time(e) for s, e in events])


def rotation(bytes_per_call: float, l2_bytes: int, cap: int = 32) -> int:
    """Copies of the inputs so that consecutive calls touch more than 2 x L2."""
    return max(1, min(cap, math.ceil(2 * l2_bytes / max(bytes_per_call, 1))))


# --------------------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------------------
def copy_bandwidth(device, nbytes: int, reps: int) -> float:
    """GB/s of dst.copy_(src) (device to device; 2 x nbytes moved per call)."""
    n = max(1, nbytes // 4)
    src = torch.empty(n, dtype=F32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = cuda_time(lambda i: dst.copy_(src), 1, reps)
    return 2 * n * 4 / (t.median * 1e-3) / 1e9


def mm_rate(device, m: int, k: int, n: int, reps: int, dtype=F32) -> float:
    """GFLOP/s of torch.mm (m x k) @ (k x n) with torch's default float32 settings."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    t = cuda_time(lambda i: torch.mm(a, b), 1, reps)
    return 2.0 * m * k * n / (t.median * 1e-3) / 1e9


# --------------------------------------------------------------------------------------
# Roofline model (bytes and FLOPs per call; docs/triton_backend.md)
# --------------------------------------------------------------------------------------
def model_dense_s(m, n, s=4):
    return m * n * s + n * 4, 2.0 * m * m * n


def model_dense_update(m, n, s=4):
    return m * n * s + 4 * n * 4, 2.0 * m * n + 2.0 * m * m * n + 2.0 * m * n


def model_kron_s(b, n, d_in):
    pairs = b * (b + 1) // 2
    return n * 4, 2.0 * pairs * n


def model_kron_update(b, n):
    pairs = b * (b + 1) // 2
    return 4 * n * 4, 2.0 * (b + pairs) * n


def model_quad(n):
    return 2 * n * 4, 3.0 * n


def model_loss_step(n):
    return 5 * n * 4, 9.0 * n


def model_adamw(n):
    return 7 * n * 4, 15.0 * n


# --------------------------------------------------------------------------------------
# Checks against the float64 reference
# --------------------------------------------------------------------------------------
def _scaled_err(actual, expected, scale) -> float:
    a = actual.detach().double().cpu().reshape(-1)
    e = expected.detach().double().cpu().reshape(-1)
    s = scale.detach().double().cpu().reshape(-1).abs().clamp_min(1e-300)
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return float(((a - e).abs() / s).max()) if a.numel() else 0.0


def _filter_terms(hph: torch.Tensor, r: float = 0.2):
    m = hph.shape[0]
    s = hph + r * torch.eye(m, dtype=F64)
    factor = torch.linalg.cholesky(s)
    e = torch.randn(m, dtype=F64)
    coef = 0.7 * torch.cholesky_solve(e[:, None], factor).reshape(-1)
    white = torch.linalg.solve_triangular(factor, torch.eye(m, dtype=F64), upper=False)
    return coef, white


def check_backend(name: str, be, device, shrink: int = 1) -> List[dict]:
    """Every op on fresh random inputs against the float64 reference; one row per case.
    ``shrink`` divides the sizes (to try the checks through Triton's interpreter)."""
    import kalman_kernels.reference as ref
    rows = []
    ok = torch.ones((), dtype=torch.bool, device=device)

    def record(op, case, err, tol):
        rows.append({"backend": name, "op": op, "case": case, "error": err, "tol": tol,
                     "passed": bool(err <= tol)})

    for m, n, pdt in [(1, 100_003, F32), (8, 100_003, F32), (32, 65_537, F32),
                      (128, 20_011, F32), (8, 100_003, torch.bfloat16), (8, 30_011, F64)]:
        n = max(1, n // shrink)
        cdt = F64 if pdt == F64 else F32
        tol_e = 1e-2 if pdt == torch.bfloat16 else 1e-5
        tol_r = 1e-2 if pdt == torch.bfloat16 else 1e-4
        jac = torch.randn(m, n, dtype=F64).to(pdt)
        cov = (0.05 + torch.rand(n, dtype=F64)).to(cdt)
        param = torch.randn(n, dtype=F64).to(pdt)
        h, p = jac.to(F64), cov.to(F64) / 0.9 + 0.01
        s_ref = (h * p) @ h.T
        s = be.innovation_cov_dense(jac.to(device), cov.to(device), 0.9, 0.01)
        d = torch.diagonal(s_ref).abs()
        record("innovation_cov_dense", f"m={m} n={n} {pdt}",
               _scaled_err(s, s_ref, torch.sqrt(d[:, None] * d[None, :])), tol_r)
        coef, white = _filter_terms(s_ref)
        pg, cg = param.clone().to(device), cov.clone().to(device)
        be.fused_update_dense_(pg, cg, jac.to(device), coef.to(device), white.to(device), ok,
                               0.9, 0.01, 0.0, float("inf"), False)
        fh = white @ h
        new_p = param.to(F64) + p * (coef @ h)
        new_c = p - p * p * (fh * fh).sum(0)
        afh = white.abs() @ h.abs()
        record("fused_update_dense_ param", f"m={m} n={n} {pdt}",
               _scaled_err(pg, new_p, param.to(F64).abs() + p * (coef.abs() @ h.abs())), tol_e)
        record("fused_update_dense_ cov", f"m={m} n={n} {pdt}",
               _scaled_err(cg, new_c, p + p * p * (afh * afh).sum(0)), max(tol_e, 1e-5))
        u, dd = be.step_terms_dense(jac.to(device), coef.to(device), white.to(device))
        record("step_terms_dense", f"m={m} n={n} {pdt}",
               max(_scaled_err(u, coef @ h, coef.abs() @ h.abs()),
                   _scaled_err(dd, (fh * fh).sum(0), (afh * afh).sum(0))), tol_r)
    kron_cases = [(1, 1, 300, 1024), (8, 1, 300, 1024), (32, 1, 100, 1024), (8, 10, 64, 512)]
    if shrink > 1:   # through the interpreter: every pair is one interpreted program
        kron_cases = [(1, 1, 300, 1024), (8, 1, 300, 1024), (3, 10, 64, 512)]
    for b, k, d_out, d_in in kron_cases:
        d_out = max(1, d_out // shrink)
        a = torch.randn(b, d_in, dtype=F64).float()
        dg = torch.randn(b, k, d_out, dtype=F64).float()
        cov = (0.05 + torch.rand(d_out, d_in, dtype=F64)).float()
        w = torch.randn(d_out, d_in, dtype=F64).float()
        s_ref = ref.innovation_cov_kron(a, dg, cov, 0.9, 0.01)
        s = be.innovation_cov_kron(a.to(device), dg.to(device), cov.to(device), 0.9, 0.01)
        dia = torch.diagonal(s_ref).abs()
        record("innovation_cov_kron", f"B={b} K={k} {d_out}x{d_in}",
               _scaled_err(s, s_ref, torch.sqrt(dia[:, None] * dia[None, :])), 1e-4)
        coef, white = _filter_terms(s_ref)
        wg, cg = w.clone().to(device), cov.clone().to(device)
        be.fused_update_kron_(wg, cg, a.to(device), dg.to(device), coef.to(device),
                              white.to(device), ok, 0.9, 0.01, 0.0, float("inf"), False)
        w64, c64 = w.double(), cov.double()
        ref.fused_update_kron_(w64, c64, a, dg, coef, white, torch.ones((), dtype=torch.bool),
                               0.9, 0.01, 0.0, float("inf"), False)
        p = cov.double() / 0.9 + 0.01
        step_abs = ref.kron_step_direction(a.abs(), dg.abs(), coef.abs())
        # the same sums over absolute values: the condition scale of each element
        diag_abs = ref.kron_diag_term(a.abs(), dg.abs(), white.abs())
        record("fused_update_kron_ weight", f"B={b} K={k} {d_out}x{d_in}",
               _scaled_err(wg, w64, w.double().abs() + p * step_abs), 1e-5)
        record("fused_update_kron_ cov", f"B={b} K={k} {d_out}x{d_in}",
               _scaled_err(cg, c64, p + p * p * diag_abs), 1e-5)
    shapes = [(1000, 1000 // shrink), (4099,), (7,), (2_000_003 // shrink,)]
    for pdt in (F32, torch.bfloat16):
        grads = [(0.1 * torch.randn(s, dtype=F64)).to(pdt) for s in shapes]
        covs = [(0.05 + torch.rand(s, dtype=F64)).float() for s in shapes]
        params = [torch.randn(s, dtype=F64).to(pdt) for s in shapes]
        qf = be.loss_quad_form([g.to(device) for g in grads], [c.to(device) for c in covs],
                               0.9, 0.01)
        qref = ref.loss_quad_form(grads, covs, 0.9, 0.01)
        record("loss_quad_form", f"{pdt}", abs(float(qf) - float(qref)) / float(qref), 1e-4)
        pg = [x.clone().to(device) for x in params]
        cg = [x.clone().to(device) for x in covs]
        coef = torch.tensor(-0.5, dtype=F64, device=device)
        weight = torch.tensor(2.0, dtype=F64, device=device)
        be.loss_step_(pg, [g.to(device) for g in grads], cg, coef, weight, ok, 0.9, 0.01,
                      0.0, float("inf"), False)
        err_p = err_c = 0.0
        for p0, g, c0, p1, c1 in zip(params, grads, covs, pg, cg):
            pp = c0.double() / 0.9 + 0.01
            g64 = g.double()
            err_p = max(err_p, _scaled_err(p1, p0.double() - 0.5 * pp * g64,
                                           p0.double().abs() + 0.5 * pp * g64.abs()))
            err_c = max(err_c, _scaled_err(c1, pp - 2.0 * pp * pp * g64 * g64,
                                           pp + 2.0 * pp * pp * g64 * g64))
        record("loss_step_ param", f"{pdt}", err_p, 1e-2 if pdt != F32 else 1e-5)
        record("loss_step_ cov", f"{pdt}", err_c, 1e-5)
    return rows


# --------------------------------------------------------------------------------------
# Timed cases
# --------------------------------------------------------------------------------------
@dataclass
class Row:
    backend: str
    op: str
    path: str            # "raw" (the backend op) or "api" (the public entry point)
    n: int
    m: int
    ms: float
    iqr_ms: tuple
    bytes: float
    flops: float
    gbps: float = 0.0
    frac_copy: float = 0.0
    gflops: float = 0.0
    frac_mm: Optional[float] = None
    vs_adamw: Optional[float] = None
    note: str = ""


def _row(backend, op, path, n, m, t: Timing, nbytes, flops, copy_bw, mm=None, adamw_ms=None,
         note=""):
    sec = t.median * 1e-3
    row = Row(backend, op, path, n, m, t.median, t.iqr, nbytes, flops)
    row.gbps = nbytes / sec / 1e9
    row.frac_copy = row.gbps / copy_bw
    row.gflops = flops / sec / 1e9
    if mm:
        row.frac_mm = row.gflops / mm
    if adamw_ms:
        row.vs_adamw = t.median / adamw_ms
    row.note = note
    return row


def _split(n: int) -> List[int]:
    sizes = []
    while n > 0:
        sizes.append(min(n, LOSS_TENSOR))
        n -= sizes[-1]
    return sizes


def bench(backends: Dict[str, object], sizes_n, sizes_m, reps: int, device) -> List[Row]:
    import kalman_kernels as kk
    from kalman_kernels import ops
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 50 * 2 ** 20))
    else:
        l2 = 2 ** 20
    rows: List[Row] = []
    ok = torch.ones((), dtype=torch.bool, device=device)
    for n in sizes_n:
        copy_bw = copy_bandwidth(device, max(4 * l2, n * 4), reps)
        rows.append(Row("torch", "copy_ (ceiling)", "raw", n, 0, 2 * n * 4 / copy_bw / 1e6,
                        (0, 0), 2 * n * 4, 0, gbps=copy_bw, frac_copy=1.0))
        # ---- loss mode (m = 1 observation): raw ops, the public API, KalmanNGD, AdamW
        sizes = _split(n)
        nb, fl = model_loss_step(n)
        copies = rotation(nb, l2, cap=max(1, int(8e9 // max(nb, 1))))
        sets = [([torch.randn(s, device=device) for s in sizes],
                 [0.01 * torch.randn(s, device=device) for s in sizes],
                 [torch.full((s,), 1e-3, device=device) for s in sizes]) for _ in range(copies)]
        adam_params = [[torch.nn.Parameter(p) for p in st[0]] for st in sets]
        for ps, st in zip(adam_params, sets):
            for p, g in zip(ps, st[1]):
                p.grad = g
        adams = [torch.optim.AdamW(ps, lr=1e-3, fused=True) for ps in adam_params]
        for opt in adams:
            opt.step()                                   # allocate the moments
        t_adam = cuda_time(lambda i: adams[i].step(), copies, reps)
        rows.append(_row("torch", "AdamW(fused=True).step", "api", n, 1, t_adam,
                         *model_adamw(n), copy_bw))
        for name, be in backends.items():
            coef = torch.tensor(-1e-3, dtype=F64, device=device)
            weight = torch.tensor(1e-3, dtype=F64, device=device)
            t = cuda_time(lambda i: be.loss_quad_form(sets[i][1], sets[i][2], 1.0, 0.0),
                          copies, reps)
            rows.append(_row(name, "loss_quad_form", "raw", n, 1, t, *model_quad(n), copy_bw))
            t = cuda_time(lambda i: be.loss_step_(sets[i][0], sets[i][1], sets[i][2], coef,
                                                  weight, ok, 1.0, 0.0, 1e-12, float("inf"),
                                                  False), copies, reps)
            rows.append(_row(name, "loss_step_", "raw", n, 1, t, nb, fl, copy_bw,
                             adamw_ms=t_adam.median))

            def quad_and_step(i):
                q = be.loss_quad_form(sets[i][1], sets[i][2], 1.0, 0.0)
                be.loss_step_(sets[i][0], sets[i][1], sets[i][2], coef, 1.0 / (q + 1.0), ok,
                              1.0, 0.0, 1e-12, float("inf"), False)
            t = cuda_time(quad_and_step, copies, reps)
            qb, qf = model_quad(n)
            rows.append(_row(name, "loss_quad_form + loss_step_", "raw", n, 1, t, nb + qb,
                             fl + qf, copy_bw, adamw_ms=t_adam.median))
            try:
                t = cuda_time(lambda i: ops.loss_update_(sets[i][0], sets[i][1], sets[i][2],
                                                         0.5, 1.0, backend=name), copies, reps)
                rows.append(_row(name, "ops.loss_update_", "api", n, 1, t, nb + qb, fl + qf,
                                 copy_bw, adamw_ms=t_adam.median))
            except Exception as exc:  # the public path must not hide the raw figures
                rows.append(Row(name, "ops.loss_update_", "api", n, 1, float("nan"), (0, 0),
                                0, 0, note=f"failed: {type(exc).__name__}: {exc}"[:200]))
            try:
                opts, losses = [], []
                for ps in adam_params:
                    opt = kk.KalmanNGD(ps, init_cov=1e-3, obs_noise=1.0, backend=name)
                    opts.append(opt)
                    losses.append(torch.tensor(0.5, device=device))
                t = cuda_time(lambda i: opts[i].step(lambda: losses[i]), copies, reps)
                rows.append(_row(name, "KalmanNGD.step (loss mode)", "api", n, 1, t, nb + qb,
                                 fl + qf, copy_bw, adamw_ms=t_adam.median))
            except Exception as exc:
                rows.append(Row(name, "KalmanNGD.step (loss mode)", "api", n, 1, float("nan"),
                                (0, 0), 0, 0, note=f"failed: {type(exc).__name__}: {exc}"[:200]))
        # drop the references before the next size (not `del`: the timed closures above
        # refer to these names)
        sets = adam_params = adams = None
        torch.cuda.empty_cache()
        # ---- dense blocks
        for m in sizes_m:
            if m * n * 4 > JAC_LIMIT:
                rows.append(Row("-", "dense", "raw", n, m, float("nan"), (0, 0), 0, 0,
                                note=f"skipped: the float32 Jacobian needs "
                                     f"{m * n * 4 / 1e9:.0f} GB"))
                continue
            sb, sf = model_dense_s(m, n)
            ub, uf = model_dense_update(m, n)
            copies = rotation(ub, l2, cap=max(1, int(JAC_LIMIT // max(ub, 1))))
            jacs = [torch.randn(m, n, device=device) for _ in range(copies)]
            params = [torch.randn(n, device=device) for _ in range(copies)]
            covs = [torch.full((n,), 1e-3, device=device) for _ in range(copies)]
            coef = torch.full((m,), 1e-3, dtype=F64, device=device)
            white = torch.eye(m, dtype=F64, device=device)
            mm_s = mm_rate(device, m, n, m, reps) if m >= 8 else None
            mm_u = mm_rate(device, m, m, n, reps) if m >= 8 else None
            for name, be in backends.items():
                t = cuda_time(lambda i: be.innovation_cov_dense(jacs[i], covs[i], 1.0, 0.0),
                              copies, reps)
                rows.append(_row(name, "innovation_cov_dense", "raw", n, m, t, sb, sf, copy_bw,
                                 mm=mm_s))
                t = cuda_time(lambda i: be.fused_update_dense_(
                    params[i], covs[i], jacs[i], coef, white, ok, 1.0, 0.0, 1e-12,
                    float("inf"), False), copies, reps)
                rows.append(_row(name, "fused_update_dense_", "raw", n, m, t, ub, uf, copy_bw,
                                 mm=mm_u))
                residual = torch.randn(m, device=device)
                try:
                    t = cuda_time(lambda i: ops.kalman_update_(
                        [ops.DenseBlock(params[i], covs[i], jacs[i])], residual, 1.0,
                        backend=name), copies, reps)
                    rows.append(_row(name, "ops.kalman_update_ (dense)", "api", n, m, t,
                                     sb + ub, sf + uf, copy_bw))
                except Exception as exc:
                    rows.append(Row(name, "ops.kalman_update_ (dense)", "api", n, m,
                                    float("nan"), (0, 0), 0, 0,
                                    note=f"failed: {type(exc).__name__}: {exc}"[:200]))
            jacs = params = covs = None
            torch.cuda.empty_cache()
        # ---- Kronecker blocks (B = m samples, K = 1; weight (n / d_in, d_in))
        d_in = KRON_D_IN
        d_out = max(1, n // d_in)
        nk = d_out * d_in
        for b in sizes_m:
            kb, kf = model_kron_update(b, nk)
            sb, sf = model_kron_s(b, nk, d_in)
            copies = rotation(kb, l2, cap=max(1, int(8e9 // max(kb, 1))))
            weights = [torch.randn(d_out, d_in, device=device) for _ in range(copies)]
            covs = [torch.full((d_out, d_in), 1e-3, device=device) for _ in range(copies)]
            a = torch.randn(b, d_in, device=device)
            d = torch.randn(b, 1, d_out, device=device)
            coef = torch.full((b,), 1e-3, dtype=F64, device=device)
            white = torch.eye(b, dtype=F64, device=device)
            pairs = b * (b + 1) // 2
            mm_k = mm_rate(device, d_out, pairs, d_in, reps)
            for name, be in backends.items():
                t = cuda_time(lambda i: be.innovation_cov_kron(a, d, covs[i], 1.0, 0.0), copies,
                              reps)
                rows.append(_row(name, "innovation_cov_kron", "raw", nk, b, t, sb, sf, copy_bw,
                                 mm=mm_k))
                t = cuda_time(lambda i: be.fused_update_kron_(
                    weights[i], covs[i], a, d, coef, white, ok, 1.0, 0.0, 1e-12, float("inf"),
                    False), copies, reps)
                rows.append(_row(name, "fused_update_kron_", "raw", nk, b, t, kb, kf, copy_bw,
                                 mm=mm_k))
                residual = torch.randn(b, device=device)
                try:
                    t = cuda_time(lambda i: ops.kalman_update_(
                        [ops.KronBlock(weights[i], covs[i], a, d[:, 0])], residual, 1.0,
                        backend=name), copies, reps)
                    rows.append(_row(name, "ops.kalman_update_ (kron)", "api", nk, b, t,
                                     sb + kb, sf + kf, copy_bw))
                except Exception as exc:
                    rows.append(Row(name, "ops.kalman_update_ (kron)", "api", nk, b,
                                    float("nan"), (0, 0), 0, 0,
                                    note=f"failed: {type(exc).__name__}: {exc}"[:200]))
            weights = covs = None
            torch.cuda.empty_cache()
    return rows


def print_table(rows: List[Row], file=sys.stdout) -> None:
    head = (f"{'backend':8} {'op':32} {'path':4} {'n':>11} {'m':>4} {'ms':>9} {'GB/s':>8} "
            f"{'copy':>6} {'GFLOP/s':>9} {'mm':>6} {'/AdamW':>7}  note")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        frac_mm = f"{r.frac_mm:6.2f}" if r.frac_mm is not None else " " * 6
        vs = f"{r.vs_adamw:7.2f}" if r.vs_adamw is not None else " " * 7
        print(f"{r.backend:8} {r.op:32} {r.path:4} {r.n:11d} {r.m:4d} {r.ms:9.3f} "
              f"{r.gbps:8.1f} {r.frac_copy:6.2f} {r.gflops:9.1f} {frac_mm} {vs}  {r.note}",
              file=file)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 1e6, 1e7; m = 1, 32")
    parser.add_argument("--backends", nargs="*", help="only these GPU backends")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", default=None, help="where to write the rows (default: "
                        "benchmarks/results/gpu-<device>-<time>.json)")
    parser.add_argument("--no-check", action="store_true", help="skip the reference checks")
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        return _cpu_smoke(args)

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no GPU here (torch.cuda.is_available() is False); it needs a "
              "CUDA GPU. Nothing was measured.")
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    backends = gpu_backends(args.backends)
    import kalman_kernels as kk
    name = torch.cuda.get_device_name(device)
    print(f"device: {name}; torch {torch.__version__}; backends serving cuda: "
          f"{', '.join(backends) or 'none'}; unavailable: {kk.backend_errors()}")
    if not backends:
        print("no GPU backend is available; nothing to measure")
        return 1
    checks = []
    if not args.no_check:
        for bname, be in backends.items():
            checks += check_backend(bname, be, device)
        failed = [c for c in checks if not c["passed"]]
        for c in checks:
            print(f"check {c['backend']:7} {c['op']:28} {c['case']:28} error {c['error']:.2e} "
                  f"(tol {c['tol']:.0e}) {'ok' if c['passed'] else 'FAILED'}")
        print(f"checks: {len(checks) - len(failed)} passed, {len(failed)} failed")
    sizes_n = QUICK_N if args.quick else SIZES_N
    sizes_m = QUICK_M if args.quick else SIZES_M
    t0 = time.time()
    rows = bench(backends, sizes_n, sizes_m, args.reps, device)
    print_table(rows)
    print(f"(benchmark time {time.time() - t0:.0f} s)")
    out = args.json
    if out is None:
        os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
        tag = "".join(ch if ch.isalnum() else "-" for ch in name)
        out = os.path.join(os.path.dirname(__file__), "results",
                           f"gpu-{tag}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(out, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "host": platform.node(),
                   "backends": list(backends), "checks": checks,
                   "rows": [asdict(r) for r in rows]}, f, indent=1, default=str)
    print(f"wrote {out}")
    return 1 if any(not c["passed"] for c in checks) else 0


def _cpu_smoke(args) -> int:
    """Run every code path of the checks and the timing loop on tiny CPU tensors through
    Triton's interpreter (TRITON_INTERPRET=1): a test that the script works, not a measure."""
    global _CPU_SMOKE, JAC_LIMIT, KRON_D_IN, LOSS_TENSOR
    _CPU_SMOKE = True
    JAC_LIMIT, KRON_D_IN, LOSS_TENSOR = 1e6, 64, 3000
    device = torch.device("cpu")
    from kalman_kernels.backends import _load
    module, reason = _load("triton")
    if module is None:
        print(f"cpu smoke run needs the triton backend: {reason}")
        return 1
    backends = {"triton": module}
    checks = check_backend("triton", module, device, shrink=50)
    failed = [c for c in checks if not c["passed"]]
    rows = bench(backends, [3000], [1, 8], 1, device)
    print_table(rows)
    broken = [r for r in rows if r.path == "raw" and not math.isfinite(r.ms)]
    print(f"cpu smoke: {len(checks)} checks, {len(failed)} failed; {len(rows)} rows, "
          f"{len(broken)} raw rows without a time")
    for c in failed:
        print("FAILED", c)
    return 1 if failed or broken else 0


if __name__ == "__main__":
    sys.exit(main())
