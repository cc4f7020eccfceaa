"""loss_step_ (docs/design.md, 2.2) over 4 float32 tensors vs AdamW(fused=True), the add_ bandwidth
ceiling and ivon-opt, n in {1e4..1e7}."""
import pytest
import torch

from benchmarks import common as C
from benchmarks.conftest import record

SIZES = [10_000, 100_000, 1_000_000, 10_000_000]


@pytest.mark.parametrize("variant", ["cpp", "cpp step only", "reference", "AdamW(fused)",
                                     "add_ ceiling"])
@pytest.mark.parametrize("n", SIZES)
def test_loss_step(benchmark, request, variant, n):
    case = C.LossCase(n)
    if variant == "cpp":
        fn, nbytes = case.full(request.getfixturevalue("cpp")), case.bytes_full()
    elif variant == "cpp step only":
        fn, nbytes = case.step_only(request.getfixturevalue("cpp")), case.bytes_step()
    elif variant == "reference":
        fn, nbytes = case.full(request.getfixturevalue("reference")), case.bytes_full()
    elif variant == "AdamW(fused)":
        fn, nbytes = case.adamw(), case.bytes_full()
    else:   # in-place add at the loss step's working-set size (params, grads, covs)
        half = case.working_set_bytes() // 8
        x, y = torch.randn(half), torch.randn(half)
        fn, nbytes = (lambda: x.add_(y)), 12.0 * half
    benchmark.group = f"loss_step_ n={n}"
    rounds = 5 if (variant == "reference" and n >= 1_000_000) else 20
    benchmark.pedantic(fn, rounds=rounds, iterations=max(1, int(1e5 // n)), warmup_rounds=1)
    record(benchmark, nbytes, None, n=n, variant=variant)


def test_ivon_step_10m(benchmark):
    pytest.importorskip("ivon", reason="ivon-opt not installed (pip install ivon-opt)")
    case = C.LossCase(10_000_000)
    benchmark.group = "loss_step_ n=10000000"
    benchmark.pedantic(case.ivon(), rounds=3, warmup_rounds=1)
    record(benchmark, None, None, variant="ivon-opt IVON (sample+collect+step)")
