"""Where caches and run outputs go (never inside the repository)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

ENV_CACHE = "KALMAN_KERNELS_CACHE"


def cache_root(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The cache directory: ``cache_dir`` if given, else ``$KALMAN_KERNELS_CACHE``, else
    ``$XDG_CACHE_HOME/kalman_kernels`` (default ``~/.cache/kalman_kernels``)."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get(ENV_CACHE):
        root = Path(os.environ[ENV_CACHE])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "kalman_kernels"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
