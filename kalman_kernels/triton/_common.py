"""Shared plumbing of the Triton kernels: interpreter detection, dtypes, autotuning, sizes.

``TRITON_INTERPRET=1`` (read by Triton when a ``@triton.jit`` function is decorated, i.e.
when these modules are imported) runs the kernels on CPU tensors through Triton's NumPy
interpreter. It is a test tool: the autotuner gets one fixed configuration (several crash
the interpreter) with large blocks (the interpreter's cost is per program and per
operation, not per element).
"""
from __future__ import annotations

import functools
import os
from typing import Iterable, List

import torch
import triton
import triton.language as tl


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


#: Whether Triton runs kernels through its interpreter (decided when triton decorates them).
INTERPRET: bool = _flag("TRITON_INTERPRET")

#: ``input_precision`` of the float32 ``tl.dot`` calls. "ieee" (default) is exact float32
#: FMA arithmetic; "tf32x3" (three TF32 tensor-core passes, about float32 accuracy) and
#: "tf32" (10-bit mantissa: outside the tolerances of docs/design.md, 5) can be chosen with
#: KALMAN_KERNELS_TRITON_DOT_PRECISION. float64 dots are always "ieee".
DOT_PRECISION: str = os.environ.get("KALMAN_KERNELS_TRITON_DOT_PRECISION", "ieee").strip().lower()
if DOT_PRECISION not in ("ieee", "tf32x3", "tf32"):
    raise ValueError(f"KALMAN_KERNELS_TRITON_DOT_PRECISION must be ieee, tf32x3 or tf32, got "
                     f"{DOT_PRECISION!r}")

TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}
TORCH_DTYPE = {tl.float32: torch.float32, tl.float64: torch.float64}


def acc_dtype(*tensors: torch.Tensor):
    """float64 if any tensor is float64, else float32: the arithmetic of a kernel."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def precision(acc) -> str:
    return "ieee" if acc == tl.float64 else DOT_PRECISION


def pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def bucket(n: int) -> int:
    """A coarse size class (for autotuning keys: one tuning per power of two, not per size)."""
    return int(n).bit_length()


def configs(gpu: Iterable[triton.Config], interpreted: triton.Config) -> List[triton.Config]:
    """The autotuner's configurations: Ampere/Hopper candidates on a GPU, one under the
    interpreter."""
    return [interpreted] if INTERPRET else list(gpu)


def autotune(gpu, interpreted, key, **kwargs):
    return triton.autotune(configs=configs(gpu, interpreted), key=key, **kwargs)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_wanted(device: torch.device) -> int:
    """How many programs keep the device busy (4 per SM on a GPU; few under the
    interpreter, where every program costs interpreter time)."""
    if device.type != "cuda" or INTERPRET:
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 * _sm_count(index)


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))
