import os

# The Triton backend's kernels run on CPU tensors through Triton's interpreter when no CUDA
# GPU is present. TRITON_INTERPRET must be set before anything imports triton (torch does
# not import it by itself); an explicit setting is kept.
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# Tests never touch the network (open_clip / huggingface would otherwise try to).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

# Hypothesis profiles (tests/test_property.py): "kalman" (default, a few hundred examples
# in the normal run) and "long" (thousands: pytest --hypothesis-profile=long).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
else:
    _slow_ok = dict(deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("kalman", max_examples=150, **_slow_ok)
    settings.register_profile("long", max_examples=3000, **_slow_ok)
    settings.load_profile(os.environ.get("KALMAN_HYPOTHESIS_PROFILE", "kalman"))


def rel_err(actual, expected) -> float:
    """max |a - b| / max |b| in float64 (NaN anywhere -> inf, so NaN never passes)."""
    def as_tensor(x):
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))

    a, b = as_tensor(actual), as_tensor(expected)
    a = a.detach().double().reshape(-1).cpu()
    b = b.detach().double().reshape(-1).cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-300)


@pytest.fixture
def rng():
    """A fresh, unseeded generator every run (inputs differ from run to run)."""
    return np.random.default_rng()


from kernel_backends import params as _kernel_backend_params  # noqa: E402


@pytest.fixture(params=_kernel_backend_params())
def kb(request):
    """One kernel backend variant (tests/kernel_backends.py); skips when unavailable."""
    backend = request.param
    _ = backend.module  # skip / fail now, with the reason (the property loads it)
    return backend
