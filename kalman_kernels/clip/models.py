"""Loading open_clip models: pretrained tags, local checkpoints, ``local-dir:PATH``, tiny configs.

``load_clip(name, pretrained)`` accepts
  * a pretrained tag known to open_clip (``laion2b_s34b_b79k``, ``openai``, ...): used from the
    local Hugging Face / open_clip cache when present, downloaded by open_clip when online; with
    no network and no cached copy it fails at once with a message saying what to pass instead;
  * a checkpoint file (a state dict saved by ``save_clip`` or by open_clip training);
  * ``name="local-dir:PATH"`` (``open_clip_config.json`` + weights in one folder; ``pretrained``
    is ignored);
  * ``pretrained="standin"`` for the tiny registered configs (``kk-tiny-vit``): the offline
    stand-in, pretrained contrastively on scikit-learn digits and cached (see ``standin.py``);
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

from ._paths import cache_root

# Tiny ViT CLIPs for the offline stand-in and the tests (DESIGN section 8). Average pooling of
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
# Preprocessing for the tiny configs: images are upscaled 8x8 digits, keep CLIP's mean/std.
STANDIN_TAG = "standin"

_registered = False
_registry_lock = threading.Lock()


class ModelLoadError(RuntimeError):
    """Raised when a model or its weights cannot be loaded; the message says what to pass."""


def _open_clip():
    try:
        import open_clip  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("kalman_kernels.clip needs open_clip_torch: pip install "
                          "'kalman-kernels[clip]' (or pip install open_clip_torch)") from e
    return open_clip


def _atomic_write_text(path: Path, text: str) -> None:
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
    open_clip = _open_clip()
    with _registry_lock:
        if not _registered or any(n not in open_clip.list_models() for n in TINY_CONFIGS):
            folder = cache_root(cache_dir) / "model_configs"
            for name, cfg in TINY_CONFIGS.items():
                p = folder / f"{name}.json"
                text = json.dumps(cfg, indent=2, sort_keys=True)
                if not p.is_file() or p.read_text() != text:
                    _atomic_write_text(p, text)
            open_clip.add_model_config(folder)
            _registered = True
    return list(TINY_CONFIGS)


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
    open_clip = _open_clip()
    register_tiny_configs(cache_dir)
    device = torch.device(device)
    notes: List[str] = []
    if pretrained is not None and str(pretrained).strip().lower() in ("", "none", "random"):
        pretrained = None

    if name.startswith("local-dir:"):
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
            warnings.warn(f"pretrained={pretrained!r} is ignored for {name!r}", UserWarning)
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{path}", device=device, precision=precision)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        model_cfg = full.get("model_cfg", full)
        bundle = ClipBundle(model, preprocess, tokenizer, name, None, model_cfg,
                            full.get("preprocess_cfg", {}), device,
                            standin=bool(full.get("kalman_kernels", {}).get("standin", False)),
                            notes=notes)
        return _finish(bundle)

    if name.startswith("hf-hub:"):
        if _is_offline() or not _network_reachable():
            raise ModelLoadError(f"{name}: no network (or HF_HUB_OFFLINE=1). Download the repo "
                                 f"once and pass 'local-dir:PATH', or pass a checkpoint file.")
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device,
                                                                     precision=precision)
        tokenizer = open_clip.get_tokenizer(name)
        cfg = open_clip.get_model_config(name) or {}
        return _finish(ClipBundle(model, preprocess, tokenizer, name, None, cfg, {}, device,
                                  notes=notes))

    known = open_clip.list_models()
    if name not in known:
        raise _unknown_model(name, known)
    model_cfg = open_clip.get_model_config(name)

    if pretrained is not None and pretrained.lower() == STANDIN_TAG:
        if name not in TINY_CONFIGS:
            raise ModelLoadError(f"pretrained='standin' is the offline digits stand-in and exists "
                                 f"only for the tiny configs ({', '.join(TINY_CONFIGS)}), not {name!r}")
        from .standin import standin_checkpoint
        ckpt_dir = standin_checkpoint(name, cache_dir=cache_dir, verbose=verbose,
                                      **(standin_kwargs or {}))
        bundle = load_clip(f"local-dir:{ckpt_dir}", device=device, cache_dir=cache_dir,
                           precision=precision)
        bundle.name, bundle.pretrained, bundle.standin = name, STANDIN_TAG, True
        bundle.notes.append("STAND-IN weights: a tiny CLIP pretrained for ~1 minute on "
                            "scikit-learn digits, not real pretrained CLIP weights")
        return bundle

    force_pp = None
    ckpt = None
    if pretrained is None:
        warnings.warn(f"{name}: no pretrained weights given, the model is randomly initialised "
                      f"(its features are useless for few-shot work). Pass a pretrained tag, a "
                      f"checkpoint file, or pretrained='standin' for the tiny configs.",
                      UserWarning, stacklevel=2)
        torch.manual_seed(0)
    elif os.path.isfile(os.path.expanduser(pretrained)):
        ckpt = os.path.expanduser(pretrained)
    else:
        pcfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not pcfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            others = [m for m in open_clip.list_pretrained_models_by_tag(pretrained)]
            msg = (f"pretrained={pretrained!r} is neither a checkpoint file nor a known tag for "
                   f"{name!r}. Tags for {name}: {', '.join(tags) if tags else '(none)'}.")
            if others:
                msg += f" Models with tag {pretrained!r}: {', '.join(others[:8])}."
            raise ModelLoadError(msg)
        _check_quickgelu(name, pretrained, model_cfg, pcfg)
        ckpt = _cached_tag_file(pcfg, None)
        if ckpt is None:
            if _is_offline() or not _network_reachable():
                raise ModelLoadError(
                    f"weights {name}:{pretrained} are not cached and there is no network "
                    f"(or HF_HUB_OFFLINE=1). Either run once online to cache them, or pass a "
                    f"local checkpoint file (--pretrained /path/open_clip_pytorch_model.bin), or "
                    f"--model local-dir:PATH, or use the offline stand-in "
                    f"(--model kk-tiny-vit --pretrained standin).")
            ckpt = None  # let open_clip download it
        # keep the tag's preprocessing (mean/std, interpolation) when loading a cached file
        force_pp = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                    if k in pcfg} or None
        if ckpt is None:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, precision=precision)
            tokenizer = open_clip.get_tokenizer(name)
            return _finish(ClipBundle(model, preprocess, tokenizer, name, pretrained, model_cfg,
                                      force_pp or {}, device, notes=notes))
    try:
        pp_kw = {}
        for k, kw in (("mean", "image_mean"), ("std", "image_std"),
                      ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
            if force_pp and k in force_pp:
                pp_kw[kw] = force_pp[k]
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=ckpt, device=device, precision=precision, **pp_kw)
    except RuntimeError as e:
        if ckpt is not None and ("size mismatch" in str(e) or "Missing key" in str(e)
                                 or "Unexpected key" in str(e)):
            raise ModelLoadError(f"checkpoint {ckpt} does not match architecture {name!r}: "
                                 f"{str(e).splitlines()[0]}") from e
        raise
    tokenizer = open_clip.get_tokenizer(name)
    return _finish(ClipBundle(model, preprocess, tokenizer, name, pretrained, model_cfg,
                              force_pp or {}, device, notes=notes))


def _finish(bundle: ClipBundle) -> ClipBundle:
    bundle.model.eval()
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    return bundle


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
    _atomic_write_text(path / "open_clip_config.json", json.dumps(cfg, indent=2, sort_keys=True))
    return path


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
