"""Contiguous staging of non-contiguous parameters for one optimizer step.

The kernels of every backend read and write a parameter as one flat array in its logical
order; a transposed, sliced or channels_last parameter does not have one. ``KalmanNGD``
steps a contiguous copy of such a parameter and writes it back (docs/design.md, 3:
non-contiguous parameters); contiguous parameters pass through untouched.
"""
from __future__ import annotations

import dataclasses

import torch

from .ops import KronBlock


class Staging:
    """Contiguous copies of the non-contiguous parameters of one step, written back after
    it. The kernels write a parameter as one flat array in its logical order, which a
    transposed or sliced parameter does not have; staging costs a copy in and a copy back
    of that tensor (and in loss mode a contiguous copy of its gradient, which the kernels
    would otherwise make once per pass). ``benchmarks/noncontiguous.py`` measures it against
    a strided pass: neither wins at every size, and staging needs no kernel of any backend
    to change. A step that raises leaves the copies unwritten, so the parameters are as
    before. ``stage`` returns its argument itself when it is contiguous: nothing is copied
    then, and contiguous parameters pay only the ``is_contiguous()`` test."""

    __slots__ = ("pairs",)

    def __init__(self) -> None:
        self.pairs: list = []

    def stage(self, p: torch.Tensor) -> torch.Tensor:
        if p.is_contiguous():
            return p
        copy = p.detach().contiguous()
        self.pairs.append((p, copy))
        return copy

    @staticmethod
    def read(t: torch.Tensor) -> torch.Tensor:
        """A read-only input (a gradient) in contiguous storage, copied once here rather than
        by every kernel that reads it."""
        return t if t.is_contiguous() else t.contiguous()

    def write_back(self) -> None:
        if self.pairs:
            with torch.no_grad():
                for p, copy in self.pairs:
                    # in p's memory order: a copy into a transposed destination walks it
                    # with a large stride (at power-of-two sizes about 15x slower on CPU,
                    # benchmarks/noncontiguous.py); into a contiguous one it does not
                    order = memory_order(p)
                    if order is None:
                        p.copy_(copy)
                    else:
                        p.permute(order).copy_(copy.permute(order))
            self.pairs.clear()


def memory_order(t: torch.Tensor):
    """The permutation of t's dimensions that lists them by decreasing stride, when t then
    becomes contiguous (t is dense and non-overlapping: a transpose, channels_last); else
    None (a slice with gaps)."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return order if t.permute(order).is_contiguous() else None


def block_param(block) -> torch.Tensor:
    return block.weight if isinstance(block, KronBlock) else block.param


def stage_block(block, staging: Staging):
    """``block`` with a contiguous copy of a non-contiguous parameter (:class:`Staging`); the
    block itself when its parameter is contiguous."""
    param = block_param(block)
    staged = staging.stage(param)
    if staged is param:
        return block
    if isinstance(block, KronBlock):
        return dataclasses.replace(block, weight=staged)
    return dataclasses.replace(block, param=staged)
