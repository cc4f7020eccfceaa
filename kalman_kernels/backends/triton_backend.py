"""The ``triton`` backend: fused GPU kernels written in Triton (``kalman_kernels/triton/``).

The ops are those of :mod:`.library` (schemas, checks, fakes and the one wrapper, from that
module only), defined under the ``kalman_kernels_triton`` namespace: Triton serves the same
device as the ``cuda`` backend, so it needs its own names. This module registers the
launchers of ``kalman_kernels/triton/`` (one per op, named as the op) for the CUDA and CPU
dispatch keys with ``torch.library``, so
``torch.compile(fullgraph=True)`` traces through them as opaque custom ops (and
``torch.library.opcheck`` checks them); :data:`KERNELS` binds the wrapper to them.

Where it runs (when named; ``backend="auto"`` runs it on CUDA tensors only where the cuda
extension is not built, through the CUDA key of the ``kalman_kernels`` ops, docs/design.md 4.4):

* CUDA tensors on a machine with a GPU;
* CPU tensors only under ``TRITON_INTERPRET=1`` (set before ``triton`` is imported):
  Triton's interpreter runs the same kernels in NumPy. That is a test tool (about 1e6
  elements/s).

Without triton the registry records why (``kk.backend_errors()["triton"]``) and
``backend="triton"`` raises with that reason; with triton but without a GPU (and without the
interpreter) the backend is available but serves no device present, so ``backend="triton"``
on CPU tensors raises, saying how to get a device it serves.
"""
from __future__ import annotations

import contextlib

import torch

from . import library

NAME = "triton"

HOW_TO_GET = ("run on a machine with an NVIDIA (or AMD) GPU and the matching torch build, "
              "with triton installed (`pip install triton`; CUDA builds of torch bring it). "
              "To test the kernels without a GPU, set TRITON_INTERPRET=1 before triton is "
              "imported: Triton's interpreter then runs them on CPU tensors (slowly)")

try:
    import triton  # noqa: F401
except ImportError as _exc:
    raise ImportError(f"triton is not installed ({_exc}); the triton backend needs it: "
                      f"`pip install triton`") from _exc

from ..triton import _common, dense, kron, multi_tensor  # noqa: E402

#: Whether the kernels run through Triton's interpreter (TRITON_INTERPRET=1 at import).
INTERPRET: bool = _common.INTERPRET

#: device types served: CUDA, and CPU under the interpreter (a test tool). Available wherever
#: triton imports; without a GPU it serves no device here, and asking for it on CPU tensors
#: outside the interpreter raises (registry), naming HOW_TO_GET.
DEVICES = ("cuda", "cpu") if INTERPRET else ("cuda",)

NAMESPACE = library.define(library.TRITON_NAMESPACE)


# --------------------------------------------------------------------------------------
# Registration: per op, the contract's checks (library.CHECKS), the device, the launcher of
# the same name in kalman_kernels/triton/ (a new op adds its launcher there, nothing here)
# --------------------------------------------------------------------------------------
def _fail(op: str, message: str):
    raise RuntimeError(f"triton backend ({op}): {message}")


def _tensors(args):
    for arg in args:
        if isinstance(arg, torch.Tensor):
            yield arg
        elif isinstance(arg, (list, tuple)):
            yield from (t for t in arg if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def _on_device(op: str, tensors):
    """Every tensor on one device that Triton can run on; launch on it (Triton launches on
    the current device). No tensors (empty lists): the launcher answers without a kernel."""
    if not tensors:
        yield
        return
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            _fail(op, f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
        return
    if device.type != "cpu":
        _fail(op, f"{device.type} tensors are not supported (CUDA GPUs, or CPU under the "
                  f"interpreter)")
    if not INTERPRET:
        _fail(op, "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set before "
                  "triton is imported), a test tool; on CPU use backend='cpp' or "
                  "'reference', or move the tensors to a GPU")
    yield


def _kernel(name: str):
    """The kernel registered for op ``name``: its checks, then its launcher on the device."""
    launchers = [getattr(m, name) for m in (dense, kron, multi_tensor) if hasattr(m, name)]
    if len(launchers) != 1:
        raise ImportError(f"kalman_kernels/triton/ must define exactly one launcher named "
                          f"{name!r} (the op of kalman_kernels/backends/library.py), found "
                          f"{len(launchers)}")
    check, launch = library.CHECKS[name], launchers[0]

    def kernel(*args):
        check(*args)
        with _on_device(name, list(_tensors(args))):
            return launch(*args)

    kernel.__name__ = f"triton_{name}"
    return kernel


#: op name -> the kernel registered for it (its checks, then its launcher): also what the
#: registry registers for the CUDA key of the kalman_kernels ops when the cuda extension is
#: not built (backends.__init__, docs/design.md 4.4)
KERNEL_FUNCTIONS = {_name: _kernel(_name) for _name in library.SCHEMAS}

_impl = torch.library.Library(NAMESPACE, "IMPL")
for _name, _kernel_of_op in KERNEL_FUNCTIONS.items():
    for _key in ("CUDA", "CPU"):   # CPU: the interpreter (or a clear error without it)
        _impl.impl(_name, _kernel_of_op, _key)

KERNELS = library.Kernels(NAME, NAMESPACE, DEVICES, hint=None if INTERPRET else (
    "CPU tensors need Triton's interpreter: TRITON_INTERPRET=1 set before triton is imported "
    "(a test tool); on CPU use backend='auto', 'cpp' or 'reference'"))
globals().update(KERNELS.entry_points())     # triton_backend.loss_step_ and the others
