"""Generated image folders (``imagefolder:`` layout) of kinds the stand-in never saw.

    python -m kalman_kernels.clip.synthetic textures /tmp/textures
    kalman-clip compare --dataset imagefolder:/tmp/textures --shifts ...

They test whether defaults carry over to data whose features fit worse than the built-in
tasks (where a default chosen on one task can fail): nothing was chosen on them.

* ``textures``: 4 classes (stripes, checkerboard, dots, waves): random colours, scales,
  orientations and phases, pixel noise;
* ``letters``: 4 classes (the letters A, B, C, D drawn as strokes): random position, size,
  rotation, stroke width and colours, on noisy backgrounds;
* ``glyphs``: 4 classes (ring, zigzag, spiral, crescent): strokes (the crescent filled) with
  random position, size, any rotation, stroke width, number of zigzag teeth / spiral turns /
  crescent thickness and colours, on noisy backgrounds;
* ``icons``: 4 classes (heart, lightning bolt, hourglass, flag) as filled silhouettes: random
  position, size, tilt, proportions and colours, on noisy backgrounds.

``glyphs`` and ``icons`` were added after the default method was chosen, to check it on data
never used for any choice. None of their classes is a class of the stand-in's pretraining
(digits; circle, square, triangle, star, cross, diamond, hexagon, arrow).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

KINDS = {"textures": ["stripes", "checkerboard", "dots", "waves"],
         "letters": ["letter A", "letter B", "letter C", "letter D"],
         "glyphs": ["ring", "zigzag", "spiral", "crescent"],
         "icons": ["heart", "lightning bolt", "hourglass", "flag"]}

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


def _canvas(rng: np.random.RandomState, size: int):
    """A 4x supersampled canvas with a random background and a contrasting foreground colour,
    and a random placement: (img, draw, fg, bg, ss)."""
    from PIL import Image, ImageDraw
    ss = 4 * size
    bg = rng.uniform(0, 1, 3)
    fg = np.clip(1 - bg + rng.uniform(-0.2, 0.2, 3), 0, 1)
    img = Image.new("RGB", (ss, ss), tuple(int(255 * c) for c in bg))
    return img, ImageDraw.Draw(img), tuple(int(255 * c) for c in fg), \
        tuple(int(255 * c) for c in bg), ss


def _finish(img, size: int, rng: np.random.RandomState, noise: float = 0.08) -> np.ndarray:
    from PIL import Image
    arr = np.asarray(img.resize((size, size), Image.BOX)).astype(np.float32) / 255.0
    return np.clip(arr + noise * rng.randn(*arr.shape), 0, 1)


def _placement(rng: np.random.RandomState, ss: int, max_theta: float):
    """scale (pixels of the unit square), rotation matrix, centre."""
    scale = rng.uniform(0.45, 0.75) * ss
    theta = rng.uniform(-max_theta, max_theta)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = ss / 2 + rng.uniform(-0.12, 0.12, 2) * ss
    return scale, rot, centre


def _glyph(kind: str, rng: np.random.RandomState, size: int) -> np.ndarray:
    img, draw, fg, bg, ss = _canvas(rng, size)
    scale, rot, centre = _placement(rng, ss, np.pi)
    width = int(rng.uniform(0.05, 0.1) * ss)

    def place(pts):  # unit-square points (centred at 0.5) -> canvas
        return [tuple(p) for p in (np.asarray(pts) - 0.5) * scale @ rot.T + centre]

    if kind == "ring":
        t = np.linspace(0, 2 * np.pi, 65)
        r = rng.uniform(0.3, 0.45)
        ecc = rng.uniform(0.8, 1.0)
        pts = np.stack([0.5 + r * np.cos(t), 0.5 + ecc * r * np.sin(t)], 1)
        draw.line(place(pts), fill=fg, width=width, joint="curve")
    elif kind == "zigzag":
        teeth = rng.randint(3, 7)
        x = np.linspace(0.05, 0.95, 2 * teeth + 1)
        amp = rng.uniform(0.15, 0.3)
        y = 0.5 + amp * np.where(np.arange(len(x)) % 2 == 0, -1.0, 1.0)
        draw.line(place(np.stack([x, y], 1)), fill=fg, width=width, joint="curve")
    elif kind == "spiral":
        turns = rng.uniform(2.0, 3.2)
        t = np.linspace(0, 1, 160)
        ang = 2 * np.pi * turns * t * rng.choice([-1.0, 1.0])
        r = 0.04 + 0.42 * t
        pts = np.stack([0.5 + r * np.cos(ang), 0.5 + r * np.sin(ang)], 1)
        draw.line(place(pts), fill=fg, width=max(2, int(0.7 * width)), joint="curve")
    elif kind == "crescent":
        r = 0.42 * scale
        c1 = np.asarray(centre)
        c2 = c1 + rot @ np.array([rng.uniform(0.2, 0.45) * r, 0.0])
        r2 = rng.uniform(0.85, 1.0) * r
        draw.ellipse([c1[0] - r, c1[1] - r, c1[0] + r, c1[1] + r], fill=fg)
        draw.ellipse([c2[0] - r2, c2[1] - r2, c2[0] + r2, c2[1] + r2], fill=bg)
    else:
        raise ValueError(kind)
    return _finish(img, size, rng)


def _icon_outline(kind: str, rng: np.random.RandomState):
    """Filled polygons of an icon on the unit square (x right, y down)."""
    if kind == "heart":
        t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        w = rng.uniform(0.85, 1.1)
        return [np.stack([0.5 + w * x / 34, 0.5 + (y + 2.5) / 34], 1)]
    if kind == "lightning bolt":
        k = rng.uniform(-0.06, 0.06)
        return [np.array([(0.55, 0.0), (0.2, 0.55 + k), (0.47, 0.55 + k), (0.35, 1.0),
                          (0.82, 0.4 + k), (0.56, 0.4 + k), (0.75, 0.0)])]
    if kind == "hourglass":
        neck = rng.uniform(0.04, 0.1)
        return [np.array([(0.18, 0.0), (0.82, 0.0), (0.5 + neck, 0.5), (0.82, 1.0),
                          (0.18, 1.0), (0.5 - neck, 0.5)])]
    if kind == "flag":
        h = rng.uniform(0.3, 0.45)
        wave = rng.uniform(0.0, 0.08)
        xs = np.linspace(0.22, 0.88, 12)
        top = 0.05 + wave * np.sin(2 * np.pi * (xs - 0.22) / 0.66)
        cloth = np.concatenate([np.stack([xs, top], 1), np.stack([xs, top + h], 1)[::-1]])
        pole = np.array([(0.13, 0.0), (0.22, 0.0), (0.22, 1.0), (0.13, 1.0)])
        return [pole, cloth]
    raise ValueError(kind)


def _icon(kind: str, rng: np.random.RandomState, size: int) -> np.ndarray:
    img, draw, fg, _, ss = _canvas(rng, size)
    scale, rot, centre = _placement(rng, ss, 0.5)
    for poly in _icon_outline(kind, rng):
        pts = (np.asarray(poly) - 0.5) * scale @ rot.T + centre
        draw.polygon([tuple(p) for p in pts], fill=fg)
    return _finish(img, size, rng)


_DRAW = {"textures": _texture, "letters": _letter, "glyphs": _glyph, "icons": _icon}


def make_folder(root, kind: str = "textures", n_per_class: int = 60, seed: int = 0,
                size: int = 96) -> Path:
    """Write ``root/<class>/<i>.png`` (class folder names use ``_`` for spaces)."""
    from PIL import Image
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    root = Path(root)
    draw = _DRAW[kind]
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
