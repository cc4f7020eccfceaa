"""fused_update_dense_ / the whole dense step / the Kronecker step: cpp vs reference."""
import pytest

from benchmarks import common as C
from benchmarks.conftest import record

GRID = [(n, m) for n in (10_000, 100_000, 1_000_000, 10_000_000) for m in (1, 8, 32, 128)
        if n * m <= 1.3e8]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("n,m", GRID, ids=lambda v: str(v))
def test_fused_update_dense(benchmark, request, backend, n, m):
    if backend == "reference" and n * m > 3.2e7:
        pytest.skip("reference too slow at this size (see benchmarks/report.py)")
    kernels = request.getfixturevalue(backend)
    case = C.DenseCase(n, m)
    benchmark.group = f"fused_update_dense_ n={n} m={m}"
    rounds = 3 if n * m >= 1e7 else 10
    benchmark.pedantic(case.update(kernels), rounds=rounds, warmup_rounds=1)
    record(benchmark, case.update_bytes(), case.update_flops(), n=n, m=m, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_dense_step_n1e6_m32(benchmark, request, backend):
    """Target: innovation_cov + fused_update at n = 1e6, m = 32 >= 3x the reference."""
    kernels = request.getfixturevalue(backend)
    case = C.DenseCase(1_000_000, 32)
    benchmark.group = "dense step n=1e6 m=32"
    benchmark.pedantic(case.step(kernels), rounds=3 if backend == "reference" else 10,
                       warmup_rounds=1)
    record(benchmark, case.innovation_bytes() + case.update_bytes(),
           case.innovation_flops() + case.update_flops(), backend=backend)


@pytest.mark.parametrize("variant", ["cpp kron", "cpp dense + build H",
                                     "reference dense + build H"])
def test_kron_step_512_b32(benchmark, request, variant):
    """The Kronecker step (B = 32, K = 1) vs the dense reference including building H."""
    case = C.KronCase(512, 512, 32, 1)
    if variant == "cpp kron":
        fn = case.kron_step(request.getfixturevalue("cpp"))
    elif variant == "cpp dense + build H":
        fn = case.dense_step(request.getfixturevalue("cpp"))
    else:
        fn = case.dense_step(request.getfixturevalue("reference"))
    benchmark.group = "kron step 512x512 B=32 K=1"
    benchmark.pedantic(fn, rounds=10, warmup_rounds=1)
    record(benchmark, None, case.flops(), variant=variant)


@pytest.mark.parametrize("variant", ["grouped", "ungrouped"])
def test_kron_step_1024_b32_k10(benchmark, cpp, variant):
    """Sample-grouped (B^2 work) vs the same observations ungrouped ((B K)^2)."""
    case = C.KronCase(1024, 1024, 32, 10)
    if variant == "ungrouped":
        case = case.ungrouped()
    benchmark.group = "kron step 1024x1024 B=32 K=10"
    benchmark.pedantic(case.kron_step(cpp), rounds=5 if variant == "grouped" else 2,
                       warmup_rounds=1)
    record(benchmark, None, case.flops(), variant=variant)
