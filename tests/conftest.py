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

import random
import secrets

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


def step_err(new, old, expected) -> float:
    """How far an in-place update's step (new - old) is from the expected one, relative to
    the expected step's largest element, beyond the rounding of the stored result (one unit
    of ``new.dtype`` at each expected value). Comparing new - old directly is unfair to a low
    precision result when the step is small beside the value it lands on: at a step of 1e-3
    of the weights, half a float32 ulp of the new weight is already ~1e-4 of the step.
    NaN anywhere -> inf."""
    eps = torch.finfo(new.dtype).eps
    n, o, e = (x.detach().double().reshape(-1).cpu() for x in (new, old, expected))
    assert n.shape == e.shape == o.shape, (n.shape, o.shape, e.shape)
    if not (torch.isfinite(n).all() and torch.isfinite(e).all()):
        return float("inf")
    if not n.numel():
        return 0.0
    beyond = float(((n - e).abs() - eps * e.abs()).max())
    return max(beyond, 0.0) / max(float((e - o).abs().max()), 1e-300)


# ---------------------------------------------------------------------- random seeds
# Tests draw fresh random inputs every run (docs/design.md, 5), so a failure must say which
# inputs it saw: every test gets its own fresh seed, the global torch / NumPy / random
# generators are seeded with it, and a failed test's report shows it with the command that
# replays it. KALMAN_TEST_SEED=<seed> makes every seed below that value instead.
SEED_ENV = "KALMAN_TEST_SEED"


def fresh_seed(bits: int = 31) -> int:
    """KALMAN_TEST_SEED when set (a replay), else a new seed from the OS's entropy."""
    fixed = os.environ.get(SEED_ENV, "").strip()
    return int(fixed) if fixed else secrets.randbits(bits)


def draw_seed(bits: int = 31) -> int:
    """A seed for a test's own generator, drawn from the global NumPy generator that
    ``random_seed`` seeded for this test: fresh every run, replayed with the test's seed."""
    return int(np.random.randint(0, 1 << bits))


def note_seed(node, what: str, seed: int) -> None:
    """Record a seed on a pytest node (a test, or a module for module-scoped fixtures) so
    that a failure of any test under that node reports it."""
    node.__dict__.setdefault("kk_seeds", []).append((what, seed))


@pytest.fixture(autouse=True)
def random_seed(request) -> int:
    """This test's seed; the global generators start from it."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    note_seed(request.node, "this test", seed)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    seeds = [s for node in item.listchain() for s in node.__dict__.get("kk_seeds", [])]
    if seeds:
        lines = [f"{what}: {seed}  (replay: {SEED_ENV}={seed} pytest '{item.nodeid}')"
                 for what, seed in seeds]
        report.sections.append(("random seeds", "\n".join(lines)))


@pytest.fixture
def rng(random_seed):
    """A NumPy generator seeded with this test's fresh seed (inputs differ from run to run)."""
    return np.random.default_rng(random_seed)


from kernel_backends import params as _kernel_backend_params  # noqa: E402


@pytest.fixture(params=_kernel_backend_params())
def kb(request):
    """One kernel backend variant (tests/kernel_backends.py); skips when unavailable."""
    backend = request.param
    _ = backend.module  # skip / fail now, with the reason (the property loads it)
    return backend
