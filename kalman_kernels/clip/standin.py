"""The offline stand-in for real pretrained CLIP weights.

A randomly initialised CLIP gives useless features, and no weights can be downloaded offline.
So the default run first pretrains a tiny CLIP (``kk-tiny-vit``: embed 64, ViT width 64, 2
layers, patch 4 on 32x32; text width 64, 2 layers) contrastively on two small offline image
sets, each with its own captions: scikit-learn's digits ("a photo of the number three.") and
generated shapes in a clean filled style ("a drawing of a star."). Only their ``pretrain``
splits are used, disjoint from every few-shot, validation and test image; the downstream
tasks (noisy digits, shapes as outlines on noisy backgrounds) are other domains of the same
classes, as a real CLIP meets a new domain of classes it can name. Soft targets for images of
the same class in a batch. THIS IS A STAND-IN: its numbers say nothing about real CLIP models.

The weights of the default recipe ship with the package (``weights/kk-tiny-vit.pt``, about
0.9 MB, with ``weights/kk-tiny-vit.json``: the recipe, hashes and zero-shot accuracy), so a
fresh machine does not pretrain. The file holds every tensor except the token embedding's
rows that pretraining never touched (49,374 of 49,408: no caption uses those tokens, and
AdamW leaves a row with zero gradient and no weight decay exactly at its initial value);
those rows are recreated from the same seeded initialisation and the whole state is checked
against the recorded sha256 before use. Rebuild the file with the package's own pretraining::

    python -m kalman_kernels.clip.rebuild_standin           # about 2 minutes on one thread
    python -m kalman_kernels.clip.rebuild_standin --check   # pretrain again and compare

Another recipe (other steps, batch, lr or seed, or a model without shipped weights) is
pretrained and cached on disk (``local-dir`` layout, atomic), as is the default recipe when
the shipped file is missing or does not reproduce its recorded state.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._paths import cache_root
from .progress import progress
from .registry import TINY_CONFIGS, expected_random_init, register_tiny_configs, save_clip

RECIPE_VERSION = 3
DEFAULT_STEPS = 800
DEFAULT_BATCH = 64
DEFAULT_LR = 2e-3

#: package data (pyproject.toml, [tool.setuptools.package-data]): the shipped stand-in weights
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_MODELS = ("kk-tiny-vit",)
REBUILD_COMMAND = "python -m kalman_kernels.clip.rebuild_standin"
# Pretraining runs on one thread, whatever torch's setting, so that its weights are a function
# of the recipe alone: three one-thread runs gave bit-identical weights here, a two-thread run
# differed by up to 0.017 (reductions split across threads sum in another order). The model
# is too small for threads to pay much.
PRETRAIN_THREADS = 1


@dataclass
class PretrainedStandin:
    model: torch.nn.Module
    model_cfg: Dict[str, Any]
    preprocess_cfg: Dict[str, Any]
    preprocess: Any


def _recipe(name: str, steps: int, batch: int, lr: float, seed: int):
    return {"recipe": RECIPE_VERSION, "model": name, "cfg": TINY_CONFIGS[name], "steps": steps,
            "batch": batch, "lr": lr, "seed": seed, "torch": torch.__version__.split("+")[0]}


def standin_checkpoint(name: str = "kk-tiny-vit", *, steps: int = DEFAULT_STEPS,
                       batch: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, seed: int = 0,
                       cache_dir=None, verbose: bool = True, force: bool = False) -> Path:
    """Folder (``local-dir`` layout) with the stand-in weights, pretraining them if not cached."""
    rec = _recipe(name, steps, batch, lr, seed)
    key = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root(cache_dir) / "standin"
    final = root / f"{name}-{key}"
    if not force:
        shipped = _shipped_checkpoint(name, rec, root, verbose)
        if shipped is not None:
            return shipped
    cached = None if force else _cached_meta(final, rec)
    if cached is not None:
        if verbose:
            zs = cached.get("zero_shot_clean", {})
            print(f"[stand-in] using the cached stand-in CLIP {final} (zero-shot on held-out "
                  f"clean images: {_fmt_zero_shot(zs)})")
        return final
    if verbose:
        print(f"[stand-in] no cached stand-in in {root}: pretraining a tiny CLIP on "
              f"scikit-learn digits and generated shapes ({steps} steps; 90-120 s measured "
              f"on one thread of a 2-core machine, up to 9 minutes under load; a progress "
              f"line every few seconds). This is a STAND-IN for real pretrained weights.",
              flush=True)
    t0 = time.time()
    pre = pretrain_standin(name, steps=steps, batch=batch, lr=lr, seed=seed, verbose=verbose)
    zs = zero_shot_clean(pre, name)
    _save_atomically(pre, root, final, name, key, rec,
                     {"recipe": rec, "seconds": time.time() - t0, "zero_shot_clean": zs,
                      "load_average": list(os.getloadavg()), "threads": PRETRAIN_THREADS,
                      "note": "stand-in CLIP pretrained on sklearn digits and generated "
                              "shapes; not real CLIP weights"})
    if verbose:
        print(f"[stand-in] pretrained in {time.time() - t0:.0f} s (load average "
              f"{os.getloadavg()[0]:.1f}, {PRETRAIN_THREADS} thread); zero-shot on "
              f"held-out clean images: {_fmt_zero_shot(zs)}; cached at {final}")
    return final


def _fmt_zero_shot(zs) -> str:
    if isinstance(zs, dict):
        return ", ".join(f"{k} {v:.3f}" for k, v in zs.items())
    return "n/a"


def _cached_meta(final: Path, rec) -> Any:
    meta_file = final / "standin.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if meta.get("recipe") == rec and (final / "open_clip_pytorch_model.bin").is_file():
        return meta
    return None


def _save_atomically(pre: PretrainedStandin, root: Path, final: Path, name: str, key: str, rec,
                     meta) -> None:
    tmp = root / f".{name}-{key}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_clip(pre.model, tmp, pre.model_cfg, pre.preprocess_cfg,
              extra={"standin": True, "recipe": rec})
    (tmp / "standin.json").write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


# ----------------------------------------------------------------------------------------
# the shipped weights
# ----------------------------------------------------------------------------------------
def state_sha256(state: Dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and bytes, in name order): the
    same weights give the same hash whatever file format or torch version stored them."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_files(name: str = "kk-tiny-vit", folder: Optional[Path] = None) -> Tuple[Path, Path]:
    """(weights, metadata) paths of the shipped stand-in ``name``."""
    folder = SHIPPED_DIR if folder is None else Path(folder)
    return folder / f"{name}.pt", folder / f"{name}.json"


def _without_torch(rec: Dict[str, Any]) -> Dict[str, Any]:
    # The shipped file is a fixed artefact, checked by its state hash, so it serves any torch;
    # only pretraining here (whose numbers may depend on torch) keys its cache by version.
    return {k: v for k, v in rec.items() if k != "torch"}


def _initial_state(name: str, seed: int) -> Dict[str, torch.Tensor]:
    """The state pretraining starts from, without touching the caller's random state (a
    ``load_clip`` must not reseed the user's torch generator)."""
    with torch.random.fork_rng(devices=[]):
        return _fresh_model(name, seed)[0].state_dict()


def _fresh_model(name: str, seed: int):
    """The seeded, randomly initialised model that pretraining starts from."""
    import open_clip
    register_tiny_configs()
    torch.manual_seed(seed)
    with expected_random_init():
        model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model, preprocess


def _compact(state: Dict[str, torch.Tensor], init: Dict[str, torch.Tensor]):
    """``state`` without the rows of 2-D tensors that equal their initial value (the token
    embedding's unused rows): ``{key: tensor}`` or ``{key + ".rows": idx, key + ".values":
    rows}``."""
    out = {}
    for k, v in state.items():
        if v.ndim == 2 and k in init and init[k].shape == v.shape:
            changed = (v != init[k]).any(1).nonzero().flatten()
            if changed.numel() < v.shape[0] // 2:
                out[k + ".rows"] = changed.clone()
                out[k + ".values"] = v[changed].clone()
                continue
        out[k] = v.clone()
    return out


def _expand(compact: Dict[str, torch.Tensor], init: Dict[str, torch.Tensor]):
    state = {}
    for k, v in compact.items():
        if k.endswith(".values"):
            continue
        if k.endswith(".rows"):
            base = k[:-len(".rows")]
            full = init[base].detach().clone()
            full[v] = compact[base + ".values"]
            state[base] = full
        else:
            state[k] = v
    return state


def write_shipped(pre: "PretrainedStandin", rec: Dict[str, Any], meta: Dict[str, Any],
                  folder: Optional[Path] = None) -> Tuple[Path, Path]:
    """Write the compact weights of a pretrained stand-in and their metadata (atomically)."""
    name = rec["model"]
    weights, meta_file = shipped_files(name, folder)
    weights.parent.mkdir(parents=True, exist_ok=True)
    init = _initial_state(name, rec["seed"])
    state = {k: v.detach().cpu() for k, v in pre.model.state_dict().items()}
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    torch.save(_compact(state, init), tmp)
    os.replace(tmp, weights)
    meta = dict(meta, recipe=rec, state_sha256=state_sha256(state),
                file_sha256=file_sha256(weights), file_bytes=weights.stat().st_size,
                model_cfg=pre.model_cfg, preprocess_cfg=pre.preprocess_cfg,
                rebuild=REBUILD_COMMAND)
    tmp = meta_file.with_name(f".{meta_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, meta_file)
    return weights, meta_file


def load_shipped(name: str = "kk-tiny-vit", folder: Optional[Path] = None):
    """(state dict, metadata) of the shipped stand-in, the state checked against its recorded
    sha256. Raises ``FileNotFoundError`` or ``ValueError`` (with the fix) otherwise."""
    weights, meta_file = shipped_files(name, folder)
    if not (weights.is_file() and meta_file.is_file()):
        raise FileNotFoundError(f"no shipped stand-in weights at {weights} (and {meta_file.name}); "
                                f"rebuild them with `{REBUILD_COMMAND}`")
    meta = json.loads(meta_file.read_text())
    if file_sha256(weights) != meta.get("file_sha256"):
        raise ValueError(f"{weights} does not match the sha256 recorded in {meta_file.name} "
                         f"(a partial copy or an edit?); rebuild with `{REBUILD_COMMAND}`")
    init = _initial_state(name, meta["recipe"]["seed"])
    compact = torch.load(weights, map_location="cpu", weights_only=True)
    state = _expand(compact, init)
    if state_sha256(state) != meta.get("state_sha256"):
        raise ValueError(
            f"the shipped stand-in's unused token-embedding rows come from torch's seeded "
            f"initialisation, which gives other values under torch {torch.__version__} than "
            f"under torch {meta['recipe'].get('torch')} that made the file; rebuild with "
            f"`{REBUILD_COMMAND}`")
    return state, meta


def _recipe_difference(shipped: Dict[str, Any], rec: Dict[str, Any]) -> str:
    keys = sorted(set(shipped) | set(rec))
    return ", ".join(f"{k} {shipped.get(k)!r} shipped vs {rec.get(k)!r} asked"
                     for k in keys if shipped.get(k) != rec.get(k))


def _shipped_checkpoint(name: str, rec: Dict[str, Any], root: Path,
                        verbose: bool) -> Optional[Path]:
    """The shipped weights as a ``local-dir`` folder in the cache (written once), or None
    (saying why when they exist for ``name`` but cannot serve this recipe)."""
    if name not in SHIPPED_MODELS:
        return None
    say = (lambda msg: print(f"[stand-in] {msg}", flush=True)) if verbose else (lambda msg: None)
    weights, meta_file = shipped_files(name)
    if not meta_file.is_file():
        say(f"the stand-in weights that ship with the package are missing ({weights}): "
            f"pretraining instead (`{REBUILD_COMMAND}` writes them)")
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, OSError) as e:
        say(f"cannot read {meta_file} ({e}): pretraining instead")
        return None
    if _without_torch(meta.get("recipe", {})) != _without_torch(rec):
        say(f"the shipped stand-in weights were made with another recipe "
            f"({_recipe_difference(_without_torch(meta.get('recipe', {})), _without_torch(rec))})"
            f": pretraining this one instead")
        return None
    final = root / f"{name}-shipped-{meta['state_sha256'][:16]}"
    done = _cached_meta(final, meta["recipe"])
    if done is None or done.get("state_sha256") != meta["state_sha256"]:
        try:
            state, meta = load_shipped(name)
        except (OSError, ValueError) as e:
            say(f"{e}: pretraining instead")
            return None
        with torch.random.fork_rng(devices=[]):
            model, preprocess = _fresh_model(name, meta["recipe"]["seed"])
        model.load_state_dict(state)
        model.eval()
        pre = PretrainedStandin(model, meta["model_cfg"], meta["preprocess_cfg"], preprocess)
        _save_atomically(pre, root, final, name, final.name.split("-shipped-")[1],
                         meta["recipe"], dict(meta, source=f"shipped with the package: {weights}"))
    say(f"using the stand-in CLIP shipped with the package ({weights.name}, "
        f"{weights.stat().st_size / 1e6:.1f} MB; zero-shot on held-out clean images: "
        f"{_fmt_zero_shot(meta.get('zero_shot_clean', {}))}), unpacked to {final}")
    return final


# ----------------------------------------------------------------------------------------
# pretraining data: (images, labels, captions per class)
# ----------------------------------------------------------------------------------------
DIGIT_EXTRA_TEMPLATES = ["a photo of the digit {}.", "a drawing of a {}.", "the number {}."]
SHAPE_EXTRA_TEMPLATES = ["a picture of a {}.", "the {}."]


def _pretraining_data(preprocess) -> Tuple[torch.Tensor, torch.Tensor, List[List[str]]]:
    """Images of both pretraining sets through ``preprocess``, labels 0..9 (digits) and
    10..17 (shapes), and the captions of each label."""
    from .data import (
        DIGIT_TEMPLATES,
        NUMBER_WORDS,
        SHAPE_CLASSES,
        SHAPE_TEMPLATES,
        digits_arrays,
        digits_split_indices,
        shapes_arrays,
        to_pil,
    )
    x, y = digits_arrays()
    idx = digits_split_indices()["pretrain"]
    xs, ys = shapes_arrays("pretrain")
    imgs = torch.stack([preprocess(to_pil(x[i])) for i in idx]
                       + [preprocess(to_pil(a)) for a in xs])
    labels = torch.cat([torch.as_tensor(y[idx], dtype=torch.long),
                        torch.as_tensor(ys, dtype=torch.long) + len(NUMBER_WORDS)])
    captions = [[t.format(w) for t in DIGIT_TEMPLATES + DIGIT_EXTRA_TEMPLATES]
                for w in NUMBER_WORDS]
    captions += [[t.format(c) for t in SHAPE_TEMPLATES + SHAPE_EXTRA_TEMPLATES]
                 for c in SHAPE_CLASSES]
    return imgs, labels, captions


def _optimizer(model, lr: float, steps: int):
    def decays(n, p):
        return p.ndim >= 2 and "embedding" not in n

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warm = min(30, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    return opt, sched


def _contrastive_loss(model, x, y, caps_tok, cap_offset, n_caps, g):
    """Symmetric InfoNCE with soft targets over images of the same class."""
    pick = cap_offset[y] + (torch.rand(y.shape[0], generator=g) * n_caps[y]).long()
    uniq, inv = torch.unique(pick, return_inverse=True)   # encode each caption once
    img_f = F.normalize(model.encode_image(x), dim=-1)
    txt_f = F.normalize(model.encode_text(caps_tok[uniq]), dim=-1)[inv]
    logits = model.logit_scale.exp().clamp(max=100) * img_f @ txt_f.t()
    same = (y[:, None] == y[None, :]).float()
    tgt = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-tgt * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-tgt * F.log_softmax(logits.t(), 1), 1).mean())


def pretrain_standin(name: str = "kk-tiny-vit", *, steps: int = DEFAULT_STEPS,
                     batch: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, seed: int = 0,
                     verbose: bool = True) -> PretrainedStandin:
    """Contrastive pretraining of a tiny CLIP on the digits and shapes ``pretrain`` splits,
    on ``PRETRAIN_THREADS`` thread(s) (torch's setting is restored afterwards)."""
    with _threads(PRETRAIN_THREADS):
        return _pretrain(name, steps, batch, lr, seed, verbose)


def _pretrain(name: str, steps: int, batch: int, lr: float, seed: int,
              verbose: bool) -> PretrainedStandin:
    import open_clip
    model, preprocess = _fresh_model(name, seed)
    tokenizer = open_clip.get_tokenizer(name)
    cfg = open_clip.get_model_config(name)
    pp_cfg = {"mean": list(preprocess.transforms[-1].mean),
              "std": list(preprocess.transforms[-1].std)}
    imgs, labels, captions = _pretraining_data(preprocess)
    caps_tok = tokenizer([c for per in captions for c in per])
    n_caps = torch.tensor([len(per) for per in captions])
    cap_offset = torch.cumsum(n_caps, 0) - n_caps
    opt, sched = _optimizer(model, lr, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = progress(range(steps), desc="stand-in pretraining (digits + shapes)", enabled=verbose,
                   unit="step", every=5.0)
    for _ in bar:
        b = torch.randint(0, len(labels), (batch,), generator=g)
        loss = _contrastive_loss(model, imgs[b], labels[b], caps_tok, cap_offset, n_caps, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return PretrainedStandin(model, cfg, pp_cfg, preprocess)


@torch.no_grad()
def zero_shot_clean(pre: PretrainedStandin, name: str) -> Dict[str, float]:
    """Zero-shot accuracy of the stand-in on held-out clean images of its two domains (the
    digits test split; clean-style shapes drawn with other seeds)."""
    import numpy as np
    import open_clip

    from .data import (
        DIGIT_TEMPLATES,
        NUMBER_WORDS,
        SHAPE_CLASSES,
        SHAPE_TEMPLATES,
        _rng_for,
        digits_arrays,
        digits_split_indices,
        render_shape,
        to_pil,
    )
    tokenizer = open_clip.get_tokenizer(name)
    model = pre.model

    def classifier(words, templates):
        t = []
        for w in words:
            e = F.normalize(model.encode_text(tokenizer([tp.format(w) for tp in templates])),
                            dim=-1).mean(0)
            t.append(F.normalize(e, dim=0))
        return torch.stack(t)

    def accuracy(arrays, labels, words, templates):
        x = torch.stack([pre.preprocess(to_pil(a)) for a in arrays])
        f = F.normalize(model.encode_image(x), dim=-1)
        pred = (f @ classifier(words, templates).t()).argmax(1)
        return float((pred == torch.as_tensor(labels)).float().mean())

    x, y = digits_arrays()
    idx = digits_split_indices()["test"]
    shapes = [(render_shape(kind, _rng_for(0, "shape-zs", i, c), "clean"), c)
              for i in range(25) for c, kind in enumerate(SHAPE_CLASSES)]
    return {"digits": accuracy(x[idx], y[idx], NUMBER_WORDS, DIGIT_TEMPLATES),
            "shapes": accuracy(np.stack([a for a, _ in shapes]), [c for _, c in shapes],
                               SHAPE_CLASSES, SHAPE_TEMPLATES)}


# ----------------------------------------------------------------------------------------
# rebuilding the shipped weights (python -m kalman_kernels.clip.rebuild_standin)
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rebuild(name: str = "kk-tiny-vit", folder: Optional[Path] = None,
            verbose: bool = True) -> Dict[str, Any]:
    """Pretrain the default recipe and write the shipped files into ``folder`` (default:
    the package's). Returns the metadata written."""
    rec = _recipe(name, DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_LR, 0)
    t0 = time.time()
    load = os.getloadavg()
    pre = pretrain_standin(name, steps=DEFAULT_STEPS, batch=DEFAULT_BATCH, lr=DEFAULT_LR,
                           seed=0, verbose=verbose)
    zs = zero_shot_clean(pre, name)
    import open_clip
    meta = {"zero_shot_clean": zs, "seconds": round(time.time() - t0, 1),
            "threads": PRETRAIN_THREADS, "load_average_start": list(load),
            "open_clip": open_clip.__version__,
            "note": "stand-in CLIP pretrained on sklearn digits and generated shapes by "
                    "kalman_kernels.clip.standin; not real CLIP weights"}
    weights, meta_file = write_shipped(pre, rec, meta, folder)
    return json.loads(meta_file.read_text())
