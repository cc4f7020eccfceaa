"""cpp backend availability (docs/cpp_backend.md) and the run-time choice of instruction set.

The missing-extension cases run in a subprocess whose import system refuses
``kalman_kernels._C``, as on a machine where the build failed.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernel_backends import KernelBackend


def cpp_backend():
    return KernelBackend("cpp", "cpu").module

BLOCK_C = textwrap.dedent("""
    import importlib.abc, sys
    class _NoExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "kalman_kernels._C":
                raise ImportError("simulated: kalman_kernels._C was not built")
            return None
    sys.meta_path.insert(0, _NoExtension())
""")


def _run(code: str, **env):
    full_env = dict(os.environ)
    full_env.pop("KALMAN_KERNELS_REQUIRE_CPP", None)
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", BLOCK_C + textwrap.dedent(code)],
                          capture_output=True, text=True, env=full_env, timeout=300)


def test_missing_extension_is_reported_not_fatal():
    proc = _run("""
        import torch, kalman_kernels as kk
        assert kk.backends()["cpp"] is False, kk.backends()
        reason = kk.backend_errors()["cpp"]
        assert "kalman_kernels._C" in reason and "not built" in reason, reason
        p, g, c = torch.randn(5), torch.randn(5), torch.rand(5)
        try:
            kk.ops.loss_update_([p], [g], [c], 1.0, 0.1, backend="cpp")
        except RuntimeError as exc:
            assert "not built" in str(exc) and "pip install" in str(exc), exc
        else:
            raise AssertionError("backend='cpp' did not raise")
        kk.ops.loss_update_([p], [g], [c], 1.0, 0.1, backend="auto")   # falls back
        print("OK")
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_missing_extension_fails_import_when_required():
    proc = _run("import kalman_kernels\n", KALMAN_KERNELS_REQUIRE_CPP="1")
    assert proc.returncode != 0
    assert "KALMAN_KERNELS_REQUIRE_CPP" in proc.stderr and "not built" in proc.stderr, \
        proc.stderr[-2000:]


def test_isa_follows_torch_capability_and_can_be_overridden():
    cpp = cpp_backend()
    cap = torch.backends.cpu.get_cpu_capability().upper()
    expected = "AVX512" if cap.startswith("AVX512") else ("AVX2" if cap == "AVX2" else "DEFAULT")
    if os.environ.get("KALMAN_KERNELS_CPU_CAPABILITY"):
        pytest.skip("KALMAN_KERNELS_CPU_CAPABILITY is set in this environment")
    assert cpp.isa() == expected
    proc = subprocess.run(
        [sys.executable, "-c", "from kalman_kernels.backends import cpp_backend as c; "
                               "print(c.isa())"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, KALMAN_KERNELS_CPU_CAPABILITY="DEFAULT"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "DEFAULT"
    with pytest.raises(RuntimeError, match="no kernels compiled"):
        cpp.set_isa("SSE9")
    assert cpp.isa() == expected
