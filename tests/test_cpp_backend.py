"""cpp-backend specifics: its ops name the bad argument."""
import pytest
import torch

from kernel_backends import KernelBackend


@pytest.fixture(scope="module")
def cpp():
    return KernelBackend("cpp", "cpu").module


def test_bad_inputs_raise_naming_the_argument(cpp):
    ok = torch.ones((), dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"jac must be \(m, n\) with n = 9"):
        cpp.innovation_cov_dense(torch.randn(3, 10), torch.rand(9))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        cpp.innovation_cov_dense(torch.randn(3, 10), torch.rand(10).half())
    with pytest.raises(RuntimeError, match="cov must be"):
        cpp.innovation_cov_kron(torch.randn(3, 4), torch.randn(3, 2, 5), torch.rand(4, 5))
    with pytest.raises(RuntimeError, match="ok must be a 0-d bool"):
        cpp.fused_update_dense_(torch.randn(4), torch.rand(4), torch.randn(2, 4),
                                torch.randn(2, dtype=torch.float64),
                                torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.bool),
                                1.0, 0.0, 0.0, 1.0, False)
    with pytest.raises(RuntimeError, match="whitening must be"):
        cpp.fused_update_kron_(torch.randn(5, 4), torch.rand(5, 4), torch.randn(3, 4),
                               torch.randn(3, 2, 5), torch.randn(6, dtype=torch.float64),
                               torch.eye(5, dtype=torch.float64), ok, 1.0, 0.0, 0.0, 1.0, False)
