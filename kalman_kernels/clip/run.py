"""End-to-end pipeline: load model -> dataset -> cached features -> few-shot tasks -> methods ->
JSON, printed table and PNG plots."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ._paths import cache_root
from .cache import FeatureCache, FeatureSet, extract_features, has_visual_proj
from .data import DatasetSplits, few_shot_indices, get_dataset
from .models import ClipBundle, load_clip, text_features
from .progress import progress as _bar
from .train import BASELINES, OPTIMIZERS, Task, TrainConfig, finetune, run_gda, run_zero_shot

STANDIN_BANNER = ("NOTE: these numbers come from the offline STAND-IN: a tiny CLIP pretrained "
                  "on scikit-learn digits and generated shapes, not real pretrained CLIP "
                  "weights.")


@dataclass
class Prepared:
    bundle: ClipBundle
    ds: DatasetSplits
    pool: FeatureSet
    test: FeatureSet
    ood: Dict[str, FeatureSet]
    text: torch.Tensor
    proj: Optional[torch.Tensor]
    skipped: Dict[str, int] = field(default_factory=dict)


def prepare(model: str = "kk-tiny-vit", pretrained: Optional[str] = "standin",
            dataset: str = "digits-noisy", *, ood_paths: Sequence[str] = (), device: str = "cpu",
            cache_dir=None, templates: Optional[Sequence[str]] = None, progress: bool = True,
            generated_shifts: Optional[bool] = None, verbose: bool = True) -> Prepared:
    # the dataset first: a wrong path fails before any model is loaded or pretrained
    ds = get_dataset(dataset, templates=templates, ood_paths=ood_paths,
                     generated_shifts=generated_shifts)
    bundle = load_clip(model, pretrained, device=device, cache_dir=cache_dir, verbose=verbose)
    cache = FeatureCache(cache_root(cache_dir) / "features")
    sets = [ds.pool, ds.test, *ds.ood.values()]
    feats = [extract_features(bundle, s, cache, progress=False)
             for s in _bar(sets, desc=f"features {ds.name}", unit="split",
                                   enabled=progress)]
    pool, test, ood = feats[0], feats[1], dict(zip(ds.ood, feats[2:]))
    text = text_features(bundle, ds.classnames, ds.templates)
    proj = (bundle.model.visual.proj.detach().float().cpu() if has_visual_proj(bundle.model)
            else None)
    skipped = {s.name: s.n_skipped for s in [pool, test, *ood.values()] if s.n_skipped}
    return Prepared(bundle, ds, pool, test, ood, text, proj, skipped)


def make_task(prep: Prepared, shots: int, seed: int, calibrate: bool = False) -> Task:
    k = len(prep.ds.classnames)
    tr, va = few_shot_indices(prep.pool.labels.numpy(), shots, seed, k)
    return Task(prep.pool.index(tr), prep.pool.index(va), prep.test, prep.ood, prep.text,
                prep.bundle.logit_scale(), prep.proj, k, calibrate=calibrate,
                device=prep.bundle.device)


def run_methods(prep: Prepared, methods: Sequence[str], shots_list: Sequence[int],
                seeds: Sequence[int], base: TrainConfig,
                grids: Optional[Dict[str, List[Dict]]] = None, progress_bar: bool = True,
                calibrate: bool = False, overrides: Optional[Dict[str, Dict]] = None,
                **legacy) -> List[Dict]:
    """Every method x shots x seed. A method with a grid in ``grids`` (a list of TrainConfig
    field overrides, e.g. ``[{"lr": 1e-3}, {"lr": 1e-2}]``) runs every point and keeps the
    one with the best validation NLL (the test split is never used for selection).
    ``overrides``: per-method TrainConfig fields (e.g. {"kalman": {"epochs": 1}})."""
    if "progress" in legacy:
        progress_bar = legacy.pop("progress")
    if "lr_grid" in legacy:       # the older form: method -> list of learning rates
        grids = {m: [{"lr": v} for v in lrs] for m, lrs in (legacy.pop("lr_grid") or {}).items()}
    if legacy:
        raise TypeError(f"unexpected arguments {sorted(legacy)}")
    for m in methods:
        if m not in OPTIMIZERS and m not in BASELINES:
            raise ValueError(f"unknown method {m!r}; "
                             f"choose from {', '.join(OPTIMIZERS + BASELINES)}")
    records = []
    jobs = [(s, sd, m) for s in shots_list for sd in seeds for m in methods]
    bar = _bar(jobs, desc="runs", enabled=progress_bar, unit="run", item_lines=True)
    for shots, seed, m in bar:
        bar.set_postfix_str(f"{m} {shots}-shot seed {seed}")
        task = make_task(prep, shots, seed, calibrate)
        r = _run_one(task, m, seed, base, grids or {}, overrides or {}, calibrate, progress_bar)
        records.append({"method": m, "shots": shots, "seed": seed, **r.to_json()})
    return records


def _run_one(task: Task, m: str, seed: int, base: TrainConfig, grids, overrides, calibrate,
             progress_bar: bool):
    if m == "zero-shot":
        return run_zero_shot(task)
    if m == "gda":
        return run_gda(task)
    cfg = replace(base, optimizer=m, seed=seed, calibrate=calibrate, **overrides.get(m, {}))
    grid = grids.get(m)
    if not grid:
        return finetune(task, cfg, progress_bar=progress_bar, desc=f"{m}")
    cands = [finetune(task, replace(cfg, **point), progress_bar=False) for point in grid]
    best = min(range(len(cands)), key=lambda i: cands[i].metrics["val"]["nll"])
    r = cands[best]
    r.config["grid"] = [dict(p) for p in grid]
    r.config["selected"] = dict(grid[best])
    r.config["selected_on"] = "validation NLL"
    return r


# ----------------------------------------------------------------------------------------
# aggregation, table, plots
# ----------------------------------------------------------------------------------------
def _ood_summary(metrics: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    ood = [v for k, v in metrics.items() if k not in ("test", "val") and v]
    out = {}
    for key in ("acc", "nll", "ece", "brier", "auroc_msp", "auroc_var"):
        vals = [v[key] for v in ood
                if key in v and not (isinstance(v[key], float) and math.isnan(v[key]))]
        if vals:
            out[key] = float(np.mean(vals))
    return out


_METHOD_ORDER = {m: i for i, m in enumerate(["zero-shot", "gda", "adamw", "sgd", "kalman-loss",
                                              "kalman-paper", "kalman"])}


def aggregate(records: List[Dict]) -> List[Dict]:
    """Mean and standard deviation over seeds for each (method, shots, split, metric)."""
    groups: Dict = {}
    for r in records:
        groups.setdefault((r["method"], r["shots"]), []).append(r)
    rows = []
    for (m, s), rs in groups.items():
        row = {"method": m, "shots": s, "seeds": [r["seed"] for r in rs], "splits": {}}
        splits = set().union(*[r["metrics"].keys() for r in rs])
        per = {sp: [r["metrics"].get(sp, {}) for r in rs] for sp in splits}
        per["ood-mean"] = [_ood_summary(r["metrics"]) for r in rs]
        for sp, ms in per.items():
            keys = set().union(*[x.keys() for x in ms])
            row["splits"][sp] = {k: {"mean": float(np.mean([x[k] for x in ms if k in x])),
                                     "std": float(np.std([x[k] for x in ms if k in x]))}
                                 for k in keys}
        row["seconds"] = float(np.mean([r["seconds"] for r in rs]))
        rows.append(row)
    rows.sort(key=lambda r: (r["shots"], _METHOD_ORDER.get(r["method"], 99)))
    return rows


def format_table(rows: List[Dict], markdown: bool = False) -> str:
    def f(row, sp, k, nd=3):
        v = row["splits"].get(sp, {}).get(k)
        if v is None:
            return "-"
        return f"{v['mean']:.{nd}f}"

    head = ["shots", "method", "ID acc", "ID NLL", "ID ECE", "OOD acc", "OOD NLL", "OOD ECE",
            "AUROC msp", "AUROC var"]
    lines = []
    for r in rows:
        lines.append([str(r["shots"]), r["method"], f(r, "test", "acc"), f(r, "test", "nll", 2),
                      f(r, "test", "ece"), f(r, "ood-mean", "acc"), f(r, "ood-mean", "nll", 2),
                      f(r, "ood-mean", "ece"), f(r, "ood-mean", "auroc_msp"),
                      f(r, "ood-mean", "auroc_var")])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in lines]
        return "\n".join(out)
    w = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h)
         for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w[i]) for i, h in enumerate(head))]
    out.append("  ".join("-" * x for x in w))
    out += ["  ".join(c.rjust(w[i]) for i, c in enumerate(row)) for row in lines]
    return "\n".join(out)


def format_shift_table(rows: List[Dict], severity: Dict, markdown: bool = False) -> str:
    """acc / NLL / ECE per shift kind (mean over its severities) for every method and shot count."""
    kinds = sorted({k for k, _ in severity.values()})
    if not kinds:
        return ""
    head = ["shots", "method"] + [f"{k} acc/NLL/ECE" for k in kinds]
    lines = []
    for r in rows:
        cells = [str(r["shots"]), r["method"]]
        for kind in kinds:
            sp = [s for s, (k, _) in severity.items() if k == kind and s in r["splits"]]
            vals = []
            for key in ("acc", "nll", "ece"):
                v = [r["splits"][s][key]["mean"] for s in sp if key in r["splits"][s]]
                vals.append(np.mean(v) if v else float("nan"))
            cells.append(f"{vals[0]:.3f}/{vals[1]:.2f}/{vals[2]:.3f}")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(row) + " |" for row in lines])
    w = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w[i]) for i, h in enumerate(head)), "  ".join("-" * x for x in w)]
    return "\n".join(out + ["  ".join(c.rjust(w[i]) for i, c in enumerate(row))
                            for row in lines])


def make_plots(records: List[Dict], rows: List[Dict], severity: Dict, out_dir: Path,
               dataset: str = "", shift_notes: Optional[Dict[str, str]] = None) -> List[str]:
    """curves.png, reliability.png and ood_severity.png; every title says which data, shot
    count and seeds it shows. ``shift_notes``: what each shift kind's OOD images are made of
    (``DatasetSplits.shift_notes``), shown over its severity panel."""
    import matplotlib
    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    shots_max = max(r["shots"] for r in records)
    seeds = sorted({r["seed"] for r in records})
    files = [_plot_curves(records, shots_max, seeds[0], out_dir, dataset),
             _plot_reliability(records, shots_max, seeds, out_dir, dataset),
             _plot_severity(rows, severity, shots_max, seeds, out_dir, dataset,
                            shift_notes or {})]
    return [f for f in files if f]


def _save(fig, path: Path, **layout) -> str:
    import matplotlib.pyplot as plt
    if not fig.get_constrained_layout():
        fig.tight_layout(**layout)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _method_colours(methods) -> Dict[str, str]:
    """One colour per method, the same in every plot of a run (the table's order)."""
    cycle = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]
    ordered = sorted(dict.fromkeys(methods), key=lambda m: (_METHOD_ORDER.get(m, 99), m))
    return {m: cycle[i % len(cycle)] for i, m in enumerate(ordered)}


def _plot_curves(records, shots, seed, out_dir: Path, dataset: str) -> Optional[str]:
    """Validation accuracy and NLL against training images seen (log axis), one seed; each
    method's value before its first step is a dotted line, the training-free methods are
    dashed lines. One legend under both panels says so."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    sel = [r for r in records if r["shots"] == shots and r["seed"] == seed]
    trained = [r for r in sel if r["history"]]
    if not trained:
        return None
    colour = _method_colours(r["method"] for r in records)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.6))
    for r in trained:
        c = colour[r["method"]]
        pts = [h for h in r["history"] if h.get("images_seen", h["step"]) > 0]
        x = [h.get("images_seen", h["step"]) for h in pts]
        for a, key in zip(ax, ("val_acc", "val_nll")):
            a.plot(x, [h.get(key, np.nan) for h in pts], marker=".", color=c, label=r["method"])
            a.axhline(r["history"][0].get(key, np.nan), ls=":", lw=1, color=c)
    free = [r for r in sel if not r["history"] and "val" in r["metrics"]]
    for r in free:
        for a, key in zip(ax, ("acc", "nll")):
            a.axhline(r["metrics"]["val"][key], ls="--", lw=1.2, color=colour[r["method"]],
                      label=r["method"] + " (training-free)")
    for a, what in zip(ax, ("accuracy", "NLL")):
        a.set_xscale("log")
        a.set(xlabel="training images seen (steps x batch, log scale)",
              ylabel=f"validation {what}", title=f"validation {what}")
    handles, labels = ax[0].get_legend_handles_labels()
    handles.append(Line2D([], [], ls=":", color="0.3", lw=1))
    labels.append("dotted: each method before its first step")
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{dataset}, {shots}-shot, seed {seed}: validation split during training",
                 fontsize=10)
    rows_of_legend = math.ceil(len(labels) / 4)
    return _save(fig, out_dir / "curves.png", rect=(0, 0.04 + 0.045 * rows_of_legend, 1, 1))


def _plot_reliability(records, shots, seeds, out_dir: Path, dataset: str) -> Optional[str]:
    """Test-split reliability diagrams at the largest shot count, bins pooled over seeds; the
    ECE in each title is the mean over seeds (the table's value). Under each diagram a strip
    of the number of test images per confidence bin (pooled over seeds), so that a bar over
    a handful of images is not read like one over hundreds."""
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(r["method"] for r in records
                                 if r["shots"] == shots and r.get("reliability")))
    if not methods:
        return None
    ncol = min(3, len(methods))
    nrow = math.ceil(len(methods) / ncol)
    fig = plt.figure(figsize=(3.6 * ncol, 4.2 * nrow), layout="constrained")
    cells = fig.add_gridspec(nrow, ncol)
    for i, m in enumerate(methods):
        row, col = divmod(i, ncol)
        pair = cells[row, col].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
        a = fig.add_subplot(pair[0])
        strip = fig.add_subplot(pair[1], sharex=a)
        rs = [r for r in records if r["shots"] == shots and r["method"] == m]
        edges = np.asarray(rs[0]["reliability"]["edges"], dtype=float)
        count = np.zeros(len(edges) - 1)
        correct = np.zeros(len(edges) - 1)
        for r in rs:
            c = np.asarray(r["reliability"]["count"], dtype=float)
            acc = np.asarray([0.0 if v is None else v for v in r["reliability"]["accuracy"]])
            count += c
            correct += c * acc
        acc = np.divide(correct, count, out=np.zeros_like(count), where=count > 0)
        centers = 0.5 * (edges[1:] + edges[:-1])
        width = edges[1] - edges[0]
        a.bar(centers[count > 0], acc[count > 0], width=width, edgecolor="k", alpha=0.7)
        a.plot([0, 1], [0, 1], "r--", lw=1)
        ece = np.mean([r["metrics"]["test"]["ece"] for r in rs])
        a.set(xlim=(0, 1), ylim=(0, 1), title=f"{m}: ECE {ece:.3f}")
        a.tick_params(labelbottom=False)
        strip.bar(centers, count, width=width, color="0.55", edgecolor="k", lw=0.5)
        strip.set(xlim=(0, 1), ylim=(0, max(count.max(), 1) * 1.15), xlabel="confidence")
        strip.tick_params(labelsize=7)
        if col == 0:
            a.set_ylabel("accuracy")
            strip.set_ylabel("images", fontsize=8)
    fig.suptitle(f"{dataset} test split, {shots}-shot: bins pooled over seeds "
                 f"{','.join(map(str, seeds))}; ECE = mean over seeds; grey strip = test "
                 f"images per bin", fontsize=9)
    return _save(fig, out_dir / "reliability.png")


def _plot_severity(rows, severity, shots, seeds, out_dir: Path, dataset: str,
                   shift_notes: Dict[str, str]) -> Optional[str]:
    """Accuracy against OOD severity, one panel per shift kind, mean over seeds; each panel's
    title says what the shifted images are (e.g. the blur of the noisy test images)."""
    import textwrap

    import matplotlib.pyplot as plt

    from .data import SHIFT_UNITS
    if not severity:
        return None
    kinds = sorted({k for k, _ in severity.values()})
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 4.2), squeeze=False)
    rows_max = [r for r in rows if r["shots"] == shots]
    colour = _method_colours(r["method"] for r in rows)
    for a, kind in zip(axes[0], kinds):
        splits = sorted([s for s, (k, _) in severity.items() if k == kind],
                        key=lambda s: severity[s][1])
        lv = [0.0] + [severity[s][1] for s in splits]
        for r in rows_max:
            ys = [r["splits"]["test"]["acc"]["mean"]] + [
                r["splits"].get(s, {}).get("acc", {}).get("mean", np.nan) for s in splits]
            a.plot(lv, ys, marker="o", color=colour[r["method"]], label=r["method"])
        unit = SHIFT_UNITS.get(kind)
        a.set_xlabel(f"{kind} severity" + (f" ({unit})" if unit else "") + "\n0 = ID test split",
                     fontsize=9)
        a.set_ylim(0, 1)
        a.set_title("\n".join(textwrap.wrap(shift_notes.get(kind, kind), 34)), fontsize=9)
    axes[0][0].set_ylabel(f"test accuracy ({shots}-shot)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
               frameon=False)
    fig.suptitle(f"{dataset}: accuracy under generated shifts, {shots}-shot, mean over seeds "
                 f"{','.join(map(str, seeds))}", fontsize=10)
    return _save(fig, out_dir / "ood_severity.png", rect=(0, 0.06, 1, 1))


def write_outputs(prep: Prepared, records, rows, out_dir: Path, extra: Dict, plots: bool = True):
    out_dir.mkdir(parents=True, exist_ok=True)
    files = (make_plots(records, rows, prep.ds.ood_severity, out_dir, prep.ds.name,
                        shift_notes=prep.ds.shift_notes) if plots else [])
    blob = {"model": prep.bundle.name, "pretrained": prep.bundle.pretrained,
            "standin": prep.bundle.standin, "notes": prep.bundle.notes,
            "dataset": prep.ds.name, "classes": prep.ds.classnames,
            "ood_splits": {k: list(v) for k, v in prep.ds.ood_severity.items()} or list(prep.ood),
            "shift_notes": prep.ds.shift_notes,
            "skipped_images": prep.skipped, "summary": rows, "runs": records, "plots": files,
            **extra}
    tmp = out_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(blob, indent=1, default=_json_default))
    os.replace(tmp, out_dir / "results.json")
    return out_dir / "results.json", files


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)
