"""Offline, small and fast: every test runs without network, with a private cache folder."""
import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# an empty Hugging Face cache (set before huggingface_hub is imported): no tag is cached
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="kk_hf_empty_")
# a private cache for everything the tests build (also for module-scoped fixtures, which are
# set up before any function-scoped fixture could change the environment)
os.environ["KALMAN_KERNELS_CACHE"] = tempfile.mkdtemp(prefix="kk_cache_")
for _d in (os.environ["HF_HUB_CACHE"], os.environ["KALMAN_KERNELS_CACHE"]):
    atexit.register(shutil.rmtree, _d, True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def make_image_folder(root, classes=("red", "blue"), n=10, size=20, seed=0, flat=False):
    """Class folders of small PNGs whose colour depends on the class (separable)."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    for ci, c in enumerate(classes):
        d = root if flat else root / c
        d.mkdir(exist_ok=True)
        for i in range(n):
            base = np.zeros((size, size, 3))
            base[..., ci % 3] = 0.8
            arr = np.clip(base + 0.1 * rng.randn(size, size, 3), 0, 1)
            Image.fromarray((arr * 255).astype(np.uint8)).save(d / f"{c}_{i:03d}.png")
    return root
