import warnings

import numpy as np
import pytest
import torch

from kalman_kernels.clip import DatasetError, FeatureCache, extract_features, load_clip
from kalman_kernels.clip.data import get_dataset, image_folder

from .conftest import make_image_folder


@pytest.fixture(scope="module")
def bundle():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip("kk-micro-vit", None)


def test_cache_hit_miss_corrupt_stale(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []

    def build():
        calls.append(1)
        return {"embed": torch.arange(6.0).reshape(2, 3), "pre": None}

    key = {"model": "m", "content": "abc"}
    a = cache.get_or_build(key, build)
    b = cache.get_or_build(key, build)
    assert cache.events == ["miss", "hit"] and len(calls) == 1
    assert torch.equal(a["embed"], b["embed"])

    # corrupted: flip bytes in the middle of the file -> detected, rebuilt, never used
    path = cache.path_for(key)
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="corrupted"):
        c = cache.get_or_build(key, build)
    assert cache.events[-1] == "corrupt" and len(calls) == 2
    assert torch.equal(c["embed"], a["embed"])
    assert cache.get_or_build(key, build) is not None and cache.events[-1] == "hit"

    # truncated file
    path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(RuntimeWarning, match="corrupted"):
        cache.get_or_build(key, build)
    assert cache.events[-1] == "corrupt" and len(calls) == 3

    # stale: a valid entry written for another key sits under this key's name
    other = {"model": "m", "content": "OLD"}
    cache.save(other, {"embed": torch.zeros(2, 3), "pre": None})
    cache.path_for(other).replace(path)
    with pytest.warns(RuntimeWarning, match="stale"):
        d = cache.get_or_build(key, build)
    assert cache.events[-1] == "stale" and len(calls) == 4
    assert torch.equal(d["embed"], a["embed"])
    # no temp files left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_feature_cache_follows_image_content(tmp_path, bundle):
    root = make_image_folder(tmp_path / "data", n=4)
    cache = FeatureCache(tmp_path / "cache")
    s1 = image_folder(root)
    f1 = extract_features(bundle, s1, cache, progress=False)
    f1b = extract_features(bundle, image_folder(root), cache, progress=False)
    assert cache.events == ["miss", "hit"]
    assert torch.equal(f1.embed, f1b.embed) and f1.pre is not None
    # the features are those of the model: recompute one directly
    from kalman_kernels.clip.data import to_pil
    x = bundle.preprocess(to_pil(s1.sources[0]))[None]
    with torch.no_grad():
        ref = bundle.model.encode_image(x)
    assert torch.allclose(f1.embed[0], ref[0], atol=1e-5)

    # change one image: the content key changes -> recomputed, not served stale
    from PIL import Image
    first = sorted((root / "red").iterdir())[0]
    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(first)
    import os
    os.utime(first, ns=(1, 1))  # also a different mtime
    s2 = image_folder(root)
    f2 = extract_features(bundle, s2, cache, progress=False)
    assert cache.events[-1] == "miss"
    i = s2.sources.index(str(first))
    others = [j for j in range(len(s2)) if j != i]
    assert not torch.allclose(f2.embed[i], f1.embed[i], atol=1e-3)
    assert torch.allclose(f2.embed[others], f1.embed[others], atol=1e-6)


def test_unreadable_images_skipped_and_counted(tmp_path, bundle):
    root = make_image_folder(tmp_path / "data", n=3)
    (root / "red" / "broken.png").write_bytes(b"not an image")
    (root / "blue" / "broken.jpg").write_bytes(b"\x00" * 10)
    s = image_folder(root)
    assert len(s) == 8
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        f = extract_features(bundle, s, FeatureCache(tmp_path / "c"), progress=False)
    assert f.n_skipped == 2 and len(f) == 6
    assert sorted(f.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        get_dataset(f"imagefolder:{tmp_path / 'nope'}")
    root = make_image_folder(tmp_path / "d", n=2)
    (root / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        get_dataset(f"imagefolder:{root}")
    with pytest.raises(DatasetError, match="unknown dataset"):
        get_dataset("cifar-1000")


def test_builtin_splits_are_disjoint():
    from kalman_kernels.clip.data import digits_split_indices, few_shot_indices
    sp = digits_split_indices()
    allidx = np.concatenate(list(sp.values()))
    assert len(allidx) == 1797 and len(np.unique(allidx)) == 1797
    ds = get_dataset("digits-noisy")
    assert len(ds.test) == len(sp["test"]) and len(ds.ood) >= 8
    tr, va = few_shot_indices(ds.pool.labels, 16, 0, 10)
    assert len(tr) == 160 and len(va) == 40 and not set(tr) & set(va)
    # textiles from conformal-clip-data: three classes, disjoint pool / test
    tx = get_dataset("textiles")
    assert tx.classnames[0].startswith("nominal") and len(tx.classnames) == 3
    assert not set(tx.pool.sources) & set(tx.test.sources)
    assert len(tx.pool) + len(tx.test) == 2000
