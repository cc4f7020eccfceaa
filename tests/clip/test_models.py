import time
import warnings

import pytest
import torch

from kalman_kernels.clip import ModelLoadError, load_clip, save_clip
from kalman_kernels.clip.models import TINY_CONFIGS


def _random_micro():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip("kk-micro-vit", None)


def _perturb(model):
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("layout", ["dir", "file"])
def test_checkpoint_round_trip(tmp_path, layout):
    b = _random_micro()
    _perturb(b.model)  # weights that no fresh initialisation could reproduce
    x = torch.rand(3, 3, 16, 16)
    toks = b.tokenizer(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        ref_img, ref_txt = b.model.encode_image(x), b.model.encode_text(toks)
    if layout == "dir":
        path = save_clip(b.model, tmp_path / "ckpt", b.model_cfg)
        b2 = load_clip(f"local-dir:{path}")
    else:
        path = save_clip(b.model, tmp_path / "ckpt.pt", b.model_cfg)
        b2 = load_clip("kk-micro-vit", str(path))
    sd1, sd2 = b.model.state_dict(), b2.model.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    with torch.no_grad():
        assert torch.equal(b2.model.encode_image(x), ref_img)
        assert torch.equal(b2.model.encode_text(toks), ref_txt)
    assert b2.weights_id() == b.weights_id()
    assert not any(p.requires_grad for p in b2.model.parameters())


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="unknown model name.*ViT-B-32"):
        load_clip("ViT-B-23")


def test_offline_tag_fails_fast():
    t0 = time.time()
    with pytest.raises(ModelLoadError, match="not cached.*local checkpoint"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert time.time() - t0 < 10


def test_quickgelu_mismatch_warns():
    with pytest.warns(UserWarning, match="quick_gelu"):
        with pytest.raises(ModelLoadError):
            load_clip("ViT-B-32", "openai")


def test_unknown_tag_and_missing_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a checkpoint file nor a known tag"):
        load_clip("kk-micro-vit", "no-such-tag")
    with pytest.raises(ModelLoadError, match="not found"):
        load_clip(f"local-dir:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path / 'empty'}")


def test_standin_is_cached_and_labelled():
    from kalman_kernels.clip.standin import standin_checkpoint
    p1 = standin_checkpoint("kk-micro-vit", steps=2, batch=16, verbose=False)
    t0 = time.time()
    p2 = standin_checkpoint("kk-micro-vit", steps=2, batch=16, verbose=False)
    assert p1 == p2 and time.time() - t0 < 1.0  # second call: from the cache
    b = load_clip("kk-micro-vit", "standin", standin_kwargs={"steps": 2, "batch": 16},
                  verbose=False)
    assert b.standin and any("STAND-IN" in n for n in b.notes)
    with pytest.raises(ModelLoadError, match="only for the tiny configs"):
        load_clip("ViT-B-32", "standin")


def test_tiny_configs_registered():
    import open_clip
    b = _random_micro()
    assert set(TINY_CONFIGS) <= set(open_clip.list_models())
    assert b.embed_dim == TINY_CONFIGS["kk-micro-vit"]["embed_dim"]
