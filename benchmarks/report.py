"""Print the CPU benchmark table (the rules: docs/design.md, section 6).

    python -m benchmarks.report                 # every section, 1 and 2 threads
    python -m benchmarks.report --quick         # a smaller grid
    python -m benchmarks.report --threads 1 --only public,kron --json out.json

Sections: ``public`` (what users call -- KalmanNGD.step, ops.kalman_update_ -- beside the
raw ops it calls, AdamW(fused=True) and torch.mm: benchmarks/public_api.py), ``dense`` and
``loss`` (the raw cpp kernels vs the reference and the machine's ceilings), ``kron`` (the
sample-grouped Kronecker step vs the same observations ungrouped and torch.mm's rate for
its dominant GEMM), ``class_head`` (the CLIP application's 1,000-class head: the
class-structured Gaussian step and the categorical-likelihood step side by side), and
``loss_public`` (only the loss step's rows of ``public``: the default single-pass step and
the two-pass one, ``reduce_in_backward(False)``, beside AdamW(fused=True) in one
round-robin; ``--threads 1 --only loss_public``).

Every ratio is measured in this run, on this machine, round-robin (median and IQR over
rounds): cpp vs the reference backend, the loss step vs torch.optim.AdamW(fused=True) on
the same parameters, every kernel vs this run's ceilings (in-place add_ bandwidth at the
same working-set size, torch.matmul of the same GEMM shape). See benchmarks/common.py.

Limits (to keep the run to minutes on 2 cores): the cpp kernels run for m * n <= 3.2e8
(the float32 Jacobian is then 1.3 GB); the reference backend runs only where
m * n <= 3.2e7 (it takes ~2 s per dense step at n = 1e6, m = 32) and for fewer rounds.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

from . import common as C

SIZES_N = [10_000, 100_000, 1_000_000, 10_000_000]
SIZES_M = [1, 8, 32, 128]
CPP_LIMIT = 3.2e8
REF_LIMIT = 3.2e7


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Table:
    COLS = ["op", "n", "m", "thr", "variant", "median ms", "IQR ms", "GB/s", "GFLOP/s",
            "% ceiling", "ratio"]

    def __init__(self):
        self.rows = []

    def add(self, op, n, m, threads, variant, timing: C.Timing, nbytes=None, flops=None,
            ceiling=None, ratio=None):
        t = timing.median
        lo, hi = timing.iqr
        row = {
            "op": op, "n": C.sizes_label(n) if isinstance(n, int) else n,
            "m": "-" if m is None else m, "thr": threads, "variant": variant,
            "median ms": C.fmt_ms(t), "IQR ms": f"{C.fmt_ms(lo)}-{C.fmt_ms(hi)}",
            "GB/s": f"{nbytes / t / 1e9:.1f}" if nbytes else "",
            "GFLOP/s": f"{flops / t / 1e9:.1f}" if flops else "",
            "% ceiling": f"{100 * ceiling:.0f}" if ceiling is not None else "",
            "ratio": ratio or "",
            "_median_s": t, "_times": len(timing.times),
        }
        self.rows.append(row)
        print("  " + " | ".join(str(row[c]) for c in self.COLS), flush=True)
        return row

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.COLS) + " |",
                 "|" + "|".join(["---"] * len(self.COLS)) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(str(r[c]) for c in self.COLS) + " |")
        return "\n".join(lines)


def _rounds(seconds_per_call: float, want: int) -> int:
    return max(3, min(want, int(20.0 / max(seconds_per_call, 1e-6))))


def bench_dense(table, threads, sizes_n, sizes_m, rounds, cpp, refb, summary):
    for n in sizes_n:
        for m in sizes_m:
            if m * n > CPP_LIMIT:
                continue
            case = C.DenseCase(n, m)
            g_innov, g_update, same_shape = case.matmul_rates()
            bw_innov = C.add_bandwidth(case.innovation_bytes())
            bw_update = C.add_bandwidth(4 * (m * n + 2 * n))
            with_ref = m * n <= REF_LIMIT
            for op, make, nbytes, flops, bw, gf in (
                    ("innovation_cov_dense", case.innovation, case.innovation_bytes(),
                     case.innovation_flops(), bw_innov, g_innov),
                    ("fused_update_dense_", case.update, case.update_bytes(),
                     case.update_flops(), bw_update, g_update)):
                fns = {"cpp": make(cpp)}
                fns["cpp"]()
                t0 = time.perf_counter()
                fns["cpp"]()
                per = time.perf_counter() - t0
                res = C.measure_group(fns, _rounds(per, rounds), budget_s=20)
                ref_t = None
                if with_ref:
                    rf = make(refb)
                    rf()
                    ref_t = C.measure_group({"reference": rf}, 3 if m * n >= 1e6 else rounds,
                                            warmup=0, budget_s=20)["reference"]
                ceil = C.roofline_fraction(res["cpp"].median, nbytes, flops, bw, gf)
                ratio = f"{ref_t.median / res['cpp'].median:.1f}x vs ref" if ref_t else ""
                table.add(op, n, m, threads, "cpp", res["cpp"], nbytes, flops, ceil, ratio)
                if ref_t:
                    table.add(op, n, m, threads, "reference", ref_t, nbytes, flops,
                              C.roofline_fraction(ref_t.median, nbytes, flops, bw, gf))
            if n == 1_000_000 and m == 32:
                # the target: one whole dense step (innovation + m x m work + update)
                fns = {"cpp": case.step(cpp)}
                res = C.measure_group(fns, rounds, budget_s=20)
                rf = case.step(refb)
                rf()
                ref_t = C.measure_group({"reference": rf}, 3, warmup=0)["reference"]
                nbytes = case.innovation_bytes() + case.update_bytes()
                flops = case.innovation_flops() + case.update_flops()
                floor = max(case.innovation_bytes() / (bw_innov * 1e9),
                            case.innovation_flops() / (g_innov * 1e9)) + \
                    max(case.update_bytes() / (bw_update * 1e9),
                        case.update_flops() / (g_update * 1e9))
                speed = ref_t.median / res["cpp"].median
                table.add("dense step (innov+update)", n, m, threads, "cpp", res["cpp"], nbytes,
                          flops, floor / res["cpp"].median, f"{speed:.1f}x vs ref")
                table.add("dense step (innov+update)", n, m, threads, "reference", ref_t, nbytes,
                          flops, floor / ref_t.median)
                summary[f"dense_n1e6_m32_thr{threads}"] = {
                    "speedup_vs_reference": speed,
                    "fraction_of_floor": floor / res["cpp"].median,
                    "cpp_ms": res["cpp"].median * 1e3, "reference_ms": ref_t.median * 1e3,
                    "floor_ms": floor * 1e3,
                    "compute_ceiling_gflops": [g_innov, g_update],
                    "same_shape_matmul_gflops": list(same_shape),
                    "square_matmul_peak_gflops": C.square_matmul_peak(),
                    "add_gbs": [bw_innov, bw_update],
                    "cpp_gflops": flops / res["cpp"].median / 1e9}
            del case
            gc.collect()


def bench_loss(table, threads, sizes_n, rounds, cpp, refb, summary, with_ivon=True):
    for n in sizes_n:
        case = C.LossCase(n)
        bw = C.add_bandwidth(case.working_set_bytes())
        fns = {"cpp": case.full(cpp), "cpp step only": case.step_only(cpp),
               "AdamW(fused)": case.adamw()}
        res = C.measure_group(fns, rounds, inner=max(1, int(1e6 // n)), budget_s=25)
        ref_t = None
        if n <= 10_000_000:
            rf = case.full(refb)
            rf()
            ref_t = C.measure_group({"reference": rf}, 3 if n >= 1e6 else rounds,
                                    warmup=0)["reference"]
        adam = res["AdamW(fused)"].median
        full = res["cpp"].median
        step = res["cpp step only"].median
        table.add("loss_step_ (4 tensors)", n, None, threads, "cpp (reduction + step)",
                  res["cpp"], case.bytes_full(), None, case.bytes_full() / full / 1e9 / bw,
                  f"{full / adam:.2f}x AdamW" + (f", {ref_t.median / full:.0f}x vs ref"
                                                 if ref_t else ""))
        table.add("loss_step_ (4 tensors)", n, None, threads, "cpp step only (hooked reduction)",
                  res["cpp step only"], case.bytes_step(), None,
                  case.bytes_step() / step / 1e9 / bw, f"{step / adam:.2f}x AdamW")
        table.add("loss_step_ (4 tensors)", n, None, threads, "AdamW(fused=True)",
                  res["AdamW(fused)"], case.bytes_full(), None,
                  case.bytes_full() / adam / 1e9 / bw, "1.00x AdamW")
        if ref_t:
            table.add("loss_step_ (4 tensors)", n, None, threads, "reference", ref_t,
                      case.bytes_full(), None, case.bytes_full() / ref_t.median / 1e9 / bw,
                      f"{ref_t.median / adam:.1f}x AdamW")
        if n == 10_000_000:
            entry = {"cpp_ms": full * 1e3, "step_only_ms": step * 1e3, "adamw_ms": adam * 1e3,
                     "ratio_vs_adamw": full / adam, "step_only_ratio_vs_adamw": step / adam,
                     "add_gbs_same_working_set": bw,
                     "cpp_gbs": case.bytes_full() / full / 1e9,
                     "fraction_of_add_bandwidth": case.bytes_full() / full / 1e9 / bw,
                     "best_ratio_vs_adamw": res["cpp"].best / res["AdamW(fused)"].best}
            if with_ivon:
                try:
                    iv = case.ivon()
                    iv()
                    t_iv = C.measure_group({"ivon": iv}, 5, warmup=0)["ivon"]
                    table.add("loss_step_ (4 tensors)", n, None, threads,
                              "ivon-opt IVON (sample+collect+step)", t_iv, None, None, None,
                              f"{t_iv.median / adam:.1f}x AdamW")
                    entry["ivon_ratio_vs_adamw"] = t_iv.median / adam
                except ImportError as exc:
                    print(f"  (ivon-opt not installed: {exc}; pip install ivon-opt)")
            entry.update(_hook_overhead(case, cpp, rounds))
            summary[f"loss_10M_thr{threads}"] = entry
        del case
        gc.collect()


def _hook_overhead(case, cpp, rounds):
    """Backward of a 4-tensor model with and without the quad-form hooks (docs/design.md, 2.2)."""
    from kalman_kernels.backends.loss_hooks import attach_quad_form_hooks
    ws = [torch.nn.Parameter(p.clone()) for p in case.params]
    xs = [torch.randn_like(p) for p in case.params]
    covs = {w: c for w, c in zip(ws, case.covs)}

    def backward():
        for w in ws:
            w.grad = None
        loss = sum((w * x).sum() for w, x in zip(ws, xs))
        loss.backward()

    plain = C.measure_group({"b": backward}, rounds, budget_s=10)["b"]
    acc = attach_quad_form_hooks(ws, covs.__getitem__, backend="cpp")
    hooked = C.measure_group({"b": backward}, rounds, budget_s=10)["b"]
    acc.remove()
    return {"backward_ms": plain.median * 1e3, "backward_with_hooks_ms": hooked.median * 1e3,
            "hook_overhead_ms": (hooked.median - plain.median) * 1e3}


_MEM_SCRIPT = r"""
import gc, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from benchmarks import common as C
import kalman_kernels.reference as ref
from kalman_kernels.backends import cpp_backend as cpp
case = C.KronCase(512, 512, int(sys.argv[3]), int(sys.argv[4]))
variant = sys.argv[1]
fn = {"kron_cpp": lambda: case.kron_step(cpp),
      "dense_cpp_with_H": lambda: case.dense_step(cpp),
      "dense_reference_with_H": lambda: case.dense_step(ref)}[variant]()
def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
fn()                                   # warm-up: library pages, lazy initialisation
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                       # reset VmHWM (peak RSS) to the current RSS
base = rss("VmRSS:")
fn()
print(rss("VmHWM:") - base)
"""


def kron_memory(threads: int, batch: int, k: int):
    """Peak extra resident memory of one step, in a fresh process (see _MEM_SCRIPT)."""
    out = {}
    for variant in ("kron_cpp", "dense_cpp_with_H", "dense_reference_with_H"):
        # A fixed mmap threshold: every allocation >= 64 KiB is mapped on allocation and
        # unmapped on free, so glibc's heap cannot hide the second call's allocations.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        proc = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, variant, str(threads),
                               str(batch), str(k)],
                              capture_output=True, text=True, env=env, cwd=os.path.dirname(
                                  os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode != 0:
            out[variant] = None
            print(f"  memory probe {variant} failed: {proc.stderr.strip()[-300:]}")
        else:
            out[variant] = int(proc.stdout.strip().splitlines()[-1])
    return out


KRON_CASES = [(512, 512, 32, 1), (512, 512, 32, 10), (1024, 1024, 32, 10)]


def bench_kron(table, threads, rounds, cpp, refb, summary):
    """Sample-grouped Kronecker steps (innovation + m x m work + update) on the cpp backend,
    beside the same observations ungrouped (the previous release's (B K)^2 cost), the dense
    reference including building H (512 x 512, K = 1) and torch.mm's rate for the dominant
    contraction's shape (T x d_in) @ (d_in x d_out), T = B (B + 1) / 2."""
    for d_out, d_in, batch, k in KRON_CASES:
        case = C.KronCase(d_out, d_in, batch, k)
        label = f"kron {d_out}x{d_in} step"
        shape = f"B={batch} K={k}"
        res = C.measure_group({"cpp grouped": case.kron_step(cpp)}, rounds, budget_s=20)
        t = res["cpp grouped"].median
        g_mm = case.mm_rate()
        dominant_rate = case.dominant_flops() / t / 1e9
        entry = {"grouped_ms": t * 1e3, "torch_mm_gflops_dominant_shape": g_mm,
                 "step_gflops": case.flops() / t / 1e9,
                 "dominant_flops_per_step_time_gflops": dominant_rate,
                 "fraction_of_mm_rate": dominant_rate / g_mm}
        table.add(label, shape, case.m, threads, "cpp grouped", res["cpp grouped"], None,
                  case.flops(), dominant_rate / g_mm,
                  f"dominant GEMMs at >= {100 * dominant_rate / g_mm:.0f}% of torch.mm")
        if k > 1:
            ug = case.ungrouped()
            fn = ug.kron_step(cpp)
            fn()
            t_ug = C.measure_group({"u": fn}, 2, warmup=0, budget_s=60)["u"]
            entry["ungrouped_ms"] = t_ug.median * 1e3
            entry["speedup_vs_ungrouped"] = t_ug.median / t
            table.add(label, shape, case.m, threads, "cpp ungrouped (rows repeated K times)",
                      t_ug, None, ug.flops(), None, f"{t_ug.median / t:.1f}x grouped time")
        if (d_out, d_in, k) == (512, 512, 1):
            fns = {"cpp dense incl. building H": case.dense_step(cpp)}
            res_d = C.measure_group(fns, rounds, budget_s=20)
            rf = case.dense_step(refb)
            rf()
            ref_t = C.measure_group({"r": rf}, max(3, rounds // 3), warmup=0, budget_s=20)["r"]
            table.add(label, shape, case.m, threads, "cpp dense incl. building H",
                      res_d["cpp dense incl. building H"], None, None, None,
                      f"{res_d['cpp dense incl. building H'].median / t:.1f}x grouped time")
            table.add(label, shape, case.m, threads, "reference dense incl. building H", ref_t,
                      None, None, None, f"{ref_t.median / t:.1f}x grouped time")
            entry["speedup_vs_dense_reference"] = ref_t.median / t
        if d_out == 512:
            mem = kron_memory(threads, batch, k)
            entry["peak_extra_bytes"] = mem
            if mem.get("kron_cpp") and mem.get("dense_reference_with_H"):
                entry["memory_ratio_vs_dense_reference"] = (mem["kron_cpp"]
                                                            / mem["dense_reference_with_H"])
        summary[f"kron_{d_out}_B{batch}_K{k}_thr{threads}"] = entry
        del case
        gc.collect()


def bench_public(table, threads, rounds, summary):
    """What users call: benchmarks/public_api.py."""
    from . import public_api as P
    P.bench_loss_public(table, threads, rounds, summary)
    P.bench_dense_public(table, threads, rounds, summary)
    P.bench_kron_public(table, threads, rounds, summary)
    P.bench_batch_public(table, threads, rounds, summary)
    P.bench_tracked_mlp(table, threads, max(3, rounds // 3), summary)


def bench_class_head(table, threads, summary):
    """The class-structured head of the CLIP application: benchmarks/class_head.py.
    The rows hold class_head_update_ (plain, cosine) and, timed in the same round-robin,
    categorical_head_update_ (the softmax head under the categorical likelihood)."""
    from . import class_head as H
    rows = H.class_head_rows(threads=threads, with_kron=False)
    print(H.markdown(rows))
    summary[f"class_head_thr{threads}"] = [r for r in rows
                                           if r["op"] != "categorical_head_update_"]
    summary[f"categorical_head_thr{threads}"] = [r for r in rows
                                                 if r["op"] == "categorical_head_update_"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--quick", action="store_true", help="n in {1e4, 1e6}, m in {1, 32}")
    ap.add_argument("--rounds", type=int, default=15, help="rounds per measurement (max)")
    ap.add_argument("--json", default=None, help="also write the rows and summary as JSON")
    ap.add_argument("--only", default="public,dense,loss,kron,class_head",
                    help="sections to run (comma-separated)")
    args = ap.parse_args(argv)

    if not C.have_cpp():
        import kalman_kernels as kk
        sys.exit(f"cpp backend unavailable: {kk.backend_errors().get('cpp')}")
    cpp = C.cpp_module()
    import kalman_kernels.reference as refb

    sizes_n = [10_000, 1_000_000] if args.quick else SIZES_N
    sizes_m = [1, 32] if args.quick else SIZES_M
    sections = set(args.only.split(","))
    header = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
        "kernel_isa": cpp.isa(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_start": os.getloadavg(),
        "command": "python -m benchmarks.report " + " ".join(argv if argv is not None
                                                             else sys.argv[1:]),
    }
    print("# kalman_kernels cpp backend benchmark")
    for k, v in header.items():
        print(f"#   {k}: {v}")
    table = Table()
    summary = {}
    print("  " + " | ".join(Table.COLS))
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        C._BW_CACHE.clear()
        print(f"# threads={threads}: square 1024^3 matmul peak "
              f"{C.square_matmul_peak():.1f} GFLOP/s", flush=True)
        if "loss" in sections:
            bench_loss(table, threads, sizes_n if not args.quick else [10_000, 10_000_000],
                       args.rounds, cpp, refb, summary)
        if "dense" in sections:
            bench_dense(table, threads, sizes_n, sizes_m, args.rounds, cpp, refb, summary)
        if "public" in sections:
            bench_public(table, threads, args.rounds, summary)
        elif "loss_public" in sections:       # the loss step's rows of "public" alone
            from . import public_api as P
            P.bench_loss_public(table, threads, args.rounds, summary)
        if "kron" in sections:
            bench_kron(table, threads, args.rounds, cpp, refb, summary)
        if "class_head" in sections:
            bench_class_head(table, threads, summary)
    header["loadavg_end"] = os.getloadavg()
    print()
    print(table.markdown())
    print()
    print("## Targets (docs/cpp_backend.md, \"Targets\")")
    for key, val in summary.items():
        if isinstance(val, dict):
            print(f"- {key}: " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in val.items()))
        else:
            print(f"- {key}: {val}")
    print(f"# load average start {header['loadavg_start']}, end {header['loadavg_end']}")
    if args.json:
        rows = [{k: v for k, v in r.items()} for r in table.rows]
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
