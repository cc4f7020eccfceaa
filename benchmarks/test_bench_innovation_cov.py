"""innovation_cov_dense: cpp vs reference, n in {1e4..1e7}, m in {1, 8, 32, 128}."""
import pytest

from benchmarks import common as C
from benchmarks.conftest import record

GRID = [(n, m) for n in (10_000, 100_000, 1_000_000, 10_000_000) for m in (1, 8, 32, 128)
        if n * m <= 1.3e8]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("n,m", GRID, ids=lambda v: str(v))
def test_innovation_cov_dense(benchmark, request, backend, n, m):
    if backend == "reference" and n * m > 3.2e7:
        pytest.skip("reference too slow at this size (see benchmarks/report.py)")
    kernels = request.getfixturevalue(backend)
    case = C.DenseCase(n, m)
    benchmark.group = f"innovation_cov_dense n={n} m={m}"
    rounds = 3 if n * m >= 1e7 else 10
    benchmark.pedantic(case.innovation(kernels), rounds=rounds, warmup_rounds=1)
    record(benchmark, case.innovation_bytes(), case.innovation_flops(), n=n, m=m,
           backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_innovation_cov_kron_512(benchmark, request, backend):
    kernels = request.getfixturevalue(backend)
    case = C.KronCase(512, 512, 32, 10)
    benchmark.group = "innovation_cov_kron 512x512 B=32 K=10"
    benchmark.pedantic(lambda: kernels.innovation_cov_kron(case.inputs, case.grad_outputs,
                                                           case.cov, 1.0, 0.0),
                       rounds=5, warmup_rounds=1)
    record(benchmark, None, case.flops() / 2, backend=backend)
