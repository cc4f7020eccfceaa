"""kalman_kernels: Kalman-filter natural-gradient fine-tuning for PyTorch.

The parameters are a Gaussian N(mu, diag P); every minibatch is an observation and the
Kalman update is a Fisher-preconditioned step whose size comes from the filter.
See README.md, docs/design.md (section 2) and docs/math.md for the math.
"""
from . import integrations, ops, reference
from ._version import __version__
from .backends import backend_errors, backends
from .optimizer import KalmanNGD

__all__ = ["__version__", "ops", "reference", "integrations", "backends", "backend_errors",
           "KalmanNGD"]
