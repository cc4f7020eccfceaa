"""The quick offline demo (python -m kalman_kernels.demo) runs and learns."""
from kalman_kernels import demo


def test_demo_runs_and_kalman_learns_digits(capsys):
    result = demo.main(["--steps", "30", "--log-every", "15"])
    out = capsys.readouterr().out
    assert "KalmanNGD NLL" in out and "AdamW NLL" in out
    steps = [row[0] for row in result["kalman"]]
    assert steps == [15, 30]
    nll, acc = result["kalman"][-1][1:]
    assert acc > 0.85 and nll < 0.6          # chance is 0.1 accuracy, NLL 2.3
    assert result["adamw_lr"] in (1e-3, 3e-3, 1e-2, 3e-2)
