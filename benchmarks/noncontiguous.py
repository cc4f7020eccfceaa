"""Non-contiguous parameters: a contiguous staging copy against a strided pass.

    python -m benchmarks.noncontiguous                 # 1 thread, 4 tensors of 1024 x 1024
    python -m benchmarks.noncontiguous --threads 2 --rows 2048 --cols 1024

The kernels write a parameter as one flat array in its logical order, so a transposed (or
sliced) parameter needs either kernels that follow its strides or a contiguous copy that is
written back after the step (what ``KalmanNGD`` does: ``kalman_kernels._staging.Staging``).
This script measures, median over round-robin rounds (the machines are shared; docs/design.md, 6):

* **public step**: ``KalmanNGD.step`` in loss mode with torch.optim's closure, its own time
  subtracted (as ``benchmarks/public_api.py``), on contiguous parameters and on transposed
  ones (staged);
* **raw kernels**: the backend's two passes (quad form + step) on contiguous tensors, and the
  staging work alone on transposed ones (copy of the gradient and the parameter in, the
  parameter back);
* **a strided pass**, estimated with torch's own strided elementwise machinery
  (TensorIterator, which follows any strides and reorders the loops for them): one fused
  in-place op reading three arrays and writing one, ``p.addcmul_(g, cov)``, once with every
  operand contiguous and once with ``p`` and ``g`` transposed and ``cov`` contiguous (as the
  covariance is: it is the optimizer's own, always contiguous). The difference is what a
  strided kernel pays per pass over mixed layouts; the loss step makes two such passes (the
  reduction and the update) and batch mode's update one.

Measured 2026-12-07 on the 2-vCPU development machine (load average about 4: shared), 1
thread, 40 rounds, 4 float32 tensors, medians:

| tensors | step, contiguous | transposed (staged) | staging alone | strided penalty x 2 |
| --- | --- | --- | --- | --- |
| 1000 x 1000 | 10.1 ms | 52.6 ms (5.2x) | 35.3 ms | 18.4 ms |
| 1024 x 1024 | 10.8 ms | 66.1 ms (6.1x) | 48.5 ms | 114.1 ms |

Neither wins everywhere: off powers of two a strided pass would cost about half the
staging; at a power-of-two leading stride (1024) the strided pass's writes conflict in the
caches and staging costs less than half of it (its write-back runs in the parameter's memory
order, which avoids that; ``Staging.write_back``). Staging was chosen: it needs no kernel of
the four backends to change, keeps a failed step from touching the parameter, and contiguous
parameters do not pay for it (``benchmarks.report --only public``, same day: the loss step's
ratio to its raw ops 1.04 before and after). What would remove the cost for transposes and
channels_last in loss mode is a covariance laid out like its parameter (all three arrays in
one memory order, no copy); the covariance is kept contiguous instead (docs/design.md, 3).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import kalman_kernels as kk
from kalman_kernels._staging import Staging
from kalman_kernels.backends import resolve

from .common import TimedLinearLoss


class LayoutLossCase(TimedLinearLoss):
    def __init__(self, rows: int, cols: int, tensors: int, transposed: bool):
        def make():
            return (torch.randn(cols, rows).t() if transposed else torch.randn(rows, cols))
        self.params = [nn.Parameter(make()) for _ in range(tensors)]
        self.xs = [torch.randn(rows, cols) * 1e-3 for _ in range(tensors)]
        self.opt = kk.KalmanNGD(self.params, init_cov=1e-3, obs_noise=1.0)
        # The two-pass loss step: its whole reduction runs inside step(), so "step minus the
        # closure's time" is all of its work. The default single-pass step moves part of it
        # into backward hooks, inside the closure, where subtracting the closure would hide
        # it (benchmarks/public_api.py charges the hooks separately).
        self.opt.reduce_in_backward(False)
        self.closure_seconds = 0.0
        self.step()                               # covariances allocated outside timing

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.step(self._closure)
        return time.perf_counter() - t0 - self.closure_seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--tensors", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--contiguous-only", action="store_true",
                    help="only the public step on contiguous parameters (to compare commits: "
                         "contiguous parameters must not pay for the staging)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, cols, k = args.rows, args.cols, args.tensors

    contiguous = LayoutLossCase(rows, cols, k, transposed=False)
    if args.contiguous_only:
        xs = sorted(contiguous.step() for _ in range(args.rounds))
        print(f"public step, contiguous: median {statistics.median(xs) * 1e3:.2f} ms, IQR "
              f"{xs[len(xs) // 4] * 1e3:.2f}-{xs[3 * len(xs) // 4] * 1e3:.2f} ms")
        return
    transposed = LayoutLossCase(rows, cols, k, transposed=True)
    kernels = resolve("auto", torch.device("cpu"))
    ok = torch.ones((), dtype=torch.bool)
    coef, weight = torch.tensor(-0.3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)

    def raw_kernels():
        ps = [p.detach() for p in contiguous.params]
        gs = [p.grad for p in contiguous.params]
        covs = [contiguous.opt.covariance(p) for p in contiguous.params]
        kernels.loss_quad_form(gs, covs, 1.0, 0.0)
        kernels.loss_step_(ps, gs, covs, coef, weight, ok, 1.0, 0.0, 1e-12, float("inf"),
                           False)

    t_params = [p.detach() for p in transposed.params]
    t_grads = [torch.randn(cols, rows).t() for _ in range(k)]
    c_params = [torch.randn(rows, cols) for _ in range(k)]
    c_grads = [torch.randn(rows, cols) for _ in range(k)]
    covs = [torch.rand(rows, cols) for _ in range(k)]

    def staging():
        # what the optimizer does for each transposed parameter: its gradient and itself
        # copied in, the parameter written back (in its memory order)
        stage = Staging()
        for p, g in zip(t_params, t_grads):
            Staging.read(g)
            stage.stage(p)
        stage.write_back()

    def pass_contiguous():
        for p, g, c in zip(c_params, c_grads, covs):
            p.addcmul_(g, c, value=1e-30)

    def pass_strided():
        for p, g, c in zip(t_params, t_grads, covs):
            p.addcmul_(g, c, value=1e-30)

    timed = {
        "public step, contiguous": None,
        "public step, transposed (staged)": None,
        "raw kernels (2 passes), contiguous": raw_kernels,
        "staging alone (copy g, p in; p back)": staging,
        "one fused pass, contiguous": pass_contiguous,
        "one fused pass, strided (p, g transposed)": pass_strided,
    }
    samples = {name: [] for name in timed}
    with torch.no_grad():
        for fn in timed.values():
            if fn is not None:
                fn()
    for _ in range(args.rounds):
        samples["public step, contiguous"].append(contiguous.step())
        samples["public step, transposed (staged)"].append(transposed.step())
        with torch.no_grad():
            for name, fn in timed.items():
                if fn is None:
                    continue
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)

    def q(xs, f):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(f * len(xs)))]

    n = rows * cols * k
    print(f"{k} float32 tensors of {rows} x {cols} ({n / 1e6:.1f}M elements), "
          f"{args.threads} thread(s), {args.rounds} rounds, torch {torch.__version__}, "
          f"backend {kernels.NAME}")
    print(f"{'case':45s} {'median ms':>10s} {'IQR ms':>14s}")
    med = {}
    for name, xs in samples.items():
        med[name] = statistics.median(xs)
        print(f"{name:45s} {med[name] * 1e3:10.2f} "
              f"{q(xs, .25) * 1e3:6.2f}-{q(xs, .75) * 1e3:6.2f}")
    base = med["public step, contiguous"]
    ratio = med["public step, transposed (staged)"] / base
    print(f"public step, transposed / contiguous: {ratio:.2f}x")
    penalty = med["one fused pass, strided (p, g transposed)"] - med["one fused pass, contiguous"]
    print(f"staging overhead: {med['staging alone (copy g, p in; p back)'] * 1e3:.2f} ms; strided "
          f"penalty per pass: {penalty * 1e3:.2f} ms, x2 passes (loss step): "
          f"{2 * penalty * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
