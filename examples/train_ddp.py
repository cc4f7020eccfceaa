"""Multi-process training with KalmanNGD, launched by torchrun.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --mode batch
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --mode loss

A small classifier (a hidden layer and a linear head over K classes) on synthetic data; every
rank reads its own shard of each global batch. The model is wrapped in
DistributedDataParallel (DDP broadcasts rank 0's initial parameters), and the two modes use
different all-reduces (docs/robustness.md, "Scale-out"):

* ``--mode batch`` (batch-observation mode, the class scores as observations): each rank's
  batch is its own observation block, and ``KalmanNGD(process_group=...)`` all-reduces the
  two per-parameter terms u = sum_r H_r^T S_r^-1 e_r and d = sum_r diag(H_r^T S_r^-1 H_r)
  (docs/design.md, 2.5). DDP's gradient all-reduce never runs: the Jacobian is taken with
  torch.autograd.grad, which does not trigger DDP's gradient hooks. The covariance rule is
  ``"information"``, which cannot be pushed below zero by the summed terms, and the step
  scale is 1/W, since the ranks' steps add up.
* ``--mode loss`` (loss-observation mode): the closure's ``loss.backward()`` goes through
  DDP, whose gradient all-reduce averages g over the ranks; the closure also averages the
  loss (one scalar all-reduce), so every rank sees the same observation (the mean loss of
  the global batch and its gradient) and applies the same update, with
  ``process_group=None``. This equals the single-process loss step on the global batch.

``--out DIR`` writes each rank's final parameters and ``opt.diagnostics()`` to
``DIR/rank<r>.pt`` (the test checks that the ranks agree). The process group is destroyed
at the end, as torch documents. With torch 2.14 a gloo process can still abort (SIGABRT,
"terminate called without an active exception") at interpreter teardown, after all its work
is done: gloo's worker threads release collective tensors while the interpreter shuts down
(a torch race, see tests/test_distributed.py for the backtrace and links; about 3 % of runs
here). ``--hard-exit`` leaves with ``os._exit(0)`` after the process group is destroyed,
skipping that teardown; the test uses it so that torchrun sees clean exits.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import kalman_kernels as kk


def make_data(n: int, d: int, k: int, seed: int):
    """A fixed synthetic K-class problem (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(k, d, generator=g)
    labels = torch.randint(k, (n,), generator=g)
    x = centres[labels] + torch.randn(n, d, generator=g)
    return x, labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("batch", "loss"), default="batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="per-rank batch size")
    parser.add_argument("--out", default=None, help="folder for each rank's results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hard-exit", action="store_true",
                        help="leave with os._exit(0) after destroying the process group "
                             "(skips interpreter teardown, where gloo can abort)")
    args = parser.parse_args(argv)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                              if backend == "nccl" else "cpu")
        torch.manual_seed(args.seed + 1)
        d, hidden, k = 8, 16, 4
        model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k)).to(device)
        ddp = DDP(model)
        x_all, y_all = make_data(args.batch * world * args.steps, d, k, args.seed)
        x_all, y_all = x_all.to(device), y_all.to(device)

        if args.mode == "batch":
            # information rule and lr = 1/W: the ranks' steps add up (docs/robustness.md)
            opt = kk.KalmanNGD(ddp.parameters(), lr=1.0 / world, init_cov=0.05, obs_noise=0.1,
                               forgetting=0.999, cov_update="information",
                               process_group=dist.group.WORLD)
            opt.track(ddp.module)
        else:
            opt = kk.KalmanNGD(ddp.parameters(), init_cov=0.05, obs_noise=0.1,
                               forgetting=0.999)

        first = last = None
        for step in range(args.steps):
            lo = (step * world + rank) * args.batch            # this rank's shard
            x, y = x_all[lo:lo + args.batch], y_all[lo:lo + args.batch]
            if args.mode == "batch":
                target = nn.functional.one_hot(y, k).to(x.dtype)
                loss = opt.step(lambda: (ddp(x).softmax(-1), target))
            else:
                def closure():
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(ddp(x), y)
                    loss.backward()                       # DDP averages the gradients
                    mean = loss.detach().clone()
                    dist.all_reduce(mean)                 # ... and we average the loss
                    return mean / world
                loss = opt.step(closure)
            value = float(loss)
            first = value if first is None else first
            last = value
        diag = opt.diagnostics()
        if rank == 0:
            print(f"{args.mode} mode, {world} ranks, {args.steps} steps: loss {first:.4f} -> "
                  f"{last:.4f}; skipped {diag['skipped_steps']}, P in "
                  f"[{diag['groups'][0]['cov_min']:.3g}, {diag['groups'][0]['cov_max']:.3g}]")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            torch.save({"params": [p.detach().cpu() for p in model.parameters()],
                        "covs": [opt.covariance(p).cpu() for p in model.parameters()],
                        "first": first, "last": last, "diagnostics": diag, "world": world},
                       os.path.join(args.out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if args.hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
