"""Sample-grouped Kronecker blocks (docs/design.md, 2.1 and 2.6): GEMMs against the pairwise
products of the batch's inputs, never H.

Notation: A (B, d_in) one row per sample, D (B, K, d_out) the K observations of each
sample, the weight and its covariance (d_out, d_in), m = B K. The B (B + 1) / 2 sample
pairs p = (j, j'), j <= j', index the pairwise products Ap[p, i] = A[j, i] A[j', i].

* ``innovation_cov_kron``: Q = Ap P-^T (pairs x d_out, one GEMM over d_in that reads P
  once), then per pair the K x K block S[(j, .), (j', .)] = (D_j * Q_p) D_j'^T (a GEMM
  over d_out); the lower blocks are the mirror images.
* ``fused_update_kron`` / ``step_terms_kron``: with W = F^T F, the per-pair weights
  G[p, o] = (2 - [j = j']) sum_{k,k'} W[(j,k),(j',k')] D[j,k,o] D[j',k',o] (small:
  pairs x d_out) and Dc[j, o] = sum_k coef[j,k] D[j,k,o] are formed first; then one kernel
  tiles the weight: per (d_out, d_in) tile, the step term Dc^T A (a ``tl.dot`` over the
  batch) and the diagonal term G^T Ap (a ``tl.dot`` over the pairs, Ap built in registers
  from two gathered rows of A) are accumulated in registers and the mean and covariance
  update is the epilogue. H, the per-parameter step and the per-parameter diagonal never
  reach memory: the weight and its covariance are read and written once.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _common as C
from .dense import SMALL_M, _load_tile
from .kk_math import cov_rule, mean_step, predict, scalar, to_acc, to_store


@functools.lru_cache(maxsize=64)
def _pairs_cached(batch: int, device_type: str, index):
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    idx = torch.triu_indices(batch, batch, device=device).to(torch.int32)
    return idx[0].contiguous(), idx[1].contiguous()


def pairs(batch: int, device: torch.device):
    """(j, j') of every sample pair j <= j', as two int32 device tensors (cached)."""
    return _pairs_cached(batch, device.type, device.index)


def pair_products(inputs: torch.Tensor, pj: torch.Tensor, pk: torch.Tensor, dtype) -> torch.Tensor:
    """Ap[p, i] = A[j_p, i] A[j'_p, i] (pairs x d_in, contiguous): the GEMM operand of every
    Kronecker kernel, O(B^2 d_in), formed once on the device."""
    a = inputs.to(dtype)
    return (a[pj.long()] * a[pk.long()]).contiguous()


def _block_k(k: int):
    """Class tile of the per-pair kernels: exact (broadcast-and-sum) for K <= 8, else a
    16 or 32 wide tl.dot tile (short K: FMA dots keep it in registers)."""
    small = k <= SMALL_M
    return (C.pow2(k) if small else min(max(16, C.pow2(k)), 32)), small


def _prune_pair(configs, named_args, **kwargs):
    """The small path holds BLOCK_K^2 x BLOCK_O products; the dot path's K is BLOCK_O."""
    bk = kwargs.get("BLOCK_K", 1)
    limit = 16384 // (bk * bk) if kwargs.get("SMALL", True) else 64
    kept = [c for c in configs if c.kwargs["BLOCK_O"] <= limit]
    return kept or configs[:1]


# --------------------------------------------------------------------------------------
# S = H diag(P-) H^T
# --------------------------------------------------------------------------------------
@C.autotune(
    gpu=[triton.Config({"BLOCK_P": bp, "BLOCK_O": bo, "BLOCK_I": bi}, num_warps=w, num_stages=s)
         for bp, bo, bi, w, s in [(16, 64, 32, 4, 3), (32, 64, 32, 4, 3), (64, 64, 32, 4, 3),
                                  (64, 128, 32, 8, 3), (128, 64, 32, 8, 3),
                                  (128, 128, 32, 8, 3)]],
    interpreted=triton.Config({"BLOCK_P": 64, "BLOCK_O": 64, "BLOCK_I": 256}, num_warps=4),
    key=["npairs", "o_bucket", "i_bucket", "ACC"],
)
@triton.jit
def _pair_q_kernel(ap_ptr, cov_ptr, q_ptr, npairs, d_out, d_in, s_c0, s_c1,
                   inv_lam: tl.float64, q: tl.float64, o_bucket, i_bucket,
                   ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """Q[p, o] = sum_i Ap[p, i] P-[o, i]. Consecutive programs share an o-tile, so the tile
    of P is read from memory about once."""
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    ilam = scalar(inv_lam, ACC)
    qq = scalar(q, ACC)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mp = p < npairs
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = o < d_out
    acc = tl.zeros((BLOCK_P, BLOCK_O), ACC)
    for i0 in range(0, d_in, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        mi = i < d_in
        ap = _load_tile(ap_ptr, p, i, d_in, 1, mp, mi, ACC)                           # (P, I)
        pp = predict(_load_tile(cov_ptr, o, i, s_c0, s_c1, mo, mi, ACC), ilam, qq)     # (O, I)
        acc = tl.dot(ap, tl.trans(pp), acc, input_precision=PRECISION, out_dtype=ACC)
    offs = p[:, None].to(tl.int64) * d_out + o[None, :]
    tl.store(q_ptr + offs, acc, mask=mp[:, None] & mo[None, :])


@C.autotune(
    gpu=[triton.Config({"BLOCK_O": bo}, num_warps=w, num_stages=s)
         for bo, w, s in [(32, 4, 3), (64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 2)]],
    interpreted=triton.Config({"BLOCK_O": 256}, num_warps=4),
    key=["npairs", "K", "o_bucket", "ACC", "BLOCK_K", "SMALL"],
    prune_configs_by={"early_config_prune": _prune_pair},
)
@triton.jit
def _pair_s_kernel(d_ptr, q_ptr, pj_ptr, pk_ptr, out_ptr, npairs, K, d_out, o_per_split,
                   s_d0, s_d1, s_d2, o_bucket, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
                   SMALL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_O: tl.constexpr):
    """out[split, p, k, k'] = sum_{o in split} D[j,k,o] D[j',k',o] Q[p,o] for one K-tile pair."""
    p = tl.program_id(0)
    tk = tl.program_id(1)
    split = tl.program_id(2)
    tiles = tl.cdiv(K, BLOCK_K)
    ka = (tk // tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    kb = (tk % tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    ma = ka < K
    mb = kb < K
    j = tl.load(pj_ptr + p).to(tl.int64)
    jj = tl.load(pk_ptr + p).to(tl.int64)
    start = split * o_per_split
    end = tl.minimum(start + o_per_split, d_out)
    if SMALL:
        acc3 = tl.zeros((BLOCK_K, BLOCK_K, BLOCK_O), ACC)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_K), ACC)
    for o0 in range(start, end, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        mo = o < end
        qv = to_acc(tl.load(q_ptr + p.to(tl.int64) * d_out + o, mask=mo, other=0.0), ACC)
        da = _load_tile(d_ptr + j * s_d0, ka, o, s_d1, s_d2, ma, mo, ACC) * qv[None, :]
        db = _load_tile(d_ptr + jj * s_d0, kb, o, s_d1, s_d2, mb, mo, ACC)
        if SMALL:
            acc3 += da[:, None, :] * db[None, :, :]
        else:
            acc = tl.dot(da, tl.trans(db), acc, input_precision=PRECISION, out_dtype=ACC)
    if SMALL:
        acc = tl.sum(acc3, axis=2)
    base = (split.to(tl.int64) * npairs + p) * K * K
    tl.store(out_ptr + base + ka[:, None] * K + kb[None, :], acc, mask=ma[:, None] & mb[None, :])


def innovation_cov_kron(inputs: torch.Tensor, grad_outputs: torch.Tensor, cov: torch.Tensor,
                        forgetting: float, process_noise: float) -> torch.Tensor:
    """(B K, B K) float64 S of a sample-grouped block; any strides."""
    batch, k, d_out = grad_outputs.shape
    d_in = inputs.shape[1]
    m = batch * k
    device = inputs.device
    if m == 0:
        return torch.zeros((0, 0), dtype=torch.float64, device=device)
    acc = C.acc_dtype(inputs, grad_outputs, cov)
    tdt = C.TORCH_DTYPE[acc]
    pj, pk = pairs(batch, device)
    npairs = pj.numel()
    prec = C.precision(acc)
    qmat = torch.empty((npairs, d_out), dtype=tdt, device=device)
    if d_in == 0 or d_out == 0:
        qmat.zero_()
    else:
        grid = lambda meta: (C.cdiv(npairs, meta["BLOCK_P"]), C.cdiv(d_out, meta["BLOCK_O"]))
        ap = pair_products(inputs, pj, pk, tdt)
        _pair_q_kernel[grid](ap, cov, qmat, npairs, d_out, d_in, cov.stride(0), cov.stride(1),
                             1.0 / forgetting, process_noise, C.bucket(d_out), C.bucket(d_in),
                             ACC=acc, PRECISION=prec)
    block_k, small = _block_k(k)
    tiles = C.cdiv(k, block_k)
    quantum = 256
    want = max(1, C.programs_wanted(device) // (npairs * tiles * tiles))
    splits = max(1, min(want, C.cdiv(d_out, quantum)))
    o_per_split = C.cdiv(C.cdiv(max(d_out, 1), splits), quantum) * quantum
    splits = max(1, C.cdiv(d_out, o_per_split))
    blocks = torch.empty((splits, npairs, k, k), dtype=tdt, device=device)
    if d_out == 0:
        blocks.zero_()
    else:
        _pair_s_kernel[(npairs, tiles * tiles, splits)](
            grad_outputs, qmat, pj, pk, blocks, npairs, k, d_out, o_per_split,
            grad_outputs.stride(0), grad_outputs.stride(1), grad_outputs.stride(2),
            C.bucket(d_out), ACC=acc, BLOCK_K=block_k, SMALL=small, PRECISION=prec)
    return _assemble(blocks.sum(0, dtype=torch.float64), pj, pk, batch, k)


def _assemble(blocks: torch.Tensor, pj: torch.Tensor, pk: torch.Tensor, batch: int,
              k: int) -> torch.Tensor:
    """S from its blocks on and above the block diagonal: S = Z + Z^T with Z the upper
    blocks and half of each diagonal block, so S is exactly symmetric."""
    half = torch.where(pj == pk, 0.5, 1.0).to(blocks.dtype)
    z = torch.zeros((batch, batch, k, k), dtype=blocks.dtype, device=blocks.device)
    z[pj.long(), pk.long()] = blocks * half[:, None, None]
    z = z.permute(0, 2, 1, 3).reshape(batch * k, batch * k)
    return z + z.T


# --------------------------------------------------------------------------------------
# The fused update (and the step terms)
# --------------------------------------------------------------------------------------
@C.autotune(
    gpu=[triton.Config({"BLOCK_O": bo}, num_warps=w, num_stages=s)
         for bo, w, s in [(32, 4, 3), (64, 4, 3), (128, 4, 3), (256, 8, 2)]],
    interpreted=triton.Config({"BLOCK_O": 256}, num_warps=4),
    key=["npairs", "K", "o_bucket", "ACC", "BLOCK_K", "SMALL"],
    prune_configs_by={"early_config_prune": _prune_pair},
)
@triton.jit
def _pair_g_kernel(d_ptr, w_ptr, pj_ptr, pk_ptr, g_ptr, npairs, K, d_out, m,
                   s_d0, s_d1, s_d2, s_w0, s_w1, o_bucket, ACC: tl.constexpr,
                   BLOCK_K: tl.constexpr, SMALL: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_O: tl.constexpr):
    """G[p, o] = (2 - [j = j']) sum_{k,k'} W[(j,k),(j',k')] D[j,k,o] D[j',k',o]."""
    p = tl.program_id(0)
    pid_o = tl.program_id(1)
    j = tl.load(pj_ptr + p).to(tl.int64)
    jj = tl.load(pk_ptr + p).to(tl.int64)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = o < d_out
    kr = tl.arange(0, BLOCK_K)
    g = tl.zeros((BLOCK_O,), ACC)
    for k0 in range(0, K, BLOCK_K):
        ka = k0 + kr
        ma = ka < K
        v = tl.zeros((BLOCK_K, BLOCK_O), ACC)
        for l0 in range(0, K, BLOCK_K):
            kb = l0 + kr
            mb = kb < K
            wt = _load_tile(w_ptr, j * K + ka, jj * K + kb, s_w0, s_w1, ma, mb, ACC)   # (K, K)
            db = _load_tile(d_ptr + jj * s_d0, kb, o, s_d1, s_d2, mb, mo, ACC)          # (K, O)
            if SMALL:
                v += tl.sum(wt[:, :, None] * db[None, :, :], axis=1)
            else:
                v = tl.dot(wt, db, v, input_precision=PRECISION, out_dtype=ACC)
        da = _load_tile(d_ptr + j * s_d0, ka, o, s_d1, s_d2, ma, mo, ACC)
        g += tl.sum(da * v, axis=0)
    g = g * tl.where(j == jj, 1.0, 2.0).to(ACC)
    tl.store(g_ptr + p.to(tl.int64) * d_out + o, g, mask=mo)


@triton.jit
def _kron_update_body(w_ptr, cov_ptr, a_ptr, dc_ptr, g_ptr, ap_ptr, u_ptr, dd_ptr,
                      batch, npairs, d_out, d_in, s_a0, s_a1, inv_lam, q, lo, hi,
                      TERMS: tl.constexpr, INFORMATION: tl.constexpr, ACC: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mo = o < d_out
    mi = i < d_in
    # step term u = Dc^T A over the batch
    u = tl.zeros((BLOCK_O, BLOCK_I), ACC)
    for b0 in range(0, batch, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mb = b < batch
        dct = _load_tile(dc_ptr, o, b, 1, d_out, mo, mb, ACC)                    # (O, B)
        at = _load_tile(a_ptr, b, i, s_a0, s_a1, mb, mi, ACC)                     # (B, I)
        u = tl.dot(dct, at, u, input_precision=PRECISION, out_dtype=ACC)
    # diagonal term G^T Ap over the sample pairs
    dg = tl.zeros((BLOCK_O, BLOCK_I), ACC)
    for p0 in range(0, npairs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mp = p < npairs
        gt = _load_tile(g_ptr, o, p, 1, d_out, mo, mp, ACC)                       # (O, P)
        ap = _load_tile(ap_ptr, p, i, d_in, 1, mp, mi, ACC)                       # (P, I)
        dg = tl.dot(gt, ap, dg, input_precision=PRECISION, out_dtype=ACC)
    offs = o[:, None].to(tl.int64) * d_in + i[None, :]
    mask = mo[:, None] & mi[None, :]
    if TERMS:
        tl.store(u_ptr + offs, u, mask=mask)
        tl.store(dd_ptr + offs, dg, mask=mask)
    else:
        w = to_acc(tl.load(w_ptr + offs, mask=mask, other=0.0), ACC)
        cv = to_acc(tl.load(cov_ptr + offs, mask=mask, other=1.0), ACC)
        pp = predict(cv, scalar(inv_lam, ACC), scalar(q, ACC))
        tl.store(w_ptr + offs, to_store(mean_step(w, pp, u), w_ptr.dtype.element_ty), mask=mask)
        tl.store(cov_ptr + offs,
                 to_store(cov_rule(pp, dg, scalar(lo, ACC), scalar(hi, ACC), INFORMATION),
                          cov_ptr.dtype.element_ty), mask=mask)


_KRON_GPU = [triton.Config({"BLOCK_O": bo, "BLOCK_I": bi, "BLOCK_P": bp}, num_warps=w, num_stages=s)
             for bo, bi, bp, w, s in [(64, 64, 16, 4, 3), (64, 64, 32, 4, 3), (64, 64, 32, 8, 3),
                                      (32, 64, 32, 4, 3), (64, 32, 32, 4, 3), (128, 64, 32, 8, 3),
                                      (64, 128, 32, 8, 3), (128, 128, 32, 8, 3),
                                      (128, 128, 16, 8, 3)]]
_KRON_INTERP = triton.Config({"BLOCK_O": 64, "BLOCK_I": 128, "BLOCK_P": 64}, num_warps=4)
_KRON_KEY = ["batch", "npairs", "o_bucket", "i_bucket", "INFORMATION", "ACC"]


def _prune_kron(configs, named_args, **kwargs):
    """float64 arithmetic or 16-bit weights: tiles up to 64 x 128 (larger ones spill)."""
    w = named_args.get("w_ptr", named_args.get("u_ptr"))
    wide = kwargs.get("ACC") == tl.float64 or (w is not None and w.element_size() == 2)
    kept = [c for c in configs
            if not (wide and c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_I"] > 8192)]
    return kept or configs[:1]


@C.autotune(gpu=_KRON_GPU, interpreted=_KRON_INTERP, key=_KRON_KEY,
            prune_configs_by={"early_config_prune": _prune_kron},
            restore_value=["w_ptr", "cov_ptr"])
@triton.jit
def _kron_update_kernel(w_ptr, cov_ptr, a_ptr, dc_ptr, g_ptr, ap_ptr, ok_ptr,
                        batch, npairs, d_out, d_in, s_a0, s_a1, inv_lam: tl.float64,
                        q: tl.float64, lo: tl.float64, hi: tl.float64, o_bucket, i_bucket,
                        INFORMATION: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    if tl.load(ok_ptr) != 0:                       # the skip predicate, read on the device
        _kron_update_body(w_ptr, cov_ptr, a_ptr, dc_ptr, g_ptr, ap_ptr, w_ptr, cov_ptr,
                          batch, npairs, d_out, d_in, s_a0, s_a1, inv_lam, q, lo, hi,
                          False, INFORMATION, ACC, PRECISION, BLOCK_O, BLOCK_I, BLOCK_B, BLOCK_P)


@C.autotune(gpu=_KRON_GPU, interpreted=_KRON_INTERP, key=_KRON_KEY,
            prune_configs_by={"early_config_prune": _prune_kron})
@triton.jit
def _kron_terms_kernel(a_ptr, dc_ptr, g_ptr, ap_ptr, u_ptr, dd_ptr,
                       batch, npairs, d_out, d_in, s_a0, s_a1, o_bucket, i_bucket,
                       INFORMATION: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    _kron_update_body(u_ptr, dd_ptr, a_ptr, dc_ptr, g_ptr, ap_ptr, u_ptr, dd_ptr,
                      batch, npairs, d_out, d_in, s_a0, s_a1, 1.0, 0.0, 0.0, 0.0,
                      True, INFORMATION, ACC, PRECISION, BLOCK_O, BLOCK_I, BLOCK_B, BLOCK_P)


def _prepare(inputs, grad_outputs, coef, whitening, acc):
    """(Dc (B, d_out), G (pairs, d_out), pj, pk) in the arithmetic dtype, on the device."""
    batch, k, d_out = grad_outputs.shape
    m = batch * k
    device = inputs.device
    tdt = C.TORCH_DTYPE[acc]
    # Dc[j, o] = sum_k coef[j, k] D[j, k, o]: B K d_out work, in torch
    dc = torch.bmm(coef.reshape(batch, 1, k).to(tdt), grad_outputs.to(tdt)).reshape(batch, d_out)
    # W = F^T F (m x m, float64: the m x m work)
    f = whitening.to(torch.float64)
    wmat = f.T @ f
    pj, pk = pairs(batch, device)
    npairs = pj.numel()
    g = torch.empty((npairs, d_out), dtype=tdt, device=device)
    if d_out:
        block_k, small = _block_k(k)
        grid = lambda meta: (npairs, C.cdiv(d_out, meta["BLOCK_O"]))
        _pair_g_kernel[grid](grad_outputs, wmat, pj, pk, g, npairs, k, d_out, m,
                             grad_outputs.stride(0), grad_outputs.stride(1),
                             grad_outputs.stride(2), wmat.stride(0), wmat.stride(1),
                             C.bucket(d_out), ACC=acc, BLOCK_K=block_k, SMALL=small,
                             PRECISION=C.precision(acc))
    return dc.contiguous(), g, pair_products(inputs, pj, pk, tdt)


def _block_b(batch: int) -> int:
    return min(max(16, C.pow2(batch)), 32)


def _grid2(d_out, d_in):
    return lambda meta: (C.cdiv(d_out, meta["BLOCK_O"]), C.cdiv(d_in, meta["BLOCK_I"]))


def fused_update_kron_(weight: torch.Tensor, cov: torch.Tensor, inputs: torch.Tensor,
                       grad_outputs: torch.Tensor, coef: torch.Tensor, whitening: torch.Tensor,
                       ok: torch.Tensor, forgetting: float, process_noise: float,
                       cov_floor: float, cov_ceiling: float, information: bool) -> None:
    """weight, cov contiguous (d_out, d_in); inputs (B, d_in), grad_outputs (B, K, d_out)."""
    batch, k, d_out = grad_outputs.shape
    d_in = inputs.shape[1]
    if d_out == 0 or d_in == 0:
        return
    acc = C.acc_dtype(weight, cov, inputs, grad_outputs)
    dc, g, ap = _prepare(inputs, grad_outputs, coef, whitening, acc)
    _kron_update_kernel[_grid2(d_out, d_in)](
        weight, cov, inputs, dc, g, ap, ok.view(torch.uint8), batch, ap.shape[0], d_out,
        d_in, inputs.stride(0), inputs.stride(1), 1.0 / forgetting, process_noise, cov_floor,
        cov_ceiling, C.bucket(d_out), C.bucket(d_in), INFORMATION=bool(information), ACC=acc,
        PRECISION=C.precision(acc), BLOCK_B=_block_b(batch))


def step_terms_kron(inputs: torch.Tensor, grad_outputs: torch.Tensor, coef: torch.Tensor,
                    whitening: torch.Tensor):
    """(step term, diagonal term), each (d_out, d_in), float32 (float64 if A or D is)."""
    batch, k, d_out = grad_outputs.shape
    d_in = inputs.shape[1]
    acc = C.acc_dtype(inputs, grad_outputs)
    tdt = C.TORCH_DTYPE[acc]
    u = torch.empty((d_out, d_in), dtype=tdt, device=inputs.device)
    dd = torch.empty((d_out, d_in), dtype=tdt, device=inputs.device)
    if d_out == 0 or d_in == 0:
        return u, dd
    dc, g, ap = _prepare(inputs, grad_outputs, coef, whitening, acc)
    _kron_terms_kernel[_grid2(d_out, d_in)](
        inputs, dc, g, ap, u, dd, batch, ap.shape[0], d_out, d_in, inputs.stride(0),
        inputs.stride(1), C.bucket(d_out), C.bucket(d_in), INFORMATION=False, ACC=acc,
        PRECISION=C.precision(acc), BLOCK_B=_block_b(batch))
    return u, dd
