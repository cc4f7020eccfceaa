"""Loading open_clip models: pretrained tags, local checkpoints, ``local-dir:PATH``, tiny configs.

``load_clip(name, pretrained)`` accepts
  * a pretrained tag known to open_clip (``laion2b_s34b_b79k``, ``openai``, ...): used from the
    local Hugging Face / open_clip cache when present, downloaded by open_clip when online; with
    no network and no cached copy it fails at once with a message saying what to pass instead;
  * a checkpoint file (a state dict saved by ``save_clip`` or by open_clip training);
  * ``name="local-dir:PATH"`` (``open_clip_config.json`` + weights in one folder; ``pretrained``
    is ignored);
  * ``pretrained="standin"`` for the tiny registered configs (``kk-tiny-vit``): the offline
    stand-in, pretrained contrastively on scikit-learn digits and generated shapes and cached
    (see ``standin.py``);
  * ``pretrained=None``: random weights (features are useless for few-shot work; a warning says so).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import socket
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .registry import (  # noqa: F401
    TINY_CONFIGS,
    expected_random_init,
    open_clip_module,
    register_tiny_configs,
    save_clip,
)
from .standin import standin_checkpoint

STANDIN_TAG = "standin"


class ModelLoadError(RuntimeError):
    """Raised when a model or its weights cannot be loaded; the message says what to pass."""


@dataclass
class ClipBundle:
    """A loaded CLIP model with what the application needs to use it."""

    model: torch.nn.Module
    preprocess: Any                 # PIL image -> tensor (open_clip's eval transform)
    tokenizer: Any
    name: str
    pretrained: Optional[str]
    model_cfg: Dict[str, Any]
    preprocess_cfg: Dict[str, Any] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    standin: bool = False           # True for the offline digits stand-in
    notes: List[str] = field(default_factory=list)
    _weights_id: Optional[str] = None

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    def weights_id(self) -> str:
        """Content hash of the visual tower's weights (part of the feature-cache key)."""
        if self._weights_id is None:
            h = hashlib.sha1()
            for k, v in sorted(self.model.visual.state_dict().items()):
                h.update(k.encode())
                t = v.detach().cpu().contiguous()
                h.update(str(t.dtype).encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._weights_id = h.hexdigest()
        return self._weights_id

    def logit_scale(self) -> float:
        ls = getattr(self.model, "logit_scale", None)
        if ls is None:
            return 100.0
        return float(min(ls.detach().exp().item(), 100.0))


def _is_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "KALMAN_KERNELS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """A bounded probe (DNS and connect in a thread, so it never hangs)."""
    result = {"ok": False}

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result["ok"]


def _cached_tag_file(pcfg: Dict[str, Any], cache_dir: Optional[str]) -> Optional[str]:
    """The local file for a pretrained tag if it is already cached, else None (no network)."""
    if "file" in pcfg and os.path.isfile(pcfg["file"]):
        return pcfg["file"]
    hub = pcfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, filename = os.path.split(hub)
            names = [filename] if filename else []
            names += ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                      "open_clip_pytorch_model.bin"]
            for fn in names:
                if fn.endswith(".bin") or fn.endswith(".pth"):
                    names.append(fn[:-4] + ".safetensors")
            for fn in dict.fromkeys(names):
                try:
                    p = try_to_load_from_cache(repo_id=repo, filename=fn, cache_dir=cache_dir)
                except Exception:
                    p = None
                if isinstance(p, str) and os.path.isfile(p):
                    return p
    url = pcfg.get("url", "")
    if url:
        p = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(p):
            return p
    return None


def _unknown_model(name: str, known: Sequence[str]) -> ModelLoadError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ModelLoadError(
        f"unknown model name {name!r}.{hint} Use an open_clip architecture name "
        f"(open_clip.list_models(), e.g. ViT-B-32), a tiny stand-in config "
        f"({', '.join(TINY_CONFIGS)}), 'local-dir:PATH' or 'hf-hub:ORG/REPO'.")


def _check_quickgelu(name: str, tag: str, model_cfg: Dict[str, Any], pcfg: Dict[str, Any]) -> None:
    tag_q = bool(pcfg.get("quick_gelu", False))
    model_q = bool(model_cfg.get("quick_gelu", False))
    if tag_q != model_q:
        if tag_q:
            fix = f"use the model name '{name}-quickgelu'"
        else:
            fix = f"use the model name '{name.replace('-quickgelu', '')}'"
        warnings.warn(f"pretrained tag {tag!r} was trained with quick_gelu={tag_q} but model "
                      f"{name!r} has quick_gelu={model_q}: features will be degraded; {fix} "
                      f"(OpenAI weights need the -quickgelu names).", UserWarning, stacklevel=3)


def load_clip(name: str, pretrained: Optional[str] = None, device="cpu", *, cache_dir=None,
              precision: str = "fp32", standin_kwargs: Optional[Dict[str, Any]] = None,
              verbose: bool = True) -> ClipBundle:
    """Load an open_clip model (eval mode, frozen) plus its preprocess and tokenizer.

    See the module docstring for what ``name`` and ``pretrained`` accept. Offline (no network,
    or ``HF_HUB_OFFLINE=1``) with weights that are not cached, this raises ``ModelLoadError``
    at once instead of waiting on the network.
    """
    open_clip = open_clip_module()
    register_tiny_configs(cache_dir)
    device = torch.device(device)
    if pretrained is not None and str(pretrained).strip().lower() in ("", "none", "random"):
        pretrained = None
    if name.startswith("local-dir:"):
        return _load_local_dir(name, pretrained, device, precision)
    if name.startswith("hf-hub:"):
        return _load_hf_hub(name, device, precision)
    known = open_clip.list_models()
    if name not in known:
        raise _unknown_model(name, known)
    if pretrained is not None and pretrained.lower() == STANDIN_TAG:
        return _load_standin(name, device, cache_dir, precision, standin_kwargs, verbose)
    if pretrained is None:
        return _load_random(name, device, precision)
    if os.path.isfile(os.path.expanduser(pretrained)):
        return _create(name, pretrained, os.path.expanduser(pretrained), None, device, precision)
    return _load_tag(name, pretrained, device, precision)


def _load_local_dir(name: str, pretrained: Optional[str], device, precision) -> ClipBundle:
    """``local-dir:PATH``: open_clip_config.json + a weights file in one folder."""
    open_clip = open_clip_module()
    path = Path(name[len("local-dir:"):]).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"local-dir: folder not found: {path}")
    cfg_file = path / "open_clip_config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"local-dir:{path} has no open_clip_config.json (it needs "
                             f"{{'model_cfg': ..., 'preprocess_cfg': ...}} and a weights file)")
    try:
        full = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from e
    if not any(path.glob(ext) for ext in ("*.safetensors", "*.bin", "*.pth")):
        raise ModelLoadError(f"local-dir:{path} has a config but no weights file "
                             f"(*.safetensors, *.bin or *.pth)")
    if pretrained:
        # stacklevel 3: the caller of load_clip, like the other warnings of this module
        warnings.warn(f"pretrained={pretrained!r} is ignored for {name!r}", UserWarning,
                      stacklevel=3)
    model, _, preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{path}", device=device, precision=precision)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    model_cfg = full.get("model_cfg", full)
    return _finish(ClipBundle(model, preprocess, tokenizer, name, None, model_cfg,
                              full.get("preprocess_cfg", {}), device,
                              standin=bool(full.get("kalman_kernels", {}).get("standin", False))))


def _load_hf_hub(name: str, device, precision) -> ClipBundle:
    open_clip = open_clip_module()
    if _is_offline() or not _network_reachable():
        raise ModelLoadError(f"{name}: no network (or HF_HUB_OFFLINE=1). Download the repo "
                             f"once and pass 'local-dir:PATH', or pass a checkpoint file.")
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device,
                                                                 precision=precision)
    tokenizer = open_clip.get_tokenizer(name)
    cfg = open_clip.get_model_config(name) or {}
    return _finish(ClipBundle(model, preprocess, tokenizer, name, None, cfg, {}, device))


def _load_standin(name: str, device, cache_dir, precision, standin_kwargs, verbose) -> ClipBundle:
    """The offline stand-in: pretrained (or taken from the cache) by ``standin.py``."""
    if name not in TINY_CONFIGS:
        raise ModelLoadError(f"pretrained='standin' is the offline digits stand-in and exists "
                             f"only for the tiny configs ({', '.join(TINY_CONFIGS)}), not {name!r}")
    ckpt_dir = standin_checkpoint(name, cache_dir=cache_dir, verbose=verbose,
                                  **(standin_kwargs or {}))
    bundle = _load_local_dir(f"local-dir:{ckpt_dir}", None, device, precision)
    bundle.name, bundle.pretrained, bundle.standin = name, STANDIN_TAG, True
    bundle.notes.append("STAND-IN weights: a tiny CLIP pretrained on scikit-learn digits and "
                        "generated shapes, not real pretrained CLIP weights")
    return bundle


def _load_random(name: str, device, precision) -> ClipBundle:
    warnings.warn(f"{name}: no pretrained weights given, the model is randomly initialised "
                  f"(its features are useless for few-shot work). Pass a pretrained tag, a "
                  f"checkpoint file, or pretrained='standin' for the tiny configs.",
                  UserWarning, stacklevel=3)
    torch.manual_seed(0)
    with expected_random_init():
        return _create(name, None, None, None, device, precision)


def _load_tag(name: str, tag: str, device, precision) -> ClipBundle:
    """A pretrained tag: the cached file when there is one, else open_clip downloads it
    (online only; offline this fails at once with what to pass instead)."""
    open_clip = open_clip_module()
    model_cfg = open_clip.get_model_config(name)
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        others = list(open_clip.list_pretrained_models_by_tag(tag))
        msg = (f"pretrained={tag!r} is neither a checkpoint file nor a known tag for "
               f"{name!r}. Tags for {name}: {', '.join(tags) if tags else '(none)'}.")
        if others:
            msg += f" Models with tag {tag!r}: {', '.join(others[:8])}."
        raise ModelLoadError(msg)
    _check_quickgelu(name, tag, model_cfg, pcfg)
    ckpt = _cached_tag_file(pcfg, None)
    if ckpt is None and (_is_offline() or not _network_reachable()):
        raise ModelLoadError(
            f"weights {name}:{tag} are not cached and there is no network "
            f"(or HF_HUB_OFFLINE=1). Either run once online to cache them, or pass a "
            f"local checkpoint file (--pretrained /path/open_clip_pytorch_model.bin), or "
            f"--model local-dir:PATH, or use the offline stand-in "
            f"(--model kk-tiny-vit --pretrained standin).")
    # keep the tag's preprocessing (mean/std, interpolation) when loading a cached file
    force_pp = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                if k in pcfg} or None
    if ckpt is None:   # online: let open_clip download it
        return _create(name, tag, tag, force_pp, device, precision, download=True)
    return _create(name, tag, ckpt, force_pp, device, precision)


def _create(name: str, tag: Optional[str], weights: Optional[str], force_pp, device, precision,
            download: bool = False) -> ClipBundle:
    """open_clip.create_model_and_transforms with a checkpoint file (or a tag to download,
    or nothing), a one-line error for a checkpoint that does not fit the architecture."""
    open_clip = open_clip_module()
    pp_kw = {}
    for k, kw in (("mean", "image_mean"), ("std", "image_std"),
                  ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
        if force_pp and k in force_pp and not download:
            pp_kw[kw] = force_pp[k]
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights, device=device, precision=precision, **pp_kw)
    except RuntimeError as e:
        if weights is not None and not download and (
                "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e)):
            raise ModelLoadError(f"checkpoint {weights} does not match architecture {name!r}: "
                                 f"{str(e).splitlines()[0]}") from e
        raise
    tokenizer = open_clip.get_tokenizer(name)
    return _finish(ClipBundle(model, preprocess, tokenizer, name, tag,
                              open_clip.get_model_config(name), force_pp or {}, device))


def _finish(bundle: ClipBundle) -> ClipBundle:
    bundle.model.eval()
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    return bundle


@torch.no_grad()
def text_features(bundle: ClipBundle, classnames: Sequence[str],
                  templates: Sequence[str] = ("a photo of a {}.",)) -> torch.Tensor:
    """L2-normalised class text embeddings (K, D), averaged over prompt templates."""
    model = bundle.model
    out = []
    for c in classnames:
        toks = bundle.tokenizer([t.format(c) for t in templates]).to(bundle.device)
        e = model.encode_text(toks).float()
        e = e / e.norm(dim=-1, keepdim=True)
        e = e.mean(0)
        out.append(e / e.norm())
    return torch.stack(out).cpu()
