"""Dense blocks: S = H diag(P-) H^T, and the fused mean / covariance update.

* ``innovation_cov_dense``: split-K over the parameters. Each program streams a range of
  columns of H (m, n) and P once and accumulates an m x m tile: ``tl.dot`` of (H * P-) with
  H^T for m >= 9 (padded to 16), a broadcast-and-sum for m <= 8 (a 16-wide dot would do
  16^2 / m^2 times the work). Only the tiles on and above the diagonal are computed; the
  partial tiles are summed in float64 on the device and mirrored, so S is exactly
  symmetric.
* ``fused_update_dense`` (and ``step_terms_dense``, the same kernel storing the two terms):
  one program per tile of columns reads H's columns once, forms u = H^T coef and
  d = column sums of (F H)^2 (``tl.dot`` of F with the H tile; broadcast-and-sum for
  m <= 8) in registers, and applies the update in the epilogue. H is read once, param and
  cov read and written once; nothing else touches memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from .kk_math import cov_rule, mean_step, predict, scalar, to_acc, to_store

SMALL_M = 8          # m <= SMALL_M: broadcast-and-sum instead of tl.dot (needs >= 16)
MAX_TILE_M = 64      # S tiles of up to 64 x 64 (larger m: the tiles on and above the diagonal)
MAX_BLOCK_L = 128    # rows of F H held by one program of the update


@triton.jit
def _load_tile(ptr, rows, cols, s_r, s_c, mask_r, mask_c, ACC: tl.constexpr):
    offs = rows[:, None].to(tl.int64) * s_r + cols[None, :].to(tl.int64) * s_c
    x = tl.load(ptr + offs, mask=mask_r[:, None] & mask_c[None, :], other=0.0)
    return to_acc(x, ACC)


# --------------------------------------------------------------------------------------
# S = H diag(P-) H^T
# --------------------------------------------------------------------------------------
def _prune_innovation(configs, named_args, **kwargs):
    """Register budgets: the small-m path keeps a BLOCK_M^2 x BLOCK_N accumulator; the dot
    path's K is BLOCK_N, and a float32 'ieee' dot (FMA) holds its operands' K slices in
    registers, so the larger the tile, the shorter K."""
    bm = kwargs.get("BLOCK_M", 16)
    if kwargs.get("SMALL", False):
        limit = 16384 // (bm * bm)
    else:
        limit = 128 if bm <= 16 else (64 if bm <= 32 else 32)
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= limit]
    return kept or configs[:1]


@C.autotune(
    gpu=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
         for bn, w, s in [(16, 8, 3), (32, 4, 3), (32, 8, 3), (64, 4, 3), (64, 8, 3),
                          (128, 8, 3), (256, 8, 2), (512, 8, 2), (1024, 8, 2), (2048, 8, 2)]],
    interpreted=triton.Config({"BLOCK_N": 2048}, num_warps=4),
    key=["m", "n_bucket", "BLOCK_M", "SMALL", "ACC"],
    prune_configs_by={"early_config_prune": _prune_innovation},
)
@triton.jit
def _innovation_dense_kernel(jac_ptr, cov_ptr, out_ptr, m, n, s_jm, s_jn, s_c, cols_per_split,
                             inv_lam: tl.float64, q: tl.float64, n_bucket,
                             ACC: tl.constexpr, BLOCK_M: tl.constexpr, SMALL: tl.constexpr,
                             PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    ti = tl.program_id(0)                          # tiles vary fastest: the programs of one
    tj = tl.program_id(1)                          # column range run together and share it
    split = tl.program_id(2)                       # in L2
    if tj >= ti:                                   # tiles on and above the diagonal
        ilam = scalar(inv_lam, ACC)
        qq = scalar(q, ACC)
        ri = ti * BLOCK_M + tl.arange(0, BLOCK_M)
        rj = tj * BLOCK_M + tl.arange(0, BLOCK_M)
        mi = ri < m
        mj = rj < m
        start = split * cols_per_split
        end = tl.minimum(start + cols_per_split, n)
        if SMALL:
            acc3 = tl.zeros((BLOCK_M, BLOCK_M, BLOCK_N), ACC)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_M), ACC)
        for c0 in range(start, end, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            mc = cols < end
            p = predict(to_acc(tl.load(cov_ptr + cols.to(tl.int64) * s_c, mask=mc, other=0.0),
                               ACC), ilam, qq)
            hi = _load_tile(jac_ptr, ri, cols, s_jm, s_jn, mi, mc, ACC)
            hj = _load_tile(jac_ptr, rj, cols, s_jm, s_jn, mj, mc, ACC)
            hp = hi * p[None, :]
            if SMALL:
                acc3 += hp[:, None, :] * hj[None, :, :]
            else:
                acc = tl.dot(hp, tl.trans(hj), acc, input_precision=PRECISION, out_dtype=ACC)
        if SMALL:
            acc = tl.sum(acc3, axis=2)
        offs = split.to(tl.int64) * m * m + ri[:, None] * m + rj[None, :]
        tl.store(out_ptr + offs, acc, mask=mi[:, None] & mj[None, :])


def innovation_cov_dense(jac: torch.Tensor, cov: torch.Tensor, forgetting: float,
                         process_noise: float) -> torch.Tensor:
    """H diag(P-) H^T (m, m) float64; jac (m, n) any strides, cov n elements."""
    m, n = jac.shape
    cov = cov.reshape(-1)
    acc = C.acc_dtype(jac, cov)
    block_m, small = _block_m(m)
    tiles = C.cdiv(m, block_m)
    if m == 0:
        return torch.zeros((0, 0), dtype=torch.float64, device=jac.device)
    # split-K: enough programs to fill the device, each a multiple of the largest BLOCK_N
    quantum = 2048 if C.INTERPRET else 1024
    want = max(1, C.programs_wanted(jac.device) // (tiles * (tiles + 1) // 2))
    splits = max(1, min(want, C.cdiv(n, quantum)))
    cols_per_split = C.cdiv(C.cdiv(max(n, 1), splits), quantum) * quantum
    splits = max(1, C.cdiv(n, cols_per_split))
    partial = torch.empty((splits, m, m), dtype=C.TORCH_DTYPE[acc], device=jac.device)
    if n == 0:
        partial.zero_()
    else:
        _innovation_dense_kernel[(tiles, tiles, splits)](
            jac, cov, partial, m, n, jac.stride(0), jac.stride(1), cov.stride(0), cols_per_split,
            1.0 / forgetting, process_noise, C.bucket(n),
            ACC=acc, BLOCK_M=block_m, SMALL=small, PRECISION=C.precision(acc))
    return mirror_upper(partial.sum(0, dtype=torch.float64))


def _block_m(m: int):
    """(S tile size, small-m path?) for m observations."""
    small = m <= SMALL_M
    return (C.pow2(m) if small else min(max(16, C.pow2(m)), MAX_TILE_M)), small


def mirror_upper(s: torch.Tensor) -> torch.Tensor:
    """The exactly symmetric matrix whose upper triangle (diagonal included) is s's."""
    upper = torch.triu(s, 1)
    return upper + upper.T + torch.diag_embed(torch.diagonal(s))


# --------------------------------------------------------------------------------------
# The fused update (and the step terms it is made of)
# --------------------------------------------------------------------------------------
def _prune_update(configs, named_args, **kwargs):
    """Register budgets: the small-m path holds BLOCK_L^2 x BLOCK_N products, the dot path a
    BLOCK_L x BLOCK_N accumulator (its K is BLOCK_K = 16)."""
    bl = kwargs.get("BLOCK_L", 16)
    if kwargs.get("SMALL", False):
        limit = 16384 // (bl * bl)
    else:
        limit = 512 if bl <= 16 else (256 if bl <= 32 else 64)
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= limit]
    return kept or configs[:1]


@triton.jit
def _dense_update_body(param_ptr, cov_ptr, jac_ptr, coef_ptr, white_ptr, u_ptr, d_ptr,
                       m, n, s_jm, s_jn, s_c, s_w0, s_w1, inv_lam, q, lo, hi,
                       TERMS: tl.constexpr, INFORMATION: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, SMALL: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mc = cols < n
    rows = tl.arange(0, BLOCK_L)
    if SMALL:
        mr = rows < m
        h = _load_tile(jac_ptr, rows, cols, s_jm, s_jn, mr, mc, ACC)              # (L, N)
        c = to_acc(tl.load(coef_ptr + rows * s_c, mask=mr, other=0.0), ACC)
        f = _load_tile(white_ptr, rows, rows, s_w0, s_w1, mr, mr, ACC)            # (L, L)
        u = tl.sum(c[:, None] * h, axis=0)
        fh = tl.sum(f[:, :, None] * h[None, :, :], axis=1)                        # (L, N)
        d = tl.sum(fh * fh, axis=0)
    else:
        u = tl.zeros((BLOCK_N,), ACC)
        d = tl.zeros((BLOCK_N,), ACC)
        for r0 in range(0, m, BLOCK_L):
            r = r0 + rows
            fh = tl.zeros((BLOCK_L, BLOCK_N), ACC)
            for k0 in range(0, m, BLOCK_K):                 # short K: FMA dots keep it in registers
                k = k0 + tl.arange(0, BLOCK_K)
                mk = k < m
                h = _load_tile(jac_ptr, k, cols, s_jm, s_jn, mk, mc, ACC)          # (K, N)
                if r0 == 0:
                    c = to_acc(tl.load(coef_ptr + k * s_c, mask=mk, other=0.0), ACC)
                    u += tl.sum(c[:, None] * h, axis=0)
                f = _load_tile(white_ptr, r, k, s_w0, s_w1, r < m, mk, ACC)        # (L, K)
                fh = tl.dot(f, h, fh, input_precision=PRECISION, out_dtype=ACC)
            d += tl.sum(fh * fh, axis=0)
    if TERMS:
        tl.store(u_ptr + cols, u, mask=mc)
        tl.store(d_ptr + cols, d, mask=mc)
    else:
        p = to_acc(tl.load(param_ptr + cols, mask=mc, other=0.0), ACC)
        cv = to_acc(tl.load(cov_ptr + cols, mask=mc, other=1.0), ACC)
        pp = predict(cv, scalar(inv_lam, ACC), scalar(q, ACC))
        new_p = mean_step(p, pp, u)
        new_c = cov_rule(pp, d, scalar(lo, ACC), scalar(hi, ACC), INFORMATION)
        tl.store(param_ptr + cols, to_store(new_p, param_ptr.dtype.element_ty), mask=mc)
        tl.store(cov_ptr + cols, to_store(new_c, cov_ptr.dtype.element_ty), mask=mc)


_UPDATE_GPU = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bn, w, s in [(32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 4, 2), (128, 8, 2),
                                (256, 4, 2), (256, 8, 2), (512, 8, 2), (1024, 8, 2),
                                (2048, 8, 2), (4096, 8, 2)]]
_UPDATE_INTERP = triton.Config({"BLOCK_N": 2048}, num_warps=4)
_UPDATE_KEY = ["m", "n_bucket", "BLOCK_L", "SMALL", "INFORMATION", "ACC"]


@C.autotune(gpu=_UPDATE_GPU, interpreted=_UPDATE_INTERP, key=_UPDATE_KEY,
            prune_configs_by={"early_config_prune": _prune_update},
            restore_value=["param_ptr", "cov_ptr"])
@triton.jit
def _dense_update_kernel(param_ptr, cov_ptr, jac_ptr, coef_ptr, white_ptr, ok_ptr,
                         m, n, s_jm, s_jn, s_c, s_w0, s_w1, inv_lam: tl.float64,
                         q: tl.float64, lo: tl.float64, hi: tl.float64, n_bucket,
                         INFORMATION: tl.constexpr, ACC: tl.constexpr, BLOCK_L: tl.constexpr,
                         BLOCK_K: tl.constexpr, SMALL: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    if tl.load(ok_ptr) != 0:                       # the skip predicate, read on the device
        _dense_update_body(param_ptr, cov_ptr, jac_ptr, coef_ptr, white_ptr, param_ptr, cov_ptr,
                           m, n, s_jm, s_jn, s_c, s_w0, s_w1, inv_lam, q, lo, hi,
                           False, INFORMATION, ACC, BLOCK_L, BLOCK_K, SMALL, PRECISION, BLOCK_N)


@C.autotune(gpu=_UPDATE_GPU, interpreted=_UPDATE_INTERP, key=_UPDATE_KEY,
            prune_configs_by={"early_config_prune": _prune_update})
@triton.jit
def _dense_terms_kernel(jac_ptr, coef_ptr, white_ptr, u_ptr, d_ptr,
                        m, n, s_jm, s_jn, s_c, s_w0, s_w1, n_bucket,
                        INFORMATION: tl.constexpr, ACC: tl.constexpr, BLOCK_L: tl.constexpr,
                        BLOCK_K: tl.constexpr, SMALL: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    _dense_update_body(u_ptr, d_ptr, jac_ptr, coef_ptr, white_ptr, u_ptr, d_ptr,
                       m, n, s_jm, s_jn, s_c, s_w0, s_w1, 1.0, 0.0, 0.0, 0.0,
                       True, INFORMATION, ACC, BLOCK_L, BLOCK_K, SMALL, PRECISION, BLOCK_N)


def _block_l(m: int):
    small = m <= SMALL_M
    return (C.pow2(m) if small else min(max(16, C.pow2(m)), MAX_BLOCK_L)), small


def _block_k(block_l: int) -> int:
    """K of the update's dot: 16 (float32 FMA dots hold their K slices in registers); the
    same under the interpreter, so the tests run the loop the GPU runs."""
    return min(block_l, 16)


def _grid(n):
    return lambda meta: (max(1, C.cdiv(n, meta["BLOCK_N"])),)


def fused_update_dense_(param: torch.Tensor, cov: torch.Tensor, jac: torch.Tensor,
                        coef: torch.Tensor, whitening: torch.Tensor, ok: torch.Tensor,
                        forgetting: float, process_noise: float, cov_floor: float,
                        cov_ceiling: float, information: bool) -> None:
    """param, cov: contiguous, n elements; jac (m, n) any strides; coef (m,); whitening (m, m)."""
    m, n = jac.shape
    if n == 0 or m == 0:
        return
    param, cov = param.view(-1), cov.view(-1)
    acc = C.acc_dtype(param, cov, jac)
    block_l, small = _block_l(m)
    _dense_update_kernel[_grid(n)](
        param, cov, jac, coef, whitening, ok.view(torch.uint8),
        m, n, jac.stride(0), jac.stride(1), coef.stride(0), whitening.stride(0),
        whitening.stride(1), 1.0 / forgetting, process_noise, cov_floor, cov_ceiling,
        C.bucket(n), INFORMATION=bool(information), ACC=acc, BLOCK_L=block_l,
        BLOCK_K=_block_k(block_l), SMALL=small, PRECISION=C.precision(acc))


def step_terms_dense(jac: torch.Tensor, coef: torch.Tensor, whitening: torch.Tensor):
    """(H^T coef, column sums of (F H)^2), each (n,) in float32 (float64 if jac is)."""
    m, n = jac.shape
    acc = C.acc_dtype(jac)
    dtype = C.TORCH_DTYPE[acc]
    u = torch.empty((n,), dtype=dtype, device=jac.device)
    d = torch.empty((n,), dtype=dtype, device=jac.device)
    if n == 0:
        return u, d
    if m == 0:
        return u.zero_(), d.zero_()
    block_l, small = _block_l(m)
    _dense_terms_kernel[_grid(n)](
        jac, coef, whitening, u, d, m, n, jac.stride(0), jac.stride(1), coef.stride(0),
        whitening.stride(0), whitening.stride(1), C.bucket(n),
        INFORMATION=False, ACC=acc, BLOCK_L=block_l, BLOCK_K=_block_k(block_l), SMALL=small,
        PRECISION=C.precision(acc))
    return u, d
