"""torch.optim's conventions for KalmanNGD, the way torch's own optimizer tests check them.

torch tests every optimizer over a list of its documented keyword sets (an "OptimizerInfo"
with its optimizer inputs) crossed with dtypes and devices, one generic test per
convention. This module does the same for KalmanNGD: ``CONFIGS`` are its documented kwarg
sets (loss and batch observations, the Gaussian and categorical likelihoods, the gate,
adaptive noise, forgetting and process noise, both covariance rules, sequential
sub-batches), crossed with float32 / float64 and, where the kernels matter, with every
backend that steps CPU tensors here (reference, cpp, triton under TRITON_INTERPRET=1).

The conventions: LR schedulers, step pre/post hooks, state_dict round trips that continue
identically in a fresh optimizer, copy.deepcopy and pickle, non-contiguous parameters,
complex parameters as real views, zero-size parameters, param groups added later, printing,
zero_grad, and lr as a Tensor (refused, with torch's wording). What is refused by design and
why: README, "PyTorch conventions".
"""
from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import kalman_kernels as kk
from conftest import rel_err
from step_backends import step_backends

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@dataclass(frozen=True)
class Config:
    """One documented way to use KalmanNGD: its kwargs and the closure's observation."""

    name: str
    mode: str                 # "loss", "batch" or "categorical"
    kwargs: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


CONFIGS = [
    Config("loss", "loss", dict(init_cov=0.05, obs_noise=0.5)),
    Config("loss-information-forgetting", "loss",
           dict(init_cov=0.05, obs_noise=0.5, cov_update="information", forgetting=0.97,
                process_noise=1e-5)),
    Config("loss-gate-adaptive", "loss",
           dict(init_cov=0.05, obs_noise=0.5, gate=0.9, adaptive_obs_noise=0.3)),
    Config("batch", "batch", dict(init_cov=0.05, obs_noise=0.2)),
    Config("batch-information-ceiling", "batch",
           dict(init_cov=0.05, obs_noise=0.2, cov_update="information", forgetting=0.95,
                process_noise=1e-4, cov_ceiling=0.5)),
    Config("batch-gate-adaptive", "batch",
           dict(init_cov=0.05, obs_noise=0.2, gate=0.99, adaptive_obs_noise=0.2)),
    Config("batch-subbatches", "batch",
           dict(init_cov=0.05, obs_noise=0.2, max_obs_per_update=4)),
    Config("categorical", "categorical", dict(init_cov=0.05, likelihood="categorical")),
]
DTYPES = [torch.float32, torch.float64]
BACKENDS = step_backends()
# (config, backend) pairs of the tests where the kernels matter: every config on the
# compiled and reference backends; the Triton interpreter (about 1e6 elements/s and a
# compilation per shape) on the plain loss and batch configs, which reach all its kernels
CONFIG_BACKENDS = [pytest.param(c, b, id=f"{c.name}-{b}") for c in CONFIGS for b in BACKENDS
                   if b != "triton" or c.name in ("loss", "batch")]


def _data(dtype, batch=5, d_in=4, d_out=3):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    x = torch.randn(batch, d_in, generator=gen, dtype=dtype)
    y = torch.randn(batch, d_out, generator=gen, dtype=dtype)
    labels = torch.randint(0, d_out, (batch,), generator=gen)
    return x, y, labels


def _closure(mode, params, data, zero_grad=None):
    """The step's closure over ``params`` = [W (d_out, d_in), b (d_out,), extra...]: a linear
    model (extra parameters add a small elementwise term). Loss mode follows torch.optim's
    closure convention: zero the gradients, backward, return the loss."""
    x, y, labels = data
    w, b, *extra = params

    def forward():
        out = x @ w.t() + b
        for e in extra:
            if e.numel():
                out = out + 0.1 * torch.tanh(e.reshape(-1)[: out.shape[1]].sum())
        return out

    def closure():
        if mode == "loss":
            for p in params:
                p.grad = None
            loss = ((forward() - y) ** 2).mean()
            loss.backward()
            return loss
        if mode == "batch":
            return forward(), y
        return forward(), labels
    return closure


def _params(dtype, d_in=4, d_out=3):
    return [nn.Parameter(torch.randn(d_out, d_in, dtype=dtype) * 0.5),
            nn.Parameter(torch.randn(d_out, dtype=dtype) * 0.1),
            nn.Parameter(torch.randn(2, 3, dtype=dtype) * 0.1)]


def _clone(params):
    return [nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in params]


def _opt(config, params, backend="auto", **extra):
    return kk.KalmanNGD(params, backend=backend, **{**config.kwargs, **extra})


def _assert_same_state(a, b, exact=True, tol=0.0, groups=True):
    """Two optimizers' parameters and state_dicts agree (bit for bit when ``exact``; the
    param groups' settings too when ``groups``)."""
    for pa, pb in zip([p for g in a.param_groups for p in g["params"]],
                      [p for g in b.param_groups for p in g["params"]]):
        if exact:
            assert torch.equal(pa.detach(), pb.detach())
        else:
            assert rel_err(pa, pb) <= tol
    sa, sb = a.state_dict(), b.state_dict()
    assert not groups or sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key in sa["state"]:
        for name, va in sa["state"][key].items():
            vb = sb["state"][key][name]
            if isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and va.shape == vb.shape, (key, name)
                assert torch.equal(va, vb) if exact else rel_err(va, vb) <= max(tol, 1e-12)
            else:
                assert va == vb, (key, name)


@pytest.fixture(params=CONFIGS, ids=repr)
def config(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


# ---------------------------------------------------------------------- schedulers, hooks
@pytest.mark.parametrize("scheduler", ["StepLR", "LambdaLR"])
def test_schedulers_set_the_lr_each_step_uses(config, dtype, scheduler):
    params, twin = _params(dtype), None
    twin = _clone(params)
    data = _data(dtype)
    opt, ref = _opt(config, params), _opt(config, twin)
    if scheduler == "StepLR":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        lrs = [0.7 ** k for k in range(3)]
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
        lrs = [1.0 / (1 + k) for k in range(3)]
    for lr in lrs:
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        ref.param_groups[0]["lr"] = opt.param_groups[0]["lr"]   # the same value, set by hand
        opt.step(_closure(config.mode, params, data))
        ref.step(_closure(config.mode, twin, data))
        sched.step()
    _assert_same_state(opt, ref, groups=False)      # the scheduler added initial_lr
    # the scheduler's state round trip (torch.optim's convention)
    again = torch.optim.lr_scheduler.StepLR(opt, 1) if scheduler == "StepLR" else \
        torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == sched.last_epoch


def test_step_pre_and_post_hooks_run_once_per_step_in_order(config, dtype):
    params, data = _params(dtype), _data(dtype)
    opt = _opt(config, params)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    opt.step(_closure(config.mode, params, data))
    assert calls == [("pre", opt), ("post", opt)]
    pre.remove()
    post.remove()
    opt.step(_closure(config.mode, params, data))
    assert len(calls) == 2


def test_global_optimizer_hooks_see_kalman_steps(config, dtype):
    from torch.optim.optimizer import register_optimizer_step_post_hook
    params, data = _params(dtype), _data(dtype)
    opt = _opt(config, params)
    seen = []
    handle = register_optimizer_step_post_hook(lambda o, a, k: seen.append(o))
    try:
        opt.step(_closure(config.mode, params, data))
    finally:
        handle.remove()
    assert seen == [opt]


# ---------------------------------------------------------------------- state and copies
def _assert_resumed(opt, params, fresh, twin, config, data):
    """``fresh`` (over ``twin``) resumed ``opt`` (over ``params``) after its 2 steps: the
    same state now and after 2 more steps of each."""
    _assert_same_state(opt, fresh)
    for _ in range(2):
        opt.step(_closure(config.mode, params, data))
        fresh.step(_closure(config.mode, twin, data))
    _assert_same_state(opt, fresh)
    assert fresh.steps_taken == opt.steps_taken == 4


def test_state_dict_round_trip_continues_identically(config, dtype):
    params, data = _params(dtype), _data(dtype)
    opt = _opt(config, params)
    for _ in range(2):
        opt.step(_closure(config.mode, params, data))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = _clone(params)
    fresh = _opt(config, twin, init_cov=0.9)     # its own prior is overwritten by the load
    fresh.load_state_dict(saved)
    _assert_resumed(opt, params, fresh, twin, config, data)


def test_state_dict_keys_name_parameters_and_a_fresh_one_is_complete(config, dtype):
    """Every key of state_dict()["state"] is a parameter's index (the filter-wide state rides
    in each entry under "kalman_filter", as Adam's step does), from construction on: a fresh
    optimizer's entries hold the prior its first step would create."""
    params = _params(dtype)
    params.append(nn.Parameter(torch.ones(2, dtype=dtype), requires_grad=False))   # frozen
    opt = _opt(config, params)
    fresh = opt.state_dict()
    assert not any(isinstance(key, torch.Tensor) for key in opt.state)   # nothing created
    assert sorted(fresh["state"]) == [0, 1, 2]
    for index, p in enumerate(params[:3]):
        entry = fresh["state"][index]
        assert torch.equal(entry["cov"], torch.full(p.shape, 0.05, dtype=dtype))
        assert int(entry["kalman_filter"]["steps"]) == 0
    opt.step(_closure(config.mode, params, _data(dtype)))
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2]
    assert all(int(sd["state"][i]["kalman_filter"]["steps"]) == 1 for i in range(3))


def test_state_dict_with_the_filter_under_its_own_key_still_loads(config, dtype):
    """A state dict in the earlier form (the filter-wide state under state["filter"])."""
    params, data = _params(dtype), _data(dtype)
    opt = _opt(config, params)
    opt.step(_closure(config.mode, params, data))
    sd = opt.state_dict()
    state = {key: {k: v for k, v in entry.items() if k != "kalman_filter"}
             for key, entry in sd["state"].items()}
    state["filter"] = sd["state"][0]["kalman_filter"]
    twin = _clone(params)
    fresh = _opt(config, twin)
    fresh.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    _assert_same_state(opt, fresh)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_distributed_checkpoint_without_fsdp_resumes_identically(config, dtype, tmp_path):
    """torch.distributed.checkpoint with a plain optimizer in one process:
    get_optimizer_state_dict, dcp.save, then a fresh model and optimizer whose state dict is
    the template dcp.load fills, set_optimizer_state_dict: the run goes on as if never
    interrupted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    params, data = _params(dtype), _data(dtype)
    model, opt = nn.ParameterList(params), _opt(config, params)
    for _ in range(2):
        opt.step(_closure(config.mode, params, data))
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    twin = _clone(params)
    fresh_model, fresh = nn.ParameterList(twin), _opt(config, twin, init_cov=0.9)
    states = {"optim": get_optimizer_state_dict(fresh_model, fresh)}
    dcp.load(states, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(fresh_model, fresh, states["optim"])
    _assert_resumed(opt, params, fresh, twin, config, data)


def _public_attrs(opt):
    out = {}
    for name in dir(opt):
        if name.startswith("_"):
            continue
        value = getattr(opt, name)
        if not callable(value):
            out[name] = value
    return out


def _assert_same_public(a, b):
    """torch's deepcopy test: every public attribute of the copy equals the original's."""
    pa, pb = _public_attrs(a), _public_attrs(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        if name in ("state", "param_groups"):
            continue                                # compared through state_dict
        va, vb = pa[name], pb[name]
        if name == "last_info":
            assert (va is None) == (vb is None)
            if va is not None:
                assert va.num_obs == vb.num_obs and va.skipped == vb.skipped
                assert repr(va.mahalanobis) == repr(vb.mahalanobis)
            continue
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), name
        else:
            assert va == vb, name


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("config, backend", CONFIG_BACKENDS)
def test_copies_step_identically_and_leave_the_original_alone(config, dtype, backend, how):
    params, data = _params(dtype), _data(dtype)
    opt = _opt(config, params, backend=backend)
    opt.step(_closure(config.mode, params, data))
    if how == "deepcopy":
        clone = copy.deepcopy(opt)
    else:
        clone = pickle.loads(pickle.dumps(opt))
    cparams = [p for g in clone.param_groups for p in g["params"]]
    assert all(c is not p for c, p in zip(cparams, params))
    _assert_same_state(opt, clone)
    _assert_same_public(opt, clone)
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    clone.step(_closure(config.mode, cparams, data))          # the copy steps first
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values))
    after_copy_step = opt.state_dict()
    for key, st in before["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after_copy_step["state"][key][name], value)
    opt.step(_closure(config.mode, params, data))
    _assert_same_state(opt, clone)                            # bit for bit
    assert clone.steps_taken == opt.steps_taken == 2


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_of_an_optimizer_with_a_scheduler_steps_itself(how):
    """An LR scheduler wraps opt.step on the instance, with a reference to the optimizer:
    a copy must step its own parameters, never the original's."""
    params, data = _params(torch.float64), _data(torch.float64)
    opt = _opt(CONFIGS[0], params)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(_closure("loss", params, data))
    sched.step()
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    values = [p.detach().clone() for p in params]
    cparams = [p for g in clone.param_groups for p in g["params"]]
    clone.step(_closure("loss", cparams, data))
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values))
    assert clone.steps_taken == 2 and opt.steps_taken == 1
    opt.step(_closure("loss", params, data))
    _assert_same_state(opt, clone)


def test_copy_of_model_and_optimizer_keeps_the_tracking(dtype):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    opt = kk.KalmanNGD(model.parameters(), init_cov=0.05, obs_noise=0.2).track(model)
    x, y, _ = _data(dtype)
    opt.step(lambda: (model(x), y))
    model2, opt2 = copy.deepcopy((model, opt))
    assert [p for p in model2.parameters()] == [p for g in opt2.param_groups
                                                for p in g["params"]]
    for m, o in ((model, opt), (model2, opt2)):
        o.step(lambda m=m: (m(x), y))
        assert o.describe().count("kronecker") == 2
    _assert_same_state(opt, opt2)
    # pickled together, too
    model3, opt3 = pickle.loads(pickle.dumps((model, opt)))
    opt3.step(lambda: (model3(x), y))
    opt.step(lambda: (model(x), y))
    assert opt3.describe().count("kronecker") == 2
    _assert_same_state(opt, opt3)


def test_copies_with_reduce_in_backward_and_warnings_given(dtype):
    params, data = _params(dtype), _data(dtype)
    opt = kk.KalmanNGD(params, init_cov=0.05, obs_noise=0.5).reduce_in_backward()
    opt.step(_closure("loss", params, data))
    clone = copy.deepcopy(opt)
    cparams = [p for g in clone.param_groups for p in g["params"]]
    clone.step(_closure("loss", cparams, data))
    opt.step(_closure("loss", params, data))
    _assert_same_state(opt, clone)
    # the switch travels with the copy, and the copy's own hooks fed its single-pass step
    assert clone.diagnostics()["loss_reduction"] == "in-backward"
    off = copy.deepcopy(kk.KalmanNGD(_params(dtype), init_cov=0.05).reduce_in_backward(False))
    oparams = [p for g in off.param_groups for p in g["params"]]
    off.step(_closure("loss", oparams, data))
    assert off.diagnostics()["loss_reduction"] == "two-pass: reduce_in_backward(False)"


def test_copy_under_a_process_group_is_refused_with_the_way_out():
    import torch.distributed as dist
    assert not dist.is_initialized()       # the multi-rank tests run in their own processes
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        params = _params(torch.float64)
        opt = kk.KalmanNGD(params, process_group=dist.group.WORLD)
        for how in (copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="process_group or over FSDP2-sharded "
                                                "parameters cannot be copied or pickled.*"
                                                "state_dict"):
                how(opt)
        assert opt.state_dict()["param_groups"]       # the way out works
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- layouts and kinds
def _noncontiguous(params):
    """The same values in non-contiguous storage: a transpose, a strided slice, a
    channels-last-like permutation."""
    w, b, e = (p.detach() for p in params)
    out = [nn.Parameter(w.t().contiguous().t()),                        # transposed
           nn.Parameter(torch.stack([b, torch.zeros_like(b)], 1)[:, 0]),  # stride 2
           nn.Parameter(e.t().contiguous().t())]
    assert not any(p.is_contiguous() for p in out)
    return out


@pytest.mark.parametrize("config, backend", CONFIG_BACKENDS)
def test_noncontiguous_parameters_step_like_contiguous_ones(config, dtype, backend):
    params, data = _params(dtype), _data(dtype)
    strided = _noncontiguous(params)
    storage = [p.data_ptr() for p in strided]
    strides = [p.stride() for p in strided]
    opt, ref = _opt(config, strided, backend=backend), _opt(config, params, backend=backend)
    for _ in range(3):
        opt.step(_closure(config.mode, strided, data))
        ref.step(_closure(config.mode, params, data))
    # updated in place: the same storage and strides, the values of the contiguous run
    assert [p.data_ptr() for p in strided] == storage
    assert [p.stride() for p in strided] == strides
    for p, q in zip(strided, params):
        assert rel_err(p, q) <= TOL[dtype]
        assert opt.covariance(p).is_contiguous()
        assert rel_err(opt.covariance(p), ref.covariance(q)) <= TOL[dtype]


def test_noncontiguous_step_that_raises_leaves_the_parameters_unchanged(dtype):
    params, data = _params(dtype), _data(dtype)
    strided = _noncontiguous(params)
    opt = kk.KalmanNGD(strided, init_cov=0.05, obs_noise=0.5)
    opt.step(_closure("loss", strided, data))
    values = [p.detach().clone() for p in strided]
    cov = [opt.covariance(p).clone() for p in strided]

    def failing(*args, **kwargs):
        raise RuntimeError("kernel failed")
    import kalman_kernels.optimizer as optimizer_module
    original = optimizer_module.kalman_ngd_loss_step

    def half_step(params_, *args, **kwargs):
        with torch.no_grad():
            for p in params_:
                p.add_(1.0)            # the staged copies are written, then the step fails
        failing()
    optimizer_module.kalman_ngd_loss_step = half_step
    try:
        with pytest.raises(RuntimeError, match="kernel failed"):
            opt.step(_closure("loss", strided, data))
    finally:
        optimizer_module.kalman_ngd_loss_step = original
    assert all(torch.equal(p.detach(), v) for p, v in zip(strided, values))
    assert all(torch.equal(opt.covariance(p), c) for p, c in zip(strided, cov))


@pytest.mark.parametrize("config, backend", CONFIG_BACKENDS)
def test_complex_parameters_are_their_real_views(config, dtype, backend):
    """A complex parameter z = a + ib is the pair (a, b) with a diagonal covariance over
    both parts: the filter on z equals the filter on torch.view_as_real(z)."""
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    params, data = _params(dtype), _data(dtype)
    real_w = params[0].detach().reshape(3, 2, 2).clone()       # (3, 2) complex = (3, 2, 2)
    z = nn.Parameter(torch.view_as_complex(real_w.clone()))
    r = nn.Parameter(real_w.clone())
    assert z.dtype == cdtype
    xc = torch.complex(data[0][:, :2], data[0][:, 2:]).to(cdtype)

    def make(as_complex, p, b):
        def model():
            zz = p if as_complex else torch.view_as_complex(p)
            out = xc @ zz.t()
            return out.real + 0.5 * out.imag + b
        return model

    b1, b2 = (nn.Parameter(params[1].detach().clone()) for _ in range(2))
    fz, fr = make(True, z, b1), make(False, r, b2)
    y, labels = data[1], data[2]

    def closure(f, ps):
        def run():
            if config.mode == "loss":
                for p in ps:
                    p.grad = None
                loss = ((f() - y) ** 2).mean()
                loss.backward()
                return loss
            return f(), (y if config.mode == "batch" else labels)
        return run
    opt = _opt(config, [z, b1], backend=backend)
    ref = _opt(config, [r, b2], backend="reference")
    for _ in range(2):
        opt.step(closure(fz, [z, b1]))
        ref.step(closure(fr, [r, b2]))
    assert opt.covariance(z).shape == (3, 2, 2) and opt.covariance(z).dtype == dtype
    assert rel_err(torch.view_as_real(z.detach()), r) <= TOL[dtype]
    assert rel_err(opt.covariance(z), ref.covariance(r)) <= TOL[dtype]
    assert rel_err(b1, b2) <= TOL[dtype]
    # the covariance survives a state_dict round trip and sampling keeps z complex
    fresh = _opt(config, [nn.Parameter(z.detach().clone()), nn.Parameter(b1.detach().clone())],
                 backend=backend)
    fresh.load_state_dict(opt.state_dict())
    _assert_same_state(opt, fresh)
    mean = z.detach().clone()
    with opt.sampled_params():
        assert z.dtype == cdtype
        spread = (torch.view_as_real(z.detach() - mean) ** 2 / opt.covariance(z)).mean()
        assert 0.05 < float(spread) < 20           # both parts drawn with their variances
    assert torch.equal(z.detach(), mean)


def test_complex_prediction_is_refused_the_observation_is_real():
    z = nn.Parameter(torch.randn(3, dtype=torch.complex128))
    opt = kk.KalmanNGD([z])
    x = torch.randn(4, 3, dtype=torch.complex128)
    with pytest.raises(TypeError, match="complex.*real"):
        opt.step(lambda: (x @ z, torch.zeros(4, dtype=torch.complex128)))
    with pytest.raises(TypeError, match="floating"):
        opt.step(lambda: (x @ z).sum())


def test_zero_size_parameters_are_carried_and_change_nothing(config, dtype):
    params, data = _params(dtype), _data(dtype)
    empty = [nn.Parameter(torch.zeros(0, dtype=dtype)),
             nn.Parameter(torch.zeros(3, 0, dtype=dtype))]
    with_empty = _clone(params) + empty
    opt, ref = _opt(config, with_empty), _opt(config, params)
    for _ in range(2):
        opt.step(_closure(config.mode, with_empty, data))
        ref.step(_closure(config.mode, params, data))
    for p, q in zip(with_empty, params):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.covariance(p), ref.covariance(q))
    for p in empty:
        assert opt.covariance(p).shape == p.shape
    fresh = _opt(config, _clone(with_empty))
    fresh.load_state_dict(opt.state_dict())
    rows = opt.describe()
    assert [row.kind for row in rows][-2:] == ["unused", "unused"]
    assert [row.cov_bytes for row in rows][-2:] == [0, 0]


def test_param_groups_added_later_get_their_prior_lazily(config, dtype):
    params, data = _params(dtype), _data(dtype)
    w, b, e = params
    b.requires_grad_(True)
    opt = _opt(config, [w, e])
    opt.step(_closure(config.mode, params, data))
    assert b not in opt.state                      # not an optimizer parameter yet
    opt.add_param_group({"params": [b], "init_cov": 0.25, "forgetting": 0.9})
    assert b not in opt.state or "cov" not in opt.state[b]   # created when first used
    assert torch.equal(opt.covariance(b), torch.full_like(b, 0.25).to(opt.covariance(b).dtype))
    opt.step(_closure(config.mode, params, data))
    cov_b = opt.covariance(b)
    assert cov_b.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    predicted = 0.25 / 0.9 + opt.param_groups[1]["process_noise"]   # P- = P / lam + q
    assert float(cov_b.max()) < predicted              # observed: below the predicted prior
    assert opt.param_groups[1]["forgetting"] == 0.9 and opt.param_groups[1]["lr"] == 1.0
    with pytest.raises(ValueError, match="belongs to the observation"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=dtype))],
                             "obs_noise": 1.0})
    # the state with its two groups resumes in a fresh optimizer
    twin = _clone(params)
    fresh = _opt(config, [twin[0], twin[2]])
    fresh.add_param_group({"params": [twin[1]], "init_cov": 0.25, "forgetting": 0.9})
    fresh.load_state_dict(opt.state_dict())
    opt.step(_closure(config.mode, params, data))
    fresh.step(_closure(config.mode, twin, data))
    _assert_same_state(opt, fresh)


# ---------------------------------------------------------------------- the rest
def test_printing_names_the_class_and_every_group_setting(config):
    params = _params(torch.float32)
    opt = _opt(config, params)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": 0.5})
    text = repr(opt)
    assert text.startswith("KalmanNGD (")
    for key in ("lr", "init_cov", "process_noise", "forgetting", "cov_floor", "cov_ceiling",
                "cov_update"):
        assert text.count(f"{key}:") == 2
    assert "Parameter Group 1" in text


def test_zero_grad_follows_torch(config, dtype):
    params, data = _params(dtype), _data(dtype)
    opt = _opt(config, params)
    loss = ((_closure("batch", params, data)()[0] - data[1]) ** 2).mean()
    loss.backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    opt.step(_closure(config.mode, params, data))    # a step after zero_grad is a normal step
    assert opt.steps_taken == 1


def test_lr_as_a_tensor_is_refused_with_torchs_wording(config):
    params, data = _params(torch.float32), _data(torch.float32)
    with pytest.raises(ValueError, match="lr as a Tensor is not supported.*float"):
        _opt(config, params, lr=torch.tensor(1.0))
    opt = _opt(config, params)
    with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": torch.tensor(0.5)})
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    opt.param_groups[0]["lr"] = torch.tensor(0.5)          # set behind the optimizer's back
    with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
        opt.step(_closure(config.mode, params, data))
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values))
    opt.param_groups[0]["lr"] = 1.0
    after = opt.state_dict()
    assert before["state"].keys() == after["state"].keys()


def test_frozen_parameters_are_left_alone(config, dtype):
    params, data = _params(dtype), _data(dtype)
    params[2].requires_grad_(False)
    value = params[2].detach().clone()
    opt = _opt(config, params)
    opt.step(_closure(config.mode, params, data))
    assert torch.equal(params[2].detach(), value)
    assert params[2] not in opt.state
    rows = opt.describe()
    assert rows[2].kind == "frozen" and rows[2].cov_bytes == 0


def test_reduce_in_backward_with_noncontiguous_and_complex_parameters_is_exact():
    """The hooked reduction sees the gradients as backward leaves them (strided, complex):
    the same bits as the two-pass step on contiguous real-layout parameters."""
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    w0, z0 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.complex128)

    def run(strided, hooked):
        w = nn.Parameter(w0.t().contiguous().t() if strided else w0.clone())
        z = nn.Parameter(z0.clone())
        opt = kk.KalmanNGD([w, z], init_cov=0.1, obs_noise=0.3)
        if hooked:
            opt.reduce_in_backward()

        def closure():
            opt.zero_grad()
            loss = ((x @ w.t() + torch.view_as_real(z).sum(-1) - y) ** 2).mean()
            loss.backward()
            return loss
        for _ in range(3):
            opt.step(closure)
        return [w.detach(), z.detach(), opt.covariance(w), opt.covariance(z)]
    expected = run(False, False)
    for strided, hooked in ((True, False), (False, True), (True, True)):
        assert all(torch.equal(a, b) for a, b in zip(run(strided, hooked), expected))
