"""The one op surface (kalman_kernels/backends/library.py, docs/design.md, 4.3 and 4.4):

* every op of the schema has one wrapper, with the reference function's signature, and
  every backend exposes exactly it;
* the ops' default kernel (the reference, CompositeExplicitAutograd) runs them on a dispatch
  key without a compiled kernel: in a namespace no backend registers for, and in a process
  where the C++ extension is not loaded, where ``backend="auto"`` then runs it;
* ``backend="auto"`` is the kalman_kernels ops on every device, never Triton;
* the wrapper's conversions (Python numbers for ``ok`` / ``coef`` / ``weight``,
  ``cov_ceiling=None``, (m, *shape) Jacobians, 2-D ``grad_outputs``, empty lists) give the
  canonical call's bits on every backend variant.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kalman_kernels as kk
import kalman_kernels.reference as ref
from kalman_kernels.backends import NAMES, _load, library, resolve
from op_checks import F64, bits, op_cases, rand_cov, randn, true_

ROOT = Path(__file__).resolve().parents[1]
#: a namespace with the ops and nothing but their default kernels
DEFAULT_ONLY = "kalman_kernels_default_probe"


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _copy(args):
    return tuple([t.clone() for t in a] if isinstance(a, list) else
                 (a.clone() if isinstance(a, torch.Tensor) else a) for a in args)


def _results(name, args, out):
    """What an op produced: its outputs, or its in-place arguments."""
    if out is not None:
        return list(out) if isinstance(out, tuple) else [out]
    if name == "loss_step_":
        return list(args[0]) + list(args[2])
    return [args[0], args[1]]


# ------------------------------------------------------------------ one wrapper per op
def test_every_op_has_one_wrapper_with_the_reference_signature():
    for name in library.SCHEMAS:
        ours = inspect.signature(getattr(library.Kernels(name), name))
        assert list(ours.parameters) == list(inspect.signature(getattr(ref, name)).parameters)
    for backend in NAMES:
        module, _ = _load(backend)
        if module is None or backend == "reference":
            continue
        # a compiled backend's entry points are the wrapper bound to its namespace
        assert isinstance(module.KERNELS, library.Kernels), backend
        for name in library.SCHEMAS:
            assert getattr(module, name).__func__ is getattr(library.Kernels, name), name


# ------------------------------------------------------------------ the default kernel
def test_default_kernel_runs_where_no_kernel_is_compiled():
    """In a namespace no backend registers for, every op runs its default kernel on CPU
    tensors: exactly the reference's bits (step terms rounded to the schema's dtype)."""
    surface = library.Kernels("reference", DEFAULT_ONLY)
    for name in library.SCHEMAS:
        qualified = f"{DEFAULT_ONLY}::{name}"
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified,
                                                              "CompositeExplicitAutograd")
    for name, args in op_cases().items():
        ours, theirs = _copy(args), _copy(args)
        got = _results(name, ours, getattr(surface, name)(*ours))
        want = _results(name, theirs, getattr(ref, name)(*theirs))
        for g, w in zip(got, want):
            assert g.dtype == (w.dtype if name not in ("step_terms_dense", "step_terms_kron")
                               else torch.float32), name
            assert torch.equal(bits(g), bits(w.to(g.dtype))), name


def test_default_kernel_answers_meta_tensors_with_the_fakes():
    surface = library.Kernels("reference", DEFAULT_ONLY)
    for name, args in op_cases("meta").items():
        out = getattr(surface, name)(*args)
        if name == "innovation_cov_dense":
            assert out.device.type == "meta" and out.shape == (3, 3) and out.dtype == F64


def test_checks_name_the_argument_on_every_path():
    """The default kernel and the fake run the same checks (as the C++ kernels, from
    csrc/kk_checks.h, and the Triton launchers)."""
    surface = library.Kernels("reference", DEFAULT_ONLY)
    args = op_cases()["fused_update_dense_"]
    bad_ok = args[:5] + (torch.ones(2, dtype=torch.bool),) + args[6:]
    for device in ("cpu", "meta"):
        with pytest.raises(RuntimeError, match="kalman_kernels::fused_update_dense_: ok must "
                                               "be a 0-d bool"):
            surface.fused_update_dense_(*_to(bad_ok, device))
    strided = (torch.zeros(74)[::2],) + args[1:]
    with pytest.raises(RuntimeError, match="param is updated in place and must be contiguous"):
        surface.fused_update_dense_(*strided)
    jac, cov = op_cases()["innovation_cov_dense"][:2]
    with pytest.raises(RuntimeError, match="cov must be float32 or float64"):
        surface.innovation_cov_dense(jac, cov.half())
    with pytest.raises(RuntimeError, match="forgetting must be finite and > 0"):
        surface.innovation_cov_dense(jac, cov, 0.0)


def test_auto_without_the_cpp_extension_runs_the_default_kernel():
    """A process where kalman_kernels._C cannot load: the cpp backend is unavailable and says
    why, no CPU kernel is registered, and backend="auto" runs the default kernel: the same
    bits as backend="reference" for a dense, a Kronecker and a loss step."""
    code = """
import sys
sys.modules["kalman_kernels._C"] = None          # importing the extension now fails
import torch, kalman_kernels as kk
from kalman_kernels.backends import resolve
assert not kk.backends()["cpp"] and "kalman_kernels._C" in kk.backend_errors()["cpp"]
assert not torch._C._dispatch_has_kernel_for_dispatch_key("kalman_kernels::loss_step_", "CPU")
assert resolve("auto", torch.device("cpu")).NAME == "reference"
torch.manual_seed(0)
p, c, jac = torch.randn(6), torch.rand(6) + 0.1, torch.randn(2, 6)
w, wc, a, d = torch.randn(4, 3), torch.rand(4, 3) + 0.1, torch.randn(2, 3), torch.randn(2, 4)
res = torch.randn(2, dtype=torch.float64)
ps, gs, cs = [torch.randn(5), torch.randn(2, 2)], [torch.randn(5), torch.randn(2, 2)], \\
    [torch.rand(5) + 0.1, torch.rand(2, 2) + 0.1]
states = []
for backend in ("auto", "reference"):
    state = [t.clone() for t in (p, c, w, wc)]
    blocks = [kk.ops.DenseBlock(state[0], state[1], jac), kk.ops.KronBlock(*state[2:], a, d)]
    kk.ops.kalman_update_(blocks, res, 0.5, backend=backend)
    loss_state = [[t.clone() for t in ps], [t.clone() for t in cs]]
    kk.ops.loss_update_(loss_state[0], gs, loss_state[1], torch.tensor(0.7), 0.3,
                        backend=backend)
    states.append(state + loss_state[0] + loss_state[1])
for got, want in zip(*states):
    assert torch.equal(got, want), (got, want)
assert not torch.equal(states[0][0], p)
print("DEFAULT KERNEL OK")
"""
    env = {k: v for k, v in os.environ.items() if k != "KALMAN_KERNELS_REQUIRE_CPP"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=str(ROOT), timeout=300)
    assert out.returncode == 0 and "DEFAULT KERNEL OK" in out.stdout, out.stderr


# ------------------------------------------------------------------ backend="auto"
def test_auto_is_the_kalman_kernels_ops_on_every_device():
    cpp_built = kk.backends()["cpp"]
    cpu = resolve("auto", torch.device("cpu"))
    assert cpu.namespace == library.NAMESPACE
    assert cpu.NAME == ("cpp" if cpp_built else "reference")
    if cpp_built:
        assert cpu is resolve("cpp", torch.device("cpu"))
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{library.NAMESPACE}::loss_step_", "CPU") == cpp_built
    meta = resolve("auto", torch.device("meta"))
    assert meta.NAME == "reference" and meta.namespace == library.NAMESPACE
    gpu = resolve("auto", torch.device("cuda"))
    # the cuda kernels where they are available; Triton's where the cuda extension is not
    # built (they then hold the CUDA key, next test); else the default kernel
    registry = sys.modules["kalman_kernels.backends"]    # the name is kk.backends(), a function
    assert gpu.NAME == ("cuda" if kk.backends()["cuda"] else
                        "triton" if registry._TRITON_ON_CUDA is not None else "reference")
    assert gpu.namespace == library.NAMESPACE


def test_auto_without_the_cuda_build_runs_triton_through_the_dispatcher():
    """A process where kalman_kernels._cuda cannot load but triton imports: Triton's kernels
    are registered for the CUDA key of the kalman_kernels ops, so backend="auto" on CUDA
    tensors runs Triton (not the default kernel), through the same dispatcher and wrapper;
    where the cuda extension loads, its kernels keep the key."""
    code = """
import sys
sys.modules["kalman_kernels._cuda"] = None        # importing the CUDA extension now fails
import torch, kalman_kernels as kk
from kalman_kernels.backends import library, resolve
assert not kk.backends()["cuda"] and "kalman_kernels._cuda" in kk.backend_errors()["cuda"]
names = [f"{library.NAMESPACE}::{op}" for op in library.SCHEMAS]
has = [torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA") for n in names]
if kk.backends()["triton"]:
    assert all(has), has
    gpu = resolve("auto", torch.device("cuda"))
    assert gpu.NAME == "triton" and gpu.namespace == library.NAMESPACE
    print("TRITON ON THE CUDA KEY")
else:
    assert not any(has), has
    assert resolve("auto", torch.device("cuda")).NAME == "reference"
    print("NO TRITON: DEFAULT KERNEL")
"""
    env = {k: v for k, v in os.environ.items() if k != "KALMAN_KERNELS_REQUIRE_CUDA_BUILD"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=str(ROOT), timeout=300)
    assert out.returncode == 0, out.stderr
    want = "TRITON ON THE CUDA KEY" if kk.backends()["triton"] else "NO TRITON: DEFAULT KERNEL"
    assert want in out.stdout, out.stdout


def test_a_named_backend_refuses_other_device_types():
    cpp = library.Kernels("cpp", library.NAMESPACE, ("cpu",))
    jac = torch.randn(2, 5, device="meta")
    with pytest.raises(RuntimeError, match=r"backend='cpp': innovation_cov_dense needs cpu "
                                           r"tensors, but jac is on meta"):
        cpp.innovation_cov_dense(jac, torch.rand(5, device="meta"))


# ------------------------------------------------------------------ the wrapper's conversions
def test_wrapper_conversions_give_the_canonical_bits(kb):
    if not kb.fits(1000):
        pytest.skip("interpreter sizes")
    dev = kb.device
    with kb.active() as be:
        cases = op_cases(dev)
        # (m, *shape) Jacobian and a 2-D cov, against (m, n) and a flat cov
        jac, cov = cases["innovation_cov_dense"][:2]
        s1 = be.innovation_cov_dense(jac.reshape(3, 37, 1), cov.reshape(37, 1), 0.9, 0.01)
        s2 = be.innovation_cov_dense(jac, cov, 0.9, 0.01)
        assert torch.equal(bits(s1), bits(s2))
        # 2-D grad_outputs (K = 1) against (B, 1, d_out)
        a, d, wcov = cases["innovation_cov_kron"][:3]
        d2 = d[:, 0, :].contiguous()
        assert torch.equal(bits(be.innovation_cov_kron(a, d2, wcov)),
                           bits(be.innovation_cov_kron(a, d2[:, None, :], wcov)))
        # Python bool ok, None ceiling
        args = cases["fused_update_dense_"]
        x, y = _copy(args), _copy(args)
        be.fused_update_dense_(*x[:5], True, *x[6:9], None, x[10])
        be.fused_update_dense_(*y[:9], float("inf"), y[10])
        assert torch.equal(bits(x[0]), bits(y[0])) and torch.equal(bits(x[1]), bits(y[1]))
        # Python numbers for coef / weight / ok of the loss step
        args = cases["loss_step_"]
        x, y = _copy(args), _copy(args)
        be.loss_step_(*x[:3], float(x[3]), float(x[4]), True, *x[6:])
        be.loss_step_(*y)
        for got, want in zip(x[0] + x[2], y[0] + y[2]):
            assert torch.equal(bits(got), bits(want))
        # empty tensor lists
        empty = be.loss_quad_form([], [], 0.9, 0.01)
        assert empty.dtype == F64 and empty.dim() == 0 and float(empty) == 0.0
        be.loss_step_([], [], [], -0.3, 0.7, True, 0.9, 0.01, 1e-4, 0.8, False)


# ------------------------------------------------------------------ one set of checks
def _bad_calls():
    """(what, call(entry points)) that every kernel must refuse with the same message."""
    f64, ok = torch.float64, true_()
    jac, cov = randn((3, 10), torch.float32), rand_cov(10, torch.float32)
    coef, white = torch.randn(3, dtype=f64), torch.eye(3, dtype=f64)
    hyper = (0.9, 0.0, 0.0, 1.0, False)
    a, d, wcov = randn((3, 4), torch.float32), randn((3, 2, 5), torch.float32), rand_cov(
        (5, 4), torch.float32)
    p = randn(10, torch.float32)
    yield "dense shape", lambda be: be.innovation_cov_dense(jac, cov[:9].clone())
    yield "cov dtype", lambda be: be.innovation_cov_dense(jac, cov.half())
    yield "forgetting", lambda be: be.innovation_cov_dense(jac, cov, 0.0)
    yield "cov shape", lambda be: be.innovation_cov_kron(a, d, wcov.T.contiguous())
    yield "ok", lambda be: be.fused_update_dense_(p.clone(), cov.clone(), jac, coef, white,
                                                  torch.ones(2, dtype=torch.bool), *hyper)
    yield "in place", lambda be: be.fused_update_dense_(randn(20, torch.float32)[::2], cov.clone(),
                                                        jac, coef, white, ok, *hyper)
    yield "whitening", lambda be: be.fused_update_kron_(randn((5, 4), torch.float32),
                                                        wcov.clone(), a, d,
                                                        torch.randn(6, dtype=f64),
                                                        torch.eye(5, dtype=f64), ok, *hyper)
    yield "lengths", lambda be: be.loss_quad_form([p, p], [cov])
    yield "numel", lambda be: be.loss_step_([p[:4].clone()], [p[:4].clone()], [cov[:8].clone()],
                                            0.1, 0.2, ok, *hyper)
    yield "terms numel", lambda be: be.apply_terms_(p.clone(), cov.clone(), p[:5].clone(),
                                                    cov.clone(), ok, *hyper)
    yield "kron rank", lambda be: be.step_terms_kron(d, d, torch.randn(6, dtype=f64),
                                                     torch.eye(6, dtype=f64))


def _message(call, be) -> str:
    with pytest.raises(RuntimeError) as caught:
        call(be)
    text = str(caught.value).splitlines()[0]
    # the values' spelling differs between C++ and Python ("[3, 10]" / "(3, 10)", "Half" /
    # "torch.float16"); the words up to them are the same
    return text.split(", got")[0].split(" (shape")[0]


def test_every_kernel_refuses_bad_arguments_with_the_same_words(kb):
    """csrc/kk_checks.h (cpp, cuda) and library.py's checks (fakes, default kernel, Triton)
    are one rule set: the same refusal, word for word, on every variant."""
    if kb.name == "reference":
        pytest.skip("the reference functions, called directly, check nothing")
    if kb.device != "cpu":
        pytest.skip("CPU tensors")
    python = library.Kernels("reference", DEFAULT_ONLY)
    with kb.active() as be:
        for what, call in _bad_calls():
            want = _message(call, python)
            assert want.startswith("kalman_kernels::"), (what, want)
            assert _message(call, be) == want, what
