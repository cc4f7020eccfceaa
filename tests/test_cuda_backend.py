"""The cuda backend (csrc/cuda/, kalman_kernels/backends/cuda_backend.py, setup.py's CUDA build).

Without a GPU (these run in CI):
* the extension registers a CUDA kernel for every op of the schema, for the architectures
  setup.py recorded; it fails here when KALMAN_KERNELS_REQUIRE_CUDA_BUILD is set and the
  extension is missing;
* the fake implementations agree with the kernels (``torch.library.opcheck``), run on the
  CPU-emulated build of the same kernels (tests/cuda_emulation.py);
* ``backend="cuda"`` on CPU tensors raises a clear error; ``kk.backend_errors()["cuda"]``
  says why the backend is unavailable;
* the entry points compile with ``torch.compile(fullgraph=True)`` (emulated kernels);
* setup.py: the toolkit behind an nvcc wrapper script is found; a build that cannot import
  torch fails with the fix, unless a pure-Python install is asked for.

With a GPU (skipped here, with the reason): bit-identical results run to run, a CUDA-graph
capture of a loss-mode step replayed against eager, ``torch.compile(fullgraph=True)`` with
inductor, and ``KalmanNGD`` end to end against the reference backend. Every op against the
float64 reference, odd / misaligned sizes and bf16 / fp16 run through the ``kb`` fixture of
tests/test_op_*.py (variants ``cuda`` and ``cuda-emulated``).
"""
from __future__ import annotations

import inspect
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kalman_kernels as kk
import kalman_kernels.reference as ref
from kalman_kernels.backends import cuda_backend, library, resolve
from op_checks import (
    F64,
    assert_close_scaled,
    bits,
    op_cases,
    rand_cov,
    randn,
    true_,
)

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_CUDA_BUILD = os.environ.get("KALMAN_KERNELS_REQUIRE_CUDA_BUILD", "").strip().lower() in (
    "1", "true", "yes", "on")
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (torch.cuda.is_available() "
                                               "is False on this machine)")
ENTRY_POINTS = library.ENTRY_POINTS


def _require_extension():
    if cuda_backend._ext is None:
        msg = f"the CUDA extension is not built: {cuda_backend.UNAVAILABLE_REASON}"
        if REQUIRE_CUDA_BUILD:
            pytest.fail(f"KALMAN_KERNELS_REQUIRE_CUDA_BUILD is set but {msg}")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def emulated():
    import cuda_emulation
    try:
        return cuda_emulation.backend()
    except RuntimeError as exc:
        if os.environ.get("KALMAN_KERNELS_REQUIRE_CPP"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


# ======================================================================================
# No GPU needed
# ======================================================================================
def test_extension_registers_a_cuda_kernel_for_every_op():
    _require_extension()
    assert set(library.SCHEMAS) == set(ENTRY_POINTS)
    missing = [name for name in library.SCHEMAS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(
                   f"{library.NAMESPACE}::{name}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"


def test_extension_compiled_for_the_recorded_architectures():
    _require_extension()
    archs = cuda_backend.compiled_archs().split(",")
    assert archs and all(a.strip().isdigit() for a in archs), archs
    from kalman_kernels import _build_info
    note = _build_info.CUDA_BUILD
    assert note.startswith("built"), note
    if "TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX'" in note:   # setup.py's default
        assert {"800", "900"} <= {a.strip() for a in archs}, archs


def test_backend_module_follows_the_contract():
    assert cuda_backend.NAME == "cuda"
    assert cuda_backend.DEVICES == ("cuda",)
    assert cuda_backend.KERNELS.namespace == library.NAMESPACE
    for name in ENTRY_POINTS:
        ours = inspect.signature(getattr(cuda_backend, name))
        oracle = inspect.signature(getattr(ref, name))
        assert list(ours.parameters) == list(oracle.parameters), name


def test_unavailable_without_gpu_and_says_why():
    available = kk.backends()["cuda"]
    assert available == (GPU and cuda_backend._ext is not None)
    if available:
        return
    reason = kk.backend_errors()["cuda"]
    if cuda_backend._ext is None:
        assert "not built" in reason and "kalman_kernels._cuda" in reason, reason
    else:
        assert "no CUDA GPU" in reason and "torch.cuda.is_available() is False" in reason, reason
        assert cuda_backend.compiled_archs() in reason, reason


def test_cuda_on_cpu_tensors_raises_clearly():
    jac, cov = randn((2, 5), torch.float32), rand_cov(5, torch.float32)
    if not kk.backends()["cuda"]:
        with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
            resolve("cuda", torch.device("cpu"))
    else:
        with pytest.raises(RuntimeError, match="does not run on cpu tensors"):
            resolve("cuda", torch.device("cpu"))
    # the entry points themselves refuse CPU tensors (never fall through to a CPU kernel)
    with pytest.raises(RuntimeError, match=r"needs cuda tensors, but jac is on cpu"):
        cuda_backend.innovation_cov_dense(jac, cov, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"params\[0\] is on cpu"):
        cuda_backend.loss_step_([cov], [cov], [cov.clone()], 1.0, 1.0, true_(), 1.0, 0.0, 0.0,
                                float("inf"), False)


def test_public_entry_points_refuse_backend_cuda_on_cpu():
    param, cov = randn(6, torch.float32), rand_cov(6, torch.float32)
    jac = randn((2, 6), torch.float32)
    with pytest.raises(RuntimeError, match="cuda"):
        kk.ops.kalman_update_([kk.ops.DenseBlock(param, cov, jac)], torch.randn(2, dtype=F64),
                              0.1, backend="cuda")
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        kk.KalmanNGD([torch.nn.Parameter(torch.randn(3))], backend="cuda")


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_fakes_agree_with_the_kernels_opcheck(emulated, name):
    """torch.library.opcheck on the emulated CUDA kernels: the schema's mutation annotations,
    the fake implementations' shapes / dtypes / strides and the AOT-dispatch path all agree
    with what the kernels do."""
    import cuda_emulation
    op = getattr(getattr(torch.ops, cuda_emulation.NAMESPACE), name)
    torch.library.opcheck(op, op_cases()[name])


def test_entry_points_compile_fullgraph(emulated):
    """The wrappers add no graph break: a dense step and a loss step compile with
    fullgraph=True and match eager (emulated kernels, CPU tensors, aot_eager)."""
    m, n = 4, 300
    jac = randn((m, n), torch.float32)
    param0, cov0 = randn(n, torch.float32), rand_cov(n, torch.float32)
    e = torch.randn(m, dtype=F64)
    grads = [randn(s, torch.float32, scale=0.1) for s in (7, 129)]
    lparams0 = [randn(s, torch.float32) for s in (7, 129)]
    lcovs0 = [rand_cov(s, torch.float32) for s in (7, 129)]

    def dense_step(param, cov):
        s = emulated.innovation_cov_dense(jac, cov, 0.9, 0.01) + 0.1 * torch.eye(m, dtype=F64)
        factor, info = torch.linalg.cholesky_ex(s)
        coef = torch.cholesky_solve(e[:, None], factor).reshape(-1)
        white = torch.linalg.solve_triangular(factor, torch.eye(m, dtype=F64), upper=False)
        emulated.fused_update_dense_(param, cov, jac, coef, white, info == 0, 0.9, 0.01, 0.0,
                                     float("inf"), False)

    def loss_step(params, covs):
        quad = emulated.loss_quad_form(grads, covs, 1.0, 0.0)
        s = quad + 0.5
        emulated.loss_step_(params, grads, covs, -0.2 / s, 1.0 / s, torch.isfinite(s), 1.0, 0.0,
                            0.0, float("inf"), False)

    for fn, make in ((dense_step, lambda: (param0.clone(), cov0.clone())),
                     (loss_step, lambda: ([p.clone() for p in lparams0],
                                          [c.clone() for c in lcovs0]))):
        eager_args, compiled_args = make(), make()
        fn(*eager_args)
        torch.compile(fn, fullgraph=True, backend="aot_eager")(*compiled_args)
        for x, y in zip(eager_args, compiled_args):
            for a, b in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
                assert torch.equal(bits(a), bits(b)), fn.__name__


# ---------------------------------------------------------------------------- setup.py
@pytest.fixture(scope="module")
def setup_module_ns():
    return runpy.run_path(str(ROOT / "setup.py"), run_name="kk_setup_under_test")


def test_setup_finds_the_toolkit_behind_an_nvcc_wrapper(setup_module_ns, tmp_path):
    ns = setup_module_ns
    root, how = ns["_find_cuda_toolkit"]()
    if root is None:
        pytest.skip(f"no CUDA toolkit on this machine ({how})")
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f"#!/bin/sh\nexec {root}/bin/nvcc \"$@\"\n")
    wrapper.chmod(0o755)
    # the naive guess (the folder above the wrapper, as torch makes it) is no toolkit ...
    assert not ns["_is_toolkit"](str(tmp_path))
    # ... the one the wrapper execs into is found
    assert os.path.realpath(ns["_toolkit_behind"](str(wrapper))) == os.path.realpath(root)


def test_setup_cuda_decision_explains(setup_module_ns, monkeypatch):
    decide = setup_module_ns["_cuda_decision"]
    monkeypatch.setitem(decide.__globals__, "BUILD_CUDA", "0")
    assert decide(torch)[0] is False
    monkeypatch.setitem(decide.__globals__, "BUILD_CUDA", "")

    class CpuTorch:
        __version__ = "9.9.9+cpu"

        class version:
            cuda = None

    build, _, why = decide(CpuTorch)
    assert build is False and "CPU-only build" in why


def _copy_for_build(dst: Path) -> Path:
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "kalman_kernels", dst / "kalman_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_build_info.py"))
    return dst


def _run_setup_without_torch(tmp_path: Path, args, **env_extra):
    """Run setup.py in a copy of the project with `import torch` failing (as in pip's
    isolated build environment)."""
    block = tmp_path / "block"
    block.mkdir()
    # None in sys.modules is what an absent module looks like to both `import torch`
    # (ModuleNotFoundError) and importlib.util.find_spec("torch") (None), which setuptools
    # plugins of other installed packages ask (a finder that raises would break them)
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    src = tmp_path / "src"
    src.mkdir()
    _copy_for_build(src)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALMAN_KERNELS_")}
    env.update(PYTHONPATH=str(block), **env_extra)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300)


def test_build_without_torch_fails_and_names_the_fix(tmp_path):
    out = _run_setup_without_torch(tmp_path, ["bdist_wheel", "-d", str(tmp_path / "dist")])
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "--no-build-isolation" in text and "KALMAN_KERNELS_PURE_PYTHON=1" in text, text


def test_build_without_torch_require_cpp_names_the_fix(tmp_path):
    out = _run_setup_without_torch(tmp_path, ["egg_info"], KALMAN_KERNELS_REQUIRE_CPP="1")
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "--no-build-isolation" in text and "KALMAN_KERNELS_REQUIRE_CPP" in text, text
    assert "Traceback" not in text, text


def test_pure_python_build_without_torch_is_allowed(tmp_path):
    out = _run_setup_without_torch(tmp_path, ["bdist_wheel", "-d", str(tmp_path / "dist")],
                                   KALMAN_KERNELS_PURE_PYTHON="1")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    wheels = list((tmp_path / "dist").glob("*.whl"))
    assert len(wheels) == 1, text
    import zipfile
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "kalman_kernels/__init__.py" in names
    assert not any(n.endswith(".so") for n in names), names


# ======================================================================================
# GPU only
# ======================================================================================
def _cuda(t):
    return t.to("cuda")


@needs_gpu
def test_gpu_results_are_bit_identical_run_to_run():
    _require_extension()
    be = cuda_backend
    jac = _cuda(randn((32, 200_003), torch.float32))
    cov = _cuda(rand_cov(200_003, torch.float32))
    a, d = _cuda(randn((16, 777), torch.float32)), _cuda(randn((16, 5, 301), torch.float32))
    wcov = _cuda(rand_cov((301, 777), torch.float32))
    grads = [_cuda(randn(s, torch.float32)) for s in (1_000_003, 17, 65_536)]
    covs = [_cuda(rand_cov(s, torch.float32)) for s in (1_000_003, 17, 65_536)]
    first = (be.innovation_cov_dense(jac, cov, 0.9, 0.01),
             be.innovation_cov_kron(a, d, wcov, 0.9, 0.01),
             be.loss_quad_form(grads, covs, 0.9, 0.01))
    for _ in range(3):
        again = (be.innovation_cov_dense(jac, cov, 0.9, 0.01),
                 be.innovation_cov_kron(a, d, wcov, 0.9, 0.01),
                 be.loss_quad_form(grads, covs, 0.9, 0.01))
        for x, y in zip(first, again):
            assert torch.equal(bits(x.cpu()), bits(y.cpu()))


def _loss_step(params, grads, covs, loss, r, lr):
    """A loss-observation step on device tensors (docs/design.md, 2.2): kernels + the scalar work,
    no host reads."""
    quad = cuda_backend.loss_quad_form(grads, covs, 0.95, 1e-4)
    s = quad + r
    e = -loss
    ok = torch.isfinite(s) & torch.isfinite(e)
    cuda_backend.loss_step_(params, grads, covs, lr * e / s, 1.0 / s, ok, 0.95, 1e-4, 1e-8,
                            float("inf"), False)


@needs_gpu
def test_gpu_graph_capture_of_a_loss_step_replays_like_eager():
    _require_extension()
    shapes = [(513, 257), (7,), (1_000_001,), (64, 3)]
    params0 = [randn(s, torch.float32) for s in shapes]
    grads = [_cuda(randn(s, torch.float32, scale=1e-2)) for s in shapes]
    covs0 = [rand_cov(s, torch.float32, lo=1e-4, hi=1e-3) for s in shapes]
    loss = torch.tensor(0.7, dtype=F64, device="cuda")
    r = torch.tensor(0.5, dtype=F64, device="cuda")
    g_params = [_cuda(p.clone()) for p in params0]
    g_covs = [_cuda(c.clone()) for c in covs0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):     # warm up (allocations, lazy init) outside the capture
        _loss_step([p.clone() for p in g_params], grads, [c.clone() for c in g_covs], loss, r,
                   0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _loss_step(g_params, grads, g_covs, loss, r, 0.5)
    for p, p0, c, c0 in zip(g_params, params0, g_covs, covs0):   # capture ran nothing
        p.copy_(_cuda(p0))
        c.copy_(_cuda(c0))
    e_params = [_cuda(p.clone()) for p in params0]
    e_covs = [_cuda(c.clone()) for c in covs0]
    for step in range(3):
        loss.fill_(0.7 + 0.1 * step)
        graph.replay()
        _loss_step(e_params, grads, e_covs, loss, r, 0.5)
        torch.cuda.synchronize()
        for a, b in zip(g_params + g_covs, e_params + e_covs):
            assert torch.equal(bits(a.cpu()), bits(b.cpu())), f"replay {step} differs from eager"
    before = [t.clone() for t in g_params + g_covs]
    loss.fill_(float("nan"))          # the device-side skip predicate inside the graph
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(g_params + g_covs, before):
        assert torch.equal(bits(a.cpu()), bits(b.cpu())), "a NaN loss changed the state"


@needs_gpu
def test_gpu_steps_compile_fullgraph_with_inductor():
    _require_extension()
    m, n = 8, 10_007
    jac = _cuda(randn((m, n), torch.float32))
    param0, cov0 = randn(n, torch.float32), rand_cov(n, torch.float32)
    e = _cuda(torch.randn(m, dtype=F64))
    a, d = _cuda(randn((4, 33), torch.float32)), _cuda(randn((4, 3, 17), torch.float32))
    w0, wc0 = randn((17, 33), torch.float32), rand_cov((17, 33), torch.float32)

    def step(param, cov, w, wc):
        s = cuda_backend.innovation_cov_dense(jac, cov, 0.9, 0.01)
        s = s + 0.1 * torch.eye(m, dtype=F64, device=s.device)
        factor, info = torch.linalg.cholesky_ex(s)
        coef = torch.cholesky_solve(e[:, None], factor).reshape(-1)
        white = torch.linalg.solve_triangular(factor, torch.eye(m, dtype=F64, device=s.device),
                                              upper=False)
        cuda_backend.fused_update_dense_(param, cov, jac, coef, white, info == 0, 0.9, 0.01, 0.0,
                                         float("inf"), False)
        sk = cuda_backend.innovation_cov_kron(a, d, wc, 1.0, 0.0)
        sk = sk + torch.eye(sk.shape[0], dtype=F64, device=sk.device)
        fk, infok = torch.linalg.cholesky_ex(sk)
        ek = torch.ones(sk.shape[0], 1, dtype=F64, device=sk.device)
        ck = torch.cholesky_solve(ek, fk).reshape(-1)
        wk = torch.linalg.solve_triangular(fk, torch.eye(sk.shape[0], dtype=F64, device=sk.device),
                                           upper=False)
        cuda_backend.fused_update_kron_(w, wc, a, d, ck, wk, infok == 0, 1.0, 0.0, 0.0,
                                        float("inf"), False)

    make = lambda: [_cuda(t.clone()) for t in (param0, cov0, w0, wc0)]  # noqa: E731
    eager, compiled = make(), make()
    step(*eager)
    torch.compile(step, fullgraph=True)(*compiled)
    for x, y in zip(eager, compiled):
        assert_close_scaled(y, x, x.abs() + 1e-6, 1e-5, "compiled vs eager")


@needs_gpu
@pytest.mark.parametrize("mode", ["loss", "batch-dense", "batch-kron"])
def test_gpu_kalman_ngd_end_to_end_matches_reference(mode):
    _require_extension()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))

    def model_and_opt(backend):
        torch.manual_seed(1234)
        net = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Tanh(),
                                  torch.nn.Linear(16, 3)).cuda()
        opt = kk.KalmanNGD(net.parameters(), init_cov=1e-2, obs_noise=0.3, backend=backend)
        if mode == "batch-kron":
            opt.track(net)
        return net, opt

    x = torch.randn(12, 20, device="cuda")
    y = torch.randn(12, 3, device="cuda")
    nets = {}
    for backend in ("reference", "cuda"):
        net, opt = model_and_opt(backend)
        for _ in range(4):
            if mode == "loss":
                def closure():
                    opt.zero_grad()
                    loss = torch.nn.functional.mse_loss(net(x), y)
                    loss.backward()
                    return loss.detach()
            else:
                def closure():
                    return net(x), y
            opt.step(closure)
        nets[backend] = net
    for (name, p_ref), p_cuda in zip(nets["reference"].named_parameters(),
                                     nets["cuda"].parameters()):
        assert_close_scaled(p_cuda, p_ref, p_ref.abs() + 1e-3, 1e-4, f"{mode} {name}")


@needs_gpu
def test_gpu_public_loss_step_captures_in_a_cuda_graph():
    """A loss-mode optimizer step (public API) captured in a CUDA graph and replayed equals
    eager steps (needs the sync-free ops layer: no host reads inside a step)."""
    _require_extension()

    def build():
        torch.manual_seed(7)
        net = torch.nn.Linear(64, 1).cuda()
        return net, kk.KalmanNGD(net.parameters(), init_cov=1e-3, obs_noise=1.0, backend="cuda")

    x = torch.randn(32, 64, device="cuda")
    y = torch.randn(32, 1, device="cuda")
    eager_net, eager_opt = build()
    graph_net, graph_opt = build()

    def closure_for(net, opt):
        def closure():
            opt.zero_grad(set_to_none=False)
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            return loss.detach()
        return closure

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):       # warm-up steps (also applied to the eager twin below)
            graph_opt.step(closure_for(graph_net, graph_opt))
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        eager_opt.step(closure_for(eager_net, eager_opt))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step(closure_for(graph_net, graph_opt))
    for _ in range(3):          # the capture itself ran nothing: both twins are at step 2
        graph.replay()
        eager_opt.step(closure_for(eager_net, eager_opt))
    torch.cuda.synchronize()
    for p_graph, p_eager in zip(graph_net.parameters(), eager_net.parameters()):
        assert_close_scaled(p_graph, p_eager, p_eager.abs() + 1e-6, 1e-6, "graph vs eager")
