"""The ``reference`` backend: the pure-PyTorch kernels of :mod:`kalman_kernels.reference`.

Runs on any device (meta tensors included) and under ``torch.compile``; float64
accumulation throughout. It is the oracle of the tests, not a fast path. ``backend="reference"``
calls these functions directly; the same functions are the default kernel of the
``kalman_kernels`` ops (:mod:`.library`), which ``backend="auto"`` runs on a device without
a compiled kernel.
"""
from .. import reference
from . import library

NAME = "reference"
#: device types served ("*": any device)
DEVICES = ("*",)

# The entry points of the contract are the reference functions of the same names.
globals().update({name: getattr(reference, name) for name in library.ENTRY_POINTS})
