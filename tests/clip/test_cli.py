import json
import os
import subprocess
import sys
import warnings

import pytest

from kalman_kernels.clip import cli, load_clip, save_clip

from .conftest import make_image_folder


def test_help(capsys):
    for argv in (["--help"], ["finetune", "--help"], ["compare", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: kalman-clip" in out
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "kalman-clip")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "kalman_kernels.clip.cli"]
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "finetune" in r.stdout and "demo" in r.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = load_clip("kk-micro-vit", None)
    return save_clip(b.model, tmp_path_factory.mktemp("ck") / "micro.pt", b.model_cfg)


def test_compare_end_to_end(tmp_path, checkpoint, capsys):
    data = make_image_folder(tmp_path / "data", classes=("red", "green", "blue"), n=8)
    ood = make_image_folder(tmp_path / "ood", classes=("noise",), n=5, flat=True, seed=3)
    (data / "red" / "bad.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    rc = cli.main(["compare", "--model", "kk-micro-vit", "--pretrained", str(checkpoint),
                   "--dataset", f"imagefolder:{data}", "--ood", str(ood),
                   "--methods", "zero-shot,gda,adamw,kalman,kalman-paper,kalman-loss",
                   "--shots", "1,2",
                   "--steps", "5", "--adamw-lrs", "1e-3,1e-2", "--quiet", "--out", str(out),
                   "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "AUROC var" in text and "kalman" in text and "skipped unreadable images" in text
    res = json.loads((out / "results.json").read_text())
    assert res["skipped_images"] and sum(res["skipped_images"].values()) == 1
    rows = {(r["method"], r["shots"]) for r in res["summary"]}
    assert rows == {(m, s) for m in ("zero-shot", "gda", "adamw", "kalman", "kalman-paper",
                                     "kalman-loss") for s in (1, 2)}
    paper = [r for r in res["runs"] if r["method"] == "kalman-paper"]
    assert all(r["config"]["adapter"] == "clip-adapter" and r["config"]["obs"] == "paired"
               and r["config"]["gate"] == 0.999 and r["config"]["adaptive_obs_noise"] > 0
               for r in paper)
    assert "wall time" in text and "load average" in text
    for r in res["runs"]:
        t = r["metrics"]["test"]
        assert 0 <= t["acc"] <= 1 and t["nll"] >= 0 and 0 <= t["ece"] <= 1
        assert 0 <= r["metrics"]["ood-ood"]["auroc_msp"] <= 1
        if r["method"].startswith("kalman"):
            assert 0 <= r["metrics"]["ood-ood"]["auroc_var"] <= 1
    adamw = [r for r in res["runs"] if r["method"] == "adamw"]
    assert all(r["config"]["lr"] in (1e-3, 1e-2) for r in adamw)
    for f in ("curves.png", "reliability.png"):
        assert (out / f).stat().st_size > 1000


def test_clear_errors(tmp_path, capsys):
    rc = cli.main(["finetune", "--dataset", f"imagefolder:{tmp_path / 'missing'}", "--model",
                   "kk-micro-vit", "--pretrained", "none", "--quiet", "--out", str(tmp_path / "o")])
    assert rc == 2 and "dataset path not found" in capsys.readouterr().err
    rc = cli.main(["finetune", "--model", "ViT-B-99", "--quiet"])
    assert rc == 2 and "unknown model name" in capsys.readouterr().err
    rc = cli.main(["finetune", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k",
                   "--quiet"])
    assert rc == 2 and "not cached" in capsys.readouterr().err


def test_builtin_dataset_with_ood_folder_and_generated_shifts(tmp_path, checkpoint):
    ood = make_image_folder(tmp_path / "ood", classes=("x",), n=6, flat=True, seed=4)
    out = tmp_path / "o1"
    rc = cli.main(["compare", "--model", "kk-micro-vit", "--pretrained", str(checkpoint),
                   "--dataset", "digits", "--no-shifts", "--ood", str(ood), "--methods",
                   "zero-shot,kalman", "--shots", "1", "--quiet", "--no-plots", "--out", str(out),
                   "--init-cov", "1e-3", "--obs-noise", "1e-2"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["ood_splits"] == ["ood-ood"]
    k = [r for r in res["runs"] if r["method"] == "kalman"][0]
    assert set(k["metrics"]) == {"test", "val", "ood-ood"}
    # the default: the categorical head iterated to the MAP; an explicit P0 fixes the prior
    # (no evidence grid) and --obs-noise is the tempering c (no pass multiplier at the MAP)
    cfg = k["config"]
    assert cfg["likelihood"] == "categorical" and cfg["fit"] == "map"
    assert cfg["prior"] == "fixed" and cfg["prior_variances"] == [pytest.approx(1e-3)]
    assert cfg["obs_noise"] == pytest.approx(1e-2) and cfg["converged"]
    assert "grid" not in cfg  # P0 and c given: nothing selected
    # the generated shapes task, every method of the study's table (docs/clip.md)
    out3 = tmp_path / "o3"
    rc = cli.main(["compare", "--model", "kk-micro-vit", "--pretrained", str(checkpoint),
                   "--dataset", "shapes", "--no-shifts", "--methods",
                   "kalman,kalman-paper,adamw,zero-shot,gda", "--shots", "1", "--steps", "5",
                   "--quiet", "--no-plots", "--out", str(out3)])
    assert rc == 0
    res = json.loads((out3 / "results.json").read_text())
    assert res["dataset"] == "shapes" and len(res["classes"]) == 8
    assert {r["method"] for r in res["summary"]} == {"kalman", "kalman-paper", "adamw",
                                                      "zero-shot", "gda"}
    # generated shifts for an image folder: one split per (kind, severity)
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), n=8)
    out2 = tmp_path / "o2"
    rc = cli.main(["finetune", "--model", "kk-micro-vit", "--pretrained", str(checkpoint),
                   "--dataset", f"imagefolder:{data}", "--shifts", "--shots", "2", "--quiet",
                   "--out", str(out2)])
    assert rc == 0
    res = json.loads((out2 / "results.json").read_text())
    kinds = {v[0] for v in res["ood_splits"].values()}
    assert kinds == {"noise", "blur", "rotation", "inversion"}
    assert (out2 / "ood_severity.png").stat().st_size > 1000


def test_verbose_prints_each_kalman_methods_parameter_report(tmp_path, checkpoint, capsys):
    out = tmp_path / "o"
    rc = cli.main(["compare", "--model", "kk-micro-vit", "--pretrained", str(checkpoint),
                   "--dataset", "digits", "--no-shifts", "--methods",
                   "adamw,kalman-paper,kalman-loss", "--shots", "1", "--steps", "2", "--quiet",
                   "--no-plots", "--verbose", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for method, kind in (("kalman-paper", "kronecker"), ("kalman-loss", "loss-diagonal")):
        assert text.count(f"\n{method}: KalmanNGD: ") == 1, text
        block = text.split(f"\n{method}: KalmanNGD: ")[1].split("total covariance memory")[0]
        assert kind in block and "cov memory" in block
    assert "\nadamw: KalmanNGD" not in text
