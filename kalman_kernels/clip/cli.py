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
import os
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

DEMO_SHOTS = [1, 4, 16]
DEMO_METHODS = ["zero-shot", "gda", "adamw", "kalman"]


def _csv(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> List[int]:
    try:
        return [int(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def _floats(s: str) -> List[float]:
    try:
        return [float(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")


def _common(p: argparse.ArgumentParser, demo: bool = False):
    g = p.add_argument_group("model and data")
    if not demo:
        g.add_argument("--model", default="kk-tiny-vit",
                       help="open_clip architecture (e.g. ViT-B-32, ViT-B-32-quickgelu for OpenAI "
                            "weights), a tiny stand-in config (kk-tiny-vit), or local-dir:PATH "
                            "(default: %(default)s)")
        g.add_argument("--pretrained", default="standin",
                       help="pretrained tag (e.g. laion2b_s34b_b79k, openai), a checkpoint file, "
                            "'standin' (offline digits stand-in, tiny configs only) or 'none' "
                            "(default: %(default)s)")
        g.add_argument("--dataset", default="digits-noisy",
                       help="digits, digits-noisy[:SIGMA] (default: sigma 0.3), textiles "
                            "(conformal-clip-data), or imagefolder:PATH (one sub-folder per "
                            "class; PATH/train + PATH/test are used when present)")
        g.add_argument("--ood", action="append", default=[], metavar="PATH",
                       help="an OOD image folder (class sub-folders or flat); repeatable")
        g.add_argument("--template", action="append", default=None, metavar="TEXT",
                       help="prompt template with {} for the class name (repeatable; default "
                            "per dataset, 'a photo of a {}.' for image folders)")
        g.add_argument("--no-shifts", action="store_true",
                       help="skip the generated OOD shifts of the built-in datasets")
        g.add_argument("--shifts", action="store_true",
                       help="also generate shifted OOD splits for imagefolder datasets")
    g.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    g.add_argument("--cache-dir", default=None,
                   help="cache folder (default: $KALMAN_KERNELS_CACHE or ~/.cache/kalman_kernels)")
    g.add_argument("--out", default=None, help="output folder (default: runs/<command>-<time>)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _train_args(p: argparse.ArgumentParser, multi: bool):
    g = p.add_argument_group("training")
    if multi:
        g.add_argument("--methods", type=_csv, default=["zero-shot", "gda", "adamw", "kalman"],
                       help="comma-separated from kalman, kalman-loss, adamw, sgd, zero-shot, gda "
                            "(default: zero-shot,gda,adamw,kalman)")
        g.add_argument("--shots", type=_ints, default=[1, 4, 16],
                       help="comma-separated shot counts (default: 1,4,16)")
        g.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds (default: 0)")
        g.add_argument("--adamw-lrs", type=_floats, default=None,
                       help="AdamW learning-rate grid, selected on the validation split "
                            "(default: the single --lr or 1e-3)")
        g.add_argument("--sgd-lrs", type=_floats, default=None,
                       help="SGD learning-rate grid, selected on the validation split")
    else:
        g.add_argument("--optimizer", default="kalman",
                       choices=["kalman", "kalman-loss", "adamw", "sgd"])
        g.add_argument("--shots", type=int, default=16)
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--baselines", action="store_true",
                       help="also report zero-shot and GDA")
    g.add_argument("--adapter", default="head", choices=["head", "clip-adapter", "proj"],
                   help="text-initialised linear head, CLIP-Adapter MLP, or visual projection "
                        "(default: %(default)s)")
    g.add_argument("--obs", default="logits", choices=["logits", "paired"],
                   help="Kalman observation model (default: %(default)s)")
    g.add_argument("--steps", type=int, default=200,
                   help="training steps for adamw / sgd (default: %(default)s)")
    g.add_argument("--kalman-epochs", type=float, default=1.0,
                   help="passes over the shots for kalman / kalman-loss (default: 1: every image "
                        "observed once, as the filter assumes; 0: use --steps)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=None,
                   help="step scale (Kalman, default 1 = exact update) or learning rate "
                        "(AdamW 1e-3, SGD 1e-1)")
    g.add_argument("--init-cov", type=float, default=None,
                   help="Kalman prior covariance P0 (default: 1e-3 for head and proj, 1e-1 for "
                        "clip-adapter)")
    g.add_argument("--obs-noise", type=float, default=1e-2, help="Kalman observation noise r")
    g.add_argument("--forgetting", type=float, default=1.0, help="Kalman forgetting factor")
    g.add_argument("--process-noise", type=float, default=0.0, help="Kalman process noise q")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW/SGD weight decay")
    g.add_argument("--eval-every", type=int, default=20)
    g.add_argument("--calibrate", action="store_true",
                   help="fit the softmax temperature on the validation split (all methods)")
    g.add_argument("--mc-samples", type=int, default=0,
                   help="Kalman methods: predict with the mean softmax over this many draws "
                        "theta ~ N(mu, P) (opt.sampled_params) instead of the mean (default: 0)")
    g.add_argument("--backend", default="auto", help="KalmanNGD backend (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    pd = sub.add_parser("demo", help="the offline default, end to end (stand-in CLIP, noisy digits)",
                        description="Offline demo: pretrain (or load the cached) stand-in CLIP on "
                                    "scikit-learn digits, then 1/4/16-shot adaptation on noisy "
                                    "digits: kalman vs adamw vs zero-shot vs GDA, in and out of "
                                    "distribution. A STAND-IN for real CLIP weights.")
    _common(pd, demo=True)
    pd.add_argument("--seeds", type=_ints, default=[0, 1, 2],
                    help="comma-separated seeds (default: 0,1,2)")
    pd.add_argument("--steps", type=int, default=200)
    return p


def _out_dir(args, command: str) -> Path:
    if args.out:
        return Path(args.out)
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def _base_cfg(args):
    from .train import TrainConfig
    return TrainConfig(adapter=args.adapter, obs=args.obs, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, init_cov=args.init_cov,
                       obs_noise=args.obs_noise, forgetting=args.forgetting,
                       process_noise=args.process_noise, weight_decay=args.weight_decay,
                       eval_every=args.eval_every, mc_samples=args.mc_samples,
                       backend=args.backend)


def _kalman_overrides(args):
    if args.kalman_epochs and args.kalman_epochs > 0:
        return {"kalman": {"epochs": args.kalman_epochs},
                "kalman-loss": {"epochs": args.kalman_epochs}}
    return {}


def _run(args) -> int:
    import torch
    from . import run as R
    from .data import DIGIT_TEMPLATES
    from .train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    t0 = time.time()
    if args.command == "demo":
        model, pretrained, dataset, ood, templates = "kk-tiny-vit", "standin", "digits-noisy", [], None
        shifts = None
    else:
        model, pretrained, dataset, ood, templates = (args.model, args.pretrained, args.dataset,
                                                      args.ood, args.template)
        shifts = False if args.no_shifts else (True if args.shifts else None)
    prep = R.prepare(model, pretrained, dataset, ood_paths=ood, device=args.device,
                     cache_dir=args.cache_dir, templates=templates, progress=progress,
                     generated_shifts=shifts)
    if prep.bundle.standin:
        print(R.STANDIN_BANNER)
    for note in prep.bundle.notes:
        if not prep.bundle.standin:
            print("note:", note)
    if prep.skipped:
        print("skipped unreadable images: " + ", ".join(f"{k}: {v}" for k, v in prep.skipped.items()))
    print(f"dataset {prep.ds.name}: {len(prep.ds.classnames)} classes, pool {len(prep.pool)}, "
          f"test {len(prep.test)}, OOD splits {len(prep.ood)}"
          + (f" ({', '.join(prep.ood)})" if prep.ood else ""))

    if args.command == "demo":
        base = TrainConfig(steps=args.steps)
        methods, shots, seeds = DEMO_METHODS, DEMO_SHOTS, args.seeds
        grid = {"adamw": [1e-3, 1e-2, 1e-1]}
        calibrate = False
        overrides = {"kalman": {"epochs": 1.0}}
    elif args.command == "compare":
        base = _base_cfg(args)
        methods, shots, seeds = args.methods, args.shots, args.seeds
        grid = {}
        if args.adamw_lrs:
            grid["adamw"] = args.adamw_lrs
        if args.sgd_lrs:
            grid["sgd"] = args.sgd_lrs
        calibrate = args.calibrate
        overrides = _kalman_overrides(args)
    else:
        base = _base_cfg(args)
        methods = ([("zero-shot"), "gda"] if args.baselines else []) + [args.optimizer]
        shots, seeds, grid, calibrate = [args.shots], [args.seed], {}, args.calibrate
        overrides = _kalman_overrides(args)
    records = R.run_methods(prep, methods, shots, seeds, base, grid, progress=progress,
                            calibrate=calibrate, overrides=overrides)
    rows = R.aggregate(records)
    wall = time.time() - t0
    out = _out_dir(args, args.command)
    extra = {"command": " ".join(["kalman-clip"] + sys.argv[1:]) if sys.argv else args.command,
             "wall_seconds": wall, "threads": torch.get_num_threads(),
             "seeds": list(seeds), "shots": list(shots), "methods": list(methods),
             "lr_grid": grid, "overrides": overrides,
             "train_config": vars(base) if hasattr(base, "__dict__") else {}}
    path, files = R.write_outputs(prep, records, rows, out, extra, plots=not args.no_plots)
    print()
    print(f"{prep.ds.name}: ID = test split; OOD = mean over {len(prep.ood)} shifted/OOD splits; "
          f"mean over seeds {list(seeds)}")
    print(R.format_table(rows))
    if prep.ds.ood_severity:
        print("\nOOD by shift kind (mean over severities " + ", ".join(
            f"{k}: {sorted({lv for kk, lv in prep.ds.ood_severity.values() if kk == k})}"
            for k in sorted({k for k, _ in prep.ds.ood_severity.values()})) + ")")
        print(R.format_shift_table(rows, prep.ds.ood_severity))
    if prep.bundle.standin:
        print(R.STANDIN_BANNER)
    print(f"\nresults: {path}" + (f"\nplots: {', '.join(files)}" if files else ""))
    print(f"wall time: {wall:.1f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # clear one-line errors for the known failure modes
        from .data import DatasetError
        from .models import ModelLoadError
        if isinstance(e, (DatasetError, ModelLoadError, FileNotFoundError)):
            print(f"kalman-clip: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
