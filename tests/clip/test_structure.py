"""Structure and what a newcomer sees: no import circle, no undeclared attributes, plain
progress lines off a terminal, help texts that state the defaults, fast generated shifts."""
import ast
import pathlib
import time
import warnings

import numpy as np
import pytest

import kalman_kernels.clip as kc

CLIP_DIR = pathlib.Path(kc.__file__).parent


def _imports(module: str):
    tree = ast.parse((CLIP_DIR / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add(node.module or "")
    return out


def test_no_import_circle_between_models_and_standin():
    assert "models" not in _imports("standin")
    assert "standin" in _imports("models") and "registry" in _imports("standin")
    assert "models" not in _imports("registry") and "standin" not in _imports("registry")


def test_results_and_tasks_declare_their_fields():
    import torch

    from kalman_kernels.clip.cache import FeatureSet
    from kalman_kernels.clip.train import MethodResult, Task
    fs = FeatureSet("x", torch.zeros(2, 3), None, torch.zeros(2, dtype=torch.long), 0, ["a"])
    t = Task(fs, fs, fs, {}, torch.ones(1, 3), 10.0, calibrate=True)
    assert t.calibrate is True and str(t.device) == "cpu"
    fields = set(MethodResult.__dataclass_fields__)
    assert {"adapter", "opt", "obs_noise"} <= fields
    # no module assigns attributes to objects that do not declare them
    for src in ("standin", "run", "train"):
        text = (CLIP_DIR / f"{src}.py").read_text()
        assert "standin_preprocess" not in text and "task.calibrate =" not in text
        assert "res.adapter =" not in text and "res.opt =" not in text


def test_plain_progress_lines_when_not_a_tty(capsys, monkeypatch):
    from kalman_kernels.clip import progress as P
    monkeypatch.setattr(P, "_is_tty", lambda: False)
    outer = P.progress(["a", "b"], desc="runs", unit="run", item_lines=True)
    for x in outer:
        for _ in P.progress(range(3), desc="inner", unit="step"):
            pass
        outer.set_postfix_str(f"item {x}")
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err          # no escape codes, no bar redraws
    lines = err.strip().splitlines()
    assert lines[0].startswith("runs 1/2: item a") and lines[1].startswith("runs 2/2: item b")
    assert lines[-1].startswith("runs: 2 runs in") and "inner" not in err
    assert P._depth == 0
    off = P.progress(range(3), desc="quiet", enabled=False)
    assert list(off) == [0, 1, 2] and capsys.readouterr().err == ""


def test_help_texts_state_the_defaults(capsys):
    from kalman_kernels.clip import cli
    from kalman_kernels.clip.data import DEFAULT_DIGITS_NOISE
    from kalman_kernels.clip.train import DEFAULT_OBS_NOISE, KALMAN_DEFAULTS, PAPER_PRESET
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    out = "".join(capsys.readouterr().out.split())     # argparse wraps lines (also at '-')
    assert f"defaultsigma{DEFAULT_DIGITS_NOISE:g}" in out
    assert f"default{DEFAULT_OBS_NOISE:g})" in out
    assert f"default:{KALMAN_DEFAULTS['likelihood']}forkalman" in out
    assert f"(default:{KALMAN_DEFAULTS['fit']})" in out
    assert f"(default:{KALMAN_DEFAULTS['prior']};" in out
    assert f"(default:{KALMAN_DEFAULTS['head_cov']})" in out
    assert f"{PAPER_PRESET['gate']}forkalman-paper" in out
    assert f"default:{KALMAN_DEFAULTS['obs']};" in out
    assert f"default:{KALMAN_DEFAULTS['epochs']:g}forkalman" in out
    assert "kalman-paper" in out and "--adaptive-obs-noise" in out and "--gate" in out


def test_generated_blur_of_a_large_image_is_fast_and_separable():
    from kalman_kernels.clip.data import _blur, _blur_matrix
    rng = np.random.RandomState(np.random.randint(1 << 30))   # seeded per test (conftest)
    small = rng.rand(9, 7, 3).astype(np.float32)
    bh, bw = _blur_matrix(9, 1.3), _blur_matrix(7, 1.3)
    ref = np.stack([bh @ small[..., c] @ bw.T for c in range(3)], -1)
    assert np.abs(_blur(small, 1.3) - ref).max() < 1e-5
    big = rng.rand(250, 250, 3).astype(np.float32)
    t0 = time.time()
    out = _blur(big, 8.0)
    assert time.time() - t0 < 2.0 and out.shape == big.shape
    assert abs(out.mean() - big.mean()) < 1e-2 and out.std() < big.std()


def test_lazy_shift_is_applied_at_model_resolution(tmp_path):
    from PIL import Image

    from kalman_kernels.clip.data import _LazyShift
    arr = (np.random.rand(200, 240, 3) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    s = _LazyShift(str(tmp_path / "x.png"), "blur", 4.0, "k")
    assert s.load(32).size == (38, 32) and s.load(None).size == (240, 200)


def test_quiet_silences_the_standin_pretraining(capsys, monkeypatch, tmp_path):
    import torch

    from kalman_kernels.clip import standin as S
    monkeypatch.setattr(S, "_pretraining_data", lambda pp: (
        torch.stack([pp(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (16, 16)))] * 4),
        torch.tensor([0, 1, 10, 11]), [["a"], ["b"]] + [["c"]] * 8 + [["d"], ["e"]] + [["f"]] * 6))
    monkeypatch.setattr(S, "zero_shot_clean", lambda pre, name: {"digits": 0.0})
    monkeypatch.setenv("KALMAN_KERNELS_CACHE", str(tmp_path))
    standin_checkpoint = S.standin_checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        standin_checkpoint("kk-micro-vit", steps=2, batch=4, verbose=False, force=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    # and verbose=True does talk (the test would pass vacuously otherwise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        standin_checkpoint("kk-micro-vit", steps=2, batch=4, verbose=True, force=True)
    assert "[stand-in]" in capsys.readouterr().out


def test_random_init_notice_is_silenced_where_asked_for(caplog):
    import logging

    from kalman_kernels.clip.registry import expected_random_init
    with caplog.at_level(logging.WARNING):
        with expected_random_init():
            logging.getLogger().warning("No pretrained weights loaded for model 'x'. Model "
                                        "initialized randomly.")
        logging.getLogger().warning("something else")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["something else"]
