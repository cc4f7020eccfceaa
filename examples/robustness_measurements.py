"""Measurements behind docs/robustness.md ("Scale-out" and "Memory guard and sub-batches").

    python examples/robustness_measurements.py clamps       # the covariance rule under scale-out
    python examples/robustness_measurements.py sub-batches  # sequential sub-batches vs one batch
    python examples/robustness_measurements.py memory       # a 20,000-observation batch, split

``clamps``: the all-reduced update of docs/design.md, 2.5, emulated in one process for W ranks
(every rank factors its own S_r with the same P-, the terms u and d are summed, then applied) on a
realistic problem: scikit-learn's 8x8 digits (1,797 images, 64 features), an MLP
64-32-10 (tanh) whose 10 softmax outputs per image are the observations (batch mode, both
layers as sample-grouped Kronecker blocks), 16 images per rank per step, one epoch. For
each prior P0 and world size W it counts the covariance elements whose Kalman-rule update
P- - P-^2 d went below zero (clamped to the floor, i.e. frozen) and compares the two rules'
held-out accuracy.

``sub-batches``: the relative difference between one batch update and the same batch in
sequential sub-batches (``max_obs_per_update``) with the diagonal covariance, on linear
regression and on the digits head.

``memory``: the estimate of the memory guard for m = 20,000 (200 images x 100 classes of a
tracked nn.Linear(8, 100)) and the peak memory and wall time of the same step with
``max_obs_per_update`` = 500 and 2000 (reference backend).
"""
from __future__ import annotations

import argparse
import math
import resource
import time

import numpy as np
import torch
from torch import nn

import kalman_kernels as kk
from kalman_kernels import ops
from kalman_kernels.backends import resolve
from kalman_kernels.observations import LinearCapture, batch_observation
from kalman_kernels.ops import DenseBlock, StepHyper
from kalman_kernels.ops._common import reference_kron_bytes, workspace_bytes
from kalman_kernels.ops._terms import factor_terms


def digits():
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float64)
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()


def emulate_ranks(world: int, init_cov: float, rule: str, r: float = 0.05, batch: int = 16,
                  floor: float = 1e-12, lr: float = 1.0):
    """One epoch of the all-reduced update (docs/design.md, 2.5) with ``world`` emulated
    ranks; returns (clamped element-steps fraction, elements at the floor at the end
    fraction, held-out accuracy, steps, the largest P- d summed over the ranks)."""
    xtr, ytr, xte, yte = digits()
    model = _mlp()
    params = list(model.parameters())
    covs = {id(p): torch.full_like(p, init_cov) for p in params}
    hp = StepHyper(1.0, 1.0, 0.0, floor, math.inf, rule == "information")
    kernels = resolve("reference", torch.device("cpu"))
    captures = {layer: LinearCapture(layer, "never") for layer in model
                if isinstance(layer, nn.Linear)}
    n_total = sum(p.numel() for p in params)
    clamped = 0
    largest = 0.0
    steps = len(ytr) // (batch * world)
    for step in range(steps):
        u = {id(p): torch.zeros(p.numel(), dtype=torch.float64) for p in params}
        d = {id(p): torch.zeros(p.numel(), dtype=torch.float64) for p in params}
        for rank in range(world):
            lo = (step * world + rank) * batch
            x, y = xtr[lo:lo + batch], ytr[lo:lo + batch]
            for c in captures.values():
                c.calls.clear()
                c.armed = True
            pred = model(x).softmax(-1)
            for c in captures.values():
                c.armed = False
            target = nn.functional.one_hot(y, 10).double()
            obs = batch_observation(pred, target, [(p, {}) for p in params], captures,
                                    lambda p, g: covs[id(p)], lambda g: hp, lambda *a: None)
            t = factor_terms(kernels, obs.blocks, obs.hypers, obs.residual,
                             torch.tensor(r, dtype=torch.float64), None, 0.0)
            whitening = t.whiten_info if hp.information else t.whiten_kalman
            for b in obs.blocks:
                if isinstance(b, DenseBlock):
                    du, dd = kernels.step_terms_dense(b.jac_2d(), lr * t.solved, whitening)
                else:
                    du, dd = kernels.step_terms_kron(b.inputs, b.grouped_grad_outputs,
                                                     lr * t.solved, whitening)
                u[id(b.param)] += du.reshape(-1)
                d[id(b.param)] += dd.reshape(-1)
        ok = torch.ones((), dtype=torch.bool)
        for p in params:
            cov = covs[id(p)]
            if rule == "kalman":
                clamped += int((cov.reshape(-1) * d[id(p)] > 1).sum())
                largest = max(largest, float((cov.reshape(-1) * d[id(p)]).max()))
            with torch.no_grad():
                kernels.apply_terms_(p, cov, u[id(p)], d[id(p)], ok, 1.0, 0.0, floor, math.inf,
                                     hp.information)
    at_floor = sum(int((covs[id(p)] <= floor).sum()) for p in params)
    with torch.no_grad():
        acc = float((model(xte).argmax(-1) == yte).double().mean())
    return clamped / (n_total * steps), at_floor / n_total, acc, steps, largest


def cmd_clamps():
    print("| P0 | r | W | steps | max sum_r P- d_r | Kalman rule: element-steps clamped | "
          "frozen at the end | accuracy: Kalman | information | information, lr = 1/W | "
          "one process, batch 16 W |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for init_cov, r in ((1e-2, 0.05), (1e-1, 0.05), (1.0, 0.05), (1.0, 0.01)):
        for world in (1, 2, 4, 8):
            start = time.perf_counter()
            frac, frozen, acc_k, steps, largest = emulate_ranks(world, init_cov, "kalman", r=r)
            _, frozen_i, acc_i, _, _ = emulate_ranks(world, init_cov, "information", r=r)
            _, _, acc_lr, _, _ = emulate_ranks(world, init_cov, "information", r=r, lr=1 / world)
            _, _, acc_one, _, _ = emulate_ranks(1, init_cov, "kalman", r=r, batch=16 * world)
            assert frozen_i == 0.0
            print(f"| {init_cov:g} | {r:g} | {world} | {steps} | {largest:.2f} | {100 * frac:.2f}% "
                  f"| {100 * frozen:.1f}% | {acc_k:.3f} | {acc_i:.3f} | {acc_lr:.3f} "
                  f"| {acc_one:.3f} "
                  f"|  ({time.perf_counter() - start:.0f} s)", flush=True)


def cmd_sub_batches():
    rng = np.random.default_rng(0)
    print("| problem | m | sub-batch | rel. diff of the mean step | rel. diff of P |")
    print("| --- | --- | --- | --- | --- |")
    for chunk in (256, 64, 16):
        diffs = []
        for _rep in range(5):
            n, m = 20, 512
            x = torch.tensor(rng.standard_normal((m, n)))
            w = torch.tensor(rng.standard_normal(n))
            y = x @ w + 0.1 * torch.tensor(rng.standard_normal(m))
            mu_a, p_a = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
            mu_b, p_b = mu_a.clone(), p_a.clone()
            ops.kalman_update_([DenseBlock(mu_a, p_a, x)], y, 0.01)
            ops.kalman_update_([DenseBlock(mu_b, p_b, x)], y, 0.01, max_obs_per_update=chunk)
            diffs.append((float((mu_b - mu_a).norm() / mu_a.norm()),
                          float(((p_b - p_a).abs() / p_a).max())))
        dm, dp = np.median(diffs, axis=0)
        print(f"| linear regression n = 20 (median of 5) | 512 | {chunk} | {dm:.3g} | {dp:.3g} |")
    xtr, ytr, _, _ = digits()
    from kalman_kernels.reference import full_cov_update
    torch.manual_seed(0)
    head = nn.Linear(64, 10).double()
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    x, y = xtr[:32], ytr[:32]
    e = (nn.functional.one_hot(y, 10).double() - (x @ w0.T + b0)).reshape(-1)
    dgrad = torch.eye(10, dtype=torch.float64).expand(32, 10, 10).contiguous()
    # the exact (full-covariance) posterior mean step of this linear-Gaussian observation
    jac = torch.cat([torch.einsum("jko,ji->jkoi", dgrad, x).reshape(320, -1),
                     dgrad.reshape(320, 10)], 1)
    mu_full, _ = full_cov_update(torch.zeros(650, dtype=torch.float64),
                                 1e-2 * torch.eye(650, dtype=torch.float64), jac, e,
                                 torch.tensor(0.05, dtype=torch.float64))
    exact = mu_full[:640].reshape(10, 64)

    def run(max_obs):
        w, b = w0.clone(), b0.clone()
        wc, bc = torch.full_like(w, 1e-2), torch.full_like(b, 1e-2)
        ops.kalman_update_([ops.KronBlock(w, wc, x, dgrad),
                            DenseBlock(b, bc, dgrad.reshape(320, 10))],
                           e, 0.05, max_obs_per_update=max_obs)
        return w - w0, wc

    dw_a, wc_a = run(None)
    print(f"| digits linear head 64x10 + bias, class-logit observations: one batch vs the exact "
          f"full-covariance step | 320 | - "
          f"| {float((dw_a - exact).norm() / exact.norm()):.3g} | - |")
    for chunk in (160, 40, 10):
        dw_b, wc_b = run(chunk)
        print(f"| digits head, sub-batches vs one batch (vs the exact step) | 320 | {chunk} | "
              f"{float((dw_b - dw_a).norm() / dw_a.norm()):.3g} "
              f"({float((dw_b - exact).norm() / exact.norm()):.3g}) | "
              f"{float(((wc_b - wc_a).abs() / wc_a).max()):.3g} |")


def cmd_memory():
    m_batch, k = 200, 100
    m = m_batch * k
    print(f"m = {m}: one m x m float64 matrix {8 * m * m / 2 ** 30:.2f} GiB; the guard's estimate "
          f"{workspace_bytes(m) / 2 ** 30:.1f} GiB for the m x m work (CPU), plus "
          f"{reference_kron_bytes(m_batch, k, k) / 2 ** 30:.0f} GiB of the reference backend's "
          f"Kronecker temporaries: MemoryError")
    torch.manual_seed(0)
    model = nn.Linear(8, k)
    x = torch.randn(m_batch, 8)
    for chunk in (500, 2000):                  # the smaller first: peak RSS only grows
        est = workspace_bytes(chunk) + reference_kron_bytes(chunk // k, k, k)
        opt = kk.KalmanNGD(model.parameters(), max_obs_per_update=chunk).track(model)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        opt.step(lambda: (model(x).softmax(-1), torch.zeros(m_batch, k)))
        wall = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"max_obs_per_update={chunk}: guard's estimate {est / 2 ** 30:.2f} GiB; "
              f"{opt.last_info.extras['sub_batches']} sub-batches, "
              f"{wall:.1f} s, peak RSS {rss / 2 ** 20:.2f} GiB "
              f"(grew {(rss - rss0) / 2 ** 20:.2f}), "
              f"skipped {opt.last_info.skipped}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("clamps", "sub-batches", "memory"))
    args = parser.parse_args()
    {"clamps": cmd_clamps, "sub-batches": cmd_sub_batches, "memory": cmd_memory}[args.what]()


if __name__ == "__main__":
    main()
