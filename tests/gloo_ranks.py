"""Run a function on several gloo ranks, each a spawned process on this machine, and collect
what each returns: the scale-out tests (test_distributed.py, test_fsdp.py,
test_categorical_likelihood.py) share this one harness.

Teardown: a rank leaves with ``os._exit(0)`` once it has written its result and passed the
last barrier, after ``destroy_process_group()``. With torch 2.14.1 a gloo worker thread can
abort the process at interpreter teardown even after all its work is done (measured here:
4 aborts in about 120 two-rank runs, with or without ``destroy_process_group()``);
tests/test_distributed.py's docstring has the backtrace and the upstream threads. Nothing
in a test can close that race between torch's threads and the interpreter's finalisation,
so the ranks skip the finalisation instead.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, world, init_file, out_dir, timeout_s, work, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = work(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_gloo_ranks(work, world: int, *args, timeout_s: float = 90.0) -> list:
    """``[work(rank, world, *args) for rank in range(world)]``, each call on its own spawned
    process in one gloo process group (``work`` and ``args`` must pickle: a module-level
    function). A rank that raises makes this raise (torch.multiprocessing's
    ProcessRaisedException, with the rank's traceback)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world, os.path.join(tmp, "init"), tmp, timeout_s, work,
                                   args), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]
