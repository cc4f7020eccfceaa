"""The tiny open_clip configs, their registration, and checkpoint saving.

Shared by ``models.py`` (loading) and ``standin.py`` (pretraining the offline stand-in), so
neither imports the other for these.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ._paths import cache_root

# Tiny ViT CLIPs for the offline stand-in and the tests (docs/clip.md). Average pooling of
# the patch tokens (instead of the class token): measured here, the class-token variant sat on a
# loss plateau for ~250 steps of contrastive pretraining, average pooling left it in < 50.
TINY_CONFIGS: Dict[str, Dict[str, Any]] = {
    "kk-tiny-vit": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                       "patch_size": 4, "mlp_ratio": 4.0, "pool_type": "avg"},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                     "layers": 2},
    },
    "kk-micro-vit": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16,
                       "patch_size": 8, "mlp_ratio": 2.0, "pool_type": "avg"},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1},
    },
}

_registered = False
_registry_lock = threading.Lock()


def open_clip_module():
    try:
        import open_clip  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("kalman_kernels.clip needs open_clip_torch: pip install "
                          "'kalman-kernels[clip]' (or pip install open_clip_torch)") from e
    return open_clip


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def expected_random_init():
    """Silence open_clip's ``No pretrained weights loaded ... initialized randomly`` notice
    where a random initialisation is what was asked for (the stand-in before its
    pretraining, ``pretrained=None`` which warns on its own)."""
    flt = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(flt)
    handlers = list(root.handlers)
    for h in handlers:
        h.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)
        for h in handlers:
            h.removeFilter(flt)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def register_tiny_configs(cache_dir=None) -> List[str]:
    """Register the tiny configs (``kk-tiny-vit``, ``kk-micro-vit``) with open_clip.

    open_clip's ``add_model_config`` reads JSON files, so the configs are written into
    ``<cache>/model_configs`` (atomically) and that folder is added once. Returns the names.
    """
    global _registered
    open_clip = open_clip_module()
    with _registry_lock:
        if not _registered or any(n not in open_clip.list_models() for n in TINY_CONFIGS):
            folder = cache_root(cache_dir) / "model_configs"
            for name, cfg in TINY_CONFIGS.items():
                p = folder / f"{name}.json"
                text = json.dumps(cfg, indent=2, sort_keys=True)
                if not p.is_file() or p.read_text() != text:
                    atomic_write_text(p, text)
            open_clip.add_model_config(folder)
            _registered = True
    return list(TINY_CONFIGS)


def save_clip(model: torch.nn.Module, path, model_cfg: Dict[str, Any],
              preprocess_cfg: Optional[Dict[str, Any]] = None,
              extra: Optional[Dict[str, Any]] = None) -> Path:
    """Save ``model`` so that ``load_clip`` can load it again.

    ``path`` ending in ``.pt``/``.pth``/``.bin``: one state-dict file, load it with
    ``load_clip(name, pretrained=path)``. Otherwise ``path`` is a folder in the ``local-dir``
    layout (``open_clip_config.json`` + ``open_clip_pytorch_model.bin``), load it with
    ``load_clip("local-dir:" + path)``. Writes are atomic (temp file + rename).
    """
    path = Path(path)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if path.suffix in (".pt", ".pth", ".bin"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(sd, tmp)
        os.replace(tmp, path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".open_clip_pytorch_model.bin.{os.getpid()}.tmp"
    torch.save(sd, tmp)
    os.replace(tmp, path / "open_clip_pytorch_model.bin")
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    if extra:
        cfg["kalman_kernels"] = extra
    atomic_write_text(path / "open_clip_config.json", json.dumps(cfg, indent=2, sort_keys=True))
    return path
