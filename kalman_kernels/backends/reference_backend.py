"""The ``reference`` backend: the pure-PyTorch kernels of :mod:`kalman_kernels.reference`.

Runs on any device (meta tensors included) and under ``torch.compile``; float64
accumulation throughout. It is the oracle of the tests, not a fast path. ``backend="reference"``
calls these functions directly; the same functions are the default kernel of the
``kalman_kernels`` ops (:mod:`.library`), which ``backend="auto"`` runs on a device without
a compiled kernel.
"""
from ..reference import (  # noqa: F401  (re-exported as the backend contract)
    apply_terms_,
    fused_update_dense_,
    fused_update_kron_,
    innovation_cov_dense,
    innovation_cov_kron,
    loss_quad_form,
    loss_step_,
    step_terms_dense,
    step_terms_kron,
)

NAME = "reference"
#: device types served ("*": any device)
DEVICES = ("*",)
