"""The defaults study: which Kalman recipe carries over from task to task, and what each of
its parts buys.

    python -m kalman_kernels.clip.study --out runs/study.json [--datasets ...] [--seeds 0,1,2]
    python -m kalman_kernels.clip.study --analyse runs/study.json [--markdown]

For every dataset, shot count and seed it runs zero-shot, GDA, AdamW and IVON at each learning
rate of their grid, kalman-paper, and every Kalman configuration of ``KALMAN_POINTS``, and
stores validation, test and OOD-mean metrics of each. ``--analyse`` then applies selection
rules *on the validation split only* (AdamW / IVON: the lr with the best validation NLL; a
Kalman rule: a fixed configuration, or the best of at most three by validation NLL) and prints
test-split tables. Nothing is chosen on a test split.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import replace
from typing import Dict, List

import numpy as np

LR_GRID = [1e-3, 1e-2, 1e-1]      # AdamW's and IVON's learning rates (the same budget)
P0_GRID = [1e-3, 1e-2, 1e-1]      # a Kalman rule that selects P0 on validation gets as many
OLD_DEFAULT = dict(likelihood="gaussian", fit="passes", obs="cosine-logits", epochs=10.0,
                   tempered=True, init_cov=1e-3, probit=True)

# every Kalman configuration run per (dataset, shots, seed): name -> TrainConfig fields
KALMAN_POINTS: Dict[str, Dict] = {
    "default": {},
    "evidence-best": dict(prior="evidence"),
    "mean-scale-average": dict(prior_scales=(0.0, 0.5, 1.0)),
    "diag": dict(head_cov="diag"),
    "map-predictive": dict(probit=False),
    **{f"fixed-P0-{p}": dict(prior="fixed", init_cov=p) for p in P0_GRID},
    **{f"1-pass-P0-{p}": dict(fit="passes", epochs=1.0, tempered=False, init_cov=p)
       for p in P0_GRID},
    **{f"10-tempered-passes-P0-{p}": dict(fit="passes", epochs=10.0, tempered=True, init_cov=p)
       for p in P0_GRID},
    **{f"old-default-r-{r}": dict(OLD_DEFAULT, obs_noise=r) for r in (1e-3, 1e-2, 1e-1)},
}

# rule name -> (description, candidate point names; the best by validation NLL is used)
RULES = {
    "kalman (default)": ("categorical, iterated to the MAP, block covariance, "
                         "evidence-weighted P0, probit", ["default"]),
    "- averaging: best P0 by evidence": ("the same, the single P0 of highest evidence",
                                         ["evidence-best"]),
    "+ prior-mean scale by evidence": ("the default, also averaging prior means s x the "
                                       "zero-shot head, s in {0, 0.5, 1}",
                                       ["mean-scale-average"]),
    "- block: diagonal covariance": ("the default with a diagonal head covariance", ["diag"]),
    "- probit: MAP predictive": ("the default, softmax of the posterior mean", ["map-predictive"]),
    "- evidence: P0 on validation": ("iterated to the MAP, P0 from {1e-3, 1e-2, 1e-1} by "
                                     "validation NLL", [f"fixed-P0-{p}" for p in P0_GRID]),
    "- iterating: 1 pass": ("one categorical EKF pass (block), P0 on validation",
                            [f"1-pass-P0-{p}" for p in P0_GRID]),
    "- iterating: 10 tempered passes": ("10 categorical EKF passes, c x 10, P0 on validation",
                                        [f"10-tempered-passes-P0-{p}" for p in P0_GRID]),
    "- categorical: old default": ("Gaussian cosine logits, 10 tempered passes, r on "
                                   "validation (the previous default)",
                                   [f"old-default-r-{r}" for r in (1e-3, 1e-2, 1e-1)]),
}
BASE_ROWS = ("zero-shot", "gda", "adamw", "ivon", "kalman-paper")
REFERENCE = "adamw"


def _metrics(r) -> Dict:
    from .run import _ood_summary
    return {"val": r.metrics.get("val", {}), "test": r.metrics["test"],
            "ood": _ood_summary(r.metrics)}


def run_study(datasets: List[str], shots_list: List[int], seeds: List[int], out: str,
              cache_dir=None, points=None) -> List[Dict]:
    import torch

    from .run import make_task, prepare
    from .train import TrainConfig, finetune, run_gda, run_zero_shot
    points = KALMAN_POINTS if points is None else points
    records = []
    for spec in datasets:
        t0 = time.time()
        folder = spec.startswith("imagefolder:")
        prep = prepare(dataset=spec, progress=False, verbose=False, cache_dir=cache_dir,
                       generated_shifts=True if folder else None)
        print(f"[study] {spec}: features ready in {time.time() - t0:.0f} s", file=sys.stderr)
        for shots, seed in itertools.product(shots_list, seeds):
            task = make_task(prep, shots, seed)
            base = TrainConfig(seed=seed)
            rows = [("zero-shot", "", run_zero_shot(task)), ("gda", "", run_gda(task))]
            for opt in ("adamw", "ivon"):
                for lr in LR_GRID:
                    rows.append((opt, f"lr-{lr}", finetune(
                        task, replace(base, optimizer=opt, lr=lr), progress_bar=False)))
            rows.append(("kalman-paper", "", finetune(
                task, replace(base, optimizer="kalman-paper", epochs=1.0), progress_bar=False)))
            for name, point in points.items():
                cfg = replace(base, optimizer="kalman", **{"epochs": 10.0, "tempered": True,
                                                           **point})
                rows.append(("kalman", name, finetune(task, cfg, progress_bar=False)))
            for method, point, r in rows:
                records.append({"dataset": prep.ds.name, "spec": spec, "shots": shots,
                                "seed": seed, "method": method, "point": point,
                                "seconds": r.seconds, **_metrics(r)})
            print(f"[study] {spec} {shots}-shot seed {seed} done ({time.time() - t0:.0f} s)",
                  file=sys.stderr)
            with open(out, "w") as f:
                json.dump({"records": records, "threads": torch.get_num_threads(),
                           "load_average": list(os.getloadavg())}, f)
    return records


# ----------------------------------------------------------------------------------------
# analysis: selection rules on validation, tables on test
# ----------------------------------------------------------------------------------------
def _select(cands: List[Dict]) -> Dict:
    return min(cands, key=lambda r: r["val"].get("nll", math.inf))


def analyse(records: List[Dict], rules=None) -> Dict:
    """{row: {(dataset, shots): [record per seed]}}: every base row and every rule, each
    record the validation-selected one of its seed."""
    rules = RULES if rules is None else rules
    cells: Dict = {}
    for r in records:
        cells.setdefault((r["dataset"], r["shots"], r["seed"]), []).append(r)
    out: Dict = {}
    for (ds, shots, _seed), rs in cells.items():
        def add(name, rec, cell=(ds, shots)):
            out.setdefault(name, {}).setdefault(cell, []).append(rec)
        for m in BASE_ROWS:
            cands = [r for r in rs if r["method"] == m]
            if cands:
                add(m, _select(cands))
        by_point = {r["point"]: r for r in rs if r["method"] == "kalman"}
        for name, (_desc, pts) in rules.items():
            cands = [by_point[p] for p in pts if p in by_point]
            if cands:
                add(name, _select(cands))
    return out


def _mean(recs, split, key):
    vals = [r[split][key] for r in recs if key in r[split]]
    return float(np.mean(vals)) if vals else math.nan


def summary_table(per_row: Dict, split: str = "test") -> Dict:
    """{row: {cell: {metric: mean over seeds}}}"""
    return {name: {cell: {k: _mean(recs, split, k) for k in ("acc", "nll", "ece")}
                   for cell, recs in cells.items()} for name, cells in per_row.items()}


def scoreboard(per_row: Dict, split: str = "test", reference: str = REFERENCE) -> List[Dict]:
    """Per row, over the (dataset, shots) cells: how often it is at least as accurate as
    ``reference`` and at least as good on NLL and ECE, its mean differences, and the cells
    where it is below zero-shot by more than two standard errors of its seed mean."""
    summ = summary_table(per_row, split)
    ref, zs = summ[reference], summ["zero-shot"]
    rows = []
    for name, cells in summ.items():
        n = ok_acc = ok_nll = ok_ece = below_zs = 0
        d_acc, d_nll, d_ece = [], [], []
        for cell, v in cells.items():
            if cell not in ref:
                continue
            a = ref[cell]
            n += 1
            ok_acc += v["acc"] >= a["acc"] - 1e-9
            ok_nll += v["nll"] <= a["nll"] + 1e-9
            ok_ece += v["ece"] <= a["ece"] + 1e-9
            accs = [r[split]["acc"] for r in per_row[name][cell]]
            se = float(np.std(accs, ddof=1) / math.sqrt(len(accs))) if len(accs) > 1 else 0.0
            below_zs += v["acc"] < zs[cell]["acc"] - 2 * se - 1e-9
            d_acc.append(v["acc"] - a["acc"])
            d_nll.append(v["nll"] - a["nll"])
            d_ece.append(v["ece"] - a["ece"])
        if n:
            rows.append({"row": name, "cells": n, "acc>=adamw": ok_acc, "nll<=adamw": ok_nll,
                         "ece<=adamw": ok_ece, "below zero-shot (>2 SE)": below_zs,
                         "mean d acc": float(np.mean(d_acc)), "mean d nll": float(np.mean(d_nll)),
                         "mean d ece": float(np.mean(d_ece))})
    return rows


def markdown(records: List[Dict], rows=None) -> str:
    """The scoreboards (test and OOD mean) and the per-task tables, as Markdown."""
    per_row = analyse(records)
    rows = rows or [r for r in ("zero-shot", "gda", "adamw", "ivon", "kalman-paper",
                                "kalman (default)") if r in per_row]
    out = []
    for split, title in (("test", "test split"), ("ood", "mean over the OOD splits")):
        out.append(f"Scoreboard, {title} (15 cells = 5 tasks x 3 shot counts; means over the "
                   f"seeds; reference: AdamW, lr selected on validation NLL)\n")
        out.append("| row | acc >= AdamW | NLL <= AdamW | ECE <= AdamW | below zero-shot "
                   "(> 2 SE) | mean d acc | mean d NLL | mean d ECE |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in scoreboard(per_row, split):
            out.append(f"| {r['row']} | {r['acc>=adamw']} | {r['nll<=adamw']} | "
                       f"{r['ece<=adamw']} | {r['below zero-shot (>2 SE)']} | "
                       f"{r['mean d acc']:+.3f} | {r['mean d nll']:+.2f} | "
                       f"{r['mean d ece']:+.3f} |")
        out.append("")
    for split, title in (("test", "test split"), ("ood", "mean over the OOD splits")):
        summ = summary_table(per_row, split)
        out.append(f"Per task, {title}, acc / NLL / ECE, mean of the seeds\n")
        out.append("| task | shots | " + " | ".join(rows) + " |")
        out.append("|---|---|" + "---|" * len(rows))
        for cell in sorted(summ[rows[0]]):
            vals = [summ[r].get(cell) for r in rows]
            out.append(f"| {cell[0]} | {cell[1]} | " + " | ".join(
                "-" if v is None else f"{v['acc']:.3f} / {v['nll']:.2f} / {v['ece']:.3f}"
                for v in vals) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="digits-noisy,shapes,textiles")
    p.add_argument("--shots", default="1,4,16")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/study.json")
    p.add_argument("--analyse", default=None, metavar="JSON")
    p.add_argument("--markdown", action="store_true", help="with --analyse: Markdown tables")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.analyse:
        with open(args.analyse) as f:
            recs = json.load(f)["records"]
        if args.markdown:
            print(markdown(recs))
            return 0
        for split in ("test", "ood"):
            for row in scoreboard(analyse(recs), split):
                print(json.dumps({"split": split, **row}))
        return 0
    import torch
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    run_study([d for d in args.datasets.split(",") if d], [int(s) for s in args.shots.split(",")],
              [int(s) for s in args.seeds.split(",")], args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
