"""Datasets: built-in digits (scikit-learn), shapes (generated) and textiles
(conformal-clip-data), ImageFolder,
generated OOD shifts, and few-shot / validation sampling.

Every dataset is an ``ImageSet``: a list of image sources (a file path or an in-memory float
array in [0, 1]), integer labels (-1 for unlabelled OOD folders), class names, prompt templates
and a content fingerprint (part of the feature-cache key). Images become PIL images only when
features are extracted; unreadable files are skipped and counted there, never fatal.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = ["a photo of the number {}.", "a picture of the digit {}.",
                   "the handwritten number {}.", "an image of a {}."]
TEXTILE_CLASSES = ["nominal textile", "textile with a local defect",
                   "textile with a global defect"]
DEFAULT_TEMPLATE = "a photo of a {}."
DATA_VERSION = "1"
BUILTIN_DATASETS = ("digits-noisy", "shapes", "textiles")

# The downstream domain of the demo: digits with gaussian pixel noise of this sigma. The
# stand-in's zero-shot accuracy there is mediocre (measured 0.44; 0.95 on clean digits), which
# leaves room for few-shot adaptation; at sigma 0.3 its features are close to useless (0.15).
DEFAULT_DIGITS_NOISE = 0.15

BUILTIN_HELP = ("digits, digits-noisy[:SIGMA] (default sigma %g), shapes, textiles"
                % DEFAULT_DIGITS_NOISE)

# digits split (fixed, seed 0): stand-in pretraining / downstream test / few-shot pool
DIGITS_PRETRAIN = 800
DIGITS_TEST = 500

# OOD shifts and their severities (the value is the shift's parameter)
SHIFTS_DIGITS = {
    "noise": [0.1, 0.2, 0.3],      # extra gaussian sigma on top of the domain's noise
    "blur": [0.75, 1.5, 2.5],      # gaussian blur sigma in pixels (32x32 images)
    "rotation": [30.0, 60.0, 90.0],
    "inversion": [0.75, 1.0],      # x -> (1 - a) x + a (1 - x)
}
SHIFTS_LARGE = {
    "noise": [0.1, 0.2, 0.3],
    "blur": [2.0, 4.0, 8.0],       # sigma in pixels of a 256-pixel image (scaled to the size)
    "rotation": [30.0, 60.0, 90.0],
    "inversion": [0.75, 1.0],
}


class DatasetError(ValueError):
    """A dataset that cannot be used (missing path, empty class folder, ...)."""


@dataclass
class ImageSet:
    name: str
    sources: List[Union[str, np.ndarray]]
    labels: np.ndarray
    classnames: List[str]
    templates: List[str]
    fingerprint: str
    meta: Dict = field(default_factory=dict)

    def __len__(self):
        return len(self.sources)

    def subset(self, idx: Sequence[int], name: str) -> "ImageSet":
        idx = np.asarray(idx, dtype=np.int64)
        fp = hashlib.sha1((self.fingerprint + ":" + ",".join(map(str, idx.tolist()))).encode())
        return ImageSet(name, [self.sources[i] for i in idx], self.labels[idx].copy(),
                        self.classnames, self.templates, fp.hexdigest(), dict(self.meta))


@dataclass
class DatasetSplits:
    """A downstream task: a few-shot pool, a test split, OOD splits (name -> ImageSet)."""

    name: str
    pool: ImageSet
    test: ImageSet
    ood: Dict[str, ImageSet]
    classnames: List[str]
    templates: List[str]
    # split -> (kind, level)
    ood_severity: Dict[str, Tuple[str, float]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    # shift kind -> what its OOD splits are made of (the built-in tasks' test images carry
    # the domain's noise, and each shift composes with it in its own order)
    shift_notes: Dict[str, str] = field(default_factory=dict)


SHIFT_UNITS = {"noise": "sigma", "blur": "sigma in pixels", "rotation": "degrees",
               "inversion": "a: x -> (1 - a) x + a (1 - x)"}


def _noisy_domain_shift_notes(noise: float, kinds) -> Dict[str, str]:
    """How each generated shift composes with test images that carry noise of sigma ``noise``
    (as ``_digits_set`` and ``_shapes_set`` make them). Blur comes after the noise, so it also
    smooths the noise away and can raise accuracy at low severity."""
    notes = {"noise": f"noisier test images: sigma {noise:g} + the severity",
             "blur": f"blur of the noisy test images (it also smooths their sigma-{noise:g} noise)",
             "rotation": f"rotation, then the test images' sigma-{noise:g} noise",
             "inversion": f"inversion, then the test images' sigma-{noise:g} noise"}
    return {k: notes[k] for k in kinds if k in notes}


# ----------------------------------------------------------------------------------------
# image helpers
# ----------------------------------------------------------------------------------------
def to_pil(src):
    """A source (path or float array in [0, 1], HxW or HxWxC) as an RGB PIL image, or None if
    the file cannot be read."""
    from PIL import Image
    if isinstance(src, np.ndarray):
        arr = np.clip(src, 0.0, 1.0)
        arr = (arr * 255.0 + 0.5).astype(np.uint8)
        if arr.ndim == 2:
            return Image.fromarray(arr, mode="L").convert("RGB")
        return Image.fromarray(arr, mode="RGB")
    try:
        with Image.open(src) as im:
            im.load()
            return im.convert("RGB")
    except Exception:
        return None


def _rng_for(seed: int, *keys) -> np.random.RandomState:
    h = hashlib.sha1(("%d:" % seed + ":".join(map(str, keys))).encode()).digest()
    return np.random.RandomState(int.from_bytes(h[:4], "little"))


def _rotate(arr: np.ndarray, deg: float) -> np.ndarray:
    from PIL import Image
    img = Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))
    out = img.rotate(deg, resample=Image.BILINEAR, fillcolor=0 if arr.ndim == 2 else (0, 0, 0))
    return np.asarray(out).astype(np.float32) / 255.0


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix of a 1-D gaussian blur with reflect padding (as torchvision's)."""
    radius = max(1, int(round(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    m = np.zeros((n, n))
    for i in range(n):
        for t, w in zip(range(-radius, radius + 1), k):
            j = i + t
            while j < 0 or j >= n:  # reflect (without repeating the edge pixel)
                j = -j if j < 0 else 2 * (n - 1) - j
            m[i, j] += w
    return m.astype(np.float32)


def _blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of an HxW or HxWxC float image: one (H x H) product along the
    rows, one (W x W) along the columns (O(H W (H + W)) per channel, BLAS)."""
    bh, bw = _blur_matrix(arr.shape[0], float(sigma)), _blur_matrix(arr.shape[1], float(sigma))
    if arr.ndim == 2:
        return bh @ arr @ bw.T
    rows = np.tensordot(bh, arr, axes=(1, 0))                  # (H, W, C)
    return np.tensordot(rows, bw, axes=(1, 1)).transpose(0, 2, 1)  # (H, C, W) -> (H, W, C)


def apply_shift(arr: np.ndarray, kind: str, level: float, rng: np.random.RandomState) -> np.ndarray:
    """One generated distribution shift of a float image in [0, 1]."""
    if kind == "noise":
        return np.clip(arr + level * rng.randn(*arr.shape).astype(np.float32), 0, 1)
    if kind == "blur":
        return np.clip(_blur(arr, level), 0, 1)
    if kind == "rotation":
        return _rotate(arr, level)
    if kind == "inversion":
        return (1 - level) * arr + level * (1 - arr)
    raise ValueError(f"unknown shift {kind!r}; known: noise, blur, rotation, inversion")


# ----------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------
_DIGITS_CACHE = {}


def digits_arrays(size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits, upscaled (bilinear) to size x size floats in [0, 1]."""
    if size not in _DIGITS_CACHE:
        import torch
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False)[:, 0].clamp(0, 1)
        _DIGITS_CACHE[size] = (x.numpy(), d.target.astype(np.int64))
    return _DIGITS_CACHE[size]


def digits_split_indices() -> Dict[str, np.ndarray]:
    """Fixed disjoint split of the 1797 digits: ``pretrain`` (stand-in pretraining only),
    ``test`` and ``pool`` (few-shot train / validation are drawn from the pool)."""
    perm = np.random.RandomState(0).permutation(1797)
    return {"pretrain": perm[:DIGITS_PRETRAIN],
            "test": perm[DIGITS_PRETRAIN:DIGITS_PRETRAIN + DIGITS_TEST],
            "pool": perm[DIGITS_PRETRAIN + DIGITS_TEST:]}


def digits_classnames() -> List[str]:
    return list(NUMBER_WORDS)


def _digits_set(idx, noise: float, name: str, shift: Optional[Tuple[str, float]] = None,
                seed: int = 0) -> ImageSet:
    x, y = digits_arrays()
    srcs = []
    for i in idx:
        a = x[i].copy()
        rng = _rng_for(seed, "digit", int(i), name)
        if shift and shift[0] in ("rotation", "inversion"):
            a = apply_shift(a, shift[0], shift[1], rng)
        sigma = noise + (shift[1] if shift and shift[0] == "noise" else 0.0)
        if sigma > 0:
            a = apply_shift(a, "noise", sigma, rng)
        if shift and shift[0] == "blur":
            a = apply_shift(a, "blur", shift[1], rng)
        srcs.append(a.astype(np.float32))
    fp = hashlib.sha1(f"digits:v{DATA_VERSION}:{name}:{noise}:{shift}:{seed}:"
                      f"{','.join(map(str, idx))}".encode()).hexdigest()
    return ImageSet(name, srcs, y[np.asarray(idx)].copy(), digits_classnames(),
                    list(DIGIT_TEMPLATES), fp, {"noise": noise, "shift": shift})


def digits_dataset(noise: float = 0.0,
                   shifts: Optional[Dict[str, List[float]]] = None) -> DatasetSplits:
    """Digits as a downstream task; ``noise`` > 0 makes the noisy-digits domain.
    OOD splits apply each shift at each severity to the test images."""
    idx = digits_split_indices()
    tag = f"digits-noisy{noise:g}" if noise > 0 else "digits"
    pool = _digits_set(idx["pool"], noise, f"{tag}/pool")
    test = _digits_set(idx["test"], noise, f"{tag}/test")
    ood, sev = {}, {}
    for kind, levels in (shifts if shifts is not None else SHIFTS_DIGITS).items():
        for lv in levels:
            nm = f"{kind}{lv:g}"
            ood[nm] = _digits_set(idx["test"], noise, f"{tag}/ood-{nm}", shift=(kind, lv))
            sev[nm] = (kind, lv)
    kinds = {k for k, _ in sev.values()}
    notes = (_noisy_domain_shift_notes(noise, kinds) if noise > 0 else
             {k: f"{k} of the clean test images" for k in kinds})
    return DatasetSplits(tag, pool, test, ood, digits_classnames(), list(DIGIT_TEMPLATES), sev,
                         shift_notes=notes)


# ----------------------------------------------------------------------------------------
# shapes (generated)
# ----------------------------------------------------------------------------------------
SHAPE_CLASSES = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "arrow"]
SHAPE_TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a {} shape.",
                   "an image of a {}."]
SHAPES_SIZE = 32
TASK_NOISE = 0.1
SHAPES_VERSION = "3"      # bump when the rendering changes (part of the cache key)
SHAPES_PRETRAIN_PER_CLASS = 100   # stand-in pretraining only (clean style)
SHAPES_POOL_PER_CLASS = 60        # few-shot pool (shots + validation), task style
SHAPES_TEST_PER_CLASS = 100       # test split, task style
SHIFTS_SHAPES = {
    "noise": [0.1, 0.2, 0.3],
    "blur": [0.75, 1.5, 2.5],
    "inversion": [0.75, 1.0],
}


def _shape_outline(kind: str) -> np.ndarray:
    """Unit-size polygon (N, 2) of a shape class, centred at 0."""
    def ring(n, r=1.0, phase=0.0):
        t = phase + 2 * np.pi * np.arange(n) / n
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if kind == "circle":
        return ring(48)
    if kind == "square":
        return ring(4, 1.0, np.pi / 4)
    if kind == "triangle":
        return ring(3, 1.0, -np.pi / 2)
    if kind == "star":
        out = ring(10, 1.0, -np.pi / 2)
        out[1::2] *= 0.42
        return out
    if kind == "cross":
        w = 0.34
        return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                         [-w, w], [-1, w], [-1, -w], [-w, -w]], dtype=float)
    if kind == "diamond":
        return np.array([[0, -1], [0.55, 0], [0, 1], [-0.55, 0]], dtype=float)
    if kind == "hexagon":
        return ring(6)
    if kind == "arrow":
        return np.array([[-1, -0.28], [0.15, -0.28], [0.15, -0.7], [1, 0], [0.15, 0.7],
                         [0.15, 0.28], [-1, 0.28]], dtype=float)
    raise ValueError(f"unknown shape {kind!r}")


def render_shape(kind: str, rng: np.random.RandomState, style: str = "task",
                 size: int = SHAPES_SIZE) -> np.ndarray:
    """One shape image (size x size x 3, floats in [0, 1]), drawn 4x supersampled.

    ``style="clean"`` (the stand-in's pretraining images): a filled bright shape on a dark
    plain background. ``style="task"`` (the downstream few-shot task): the same rendering plus
    gaussian pixel noise (sigma TASK_NOISE), a shifted domain as for noisy digits."""
    from PIL import Image, ImageDraw
    ss = 4 * size
    pts = _shape_outline(kind)
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    radius = rng.uniform(0.28, 0.42) * ss
    centre = ss / 2 + rng.uniform(-0.08, 0.08, size=2) * ss
    poly = [tuple(p) for p in (pts @ rot.T) * radius + centre]
    colour = tuple(int(c) for c in rng.randint(140, 256, size=3))
    if style == "clean":
        bg = tuple(int(c) for c in rng.randint(0, 50, size=3))
        img = Image.new("RGB", (ss, ss), bg)
        ImageDraw.Draw(img).polygon(poly, fill=colour)
        return np.asarray(img.resize((size, size), Image.BOX)).astype(np.float32) / 255.0
    if style != "task":
        raise ValueError(f"unknown shape style {style!r}")
    arr = render_shape(kind, rng, "clean", size)
    return np.clip(arr + TASK_NOISE * rng.randn(*arr.shape).astype(np.float32), 0, 1)


def shapes_arrays(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Generated shapes of one split (``pretrain``: clean style; ``pool`` / ``test``: task
    style), class-balanced, deterministic (seeded per split and image)."""
    per = {"pretrain": SHAPES_PRETRAIN_PER_CLASS, "pool": SHAPES_POOL_PER_CLASS,
           "test": SHAPES_TEST_PER_CLASS}[split]
    key = ("shapes", split)
    if key not in _DIGITS_CACHE:
        style = "clean" if split == "pretrain" else "task"
        imgs, labels = [], []
        for i in range(per):
            for c, kind in enumerate(SHAPE_CLASSES):
                imgs.append(render_shape(kind, _rng_for(0, "shape", split, i, c), style))
                labels.append(c)
        _DIGITS_CACHE[key] = (np.stack(imgs), np.asarray(labels, dtype=np.int64))
    return _DIGITS_CACHE[key]


def _shapes_set(split: str, name: str, shift: Optional[Tuple[str, float]] = None) -> ImageSet:
    x, y = shapes_arrays(split)
    srcs = []
    for i in range(len(x)):
        a = x[i]
        if shift is not None:
            a = apply_shift(a, shift[0], shift[1], _rng_for(0, "shape-shift", name, i))
        srcs.append(a.astype(np.float32))
    fp = hashlib.sha1(
        f"shapes:v{SHAPES_VERSION}:{TASK_NOISE}:{name}:{split}:{shift}:{len(x)}".encode()
    ).hexdigest()
    return ImageSet(name, srcs, y.copy(), list(SHAPE_CLASSES), list(SHAPE_TEMPLATES), fp,
                    {"shift": shift})


def shapes_dataset(shifts: Optional[Dict[str, List[float]]] = None) -> DatasetSplits:
    """Generated shapes as a downstream task (8 classes with real names: circle, square,
    triangle, star, cross, diamond, hexagon, arrow): outlines on noisy gradient backgrounds.
    The stand-in saw only the clean filled style during pretraining (its own split)."""
    pool = _shapes_set("pool", "shapes/pool")
    test = _shapes_set("test", "shapes/test")
    ood, sev = {}, {}
    for kind, levels in (shifts if shifts is not None else SHIFTS_SHAPES).items():
        for lv in levels:
            nm = f"{kind}{lv:g}"
            ood[nm] = _shapes_set("test", f"shapes/ood-{nm}", shift=(kind, lv))
            sev[nm] = (kind, lv)
    # the test images carry TASK_NOISE and every shift is applied after it (``_shapes_set``)
    notes = {"noise": "more noise: a second draw of this sigma on the noisy test images",
             "blur": f"blur of the noisy test images (it also smooths their sigma-"
                     f"{TASK_NOISE:g} noise)",
             "rotation": "rotation of the noisy test images",
             "inversion": "inversion of the noisy test images"}
    return DatasetSplits("shapes", pool, test, ood, list(SHAPE_CLASSES), list(SHAPE_TEMPLATES),
                         sev, shift_notes={k: notes[k] for k in {k for k, _ in sev.values()}})


# ----------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------
def _list_images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _file_fingerprint(paths: Sequence[Path], extra: str = "") -> str:
    h = hashlib.sha1(extra.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def image_folder(path, templates: Sequence[str] = (DEFAULT_TEMPLATE,), name: Optional[str] = None,
                 classnames: Optional[Sequence[str]] = None, allow_flat: bool = False) -> ImageSet:
    """A folder with one sub-folder per class (class name = folder name, ``_`` -> space).

    ``classnames`` fixes the label order (an OOD folder labelled with the training classes);
    class folders not among them get label -1. ``allow_flat``: a folder of images without class
    sub-folders is accepted as unlabelled (OOD detection only).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset path not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a folder: {root}")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        if allow_flat:
            files = _list_images(root)
            if not files:
                raise DatasetError(f"{root} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            return ImageSet(name or root.name, [str(f) for f in files],
                            -np.ones(len(files), dtype=np.int64), list(classnames or []),
                            list(templates), _file_fingerprint(files, "flat"), {"root": str(root)})
        raise DatasetError(f"{root} has no class sub-folders: an image-folder dataset needs "
                           f"one folder per class (PATH/cat/*.jpg, PATH/dog/*.jpg, ...)")
    folder_names = [d.name for d in subdirs]
    names = (list(classnames) if classnames is not None
             else [n.replace("_", " ") for n in folder_names])
    srcs, labels, files_all = [], [], []
    for d in subdirs:
        files = _list_images(d)
        if not files:
            raise DatasetError(f"class folder {d} is empty (no files with an image extension: "
                               f"{', '.join(IMAGE_EXTENSIONS)})")
        cname = d.name.replace("_", " ")
        lab = names.index(cname) if cname in names else -1
        srcs += [str(f) for f in files]
        labels += [lab] * len(files)
        files_all += files
    return ImageSet(name or root.name, srcs, np.asarray(labels, dtype=np.int64), names,
                    list(templates), _file_fingerprint(files_all, "|".join(names)),
                    {"root": str(root)})


def _stratified_split(labels: np.ndarray, test_frac: float, seed: int = 0):
    rng = np.random.RandomState(seed)
    tr, te = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_te = max(1, int(round(test_frac * len(idx)))) if len(idx) > 1 else 0
        te += idx[:n_te].tolist()
        tr += idx[n_te:].tolist()
    return np.sort(np.asarray(tr, dtype=np.int64)), np.sort(np.asarray(te, dtype=np.int64))


def _shifted_file_sets(base: ImageSet, shifts: Dict[str, List[float]], tag: str,
                       max_images: int = 300):
    """OOD splits for folder datasets: shifts applied to (up to max_images) test images."""
    ood, sev = {}, {}
    idx = np.arange(len(base))
    if len(idx) > max_images:
        idx = np.sort(np.random.RandomState(1).choice(idx, max_images, replace=False))
    for kind, levels in shifts.items():
        for lv in levels:
            nm = f"{kind}{lv:g}"
            srcs = [_LazyShift(base.sources[i], kind, lv, f"{tag}:{i}") for i in idx]
            fp = hashlib.sha1(f"{base.fingerprint}:{kind}:{lv}:{idx.tolist()}".encode()).hexdigest()
            ood[nm] = ImageSet(f"{tag}/ood-{nm}", srcs, base.labels[idx].copy(), base.classnames,
                               base.templates, fp, {"shift": (kind, lv)})
            sev[nm] = (kind, lv)
    return ood, sev


class _LazyShift:
    """A file image with a generated shift applied when it is loaded.

    With ``size`` (the model's input resolution) the image is first resized so that its
    shorter side is ``size`` (as CLIP's preprocessing does next anyway), and the shift is
    applied there: a blur costs O(size^3) instead of O(side^3) of the file's resolution, and
    its sigma means the same thing for every model. Blur sigmas of folder datasets are given
    for a 256-pixel image and scaled to the size they are applied at.
    """

    def __init__(self, src, kind, level, key):
        self.src, self.kind, self.level, self.key = src, kind, level, key

    def load(self, size: Optional[int] = None):
        from PIL import Image
        im = to_pil(self.src)
        if im is None:
            return None
        if size:
            w, h = im.size
            scale = size / min(w, h)
            if scale < 1:
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                               Image.BICUBIC)
        arr = np.asarray(im).astype(np.float32) / 255.0
        level = self.level
        if self.kind == "blur":
            level = self.level * min(arr.shape[:2]) / 256.0
        arr = apply_shift(arr, self.kind, level, _rng_for(0, self.key, self.kind, self.level))
        return to_pil(arr)


def load_image(src, size: Optional[int] = None):
    """PIL RGB image for any source, or None when unreadable. ``size``: the model's input
    resolution, at which generated shifts of file images are applied."""
    if isinstance(src, _LazyShift):
        return src.load(size)
    return to_pil(src)


def has_lazy_shifts(imageset: "ImageSet") -> bool:
    return any(isinstance(s, _LazyShift) for s in imageset.sources[:1])


def textiles_dataset(test_frac: float = 0.4, shifts=None) -> DatasetSplits:
    """The simulated textile images shipped by ``conformal-clip-data``: 1000 nominal, 500 local
    defect and 500 global defect 250x250 images, split per class (seed 0)."""
    try:
        import conformal_clip_data as ccd
    except ImportError as e:
        raise DatasetError("the textiles dataset needs the conformal-clip-data package "
                           "(pip install 'kalman-kernels[clip]')") from e
    root = ccd.textile_simulated_root()
    folders = [("nominal", 0), ("local", 1), ("global", 2)]
    srcs, labels, files_all = [], [], []
    for sub, lab in folders:
        files = _list_images(Path(root) / sub)
        if not files:
            raise DatasetError(f"conformal-clip-data textile folder {Path(root) / sub} is empty")
        srcs += [str(f) for f in files]
        labels += [lab] * len(files)
        files_all += files
    labels = np.asarray(labels, dtype=np.int64)
    full = ImageSet("textiles", srcs, labels, list(TEXTILE_CLASSES), [DEFAULT_TEMPLATE],
                    _file_fingerprint(files_all, "textiles"))
    tr, te = _stratified_split(labels, test_frac)
    pool, test = full.subset(tr, "textiles/pool"), full.subset(te, "textiles/test")
    ood, sev = _shifted_file_sets(test, shifts if shifts is not None else SHIFTS_LARGE, "textiles")
    return DatasetSplits("textiles", pool, test, ood, list(TEXTILE_CLASSES), [DEFAULT_TEMPLATE],
                         sev, shift_notes=_file_shift_notes(sev))


def imagefolder_dataset(path, templates: Sequence[str] = (DEFAULT_TEMPLATE,),
                        test_frac: float = 0.3, ood_paths: Sequence[str] = (),
                        generated_shifts: bool = False) -> DatasetSplits:
    """``imagefolder:PATH``. If PATH has ``train/`` and ``test/`` (or ``val/``) sub-folders they
    are used; otherwise each class is split (``test_frac`` held out, seed 0)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset path not found: {root} (from imagefolder:{path})")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        pool = image_folder(root / "train", templates, name=f"{root.name}/pool")
        test = image_folder(test_dir, templates, name=f"{root.name}/test",
                            classnames=pool.classnames)
    else:
        full = image_folder(root, templates, name=root.name)
        tr, te = _stratified_split(full.labels, test_frac)
        pool, test = full.subset(tr, f"{root.name}/pool"), full.subset(te, f"{root.name}/test")
    ood, sev = {}, {}
    for p in ood_paths:
        s = image_folder(p, templates, name=f"ood-{Path(p).name}", classnames=pool.classnames,
                         allow_flat=True)
        ood[f"ood-{Path(p).name}"] = s
    if generated_shifts:
        o2, s2 = _shifted_file_sets(test, SHIFTS_LARGE, root.name)
        ood.update(o2)
        sev.update(s2)
    return DatasetSplits(root.name, pool, test, ood, pool.classnames, list(templates), sev,
                         shift_notes=_file_shift_notes(sev))


def _file_shift_notes(sev) -> Dict[str, str]:
    """File images get each shift on its own (blur sigma given for a 256-pixel side)."""
    return {k: f"{k} of the test images" + (" (sigma per 256 pixels)" if k == "blur" else "")
            for k in {k for k, _ in sev.values()}}


def get_dataset(spec: str, *, templates: Optional[Sequence[str]] = None,
                ood_paths: Sequence[str] = (),
                generated_shifts: Optional[bool] = None) -> DatasetSplits:
    """``digits``, ``digits-noisy`` (sigma DEFAULT_DIGITS_NOISE) or ``digits-noisy:SIGMA``,
    ``shapes``, ``textiles``, ``imagefolder:PATH``."""
    spec = spec.strip()
    extra_ood = {}
    for p in ood_paths:
        extra_ood[f"ood-{Path(p).name}"] = p
    if spec == "digits" or spec.startswith("digits-noisy"):
        noise = 0.0
        if spec.startswith("digits-noisy"):
            noise = float(spec.split(":", 1)[1]) if ":" in spec else DEFAULT_DIGITS_NOISE
        ds = digits_dataset(noise)
    elif spec == "textiles":
        ds = textiles_dataset()
    elif spec == "shapes":
        ds = shapes_dataset()
    elif spec.startswith("imagefolder:"):
        return imagefolder_dataset(spec[len("imagefolder:"):], templates or (DEFAULT_TEMPLATE,),
                                   ood_paths=ood_paths, generated_shifts=bool(generated_shifts))
    else:
        if os.path.isdir(spec):
            raise DatasetError(f"dataset {spec!r}: did you mean imagefolder:{spec}?")
        raise DatasetError(f"unknown dataset {spec!r}; use {BUILTIN_HELP} or imagefolder:PATH")
    if templates:
        ds.templates = list(templates)
        for s in [ds.pool, ds.test, *ds.ood.values()]:
            s.templates = list(templates)
    if generated_shifts is False:
        ds.ood, ds.ood_severity = {}, {}
    for nm, p in extra_ood.items():
        ds.ood[nm] = image_folder(p, ds.templates, name=nm, classnames=ds.classnames,
                                  allow_flat=True)
    return ds


def few_shot_indices(labels: np.ndarray, shots: int, seed: int, n_classes: int,
                     n_val: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Per class ``shots`` training and ``min(shots, 4)`` validation indices (disjoint), seeded.
    Raises DatasetError when a class has too few images."""
    if n_val is None:
        n_val = min(shots, 4)
    rng = np.random.RandomState(seed)
    tr, va = [], []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots + n_val:
            raise DatasetError(f"class {c} has {len(idx)} images in the few-shot pool; "
                               f"{shots} shots + {n_val} validation images are needed")
        idx = rng.permutation(idx)
        tr += idx[:shots].tolist()
        va += idx[shots:shots + n_val].tolist()
    return np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64)
