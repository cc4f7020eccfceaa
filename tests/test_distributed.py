"""Scale-out (docs/design.md, 2.5) on real processes: ranks observe their own batches and
apply one identical, all-reduced update.

One spawn per world size runs every scenario (starting a process costs seconds here):

* 2 and 3 gloo ranks, 50 steps in batch mode (a tracked Kronecker layer and dense blocks)
  and in loss mode, one step with a NaN on the last rank: parameters bit-for-bit identical
  across ranks and equal to a single-process NumPy emulation of the block-diagonal update
  (the NaN step skipped everywhere);
* DistributedDataParallel: in batch mode the only all-reduce is KalmanNGD's (DDP's
  gradient hooks never run: a DDP communication hook counts zero calls); in loss mode the
  only all-reduce of gradients is DDP's (the optimizer issues none), the closure averages
  the loss, and the result equals the single-process loss step on the global batch;
* ranks that disagree on hyper-parameters or shapes raise a clear error on every rank at
  the first step; a later divergence skips the step on every rank and raises;
* the Kalman rule's clamps below zero are counted (and warned about once); the
  information rule has none.
* torch.distributed.checkpoint with the replicated optimizer (2 ranks, batch and loss
  mode, adaptive noise): a fresh, perturbed model and optimizer resume from the
  checkpoint and take the next steps bit for bit as the uninterrupted run does.

Teardown (the SIGABRT that made the earlier version of this test leave with
``os._exit``): a gloo worker can abort at interpreter teardown after all its work is done.
Caught under gdb here (1 of 10 runs of a two-rank script): the thread "pt_gloo_runloop" of
``c10d::ProcessGroupGloo::runLoop`` releases the last completed work (``AsyncBarrierWork``,
which holds the previous ``AsyncAllreduceWork`` and its tensors); releasing a tensor that
has a Python object takes the GIL (``c10::TensorImpl::decref_pyobject`` ->
``ConcretePyInterpreterVTable::decref`` -> ``pybind11::gil_scoped_acquire`` -> ``take_gil``)
while the main thread is inside ``Py_FinalizeEx``; ``take_gil`` during finalisation calls
``pthread_exit``, whose forced unwind crosses a ``noexcept`` destructor ->
``std::terminate`` ("terminate called without an active exception") -> SIGABRT. The race is
torch's: https://github.com/pytorch/pytorch/pull/179291 describes exactly this ("When a
process exits without calling destroy_process_group(), Gloo's C++ worker threads may still
hold AsyncWork objects containing tensors with Python references. During interpreter
finalization, destroying these tensors triggers a GIL acquire that crashes with SIGABRT";
the fix was abandoned as "much more complicated than I anticipated") and
https://github.com/pytorch/pytorch/issues/190489 traces such crashes to the PyInterpreter
decref racing GIL teardown during finalisation. Calling ``dist.destroy_process_group()``
does not prevent it with torch 2.14.1: it calls the backend's ``shutdown()``, which does not
join gloo's worker threads, and the ProcessGroup object stays referenced afterwards (its
Python refcount was 10 after destroy + gc here), so the threads live into finalisation.
Measured on this machine: 4 aborts in 125 runs without ``destroy_process_group()``, 4 in
about 120 with it; keeping the collectives' tensors referenced from Python did not help
either (1 in 60: in torch 2.14 a C++ release of a tensor with a Python object always
decrefs it). Nothing in this package can close a race between torch's threads and the
interpreter's teardown, so the ranks (tests/gloo_ranks.py) call ``destroy_process_group()``
(the documented pattern) and then leave with ``os._exit(0)``, after every rank has written
its results and passed the last barrier; examples/train_ddp.py does the same when launched
with ``--hard-exit`` (the torchrun test does).
"""
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import kalman_kernels as kk
from conftest import fresh_seed, note_seed, rel_err
from gloo_ranks import run_on_gloo_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")

STEPS = 50
NAN_STEP = 10
HYPER = dict(lr=0.7, init_cov=0.05, obs_noise=0.2, forgetting=0.99, process_noise=1e-5,
             cov_floor=1e-9)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batch(seed, rank, step, n=5):
    g = torch.Generator().manual_seed(seed * 1000 + step * 10 + rank)
    return (torch.randn(n, 3, generator=g, dtype=torch.float64),
            torch.randn(n, 2, generator=g, dtype=torch.float64))


def _loss(model, x, t):
    return ((model(x) - t) ** 2).mean()


def _rule(world):
    return "kalman" if world == 2 else "information"


# ---------------------------------------------------------------------- the workers
class _Counters:
    """Counts dist.all_reduce calls issued from kalman_kernels (patched in the worker)."""

    def __init__(self):
        self.ours = 0
        self._orig = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("kalman_kernels"):
                self.ours += 1
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counted


def _train(rank, world, seed, mode, steps):
    model = _model()
    opt = kk.KalmanNGD(model.parameters(), cov_update=_rule(world),
                       process_group=dist.group.WORLD, **HYPER)
    opt.track(model)
    for step in range(steps):
        x, t = _batch(seed, rank, step)
        if step == NAN_STEP and rank == world - 1:
            x = torch.full_like(x, float("nan"))       # every rank must skip this step
        if mode == "batch":
            opt.step(lambda: (model(x), t))
        else:
            opt.step(lambda: _loss(model, x, t))
    return {"params": [p.detach().clone() for p in model.parameters()],
            "covs": [opt.covariance(p).clone() for p in model.parameters()],
            "skipped": opt.skipped_steps, "diag": opt.diagnostics()}


def _ddp(rank, world, seed, mode, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _model()
    ddp = DDP(model)
    hook_calls = [0]

    def hook(state, bucket):
        hook_calls[0] += 1
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / world)

    ddp.register_comm_hook(None, hook)
    counters = _Counters()
    if mode == "batch":
        opt = kk.KalmanNGD(ddp.parameters(), process_group=dist.group.WORLD, **HYPER)
        opt.track(ddp.module)
    else:
        opt = kk.KalmanNGD(ddp.parameters(), **HYPER)
    for step in range(steps):
        x, t = _batch(seed, rank, step)
        if mode == "batch":
            opt.step(lambda: (ddp(x), t))
        else:
            def closure():
                opt.zero_grad()
                loss = _loss(ddp, x, t)
                loss.backward()                          # DDP averages the gradients
                mean = loss.detach().clone()
                dist.all_reduce(mean)                    # the closure averages the loss
                return mean / world
            opt.step(closure)
    dist.all_reduce = counters._orig
    return {"params": [p.detach().clone() for p in model.parameters()],
            "covs": [opt.covariance(p).clone() for p in model.parameters()],
            "ddp_hook_calls": hook_calls[0], "our_all_reduces": counters.ours}


def _mismatch(rank, world, seed):
    out = {}
    x, t = _batch(seed, rank, 0)
    # (a) hyper-parameters differ at the first step
    model = _model()
    opt = kk.KalmanNGD(model.parameters(), process_group=dist.group.WORLD,
                       **dict(HYPER, lr=0.5 if rank == 0 else 0.6))
    try:
        opt.step(lambda: (model(x), t))
        out["first_lr"] = None
    except ValueError as exc:
        out["first_lr"] = str(exc)
    # (b) parameter shapes differ at the first step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4 + rank), nn.Tanh(), nn.Linear(4 + rank, 2)).double()
    opt = kk.KalmanNGD(model.parameters(), process_group=dist.group.WORLD, **HYPER)
    try:
        opt.step(lambda: _loss(model, x, t))
        out["first_shape"] = None
    except ValueError as exc:
        out["first_shape"] = str(exc)
    # (c) a later divergence: skipped on every rank, then raised
    model = _model()
    opt = kk.KalmanNGD(model.parameters(), process_group=dist.group.WORLD, **HYPER)
    opt.step(lambda: (model(x), t))
    before = [p.detach().clone() for p in model.parameters()]
    if rank == 1:
        opt.param_groups[0]["lr"] = 0.3
    try:
        opt.step(lambda: (model(x), t))
        out["later"] = None
    except ValueError as exc:
        out["later"] = str(exc)
    out["later_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    out["later_skipped"] = opt.skipped_steps
    return out


def _clamps(rank, world, seed):
    """A strongly informative batch per rank with a broad prior: each rank's
    P- diag(H^T S^-1 H) is close to 1, so the sum over ranks exceeds it."""
    out = {}
    for rule in ("kalman", "information"):
        torch.manual_seed(1)
        model = nn.Linear(4, 3).double()
        opt = kk.KalmanNGD(model.parameters(), init_cov=10.0, obs_noise=1e-3, cov_update=rule,
                           cov_floor=1e-9, process_group=dist.group.WORLD)
        opt.track(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shrink = []
            for step in range(3):
                x, t = _batch(seed, rank, step, n=8)
                x = x.repeat(1, 2)[:, :4]
                opt.step(lambda: (model(x), t[:, :1].repeat(1, 3)))
                shrink.append(opt.diagnostics()["max_shrink"])
        out[rule] = {"diag": opt.diagnostics(), "last": opt.last_info.cov_clamps, "shrink": shrink,
                     "warnings": [str(w.message) for w in caught if "below zero" in str(w.message)]}
    return out


def _checkpoint(rank, world, seed, ckpt):
    """A replicated optimizer (``process_group``) through torch.distributed.checkpoint, in
    batch and loss mode with adaptive noise: save after 3 steps and go on for 3; a fresh,
    perturbed model and optimizer load the checkpoint and take the same 3 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def build(init_cov, shift):
        model = _model()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(shift)
        opt = kk.KalmanNGD(model.parameters(), process_group=dist.group.WORLD,
                           adaptive_obs_noise=0.3, **dict(HYPER, init_cov=init_cov))
        opt.track(model)
        return model, opt

    def run(model, opt, mode, steps):
        for step in steps:
            x, t = _batch(seed, rank, step)
            opt.step((lambda: (model(x), t)) if mode == "batch" else
                     (lambda: _loss(model, x, t)))
        return ([p.detach().clone() for p in model.parameters()]
                + [opt.covariance(p).clone() for p in model.parameters()]
                + [torch.tensor(opt.steps_taken), opt.state["filter"]["obs_noise"].clone()])

    def states(model, opt):
        return {"model": get_model_state_dict(model),
                "optim": get_optimizer_state_dict(model, opt)}

    out = {}
    for mode in ("batch", "loss"):
        path = os.path.join(ckpt, mode)
        model, opt = build(HYPER["init_cov"], 0.0)
        run(model, opt, mode, range(3))
        dcp.save(states(model, opt), checkpoint_id=path)
        straight = run(model, opt, mode, range(3, 6))
        model, opt = build(0.9, 0.5)
        loaded = states(model, opt)
        dcp.load(loaded, checkpoint_id=path)
        set_model_state_dict(model, loaded["model"])
        set_optimizer_state_dict(model, opt, loaded["optim"])
        out[mode] = (straight, run(model, opt, mode, range(3, 6)))
    return out


def _worker(rank, world, seed, ckpt):
    results = {"batch": _train(rank, world, seed, "batch", STEPS),
               "loss": _train(rank, world, seed, "loss", STEPS)}
    if world == 2:
        results["ddp_batch"] = _ddp(rank, world, seed, "batch", 4)
        results["ddp_loss"] = _ddp(rank, world, seed, "loss", 4)
        results["mismatch"] = _mismatch(rank, world, seed)
        results["clamps"] = _clamps(rank, world, seed)
        results["checkpoint"] = _checkpoint(rank, world, seed, ckpt)
    return results


# ---------------------------------------------------------------------- the oracle
def _unflatten(model, mu):
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = torch.tensor(mu[offset:offset + p.numel()]).reshape(p.shape)
        offset += p.numel()
    return out


def _emulate(seed, world, mode, steps, rule, nan_step=NAN_STEP, lr=HYPER["lr"]):
    """Single-process float64 NumPy emulation of the block-diagonal update (docs/design.md, 2.5)."""
    model = _model()
    mu = np.concatenate([p.detach().reshape(-1).numpy() for p in model.parameters()])
    cov = np.full(mu.size, HYPER["init_cov"])
    r, lam, q, floor = HYPER["obs_noise"], HYPER["forgetting"], HYPER["process_noise"], \
        HYPER["cov_floor"]
    for step in range(steps):
        if step == nan_step:
            continue
        p_pred = cov / lam + q
        u, d_kal, d_inf = np.zeros(mu.size), np.zeros(mu.size), np.zeros(mu.size)
        params = _unflatten(model, mu)
        for rank in range(world):
            x, t = _batch(seed, rank, step)
            if mode == "batch":
                f = lambda *ps: torch.func.functional_call(
                    model, dict(zip(params, ps)), (x,)).reshape(-1)
                jac = torch.func.jacrev(f, argnums=tuple(range(len(params))))(*params.values())
                h = np.concatenate([j.reshape(t.numel(), -1).numpy() for j in jac], 1)
                e = (t.reshape(-1) - f(*params.values())).numpy()
                s_inv = np.linalg.inv(h @ np.diag(p_pred) @ h.T + r * np.eye(len(e)))
                u += h.T @ s_inv @ e
                d_kal += np.einsum("ji,jk,ki->i", h, s_inv, h)
                d_inf += (h * h).sum(0) / r
            else:
                ps = {k: v.clone().requires_grad_() for k, v in params.items()}
                loss = _loss(lambda z: torch.func.functional_call(model, ps, (z,)), x, t)
                g = np.concatenate([v.reshape(-1).numpy() for v in
                                    torch.autograd.grad(loss, list(ps.values()))])
                s_val = g @ (p_pred * g) + r
                u += g * (-float(loss.detach())) / s_val
                d_kal += g * g / s_val
                d_inf += g * g / r
        mu = mu + lr * p_pred * u
        if rule == "kalman":
            cov = np.clip(p_pred - p_pred ** 2 * d_kal, floor, None)
        else:
            cov = np.clip(1.0 / (1.0 / p_pred + d_inf), floor, None)
    return mu, cov


def _single_process_loss_steps(seed, world, steps):
    """DDP + loss mode: the single-process loss step on the global batch (every rank's
    shard), with KalmanNGD itself in one process."""
    model = _model()
    opt = kk.KalmanNGD(model.parameters(), **HYPER)
    for step in range(steps):
        xs, ts = zip(*[_batch(seed, rank, step) for rank in range(world)])
        x, t = torch.cat(xs), torch.cat(ts)
        opt.step(lambda: _loss(model, x, t))
    return model, opt


def _flat(ts):
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in ts])


# ---------------------------------------------------------------------- the tests
_SPAWNED = {}


def _spawned(world, request):
    if world not in _SPAWNED:
        # module-scoped: its own fresh seed, reported with every test of this module that fails
        seed = fresh_seed(20)
        note_seed(request.node, f"the {world} spawned ranks", seed)
        with tempfile.TemporaryDirectory() as ckpt:   # shared by the ranks
            _SPAWNED[world] = (world, seed, run_on_gloo_ranks(_worker, world, seed, ckpt))
    return _SPAWNED[world]


@pytest.fixture(scope="module")
def two_ranks(request):
    return _spawned(2, request)


@pytest.fixture(scope="module")
def three_ranks(request):
    return _spawned(3, request)


@pytest.mark.parametrize("ranks", ["two_ranks", "three_ranks"])
@pytest.mark.parametrize("mode", ["batch", "loss"])
def test_ranks_identical_and_equal_to_block_diagonal_emulation(request, ranks, mode):
    world, seed, results = request.getfixturevalue(ranks)
    first = results[0][mode]
    for other in results[1:]:
        for a, b in zip(first["params"] + first["covs"],
                        other[mode]["params"] + other[mode]["covs"]):
            assert torch.equal(a, b)                       # bit for bit across ranks
    mu_exp, cov_exp = _emulate(seed, world, mode, STEPS, _rule(world))
    assert rel_err(_flat(first["params"]), mu_exp) <= 1e-9
    assert rel_err(_flat(first["covs"]), cov_exp) <= 1e-9
    assert first["skipped"] == 1                           # the NaN step, on every rank
    assert first["diag"]["steps"] == STEPS - 1
    assert first["diag"]["cov_clamps"] >= 0
    if _rule(world) == "kalman":
        assert 0 < first["diag"]["max_shrink"] < 1 or first["diag"]["cov_clamps"] > 0


def test_ddp_batch_mode_uses_only_the_optimizer_all_reduce(two_ranks):
    world, seed, results = two_ranks
    for res in results:
        ddp = res["ddp_batch"]
        assert ddp["ddp_hook_calls"] == 0              # DDP's gradient all-reduce never ran
        # per step: one all-reduce of the flags / hash / noise, one of the terms u and d
        assert ddp["our_all_reduces"] == 2 * 4
    mu_exp, cov_exp = _emulate(seed, world, "batch", 4, "kalman", nan_step=-1)
    assert rel_err(_flat(results[0]["ddp_batch"]["params"]), mu_exp) <= 1e-9
    assert rel_err(_flat(results[0]["ddp_batch"]["covs"]), cov_exp) <= 1e-9
    for a, b in zip(results[0]["ddp_batch"]["params"], results[1]["ddp_batch"]["params"]):
        assert torch.equal(a, b)


def test_ddp_loss_mode_uses_ddp_gradient_all_reduce_and_equals_global_batch(two_ranks):
    world, seed, results = two_ranks
    for res in results:
        ddp = res["ddp_loss"]
        assert ddp["ddp_hook_calls"] >= 4              # one bucket or more per backward
        assert ddp["our_all_reduces"] == 0             # the optimizer issued none
    model, opt = _single_process_loss_steps(seed, world, 4)
    assert rel_err(_flat(results[0]["ddp_loss"]["params"]), _flat(model.parameters())) <= 1e-10
    assert rel_err(_flat(results[0]["ddp_loss"]["covs"]),
                   _flat([opt.covariance(p) for p in model.parameters()])) <= 1e-10
    for a, b in zip(results[0]["ddp_loss"]["params"], results[1]["ddp_loss"]["params"]):
        assert torch.equal(a, b)


def test_disagreeing_ranks_raise_on_every_rank(two_ranks):
    world, _, results = two_ranks
    for res in results:
        out = res["mismatch"]
        assert out["first_lr"] and "disagree" in out["first_lr"] and "lr" in out["first_lr"]
        assert out["first_shape"] and "disagree" in out["first_shape"] \
            and "(4, 3)" in out["first_shape"] and "(5, 3)" in out["first_shape"]
        assert out["later"] and "differ" in out["later"]
        assert out["later_unchanged"] and out["later_skipped"] == 1


def test_kalman_rule_clamps_counted_and_warned_information_rule_has_none(two_ranks):
    world, _, results = two_ranks
    for res in results:
        kal, inf = res["clamps"]["kalman"], res["clamps"]["information"]
        assert kal["diag"]["cov_clamps"] > 0 and max(kal["shrink"]) > 1
        assert kal["diag"]["floor_clamped"] > 0       # the clamped elements sit at the floor
        assert len(kal["warnings"]) == 1              # warned once
        assert inf["diag"]["cov_clamps"] == 0 and inf["warnings"] == []
        assert inf["shrink"] == [None] * 3                     # defined for the Kalman rule
        assert inf["last"] == 0
        assert inf["diag"]["groups"][0]["cov_min"] > 1e-9


def test_distributed_checkpoint_of_a_replicated_optimizer_resumes_identically(two_ranks):
    _, _, results = two_ranks
    for rank in results:
        for mode, (straight, resumed) in rank["checkpoint"].items():
            assert len(straight) == len(resumed)
            for a, b in zip(straight, resumed):
                assert torch.equal(a, b), mode
    # the adapted noise moved away from obs_noise, so it travelled in the checkpoint
    assert float(results[0]["checkpoint"]["loss"][0][-1]) != HYPER["obs_noise"]


def test_train_ddp_example_under_torchrun(rng):
    """examples/train_ddp.py, launched as the docs say: torchrun --nproc_per_node=2."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [torchrun] if os.path.exists(torchrun) else [sys.executable, "-m",
                                                            "torch.distributed.run"]
    seed = int(rng.integers(1000))
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        for mode in ("batch", "loss"):
            out = os.path.join(tmp, mode)
            proc = subprocess.run(launcher + ["--standalone", "--nproc_per_node=2",
                                              os.path.join(ROOT, "examples", "train_ddp.py"),
                                              "--mode", mode, "--steps", "12", "--out", out,
                                              "--seed", str(seed), "--hard-exit"],
                                  env=env, capture_output=True, text=True, timeout=240)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
            ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
                     for r in range(2)]
            for a, b in zip(ranks[0]["params"] + ranks[0]["covs"],
                            ranks[1]["params"] + ranks[1]["covs"]):
                assert torch.equal(a, b)
            assert ranks[0]["last"] < ranks[0]["first"]
            assert ranks[0]["diagnostics"]["skipped_steps"] == 0
