"""Checks that only a CUDA GPU can make, for the GPU backends (``triton``, ``cuda``).

Every test here is skipped, with the reason, where no CUDA GPU is visible; on a GPU each one
asserts against the float64 reference backend (``backend="reference"``):

* sync-free: a ``KalmanNGD.step`` (loss mode, dense batch mode, tracked Kronecker mode) and
  a ``class_head_update_`` run under ``torch.cuda.set_sync_debug_mode("error")``, where any
  host synchronisation (a ``.item()``, a blocking copy, a ``cudaStreamSynchronize``) raises;
* CUDA graphs: a whole ``KalmanNGD.step`` (closure with forward and backward included)
  captured once and replayed on new batches equals eager reference steps, and the step
  counter kept on the device advances at each replay;
* grouped Kronecker observations (B samples x K outputs each) through the public API and a
  tracked ``KalmanNGD``; the class-head update on CUDA tensors against the dense float64
  update;
* ``torch.compile(fullgraph=True)`` with the default compiler (inductor, which emits Triton
  code for the glue) of the public functional steps on CUDA tensors.

``benchmarks/gpu_check.sh`` runs them by group (``-k sync_free``, ``-k cuda_graph``, ...).
Under ``KALMAN_KERNELS_REQUIRE_CUDA_BUILD=1`` a missing CUDA extension fails instead of
skipping, so a GPU run cannot pass by skipping the cuda backend.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os

import pytest
import torch
from torch import nn

import kalman_kernels as kk
from conftest import step_err
from kalman_kernels import ops
from kalman_kernels.backends import _load
from kalman_kernels.ops.class_head import class_head_update_
from op_checks import assert_close_scaled

F64 = torch.float64
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda")
REQUIRE_CUDA_BUILD = os.environ.get("KALMAN_KERNELS_REQUIRE_CUDA_BUILD", "").strip().lower() in (
    "1", "true", "yes", "on")
GPU_BACKENDS = ["triton", "cuda"]
OPT_MODES = ["loss", "batch-dense", "batch-kron"]

pytestmark = pytest.mark.skipif(
    not GPU, reason="needs one NVIDIA CUDA GPU (torch.cuda.is_available() is False here); "
                    "benchmarks/gpu_check.sh runs these on a GPU machine")


def _need(backend: str) -> None:
    module, reason = _load(backend)
    if module is not None:
        return
    if backend == "cuda" and REQUIRE_CUDA_BUILD:
        pytest.fail(f"KALMAN_KERNELS_REQUIRE_CUDA_BUILD is set but the cuda backend is "
                    f"unavailable: {reason}")
    pytest.skip(f"{backend} backend unavailable: {reason}")


@contextlib.contextmanager
def _sync_is_an_error(what: str):
    """Any synchronising CUDA call inside raises; the mode is restored whatever happens."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        pytest.fail(f"{what} synchronised with the host: {exc}\nRun it under "
                    f"torch.cuda.set_sync_debug_mode('warn') to see where each synchronising "
                    f"call comes from; a step must keep its values on the device.")
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# --------------------------------------------------------------------------------------
# KalmanNGD on a small network, one twin per backend
# --------------------------------------------------------------------------------------
def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3)).to(DEVICE)


def _optimizer(net: nn.Module, backend: str, mode: str, **extra) -> kk.KalmanNGD:
    opt = kk.KalmanNGD(net.parameters(), init_cov=1e-2, obs_noise=0.3, backend=backend,
                       **extra)
    if mode == "batch-kron":
        opt.track(net)
    return opt


def _closure(opt, net, x, y, mode):
    if mode == "loss":
        def closure():
            # torch.optim's convention; set_to_none=False keeps the gradient buffers in place
            # (a captured graph writes into the same memory at every replay)
            opt.zero_grad(set_to_none=False)
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            return loss.detach()
    else:
        def closure():
            return net(x), y
    return closure


def _batches(count: int, rows: int = 12):
    return [(torch.randn(rows, 20, device=DEVICE), torch.randn(rows, 3, device=DEVICE))
            for _ in range(count)]


def _assert_nets_close(got: nn.Module, want: nn.Module, what: str) -> None:
    for (name, p_want), p_got in zip(want.named_parameters(), got.parameters()):
        assert_close_scaled(p_got, p_want, p_want.abs() + 1e-3, 1e-4, f"{what}: {name}")


def _rel(actual, expected) -> float:
    """max |a - e| / max |e| in float64 on the CPU (a non-finite value never passes)."""
    a = actual.detach().cpu().to(F64).reshape(-1)
    e = expected.detach().cpu().to(F64).reshape(-1)
    assert a.shape == e.shape, (a.shape, e.shape)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(e).all())):
        return math.inf
    return float((a - e).abs().max()) / max(float(e.abs().max()), 1e-300)


def _assert_state_close(new, ref_new, old, step_tol: float, value_tol: float, what: str):
    """The step (new - old) within ``step_tol`` of the reference step beyond the rounding of
    the stored result (``step_err``), and the new value within ``value_tol``, both relative
    to the largest element (as the float32 tests of the CPU suite measure: reductions over
    many terms make elementwise bounds meaningless for elements that nearly cancel)."""
    step = step_err(new, old, ref_new)
    assert step <= step_tol, f"{what}: the step differs from the reference's by {step:.2e}"
    value = _rel(new, ref_new)
    assert value <= value_tol, f"{what}: the value differs from the reference's by {value:.2e}"


def _s_scale(s: torch.Tensor) -> torch.Tensor:
    """sqrt(S_ii S_jj): the scale of each entry of a covariance matrix."""
    d = torch.diagonal(s.detach().cpu().to(F64)).abs()
    return torch.sqrt(d[:, None] * d[None, :])


def _assert_moved(net: nn.Module, start: nn.Module, what: str) -> None:
    moved = any(not torch.equal(p, p0) for p, p0 in zip(net.parameters(), start.parameters()))
    assert moved, f"{what}: no parameter changed, so the comparison proves nothing"


# --------------------------------------------------------------------------------------
# sync-free
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", OPT_MODES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sync_free_optimizer_step(backend, mode):
    _need(backend)
    net = _net()
    start, twin = copy.deepcopy(net), copy.deepcopy(net)
    # gate and adaptive noise on: the paths a step most easily reads back by accident
    hyper = dict(gate=0.9999, adaptive_obs_noise=0.1, process_noise=1e-5)
    opt = _optimizer(net, backend, mode, **hyper)
    ref = _optimizer(twin, "reference", mode, **hyper)
    batches = _batches(5)
    # warm-up: lazy state, first-time checks of new covariances, Triton's JIT, cuBLAS and
    # cuSOLVER handles; these may read values once, on purpose
    for x, y in batches[:2]:
        opt.step(_closure(opt, net, x, y, mode))
    with _sync_is_an_error(f"KalmanNGD.step(backend={backend!r}, {mode} mode)"):
        for x, y in batches[2:]:
            opt.step(_closure(opt, net, x, y, mode))
    torch.cuda.synchronize()
    for x, y in batches:
        ref.step(_closure(ref, twin, x, y, mode))
    assert opt.skipped_steps == 0 and ref.skipped_steps == 0
    assert opt.steps_taken == len(batches)
    _assert_moved(net, start, f"{backend} {mode}")
    _assert_nets_close(net, twin, f"sync-free {backend} {mode} vs reference")


def _head_case(k=7, d=48, b=6, dtype=torch.float32):
    w = torch.randn(k, d, dtype=F64)
    pw = (torch.rand(k, d, dtype=F64) + 0.2) * 1e-1
    a = nn.functional.normalize(torch.randn(b, d, dtype=F64), dim=1)
    e = 0.5 * torch.randn(b, k, dtype=F64)
    bias = 0.1 * torch.randn(k, dtype=F64)
    pb = (torch.rand(k, dtype=F64) + 0.2) * 1e-1
    cdt = F64 if dtype == F64 else torch.float32
    return dict(w=w.to(dtype), pw=pw.to(cdt), b=bias.to(dtype), pb=pb.to(cdt), a=a.to(dtype),
                e=e.to(dtype))


def _on(case, device):
    return {key: value.to(device).clone() for key, value in case.items()}


def _class_head(c, normalize_rows, **hyper):
    return class_head_update_(c["w"], c["pw"], c["b"], c["pb"], c["a"], c["e"], 0.2,
                              normalize_rows=normalize_rows, **hyper)


@pytest.mark.parametrize("normalize_rows", [False, True], ids=["plain", "cosine"])
def test_sync_free_class_head_step(normalize_rows):
    case = _head_case()
    hyper = dict(gate=0.999, adaptive_rate=0.1, forgetting=0.99, process_noise=1e-5)
    # warm-up: the gate's chi-square quantile is a host constant cached per (gate, B K)
    _class_head(_on(case, DEVICE), normalize_rows, **hyper)
    inside, outside = _on(case, DEVICE), _on(case, DEVICE)
    with _sync_is_an_error(f"class_head_update_ (normalize_rows={normalize_rows})"):
        _class_head(inside, normalize_rows, **hyper)
    _class_head(outside, normalize_rows, **hyper)
    torch.cuda.synchronize()
    for key in ("w", "pw", "b", "pb"):
        assert_close_scaled(inside[key], outside[key], outside[key].abs() + 1e-6, 1e-6,
                            f"class head {key}: under the sync check vs without it")
    assert not torch.equal(inside["w"], case["w"].to(DEVICE)), "the class-head step did nothing"


# --------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", OPT_MODES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_optimizer_step(backend, mode):
    """One captured ``KalmanNGD.step`` replayed on new batches (copied into the captured
    input tensors) equals eager steps of the reference backend on the same batches."""
    _need(backend)
    net = _net()
    start, twin = copy.deepcopy(net), copy.deepcopy(net)
    opt = _optimizer(net, backend, mode)
    ref = _optimizer(twin, "reference", mode)
    batches = _batches(6)
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    closure = _closure(opt, net, static_x, static_y, mode)
    warmup, replays = batches[:2], batches[2:]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up outside the capture, as CUDA graphs require
        for x, y in warmup:
            static_x.copy_(x)
            static_y.copy_(y)
            opt.step(closure)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            opt.step(closure)
    except RuntimeError as exc:
        pytest.fail(f"capturing KalmanNGD.step(backend={backend!r}, {mode} mode) in a CUDA "
                    f"graph failed: {exc}\nA step may issue no synchronising call and no "
                    f"host read of a device value (see test_sync_free_optimizer_step).")
    for x, y in replays:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for x, y in batches:
        ref.step(_closure(ref, twin, x, y, mode))
    # the capture itself ran nothing: warm-up steps plus one step per replay
    assert opt.steps_taken == len(batches), (opt.steps_taken, len(batches))
    assert ref.steps_taken == len(batches)
    _assert_moved(net, start, f"{backend} {mode}")
    _assert_nets_close(net, twin, f"CUDA graph {backend} {mode} vs reference")


# --------------------------------------------------------------------------------------
# grouped Kronecker observations, class head
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["kalman", "information"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kron_grouped_update_matches_float64_reference(backend, rule):
    """ops.kalman_update_ with a Kronecker block of B samples x K outputs each (the
    sample-grouped form) and a dense block, float32 on the GPU, against the reference
    backend in float64 on the CPU."""
    _need(backend)
    b, k, d_in, d_out = 16, 5, 96, 40
    m = b * k
    w = torch.randn(d_out, d_in, dtype=F64)
    wc = (0.05 + torch.rand(d_out, d_in, dtype=F64)) * 1e-2
    a = torch.randn(b, d_in, dtype=F64)
    d = torch.randn(b, k, d_out, dtype=F64)
    bias = torch.randn(d_out, dtype=F64)
    bc = (0.05 + torch.rand(d_out, dtype=F64)) * 1e-2
    jac = torch.randn(m, d_out, dtype=F64)
    res = torch.randn(m, dtype=F64)
    hyper = dict(lr=0.8, forgetting=0.95, process_noise=1e-4, cov_update=rule)

    want = [t.clone() for t in (w, wc, bias, bc)]
    info_ref = ops.kalman_update_([ops.KronBlock(want[0], want[1], a, d),
                                   ops.DenseBlock(want[2], want[3], jac)], res, 0.5,
                                  backend="reference", **hyper)
    got = [t.float().to(DEVICE) for t in (w, wc, bias, bc)]
    info = ops.kalman_update_([ops.KronBlock(got[0], got[1], a.float().to(DEVICE),
                                             d.float().to(DEVICE)),
                               ops.DenseBlock(got[2], got[3], jac.float().to(DEVICE))],
                              res.float().to(DEVICE), 0.5, backend=backend, **hyper)
    torch.cuda.synchronize()
    assert not bool(info.skipped_tensor) and not bool(info_ref.skipped_tensor)
    assert_close_scaled(info.innovation_cov, info_ref.innovation_cov,
                        _s_scale(info_ref.innovation_cov), 1e-4, f"{backend} {rule}: S")
    for name, x, x_ref, x0 in zip(("weight", "weight cov", "bias", "bias cov"), got, want,
                                  (w, wc, bias, bc)):
        # the start values as the GPU saw them (rounded to float32)
        _assert_state_close(x, x_ref, x0.float(), 1e-4, 1e-5, f"{backend} {rule}: {name}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kron_tracked_step_matches_reference(backend):
    """A tracked KalmanNGD (every nn.Linear a sample-grouped Kronecker block, K = 5 outputs
    per sample) against the same optimizer on the reference backend."""
    _need(backend)
    net = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 5)).to(DEVICE)
    start, twin = copy.deepcopy(net), copy.deepcopy(net)
    opt = kk.KalmanNGD(net.parameters(), init_cov=1e-2, obs_noise=0.3, backend=backend)
    ref = kk.KalmanNGD(twin.parameters(), init_cov=1e-2, obs_noise=0.3, backend="reference")
    opt.track(net)
    ref.track(twin)
    for _ in range(3):
        x, y = torch.randn(16, 32, device=DEVICE), torch.randn(16, 5, device=DEVICE)
        opt.step(lambda: (net(x), y))
        ref.step(lambda: (twin(x), y))
    torch.cuda.synchronize()
    _assert_moved(net, start, f"tracked {backend}")
    _assert_nets_close(net, twin, f"tracked Kronecker {backend} vs reference")


def _dense_class_head_reference(c, normalize_rows, **hyper):
    """The class-head step as a dense Kalman update over the whole head, float64, CPU: the
    Jacobian of the flattened scores by autograd, the reference backend."""
    w, pw = c["w"].to(F64).clone(), c["pw"].to(F64).clone()
    bias, pb = c["b"].to(F64).clone(), c["pb"].to(F64).clone()
    a, e = c["a"].to(F64), c["e"].to(F64)

    def scores(ww, bb):
        rows = ww / ww.norm(dim=1, keepdim=True) if normalize_rows else ww
        return (a @ rows.T + bb).reshape(-1)

    jw = torch.autograd.functional.jacobian(lambda ww: scores(ww, bias), w)
    jb = torch.autograd.functional.jacobian(lambda bb: scores(w, bb), bias)
    ops.kalman_update_([ops.DenseBlock(w, pw, jw), ops.DenseBlock(bias, pb, jb)],
                       e.reshape(-1), 0.2, backend="reference", **hyper)
    return dict(w=w, pw=pw, b=bias, pb=pb)


@pytest.mark.parametrize("rule", ["kalman", "information"])
@pytest.mark.parametrize("normalize_rows", [False, True], ids=["plain", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_class_head_matches_reference(dtype, normalize_rows, rule):
    case = _head_case(dtype=dtype)
    hyper = dict(lr=0.9, forgetting=0.97, process_noise=1e-4, cov_update=rule)
    want = _dense_class_head_reference(case, normalize_rows, **hyper)
    got = _on(case, DEVICE)
    _class_head(got, normalize_rows, **hyper)
    torch.cuda.synchronize()
    step_tol, value_tol = (1e-10, 1e-10) if dtype == F64 else (1e-4, 1e-5)
    for key in ("w", "pw", "b", "pb"):
        _assert_state_close(got[key], want[key], case[key], step_tol, value_tol,
                            f"class head {key} ({dtype}, {rule})")


# --------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) on CUDA tensors
# --------------------------------------------------------------------------------------
def _functional_step(backend: str, kind: str):
    def step(w, wc, bias, bc, a, d, jac, res):
        if kind == "kalman_update_":
            info = ops.kalman_update_([ops.KronBlock(w, wc, a, d), ops.DenseBlock(bias, bc, jac)],
                                      res, 0.2, lr=0.8, forgetting=0.95, process_noise=1e-3,
                                      cov_floor=1e-6, cov_ceiling=10.0, gate=0.99,
                                      backend=backend)
        else:
            loss = (res * res).sum()
            grads = [a[:1].expand_as(w).contiguous(), jac[0].contiguous()]
            info = ops.loss_update_([w, bias], grads, [wc, bc], loss, 0.5, lr=0.7,
                                    forgetting=0.9, gate=0.9, backend=backend)
        return info.innovation_cov, info.skipped_tensor
    return step


@pytest.mark.parametrize("kind", ["kalman_update_", "loss_update_"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fullgraph_compile_public_step_on_cuda(backend, kind):
    _need(backend)
    b, k, d_in, d_out = 4, 3, 33, 17
    cpu = dict(w=torch.randn(d_out, d_in, dtype=F64),
               wc=0.05 + torch.rand(d_out, d_in, dtype=F64),
               bias=torch.randn(d_out, dtype=F64), bc=0.05 + torch.rand(d_out, dtype=F64),
               a=torch.randn(b, d_in, dtype=F64), d=torch.randn(b, k, d_out, dtype=F64),
               jac=torch.randn(b * k, d_out, dtype=F64), res=torch.randn(b * k, dtype=F64))
    want = {key: v.clone() for key, v in cpu.items()}
    s_ref, skipped_ref = _functional_step("reference", kind)(**want)
    eager = {key: v.float().to(DEVICE) for key, v in cpu.items()}
    compiled = {key: v.float().to(DEVICE) for key, v in cpu.items()}
    s_eager, _ = _functional_step(backend, kind)(**eager)
    torch._dynamo.reset()
    step = torch.compile(_functional_step(backend, kind), fullgraph=True)
    s_comp, skipped = step(**compiled)
    torch.cuda.synchronize()
    assert not bool(skipped_ref), "the reference skipped the step: the case is broken"
    assert not bool(skipped), f"{backend} {kind}: the compiled step was skipped"
    assert_close_scaled(s_comp, s_eager, _s_scale(s_eager), 1e-5, f"{kind}: S compiled vs eager")
    assert_close_scaled(s_comp, s_ref, _s_scale(s_ref), 1e-4, f"{kind}: S vs reference")
    for key in ("w", "wc", "bias", "bc"):
        _assert_state_close(compiled[key], eager[key], cpu[key].float(), 1e-5, 1e-6,
                            f"{backend} {kind}: {key} compiled vs eager")
        _assert_state_close(compiled[key], want[key], cpu[key].float(), 1e-4, 1e-5,
                            f"{backend} {kind}: {key} compiled vs float64 reference")
    assert not torch.equal(compiled["w"].cpu().double(), cpu["w"]), "the step did nothing"
