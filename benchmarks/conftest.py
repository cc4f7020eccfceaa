"""pytest-benchmark configuration of the cpp-backend benchmarks.

Run: ``python -m pytest benchmarks --benchmark-only`` (the full table with ratios and
ceilings: ``python -m benchmarks.report``). Thread count: ``--kk-threads N`` (default 1).
"""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--kk-threads", type=int, default=1,
                     help="torch.set_num_threads for the kalman_kernels benchmarks")


@pytest.fixture(scope="session", autouse=True)
def _threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.config.getoption("--kk-threads"))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cpp():
    import kalman_kernels as kk
    if not kk.backends()["cpp"]:
        pytest.skip(f"cpp backend unavailable: {kk.backend_errors().get('cpp')}")
    from kalman_kernels.backends import cpp_backend
    return cpp_backend


@pytest.fixture(scope="session")
def reference():
    import kalman_kernels.reference as ref
    return ref


def record(benchmark, nbytes=None, flops=None, **info):
    """Attach sizes and, when timings exist (not under --benchmark-disable), GB/s and
    GFLOP/s from the median."""
    benchmark.extra_info.update(info)
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    median = stats.stats.median
    if nbytes:
        benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 2)
    if flops:
        benchmark.extra_info["GFLOP/s"] = round(flops / median / 1e9, 2)
