"""The ``triton`` backend beyond the shared per-op tests (tests/test_op_*.py):

* availability and errors: ``kk.backends()`` / ``kk.backend_errors()``, ``backend="auto"``
  never picks Triton on CPU tensors, a clear error without a GPU or without triton;
* the ops under torch.library: ``opcheck`` and ``torch.compile(fullgraph=True)``;
* kernel paths the shared tests do not reach at interpreter sizes (several S tiles, pair
  loops over several blocks, dot paths, mixed-dtype and unaligned tensor lists);
* the per-element math mirrors ``csrc/kk_math.h``;
* every kernel compiles for a Hopper GPU (Triton's compiler and ptxas, no GPU needed);
* ``KalmanNGD(backend="triton")`` end to end against ``backend="reference"``.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so sizes stay small.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kalman_kernels as kk
import kalman_kernels.reference as ref
from kalman_kernels.backends import _load, library, resolve
from op_checks import (
    F64,
    assert_close_scaled,
    assert_sym_close,
    bits,
    false_,
    filter_terms,
    kron_jacobian,
    op_cases,
    rand_cov,
    randn,
    true_,
)

ROOT = Path(__file__).resolve().parents[1]
GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
DEVICE = "cuda" if GPU else "cpu"

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with the CUDA builds of torch
    HAVE_TRITON = False

needs_backend = pytest.mark.skipif(not HAVE_TRITON or not (GPU or INTERPRET),
                                   reason="the triton backend needs triton and a GPU or "
                                          "TRITON_INTERPRET=1")


def _be():
    module, reason = _load("triton")
    assert module is not None, reason
    return module


def _ops():
    return getattr(torch.ops, _be().NAMESPACE)


def _run(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=300)


# ------------------------------------------------------------------ availability, errors
@needs_backend
def test_available_wherever_triton_runs():
    assert kk.backends()["triton"] is True
    assert "triton" not in kk.backend_errors()
    be = _be()
    assert be.NAME == "triton" and "cuda" in be.DEVICES


@needs_backend
def test_auto_picks_triton_only_for_cuda_without_the_cuda_build():
    """backend="auto" is the kalman_kernels ops on every device (docs/design.md, 4.4):
    Triton runs there only on CUDA tensors and only where the cuda extension is not built
    (its kernels then hold the ops' CUDA key); otherwise only when named."""
    cuda_ext = sys.modules.get("kalman_kernels._cuda") is not None
    for device in ("cpu", "meta"):
        assert resolve("auto", torch.device(device)).NAME != "triton"
    assert (resolve("auto", torch.device("cuda")).NAME == "triton") == (not cuda_ext)
    if INTERPRET:
        # named, it serves CPU tensors (the interpreter is a test tool)
        assert "cpu" in _be().DEVICES
        assert resolve("triton", torch.device("cpu")).NAME == "triton"


def test_cpu_without_interpreter_is_a_clear_error():
    """Outside the interpreter, CPU tensors are refused with the backend's name and the
    reason: the registry's error without a GPU, the op's own error with one."""
    code = """
import torch, kalman_kernels as kk
from kalman_kernels.backends import resolve
print("AVAILABLE", kk.backends()["triton"])
print("ERROR", kk.backend_errors().get("triton"))
try:
    resolve("triton", torch.device("cpu"))
    print("RESOLVED")
except RuntimeError as exc:
    print("RAISED", exc)
if kk.backends()["triton"]:
    from kalman_kernels.backends import triton_backend as tb
    try:
        tb.innovation_cov_dense(torch.ones(2, 3), torch.ones(3))
        print("RAN")
    except RuntimeError as exc:
        print("OPRAISED", exc)
"""
    out = _run(code, {"TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "RAISED" in text and "RESOLVED" not in text, text
    raised = text.split("RAISED", 1)[1]
    assert "triton" in raised
    if not GPU and HAVE_TRITON:
        # available wherever triton imports, but it serves no device here
        assert "AVAILABLE True" in text
        assert "does not run on cpu tensors" in raised
        assert "TRITON_INTERPRET" in raised and "To get it" in raised
    if GPU:
        assert "AVAILABLE True" in text and "does not run on cpu tensors" in raised
        assert "OPRAISED" in text and "TRITON_INTERPRET" in text.split("OPRAISED", 1)[1]


def test_without_triton_installed_is_a_clear_error():
    code = """
import sys
sys.modules["triton"] = None          # import triton now raises ImportError
import torch, kalman_kernels as kk
from kalman_kernels.backends import resolve
print("AVAILABLE", kk.backends()["triton"])
print("ERROR", kk.backend_errors()["triton"])
try:
    resolve("triton", torch.device("cuda"))
except RuntimeError as exc:
    print("RAISED", exc)
"""
    out = _run(code, {"TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    assert "AVAILABLE False" in out.stdout
    error = out.stdout.split("ERROR", 1)[1]
    assert "triton is not installed" in error and "pip install triton" in error
    raised = out.stdout.split("RAISED", 1)[1]
    assert "backend='triton' is not available" in raised and "triton is not installed" in raised


@needs_backend
def test_ops_reject_bad_inputs_by_name():
    ops = _ops()
    jac = torch.randn(3, 10, device=DEVICE)
    cov = torch.rand(10, device=DEVICE)
    with pytest.raises(RuntimeError, match="jac must be"):
        ops.innovation_cov_dense(jac, torch.rand(9, device=DEVICE), 1.0, 0.0)
    with pytest.raises(RuntimeError, match="ok must be a 0-d bool"):
        ops.fused_update_dense_(torch.zeros(10, device=DEVICE), cov.clone(), jac,
                                torch.zeros(3, dtype=F64, device=DEVICE),
                                torch.eye(3, dtype=F64, device=DEVICE),
                                torch.ones((), device=DEVICE), 1.0, 0.0, 0.0, 1.0, False)
    with pytest.raises(RuntimeError, match="cov must be float32 or float64"):
        ops.innovation_cov_dense(jac, cov.to(torch.float16), 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"covs\[0\] is updated in place"):
        _be().loss_step_([torch.zeros(4, device=DEVICE)], [torch.ones(4, device=DEVICE)],
                         [torch.ones(8, device=DEVICE)[::2]], 1.0, 1.0, true_(DEVICE),
                         1.0, 0.0, 0.0, 1.0, False)


# ------------------------------------------------------------------ torch.library
@needs_backend
@pytest.mark.parametrize("name", library.ENTRY_POINTS)
def test_opcheck(name):
    torch.library.opcheck(getattr(_ops(), name).default, op_cases(DEVICE)[name])


def _functional_step(be, param, cov, jac, residual, r, forgetting, process_noise):
    """A sync-free dense step made of backend ops and float64 torch (the shape of the ops
    layer's step): S, Cholesky, whitening, then the fused update under the device ok."""
    s = be.innovation_cov_dense(jac, cov, forgetting, process_noise)
    s = s + r * torch.eye(s.shape[0], dtype=F64, device=s.device)
    factor, info = torch.linalg.cholesky_ex(s)
    ok = (info == 0) & torch.isfinite(s).all()
    eye = torch.eye(s.shape[0], dtype=F64, device=s.device)
    white = torch.linalg.solve_triangular(factor, eye, upper=False)
    coef = white.T @ (white @ residual.to(F64))
    be.fused_update_dense_(param, cov, jac, coef, white, ok, forgetting, process_noise,
                           1e-6, 10.0, False)
    return s


@needs_backend
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(compiler):
    be = _be()
    m, n = 4, 301
    jac = randn((m, n), torch.float32).to(DEVICE)
    residual = randn(m, F64).to(DEVICE)
    p0, c0 = randn(n, torch.float32).to(DEVICE), rand_cov(n, torch.float32).to(DEVICE)
    p1, c1 = p0.clone(), c0.clone()
    s_eager = _functional_step(be, p1, c1, jac, residual, 0.1, 0.9, 0.01)
    torch._dynamo.reset()
    step = torch.compile(_functional_step, fullgraph=True, backend=compiler)
    p2, c2 = p0.clone(), c0.clone()
    s_comp = step(be, p2, c2, jac, residual, 0.1, 0.9, 0.01)
    assert torch.allclose(s_comp, s_eager, rtol=1e-12, atol=0)
    assert torch.allclose(p2, p1, rtol=1e-6, atol=1e-7) and not torch.equal(p2, p0)
    assert torch.allclose(c2, c1, rtol=1e-6, atol=1e-9) and not torch.equal(c2, c0)


@needs_backend
def test_fullgraph_compile_loss_step():
    be = _be()
    shapes = [(7,), (5, 9)]
    params0 = [randn(s, torch.float32).to(DEVICE) for s in shapes]
    grads = [randn(s, torch.float32, 0.1).to(DEVICE) for s in shapes]
    covs0 = [rand_cov(s, torch.float32).to(DEVICE) for s in shapes]

    def step(params, covs):
        quad = be.loss_quad_form(grads, covs, 1.0, 0.0)
        s = quad + 0.5
        coef = -0.3 / s
        ok = torch.isfinite(s)
        be.loss_step_(params, grads, covs, coef, 1.0 / s, ok, 1.0, 0.0, 0.0, 10.0, False)
        return s

    pe, ce = [p.clone() for p in params0], [c.clone() for c in covs0]
    s_eager = step(pe, ce)
    torch._dynamo.reset()
    pc, cc = [p.clone() for p in params0], [c.clone() for c in covs0]
    s_comp = torch.compile(step, fullgraph=True, backend="aot_eager")(pc, cc)
    assert torch.allclose(s_comp, s_eager, rtol=1e-12)
    for a, b, a0 in zip(pc + cc, pe + ce, params0 + covs0):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8) and not torch.equal(a, a0)


# ------------------------------------------------------------------ kernel paths
@needs_backend
@pytest.mark.parametrize("m,n", [(130, 41), (16, 300), (9, 77)])
def test_dense_dot_paths_and_tiles(m, n):
    """m >= 9 takes tl.dot; m > 128 several S tiles and row blocks of the update."""
    be = _be()
    jac = randn((m, n), torch.float32)
    cov = rand_cov(n, torch.float32)
    got = be.innovation_cov_dense(jac.to(DEVICE), cov.to(DEVICE), 0.9, 0.01)
    expected = ref.innovation_cov_dense(jac, cov, 0.9, 0.01)
    assert_sym_close(got, expected, 1e-4, f"S m={m}")
    coef, white = filter_terms(expected, False)
    param0 = randn(n, torch.float32)
    param, c = param0.clone().to(DEVICE), cov.clone().to(DEVICE)
    be.fused_update_dense_(param, c, jac.to(DEVICE), coef.to(DEVICE), white.to(DEVICE),
                           true_(DEVICE), 0.9, 0.01, 0.0, float("inf"), False)
    p_exp, c_exp = param0.clone().to(F64), cov.clone().to(F64)
    ref.fused_update_dense_(p_exp, c_exp, jac, coef, white, true_(), 0.9, 0.01, 0.0,
                            float("inf"), False)
    h = jac.to(F64)
    p_pred = ref.predict_cov(cov.to(F64), 0.9, 0.01)
    afh = white.abs() @ h.abs()
    assert_close_scaled(param, p_exp, param0.to(F64).abs() + p_pred * (coef.abs() @ h.abs()),
                        1e-5, f"param m={m}")
    assert_close_scaled(c, c_exp, p_pred + p_pred ** 2 * (afh * afh).sum(0), 1e-5, f"cov m={m}")
    u, d = be.step_terms_dense(jac.to(DEVICE), coef.to(DEVICE), white.to(DEVICE))
    u_exp, d_exp = ref.step_terms_dense(jac, coef, white)
    assert_close_scaled(u, u_exp, coef.abs() @ h.abs(), 1e-4, f"u m={m}")
    assert_close_scaled(d, d_exp, (afh * afh).sum(0), 1e-4, f"d m={m}")


@needs_backend
@pytest.mark.parametrize("shape", [(20, 1, 3, 70), (3, 20, 4, 5), (12, 2, 9, 33)],
                         ids=lambda s: "B{}K{}o{}i{}".format(*s))
@pytest.mark.parametrize("information", [False, True], ids=["kalman", "information"])
def test_kron_many_pairs_and_classes(shape, information):
    """More sample pairs than one pair block (B = 20: 210 pairs), K > 8 (the dot path of
    the per-pair kernels); against the float64 reference on the explicit Jacobian."""
    be = _be()
    b, k, d_out, d_in = shape
    a, d = randn((b, d_in), torch.float32), randn((b, k, d_out), torch.float32)
    cov0 = rand_cov((d_out, d_in), torch.float32)
    jac = kron_jacobian(a, d)
    expected_s = ref.innovation_cov_dense(jac, cov0, 0.95, 0.0)
    got = be.innovation_cov_kron(a.to(DEVICE), d.to(DEVICE), cov0.to(DEVICE), 0.95, 0.0)
    assert_sym_close(got, expected_s, 1e-4, f"S kron {shape}")
    coef, white = filter_terms(expected_s, information)
    w0 = randn((d_out, d_in), torch.float32)
    w, c = w0.clone().to(DEVICE), cov0.clone().to(DEVICE)
    be.fused_update_kron_(w, c, a.to(DEVICE), d.to(DEVICE), coef.to(DEVICE), white.to(DEVICE),
                          true_(DEVICE), 0.95, 0.0, 0.0, float("inf"), information)
    h = jac.to(F64)
    p_pred = cov0.reshape(-1).to(F64) / 0.95
    fh = white @ h
    diag = (fh * fh).sum(0)
    afh = white.abs() @ h.abs()
    exp_w = w0.reshape(-1).to(F64) + p_pred * (coef @ h)
    exp_c = ref.cov_update(p_pred, diag, 0.0, float("inf"), information)
    assert_close_scaled(w, exp_w, w0.reshape(-1).to(F64).abs() + p_pred * (coef.abs() @ h.abs()),
                        1e-5, f"kron weight {shape}")
    c_scale = torch.maximum(p_pred + p_pred ** 2 * (afh * afh).sum(0), exp_c.abs()) \
        if not information else torch.maximum(exp_c.abs(), exp_c ** 2 * (afh * afh).sum(0))
    assert_close_scaled(c, exp_c, c_scale, 1e-5, f"kron cov {shape}")


@needs_backend
def test_loss_step_mixed_dtypes_unaligned_and_cached_table():
    """One call with float32 and bfloat16 parameters (two launches, one per dtype group),
    an unaligned view (no vector hints), a strided gradient; run twice (the second call
    reuses the cached chunk table) and compared with the reference each time."""
    be = _be()
    buf = randn((1 + 1000,), torch.float32).to(DEVICE)
    params = [buf[1:], randn((33, 7), torch.bfloat16).to(DEVICE), randn((70001,) if not INTERPRET
                                                                        else (4099,),
                                                                        torch.float32).to(DEVICE)]
    assert params[0].data_ptr() % 16 != 0
    grads = [randn((1000,), torch.float32, 0.1).to(DEVICE),
             randn((7, 33), torch.bfloat16, 0.1).to(DEVICE).T,
             randn(params[2].shape, torch.float32, 0.1).to(DEVICE)]
    covs = [rand_cov(p.shape, torch.float32).to(DEVICE) for p in params]
    exp_p = [p.detach().cpu().to(F64) for p in params]
    exp_c = [c.detach().cpu().to(F64) for c in covs]
    for step in range(2):
        quad = be.loss_quad_form(grads, covs, 0.9, 0.01)
        expected_quad = ref.loss_quad_form([g.cpu() for g in grads], exp_c, 0.9, 0.01)
        assert abs(float(quad) - float(expected_quad)) <= 1e-4 * float(expected_quad)
        coef = torch.tensor(-0.4, dtype=F64, device=DEVICE)
        weight = 1.0 / (quad + 0.3)
        be.loss_step_(params, grads, covs, coef, weight, true_(DEVICE), 0.9, 0.01, 1e-6, 5.0,
                      step == 1)
        ref.loss_step_(exp_p, [g.cpu() for g in grads], exp_c, -0.4, float(weight), true_(),
                       0.9, 0.01, 1e-6, 5.0, step == 1)
        for i, (p, e, c, ec) in enumerate(zip(params, exp_p, covs, exp_c)):
            tol = 1e-2 if p.dtype == torch.bfloat16 else 1e-5
            assert_close_scaled(p, e.to(p.dtype), e.abs() + 1.0, tol, f"param {i} step {step}")
            assert_close_scaled(c, ec, ec.abs() + 1e-3, 1e-5, f"cov {i} step {step}")
            exp_p[i] = p.detach().cpu().to(F64)      # continue from what the kernel stored
            exp_c[i] = c.detach().cpu().to(F64)


@needs_backend
def test_loss_step_ok_false_with_mixed_groups_writes_nothing():
    be = _be()
    params = [randn((50,), torch.float32).to(DEVICE), randn((30,), torch.float16).to(DEVICE)]
    covs = [rand_cov(p.shape, torch.float32).to(DEVICE) for p in params]
    before = [bits(t.cpu()) for t in params + covs]
    nan = torch.tensor(float("nan"), dtype=F64, device=DEVICE)
    be.loss_step_(params, [torch.ones_like(p) for p in params], covs, nan, nan,
                  false_(DEVICE), 0.5, 0.1, 0.3, 0.6, True)
    assert all(torch.equal(bits(t.cpu()), b) for t, b in zip(params + covs, before))


# ------------------------------------------------------------------ kk_math mirror
def test_kk_math_mirrors_the_cpp_header():
    """Every function of csrc/kk_math.h has a Triton twin of the same name in
    kalman_kernels/triton/kk_math.py, and the math section defines nothing else."""
    header = (ROOT / "csrc" / "kk_math.h").read_text()
    cpp = set(re.findall(r"KK_INLINE\s+\w+\s+(\w+)\s*\(", header))
    cpp |= {"kk_max", "kk_min"} if "struct KkMinMax" in header else set()
    source = (ROOT / "kalman_kernels" / "triton" / "kk_math.py").read_text()
    math_part = source.split("# ---------------------------------------------------------------- "
                             "Triton-only")[0]
    py = set(re.findall(r"@triton\.jit\ndef (\w+)\(", math_part))
    assert cpp, "no functions found in csrc/kk_math.h"
    assert py == cpp, f"only in C++: {sorted(cpp - py)}; only in Triton: {sorted(py - cpp)}"


# ------------------------------------------------------------------ real GPU targets
@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_every_kernel_compiles_for_hopper():
    """Triton's compiler and ptxas (no GPU needed) accept every kernel variant the wrappers
    launch, with the first autotuning configuration, for sm_90; the tensor-list kernels
    load 128-bit vectors."""
    import importlib.util
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    tool = ROOT / "tools" / "triton_compile_check.py"
    out_json = ROOT / ".pytest_cache" / "triton_compile_check.json"
    out_json.parent.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(tool), "--quick", "--arch", "90", "--json",
                           str(out_json)], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    import json
    results = json.loads(out_json.read_text())["results"]
    kernels = {r["kernel"] for r in results}
    assert {"_innovation_dense_kernel", "_dense_update_kernel", "_dense_terms_kernel",
            "_pair_q_kernel", "_pair_s_kernel", "_pair_g_kernel", "_kron_update_kernel",
            "_kron_terms_kernel", "_quad_form_kernel", "_loss_step_kernel",
            "_apply_terms_kernel"} <= kernels
    for r in results:
        if (r["kernel"] in ("_loss_step_kernel", "_quad_form_kernel")
                and "aligned=True" in r["variant"]):
            assert r["vector_loads"], r


# ------------------------------------------------------------------ end to end
@needs_backend
@pytest.mark.parametrize("mode", ["loss", "batch"])
def test_kalman_ngd_end_to_end_matches_reference(mode):
    """A few KalmanNGD steps on backend="triton" and on backend="reference" from the same
    start give the same parameters and covariances (float32 tolerances)."""
    torch.manual_seed(0)
    x = torch.randn(16, 5)
    y = torch.randn(16, 3)

    def run(backend):
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 3).to(DEVICE)
        opt = kk.KalmanNGD(model.parameters(), init_cov=1e-2, obs_noise=0.5, backend=backend)
        xs, ys = x.to(DEVICE), y.to(DEVICE)
        for _ in range(3):
            if mode == "loss":
                # the optimizer differentiates the loss (docs/design.md, 2.2)
                def closure():
                    opt.zero_grad()
                    return ((model(xs) - ys) ** 2).mean()
            else:
                def closure():
                    return model(xs), ys
            opt.step(closure)
        return [p.detach().cpu() for p in model.parameters()], \
               [opt.covariance(p).detach().cpu() for p in model.parameters()]

    params_t, covs_t = run("triton")
    params_r, covs_r = run("reference")
    for a, b in zip(params_t + covs_t, params_r + covs_r):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


# ------------------------------------------------------------------ benchmarks/gpu.py
def test_gpu_benchmark_without_gpu_says_so_and_exits_0():
    if GPU:
        pytest.skip("this machine has a GPU: benchmarks/gpu.py measures instead")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], capture_output=True,
                         text=True, cwd=str(ROOT), timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "no GPU here" in out.stdout


@needs_backend
def test_gpu_benchmark_code_paths_run_on_the_interpreter():
    """benchmarks/gpu.py --cpu-smoke: its reference checks (which must pass) and its timing
    loop over every raw op, on tiny CPU tensors through the interpreter."""
    if not INTERPRET:
        pytest.skip("the smoke run needs TRITON_INTERPRET=1 (a GPU machine runs the real one)")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--cpu-smoke"],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"cpu smoke: \d+ checks, 0 failed", out.stdout), out.stdout[-2000:]
