"""The stand-in weights that ship with the package are what its pretraining code produces.

Pretraining takes about 2 minutes on one thread, so by default a cheap fingerprint is checked:
the recipe the code would use today, the file's sha256, the reconstructed state's sha256 and
the zero-shot accuracy of the shipped weights on held-out clean digits and shapes, against the
values recorded next to the file. KALMAN_KERNELS_TEST_STANDIN_REBUILD=1 also pretrains from
scratch and requires bit-identical weights (pretraining runs on one thread, so it is a
function of the recipe and the torch build).
"""
import json
import os
import shutil

import pytest
import torch

from kalman_kernels.clip import standin as S

NAME = "kk-tiny-vit"


def _default_recipe():
    return S._recipe(NAME, S.DEFAULT_STEPS, S.DEFAULT_BATCH, S.DEFAULT_LR, 0)


@pytest.fixture(scope="module")
def shipped():
    weights, meta_file = S.shipped_files(NAME)
    assert weights.is_file() and meta_file.is_file(), (
        f"the shipped stand-in is missing; rebuild it with `{S.REBUILD_COMMAND}`")
    return weights, json.loads(meta_file.read_text())


def test_shipped_file_matches_todays_recipe_and_its_hashes(shipped):
    weights, meta = shipped
    assert S._without_torch(meta["recipe"]) == S._without_torch(_default_recipe()), (
        f"the pretraining recipe changed since the weights were built: run "
        f"`{S.REBUILD_COMMAND}`")
    assert S.file_sha256(weights) == meta["file_sha256"]
    assert weights.stat().st_size == meta["file_bytes"] < 1.5e6      # small enough to ship
    state, _ = S.load_shipped(NAME)
    assert S.state_sha256(state) == meta["state_sha256"]


def test_load_clip_uses_the_shipped_weights_without_pretraining(shipped, monkeypatch, tmp_path,
                                                                capsys):
    from kalman_kernels.clip import load_clip

    def no_pretraining(*a, **k):
        raise AssertionError("the shipped weights fit the default recipe: no pretraining")

    monkeypatch.setattr(S, "pretrain_standin", no_pretraining)
    bundle = load_clip(NAME, "standin", cache_dir=tmp_path)
    assert "shipped with the package" in capsys.readouterr().out
    assert bundle.standin and bundle.pretrained == "standin"
    state = {k: v for k, v in bundle.model.state_dict().items()}
    assert S.state_sha256(state) == shipped[1]["state_sha256"]
    # the zero-shot accuracy recorded at build time, from the loaded weights (one image of
    # 500 digits / 200 shapes of slack for another BLAS; on this torch build it is exact)
    zs = S.zero_shot_clean(S.PretrainedStandin(bundle.model, bundle.model_cfg,
                                               bundle.preprocess_cfg, bundle.preprocess), NAME)
    for domain, n in (("digits", 500), ("shapes", 200)):
        assert abs(zs[domain] - shipped[1]["zero_shot_clean"][domain]) <= 1.0 / n + 1e-9
    # a second load reuses the unpacked folder
    assert load_clip(NAME, "standin", cache_dir=tmp_path, verbose=False).standin
    # unpacking recreates the seeded initialisation without reseeding the caller's generator
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    S.standin_checkpoint(NAME, cache_dir=tmp_path / "again", verbose=False)
    assert torch.equal(torch.rand(3), expected)


def test_missing_or_mismatched_shipped_weights_fall_back_with_a_message(monkeypatch, tmp_path,
                                                                        capsys):
    calls = []

    def fake_pretrain(name, **kw):
        calls.append(kw)
        raise RuntimeError("pretraining started")

    monkeypatch.setattr(S, "pretrain_standin", fake_pretrain)
    # another recipe than the shipped one
    with pytest.raises(RuntimeError, match="pretraining started"):
        S.standin_checkpoint(NAME, steps=10, cache_dir=tmp_path / "a")
    out = capsys.readouterr().out
    assert "another recipe" in out and "steps 800 shipped vs 10 asked" in out
    # the file missing
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(S, "SHIPPED_DIR", empty)
    with pytest.raises(RuntimeError, match="pretraining started"):
        S.standin_checkpoint(NAME, cache_dir=tmp_path / "b")
    out = capsys.readouterr().out
    assert "missing" in out and S.REBUILD_COMMAND in out
    # a corrupted copy
    weights, meta_file = S.shipped_files(NAME, S.Path(S.__file__).parent / "weights")
    shutil.copy(meta_file, empty / meta_file.name)
    (empty / weights.name).write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(RuntimeError, match="pretraining started"):
        S.standin_checkpoint(NAME, cache_dir=tmp_path / "c")
    assert "sha256" in capsys.readouterr().out
    assert len(calls) == 3


@pytest.mark.skipif(os.environ.get("KALMAN_KERNELS_TEST_STANDIN_REBUILD") != "1",
                    reason="pretrains the stand-in from scratch (about 2 minutes); set "
                           "KALMAN_KERNELS_TEST_STANDIN_REBUILD=1")
def test_rebuild_gives_bit_identical_weights(shipped, tmp_path):
    made_with = shipped[1]["recipe"]["torch"]
    if torch.__version__.split("+")[0] != made_with:
        pytest.skip(f"the shipped weights were made with torch {made_with}: pretraining under "
                    f"torch {torch.__version__} may round differently")
    meta = S.rebuild(NAME, folder=tmp_path, verbose=False)
    assert meta["state_sha256"] == shipped[1]["state_sha256"]
    assert meta["zero_shot_clean"] == shipped[1]["zero_shot_clean"]
