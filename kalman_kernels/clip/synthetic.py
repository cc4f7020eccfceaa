"""Generated image folders (``imagefolder:`` layout) of kinds the stand-in never saw.

    python -m kalman_kernels.clip.synthetic textures /tmp/textures
    kalman-clip compare --dataset imagefolder:/tmp/textures --shifts ...

They test whether defaults carry over to data whose features fit worse than the built-in
tasks (the situation issue 11 reports): nothing was chosen on them.

* ``textures``: 4 classes (stripes, checkerboard, dots, waves): random colours, scales,
  orientations and phases, pixel noise;
* ``letters``: 4 classes (the letters A, B, C, D drawn as strokes): random position, size,
  rotation, stroke width and colours, on noisy backgrounds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

KINDS = {"textures": ["stripes", "checkerboard", "dots", "waves"],
         "letters": ["letter A", "letter B", "letter C", "letter D"]}

# strokes of the letters on a unit square (x right, y down), as polylines
_LETTERS = {
    "letter A": [[(0.1, 1.0), (0.5, 0.0), (0.9, 1.0)], [(0.27, 0.6), (0.73, 0.6)]],
    "letter B": [[(0.15, 0.0), (0.15, 1.0)], [(0.15, 0.0), (0.65, 0.05), (0.75, 0.25), (0.6, 0.47),
                                              (0.15, 0.5)],
                 [(0.15, 0.5), (0.7, 0.53), (0.85, 0.75), (0.7, 0.97), (0.15, 1.0)]],
    "letter C": [[(0.85, 0.15), (0.6, 0.0), (0.3, 0.05), (0.1, 0.35), (0.1, 0.65), (0.3, 0.95),
                  (0.6, 1.0), (0.85, 0.85)]],
    "letter D": [[(0.15, 0.0), (0.15, 1.0)], [(0.15, 0.0), (0.55, 0.05), (0.85, 0.3), (0.85, 0.7),
                                              (0.55, 0.95), (0.15, 1.0)]],
}


def _texture(kind: str, rng: np.random.RandomState, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    freq = rng.uniform(3, 9)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        m = (np.sin(2 * np.pi * freq * u + phase) > 0).astype(float)
    elif kind == "checkerboard":
        m = ((np.floor(freq * u + phase) + np.floor(freq * v)) % 2).astype(float)
    elif kind == "dots":
        cu = (freq * u + phase / 6) % 1 - 0.5
        cv = (freq * v) % 1 - 0.5
        m = (cu ** 2 + cv ** 2 < rng.uniform(0.05, 0.12)).astype(float)
    elif kind == "waves":
        m = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + 2.5 * np.sin(2 * np.pi * 2 * v) + phase)
    else:
        raise ValueError(kind)
    c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = c1 * m[..., None] + c2 * (1 - m[..., None])
    return np.clip(img + 0.06 * rng.randn(size, size, 3), 0, 1)


def _letter(kind: str, rng: np.random.RandomState, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw
    ss = 4 * size
    bg = rng.uniform(0, 1, 3)
    fg = np.clip(1 - bg + rng.uniform(-0.2, 0.2, 3), 0, 1)
    img = Image.new("RGB", (ss, ss), tuple(int(255 * c) for c in bg))
    draw = ImageDraw.Draw(img)
    scale = rng.uniform(0.45, 0.75) * ss
    theta = rng.uniform(-0.5, 0.5)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = ss / 2 + rng.uniform(-0.12, 0.12, 2) * ss
    width = int(rng.uniform(0.06, 0.12) * ss)
    for stroke in _LETTERS[kind]:
        pts = (np.asarray(stroke) - 0.5) * scale @ rot.T + centre
        draw.line([tuple(p) for p in pts], fill=tuple(int(255 * c) for c in fg), width=width,
                  joint="curve")
    arr = np.asarray(img.resize((size, size), Image.BOX)).astype(np.float32) / 255.0
    return np.clip(arr + 0.08 * rng.randn(*arr.shape), 0, 1)


def make_folder(root, kind: str = "textures", n_per_class: int = 60, seed: int = 0,
                size: int = 96) -> Path:
    """Write ``root/<class>/<i>.png`` (class folder names use ``_`` for spaces)."""
    from PIL import Image
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    root = Path(root)
    draw = _texture if kind == "textures" else _letter
    for c, name in enumerate(KINDS[kind]):
        d = root / name.replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            rng = np.random.RandomState((seed * 1000 + c) * 10_000 + i)
            arr = draw(name, rng, size)
            Image.fromarray((arr * 255 + 0.5).astype(np.uint8)).save(d / f"{i:04d}.png")
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a generated image folder (imagefolder layout).")
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("root")
    p.add_argument("--n", type=int, default=60, help="images per class (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(make_folder(args.root, args.kind, args.n, args.seed))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
