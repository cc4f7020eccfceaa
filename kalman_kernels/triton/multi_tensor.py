"""Loss-observation mode (docs/design.md, 2.2): lists of tensors in one launch per phase, and the
elementwise update of the distributed step (docs/design.md, 2.5).

A chunked tensor-list launcher, as fused optimizers do: the tensors of a call (grouped by
their dtypes, one launch per group) are cut into chunks of ``CHUNK`` elements, and a small
int64 table on the device gives each program its chunk: per tensor list the element
offset of the tensor from the list's first tensor (the kernel addresses
``base_ptr + offset``, so the compiler still sees 16-byte aligned pointers and vectorises;
an int-to-pointer cast would hide the alignment), then the chunk's start and end inside
the tensor. Full blocks are loaded without masks, the ragged end of a tensor with one. The
table depends only on the tensors' addresses and sizes; it is cached, so a step that
reuses its tensors copies nothing to the device (a new table goes through pinned memory,
asynchronously).

* ``loss_quad_form``: per chunk a partial sum of g^2 P- (float32 terms, or float64), then
  one float64 sum over the chunks on the device.
* ``loss_step_``: reads ``ok``, ``coef`` and ``weight`` on the device; nothing is written
  when ``ok`` is false.
* ``apply_terms_``: one tensor, elementwise (no table needed).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from . import _common as C
from .kk_math import cov_rule, loss_update, mean_step, predict, quad_term, scalar, to_acc, to_store

#: elements per program; a multiple of BLOCK
CHUNK = 65536 if C.INTERPRET else 16384
#: elements per loop iteration of a program
BLOCK = 65536 if C.INTERPRET else 2048
NUM_WARPS = 8

_TABLE_CACHE: "OrderedDict[tuple, Tuple[torch.Tensor, int]]" = OrderedDict()
_TABLE_CACHE_SIZE = 64


def _table(lists: Sequence[Sequence[torch.Tensor]],
           device: torch.device) -> Tuple[torch.Tensor, int]:
    """(int64 table (chunks, L + 2) on ``device``, number of chunks) for L parallel lists of
    same-sized tensors: per chunk the element offset of the chunk's tensor from each list's
    first tensor, then the chunk's start and end inside the tensor."""
    numels = [t.numel() for t in lists[0]]
    ptrs = [[t.data_ptr() for t in lst] for lst in lists]
    key = (device, CHUNK, tuple(numels),
           tuple(tuple(p) for p in ptrs), tuple(lst[0].element_size() for lst in lists))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    counts = np.array([C.cdiv(n, CHUNK) for n in numels], dtype=np.int64)
    which = np.repeat(np.arange(len(numels)), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    start = (np.arange(which.size, dtype=np.int64) - first[which]) * CHUNK
    end = np.minimum(start + CHUNK, np.asarray(numels, dtype=np.int64)[which])
    cols = []
    for lst, p in zip(lists, ptrs):
        size = lst[0].element_size()
        offsets = (np.asarray(p, dtype=np.int64) - p[0]) // size
        cols.append(offsets[which])
    host = torch.from_numpy(np.stack(cols + [start, end], axis=1).astype(np.int64))
    if device.type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    result = (table, int(which.size))
    _TABLE_CACHE[key] = result
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return result


def _aligned(*lists) -> bool:
    return all(t.data_ptr() % 16 == 0 for lst in lists for t in lst)


def _groups(*lists) -> Dict[tuple, List[int]]:
    """Indices of the non-empty tensors, grouped by the dtypes across the lists."""
    groups: Dict[tuple, List[int]] = {}
    for i, ts in enumerate(zip(*lists)):
        if ts[0].numel() == 0:
            continue
        groups.setdefault(tuple(t.dtype for t in ts), []).append(i)
    return groups


# --------------------------------------------------------------------------------------
# g^T P- g
# --------------------------------------------------------------------------------------
@triton.jit
def _quad_form_kernel(g_base, c_base, tab_ptr, out_ptr, inv_lam: tl.float64, q: tl.float64,
                      ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # (loaded here, not in a helper: tl.multiple_of must see the load itself)
    row = tab_ptr + tl.program_id(0).to(tl.int64) * 4
    og = tl.load(row)
    oc = tl.load(row + 1)
    start = tl.load(row + 2)
    end = tl.load(row + 3)
    if ALIGNED:
        og = tl.multiple_of(og, 128 // g_base.dtype.element_ty.primitive_bitwidth)
        oc = tl.multiple_of(oc, 128 // c_base.dtype.element_ty.primitive_bitwidth)
        start = tl.multiple_of(start, BLOCK)
    gp = g_base + og
    cp = c_base + oc
    ilam = scalar(inv_lam, ACC)
    qq = scalar(q, ACC)
    acc = tl.zeros((BLOCK,), ACC)
    nfull = (end - start) // BLOCK
    for it in range(0, nfull):
        off = start + it * BLOCK
        if ALIGNED:
            off = tl.multiple_of(off, BLOCK)
        idx = off + tl.arange(0, BLOCK)
        acc += quad_term(to_acc(tl.load(gp + idx), ACC), to_acc(tl.load(cp + idx), ACC), ilam, qq)
    idx = start + nfull * BLOCK + tl.arange(0, BLOCK)
    mask = idx < end
    g = to_acc(tl.load(gp + idx, mask=mask, other=0.0), ACC)
    c = to_acc(tl.load(cp + idx, mask=mask, other=0.0), ACC)
    acc += tl.where(mask, quad_term(g, c, ilam, qq), 0.0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def loss_quad_form(grads: Sequence[torch.Tensor], covs: Sequence[torch.Tensor],
                   forgetting: float, process_noise: float) -> torch.Tensor:
    if len(grads) == 0:
        return torch.zeros((), dtype=torch.float64)
    device = grads[0].device
    # read-only: a strided tensor is read through a contiguous copy (same element order)
    grads = [g.contiguous() for g in grads]
    covs = [c.contiguous() for c in covs]
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _, idx in _groups(grads, covs).items():
        gs = [grads[i] for i in idx]
        cs = [covs[i] for i in idx]
        table, chunks = _table([gs, cs], device)
        acc = C.acc_dtype(gs[0], cs[0])
        partial = torch.empty((chunks,), dtype=C.TORCH_DTYPE[acc], device=device)
        _quad_form_kernel[(chunks,)](gs[0], cs[0], table, partial, 1.0 / forgetting,
                                     process_noise, ACC=acc, ALIGNED=_aligned(gs, cs),
                                     BLOCK=BLOCK, num_warps=NUM_WARPS)
        total = total + partial.sum(dtype=torch.float64)
    return total


# --------------------------------------------------------------------------------------
# the loss step
# --------------------------------------------------------------------------------------
@triton.jit
def _loss_step_kernel(p_base, g_base, c_base, tab_ptr, coef_ptr, weight_ptr, ok_ptr,
                      inv_lam: tl.float64, q: tl.float64, lo: tl.float64, hi: tl.float64,
                      INFORMATION: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr,
                      BLOCK: tl.constexpr):
    if tl.load(ok_ptr) != 0:                       # the skip predicate, read on the device
        row = tab_ptr + tl.program_id(0).to(tl.int64) * 5
        op = tl.load(row)
        og = tl.load(row + 1)
        oc = tl.load(row + 2)
        start = tl.load(row + 3)
        end = tl.load(row + 4)
        if ALIGNED:
            op = tl.multiple_of(op, 128 // p_base.dtype.element_ty.primitive_bitwidth)
            og = tl.multiple_of(og, 128 // g_base.dtype.element_ty.primitive_bitwidth)
            oc = tl.multiple_of(oc, 128 // c_base.dtype.element_ty.primitive_bitwidth)
            start = tl.multiple_of(start, BLOCK)
        pp = p_base + op
        gp = g_base + og
        cp = c_base + oc
        coef = to_acc(tl.load(coef_ptr), ACC)
        weight = to_acc(tl.load(weight_ptr), ACC)
        ilam = scalar(inv_lam, ACC)
        qq = scalar(q, ACC)
        lo_ = scalar(lo, ACC)
        hi_ = scalar(hi, ACC)
        nfull = (end - start) // BLOCK
        for it in range(0, nfull):
            off = start + it * BLOCK
            if ALIGNED:
                off = tl.multiple_of(off, BLOCK)
            idx = off + tl.arange(0, BLOCK)
            new_p, new_c = loss_update(to_acc(tl.load(pp + idx), ACC),
                                       to_acc(tl.load(cp + idx), ACC),
                                       to_acc(tl.load(gp + idx), ACC),
                                       coef, weight, ilam, qq, lo_, hi_, INFORMATION)
            tl.store(pp + idx, to_store(new_p, p_base.dtype.element_ty))
            tl.store(cp + idx, to_store(new_c, c_base.dtype.element_ty))
        idx = start + nfull * BLOCK + tl.arange(0, BLOCK)
        mask = idx < end
        new_p, new_c = loss_update(to_acc(tl.load(pp + idx, mask=mask, other=0.0), ACC),
                                   to_acc(tl.load(cp + idx, mask=mask, other=1.0), ACC),
                                   to_acc(tl.load(gp + idx, mask=mask, other=0.0), ACC),
                                   coef, weight, ilam, qq, lo_, hi_, INFORMATION)
        tl.store(pp + idx, to_store(new_p, p_base.dtype.element_ty), mask=mask)
        tl.store(cp + idx, to_store(new_c, c_base.dtype.element_ty), mask=mask)


def loss_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               covs: Sequence[torch.Tensor], coef: torch.Tensor, weight: torch.Tensor,
               ok: torch.Tensor, forgetting: float, process_noise: float, cov_floor: float,
               cov_ceiling: float, information: bool) -> None:
    """params and covs contiguous (checked by the caller); grads any strides."""
    if len(params) == 0:
        return
    device = params[0].device
    grads = [g.contiguous() for g in grads]
    ok8 = ok.view(torch.uint8)
    for _, idx in _groups(params, grads, covs).items():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        cs = [covs[i] for i in idx]
        table, chunks = _table([ps, gs, cs], device)
        acc = C.acc_dtype(ps[0], gs[0], cs[0])
        _loss_step_kernel[(chunks,)](ps[0], gs[0], cs[0], table, coef, weight, ok8,
                                     1.0 / forgetting, process_noise, cov_floor, cov_ceiling,
                                     INFORMATION=bool(information), ACC=acc,
                                     ALIGNED=_aligned(ps, gs, cs), BLOCK=BLOCK,
                                     num_warps=NUM_WARPS)


# --------------------------------------------------------------------------------------
# apply_terms_ (docs/design.md, 2.5)
# --------------------------------------------------------------------------------------
@triton.jit
def _apply_terms_kernel(param_ptr, cov_ptr, dir_ptr, diag_ptr, ok_ptr, n,
                        inv_lam: tl.float64, q: tl.float64, lo: tl.float64, hi: tl.float64,
                        INFORMATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    if tl.load(ok_ptr) != 0:                       # the skip predicate, read on the device
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        p = to_acc(tl.load(param_ptr + idx, mask=mask, other=0.0), ACC)
        cv = to_acc(tl.load(cov_ptr + idx, mask=mask, other=1.0), ACC)
        u = to_acc(tl.load(dir_ptr + idx, mask=mask, other=0.0), ACC)
        d = to_acc(tl.load(diag_ptr + idx, mask=mask, other=0.0), ACC)
        pp = predict(cv, scalar(inv_lam, ACC), scalar(q, ACC))
        tl.store(param_ptr + idx, to_store(mean_step(p, pp, u), param_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(cov_ptr + idx,
                 to_store(cov_rule(pp, d, scalar(lo, ACC), scalar(hi, ACC), INFORMATION),
                          cov_ptr.dtype.element_ty), mask=mask)


def apply_terms_(param: torch.Tensor, cov: torch.Tensor, direction: torch.Tensor,
                 diag_term: torch.Tensor, ok: torch.Tensor, forgetting: float,
                 process_noise: float, cov_floor: float, cov_ceiling: float,
                 information: bool) -> None:
    """param, cov contiguous, n elements; direction, diag_term n elements (any strides)."""
    n = param.numel()
    if n == 0:
        return
    param, cov = param.view(-1), cov.view(-1)
    direction = direction.reshape(-1).contiguous()
    diag_term = diag_term.reshape(-1).contiguous()
    acc = C.acc_dtype(param, cov, direction, diag_term)
    block = 65536 if C.INTERPRET else 2048
    _apply_terms_kernel[(C.cdiv(n, block),)](
        param, cov, direction, diag_term, ok.view(torch.uint8), n, 1.0 / forgetting,
        process_noise, cov_floor, cov_ceiling, INFORMATION=bool(information), ACC=acc,
        BLOCK=block, num_warps=NUM_WARPS)
