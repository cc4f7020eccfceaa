"""The class-structured head step (``kalman_kernels.ops.class_head``, docs/design.md, 2.6).

    python -m benchmarks.class_head                 # the 1,000-class table, one thread
    python -m benchmarks.class_head --threads 1,2 --json out.json
    python -m benchmarks.class_head --blocks 10,100,1000 # + block vs diagonal at these K

Target: a 1,000-class head on 512-d features at batch 32 (float32, one thread) takes
<= 100 ms per step and <= 50 MB of extra memory. ``class_head_rows()`` returns one dict per
measured variant (for ``benchmarks.report``):

* ``class_head_update_`` plain and cosine (row-normalised) scores, with a bias, gate on;
* ``categorical_head_update_`` (``kalman_kernels.ops.categorical_head``): the same head as a
  softmax under the categorical likelihood (integer labels, bias, gate on, logit scale 30 as
  for CLIP-style normalised features), measured in the same round-robin as the rows above;
  target <= 150 ms per step (its extra memory is reported, without a target);
* the route the application had before: the head as a ``KronBlock`` through
  ``ops.kalman_update_`` (one (m K) x (m K) S), at the batch the old cap allowed
  (m K <= 2048: 2 images per step at K = 1000), so the comparison is per image; it takes
  tens of seconds per call there, so it is timed once and its memory is not probed;
* ``--blocks``: ``categorical_head_update_`` with one full d x d covariance per class
  (``weight_cov`` (K, d, d), no bias), at the given K (d = 512, B = 32); the blocks are
  not reset between calls (copying K d^2 floats would dominate), which does not change the
  work of a step;
* the dense path at the target size is not run: its memory is computed (S alone is
  (32 * 1000)^2 float64 = 8.2 GB).

Extra memory is the peak resident set of a fresh process above its level just before the
step (``/proc/self/status`` VmHWM after a reset through ``/proc/self/clear_refs``), with
glibc's mmap threshold pinned low so freed buffers go back to the system; Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from . import common as C

K, B, D = 1000, 32, 512
TARGET_MS = 100.0
TARGET_MB = 50.0
CATEGORICAL_TARGET_MS = 150.0


def _case(k: int, b: int, d: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1).to(dtype)
    a = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(dtype)
    y = torch.nn.functional.one_hot(torch.randint(0, k, (b,), generator=g), k).to(dtype)
    return {"w": w, "pw": torch.full((k, d), 1e-3, dtype=torch.float32),
            "b": torch.zeros(k, dtype=dtype), "pb": torch.full((k,), 1e-3, dtype=torch.float32),
            "a": a, "e": y - a @ w.T}


def class_head_step(k: int = K, b: int = B, d: int = D, normalize_rows: bool = False,
                    gate: Optional[float] = 0.999):
    """A callable doing one step on fresh state copies each call (the copies are cheap
    next to the step, and every call sees the same inputs)."""
    from kalman_kernels.ops.class_head import class_head_update_
    c = _case(k, b, d)
    state = [c["w"].clone(), c["pw"].clone(), c["b"].clone(), c["pb"].clone()]

    def run():
        state[0].copy_(c["w"])
        state[1].copy_(c["pw"])
        state[2].copy_(c["b"])
        state[3].copy_(c["pb"])
        class_head_update_(state[0], state[1], state[2], state[3], c["a"], c["e"], 1e-2,
                           gate=gate, normalize_rows=normalize_rows)
    return run


def categorical_head_step(k: int = K, b: int = B, d: int = D, gate: Optional[float] = 0.999,
                          logit_scale: float = 30.0):
    """A callable doing one categorical-head step on fresh state copies each call."""
    from kalman_kernels.ops.categorical_head import categorical_head_update_
    c = _case(k, b, d)
    labels = torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(1))
    state = [c["w"].clone(), c["pw"].clone(), c["b"].clone(), c["pb"].clone()]

    def run():
        state[0].copy_(c["w"])
        state[1].copy_(c["pw"])
        state[2].copy_(c["b"])
        state[3].copy_(c["pb"])
        categorical_head_update_(state[0], state[1], state[2], state[3], c["a"], labels,
                                 gate=gate, logit_scale=logit_scale)
    return run


def categorical_block_step(k: int, b: int = B, d: int = D, gate: Optional[float] = 0.999,
                           logit_scale: float = 30.0):
    """A callable doing one full-block categorical step (weight_cov (K, d, d)) in place on
    the same state every call (the blocks stay positive definite; the work is the same)."""
    from kalman_kernels.ops.categorical_head import categorical_head_update_
    c = _case(k, b, d)
    labels = torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(1))
    w = c["w"].clone()
    sigma = torch.eye(d, dtype=torch.float32).mul_(1e-3).expand(k, d, d).clone()

    def run():
        categorical_head_update_(w, sigma, None, None, c["a"], labels, gate=gate,
                                 logit_scale=logit_scale)
    return run


def kron_route_step(k: int = K, b: int = 2, d: int = D):
    """The route before the class-structured step: the head's weight as a KronBlock over
    m = b K observations (rows a_j repeated K times, one-hot output gradients) through
    ops.kalman_update_."""
    import kalman_kernels as kk
    c = _case(k, b, d)
    inputs = c["a"].repeat_interleave(k, 0)                       # (b K, d)
    grad_out = torch.eye(k, dtype=torch.float32).repeat(b, 1)    # (b K, K)
    w, pw = c["w"].clone(), c["pw"].clone()

    def run():
        w.copy_(c["w"])
        pw.copy_(c["pw"])
        kk.ops.kalman_update_([kk.ops.KronBlock(w, pw, inputs, grad_out)], c["e"].reshape(-1),
                              1e-2, gate=0.999)
    return run


def dense_memory_bytes(k: int = K, b: int = B, d: int = D) -> Dict[str, int]:
    """What the dense path would hold at this size: S (float64) and the Jacobian H (float32)."""
    m = b * k
    return {"S_float64": m * m * 8, "H_float32": m * (k * d + k) * 4}


_MEMORY_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from benchmarks.class_head import (categorical_block_step, categorical_head_step,
                                   class_head_step, kron_route_step)
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
variant, k, b, d = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
make = {"plain": lambda: class_head_step(k, b, d, False),
        "cosine": lambda: class_head_step(k, b, d, True),
        "kron": lambda: kron_route_step(k, b, d),
        "categorical": lambda: categorical_head_step(k, b, d),
        "categorical_block": lambda: categorical_block_step(k, b, d)}[variant]
small = {"plain": lambda: class_head_step(3, 2, 4, False),
         "cosine": lambda: class_head_step(3, 2, 4, True),
         "kron": lambda: kron_route_step(3, 2, 4),
         "categorical": lambda: categorical_head_step(3, 2, 4),
         "categorical_block": lambda: categorical_block_step(3, 2, 4)}[variant]
small()()                      # libraries initialised, lazy imports done
fn = make()
base = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')     # reset the peak (VmHWM) to the current RSS
fn()
print(json.dumps({"extra_bytes": status('VmHWM') - base}))
"""


def peak_extra_memory(variant: str, k: int = K, b: int = B, d: int = D, threads: int = 1
                      ) -> Optional[int]:
    """Peak memory above the inputs of one step, measured in a fresh process (bytes), or
    None where /proc is not available."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               OMP_NUM_THREADS=str(threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(threads), variant, str(k),
                          str(b), str(d)], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"])


def class_head_rows(threads: int = 1, rounds: int = 15, k: int = K, b: int = B, d: int = D,
                    with_memory: bool = True, with_kron: bool = True) -> List[Dict]:
    """One dict per variant: median / IQR ms per step, ms per image, extra memory, target."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fns = {"class_head plain": class_head_step(k, b, d, False),
               "class_head cosine": class_head_step(k, b, d, True),
               "categorical_head labels": categorical_head_step(k, b, d)}
        kron_b = max(1, 2048 // k)
        timings = C.measure_group(fns, rounds=rounds, warmup=1, budget_s=120)
        if with_kron:
            # tens of seconds per call at K = 1000 (the general Kronecker formulas do not see
            # that the output gradients are one-hot): one timed call, memory not probed
            timings[f"kron route (old cap, batch {kron_b})"] = C.measure_group(
                {"kron": kron_route_step(k, kron_b, d)}, rounds=1, warmup=0)["kron"]
    finally:
        torch.set_num_threads(before)
    dense = dense_memory_bytes(k, b, d)
    rows = []
    for name, t in timings.items():
        batch = kron_b if name.startswith("kron") else b
        variant = ("kron" if name.startswith("kron") else
                   "categorical" if name.startswith("categorical") else name.split()[-1])
        lo, hi = t.iqr
        mem = (peak_extra_memory(variant, k, batch, d, threads)
               if with_memory and variant != "kron" else None)
        op = {"kron": "kalman_update_", "categorical": "categorical_head_update_"}.get(
            variant, "class_head_update_")
        row = {"op": op,
               "variant": name, "K": k, "B": batch, "d": d, "threads": threads,
               "median_ms": t.median * 1e3, "iqr_ms": (lo * 1e3, hi * 1e3),
               "ms_per_image": t.median * 1e3 / batch, "rounds": len(t.times),
               "extra_mb": None if mem is None else mem / 1e6}
        if variant == "categorical":
            row["target_ms"] = CATEGORICAL_TARGET_MS
            row["meets_target"] = t.median * 1e3 <= CATEGORICAL_TARGET_MS
        elif not name.startswith("kron"):
            row["target_ms"] = TARGET_MS
            row["target_mb"] = TARGET_MB
            row["meets_target"] = (t.median * 1e3 <= TARGET_MS
                                   and (mem is None or mem / 1e6 <= TARGET_MB))
        rows.append(row)
    rows.append({"op": "dense kalman_update_", "variant": f"dense path at B = {b} (not run)",
                 "K": k, "B": b, "d": d, "threads": threads, "median_ms": None,
                 "extra_mb": (dense["S_float64"] + dense["H_float32"]) / 1e6,
                 "note": f"S {dense['S_float64'] / 1e9:.1f} GB float64 + H "
                         f"{dense['H_float32'] / 1e9:.1f} GB float32"})
    return rows


def categorical_block_rows(ks, threads: int = 1, rounds: int = 5, b: int = B, d: int = D,
                           with_memory: bool = True) -> List[Dict]:
    """The head covariance's cost model: at each K in ``ks``, the full-block form (one d x d
    covariance per class) and the diagonal form timed in the same round-robin: median ms per
    step, peak extra memory, and the state each keeps (K d^2 or K (d + 1) float32)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for k in ks:
            ts = C.measure_group({"blocks": categorical_block_step(k, b, d),
                                  "diagonal": categorical_head_step(k, b, d)},
                                 rounds=rounds, warmup=1, budget_s=120)
            for name, t in ts.items():
                block = name == "blocks"
                lo, hi = t.iqr
                mem = (peak_extra_memory("categorical_block" if block else "categorical", k, b,
                                         d, threads) if with_memory else None)
                rows.append({"op": "categorical_head_update_",
                             "variant": f"categorical_head {name}",
                             "K": k, "B": b, "d": d, "threads": threads,
                             "median_ms": t.median * 1e3, "iqr_ms": (lo * 1e3, hi * 1e3),
                             "ms_per_image": t.median * 1e3 / b, "rounds": len(t.times),
                             "extra_mb": None if mem is None else mem / 1e6,
                             "state_mb": (k * d * d if block else k * (d + 1)) * 4 / 1e6})
    finally:
        torch.set_num_threads(before)
    return rows


def markdown(rows: List[Dict]) -> str:
    head = "| variant | K | B | d | threads | median ms (IQR) | ms / image | extra MB | target |"
    out = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["median_ms"] is None:
            out.append(f"| {r['variant']} | {r['K']} | {r['B']} | {r['d']} | {r['threads']} | "
                       f"- | - | {r['extra_mb']:.0f} ({r['note']}) | - |")
            continue
        lo, hi = r["iqr_ms"]
        mem = "-" if r["extra_mb"] is None else f"{r['extra_mb']:.1f}"
        tgt = "-"
        if "meets_target" in r:
            limits = f"<= {r['target_ms']:.0f} ms" + (
                f", <= {r['target_mb']:.0f} MB" if r.get("target_mb") is not None else "")
            tgt = ("met" if r["meets_target"] else "**missed**") + f" ({limits})"
        out.append(f"| {r['variant']} | {r['K']} | {r['B']} | {r['d']} | {r['threads']} | "
                   f"{r['median_ms']:.1f} ({lo:.1f}-{hi:.1f}) | {r['ms_per_image']:.2f} | "
                   f"{mem} | {tgt} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--blocks", default="", help="comma-separated K for the head covariance's "
                   "cost model: categorical_head_update_ with full d x d blocks per class and "
                   "with the diagonal, side by side (d = 512, B = 32)")
    args = p.parse_args(argv)
    rows = []
    for t in [int(x) for x in args.threads.split(",") if x.strip()]:
        rows += class_head_rows(threads=t, rounds=args.rounds)
        if args.blocks:
            rows += categorical_block_rows([int(x) for x in args.blocks.split(",")], threads=t)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
