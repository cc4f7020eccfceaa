"""``kalman-clip``: few-shot Kalman fine-tuning of open_clip models from the command line.

  kalman-clip demo                       # offline default, end to end (stand-in CLIP on digits)
  kalman-clip finetune [options]         # one optimizer, one shot count
  kalman-clip compare  [options]         # several optimizers x shot counts, one table

Results go to ``--out`` (default ``runs/<command>-<time>``): results.json, PNG plots; the table
is printed. Caches (features, stand-in weights) go to ``--cache-dir`` (default
``$KALMAN_KERNELS_CACHE`` or ``~/.cache/kalman_kernels``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

DEMO_SHOTS = [1, 4, 16]
DEMO_METHODS = ["zero-shot", "gda", "adamw", "ivon", "kalman-paper", "kalman"]
ADAMW_GRID = [1e-3, 1e-2, 1e-1]


def _csv(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> List[int]:
    try:
        return [int(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str) -> List[float]:
    try:
        return [float(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {s!r}") from None


def _gate(s: str) -> float:
    if s.strip().lower() in ("off", "none", "0"):
        return 0.0
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a probability such as 0.999 or 'off', got {s!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"the gate is a chi-square probability in (0, 1), got {v}")
    return v


class UsageError(ValueError):
    """A command-line value that no run can use; ``main`` prints it as one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block stays in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser, demo: bool = False):
    from .data import BUILTIN_HELP
    g = p.add_argument_group("model and data")
    if not demo:
        g.add_argument("--model", default="kk-tiny-vit",
                       help="open_clip architecture (e.g. ViT-B-32, ViT-B-32-quickgelu for OpenAI "
                            "weights), a tiny stand-in config (kk-tiny-vit), or local-dir:PATH "
                            "(default: %(default)s)")
        g.add_argument("--pretrained", default="standin",
                       help="pretrained tag (e.g. laion2b_s34b_b79k, openai), a checkpoint file, "
                            "'standin' (offline stand-in, tiny configs only) or 'none' "
                            "(default: %(default)s)")
        g.add_argument("--dataset", default="digits-noisy",
                       help=f"{BUILTIN_HELP} (conformal-clip-data), or imagefolder:PATH (one "
                            f"sub-folder per class; PATH/train + PATH/test are used when "
                            f"present) (default: %(default)s)")
        g.add_argument("--ood", action="append", default=[], metavar="PATH",
                       help="an OOD image folder (class sub-folders or flat); repeatable")
        g.add_argument("--template", action="append", default=None, metavar="TEXT",
                       help="prompt template with {} for the class name (repeatable; default "
                            "per dataset, 'a photo of a {}.' for image folders)")
        g.add_argument("--no-shifts", action="store_true",
                       help="skip the generated OOD shifts of the built-in datasets")
        g.add_argument("--shifts", action="store_true",
                       help="also generate shifted OOD splits for imagefolder datasets")
    else:
        g.add_argument("--dataset", default="digits-noisy",
                       help="the built-in task to run the demo on: digits-noisy, shapes or "
                            "textiles (default: %(default)s)")
    g.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    g.add_argument("--cache-dir", default=None,
                   help="cache folder (default: $KALMAN_KERNELS_CACHE or ~/.cache/kalman_kernels)")
    g.add_argument("--out", default=None, help="output folder (default: runs/<command>-<time>)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bars or progress lines (also for the stand-in pretraining)")
    g.add_argument("--verbose", action="store_true",
                   help="print each KalmanNGD method's per-parameter report after its first "
                        "step (KalmanNGD.describe: block kinds, covariance memory, and why a "
                        "tracked layer fell back to a dense block)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")


def _train_args(p: argparse.ArgumentParser, multi: bool):
    from .train import DEFAULT_OBS_NOISE, KALMAN_DEFAULTS, OPTIMIZERS, PAPER_PRESET
    g = p.add_argument_group("training")
    if multi:
        g.add_argument("--methods", type=_csv, default=list(DEMO_METHODS),
                       help=f"comma-separated from {', '.join(OPTIMIZERS)}, zero-shot, gda "
                            f"(default: {','.join(DEMO_METHODS)})")
        g.add_argument("--shots", type=_ints, default=[1, 4, 16],
                       help="comma-separated shot counts (default: 1,4,16)")
        g.add_argument("--seeds", type=_ints, default=[0],
                       help="comma-separated seeds (default: 0)")
        g.add_argument("--adamw-lrs", type=_floats, default=None,
                       help="AdamW learning-rate grid, selected on the validation split "
                            "(default: the single --lr or 1e-3)")
        g.add_argument("--sgd-lrs", type=_floats, default=None,
                       help="SGD learning-rate grid, selected on the validation split")
        g.add_argument("--ivon-lrs", type=_floats, default=None,
                       help="IVON learning-rate grid, selected on the validation split "
                            "(default: the single --lr or 1e-1)")
    else:
        g.add_argument("--optimizer", default="kalman", choices=list(OPTIMIZERS),
                       help="(default: %(default)s)")
        g.add_argument("--shots", type=int, default=16, help="(default: %(default)s)")
        g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
        g.add_argument("--baselines", action="store_true",
                       help="also report zero-shot and GDA")
    g.add_argument("--adapter", default="head", choices=["head", "clip-adapter", "proj"],
                   help="text-initialised linear head, CLIP-Adapter MLP, or visual projection "
                        "(default: %(default)s; kalman-paper always uses clip-adapter)")
    g.add_argument("--obs", default=KALMAN_DEFAULTS["obs"],
                   choices=["logits", "cosine-logits", "paired"],
                   help="Kalman observation model: class logits (plain head), class logits with "
                        "the head's rows normalised (cosine), or the paired image-text cosine "
                        "(default: %(default)s; kalman-paper always uses paired)")
    g.add_argument("--likelihood", choices=["categorical", "gaussian"], default=None,
                   help="Kalman observation model of the head's labels: the categorical "
                        "likelihood (softmax, no noise level to choose) or Gaussian scores "
                        "(default: categorical for kalman, gaussian for kalman-paper)")
    g.add_argument("--fit", choices=["map", "passes"], default=None,
                   help="categorical head: iterated Kalman updates to the MAP (re-linearised, "
                        "Laplace posterior) or sequential EKF passes (default: map)")
    g.add_argument("--prior", choices=["evidence-average", "evidence", "fixed"], default=None,
                   help="categorical head, --fit map: the prior variance P0 averaged over a "
                        "grid by the Laplace evidence, the single best one, or --init-cov "
                        "(default: evidence-average; --init-cov implies fixed)")
    g.add_argument("--head-cov", choices=["auto", "block", "diag"], default=None,
                   help="categorical head: one (d+1) x (d+1) covariance block per class, a "
                        "diagonal, or auto: blocks while K (d+1)^2 <= 2^24 (default: auto)")
    g.add_argument("--prior-mean-scales", type=_floats, default=None, metavar="S,S,...",
                   help="categorical head, evidence priors: also weigh prior means s x the "
                        "zero-shot head by the evidence, e.g. 0,0.5,1 (default: 1 only)")
    g.add_argument("--steps", type=int, default=200,
                   help="training steps for adamw / sgd / ivon (default: %(default)s)")
    g.add_argument("--kalman-epochs", type=float, default=None,
                   help=f"passes over the shots for the Kalman methods' sequential fits "
                        f"(default: {KALMAN_DEFAULTS['epochs']:g} for kalman, with r multiplied "
                        f"by the number of passes, used with --fit passes or --likelihood "
                        f"gaussian; 1 for kalman-paper and kalman-loss; 0: use --steps)")
    g.add_argument("--predictive", choices=["mean", "probit"], default=None,
                   help="Kalman methods' class probabilities: softmax of the mean scores, or the "
                        "probit predictive of the Gaussian scores N(mu, H P H^T + r) (default: "
                        "probit for kalman, mean for kalman-paper and kalman-loss)")
    g.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=None,
                   help="step scale (Kalman, default 1 = exact update) or learning rate "
                        "(AdamW 1e-3, SGD 1e-1)")
    g.add_argument("--init-cov", type=float, default=None,
                   help="Kalman prior covariance P0 (default: 1e-3 for head and proj, 1e-1 for "
                        "clip-adapter)")
    g.add_argument("--obs-noise", type=float, default=None,
                   help=f"Kalman: the Gaussian observation noise r (its starting value with "
                        f"adaptive noise; default {DEFAULT_OBS_NOISE:g}), or the categorical "
                        f"likelihood's tempering c (default 1)")
    g.add_argument("--adaptive-obs-noise", type=float, default=None, metavar="BETA",
                   help=f"Kalman: EMA rate of the innovation-based observation noise, a "
                        f"number in [0, 1], 0 = off (default: "
                        f"{KALMAN_DEFAULTS['adaptive_obs_noise']:g} for "
                        f"kalman, {PAPER_PRESET['adaptive_obs_noise']:g} for kalman-paper)")
    g.add_argument("--gate", type=_gate, default=None, metavar="PROB",
                   help=f"Kalman: Mahalanobis gate, a chi-square probability such as 0.999, or "
                        f"'off' (default: {KALMAN_DEFAULTS['gate'] or 'off'} for kalman, "
                        f"{PAPER_PRESET['gate']} for kalman-paper)")
    g.add_argument("--forgetting", type=float, default=1.0,
                   help="Kalman forgetting factor (default: %(default)s)")
    g.add_argument("--process-noise", type=float, default=0.0,
                   help="Kalman process noise q (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW/SGD weight decay (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=20, help="(default: %(default)s)")
    g.add_argument("--calibrate", action="store_true",
                   help="fit the softmax temperature on the validation split (all methods)")
    g.add_argument("--mc-samples", type=int, default=0,
                   help="Kalman methods: predict with the mean softmax over this many draws "
                        "theta ~ N(mu, P) (opt.sampled_params) instead of the mean (default: 0)")
    g.add_argument("--backend", default="auto", help="KalmanNGD backend (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kalman-clip",
        description="Few-shot fine-tuning of open_clip models with a Kalman-filter "
                    "natural-gradient optimizer (KalmanNGD), with calibration and OOD metrics.",
        epilog="Offline default: `kalman-clip demo`. Real weights on a GPU: kalman-clip finetune "
               "--model ViT-B-32 --pretrained laion2b_s34b_b79k --dataset imagefolder:/data/train "
               "--ood /data/ood --device cuda")
    sub = p.add_subparsers(dest="command", metavar="{finetune,compare,demo}")
    sub.required = True
    pf = sub.add_parser("finetune", help="fine-tune with one optimizer and report metrics",
                        description="Fine-tune an adapter with one optimizer at one shot count.")
    _common(pf)
    _train_args(pf, multi=False)
    pc = sub.add_parser("compare", help="several optimizers x shot counts, one table",
                        description="Run several methods and shot counts side by side.")
    _common(pc)
    _train_args(pc, multi=True)
    pd = sub.add_parser("demo", help="the offline default, end to end (stand-in CLIP)",
                        description="Offline demo: pretrain (or load the cached) stand-in CLIP, "
                                    "then 1/4/16-shot adaptation on a built-in task (noisy "
                                    "digits by default): kalman vs kalman-paper vs adamw vs "
                                    "zero-shot vs GDA, in and out of distribution. A STAND-IN "
                                    "for real CLIP weights.")
    _common(pd, demo=True)
    pd.add_argument("--seeds", type=_ints, default=[0, 1, 2],
                    help="comma-separated seeds (default: 0,1,2)")
    pd.add_argument("--steps", type=int, default=200,
                    help="training steps for adamw (default: %(default)s)")
    return p


def _out_dir(args, command: str) -> Path:
    if args.out:
        return Path(args.out)
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def _base_cfg(args):
    from .train import TrainConfig
    return TrainConfig(adapter=args.adapter, obs=args.obs, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, init_cov=args.init_cov,
                       forgetting=args.forgetting, process_noise=args.process_noise,
                       weight_decay=args.weight_decay, eval_every=args.eval_every,
                       mc_samples=args.mc_samples, backend=args.backend,
                       likelihood=args.likelihood, fit=args.fit, prior=args.prior,
                       head_cov=args.head_cov,
                       prior_scales=tuple(args.prior_mean_scales)
                       if args.prior_mean_scales else None)


def _kalman_overrides(args):
    """Per-method settings of the Kalman methods from the command line (only what was given
    explicitly overrides a method's own defaults)."""
    from .train import KALMAN_DEFAULTS
    out = {}
    for m in ("kalman", "kalman-paper", "kalman-loss"):
        o = {"epochs": KALMAN_DEFAULTS["epochs"] if m == "kalman" else 1.0}
        if args.kalman_epochs is not None:
            o["epochs"] = args.kalman_epochs if args.kalman_epochs > 0 else None
        if m == "kalman":
            o["tempered"] = KALMAN_DEFAULTS["tempered"]
        if getattr(args, "predictive", None) is not None:
            o["probit"] = args.predictive == "probit"
        if args.obs_noise is not None:
            o["obs_noise"] = args.obs_noise
        if args.adaptive_obs_noise is not None:
            o["adaptive_obs_noise"] = args.adaptive_obs_noise
        if args.gate is not None:
            o["gate"] = args.gate or 0.0     # 'off' -> 0: no gate (None means the default)
        out[m] = o
    return out


def _kalman_grid(args, explicit: bool):
    """The validation-selected grid of ``kalman``: none for the categorical default (its P0
    comes from the evidence), the r grid for ``--likelihood gaussian``; none when the user
    fixed P0 or r on the command line."""
    from .train import GAUSSIAN_R_GRID, KALMAN_DEFAULTS
    grid = (GAUSSIAN_R_GRID if getattr(args, "likelihood", None) == "gaussian"
            else KALMAN_DEFAULTS["grid"])
    if explicit or not grid:
        return None
    return [dict(p) for p in grid]


@dataclass
class _Plan:
    methods: List[str]
    shots: List[int]
    seeds: List[int]
    base: object
    grids: Dict[str, List[Dict]]
    calibrate: bool
    overrides: Dict[str, Dict]


def _inputs(args):
    """(model, pretrained, dataset, ood, templates, shifts) of a command."""
    if args.command == "demo":
        return "kk-tiny-vit", "standin", args.dataset, [], None, None
    shifts = False if args.no_shifts else (True if args.shifts else None)
    return args.model, args.pretrained, args.dataset, args.ood, args.template, shifts


def _plan(args) -> _Plan:
    """What to run: methods x shots x seeds, configs, selection grids (validation only)."""
    from .train import TrainConfig
    if args.command == "demo":
        ns = argparse.Namespace(kalman_epochs=None, obs_noise=None, adaptive_obs_noise=None,
                                gate=None, predictive=None)
        from .train import KALMAN_DEFAULTS
        grids = {"adamw": [{"lr": v} for v in ADAMW_GRID], "ivon": [{"lr": v} for v in ADAMW_GRID]}
        kg = _kalman_grid(ns, False)
        if kg:
            grids["kalman"] = kg
        return _Plan(list(DEMO_METHODS), list(DEMO_SHOTS), list(args.seeds),
                     TrainConfig(steps=args.steps, obs=KALMAN_DEFAULTS["obs"]), grids, False,
                     _kalman_overrides(ns))
    base = _base_cfg(args)
    explicit = args.init_cov is not None or args.obs_noise is not None
    grids = {}
    kg = _kalman_grid(args, explicit)
    if kg:
        grids["kalman"] = kg
    if args.command == "compare":
        if args.adamw_lrs:
            grids["adamw"] = [{"lr": v} for v in args.adamw_lrs]
        if args.sgd_lrs:
            grids["sgd"] = [{"lr": v} for v in args.sgd_lrs]
        if args.ivon_lrs:
            grids["ivon"] = [{"lr": v} for v in args.ivon_lrs]
        return _Plan(list(args.methods), list(args.shots), list(args.seeds), base, grids,
                     args.calibrate, _kalman_overrides(args))
    methods = (["zero-shot", "gda"] if args.baselines else []) + [args.optimizer]
    return _Plan(methods, [args.shots], [args.seed], base, grids, args.calibrate,
                 _kalman_overrides(args))


def _describe_prepared(prep, R) -> None:
    if prep.bundle.standin:
        print(R.STANDIN_BANNER)
    for note in prep.bundle.notes:
        if not prep.bundle.standin:
            print("note:", note)
    if prep.skipped:
        print("skipped unreadable images: "
              + ", ".join(f"{k}: {v}" for k, v in prep.skipped.items()))
    print(f"dataset {prep.ds.name}: {len(prep.ds.classnames)} classes, pool {len(prep.pool)}, "
          f"test {len(prep.test)}, OOD splits {len(prep.ood)}"
          + (f" ({', '.join(prep.ood)})" if prep.ood else ""))


def _report(prep, R, plan: _Plan, rows, path, files, wall: float, load) -> None:
    print()
    print(f"{prep.ds.name}: ID = test split; OOD = mean over {len(prep.ood)} shifted/OOD splits; "
          f"mean over seeds {plan.seeds}")
    print(R.format_table(rows))
    if prep.ds.ood_severity:
        print("\nOOD by shift kind (acc/NLL/ECE, mean over severities " + ", ".join(
            f"{k}: {sorted({lv for kk, lv in prep.ds.ood_severity.values() if kk == k})}"
            for k in sorted({k for k, _ in prep.ds.ood_severity.values()})) + ")")
        print(R.format_shift_table(rows, prep.ds.ood_severity))
    if prep.bundle.standin:
        print(R.STANDIN_BANNER)
    print(f"\nresults: {path}" + (f"\nplots: {', '.join(files)}" if files else ""))
    print(f"wall time: {wall:.1f} s on {os.cpu_count()} CPUs, {_threads()} torch threads, "
          f"load average {load[0]:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
          f"(other work on the machine slows every figure)")


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "''"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check(ok: bool, flag: str, value, valid: str) -> None:
    if not ok:
        raise UsageError(f"{flag} {_show(value)}: {valid}")


def _finite(v, low: float, *, strict: bool = True, high: float = math.inf,
            high_strict: bool = False) -> bool:
    if not (isinstance(v, (int, float)) and math.isfinite(v)):
        return False
    return (v > low if strict else v >= low) and (v < high if high_strict else v <= high)


def _check_list(args, name: str, flag: str, ok, valid: str) -> None:
    values = getattr(args, name, None)
    if values is None:
        return
    _check(bool(values), flag, values, f"give at least one value ({valid})")
    for v in values:
        _check(ok(v), flag, values, f"{_show(v)} is not valid: {valid}")


def _check_dataset(spec: str) -> None:
    from .data import BUILTIN_HELP
    spec = spec.strip()
    valid = f"use {BUILTIN_HELP} or imagefolder:PATH"
    if spec.startswith("imagefolder:"):
        path = Path(spec[len("imagefolder:"):]).expanduser()
        _check(path.is_dir(), "--dataset", spec, f"dataset path not found: {path} is not a "
               f"folder (one sub-folder per class)")
        return
    if spec.startswith("digits-noisy:"):
        sigma = spec.split(":", 1)[1]
        try:
            ok = _finite(float(sigma), 0.0, strict=False)
        except ValueError:
            ok = False
        _check(ok, "--dataset", spec, f"the noise sigma after ':' must be a number >= 0 ({valid})")
        return
    hint = f" (did you mean imagefolder:{spec}?)" if os.path.isdir(spec) else ""
    _check(spec in ("digits", "digits-noisy", "shapes", "textiles"), "--dataset", spec,
           f"unknown dataset{hint}; {valid}")


def _check_model(args) -> None:
    """The model name and pretrained tag, from open_clip's name lists (no weights read)."""
    from .models import STANDIN_TAG, _unknown_model
    from .registry import TINY_CONFIGS, open_clip_module, register_tiny_configs
    name, pretrained = args.model, (args.pretrained or "").strip()
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]).expanduser()
        _check(path.is_dir(), "--model", name, f"folder not found: {path} (local-dir:PATH "
               f"needs open_clip_config.json and a weights file)")
        return
    if name.startswith("hf-hub:"):
        return
    try:
        open_clip = open_clip_module()
    except ImportError as e:
        raise UsageError(f"--model {name}: {e}") from e
    register_tiny_configs(args.cache_dir)
    known = open_clip.list_models()
    if name not in known:
        raise UsageError(f"--model {name}: {_unknown_model(name, known)}")
    low = pretrained.lower()
    if low == STANDIN_TAG:
        _check(name in TINY_CONFIGS, "--pretrained", pretrained,
               f"the offline stand-in exists only for the tiny configs "
               f"({', '.join(TINY_CONFIGS)}), not {name!r}; pass a pretrained tag, a "
               f"checkpoint file or 'none'")
    elif low not in ("", "none", "random") and not os.path.isfile(os.path.expanduser(pretrained)):
        tags = open_clip.list_pretrained_tags_by_model(name)
        _check(pretrained in tags, "--pretrained", pretrained,
               f"neither a checkpoint file nor a pretrained tag of {name} (its tags: "
               f"{', '.join(tags) if tags else 'none'}; or 'standin' for "
               f"{', '.join(TINY_CONFIGS)}, or 'none')")


def _check_combinations(args) -> None:
    """What the methods' own configurations refuse (as training would, after loading)."""
    from .train import KALMAN_METHODS
    plan = _plan(args)
    for m in plan.methods:
        if m not in KALMAN_METHODS:
            continue
        cfg = replace(plan.base, optimizer=m, **plan.overrides.get(m, {}))
        try:
            cfg.validate()
        except ValueError as e:
            raise UsageError(f"{m}: {e}") from e
        if not cfg.categorical_head():
            continue
        rc = cfg.resolved()
        _check(rc.obs == "logits", "--obs", rc.obs,
               f"{m}'s head with the categorical likelihood scores with plain logits; use "
               f"--obs logits, or --likelihood gaussian for the cosine observation")
        _check(not rc.adaptive_obs_noise, "--adaptive-obs-noise", rc.adaptive_obs_noise,
               f"the categorical likelihood of {m}'s head has no noise level to adapt; use "
               f"--adaptive-obs-noise 0, or --likelihood gaussian")
        _check(not rc.gate, "--gate", rc.gate,
               f"the categorical head's fit of {m} has no gate; use --gate off, or "
               f"--likelihood gaussian")


def _validate(args) -> None:
    """Check every argument before any model, data or weights are touched: the first bad
    value raises UsageError naming the argument, the value and what is valid."""
    from .train import BASELINES, OPTIMIZERS
    methods = getattr(args, "methods", None)
    if methods is not None:
        _check(bool(methods), "--methods", methods,
               f"give at least one of {', '.join(OPTIMIZERS + BASELINES)}")
        for m in methods:
            _check(m in OPTIMIZERS or m in BASELINES, "--methods", methods,
                   f"unknown method {m!r}; choose from {', '.join(OPTIMIZERS + BASELINES)}")
        twice = sorted({m for m in methods if methods.count(m) > 1})
        _check(not twice, "--methods", methods, f"{', '.join(twice)} given more than once")
    shots = getattr(args, "shots", None)
    if shots is not None:
        values = shots if isinstance(shots, list) else [shots]
        _check(bool(values) and all(v >= 1 for v in values), "--shots", shots,
               "shot counts are integers >= 1 (images per class), e.g. 1,4,16")
    seeds = getattr(args, "seeds", None)
    seeds = seeds if seeds is not None else ([args.seed] if hasattr(args, "seed") else None)
    if seeds is not None:
        flag = "--seeds" if hasattr(args, "seeds") else "--seed"
        _check(bool(seeds) and all(0 <= v < 2 ** 32 for v in seeds), flag, seeds,
               "seeds are integers in [0, 2**32), e.g. 0,1,2")
    for name, flag, low, _strict in (("steps", "--steps", 1, False),
                                    ("batch_size", "--batch-size", 1, False),
                                    ("eval_every", "--eval-every", 1, False),
                                    ("mc_samples", "--mc-samples", 0, False)):
        v = getattr(args, name, None)
        if v is not None:
            _check(v >= low, flag, v, f"must be an integer >= {low}")
    if args.threads is not None:
        _check(args.threads >= 1, "--threads", args.threads, "must be an integer >= 1")
    positive = "must be a finite number > 0"
    for name, flag, ok, valid in (
            ("lr", "--lr", lambda v: _finite(v, 0.0), positive),
            ("init_cov", "--init-cov", lambda v: _finite(v, 0.0),
             "the Kalman prior covariance P0 must be a finite number > 0, e.g. 1e-3"),
            ("obs_noise", "--obs-noise", lambda v: _finite(v, 0.0), positive),
            ("adaptive_obs_noise", "--adaptive-obs-noise",
             lambda v: _finite(v, 0.0, strict=False, high=1.0),
             "an EMA rate in [0, 1] (0 = off)"),
            ("forgetting", "--forgetting", lambda v: _finite(v, 0.0, high=1.0),
             "the forgetting factor must be in (0, 1] (1 = no forgetting)"),
            ("process_noise", "--process-noise", lambda v: _finite(v, 0.0, strict=False),
             "must be a finite number >= 0"),
            ("weight_decay", "--weight-decay", lambda v: _finite(v, 0.0, strict=False),
             "must be a finite number >= 0"),
            ("kalman_epochs", "--kalman-epochs", lambda v: _finite(v, 0.0, strict=False),
             "passes over the shots, a number >= 0 (0: use --steps)")):
        v = getattr(args, name, None)
        if v is not None:
            _check(ok(v), flag, v, valid)
    for name, flag in (("adamw_lrs", "--adamw-lrs"), ("sgd_lrs", "--sgd-lrs"),
                       ("ivon_lrs", "--ivon-lrs")):
        _check_list(args, name, flag, lambda v: _finite(v, 0.0),
                    "learning rates are finite numbers > 0, e.g. 1e-3,1e-2,1e-1")
    _check_list(args, "prior_mean_scales", "--prior-mean-scales",
                lambda v: _finite(v, 0.0, strict=False),
                "scales of the zero-shot head are finite numbers >= 0, e.g. 0,0.5,1")
    backend = getattr(args, "backend", None)
    if backend is not None:
        from ..backends import NAMES
        _check(backend in ("auto",) + tuple(NAMES), "--backend", backend,
               f"choose from auto, {', '.join(NAMES)}")
    import torch
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {args.device}: not a torch device; use cpu, cuda or "
                         f"cuda:N") from None
    if device.type == "cuda":
        _check(torch.cuda.is_available(), "--device", args.device,
               "no CUDA device is available here (torch.cuda.is_available() is False); "
               "use --device cpu")
    _check_dataset(args.dataset)
    for path in getattr(args, "ood", None) or []:
        _check(Path(path).expanduser().is_dir(), "--ood", path,
               "not a folder (an OOD image folder, class sub-folders or flat)")
    for t in getattr(args, "template", None) or []:
        _check("{}" in t, "--template", repr(t), "a prompt template needs {} where the class "
               "name goes, e.g. 'a photo of a {}.'")
    _check(not (getattr(args, "shifts", False) and getattr(args, "no_shifts", False)),
           "--shifts", "--no-shifts", "give one of them, not both")
    for flag, path in (("--out", args.out), ("--cache-dir", args.cache_dir)):
        _check(path is None or not Path(path).expanduser().exists()
               or Path(path).expanduser().is_dir(), flag, path, "exists and is not a folder")
    if args.command != "demo":
        _check_model(args)
    _check_combinations(args)


def _run(args) -> int:
    import torch

    from . import run as R

    _validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    load = os.getloadavg()
    t0 = time.time()
    model, pretrained, dataset, ood, templates, shifts = _inputs(args)
    prep = R.prepare(model, pretrained, dataset, ood_paths=ood, device=args.device,
                     cache_dir=args.cache_dir, templates=templates, progress=progress,
                     generated_shifts=shifts, verbose=progress)
    _describe_prepared(prep, R)
    plan = _plan(args)
    with _optimizer_reports(args.verbose):
        records = R.run_methods(prep, plan.methods, plan.shots, plan.seeds, plan.base,
                                plan.grids, progress_bar=progress, calibrate=plan.calibrate,
                                overrides=plan.overrides)
    rows = R.aggregate(records)
    wall = time.time() - t0
    extra = {"command": " ".join(["kalman-clip"] + sys.argv[1:]) if sys.argv else args.command,
             "wall_seconds": wall, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
             "load_average_start": list(load), "load_average_end": list(os.getloadavg()),
             "seeds": plan.seeds, "shots": plan.shots, "methods": plan.methods,
             "grids": plan.grids, "overrides": plan.overrides,
             "train_config": vars(plan.base)}
    path, files = R.write_outputs(prep, records, rows, _out_dir(args, args.command), extra,
                                  plots=not args.no_plots)
    _report(prep, R, plan, rows, path, files, wall, load)
    return 0


def _optimizer_reports(verbose: bool):
    """--verbose: the per-parameter report of each method that trains with KalmanNGD,
    printed after the first step of its first run."""
    import contextlib

    from .train import report_optimizers
    if not verbose:
        return contextlib.nullcontext()
    printed = set()

    def show(method, opt, adapter) -> None:
        if method not in printed:          # once per method, not per shot count and seed
            printed.add(method)
            print(f"\n{method}: {opt.describe(adapter)}", flush=True)
    return report_optimizers(show)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"kalman-clip {args.command}: error: {e} (see kalman-clip {args.command} "
              f"--help)", file=sys.stderr)
        return 2
    except Exception as e:  # clear one-line errors for the known failure modes
        from .data import DatasetError
        from .models import ModelLoadError
        if isinstance(e, (DatasetError, ModelLoadError, FileNotFoundError)):
            print(f"kalman-clip: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
