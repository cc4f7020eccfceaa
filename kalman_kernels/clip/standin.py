"""The offline stand-in for real pretrained CLIP weights.

A randomly initialised CLIP gives useless features, and no weights can be downloaded offline.
So the default run first pretrains a tiny CLIP (``kk-tiny-vit``: embed 64, ViT width 64, 2
layers, patch 4 on 32x32; text width 64, 2 layers) contrastively on two small offline image
sets, each with its own captions: scikit-learn's digits ("a photo of the number three.") and
generated shapes in a clean filled style ("a drawing of a star."). Only their ``pretrain``
splits are used, disjoint from every few-shot, validation and test image; the downstream
tasks (noisy digits, shapes as outlines on noisy backgrounds) are other domains of the same
classes, as a real CLIP meets a new domain of classes it can name. Soft targets for images of
the same class in a batch. The result is cached on disk (``local-dir`` layout, atomic).
THIS IS A STAND-IN: its numbers say nothing about real CLIP models.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from ._paths import cache_root
from .progress import progress
from .registry import TINY_CONFIGS, expected_random_init, register_tiny_configs, save_clip

RECIPE_VERSION = 3
DEFAULT_STEPS = 800
DEFAULT_BATCH = 64
DEFAULT_LR = 2e-3


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
    cached = None if force else _cached_meta(final, rec)
    if cached is not None:
        if verbose:
            zs = cached.get("zero_shot_clean", {})
            print(f"[stand-in] using the cached stand-in CLIP {final} (zero-shot on held-out "
                  f"clean images: {_fmt_zero_shot(zs)})")
        return final
    if verbose:
        print(f"[stand-in] no cached stand-in in {root}: pretraining a tiny CLIP on "
              f"scikit-learn digits and generated shapes ({steps} steps; 20-90 s measured on "
              f"2 CPU cores, depending on load). open_clip creates it with random weights "
              f"first. This is a STAND-IN for real pretrained weights.")
    t0 = time.time()
    pre = pretrain_standin(name, steps=steps, batch=batch, lr=lr, seed=seed, verbose=verbose)
    zs = zero_shot_clean(pre, name)
    _save_atomically(pre, root, final, name, key, rec,
                     {"recipe": rec, "seconds": time.time() - t0, "zero_shot_clean": zs,
                      "load_average": list(os.getloadavg()), "threads": torch.get_num_threads(),
                      "note": "stand-in CLIP pretrained on sklearn digits and generated "
                              "shapes; not real CLIP weights"})
    if verbose:
        print(f"[stand-in] pretrained in {time.time() - t0:.0f} s (load average "
              f"{os.getloadavg()[0]:.1f}, {torch.get_num_threads()} threads); zero-shot on "
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
# pretraining data: (images, labels, captions per class)
# ----------------------------------------------------------------------------------------
DIGIT_EXTRA_TEMPLATES = ["a photo of the digit {}.", "a drawing of a {}.", "the number {}."]
SHAPE_EXTRA_TEMPLATES = ["a picture of a {}.", "the {}."]


def _pretraining_data(preprocess) -> Tuple[torch.Tensor, torch.Tensor, List[List[str]]]:
    """Images of both pretraining sets through ``preprocess``, labels 0..9 (digits) and
    10..17 (shapes), and the captions of each label."""
    from .data import (DIGIT_TEMPLATES, NUMBER_WORDS, SHAPE_CLASSES, SHAPE_TEMPLATES,
                       digits_arrays, digits_split_indices, shapes_arrays, to_pil)
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
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warm = min(30, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
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
    """Contrastive pretraining of a tiny CLIP on the digits and shapes ``pretrain`` splits."""
    import open_clip
    register_tiny_configs()
    torch.manual_seed(seed)
    with expected_random_init():
        model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    cfg = open_clip.get_model_config(name)
    pp_cfg = {"mean": list(preprocess.transforms[-1].mean), "std": list(preprocess.transforms[-1].std)}
    imgs, labels, captions = _pretraining_data(preprocess)
    caps_tok = tokenizer([c for per in captions for c in per])
    n_caps = torch.tensor([len(per) for per in captions])
    cap_offset = torch.cumsum(n_caps, 0) - n_caps
    opt, sched = _optimizer(model, lr, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = progress(range(steps), desc="stand-in pretraining (digits + shapes)", enabled=verbose,
                   unit="step")
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
    from .data import (DIGIT_TEMPLATES, NUMBER_WORDS, SHAPE_CLASSES, SHAPE_TEMPLATES,
                       _rng_for, digits_arrays, digits_split_indices, render_shape, to_pil)
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
