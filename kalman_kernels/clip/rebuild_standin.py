"""Rebuild (or check) the stand-in CLIP weights that ship with the package.

    python -m kalman_kernels.clip.rebuild_standin            # pretrain, write weights/kk-tiny-vit.*
    python -m kalman_kernels.clip.rebuild_standin --check    # pretrain again, compare bit for bit

Both run the package's own pretraining (``standin.pretrain_standin``, default recipe, one
thread): about 2 minutes on one core here, more under load, with a progress line every few
seconds. Its own module rather than ``standin.py``'s ``__main__``: the package imports
``standin`` on start-up, and ``python -m`` on an imported module runs a second copy of it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from .standin import SHIPPED_DIR, _fmt_zero_shot, load_shipped, rebuild, shipped_files


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kalman_kernels.clip.rebuild_standin",
        description="Pretrain the stand-in CLIP with the default recipe (one thread; about 2 "
                    "minutes here, more under load) and write the weights that ship with the "
                    "package, or compare a fresh pretraining with them (--check).")
    p.add_argument("--check", action="store_true",
                   help="pretrain into a temporary folder and compare with the shipped files "
                        "(exit 1 when the weights differ); writes nothing")
    p.add_argument("--out", default=str(SHIPPED_DIR),
                   help=f"folder to write {shipped_files()[0].name} and "
                        f"{shipped_files()[1].name} into (default: the package's, %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if not args.check:
        meta = rebuild(folder=Path(args.out), verbose=not args.quiet)
        print(f"wrote {shipped_files(folder=Path(args.out))[0]} "
              f"({meta['file_bytes'] / 1e6:.2f} MB, state sha256 {meta['state_sha256'][:16]}..., "
              f"zero-shot {_fmt_zero_shot(meta['zero_shot_clean'])}) in {meta['seconds']:.0f} s")
        return 0
    try:
        _, shipped = load_shipped()
    except (OSError, ValueError) as e:
        print(f"rebuild_standin --check: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kk_standin_") as tmp:
        meta = rebuild(folder=Path(tmp), verbose=not args.quiet)
    same = meta["state_sha256"] == shipped["state_sha256"]
    print(f"{'identical' if same else 'DIFFERENT'}: rebuilt state sha256 "
          f"{meta['state_sha256'][:16]}... vs shipped {shipped['state_sha256'][:16]}...; zero-shot "
          f"rebuilt {_fmt_zero_shot(meta['zero_shot_clean'])}, shipped "
          f"{_fmt_zero_shot(shipped['zero_shot_clean'])}")
    return 0 if same else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
