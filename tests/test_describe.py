"""KalmanNGD.describe(): the per-parameter report (block kinds, covariance memory, and why a
tracked layer got a dense block)."""
import json
import warnings

import pytest
import torch
from torch import nn

import kalman_kernels as kk
from kalman_kernels.report import KINDS, OptimizerReport


class _Net(nn.Module):
    """Every kind of row: a tracked layer used once (Kronecker), one called twice and one fed
    a sequence per sample (dense fallbacks, each with its reason), an untracked parameter, a
    frozen one and one the output does not reach."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Linear(4, 6, dtype=dtype)
        self.twice = nn.Linear(6, 6, dtype=dtype)
        self.seq = nn.Linear(6, 6, dtype=dtype)
        self.head = nn.Linear(6, 3, bias=False, dtype=dtype)
        self.scale = nn.Parameter(torch.ones(3, dtype=dtype))
        self.frozen = nn.Parameter(torch.zeros(2, dtype=dtype), requires_grad=False)
        self.spare = nn.Parameter(torch.zeros(5, dtype=dtype))

    def forward(self, x):
        h = torch.tanh(self.emb(x))
        h = self.twice(self.twice(h))
        h = self.seq(h[:, None, :].expand(-1, 2, -1)).mean(1)      # (B, 2, 6): a sequence
        return self.head(h) * self.scale


def _kinds(report):
    return {row.name: (row.kind, row.note) for row in report}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_describe_names_each_parameters_block_memory_and_fallback_reason(dtype):
    net = _Net(dtype)
    opt = kk.KalmanNGD(net.parameters(), init_cov=0.05, obs_noise=0.2).track(net)
    before = opt.describe()
    assert isinstance(before, OptimizerReport) and before.mode is None
    rows = _kinds(before)               # names from track(), before any step
    assert rows["emb.weight"] == ("not stepped", "tracked: a Kronecker block in batch mode")
    assert rows["frozen"][0] == "frozen"
    assert not any(r.cov_allocated for r in before)
    x, y = torch.randn(5, 4, dtype=dtype), torch.randn(5, 3, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # the fallbacks' own warnings
        opt.step(lambda: (net(x), y))
    report = opt.describe(net)
    rows = _kinds(report)
    assert report.mode == "batch"
    assert rows["emb.weight"] == ("kronecker", None)
    assert rows["emb.bias"] == ("dense", "bias of a tracked layer: its Jacobian is the layer's D")
    assert rows["head.weight"] == ("kronecker", None)
    assert rows["twice.weight"] == ("dense", "tracked, fell back to dense: called 2 times in "
                                             "one closure")
    assert rows["twice.bias"] == ("dense", "bias of a tracked layer that fell back to dense")
    assert rows["seq.weight"][0] == "dense" and "(5, 2, 6) (a sequence per sample)" in \
        rows["seq.weight"][1]
    assert rows["scale"] == ("dense", None)
    assert rows["frozen"] == ("frozen", "requires_grad is False")
    assert rows["spare"][0] == "unused" and "predict step alone" in rows["spare"][1]
    size = 8 if dtype == torch.float64 else 4
    for row, p in zip(report, net.parameters()):
        assert row.shape == tuple(p.shape) and row.dtype == p.dtype
        assert row.cov_bytes == (0 if not p.requires_grad else p.numel() * size)
        assert row.cov_allocated == p.requires_grad
        assert row.kind in KINDS
    assert report.total_cov_bytes == sum(p.numel() for p in net.parameters()
                                         if p.requires_grad) * size
    assert report.count("kronecker") == 2 and report.count("frozen") == 1
    text = str(report)
    assert text.splitlines()[0] == "KalmanNGD: 10 parameters, batch-observation mode"
    for row in report:
        assert row.name in text and row.kind in text
    assert "called 2 times in one closure" in text and "total covariance memory" in text
    json.dumps(report.as_dicts())           # plain values, for logs
    # loss mode: every parameter the loss reaches is loss-diagonal, tracking or not
    opt.step(lambda: ((net(x) - y) ** 2).mean())
    rows = _kinds(opt.describe(net))
    assert rows["emb.weight"] == ("loss-diagonal",
                                  "tracked, but track() applies to batch mode only")
    assert rows["scale"] == ("loss-diagonal", None)
    assert rows["spare"][0] == "unused" and rows["frozen"][0] == "frozen"


def test_describe_without_names_uses_group_and_position_and_counts_complex_parts():
    w = nn.Parameter(torch.randn(2, 3))
    z = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    opt = kk.KalmanNGD([w])
    opt.add_param_group({"params": [z]})
    report = opt.describe()
    assert [r.name for r in report] == ["group 0, param 0", "group 1, param 0"]
    assert [r.cov_bytes for r in report] == [6 * 4, 4 * 2 * 4]    # two variances per entry
    opt.step(lambda: ((torch.view_as_real(z).sum() + w.sum()) ** 2))
    assert [r.kind for r in opt.describe()] == ["loss-diagonal", "loss-diagonal"]
    with pytest.raises(ValueError, match="kind must be one of"):
        report.count("diagonal")
