"""The ``reference`` backend: the pure-PyTorch kernels of :mod:`kalman_kernels.reference`."""
from ..reference import (  # noqa: F401  (re-exported as the backend contract)
    fused_update_dense_,
    fused_update_kron_,
    innovation_cov_dense,
    innovation_cov_kron,
    loss_quad_form,
    loss_step_,
)

NAME = "reference"
