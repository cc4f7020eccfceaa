"""Parameter blocks that share one observation: a dense Jacobian, or a Kronecker-structured
``nn.Linear`` weight (docs/design.md, 2.1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from ._common import check_cov, check_float, check_no_overlap


@dataclass
class DenseBlock:
    """A parameter tensor with an explicit Jacobian ``jac`` of shape (m, *param.shape)."""

    param: torch.Tensor
    cov: torch.Tensor
    jac: torch.Tensor

    def __post_init__(self):
        check_float("DenseBlock.param", self.param)
        check_float("DenseBlock.jac", self.jac)
        check_cov("DenseBlock", self.param, self.cov)
        if self.jac.dim() != self.param.dim() + 1 or self.jac.shape[1:] != self.param.shape:
            raise ValueError(f"DenseBlock.jac must have shape (m, *param.shape) = (m, "
                             f"{', '.join(map(str, self.param.shape))}), got "
                             f"{tuple(self.jac.shape)}")
        if self.jac.shape[0] < 1:
            raise ValueError("DenseBlock.jac has no rows (m = 0): an observation needs m >= 1")

    @property
    def num_obs(self) -> int:
        return self.jac.shape[0]

    def tensors(self):
        return {"param": self.param, "cov": self.cov, "jac": self.jac}

    def jac_2d(self) -> torch.Tensor:
        return self.jac.reshape(self.num_obs, -1)


@dataclass
class KronBlock:
    """An ``nn.Linear`` weight (d_out, d_in) whose Jacobian rows are vec(D A^T)
    (docs/design.md, 2.1).

    ``inputs`` A is (B, d_in), one row per sample; ``grad_outputs`` D is (B, d_out) (one
    observation per row) or (B, K, d_out): the K observations of sample j (e.g. its K class
    scores) share its input A[j], and observation (j, k) has the Jacobian row
    vec(D[j, k] A[j]^T). The m = B K observations are ordered (j, k) row-major, as
    ``pred.reshape(-1)`` of a (B, K) prediction. The kernels' work is then
    O(B^2 (d_in d_out + K^2 d_out)), not O((B K)^2 d_in d_out).
    """

    weight: torch.Tensor
    cov: torch.Tensor
    inputs: torch.Tensor
    grad_outputs: torch.Tensor

    def __post_init__(self):
        check_float("KronBlock.weight", self.weight)
        check_float("KronBlock.inputs", self.inputs)
        check_float("KronBlock.grad_outputs", self.grad_outputs)
        if self.weight.dim() != 2:
            raise ValueError(f"KronBlock.weight must be 2-D (d_out, d_in), got shape "
                             f"{tuple(self.weight.shape)}")
        check_cov("KronBlock", self.weight, self.cov)
        d_out, d_in = self.weight.shape
        if self.inputs.dim() != 2 or self.inputs.shape[1] != d_in:
            raise ValueError(f"KronBlock.inputs must have shape (B, d_in) = (B, {d_in}), got "
                             f"{tuple(self.inputs.shape)}")
        g = self.grad_outputs
        if g.dim() not in (2, 3) or g.shape[-1] != d_out:
            raise ValueError(f"KronBlock.grad_outputs must have shape (B, d_out) = (B, {d_out}) "
                             f"or (B, K, d_out) = (B, K, {d_out}), got {tuple(g.shape)}")
        if self.inputs.shape[0] != g.shape[0]:
            raise ValueError(f"KronBlock.inputs has {self.inputs.shape[0]} rows but "
                             f"grad_outputs has {g.shape[0]}; both need one row per sample")
        if self.inputs.shape[0] < 1 or (g.dim() == 3 and g.shape[1] < 1):
            raise ValueError("KronBlock has no observations (B = 0 or K = 0): an observation "
                             "needs m >= 1")

    @property
    def param(self) -> torch.Tensor:
        return self.weight

    @property
    def grouped_grad_outputs(self) -> torch.Tensor:
        """D as (B, K, d_out) (a view)."""
        g = self.grad_outputs
        return g.unsqueeze(1) if g.dim() == 2 else g

    @property
    def num_obs(self) -> int:
        g = self.grouped_grad_outputs
        return g.shape[0] * g.shape[1]

    def tensors(self):
        return {"weight": self.weight, "cov": self.cov, "inputs": self.inputs,
                "grad_outputs": self.grad_outputs}


Block = Union[DenseBlock, KronBlock]


def validate_blocks(blocks: Sequence[Block], residual: torch.Tensor) -> torch.device:
    """Metadata checks of one step's blocks and residual; returns their device."""
    if isinstance(blocks, (DenseBlock, KronBlock)):
        raise TypeError("blocks must be a list of DenseBlock / KronBlock, got a single block; "
                        "wrap it in a list")
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks is empty: pass at least one DenseBlock or KronBlock")
    for i, b in enumerate(blocks):
        if not isinstance(b, (DenseBlock, KronBlock)):
            raise TypeError(f"blocks[{i}] must be a DenseBlock or KronBlock, got "
                            f"{type(b).__name__}")
    check_float("residual", residual)
    if residual.dim() != 1:
        raise ValueError(f"residual must be a 1-D (m,) tensor, got shape {tuple(residual.shape)}")
    m = residual.shape[0]
    device = blocks[0].param.device
    for i, b in enumerate(blocks):
        if b.num_obs != m:
            raise ValueError(f"blocks[{i}] has {b.num_obs} observation rows but residual has "
                             f"m = {m}")
        for name, t in b.tensors().items():
            if t.device != device:
                raise ValueError(f"blocks[{i}].{name} is on {t.device} but blocks[0] is on "
                                 f"{device}: all tensors of one call must be on one device")
    if residual.device != device:
        raise ValueError(f"residual is on {residual.device} but the blocks are on {device}: all "
                         f"tensors of one call must be on one device")
    written = []
    for i, b in enumerate(blocks):
        written += [(f"blocks[{i}].{'param' if isinstance(b, DenseBlock) else 'weight'}", b.param),
                    (f"blocks[{i}].cov", b.cov)]
    check_no_overlap(written)
    return device
