"""On-disk cache of frozen-backbone image features.

One file per (model weights, dataset content, split, transform, feature kind): the name is the
SHA-256 of a JSON key built from those, and the file stores the key again plus a checksum of its
tensors. Writes are atomic (temp file in the same folder + ``os.replace``), so a crash never
leaves a half-written entry under the final name. On load the stored key and checksum are
verified: a corrupted file (unreadable, truncated, file or tensor checksum mismatch) or a stale
one (stored key differs, e.g. written by another version) is reported, deleted and rebuilt,
never used.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

from ._paths import cache_root

CACHE_VERSION = 2
_MAGIC = b"KKFEATCACHE1"


def _tensor_digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        if t is None:
            h.update(f"{k}:none".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """``get_or_build(key, build)``: the cached tensors for ``key`` (a JSON-able dict), built with
    ``build()`` -> dict of tensors when missing, corrupted or stale. ``events`` records what
    happened per call ("hit", "miss", "corrupt", "stale") for tests and logs."""

    def __init__(self, root=None, enabled: bool = True):
        self.root = Path(root) if root is not None else cache_root() / "features"
        self.enabled = enabled
        self.events = []

    def path_for(self, key: Dict) -> Path:
        return self.root / f"{self.key_hash(key)}.pt"

    @staticmethod
    def key_hash(key: Dict) -> str:
        full = dict(key, cache_version=CACHE_VERSION)
        return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()

    def load(self, key: Dict) -> Optional[Dict[str, torch.Tensor]]:
        path = self.path_for(key)
        if not path.is_file():
            self.events.append("miss")
            return None
        try:
            raw = path.read_bytes()
            head, _, rest = raw.partition(b"\n")
            digest, _, payload = rest.partition(b"\n")
            if head != _MAGIC or hashlib.sha256(payload).hexdigest().encode() != digest:
                raise ValueError("file checksum mismatch")
            blob = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            ok_type = isinstance(blob, dict) and "tensors" in blob and "digest" in blob
        except Exception:
            blob, ok_type = None, False
        if not ok_type or _tensor_digest(blob["tensors"]) != blob["digest"]:
            warnings.warn(f"feature cache entry {path} is corrupted; rebuilding it", RuntimeWarning,
                          stacklevel=1)  # the file is at fault, not the caller
            self.events.append("corrupt")
            path.unlink(missing_ok=True)
            return None
        if blob.get("key") != self.key_hash(key) or blob.get("key_json") != json.dumps(
                dict(key, cache_version=CACHE_VERSION), sort_keys=True, default=str):
            warnings.warn(f"feature cache entry {path} is stale (its key does not match); "
                          f"rebuilding it", RuntimeWarning, stacklevel=1)
            self.events.append("stale")
            path.unlink(missing_ok=True)
            return None
        self.events.append("hit")
        return blob["tensors"]

    def save(self, key: Dict, tensors: Dict[str, torch.Tensor]) -> Path:
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.detach().cpu().contiguous() if v is not None else None)
                   for k, v in tensors.items()}
        blob = {"key": self.key_hash(key),
                "key_json": json.dumps(dict(key, cache_version=CACHE_VERSION), sort_keys=True,
                                       default=str),
                "tensors": tensors, "digest": _tensor_digest(tensors)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        buf = io.BytesIO()
        torch.save(blob, buf)
        payload = buf.getvalue()
        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC + b"\n" + hashlib.sha256(payload).hexdigest().encode() + b"\n")
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def get_or_build(self, key: Dict, build: Callable[[], Dict[str, torch.Tensor]]):
        if self.enabled:
            got = self.load(key)
            if got is not None:
                return got
        tensors = build()
        if self.enabled:
            self.save(key, tensors)
        return tensors


@dataclass
class FeatureSet:
    """Frozen-backbone features of one split. ``embed``: image embeddings (N, D), not normalised;
    ``pre``: pre-projection features (N, W) when the model has a ViT ``visual.proj``."""

    name: str
    embed: torch.Tensor
    pre: Optional[torch.Tensor]
    labels: torch.Tensor
    n_skipped: int
    classnames: list

    def __len__(self):
        return self.labels.shape[0]

    def index(self, idx) -> "FeatureSet":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return FeatureSet(self.name, self.embed[idx], None if self.pre is None else self.pre[idx],
                          self.labels[idx], 0, self.classnames)


class _NoProj:
    """Temporarily remove ``visual.proj`` so the visual tower returns pre-projection features."""

    def __init__(self, visual):
        self.visual = visual

    def __enter__(self):
        self.proj = self.visual.proj
        self.visual.proj = None
        return self

    def __exit__(self, *exc):
        self.visual.proj = self.proj


def has_visual_proj(model) -> bool:
    return isinstance(getattr(model.visual, "proj", None), torch.nn.Parameter)


def model_input_size(bundle) -> Optional[int]:
    """The visual tower's input resolution (shorter side), when the model says it."""
    size = getattr(bundle.model.visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        return int(min(size))
    return int(size) if isinstance(size, int) else None


def extract_features(bundle, imageset, cache: Optional[FeatureCache] = None, batch_size: int = 128,
                     progress: bool = True) -> FeatureSet:
    """Features of every image of ``imageset`` through the frozen backbone, via the cache.
    Unreadable images are skipped and counted (``n_skipped``, and a warning). Generated
    shifts of file images are applied at the model's input resolution."""
    from .data import has_lazy_shifts, load_image
    from .progress import progress as progress_bar

    cache = cache if cache is not None else FeatureCache()
    size = model_input_size(bundle) if has_lazy_shifts(imageset) else None
    key = {"kind": "image-features", "model": bundle.name, "weights": bundle.weights_id(),
           "dataset": imageset.name, "content": imageset.fingerprint,
           "transform": repr(bundle.preprocess), "n": len(imageset)}
    if size is not None:
        key["shift_size"] = size

    def build():
        model, dev = bundle.model, bundle.device
        with_pre = has_visual_proj(model)
        embeds, pres, kept = [], [], []
        n = len(imageset)
        bar = progress_bar(total=n, desc=f"features {imageset.name}", enabled=progress,
                           unit="img")
        for s in range(0, n, batch_size):
            ims, idx = [], []
            for i in range(s, min(n, s + batch_size)):
                im = load_image(imageset.sources[i], size)
                if im is not None:
                    ims.append(bundle.preprocess(im))
                    idx.append(i)
            bar.update(min(n, s + batch_size) - s)
            if not ims:
                continue
            x = torch.stack(ims).to(dev)
            with torch.no_grad():
                if with_pre:
                    with _NoProj(model.visual):
                        pre = model.encode_image(x).float()
                    emb = pre @ model.visual.proj.float()
                    pres.append(pre.cpu())
                else:
                    emb = model.encode_image(x).float()
            embeds.append(emb.cpu())
            kept += idx
        bar.close()
        if not kept:
            raise ValueError(f"no readable images in {imageset.name} ({n} files)")
        return {"embed": torch.cat(embeds), "pre": torch.cat(pres) if pres else None,
                "kept": torch.as_tensor(kept, dtype=torch.long)}

    t = cache.get_or_build(key, build)
    kept = t["kept"]
    n_skipped = len(imageset) - kept.numel()
    if n_skipped:
        warnings.warn(f"{imageset.name}: skipped {n_skipped} unreadable image(s) of "
                      f"{len(imageset)}", UserWarning, stacklevel=1)
    labels = torch.as_tensor(np.asarray(imageset.labels)[kept.numpy()], dtype=torch.long)
    return FeatureSet(imageset.name, t["embed"], t["pre"], labels, n_skipped,
                      list(imageset.classnames))
