"""The offline stand-in for real pretrained CLIP weights.

A randomly initialised CLIP gives useless features, and no weights can be downloaded offline.
So the default run first pretrains a tiny CLIP (``kk-tiny-vit``: embed 64, ViT width 64, 2
layers, patch 4 on 32x32; text width 64, 2 layers) contrastively on scikit-learn's digits
(the ``pretrain`` split only: disjoint from every few-shot, validation and test image), with
templated captions ("a photo of the number three.") and soft targets for images of the same
class in a batch. It takes about a minute on 2 CPU cores and is cached on disk (``local-dir``
layout, atomic). THIS IS A STAND-IN: its numbers say nothing about real CLIP models.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ._paths import cache_root

RECIPE_VERSION = 2
DEFAULT_STEPS = 300
DEFAULT_BATCH = 64
DEFAULT_LR = 1e-3


def _recipe(name: str, steps: int, batch: int, lr: float, seed: int):
    from .models import TINY_CONFIGS
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
    meta_file = final / "standin.json"
    if not force and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("recipe") == rec and (final / "open_clip_pytorch_model.bin").is_file():
                if verbose:
                    print(f"[stand-in] using cached stand-in CLIP {final} (pretrained on "
                          f"sklearn digits, zero-shot {meta.get('zero_shot_clean', float('nan')):.3f} "
                          f"on held-out clean digits)")
                return final
        except (json.JSONDecodeError, OSError):
            pass
    if verbose:
        print(f"[stand-in] no cached stand-in found: pretraining a tiny CLIP on scikit-learn "
              f"digits ({steps} steps, about a minute on 2 CPU cores). This is a STAND-IN for "
              f"real pretrained weights.")
    t0 = time.time()
    model, cfg, pp_cfg = pretrain_standin(name, steps=steps, batch=batch, lr=lr, seed=seed,
                                          verbose=verbose)
    zs = _zero_shot_clean(model, name)
    from .models import save_clip
    tmp = root / f".{name}-{key}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_clip(model, tmp, cfg, pp_cfg, extra={"standin": True, "recipe": rec})
    meta = {"recipe": rec, "seconds": time.time() - t0, "zero_shot_clean": zs,
            "note": "stand-in CLIP pretrained on sklearn digits; not real CLIP weights"}
    (tmp / "standin.json").write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if verbose:
        print(f"[stand-in] pretrained in {meta['seconds']:.0f} s; zero-shot accuracy on held-out "
              f"clean digits {zs:.3f}; cached at {final}")
    return final


def _digits_tensor(idx, preprocess):
    from .data import digits_arrays, to_pil
    x, y = digits_arrays()
    imgs = torch.stack([preprocess(to_pil(x[i])) for i in idx])
    return imgs, torch.as_tensor(y[idx], dtype=torch.long)


def pretrain_standin(name: str = "kk-tiny-vit", *, steps: int = DEFAULT_STEPS,
                     batch: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, seed: int = 0,
                     verbose: bool = True):
    """Contrastive pretraining of a tiny CLIP on the digits ``pretrain`` split (CPU)."""
    import open_clip
    from tqdm.auto import tqdm
    from .data import DIGIT_TEMPLATES, NUMBER_WORDS, digits_split_indices
    from .models import register_tiny_configs
    register_tiny_configs()
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    cfg = open_clip.get_model_config(name)
    pp_cfg = {"mean": list(preprocess.transforms[-1].mean), "std": list(preprocess.transforms[-1].std)}
    idx = digits_split_indices()["pretrain"]
    imgs, labels = _digits_tensor(idx, preprocess)
    # all captions: class c, template t (a few extra wordings to vary the text)
    templates = list(DIGIT_TEMPLATES) + ["a photo of the digit {}.", "a drawing of a {}.",
                                         "the number {}."]
    caps = tokenizer([t.format(w) for w in NUMBER_WORDS for t in templates])  # (10*T, L)
    n_t = len(templates)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warm = min(30, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="stand-in pretraining (sklearn digits)", disable=not verbose,
               unit="step")
    for _ in bar:
        b = torch.randint(0, len(idx), (batch,), generator=g)
        x, y = imgs[b], labels[b]
        t_idx = y * n_t + torch.randint(0, n_t, (batch,), generator=g)
        # encode each distinct caption once (at most 10 * T of them), then gather
        uniq, inv = torch.unique(t_idx, return_inverse=True)
        img_f = F.normalize(model.encode_image(x), dim=-1)
        txt_f = F.normalize(model.encode_text(caps[uniq]), dim=-1)[inv]
        logits = model.logit_scale.exp().clamp(max=100) * img_f @ txt_f.t()
        same = (y[:, None] == y[None, :]).float()
        tgt = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-tgt * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-tgt * F.log_softmax(logits.t(), 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.standin_preprocess = preprocess
    return model, cfg, pp_cfg


@torch.no_grad()
def _zero_shot_clean(model, name: str) -> float:
    import open_clip
    from .data import DIGIT_TEMPLATES, NUMBER_WORDS, digits_split_indices
    preprocess = model.standin_preprocess
    tokenizer = open_clip.get_tokenizer(name)
    idx = digits_split_indices()["test"]
    imgs, labels = _digits_tensor(idx, preprocess)
    img_f = F.normalize(model.encode_image(imgs), dim=-1)
    t = []
    for w in NUMBER_WORDS:
        e = F.normalize(model.encode_text(tokenizer([tp.format(w) for tp in DIGIT_TEMPLATES])), dim=-1).mean(0)
        t.append(F.normalize(e, dim=0))
    pred = (img_f @ torch.stack(t).t()).argmax(1)
    return float((pred == labels).float().mean())
