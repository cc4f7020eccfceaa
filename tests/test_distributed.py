"""DESIGN 2.5: ranks observe their own batches and apply one identical, all-reduced update."""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import kalman_kernels as kk
from conftest import rel_err

WORLD = 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batch(rank, seed):
    g = torch.Generator().manual_seed(seed + rank)
    return (torch.randn(5, 3, generator=g, dtype=torch.float64),
            torch.randn(5, 2, generator=g, dtype=torch.float64))


def _loss(model, x, t):
    return ((model(x) - t) ** 2).mean()


def _worker(rank, init_file, out_dir, seed, mode):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = _model()
        opt = kk.KalmanNGD(model.parameters(), lr=0.7, init_cov=0.05, obs_noise=0.2,
                           forgetting=0.99, process_group=dist.group.WORLD)
        opt.track(model)
        closure = (lambda: (model(x), t)) if mode == "batch" else (lambda: _loss(model, x, t))
        x, t = _batch(rank, seed)
        opt.step(closure)
        if rank == 1:
            # A NaN on one rank: every rank must skip, or the replicas would drift apart.
            x = torch.full_like(x, float("nan"))
        opt.step(closure)
        torch.save({"params": [p.detach() for p in model.parameters()],
                    "covs": [opt.covariance(p) for p in model.parameters()],
                    "skipped": opt.skipped_steps},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Both ranks are past their last collective. Leave without interpreter teardown: gloo's
    # background threads, destroyed at exit, abort a process now and then (SIGABRT,
    # "terminate called without an active exception") after all the work is done.
    os._exit(0)


def _expected(seed, mode):
    model = _model()
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    mu = np.concatenate([p.detach().reshape(-1).numpy() for p in params])
    p_pred = np.full(mu.size, 0.05) / 0.99
    u = np.zeros(mu.size)
    d = np.zeros(mu.size)
    for rank in range(WORLD):
        x, t = _batch(rank, seed)
        if mode == "loss":
            loss = _loss(model, x, t)
            g = np.concatenate([v.reshape(-1).numpy() for v in torch.autograd.grad(loss, params)])
            s_val = g @ (p_pred * g) + 0.2
            u += g * (-float(loss.detach())) / s_val
            d += g * g / s_val
            continue
        jac = torch.func.jacrev(lambda *ps: torch.func.functional_call(
            model, dict(zip(names, ps)), (x,)).reshape(-1), argnums=tuple(range(len(params))))(*params)
        h = np.concatenate([j.detach().reshape(10, -1).numpy() for j in jac], 1)
        e = (t - model(x)).detach().reshape(-1).numpy()
        s_inv = np.linalg.inv(h @ np.diag(p_pred) @ h.T + 0.2 * np.eye(10))
        u += h.T @ s_inv @ e
        d += np.einsum("ji,jk,ki->i", h, s_inv, h)
    return mu + 0.7 * p_pred * u, np.clip(p_pred - p_pred ** 2 * d, 1e-12, None)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("mode", ["batch", "loss"])
def test_two_ranks_apply_the_all_reduced_update(rng, mode):
    seed = int(rng.integers(1 << 20))
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, seed, mode), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    mu_exp, p_exp = _expected(seed, mode)
    for res in results:
        mu = np.concatenate([p.reshape(-1).numpy() for p in res["params"]])
        cov = np.concatenate([c.reshape(-1).numpy() for c in res["covs"]])
        assert rel_err(mu, mu_exp) <= 1e-10
        assert rel_err(cov, p_exp) <= 1e-10
        assert res["skipped"] == 1
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)
