"""KalmanNGD over FSDP2 (``fully_shard``), with distributed checkpoints, launched by torchrun.

    torchrun --standalone --nproc_per_node=2 examples/train_fsdp.py --mode batch
    torchrun --standalone --nproc_per_node=2 examples/train_fsdp.py --mode loss
    torchrun --standalone --nproc_per_node=2 examples/train_fsdp.py --checkpoint ckpt
    torchrun --standalone --nproc_per_node=3 examples/train_fsdp.py --checkpoint ckpt --resume

On CPUs the ranks talk over gloo; with CUDA GPUs (one per rank) over NCCL, unchanged. A small
classifier (a hidden layer and a linear head over K classes) on synthetic data; each rank
reads its own part of every global batch. Every ``nn.Linear`` and the root are sharded with
``fully_shard``: each rank holds a dim-0 shard of every parameter and of its covariance
(docs/fsdp.md). The optimizer needs nothing else: it finds the device mesh from the
parameters and reduces over it.

* ``--mode batch``: the class probabilities are the observations and the observation is the
  global batch (every rank's rows); the linear layers are tracked as Kronecker blocks. One
  step makes three collectives of its own: the batch sizes, one all-to-all of each shard's
  columns of the observation, one all-reduce of the m x m partial S.
* ``--mode loss``: the closure's ``loss.backward()`` goes through FSDP, whose reduce-scatter
  leaves each rank the shard of the averaged gradient; the observation is the ranks' mean
  loss, and the step adds one all-reduce of a few scalars.

Both equal the single-process step on the global batch (tests/test_fsdp.py).
``--checkpoint DIR`` saves the model, the optimizer and the scheduler with
``torch.distributed.checkpoint`` at the end; ``--resume`` first loads them (on any number of
ranks: the covariances are resharded like the parameters). ``--out DIR`` writes each rank's
gathered parameters, covariances and ``opt.diagnostics()`` to ``DIR/rank<r>.pt``.
``--hard-exit`` leaves with ``os._exit(0)`` after destroying the process group (torch 2.14's
gloo threads can abort interpreter teardown; see examples/train_ddp.py).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import kalman_kernels as kk


def global_batch(step: int, n: int, d: int, k: int, seed: int):
    """The n samples of step ``step`` of a fixed synthetic K-class problem: the same on every
    rank and for any number of ranks (a resumed run draws the batches it would have seen)."""
    centres = 2.0 * torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 100_003 + step + 1)
    labels = torch.randint(k, (n,), generator=g)
    return centres[labels] + torch.randn(n, d, generator=g), labels


def states(model, opt, sched) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
            "sched": sched.state_dict()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("batch", "loss"), default="batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="global batch = batch x 2")
    parser.add_argument("--checkpoint", default=None, help="DCP folder to save (and resume)")
    parser.add_argument("--resume", action="store_true", help="load --checkpoint first")
    parser.add_argument("--out", default=None, help="folder for each rank's results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hard-exit", action="store_true",
                        help="leave with os._exit(0) after destroying the process group")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        mesh = init_device_mesh(device.type, (world,))
        torch.manual_seed(args.seed + 1)
        d, hidden, k = 8, 16, 4
        model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k)).to(device)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

        opt = kk.KalmanNGD(model.parameters(), init_cov=0.05, obs_noise=0.1, forgetting=0.999)
        if args.mode == "batch":
            opt.track(model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.01 * s))
        start = 0
        if args.resume:
            loaded = states(model, opt, sched)
            dcp.load(loaded, checkpoint_id=args.checkpoint)
            set_model_state_dict(model, loaded["model"])
            set_optimizer_state_dict(model, opt, loaded["optim"])
            sched.load_state_dict(loaded["sched"])
            start = opt.steps_taken + opt.skipped_steps

        # each rank observes its part of the global batch (uneven parts are fine)
        n = 2 * args.batch
        share = [n // world + (r < n % world) for r in range(world)]
        lo = sum(share[:rank])
        first = last = None
        for step in range(start, start + args.steps):
            x, y = global_batch(step, n, d, k, args.seed)
            x, y = x[lo:lo + share[rank]].to(device), y[lo:lo + share[rank]].to(device)
            if args.mode == "batch":
                target = nn.functional.one_hot(y, k).to(x.dtype)
                value = float(opt.step(lambda: (model(x).softmax(-1), target)))
            else:
                def closure():
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()               # FSDP reduce-scatters the averaged gradient
                    return loss
                value = float(opt.step(closure))
            sched.step()
            first = value if first is None else first
            last = value
        diag = opt.diagnostics()
        if rank == 0:
            print(f"{args.mode} mode, {world} ranks, steps {start}..{start + args.steps}: "
                  f"{'mean squared residual' if args.mode == 'batch' else 'rank-0 loss'} "
                  f"{first:.4f} -> {last:.4f}; skipped {diag['skipped_steps']}, P in "
                  f"[{diag['groups'][0]['cov_min']:.3g}, {diag['groups'][0]['cov_max']:.3g}]")
        if args.checkpoint:
            dcp.save(states(model, opt, sched), checkpoint_id=args.checkpoint)
        gathered = {"params": [p.full_tensor().cpu() for p in model.parameters()],
                    "covs": [opt.covariance(p).full_tensor().cpu() for p in model.parameters()],
                    "first": first, "last": last, "diagnostics": diag, "world": world}
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            torch.save(gathered, os.path.join(args.out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if args.hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
