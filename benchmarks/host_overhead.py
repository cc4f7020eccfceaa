"""Where the public loss step's non-kernel time goes: a diagnostic, not a target.

    python -m benchmarks.host_overhead             # 1 thread, 10M parameters in 4 tensors
    python -m benchmarks.host_overhead --threads 2 --n 1000000

Two tables:

* **cold single operations**: each small host operation timed right after streaming 128 MB
  through the caches (as the loss step's host code runs: after backward, and between the
  reduction and the elementwise pass), median over rounds. Warm, each is about a microsecond;
  cold, the Python and dispatcher code paths it touches are out of cache;
* **the step by segment**: ``KalmanNGD.step`` with timestamps at the boundaries of its
  phases (the closure, the backend's two kernels, the optimizer's bookkeeping), medians over
  steps. The segments between kernels are the host code; the first and last include
  torch.optim's step wrapper (``record_function`` enter and exit, which AdamW pays too):
  the segments before the optimizer's first check (``check groups``) and after its last
  (``cov record``) are that wrapper and little else. The timestamps add their own cost at
  each boundary (not subtracted).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import kalman_kernels as kk
from kalman_kernels.backends import resolve
from kalman_kernels.ops import loss_update

from .public_api import LossPublicCase


def cold_single_ops(rounds: int = 30):
    """[(name, median us)] of small operations run right after a 128 MB copy."""
    src, dst = torch.empty(16_000_000), torch.empty(16_000_000)
    t = torch.zeros(())
    view = t.numpy()
    params = [torch.nn.Parameter(torch.randn(100)) for _ in range(4)]

    def numpy_increment():
        view[...] += 1

    cases = {
        "nothing (the timer)": lambda: None,
        "0-d tensor add_(1)": lambda: t.add_(1),
        "the same through its numpy view": numpy_increment,
        "tensor.device.type": lambda: t.device.type,
        "tensor.is_cpu": lambda: t.is_cpu,
        "torch.compiler.is_compiling()": torch.compiler.is_compiling,
        "float(0-d tensor)": lambda: float(t),
        "torch.tensor(1.0, dtype=float64)": lambda: torch.tensor(1.0, dtype=torch.float64),
        "with torch.no_grad(): pass": lambda: torch.no_grad().__enter__(),
        "param.grad": lambda: params[0].grad,
        "param.dtype": lambda: params[0].dtype,
    }
    out = []
    for name, fn in cases.items():
        times = []
        for _ in range(rounds):
            dst.copy_(src)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out.append((name, statistics.median(times) * 1e6))
    return out


class _Marks:
    """Timestamps at function boundaries, installed by wrapping attributes."""

    def __init__(self):
        self.marks = []
        self._undo = []

    def mark(self, label: str) -> None:
        self.marks.append((label, time.perf_counter()))

    def wrap(self, owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        own = attr in getattr(owner, "__dict__", {})   # else a bound method: delete on restore

        def timed(*args, **kwargs):
            self.mark(label + " start")
            try:
                return original(*args, **kwargs)
            finally:
                self.mark(label + " end")

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original, own))

    def restore(self) -> None:
        for owner, attr, original, own in reversed(self._undo):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)


def step_segments(n: int, steps: int = 25):
    """[(segment, median us)] of one KalmanNGD.step in loss mode, by phase."""
    case = LossPublicCase(n, single_pass=False)     # both kernels inside the step
    marks = _Marks()
    kernels = resolve(case.backend, torch.device("cpu"))
    marks.wrap(kernels, "loss_quad_form", "kernel loss_quad_form")
    marks.wrap(kernels, "loss_step_", "kernel loss_step_")
    marks.wrap(loss_update, "_loss_step_on_host", "host step")
    marks.wrap(case.opt._filter, "record", "bookkeeping")
    marks.wrap(case, "_closure", "closure")
    marks.wrap(case.opt, "_check_groups", "check groups")
    marks.wrap(case.opt._cov_checks, "record", "cov record")
    per_segment = {}
    try:
        for _ in range(steps):
            marks.marks.clear()
            marks.mark("step() called")
            case.step()
            marks.mark("step() returned")
            for (a, ta), (b, tb) in zip(marks.marks, marks.marks[1:]):
                per_segment.setdefault(f"{a} -> {b}", []).append((tb - ta) * 1e6)
    finally:
        marks.restore()
    return [(name, statistics.median(v)) for name, v in per_segment.items()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=10_000_000, help="parameters (4 tensors)")
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = tuple(round(x, 2) for x in os.getloadavg())
    print(f"# kalman_kernels {kk.__version__}, torch {torch.__version__}, "
          f"{args.threads} thread(s), load average {load}")
    print("\n| cold single operation (after a 128 MB copy) | median us |\n| --- | --- |")
    for name, us in cold_single_ops():
        print(f"| {name} | {us:.1f} |")
    print(f"\n| KalmanNGD.step, loss mode, n = {args.n:.0e} in 4 tensors: segment | median us |"
          "\n| --- | --- |")
    host = 0.0
    for name, us in step_segments(args.n, args.steps):
        print(f"| {name} | {us:.1f} |")
        start, end = name.split(" -> ")
        inside = start.endswith(" start") and end == start[:-len("start")] + "end" and \
            start.startswith(("kernel", "closure"))
        host += 0.0 if inside else us
    print(f"\nnon-kernel time of the step (all segments but the kernels' and the closure's): "
          f"{host:.0f} us")


if __name__ == "__main__":
    main()
