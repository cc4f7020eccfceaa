"""What users call, timed beside the raw ops it calls and the ceilings (issues 7 and 12).

Every public entry point is measured in the same run, round-robin, against:

* the raw backend ops it calls on the same tensors (``innovation_cov_*`` +
  ``fused_update_*_``, or ``loss_quad_form`` + ``loss_step_``): the wrapper's overhead;
* ``torch.optim.AdamW(fused=True).step()`` on the same parameters (loss mode);
* ``torch.mm(H, H.T)`` of the dense Jacobian (the innovation's GEMM);
* for batch mode, the closure's forward and the building of the observation blocks
  (Jacobian probes), reported separately from the Kalman work.

Sections (functions taking the report's ``Table``, thread count, rounds and a summary dict):
``bench_loss_public``, ``bench_dense_public``, ``bench_kron_public``,
``bench_batch_public`` (a tracked 512 x 512 layer) and ``bench_tracked_mlp`` (issue 12's
MLP 256-d-d-10, batch 32, 10 classes, with the cost-model rows for the README).
"""
from __future__ import annotations

import gc
import time
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

import kalman_kernels as kk
from kalman_kernels import ops
from kalman_kernels.backends import resolve
from kalman_kernels.observations import batch_observation

from . import common as C

F64 = torch.float64


def _scalar(x, device="cpu"):
    return torch.tensor(float(x), dtype=F64, device=device)


def _true(device="cpu"):
    return torch.ones((), dtype=torch.bool, device=device)


# --------------------------------------------------------------------------------------
# Loss mode: KalmanNGD.step vs the raw ops vs AdamW(fused)
# --------------------------------------------------------------------------------------
class LossPublicCase:
    """n float32 parameters in 4 tensors with gradients, as a training step leaves them."""

    def __init__(self, n: int = 10_000_000, tensors: int = 4, backend: str = "auto"):
        sizes = [n // tensors + (1 if i < n % tensors else 0) for i in range(tensors)]
        self.n = n
        self.backend = backend
        self.params = [nn.Parameter(torch.randn(s)) for s in sizes]
        for p in self.params:
            p.grad = torch.randn(p.numel()) * 1e-2
        self.opt = kk.KalmanNGD(self.params, init_cov=1e-3, obs_noise=1.0, backend=backend)
        self.loss = torch.tensor(0.3)
        self.opt.step(lambda: self.loss)         # covariances allocated outside timing

    def public_step(self):
        """KalmanNGD.step with a closure returning the loss whose gradients are in .grad."""
        return lambda: self.opt.step(lambda: self.loss)

    def raw_ops(self):
        kernels = resolve(self.backend, torch.device("cpu"))
        grads = [p.grad for p in self.params]
        covs = [self.opt.covariance(p) for p in self.params]
        data = [p.data for p in self.params]
        ok = _true()

        def run():
            quad = kernels.loss_quad_form(grads, covs, 1.0, 0.0)
            s = quad + 1.0
            kernels.loss_step_(data, grads, covs, -0.3 / s, 1.0 / s, ok, 1.0, 0.0, 1e-12,
                               float("inf"), False)
        return run

    def adamw(self):
        ps = [nn.Parameter(p.detach().clone()) for p in self.params]
        for p, q in zip(ps, self.params):
            p.grad = q.grad.clone()
        opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)
        opt.step()
        return opt.step

    def bytes_full(self):
        return 7 * 4.0 * self.n


class HookedLossCase:
    """reduce_in_backward(): the closure runs backward (hooks sum g^T P- g); the step part
    is the time of KalmanNGD.step minus the time spent inside the closure."""

    def __init__(self, n: int = 10_000_000, tensors: int = 4, backend: str = "auto"):
        sizes = [n // tensors + (1 if i < n % tensors else 0) for i in range(tensors)]
        self.params = [nn.Parameter(torch.randn(s)) for s in sizes]
        self.xs = [torch.randn(s) * 1e-3 for s in sizes]
        self.opt = kk.KalmanNGD(self.params, init_cov=1e-3, obs_noise=1.0,
                                backend=backend).reduce_in_backward()
        self.closure_seconds = 0.0
        self.plain = [nn.Parameter(p.detach().clone()) for p in self.params]

    def _closure(self):
        t0 = time.perf_counter()
        for p in self.params:
            p.grad = None
        loss = sum((p * x).sum() for p, x in zip(self.params, self.xs))
        loss.backward()
        self.closure_seconds = time.perf_counter() - t0
        return loss.detach()

    def step(self):
        self.opt.step(self._closure)

    def plain_backward(self):
        for p in self.plain:
            p.grad = None
        loss = sum((p * x).sum() for p, x in zip(self.plain, self.xs))
        loss.backward()


def bench_loss_public(table, threads: int, rounds: int, summary: Dict, n: int = 10_000_000):
    case = LossPublicCase(n)
    fns = {"KalmanNGD.step": case.public_step(), "raw ops": case.raw_ops(),
           "AdamW(fused=True).step": case.adamw()}
    res = C.measure_group(fns, rounds, budget_s=30)
    adam = res["AdamW(fused=True).step"].median
    bw = C.add_bandwidth(3 * 4 * n)
    pub, raw = res["KalmanNGD.step"].median, res["raw ops"].median
    for name in fns:
        t = res[name].median
        table.add("loss mode, 4 tensors", n, 1, threads, name, res[name], case.bytes_full(), None,
                  case.bytes_full() / t / 1e9 / bw, f"{t / adam:.2f}x AdamW")
    del case
    gc.collect()
    hooked = HookedLossCase(n)
    hooked.step()
    step_part, backward_hooked, whole = C.Timing(), C.Timing(), C.Timing()
    plain = C.Timing()
    start = time.perf_counter()
    for r in range(rounds):
        t0 = time.perf_counter()
        hooked.step()
        total = time.perf_counter() - t0
        whole.times.append(total)
        step_part.times.append(total - hooked.closure_seconds)
        backward_hooked.times.append(hooked.closure_seconds)
        t0 = time.perf_counter()
        hooked.plain_backward()
        plain.times.append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > 30:
            break
    table.add("loss mode, reduce_in_backward", n, 1, threads, "KalmanNGD.step minus closure",
              step_part, 5 * 4.0 * n, None, 5 * 4.0 * n / step_part.median / 1e9 / bw,
              f"{step_part.median / adam:.2f}x AdamW")
    table.add("loss mode, reduce_in_backward", n, 1, threads, "backward with hooks",
              backward_hooked, None, None, None,
              f"+{(backward_hooked.median - plain.median) * 1e3:.2f} ms vs plain backward")
    table.add("loss mode, reduce_in_backward", n, 1, threads, "plain backward (no optimizer)",
              plain, None, None, None, "")
    summary[f"loss_public_10M_thr{threads}"] = {
        "public_ms": pub * 1e3, "raw_ops_ms": raw * 1e3, "adamw_ms": adam * 1e3,
        "public_vs_adamw": pub / adam, "public_vs_raw": pub / raw,
        "hooked_step_part_ms": step_part.median * 1e3,
        "hooked_step_part_vs_adamw": step_part.median / adam,
        "hook_overhead_on_backward_ms": (backward_hooked.median - plain.median) * 1e3,
        "target_public_vs_adamw": 1.25, "target_hooked_vs_adamw": 0.85}
    del hooked
    gc.collect()


# --------------------------------------------------------------------------------------
# ops.kalman_update_: dense and Kronecker blocks vs their raw ops
# --------------------------------------------------------------------------------------
def _filter_terms(hph, r=0.1):
    m = hph.shape[0]
    s = hph + r * torch.eye(m, dtype=F64)
    factor = torch.linalg.cholesky(s)
    coef = torch.cholesky_solve(torch.randn(m, 1, dtype=F64), factor).reshape(-1)
    eye = torch.eye(m, dtype=F64)
    return coef, torch.linalg.solve_triangular(factor, eye, upper=False)


def bench_dense_public(table, threads: int, rounds: int, summary: Dict, n: int = 1_000_000,
                       m: int = 32, backend: str = "auto"):
    kernels = resolve(backend, torch.device("cpu"))
    h = torch.randn(m, n)
    param, cov = torch.randn(n), torch.rand(n) * 1e-2 + 1e-3
    e = torch.randn(m)
    coef, w = _filter_terms(kernels.innovation_cov_dense(h, cov, 1.0, 0.0))
    ok = _true()

    def public():
        ops.kalman_update_([ops.DenseBlock(param, cov, h)], e, 0.1, backend=backend)

    def raw():
        kernels.innovation_cov_dense(h, cov, 1.0, 0.0)
        kernels.fused_update_dense_(param, cov, h, coef, w, ok, 1.0, 0.0, 0.0, float("inf"),
                                    False)

    ht = h.T.contiguous()
    fns = {"ops.kalman_update_": public, "raw ops (innovation + update)": raw,
           "torch.mm(H, H.T)": lambda: torch.mm(h, ht)}
    res = C.measure_group(fns, rounds, budget_s=30)
    pub = res["ops.kalman_update_"].median
    rawt = res["raw ops (innovation + update)"].median
    mm = res["torch.mm(H, H.T)"].median
    for name in fns:
        t = res[name].median
        table.add("dense step, public vs raw", n, m, threads, name, res[name], None,
                  None, None, f"{t / rawt:.2f}x raw, {t / mm:.2f}x mm")
    summary[f"dense_public_n1e6_m32_thr{threads}"] = {
        "public_ms": pub * 1e3, "raw_ops_ms": rawt * 1e3, "mm_ms": mm * 1e3,
        "public_vs_raw": pub / rawt, "public_vs_mm": pub / mm,
        "target_public_vs_raw": 1.1, "target_public_vs_mm": 2.5}


def bench_kron_public(table, threads: int, rounds: int, summary: Dict, d: int = 512,
                      batch: int = 32, classes=(1, 10), backend: str = "auto"):
    kernels = resolve(backend, torch.device("cpu"))
    for k in classes:
        w, cov = torch.randn(d, d), torch.rand(d, d) * 1e-2 + 1e-3
        a, g = torch.randn(batch, d), torch.randn(batch, k, d)
        m = batch * k
        e = torch.randn(m)
        coef, wh = _filter_terms(kernels.innovation_cov_kron(a, g, cov, 1.0, 0.0))
        ok = _true()

        def public():
            ops.kalman_update_([ops.KronBlock(w, cov, a, g)], e, 0.1, backend=backend)

        def raw():
            kernels.innovation_cov_kron(a, g, cov, 1.0, 0.0)
            kernels.fused_update_kron_(w, cov, a, g, coef, wh, ok, 1.0, 0.0, 0.0, float("inf"),
                                       False)

        res = C.measure_group({"ops.kalman_update_": public, "raw ops": raw}, rounds,
                              budget_s=20)
        rawt = res["raw ops"].median
        for name, t in res.items():
            table.add(f"kron {d}x{d} step, public vs raw", f"B={batch} K={k}", m, threads, name,
                      t, None, None, None, f"{t.median / rawt:.2f}x raw")
        summary[f"kron_public_{d}_B{batch}_K{k}_thr{threads}"] = {
            "public_ms": res["ops.kalman_update_"].median * 1e3, "raw_ops_ms": rawt * 1e3,
            "public_vs_raw": res["ops.kalman_update_"].median / rawt}


# --------------------------------------------------------------------------------------
# Batch mode through the optimizer
# --------------------------------------------------------------------------------------
def _raw_block_ops(kernels, blocks, hypers):
    """The raw kernel calls of one step over ``blocks`` (innovation of each, one
    factorisation's worth of precomputed terms, update of each)."""
    from kalman_kernels.ops.kalman_update import _innovation_cov
    hph = sum(_innovation_cov(kernels, b, hp) for b, hp in zip(blocks, hypers))
    coef, wh = _filter_terms(hph)
    ok = _true()

    @torch.no_grad()
    def run():
        for b, hp in zip(blocks, hypers):
            _innovation_cov(kernels, b, hp)
        for b in blocks:
            if isinstance(b, ops.DenseBlock):
                kernels.fused_update_dense_(b.param, b.cov, b.jac_2d(), coef, wh, ok, 1.0, 0.0,
                                            1e-12, float("inf"), False)
            else:
                kernels.fused_update_kron_(b.weight, b.cov, b.inputs, b.grouped_grad_outputs,
                                           coef, wh, ok, 1.0, 0.0, 1e-12, float("inf"), False)
    return run


class TrackedCase:
    """A model whose nn.Linear layers are tracked, batch observations (B, K) of softmax
    probabilities against one-hot targets."""

    def __init__(self, model: nn.Module, batch: int, classes: int, d_in: int,
                 backend: str = "auto", params=None):
        self.model = model
        self.x = torch.randn(batch, d_in)
        self.t = F.one_hot(torch.randint(classes, (batch,)), classes).float()
        self.opt = kk.KalmanNGD(params if params is not None else model.parameters(),
                                init_cov=1e-3, obs_noise=0.05, backend=backend)
        self.opt.track(model)
        self.backend = backend
        self.opt.step(self.closure)                  # first step verifies the tracking

    def closure(self):
        return self.model(self.x).softmax(1), self.t

    def step(self):
        self.opt.step(self.closure)

    def forward_only(self):
        with torch.enable_grad():
            self.model(self.x).softmax(1)

    def build(self):
        """Forward (with capture) + building the blocks, as the optimizer does."""
        opt = self.opt
        for c in opt._captures.values():
            c.calls.clear()
            c.armed = True
        with torch.enable_grad():
            pred, target = self.closure()
        for c in opt._captures.values():
            c.armed = False
        obs = batch_observation(pred, target, opt._params(), opt._captures, opt._cov,
                                opt._hyper, opt._warn_once)
        for c in opt._captures.values():
            c.calls.clear()
        return obs

    def raw(self):
        obs = self.build()
        return _raw_block_ops(resolve(self.backend, torch.device("cpu")), obs.blocks,
                              obs.hypers)

    def ops_step(self):
        """The functional step the optimizer calls (ops.kalman_step_) on blocks built once."""
        obs = self.build()
        r = self.opt._current_obs_noise()

        def run():
            ops.kalman_step_(obs.blocks, obs.hypers, obs.residual, r, backend=self.backend)
        return run

    def ungrouped_raw(self):
        """The same step's raw ops with every Kronecker block ungrouped (input rows repeated
        K times): the (B K)^2 cost of the previous release's kernels."""
        obs = self.build()
        blocks = []
        for b in obs.blocks:
            if isinstance(b, ops.KronBlock):
                g = b.grouped_grad_outputs
                blocks.append(ops.KronBlock(b.weight, b.cov, b.inputs.repeat_interleave(g.shape[1], 0),
                                            g.reshape(-1, g.shape[-1])))
            else:
                blocks.append(b)
        return _raw_block_ops(resolve(self.backend, torch.device("cpu")), blocks, obs.hypers)


def bench_batch_public(table, threads: int, rounds: int, summary: Dict, d: int = 512,
                       batch: int = 32, classes: int = 10):
    """A tracked d x d layer (+ bias) feeding a fixed readout to ``classes`` softmax scores."""
    torch.manual_seed(0)
    layer = nn.Linear(d, d)
    readout = nn.Linear(d, classes).requires_grad_(False)
    model = nn.Sequential(layer, nn.Tanh(), readout)
    case = TrackedCase(model, batch, classes, d, params=layer.parameters())
    fns = {"KalmanNGD.step": case.step, "forward": case.forward_only,
           "forward + build blocks": case.build, "ops.kalman_step_ (what the step calls)":
           case.ops_step(), "raw kernels": case.raw()}
    res = C.measure_group(fns, rounds, budget_s=30)
    step, fwd = res["KalmanNGD.step"].median, res["forward"].median
    build = res["forward + build blocks"].median - fwd
    opst = res["ops.kalman_step_ (what the step calls)"].median
    rawt = res["raw kernels"].median
    kalman_part = step - fwd - build
    for name, t in res.items():
        table.add(f"batch mode, tracked {d}x{d}", f"B={batch} K={classes}", batch * classes,
                  threads, name, t, None, None, None, f"{t.median / opst:.2f}x ops step")
    summary[f"batch_public_{d}_thr{threads}"] = {
        "step_ms": step * 1e3, "forward_ms": fwd * 1e3, "build_blocks_ms": build * 1e3,
        "ops_step_ms": opst * 1e3, "raw_kernels_ms": rawt * 1e3,
        "kalman_part_ms": kalman_part * 1e3,
        "optimizer_overhead_over_ops": kalman_part / opst - 1.0, "target_overhead": 0.15}


class _MLP(nn.Sequential):
    def __init__(self, d_in=256, d=1024, classes=10):
        super().__init__(nn.Linear(d_in, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh(),
                         nn.Linear(d, classes))


def bench_tracked_mlp(table, threads: int, rounds: int, summary: Dict, widths=(256, 1024),
                      batch: int = 32, classes: int = 10, ungrouped: bool = True):
    """Issue 12's MLP 256-d-d-10: AdamW iteration, KalmanNGD loss mode (standard closure),
    KalmanNGD batch mode with every layer tracked (grouped blocks), and the raw ops of the
    same step ungrouped."""
    for d in widths:
        torch.manual_seed(0)
        x = torch.randn(batch, 256)
        y = torch.randint(classes, (batch,))
        m_adam, m_loss, m_kal = _MLP(d=d), _MLP(d=d), _MLP(d=d)
        adam = torch.optim.AdamW(m_adam.parameters(), lr=1e-3, fused=True)
        loss_opt = kk.KalmanNGD(m_loss.parameters(), init_cov=1e-3, obs_noise=1.0)

        def adam_iter():
            adam.zero_grad()
            F.cross_entropy(m_adam(x), y).backward()
            adam.step()

        def loss_iter():
            def closure():
                loss_opt.zero_grad()
                loss = F.cross_entropy(m_loss(x), y)
                loss.backward()
                return loss
            loss_opt.step(closure)

        case = TrackedCase(m_kal, batch, classes, 256)
        case.x, case.t = x, F.one_hot(y, classes).float()
        fns = {"AdamW(fused) iteration": adam_iter, "KalmanNGD loss mode iteration": loss_iter,
               "KalmanNGD batch mode step (tracked, grouped)": case.step}
        res = C.measure_group(fns, rounds, budget_s=40)
        params = sum(p.numel() for p in m_kal.parameters())
        adam_t = res["AdamW(fused) iteration"].median
        entry = {f"{k}_ms": v.median * 1e3 for k, v in res.items()}
        if ungrouped:
            raw_ug = case.ungrouped_raw()
            t_ug = C.measure_group({"u": raw_ug}, 2, warmup=0, budget_s=60)["u"]
            res["raw ops of the same step, ungrouped ((B K)^2)"] = t_ug
            entry["ungrouped_raw_ops_ms"] = t_ug.median * 1e3
        for name, t in res.items():
            table.add(f"MLP 256-{d}-{d}-10 ({params / 1e6:.2f}M params)", f"B={batch} K={classes}",
                      batch * classes, threads, name, t, None, None, None,
                      f"{t.median / adam_t:.1f}x AdamW")
        entry["target_batch_step_ms_d1024"] = 300
        summary[f"tracked_mlp_d{d}_thr{threads}"] = entry
        del case, m_adam, m_loss, m_kal
        gc.collect()
