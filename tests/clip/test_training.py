import pytest
import torch

from kalman_kernels.clip.cache import FeatureSet
from kalman_kernels.clip.train import Task, TrainConfig, finetune, run_gda, run_zero_shot


def _toy(n_per, seed, k=4, d=16, spread=0.35):
    """Separable toy: K clusters on the sphere; text features point elsewhere (zero-shot poor)."""
    g = torch.Generator().manual_seed(100)
    centers = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1)
    g2 = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per)
    x = centers[y] + spread * torch.randn(len(y), d, generator=g2) / d ** 0.5
    return FeatureSet(f"toy{seed}", x, None, y, 0, [str(i) for i in range(k)])


def _task(shots):
    g = torch.Generator().manual_seed(7)
    text = torch.randn(4, 16, generator=g)  # unrelated to the clusters
    test = _toy(100, 2)
    ood = {"far": FeatureSet("far", 3 * torch.randn(80, 16, generator=g), None,
                             torch.full((80,), -1), 0, test.classnames)}
    return Task(_toy(shots, 0), _toy(4, 1), test, ood, text, logit_scale=30.0)


@pytest.mark.parametrize("adapter,obs,epochs", [("head", "logits", 1.0), ("head", "paired", 3.0)])
def test_kalman_reaches_95_percent_on_separable_toy(adapter, obs, epochs):
    task = _task(16)
    zs = run_zero_shot(task).metrics["test"]["acc"]
    cfg = TrainConfig(optimizer="kalman", adapter=adapter, obs=obs, epochs=epochs,
                      likelihood="gaussian", batch_size=16,
                      init_cov=1e-1 if adapter == "clip-adapter" else 1e-2,
                      obs_noise=1e-2, backend="reference")
    r = finetune(task, cfg, progress=False)
    acc = r.metrics["test"]["acc"]
    assert zs < 0.8, "the toy must need adaptation"
    assert acc >= 0.95, (adapter, obs, acc)
    assert r.skipped_steps == 0
    # the filter's covariance shrank where it observed data
    p = next(r.adapter.parameters())
    assert float(r.opt.covariance(p).max()) <= cfg.init_cov + 1e-12
    assert float(r.opt.covariance(p).min()) < cfg.init_cov
    # uncertainty-based OOD score: far-away inputs get a larger predictive variance
    if obs == "logits" and adapter == "head":
        assert r.metrics["far"]["auroc_var"] > 0.9


def test_clip_adapter_learns_with_kalman():
    """The CLIP-Adapter keeps 0.8 of the original feature, so with unrelated text features it
    cannot reach the head's accuracy; it must still clearly beat zero-shot."""
    task = _task(16)
    zs = run_zero_shot(task).metrics["test"]["acc"]
    r = finetune(task, TrainConfig(optimizer="kalman", adapter="clip-adapter", epochs=5.0,
                                   batch_size=16, init_cov=1e-1, obs_noise=1e-2), progress=False)
    assert r.metrics["test"]["acc"] >= zs + 0.2, (zs, r.metrics["test"]["acc"])


def test_other_optimizers_and_gda_train():
    task = _task(8)
    for name, lr in [("adamw", 1e-2), ("sgd", 1.0), ("kalman-loss", 1.0)]:
        r = finetune(task, TrainConfig(optimizer=name, lr=lr, steps=60, batch_size=16),
                     progress=False)
        assert r.metrics["test"]["acc"] >= 0.9, (name, r.metrics["test"]["acc"])
        assert len(r.history) >= 2 and r.history[0]["step"] == 0
    g = run_gda(task)
    assert g.metrics["test"]["acc"] >= 0.95
    with pytest.raises(ValueError, match="unknown optimizer"):
        finetune(task, TrainConfig(optimizer="lbfgs"), progress=False)


def test_monte_carlo_predictive_uses_posterior_samples():
    task = _task(8)
    base = TrainConfig(optimizer="kalman", likelihood="gaussian", epochs=1.0, batch_size=16,
                       init_cov=1e-1)
    r0 = finetune(task, base, progress=False)
    w = r0.adapter.head.weight.detach().clone()
    from dataclasses import replace
    r1 = finetune(task, replace(base, mc_samples=8), progress=False)
    # same training (deterministic), different predictive: sampled, and weights restored after
    assert torch.equal(r1.adapter.head.weight, w)
    assert r1.metrics["test"]["nll"] != r0.metrics["test"]["nll"]
    assert r1.metrics["test"]["acc"] >= 0.9


def test_head_logits_batch_is_not_capped_dense_paths_are():
    """The head's class-structured path (docs/design.md, 2.6) has no m K cap; the dense-S
    logits path of the other adapters keeps it."""
    for obs in ("logits", "cosine-logits"):
        cfg = TrainConfig(optimizer="kalman", obs=obs, batch_size=32, max_obs=2048, epochs=1.0)
        assert cfg.resolved_batch(1000) == 32 and cfg.resolved_steps(2000, 1000) == 63
    ca = TrainConfig(optimizer="kalman", adapter="clip-adapter", batch_size=32, epochs=1.0)
    assert ca.resolved_batch(10) == 32 and ca.resolved_batch(1000) == 2
    assert TrainConfig(optimizer="adamw").resolved_batch(1000) == 32
    task = _task(16)
    r = finetune(task, TrainConfig(optimizer="kalman", likelihood="gaussian", epochs=1.0,
                                   batch_size=32, max_obs=40), progress=False)
    assert r.config["batch_size"] == 32 and r.config["steps"] == 2  # 64 images / 32 per batch
    assert r.config["kalman_path"].startswith("class-structured")
    r = finetune(task, TrainConfig(optimizer="kalman", adapter="clip-adapter", epochs=1.0,
                                   batch_size=32, max_obs=40), progress=False)
    assert r.config["batch_size"] == 10 and r.config["steps"] == 7  # 64 images / 10 per batch


def test_many_classes_head_step_runs_at_full_batch():
    """200 classes at batch 32 in one class-structured step (6,400 observations: the dense S
    would be 6,400 x 6,400); the filter learns (training accuracy rises)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    k, d = 200, 24
    centers = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1)
    y = torch.arange(k).repeat(2)
    x = centers[y] + 0.05 * torch.randn(len(y), d, generator=g)
    fs = FeatureSet("many", x, None, y, 0, [str(i) for i in range(k)])
    task = Task(fs, fs, fs, {}, torch.randn(k, d, generator=g), logit_scale=30.0)
    zs = run_zero_shot(task).metrics["test"]["acc"]
    r = finetune(task, TrainConfig(optimizer="kalman", likelihood="gaussian", epochs=1.0,
                                   batch_size=32, init_cov=1e-1, obs_noise=1e-2), progress=False)
    assert r.config["batch_size"] == 32 and r.skipped_steps == 0
    assert r.metrics["test"]["acc"] > max(0.9, zs + 0.5), (zs, r.metrics["test"]["acc"])


@pytest.mark.parametrize("method", ["kalman", "kalman-paper"])
def test_adaptive_noise_and_gate_reach_the_filter(method):
    task = _task(8)
    cfg = TrainConfig(optimizer=method, likelihood="gaussian" if method == "kalman" else None,
                      epochs=2.0, batch_size=16, obs_noise=1e-2, adaptive_obs_noise=0.5,
                      gate=0.9)
    r = finetune(task, cfg, progress=False)
    assert r.obs_noise is not None and r.obs_noise != 1e-2      # r was adapted from the data
    assert r.config["adaptive_obs_noise"] == 0.5 and r.config["gate"] == 0.9
    if method == "kalman-paper":
        assert r.config["adapter"] == "clip-adapter" and r.config["obs"] == "paired"
        assert r.config["kalman_path"] == "KalmanNGD"
    else:
        assert r.opt.last_info is not None and float(r.opt.last_info.gate_scale) <= 1.0
