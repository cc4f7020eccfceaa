"""Compile every Triton kernel for real GPU targets without a GPU (a development check).

The interpreter runs the kernels' arithmetic on CPU tensors but does not compile them: it
accepts ``tl.dot`` shapes, dtypes and casts that the compiler rejects, and says nothing
about registers, spills or vectorised memory access. This module compiles each kernel, in
each variant the wrappers launch (dtypes, small-m / dot paths, rules) and each autotuning
configuration, to PTX and a cubin for NVIDIA Ampere (sm_80) and Hopper (sm_90) with
Triton's bundled ptxas, and reports per variant the registers, spilled bytes, shared memory
and whether the streaming loads are 128-bit vectors.

    python tools/triton_compile_check.py [--arch 80 90] [--quick] [--json out.json]

Run it with TRITON_INTERPRET unset (the kernels must be JIT functions, not interpreted). It is
a development tool, not part of the installed package: it imports the kernels from the
installed (or, with PYTHONPATH=., the checked-out) ``kalman_kernels``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

if os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0"):
    raise SystemExit("triton_compile_check: unset TRITON_INTERPRET (the kernels must be compiled)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kalman_kernels.triton import dense, kron, multi_tensor  # noqa: E402
from kalman_kernels.triton._common import DOT_PRECISION  # noqa: E402

F32, F64, BF16, F16 = "fp32", "fp64", "bf16", "fp16"
_ACC = {F32: tl.float32, F64: tl.float64}


@dataclass
class Variant:
    kernel: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    aligned_args: List[str] = field(default_factory=list)


def _jit(kernel):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def _configs(kernel, quick: bool, **constexprs):
    cfgs = list(getattr(kernel, "configs", [None]))
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None:
        cfgs = prune(cfgs, {}, **constexprs)
    if quick:
        cfgs = cfgs[:1]
    return cfgs


def _sig(fn, types: Dict[str, str], constexprs: Dict[str, object]) -> Dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types[name]
    return sig


def variants(quick: bool = False) -> List[Variant]:
    out: List[Variant] = []

    def add(kernel, label, types, constexprs, aligned, num_warps=None):
        fn = _jit(kernel)
        for cfg in _configs(kernel, quick, **constexprs):
            cx = dict(constexprs)
            warps, stages = num_warps or 4, 3
            if cfg is not None:
                cx.update(cfg.kwargs)
                warps, stages = cfg.num_warps, cfg.num_stages
            tag = ",".join(f"{k}={v}" for k, v in (cfg.kwargs.items() if cfg else []))
            out.append(Variant(kernel=fn.__name__, fn=fn, signature=_sig(fn, types, cx),
                               constexprs=cx, num_warps=warps, num_stages=stages,
                               label=f"{label} [{tag} w{warps} s{stages}]",
                               aligned_args=aligned))

    ints = lambda *names: {n: "i32" for n in names}
    f64s = lambda *names: {n: "fp64" for n in names}

    # dense S
    for jdt, cdt in [(F32, F32), (BF16, F32), (F64, F64)]:
        acc = F64 if F64 in (jdt, cdt) else F32
        for m in ([1, 8, 16, 128] if not quick else [1, 8, 128]):
            block_m, small = dense._block_m(m)
            types = {"jac_ptr": "*" + jdt, "cov_ptr": "*" + cdt, "out_ptr": "*" + acc,
                     **ints("m", "n", "s_jm", "s_jn", "s_c", "cols_per_split", "n_bucket"),
                     **f64s("inv_lam", "q")}
            add(dense._innovation_dense_kernel, f"innovation_cov_dense jac={jdt} cov={cdt} m={m}",
                types, dict(ACC=_ACC[acc], BLOCK_M=block_m, SMALL=small,
                            PRECISION="ieee" if acc == F64 else DOT_PRECISION, s_jn=1, s_c=1),
                ["jac_ptr", "cov_ptr", "out_ptr"])
    # dense update / terms
    for pdt, cdt in [(F32, F32), (BF16, F32), (F64, F64)]:
        acc = F64 if F64 in (pdt, cdt) else F32
        for m in ([1, 4, 8, 16, 32, 128] if not quick else [2, 8, 128]):
            block_l, small = dense._block_l(m)
            for info in ([False, True] if not quick else [False]):
                types = {"param_ptr": "*" + pdt, "cov_ptr": "*" + cdt, "jac_ptr": "*" + pdt,
                         "coef_ptr": "*fp64", "white_ptr": "*fp64", "ok_ptr": "*u8",
                         **ints("m", "n", "s_jm", "s_jn", "s_c", "s_w0", "s_w1", "n_bucket"),
                         **f64s("inv_lam", "q", "lo", "hi")}
                add(dense._dense_update_kernel,
                    f"fused_update_dense param={pdt} cov={cdt} m={m} info={info}", types,
                    dict(INFORMATION=info, ACC=_ACC[acc], BLOCK_L=block_l,
                         BLOCK_K=min(block_l, 16), SMALL=small,
                         PRECISION="ieee" if acc == F64 else DOT_PRECISION, s_jn=1, s_c=1,
                         s_w1=1), ["param_ptr", "cov_ptr", "jac_ptr"])
            types = {"jac_ptr": "*" + pdt, "coef_ptr": "*fp64", "white_ptr": "*fp64",
                     "u_ptr": "*" + acc, "d_ptr": "*" + acc,
                     **ints("m", "n", "s_jm", "s_jn", "s_c", "s_w0", "s_w1", "n_bucket")}
            add(dense._dense_terms_kernel, f"step_terms_dense jac={pdt} m={m}", types,
                dict(INFORMATION=False, ACC=_ACC[acc], BLOCK_L=block_l,
                     BLOCK_K=min(block_l, 16), SMALL=small,
                     PRECISION="ieee" if acc == F64 else DOT_PRECISION, s_jn=1, s_c=1, s_w1=1),
                ["jac_ptr", "u_ptr", "d_ptr"])
    # kron
    for pdt, cdt in [(F32, F32), (BF16, F32), (F64, F64)]:
        acc = F64 if F64 in (pdt, cdt) else F32
        prec = "ieee" if acc == F64 else DOT_PRECISION
        types = {"ap_ptr": "*" + acc, "cov_ptr": "*" + cdt, "q_ptr": "*" + acc,
                 **ints("npairs", "d_out", "d_in", "s_c0", "s_c1", "o_bucket", "i_bucket"),
                 **f64s("inv_lam", "q")}
        add(kron._pair_q_kernel, f"kron Q a={pdt} cov={cdt}", types,
            dict(ACC=_ACC[acc], PRECISION=prec, s_c1=1), ["ap_ptr", "cov_ptr", "q_ptr"])
        for k in ([1, 8, 10, 64] if not quick else [1, 8, 10]):
            block_k, small = kron._block_k(k)
            types = {"d_ptr": "*" + pdt, "q_ptr": "*" + acc, "pj_ptr": "*i32", "pk_ptr": "*i32",
                     "out_ptr": "*" + acc, **ints("npairs", "K", "d_out", "o_per_split", "s_d0",
                                                  "s_d1", "s_d2", "o_bucket")}
            add(kron._pair_s_kernel, f"kron S blocks d={pdt} K={k}", types,
                dict(ACC=_ACC[acc], BLOCK_K=block_k, SMALL=small, PRECISION=prec),
                ["d_ptr", "q_ptr", "out_ptr"])
            types = {"d_ptr": "*" + pdt, "w_ptr": "*fp64", "pj_ptr": "*i32", "pk_ptr": "*i32",
                     "g_ptr": "*" + acc, **ints("npairs", "K", "d_out", "m", "s_d0", "s_d1",
                                                "s_d2", "s_w0", "s_w1", "o_bucket")}
            add(kron._pair_g_kernel, f"kron G d={pdt} K={k}", types,
                dict(ACC=_ACC[acc], BLOCK_K=block_k, SMALL=small, PRECISION=prec),
                ["d_ptr", "g_ptr"])
        for info in ([False, True] if not quick else [False]):
            types = {"w_ptr": "*" + pdt, "cov_ptr": "*" + cdt, "a_ptr": "*" + pdt,
                     "dc_ptr": "*" + acc, "g_ptr": "*" + acc, "ap_ptr": "*" + acc,
                     "ok_ptr": "*u8",
                     **ints("batch", "npairs", "d_out", "d_in", "s_a0", "s_a1", "o_bucket",
                            "i_bucket"), **f64s("inv_lam", "q", "lo", "hi")}
            add(kron._kron_update_kernel, f"fused_update_kron w={pdt} cov={cdt} info={info}",
                types, dict(INFORMATION=info, ACC=_ACC[acc], PRECISION=prec, BLOCK_B=32,
                            s_a1=1), ["w_ptr", "cov_ptr", "a_ptr", "dc_ptr", "g_ptr", "ap_ptr"])
        types = {"a_ptr": "*" + pdt, "dc_ptr": "*" + acc, "g_ptr": "*" + acc,
                 "ap_ptr": "*" + acc, "u_ptr": "*" + acc, "dd_ptr": "*" + acc,
                 **ints("batch", "npairs", "d_out", "d_in", "s_a0", "s_a1", "o_bucket",
                        "i_bucket")}
        add(kron._kron_terms_kernel, f"step_terms_kron a={pdt}", types,
            dict(INFORMATION=False, ACC=_ACC[acc], PRECISION=prec, BLOCK_B=16, s_a1=1),
            ["a_ptr", "dc_ptr", "g_ptr", "ap_ptr", "u_ptr", "dd_ptr"])
    # multi-tensor
    block = multi_tensor.BLOCK
    for pdt, gdt, cdt in [(F32, F32, F32), (BF16, BF16, F32), (F16, F16, F32), (F64, F64, F64)]:
        acc = F64 if F64 in (pdt, cdt) else F32
        for aligned in (True, False):
            types = {"g_base": "*" + gdt, "c_base": "*" + cdt, "tab_ptr": "*i64",
                     "out_ptr": "*" + acc, **f64s("inv_lam", "q")}
            add(multi_tensor._quad_form_kernel, f"loss_quad_form g={gdt} cov={cdt} "
                f"aligned={aligned}", types, dict(ACC=_ACC[acc], ALIGNED=aligned, BLOCK=block),
                ["g_base", "c_base"] if aligned else [], num_warps=multi_tensor.NUM_WARPS)
            for info in ([False, True] if not quick else [False]):
                types = {"p_base": "*" + pdt, "g_base": "*" + gdt, "c_base": "*" + cdt,
                         "tab_ptr": "*i64", "coef_ptr": "*fp64", "weight_ptr": "*fp64",
                         "ok_ptr": "*u8", **f64s("inv_lam", "q", "lo", "hi")}
                add(multi_tensor._loss_step_kernel, f"loss_step param={pdt} cov={cdt} "
                    f"aligned={aligned} info={info}", types,
                    dict(INFORMATION=info, ACC=_ACC[acc], ALIGNED=aligned, BLOCK=block),
                    ["p_base", "g_base", "c_base"] if aligned else [],
                    num_warps=multi_tensor.NUM_WARPS)
        types = {"param_ptr": "*" + pdt, "cov_ptr": "*" + cdt, "dir_ptr": "*" + cdt,
                 "diag_ptr": "*" + cdt, "ok_ptr": "*u8", "n": "i32",
                 **f64s("inv_lam", "q", "lo", "hi")}
        add(multi_tensor._apply_terms_kernel, f"apply_terms param={pdt} cov={cdt}", types,
            dict(INFORMATION=False, ACC=_ACC[acc], BLOCK=2048),
            ["param_ptr", "cov_ptr", "dir_ptr", "diag_ptr"], num_warps=multi_tensor.NUM_WARPS)
    return out


_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                          "cuobjdump")


def _resources(cubin: bytes) -> Dict[str, int]:
    """REG / STACK / SHARED of the kernel, from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name],
                                  capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return {}
    found = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        hit = re.search(rf"\b{key}:(\d+)", text)
        if hit:
            found[key.lower()] = int(hit.group(1))
    return found


#: integer arguments compiled as multiples of 16 (sizes and leading strides of typical
#: launches; Triton specialises an int argument divisible by 16 the same way)
DIVISIBLE = ("n", "d_in", "d_out", "s_jm", "s_w0", "s_a0", "s_c0", "cols_per_split",
             "o_per_split")


def compile_variant(v: Variant, arch: int) -> Dict[str, object]:
    names = v.fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in v.aligned_args}
    for a in DIVISIBLE:
        if a in names and v.signature.get(a) in ("i32", "i64"):
            attrs[(names.index(a),)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    ptx = compiled.asm["ptx"]
    result: Dict[str, object] = {"kernel": v.kernel, "variant": v.label, "arch": arch,
                                 "vector_loads": bool(re.search(r"ld\.global(\.\w+)*\.v[24]", ptx)),
                                 "shared_bytes": compiled.metadata.shared}
    result.update(_resources(compiled.asm["cubin"]))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--quick", action="store_true", help="one configuration per variant")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--match", default="", help="only variants whose label contains this")
    args = parser.parse_args(argv)
    results, failures = [], []
    todo = [v for v in variants(args.quick) if args.match in v.label]
    for v, arch in itertools.product(todo, args.arch):
        try:
            r = compile_variant(v, arch)
        except Exception as exc:  # report every failure, not only the first
            failures.append((v.label, arch, f"{type(exc).__name__}: {exc}"))
            print(f"FAIL sm_{arch} {v.label}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            continue
        results.append(r)
        print(f"ok   sm_{arch} {v.label}: regs={r.get('reg')} spill(stack)={r.get('stack')} "
              f"smem={r['shared_bytes']} v-loads={r['vector_loads']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "failures": failures}, f, indent=1)
    print(f"{len(results)} compiled, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
