"""What users call: KalmanNGD.step in loss mode vs AdamW(fused=True).step and the
raw ops; ops.kalman_update_ (dense n = 1e6, m = 32; Kronecker 512 x 512) vs its raw ops;
batch mode with a tracked 512 x 512 layer; an MLP with every layer tracked. The full table with
ratios: ``python -m benchmarks.report --only public``."""
import pytest
import torch

from benchmarks import public_api as P
from benchmarks.conftest import record


@pytest.mark.parametrize("variant", ["KalmanNGD.step (closure with backward)",
                                     "KalmanNGD.step two-pass (closure with backward)",
                                     "raw ops", "AdamW(fused=True).step (closure with backward)"])
def test_loss_mode_10m(benchmark, variant):
    """The whole step with its closure's backward (the default single-pass step, whose
    reduction runs in the backward hooks, and reduce_in_backward(False)), beside the raw ops
    and AdamW (benchmarks.report subtracts the plain backward's time from both)."""
    case = P.LossPublicCase(10_000_000, single_pass="two-pass" not in variant)
    fn = {"KalmanNGD.step (closure with backward)": case.step,
          "KalmanNGD.step two-pass (closure with backward)": case.step,
          "raw ops": case.raw_ops(),
          "AdamW(fused=True).step (closure with backward)": case.adamw()}[variant]
    benchmark.group = "loss mode, 10M params in 4 tensors"
    benchmark.pedantic(fn, rounds=15, warmup_rounds=1)
    record(benchmark, case.bytes_full(), None, variant=variant)


@pytest.mark.parametrize("variant", ["ops.kalman_update_", "raw ops"])
def test_dense_update_public(benchmark, variant):
    from kalman_kernels import ops
    from kalman_kernels.backends import resolve
    kernels = resolve("auto", torch.device("cpu"))
    n, m = 1_000_000, 32
    h = torch.randn(m, n)
    param, cov = torch.randn(n), torch.rand(n) * 1e-2 + 1e-3
    e = torch.randn(m)
    coef, w = P._filter_terms(kernels.innovation_cov_dense(h, cov, 1.0, 0.0))
    ok = torch.ones((), dtype=torch.bool)

    def public():
        ops.kalman_update_([ops.DenseBlock(param, cov, h)], e, 0.1)

    def raw():
        kernels.innovation_cov_dense(h, cov, 1.0, 0.0)
        kernels.fused_update_dense_(param, cov, h, coef, w, ok, 1.0, 0.0, 0.0, float("inf"), False)

    benchmark.group = "dense step n=1e6 m=32"
    benchmark.pedantic(public if variant == "ops.kalman_update_" else raw, rounds=10,
                       warmup_rounds=1)
    record(benchmark, None, None, variant=variant)


@pytest.mark.parametrize("variant", ["KalmanNGD.step", "forward + build blocks", "raw ops"])
def test_batch_mode_tracked_512(benchmark, variant):
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 512)
    model = torch.nn.Sequential(layer, torch.nn.Tanh(),
                                torch.nn.Linear(512, 10).requires_grad_(False))
    case = P.TrackedCase(model, 32, 10, 512, params=layer.parameters())
    fn = {"KalmanNGD.step": case.step, "forward + build blocks": case.build,
          "raw ops": case.raw()}[variant]
    benchmark.group = "batch mode, tracked 512x512, B=32 K=10"
    benchmark.pedantic(fn, rounds=10, warmup_rounds=1)
    record(benchmark, None, None, variant=variant)


def test_tracked_mlp_1024_step(benchmark):
    torch.manual_seed(0)
    model = P._MLP(d=1024)
    case = P.TrackedCase(model, 32, 10, 256)
    benchmark.group = "tracked MLP 256-1024-1024-10, B=32 K=10"
    benchmark.pedantic(case.step, rounds=5, warmup_rounds=1)
    record(benchmark, None, None, variant="KalmanNGD.step (batch mode, grouped)")


@pytest.mark.parametrize("layout", ["contiguous", "transposed (staged)"])
def test_loss_mode_noncontiguous(benchmark, layout):
    """KalmanNGD.step (two-pass, closure included) on 4 float32 parameters of 1000 x 1000,
    contiguous or transposed: what staging a non-contiguous parameter costs the user. The
    table with the staging alone and a strided pass: ``python -m benchmarks.noncontiguous``."""
    from benchmarks.noncontiguous import LayoutLossCase
    case = LayoutLossCase(1000, 1000, 4, transposed=layout != "contiguous")
    benchmark.group = "loss mode, 4 x 1000 x 1000, contiguous vs transposed"
    benchmark.pedantic(lambda: case.opt.step(case._closure), rounds=10, warmup_rounds=1)
    record(benchmark, None, None, variant=f"KalmanNGD.step, {layout}")
