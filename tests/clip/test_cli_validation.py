"""kalman-clip checks every argument before it touches a model, data or the stand-in: each bad
value exits with code 2 and one line that names the argument, without a traceback."""
import re

import pytest

from kalman_kernels.clip import cli

BAD = [
    # (argv, what the message must name, a valid value or range it must state)
    (["compare", "--methods", "kalman,adam"], "--methods", "adamw"),
    (["compare", "--methods", "kalman,kalman"], "--methods", "more than once"),
    (["compare", "--methods", ","], "--methods", "at least one"),
    (["compare", "--shots", "0"], "--shots", ">= 1"),
    (["compare", "--shots", "4,-1"], "--shots", ">= 1"),
    (["finetune", "--shots", "0"], "--shots", ">= 1"),
    (["demo", "--seeds", "-1"], "--seeds", "[0, 2**32)"),
    (["finetune", "--seed", "-3"], "--seed", "[0, 2**32)"),
    (["compare", "--seeds", "1,x"], "--seeds", "integers"),
    (["compare", "--adapter", "mlp"], "--adapter", "clip-adapter"),
    (["finetune", "--obs", "cosine"], "--obs", "cosine-logits"),
    (["compare", "--obs", "cosine-logits"], "--obs", "--likelihood gaussian"),
    (["finetune", "--likelihood", "poisson"], "--likelihood", "categorical"),
    (["finetune", "--fit", "exact"], "--fit", "map"),
    (["finetune", "--prior", "flat"], "--prior", "evidence-average"),
    (["finetune", "--head-cov", "full"], "--head-cov", "block"),
    (["finetune", "--predictive", "sample"], "--predictive", "probit"),
    (["finetune", "--optimizer", "adam"], "--optimizer", "adamw"),
    (["finetune", "--steps", "-5"], "--steps", ">= 1"),
    (["demo", "--steps", "0"], "--steps", ">= 1"),
    (["finetune", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["finetune", "--batch-size", "-32"], "--batch-size", ">= 1"),
    (["finetune", "--eval-every", "0"], "--eval-every", ">= 1"),
    (["finetune", "--mc-samples", "-1"], "--mc-samples", ">= 0"),
    (["finetune", "--threads", "0"], "--threads", ">= 1"),
    (["finetune", "--init-cov", "0"], "--init-cov", "> 0"),
    (["finetune", "--init-cov=-1e-3"], "--init-cov", "> 0"),
    (["finetune", "--init-cov", "nan"], "--init-cov", "> 0"),
    (["finetune", "--obs-noise", "0"], "--obs-noise", "> 0"),
    (["finetune", "--lr", "-1"], "--lr", "> 0"),
    (["finetune", "--lr", "inf"], "--lr", "> 0"),
    (["finetune", "--adaptive-obs-noise", "1.5"], "--adaptive-obs-noise", "[0, 1]"),
    (["finetune", "--likelihood", "gaussian", "--forgetting", "0"], "--forgetting", "(0, 1]"),
    (["finetune", "--forgetting", "1.01"], "--forgetting", "(0, 1]"),
    (["finetune", "--process-noise=-1e-6"], "--process-noise", ">= 0"),
    (["finetune", "--weight-decay", "-0.1"], "--weight-decay", ">= 0"),
    (["finetune", "--kalman-epochs", "-2"], "--kalman-epochs", ">= 0"),
    (["finetune", "--gate", "1.5"], "--gate", "(0, 1)"),
    (["compare", "--adamw-lrs", "1e-3,0"], "--adamw-lrs", "> 0"),
    (["compare", "--ivon-lrs", "-0.1"], "--ivon-lrs", "> 0"),
    (["compare", "--sgd-lrs", "x"], "--sgd-lrs", "numbers"),
    (["finetune", "--prior-mean-scales", "0,-1"], "--prior-mean-scales", ">= 0"),
    (["finetune", "--backend", "gpu"], "--backend", "reference"),
    (["finetune", "--device", "cuda"], "--device", "--device cpu"),
    (["finetune", "--device", "quantum"], "--device", "cpu"),
    (["finetune", "--dataset", "mnist"], "--dataset", "digits-noisy"),
    (["finetune", "--dataset", "digits-noisy:loud"], "--dataset", ">= 0"),
    (["demo", "--dataset", "cifar"], "--dataset", "shapes"),
    (["finetune", "--dataset", "imagefolder:/nonexistent/kk"], "--dataset", "not found"),
    (["finetune", "--ood", "/nonexistent/kk-ood"], "--ood", "folder"),
    (["finetune", "--template", "a photo"], "--template", "{}"),
    (["finetune", "--shifts", "--no-shifts"], "--shifts", "not both"),
    (["finetune", "--model", "ViT-Nope-99"], "--model", "open_clip"),
    (["finetune", "--model", "ViT-B-32", "--pretrained", "standin"], "--pretrained",
     "kk-tiny-vit"),
    (["finetune", "--pretrained", "no_such_tag"], "--pretrained", "checkpoint file"),
    (["finetune", "--model", "local-dir:/nonexistent/kk"], "--model", "not found"),
    (["finetune", "--likelihood", "categorical", "--gate", "0.99"], "--gate", "--gate off"),
    (["finetune", "--adaptive-obs-noise", "0.1"], "--adaptive-obs-noise", "--likelihood gaussian"),
]


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fail the test if anything gets past the validation to models, data or the stand-in."""
    from kalman_kernels.clip import data, models, run, standin

    def touched(what):
        def fail(*a, **k):
            raise AssertionError(f"{what} was called before the arguments were checked")
        return fail

    monkeypatch.setattr(run, "prepare", touched("run.prepare"))
    monkeypatch.setattr(run, "get_dataset", touched("data.get_dataset"))
    monkeypatch.setattr(run, "load_clip", touched("models.load_clip"))
    monkeypatch.setattr(data, "get_dataset", touched("data.get_dataset"))
    monkeypatch.setattr(models, "load_clip", touched("models.load_clip"))
    monkeypatch.setattr(standin, "pretrain_standin", touched("standin.pretrain_standin"))


def _main(argv):
    try:
        return cli.main(argv)
    except SystemExit as e:        # argparse's own checks (types, choices) exit from parse_args
        return e.code


@pytest.mark.parametrize("argv,flag,valid", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_argument_exits_2_with_one_line_naming_it(argv, flag, valid, nothing_loaded,
                                                      capsys, tmp_path):
    rc = _main(argv + ["--quiet", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err                  # one line, no usage block, no traceback
    assert lines[0].startswith(f"kalman-clip {argv[0]}: error: ")
    assert flag in lines[0] and valid in lines[0], lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()


def test_good_arguments_pass_the_checks(nothing_loaded, tmp_path):
    """The defaults and the README's command lines are accepted (and then reach prepare,
    which the fixture makes fail)."""
    for argv in (["demo"], ["compare"], ["finetune"],
                 ["compare", "--methods", "kalman,kalman-paper,adamw,zero-shot,gda",
                  "--shots", "1,4,16", "--seeds", "0,1,2", "--adamw-lrs", "1e-3,1e-2,1e-1",
                  "--dataset", "shapes"],
                 ["finetune", "--likelihood", "gaussian", "--obs", "cosine-logits",
                  "--gate", "0.999", "--adaptive-obs-noise", "0.1", "--init-cov", "1e-2"],
                 ["finetune", "--dataset", "digits-noisy:0.3", "--gate", "off"]):
        args = cli.build_parser().parse_args(argv + ["--out", str(tmp_path / "o")])
        cli._validate(args)
        with pytest.raises(AssertionError, match="run.prepare"):
            cli._run(args)


def test_help_cites_no_internal_documents(capsys):
    for sub in ("finetune", "compare", "demo"):
        with pytest.raises(SystemExit):
            cli.main([sub, "--help"])
        out = capsys.readouterr().out
        assert not re.search(r"design|issue", out, re.IGNORECASE), out
