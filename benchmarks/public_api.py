"""What users call, timed beside the raw ops it calls and the ceilings.

Every public entry point is measured in the same run, round-robin, against:

* the raw backend ops it calls on the same tensors (``innovation_cov_*`` +
  ``fused_update_*_``, or ``loss_quad_form`` + ``loss_step_``): the wrapper's overhead;
* ``torch.optim.AdamW(fused=True).step()`` on the same parameters (loss mode);
* ``torch.mm(H, H.T)`` of the dense Jacobian (the innovation's GEMM);
* for batch mode, the closure's forward and the building of the observation blocks
  (Jacobian probes), reported separately from the Kalman work.

Sections (functions taking the report's ``Table``, thread count, rounds and a summary dict):
``bench_loss_public``, ``bench_dense_public``, ``bench_kron_public``,
``bench_batch_public`` (a tracked 512 x 512 layer) and ``bench_tracked_mlp`` (an MLP
256-d-d-10 with every layer tracked, batch 32, 10 classes, with the cost-model rows for the
README).
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
class LossPublicCase(C.TimedLinearLoss):
    """n float32 parameters in 4 tensors, stepped through KalmanNGD with torch.optim's
    closure (zero the gradients, backward, return the loss). The closure's own time (the
    backward of a synthetic loss sum_i <p_i, x_i>, with the optimizer's hooks) is measured
    inside it; a plain backward of the same loss without any optimizer is timed beside it.
    ``single_pass``: the default loss step (g^T P- g summed in the backward hooks where
    exact); False: ``reduce_in_backward(False)``, the two-pass step."""

    def __init__(self, n: int = 10_000_000, tensors: int = 4, backend: str = "auto",
                 single_pass: bool = True):
        sizes = [n // tensors + (1 if i < n % tensors else 0) for i in range(tensors)]
        self.n = n
        self.backend = backend
        self.params = [nn.Parameter(torch.randn(s)) for s in sizes]
        self.xs = [torch.randn(s) * 1e-3 for s in sizes]
        self.opt = kk.KalmanNGD(self.params, init_cov=1e-3, obs_noise=1.0, backend=backend)
        self.opt.reduce_in_backward(single_pass)
        self.closure_seconds = 0.0
        self.plain = [nn.Parameter(p.detach().clone()) for p in self.params]
        self.step()                              # covariances allocated outside timing
        self.path = self.opt.diagnostics()["loss_reduction"]
        expected = "in-backward" if single_pass else "two-pass: reduce_in_backward(False)"
        if self.path != expected:
            raise RuntimeError(f"the benchmark's loss step took {self.path!r}, not {expected!r}")

    def step(self):
        self.opt.step(self._closure)

    def plain_backward(self):
        for p in self.plain:
            p.grad = None
        loss = sum((p * x).sum() for p, x in zip(self.plain, self.xs))
        loss.backward()

    def _raw(self, with_reduction: bool):
        # copies: the raw ops must not write the optimizer's tensors (that would also make
        # its once-per-version covariance check read them again at the next step)
        kernels = resolve(self.backend, torch.device("cpu"))
        grads = [p.grad.clone() for p in self.params]
        covs = [self.opt.covariance(p).clone() for p in self.params]
        data = [p.detach().clone() for p in self.params]
        ok = _true()
        fixed = torch.tensor(1.5, dtype=F64)

        def run():
            s = kernels.loss_quad_form(grads, covs, 1.0, 0.0) + 1.0 if with_reduction else fixed
            kernels.loss_step_(data, grads, covs, -0.3 / s, 1.0 / s, ok, 1.0, 0.0, 1e-12,
                               float("inf"), False)
        return run

    def raw_ops(self):
        """quad form + step, the raw ops the two-pass step calls."""
        return self._raw(True)

    def raw_step_only(self):
        """The elementwise step alone (the reduction was summed during backward)."""
        return self._raw(False)

    def adamw(self):
        """AdamW(fused=True).step() in the same training loop: the same closure (zero the
        gradients, backward) runs first, untimed, so both optimizers read gradients freshly
        allocated by backward, as with zero_grad(set_to_none=True) in training."""
        ps = [nn.Parameter(p.detach().clone()) for p in self.params]
        opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)
        timing = {"last": 0.0}

        def closure():
            for p in ps:
                p.grad = None
            sum((p * x).sum() for p, x in zip(ps, self.xs)).backward()

        closure()
        opt.step()

        def run():
            closure()
            t0 = time.perf_counter()
            opt.step()
            timing["last"] = time.perf_counter() - t0
        run.timing = timing
        return run

    def bytes_full(self):
        return 7 * 4.0 * self.n


def bench_loss_public(table, threads: int, rounds: int, summary: Dict, n: int = 10_000_000,
                      budget_s: float = 60.0):
    """The default (single-pass) loss step and the two-pass one, AdamW(fused=True), a plain
    backward and the raw ops, all in one round-robin. What each optimizer adds to a
    training iteration is its step plus what it adds to backward: for KalmanNGD the step's
    time minus its closure's, plus the closure's time minus the plain backward's (the
    hooks); for AdamW its step after the same plain closure. Both subtract the closure's
    own time the same way."""
    bw = C.add_bandwidth(3 * 4 * n)
    cases = {"single": LossPublicCase(n, single_pass=True),
             "two": LossPublicCase(n, single_pass=False)}
    adam = cases["single"].adamw()
    raws = {"single": cases["single"].raw_step_only(), "two": cases["two"].raw_ops()}
    part = {k: C.Timing() for k in cases}
    closure = {k: C.Timing() for k in cases}
    raw_t = {k: C.Timing() for k in cases}
    plain, adam_t = C.Timing(), C.Timing()
    start = time.perf_counter()
    # 4x the rounds: each round is ~50 ms per function, and the medians of 15 moved by
    # +-8% between runs on this shared 2-core VM
    for r in range(4 * rounds):
        for key, case in cases.items():
            t0 = time.perf_counter()
            case.step()
            total = time.perf_counter() - t0
            part[key].times.append(total - case.closure_seconds)
            closure[key].times.append(case.closure_seconds)
            t0 = time.perf_counter()
            raws[key]()
            raw_t[key].times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cases["single"].plain_backward()
        plain.times.append(time.perf_counter() - t0)
        adam()
        adam_t.times.append(adam.timing["last"])
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    a = adam_t.median
    entry = {"adamw_ms": a * 1e3, "plain_backward_ms": plain.median * 1e3,
             "rounds": len(plain.times)}
    for key, label, name, nbytes in (
            ("single", "loss step, default (single pass)", "step only (hooked reduction)",
             5 * 4.0 * n),
            ("two", "loss step, reduce_in_backward(False)", "reduction + step", 7 * 4.0 * n)):
        hooks = closure[key].median - plain.median
        added = part[key].median + hooks
        rows = {"KalmanNGD.step minus its closure": part[key],
                f"raw ops ({name})": raw_t[key], "AdamW(fused=True).step": adam_t}
        for row, t in rows.items():
            table.add(label, n, 1, threads, row, t, nbytes, None,
                      nbytes / t.median / 1e9 / bw, f"{t.median / a:.2f}x AdamW")
        table.add(label, n, 1, threads, "closure (backward with the hooks)", closure[key],
                  None, None, None, f"+{hooks * 1e3:.2f} ms vs plain backward")
        table.add(label, n, 1, threads, "step + hooks' cost in backward (what it adds)",
                  C.Timing([added]), 7 * 4.0 * n, None, None, f"{added / a:.2f}x AdamW")
        prefix = "default" if key == "single" else "two_pass"
        entry.update({f"{prefix}_path": cases[key].path,
                      f"{prefix}_vs_adamw": added / a,
                      f"{prefix}_step_part_vs_adamw": part[key].median / a,
                      f"{prefix}_step_part_ms": part[key].median * 1e3,
                      f"{prefix}_hooks_in_backward_ms": hooks * 1e3,
                      f"{prefix}_raw_ops_vs_adamw": raw_t[key].median / a})
    entry.update({"target_default_vs_adamw": 1.0})
    summary[f"loss_public_10M_thr{threads}"] = entry
    cases = raws = None
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
    from kalman_kernels.ops._terms import innovation_cov
    hph = sum(innovation_cov(kernels, b, hp) for b, hp in zip(blocks, hypers))
    coef, wh = _filter_terms(hph)
    ok = _true()

    @torch.no_grad()
    def run():
        for b, hp in zip(blocks, hypers):
            innovation_cov(kernels, b, hp)
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

    def build(self, copies: bool = False):
        """Forward (with capture) + building the blocks, as the optimizer does; with
        ``copies`` the blocks hold copies of the optimizer's parameters and covariances (for
        timing the ops on their own without writing the optimizer's state)."""
        opt = self.opt
        for c in opt._captures.values():
            c.calls.clear()
            c.armed = True
        with torch.enable_grad():
            pred, target = self.closure()
        for c in opt._captures.values():
            c.armed = False
        obs = batch_observation(pred, target, opt._params(), opt._captures, opt._cov,
                                opt._hyper, opt._filter.warn_once)
        for c in opt._captures.values():
            c.calls.clear()
        if copies:
            blocks = []
            for b in obs.blocks:
                if isinstance(b, ops.KronBlock):
                    blocks.append(ops.KronBlock(b.weight.detach().clone(), b.cov.clone(),
                                                b.inputs, b.grad_outputs))
                else:
                    blocks.append(ops.DenseBlock(b.param.detach().clone(), b.cov.clone(), b.jac))
            obs.blocks = blocks
        return obs

    def raw(self):
        obs = self.build(copies=True)
        return _raw_block_ops(resolve(self.backend, torch.device("cpu")), obs.blocks,
                              obs.hypers)

    def ops_step(self):
        """The ops step under the optimizer's functional step (ops.kalman_step_, called by
        functional.kalman_ngd_batch_step) on blocks built once."""
        obs = self.build(copies=True)
        r = self.opt._filter.obs_noise(self.opt.obs_noise)

        def run():
            ops.kalman_step_(obs.blocks, obs.hypers, obs.residual, r, backend=self.backend)
        return run

    def ungrouped_raw(self):
        """The same step's raw ops with every Kronecker block ungrouped (input rows repeated
        K times): the (B K)^2 cost of the previous release's kernels."""
        obs = self.build(copies=True)
        blocks = []
        for b in obs.blocks:
            if isinstance(b, ops.KronBlock):
                g = b.grouped_grad_outputs
                blocks.append(ops.KronBlock(b.weight, b.cov,
                                            b.inputs.repeat_interleave(g.shape[1], 0),
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
    """An MLP 256-d-d-10: AdamW iteration, KalmanNGD loss mode (standard closure),
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
        # drop the references (not `del`: the timed closures above refer to these names)
        case = m_adam = m_loss = m_kal = None
        gc.collect()
