"""KalmanNGD over FSDP2 (``fully_shard``) on real gloo processes (docs/fsdp.md).

One spawn per world size runs every scenario (a process start costs seconds here):

* 2 and 3 ranks, loss mode (the closure's backward, or the loss returned with its graph,
  which the optimizer differentiates) and batch mode (dense blocks, and Kronecker-tracked
  ``nn.Linear`` layers), 4 steps each with an LR scheduler, adaptive noise and the gate,
  one step with a NaN on the last rank: the sharded run equals the single-process run on
  the full model observing the same global batch (loss mode: the ranks' mean loss; batch
  mode: every rank's rows, rank-major) to float64 rounding, and the NaN step is skipped
  everywhere. The model has uneven shards (5 rows over 2 or 3 ranks) and, on 3 ranks, an
  empty one (2 rows);
* distributed checkpoints: 2 ranks save the model and optimizer (``get_*_state_dict`` and
  ``torch.distributed.checkpoint.save``) after 3 steps and go on for 3 more; 3 ranks (with
  3, 2 and 1 of the 6 samples of each batch), and one rank on a one-rank mesh, load that
  checkpoint and run the same 3 steps: the same result as the uninterrupted run;
* float16 parameters (the overflow guard then reads the covariances' maxima, summed over
  the ranks) in loss and batch mode equal the single process to float16 rounding; parameters
  added by ``add_param_group`` are sharded alike;
* ranks that disagree on a hyper-parameter raise on every rank at the first step; what does
  not compose raises, naming it (a mixed-precision policy, CPU offload, a 2-D mesh, a
  placement other than Shard(0), ``process_group``, ``reduce_in_backward``).

The ranks run under tests/gloo_ranks.py, which says why they leave with ``os._exit(0)``
after the last barrier (torch 2.14's gloo threads can abort interpreter teardown).
"""
import os
import sys
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import kalman_kernels as kk
from conftest import fresh_seed, note_seed, rel_err
from gloo_ranks import run_on_gloo_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not built in")

STEPS = 4
NAN_STEP = 2
HYPER = dict(init_cov=0.05, obs_noise=0.2, forgetting=0.99, process_noise=1e-5,
             cov_floor=1e-9, adaptive_obs_noise=0.1, gate=0.99)
MODES = ("loss", "graph", "dense", "tracked")
SAVE_AT, AFTER = 3, 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _batch(seed, rank, step, n=3):
    g = torch.Generator().manual_seed(seed * 1000 + step * 10 + rank)
    return (torch.randn(n, 3, generator=g, dtype=torch.float64),
            torch.randn(n, 2, generator=g, dtype=torch.float64))


def _global_batch(seed, world, step, nan):
    xs, ts = zip(*[_batch(seed, r, step) for r in range(world)])
    x = torch.cat(xs)
    if nan and step == NAN_STEP:
        x[-1, 0] = float("nan")              # the last rank's last sample
    return x, torch.cat(ts)


def _optimizer(model, mode):
    opt = kk.KalmanNGD(model.parameters(), lr=1.0, **HYPER)
    if mode == "tracked":
        opt.track(model)
    # a schedule of the step scale that the ranks and the single process follow alike
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.25 * s))
    return opt, sched


def _step(opt, model, mode, x, t):
    if mode == "graph":                      # loss mode, the loss returned with its graph
        opt.step(lambda: ((model(x) - t) ** 2).mean())
    elif mode == "loss":
        def closure():
            opt.zero_grad()
            loss = ((model(x) - t) ** 2).mean()
            loss.backward()
            return loss
        opt.step(closure)
    else:
        opt.step(lambda: (model(x), t))


def _shard(model, mesh=None):
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model, opt):
    return {"params": [p.full_tensor() for p in model.parameters()],
            "covs": [opt.covariance(p).full_tensor() for p in model.parameters()]}


def _run_sharded(rank, world, seed, mode, steps, nan=True, start=0, model=None, opt=None,
                 sched=None):
    if model is None:
        model = _shard(_model())
        opt, sched = _optimizer(model, mode)
    for step in range(start, start + steps):
        x, t = _batch(seed, rank, step)
        if nan and step == NAN_STEP and rank == world - 1:
            x[-1, 0] = float("nan")
        _step(opt, model, mode, x, t)
        sched.step()
    return model, opt, sched


# ---------------------------------------------------------------------- checkpoints
def _states(model, opt, sched):
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
            "sched": sched.state_dict()}


def _load(model, opt, sched, path, group=None):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    states = _states(model, opt, sched)
    dcp.load(states, checkpoint_id=path, process_group=group)
    set_model_state_dict(model, states["model"])
    set_optimizer_state_dict(model, opt, states["optim"])
    sched.load_state_dict(states["sched"])


def _checkpoints(rank, world, seed, ckpt):
    """World 2: save after SAVE_AT steps, then go on (the uninterrupted run). World 3: load on
    3 ranks, and on a one-rank mesh of rank 0, then go on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import DeviceMesh
    out = {}
    if world == 2:
        model, opt, sched = _run_sharded(rank, world, seed, "tracked", SAVE_AT, nan=False)
        dcp.save(_states(model, opt, sched), checkpoint_id=ckpt)
        _run_sharded(rank, world, seed, "tracked", AFTER, nan=False, start=SAVE_AT, model=model,
                     opt=opt, sched=sched)
        out["uninterrupted"] = _full(model, opt)
        out["diag"] = opt.diagnostics()
        return out
    model = _shard(_model())
    opt, sched = _optimizer(model, "tracked")
    _load(model, opt, sched, ckpt)
    out["loaded_steps"] = opt.steps_taken
    out["loaded_lr"] = opt.param_groups[0]["lr"]
    # the continued run observes the 2-rank run's batches: 3 ranks split its 6 rows
    # unevenly (3, 2 and 1 samples), which leaves the observation as it was
    lo, hi = (0, 3, 5, 6)[rank], (0, 3, 5, 6)[rank + 1]
    for step in range(SAVE_AT, SAVE_AT + AFTER):
        x, t = _global_batch(seed, 2, step, nan=False)
        _step(opt, model, "tracked", x[lo:hi], t[lo:hi])
        sched.step()
    out["resumed3"] = _full(model, opt)
    out["diag"] = opt.diagnostics()
    solo = dist.new_group([0])                  # every rank takes part in new_group
    if rank == 0:
        mesh = DeviceMesh.from_group(solo, "cpu")
        model = _shard(_model(), mesh)
        opt, sched = _optimizer(model, "tracked")
        _load(model, opt, sched, ckpt, group=solo)
        for step in range(SAVE_AT, SAVE_AT + AFTER):
            x, t = _global_batch(seed, 2, step, nan=False)
            _step(opt, model, "tracked", x, t)
            sched.step()
        out["resumed1"] = _full(model, opt)
    return out


# ---------------------------------------------------------------------- refusals
def _refusals(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    out = {}

    def attempt(name, build):
        try:
            build()
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)

    def mixed():
        model = _model()
        fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
        kk.KalmanNGD(model.parameters())

    def two_d():
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
        model = _model()
        fully_shard(model, mesh=mesh)
        kk.KalmanNGD(model.parameters())

    def group():
        kk.KalmanNGD(_shard(_model()).parameters(), process_group=dist.group.WORLD)

    def offload():
        from torch.distributed.fsdp import CPUOffloadPolicy
        model = _model()
        fully_shard(model, offload_policy=CPUOffloadPolicy(pin_memory=False))
        kk.KalmanNGD(model.parameters())

    def placement():
        from torch.distributed.tensor import Shard
        model = nn.Linear(4, 6).double()          # dim 1 splits evenly over 2 ranks
        fully_shard(model, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
        kk.KalmanNGD(model.parameters())

    def in_backward():
        model = _shard(_model())
        kk.KalmanNGD(model.parameters()).reduce_in_backward()

    def disagree():
        model = _shard(_model())
        opt = kk.KalmanNGD(model.parameters(), lr=1.0 if rank == 0 else 0.9)
        x, t = _batch(0, rank, 0)
        _step(opt, model, "dense", x, t)

    attempt("disagree", disagree)
    attempt("mixed", mixed)
    attempt("two_d", two_d)
    attempt("process_group", group)
    attempt("offload", offload)
    attempt("placement", placement)
    attempt("reduce_in_backward", in_backward)
    return out


def _added(rank, world, seed):
    """Dense batch mode with half the parameters added by add_param_group."""
    model = _shard(_model())
    params = list(model.parameters())
    opt = kk.KalmanNGD(params[:2], lr=1.0, **HYPER)
    opt.add_param_group({"params": params[2:]})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.25 * s))
    _run_sharded(rank, world, seed, "dense", STEPS, model=model, opt=opt, sched=sched)
    return _full(model, opt)


def _half_model():
    return _model().half()


def _half(rank, world, seed, sharded=True):
    """float16 parameters in loss and batch mode: the overflow guard reads the covariances'
    maxima (summed over the ranks, the same bound on every rank)."""
    out = {}
    for mode in ("loss", "dense"):
        model = _shard(_half_model()) if sharded else _half_model()
        opt = kk.KalmanNGD(model.parameters(), lr=1.0, init_cov=0.05, obs_noise=0.2)
        for step in range(2):
            if sharded:
                x, t = _batch(seed, rank, step)
            else:
                x, t = _global_batch(seed, world, step, nan=False)
            _step(opt, model, mode, x.half(), t.half())
        out[mode] = _full(model, opt) if sharded else {
            "params": [p.detach() for p in model.parameters()],
            "covs": [opt.covariance(p) for p in model.parameters()]}
        out[mode]["steps"] = opt.steps_taken
    return out


def _collectives(rank, world, seed):
    """The collectives KalmanNGD issues per step (its all-reduces and its all-to-all; FSDP's
    own are not counted): (name, numel sent) per call, 2 steps per mode after a first one
    (which also compares the ranks' configurations once)."""
    from kalman_kernels import distributed as kd
    calls = []
    orig = kd.collective_, kd.exchange_

    def collective(name, tensor, op, group):
        calls.append((name, tensor.numel()))
        return orig[0](name, tensor, op, group)

    def exchange(name, output, tensor, output_splits, input_splits, group):
        calls.append((name, tensor.numel()))
        return orig[1](name, output, tensor, output_splits, input_splits, group)

    out = {}
    kd.collective_, kd.exchange_ = collective, exchange
    try:
        for mode in ("loss", "tracked"):
            model = _shard(_model())
            opt, _ = _optimizer(model, mode)
            for step in range(3):
                if step == 1:
                    calls.clear()
                x, t = _batch(seed, rank, step)
                _step(opt, model, mode, x, t)
            out[mode] = list(calls)
    finally:
        kd.collective_, kd.exchange_ = orig
    return out


def _worker(rank, world, ckpt, seed):
    results = {}
    for mode in MODES:
        model, opt, _ = _run_sharded(rank, world, seed, mode, STEPS)
        results[mode] = dict(_full(model, opt), diag=opt.diagnostics())
    results["checkpoints"] = _checkpoints(rank, world, seed, ckpt)
    if world == 2:
        results["refusals"] = _refusals(rank, world)
        results["added"] = _added(rank, world, seed)
        results["half"] = _half(rank, world, seed)
        results["collectives"] = _collectives(rank, world, seed)
    return results


# ---------------------------------------------------------------------- the single process
def _single(seed, world, mode, steps, nan=True):
    model = _model()
    opt, sched = _optimizer(model, mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            x, t = _global_batch(seed, world, step, nan)
            _step(opt, model, mode, x, t)
            sched.step()
    skips = [w for w in caught if "step skipped" in str(w.message)]
    assert len(skips) == (1 if nan else 0), [str(w.message) for w in caught]
    return model, opt


def _compare(got, model, opt, tol):
    for a, b in zip(got["params"], model.parameters()):
        assert rel_err(a, b.detach()) <= tol
    for a, b in zip(got["covs"], model.parameters()):
        assert rel_err(a, opt.covariance(b)) <= tol


# ---------------------------------------------------------------------- the tests
_SPAWNED = {}
_CKPT = tempfile.TemporaryDirectory()


def _spawned(world, request):
    if world not in _SPAWNED:
        if world == 3:
            _spawned(2, request)                 # the checkpoint the 3 ranks load
        seed = _SPAWNED[2][1] if world == 3 else fresh_seed(20)
        note_seed(request.node, f"the {world} spawned FSDP ranks", seed)
        results = run_on_gloo_ranks(_worker, world, os.path.join(_CKPT.name, "ckpt"), seed)
        _SPAWNED[world] = (world, seed, results)
    return _SPAWNED[world]


@pytest.fixture(scope="module")
def two_ranks(request):
    return _spawned(2, request)


@pytest.fixture(scope="module")
def three_ranks(request):
    return _spawned(3, request)


@pytest.mark.parametrize("ranks", ["two_ranks", "three_ranks"])
@pytest.mark.parametrize("mode", MODES)
def test_sharded_step_equals_single_process_on_global_batch(request, ranks, mode):
    world, seed, results = request.getfixturevalue(ranks)
    model, opt = _single(seed, world, mode, STEPS)
    for res in results:                       # every rank gathers the same full tensors
        _compare(res[mode], model, opt, 1e-12)
        diag = res[mode]["diag"]
        assert diag["skipped_steps"] == 1 == opt.skipped_steps     # the NaN step, everywhere
        assert diag["steps"] == STEPS - 1
        assert diag["obs_noise"] == pytest.approx(opt.diagnostics()["obs_noise"], rel=1e-12)
        assert diag["groups"][0]["numel"] == 32
        ref = opt.diagnostics()["groups"][0]
        for key in ("cov_min", "cov_mean", "cov_max"):
            assert diag["groups"][0][key] == pytest.approx(ref[key], rel=1e-12)
    assert opt.diagnostics()["gated_steps"] >= 0


def test_checkpoint_saved_on_two_ranks_resumes_on_three_and_one(two_ranks, three_ranks):
    _, seed, saved = two_ranks
    _, _, loaded = three_ranks
    expected = saved[0]["checkpoints"]["uninterrupted"]
    model, opt = _single(seed, 2, "tracked", SAVE_AT + AFTER, nan=False)
    _compare(expected, model, opt, 1e-12)     # the uninterrupted run is the global-batch run
    for res in loaded:
        got = res["checkpoints"]
        assert got["loaded_steps"] == SAVE_AT
        assert got["loaded_lr"] == pytest.approx(1.0 / (1.0 + 0.25 * SAVE_AT))
        for a, b in zip(got["resumed3"]["params"] + got["resumed3"]["covs"],
                        expected["params"] + expected["covs"]):
            assert rel_err(a, b) <= 1e-12
        assert got["diag"]["steps"] == SAVE_AT + AFTER
    solo = loaded[0]["checkpoints"]["resumed1"]
    for a, b in zip(solo["params"] + solo["covs"], expected["params"] + expected["covs"]):
        assert rel_err(a, b) <= 1e-12


def test_parameters_added_by_add_param_group_are_sharded_alike(two_ranks):
    _, _, results = two_ranks
    for res in results:
        for a, b in zip(res["added"]["params"] + res["added"]["covs"],
                        res["dense"]["params"] + res["dense"]["covs"]):
            assert rel_err(a, b) <= 1e-14


def test_float16_parameters_sharded_equal_single_process(two_ranks):
    world, seed, results = two_ranks
    single = _half(0, world, seed, sharded=False)
    for res in results:
        for mode in ("loss", "dense"):
            got, exp = res["half"][mode], single[mode]
            assert got["steps"] == exp["steps"] == 2
            for a, b in zip(got["params"] + got["covs"], exp["params"] + exp["covs"]):
                assert rel_err(a.double(), b.double()) <= 2e-3


def test_collectives_per_step_are_those_of_the_cost_table(two_ranks):
    """docs/fsdp.md, "Cost per step": loss mode one all-reduce of 8 float64; batch mode the
    sizes (2 W + tracked layers), one all-to-all, the partial S and residuals (m^2 + m + 6)."""
    world, _, results = two_ranks
    m = world * 3 * 2                                # 3 samples per rank, K = 2
    for res in results:
        calls = res["collectives"]
        assert calls["loss"] == [("fsdp-loss", 8)] * 2
        batch = calls["tracked"]
        assert [name for name, _ in batch] == ["fsdp-sizes", "fsdp-observation",
                                               "fsdp-terms"] * 2
        assert batch[0][1] == 2 * world + 2 and batch[2][1] == m * m + m + 6
        # the all-to-all: D's rows of every shard (3 samples x 2 scores x d_out rows) and A
        # (3 x d_in) to each of the W ranks, one error flag each; biases are dense blocks
        # whose Jacobian is D (6 x d_out)
        rows = 3 * 2 * (5 + 2) + world * 3 * (3 + 5) + 6 * (5 + 2) + world
        assert batch[1][1] == rows


def test_what_does_not_compose_raises_naming_it(two_ranks):
    _, _, results = two_ranks
    for res in results:
        out = res["refusals"]
        assert out["disagree"] and "disagree" in out["disagree"] and "lr" in out["disagree"]
        assert out["mixed"] and "MixedPrecisionPolicy" in out["mixed"]
        assert out["two_d"] and "2-D mesh" in out["two_d"]
        assert out["process_group"] and "process_group=None" in out["process_group"]
        assert out["offload"] and "CPUOffloadPolicy" in out["offload"]
        assert out["placement"] and "Shard(0)" in out["placement"]
        assert out["reduce_in_backward"] and "reduce_in_backward" in out["reduce_in_backward"]


def test_train_fsdp_example_under_torchrun(rng):
    """examples/train_fsdp.py as the docs launch it (torchrun, 2 CPU ranks, gloo): the
    result is the single-process run of the example's model on its global batches (float32:
    1e-4), and its checkpoint is written. (Resuming on another number of ranks is tested
    above on spawned ranks, with the same calls.)"""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "examples", "train_fsdp.py")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [torchrun] if os.path.exists(torchrun) else [sys.executable, "-m",
                                                            "torch.distributed.run"]
    seed = int(rng.integers(1000))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = os.path.join(tmp, "ckpt"), os.path.join(tmp, "out")
        for ranks, extra in ((2, ["--steps", "6", "--out", out]),):
            proc = subprocess.run(launcher + ["--standalone", f"--nproc_per_node={ranks}", script,
                                              "--mode", "batch", "--checkpoint", ckpt, "--seed",
                                              str(seed), "--hard-exit"] + extra,
                                  env=env, capture_output=True, text=True, timeout=240)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
                 for r in range(2)]
        assert os.path.exists(os.path.join(ckpt, ".metadata"))
    sys.path.insert(0, os.path.join(root, "examples"))
    try:
        import train_fsdp
    finally:
        sys.path.pop(0)
    torch.manual_seed(seed + 1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = kk.KalmanNGD(model.parameters(), init_cov=0.05, obs_noise=0.1, forgetting=0.999)
    opt.track(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.01 * s))
    for step in range(6):
        x, y = train_fsdp.global_batch(step, 16, 8, 4, seed)
        target = nn.functional.one_hot(y, 4).to(x.dtype)
        opt.step(lambda: (model(x).softmax(-1), target))
        sched.step()
    for res in ranks:
        assert res["diagnostics"]["steps"] == 6 and res["world"] == 2
        assert res["last"] < res["first"]
        for a, b in zip(res["params"], model.parameters()):
            assert rel_err(a, b.detach()) <= 1e-4
        for a, b in zip(res["covs"], model.parameters()):
            assert rel_err(a, opt.covariance(b)) <= 1e-4
