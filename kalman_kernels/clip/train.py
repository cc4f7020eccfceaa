"""Few-shot training on cached features: KalmanNGD (batch or loss observations), AdamW / SGD
baselines (cosine schedule, CoOp style), zero-shot and GDA (training-free) references.

Probabilities are softmax(tau * scores) with tau the backbone's CLIP logit scale (capped at
100), the same for every method. Optionally (``calibrate=True``) tau is re-fitted on the
validation split by NLL, again for every method alike. The validation split (min(shots, 4)
images per class, disjoint from the shots) is the only data used for any selection; the test
and OOD splits are only ever evaluated.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as M
from .adapters import make_adapter, observation, predictive_variance
from .cache import FeatureSet

OPTIMIZERS = ("kalman", "kalman-loss", "adamw", "sgd")
BASELINES = ("zero-shot", "gda")
DEFAULT_LR = {"kalman": 1.0, "kalman-loss": 1.0, "adamw": 1e-3, "sgd": 1e-1}
# Prior covariance P0 per adapter. The update of the scores scales with P0 |H|^2 / r, and |H|
# depends on the parametrisation: the head's Jacobian rows are unit image vectors, the
# CLIP-Adapter's pass through 0.2 x a near-zero W2. Chosen on the stand-in's few-shot pool minus
# the shots (not the test split), see docs/clip.md.
DEFAULT_INIT_COV = {"head": 1e-3, "proj": 1e-3, "clip-adapter": 1e-1}


@dataclass
class TrainConfig:
    optimizer: str = "kalman"
    adapter: str = "head"
    obs: str = "logits"
    steps: int = 200
    epochs: Optional[float] = None      # if set: steps = ceil(epochs * n_train / batch_size)
    batch_size: int = 32
    lr: Optional[float] = None          # None: DEFAULT_LR[optimizer]
    init_cov: Optional[float] = None    # None: DEFAULT_INIT_COV[adapter]
    obs_noise: float = 1e-2
    forgetting: float = 1.0
    process_noise: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0
    eval_every: int = 20
    calibrate: bool = False
    mc_samples: int = 0                 # Kalman only: predictive = mean softmax over theta ~ N(mu, P)
    max_obs: int = 2048                 # kalman + logits: batch capped so that m * K <= max_obs
    backend: str = "auto"

    def resolved_batch(self, n_classes: int) -> int:
        """The innovation covariance S is (m K) x (m K) in float64 for the logits observation:
        with many classes the batch is capped so that m K <= max_obs (e.g. 1000 classes -> 2)."""
        if self.optimizer == "kalman" and self.obs == "logits":
            return max(1, min(self.batch_size, self.max_obs // max(1, n_classes)))
        return self.batch_size

    def resolved_steps(self, n_train: int, n_classes: int = 1) -> int:
        if self.epochs is None:
            return int(self.steps)
        b = min(self.resolved_batch(n_classes), n_train)
        return max(1, math.ceil(self.epochs * n_train / b))

    def resolved_init_cov(self) -> float:
        return DEFAULT_INIT_COV.get(self.adapter, 1e-3) if self.init_cov is None else float(self.init_cov)

    def resolved_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)


@dataclass
class MethodResult:
    method: str
    config: Dict
    metrics: Dict[str, Dict[str, float]]          # split -> metric -> value
    history: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    temperature: float = 0.0
    reliability: Optional[Dict] = None            # test-split reliability diagram
    skipped_steps: int = 0

    def to_json(self):
        d = asdict(self)
        if self.reliability is not None:
            d["reliability"] = {k: [None if (isinstance(v, float) and math.isnan(v)) else v
                                    for v in np.asarray(a, dtype=float).tolist()]
                                for k, a in self.reliability.items()}
        return d


class Task:
    """Everything a method needs: features of the splits, class text features, logit scale."""

    def __init__(self, train: FeatureSet, val: FeatureSet, test: FeatureSet,
                 ood: Dict[str, FeatureSet], text_feats: torch.Tensor, logit_scale: float,
                 proj: Optional[torch.Tensor] = None, n_classes: Optional[int] = None):
        self.train, self.val, self.test, self.ood = train, val, test, ood
        self.text = text_feats.float()
        self.tau = float(logit_scale)
        self.proj = proj
        self.k = n_classes or text_feats.shape[0]
        self.device = torch.device("cpu")  # where adapters are trained (features are moved there)

    def inputs(self, fs: FeatureSet, kind: str) -> torch.Tensor:
        if kind == "pre":
            if fs.pre is None:
                raise ValueError("this model gives no pre-projection features (adapter 'proj' "
                                 "needs a ViT with visual.proj)")
            return fs.pre.float()
        return fs.embed.float()


def _fit_temperature(scores: torch.Tensor, labels: torch.Tensor, default: float) -> float:
    grid = default * torch.logspace(-1.5, 1.0, 41).double()
    best, best_t = float("inf"), default
    for t in grid.tolist():
        v = F.cross_entropy(t * scores.double(), labels).item()
        if v < best:
            best, best_t = v, t
    return float(best_t)


def _evaluate(score_fn, task: Task, tau: float, var_fn=None, prob_fn=None) -> Dict:
    """Metrics on test and every OOD split; OOD AUROC by max-softmax and (if given) by the
    Kalman predictive variance of the predicted class's observation. ``prob_fn(fs, tau)``
    replaces softmax(tau * score_fn(fs)) when given (Monte-Carlo predictive)."""
    if prob_fn is None:
        def prob_fn(fs, t):
            return torch.softmax(t * score_fn(fs).double(), 1)
    out, probs_test = {}, None
    p_test = prob_fn(task.test, tau)
    probs_test = p_test
    out["test"] = M.classification_metrics(p_test, task.test.labels)
    msp_id = -p_test.max(1).values
    pred_id = p_test.argmax(1)
    var_id = var_fn(task.test).gather(1, pred_id[:, None]).squeeze(1) if var_fn else None
    for name, fs in task.ood.items():
        p = prob_fn(fs, tau)
        m = M.classification_metrics(p, fs.labels)
        m["auroc_msp"] = M.auroc(msp_id, -p.max(1).values)
        if var_fn is not None:
            v = var_fn(fs).gather(1, p.argmax(1)[:, None]).squeeze(1)
            m["auroc_var"] = M.auroc(var_id, v)
        out[name] = m
    return out, probs_test


def _batches(n: int, labels: torch.Tensor, batch: int, gen: torch.Generator):
    """Endless class-interleaved minibatches: each epoch is a permutation of the training set,
    ordered so that a batch holds several classes (and several images per class once the batch
    is larger than the number of classes). The last batch of an epoch holds the remainder."""
    batch = min(batch, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        # interleave classes: sort the permutation by (rank within class)
        lab = labels[perm]
        rank = torch.zeros(n, dtype=torch.long)
        for c in lab.unique():
            idx = (lab == c).nonzero().squeeze(1)
            rank[idx] = torch.arange(idx.numel())
        perm = perm[torch.argsort(rank * (int(lab.max()) + 1) + lab, stable=True)]
        for s in range(0, n, batch):
            yield perm[s:s + batch]


def _training_free_result(name: str, hparams: dict, score, task: Task, t0: float) -> MethodResult:
    """Evaluate a fixed scorer (optionally temperature-calibrated on val) as a MethodResult."""
    tau = task.tau
    if getattr(task, "calibrate", False):
        tau = _fit_temperature(score(task.val), task.val.labels, task.tau)
    metrics, p = _evaluate(score, task, tau)
    metrics["val"] = M.classification_metrics(torch.softmax(tau * score(task.val).double(), 1),
                                              task.val.labels)
    return MethodResult(name, hparams, metrics, [], time.time() - t0, tau,
                        M.reliability(p, task.test.labels))


def run_zero_shot(task: Task) -> MethodResult:
    t0 = time.time()
    text = F.normalize(task.text, dim=-1)

    def score(fs):
        return F.normalize(fs.embed.float(), dim=-1) @ text.t()

    return _training_free_result("zero-shot", {}, score, task, t0)


def run_gda(task: Task, shrinkages=(0.1, 0.3, 0.6, 0.9), scales=(0.25, 0.5, 1.0, 2.0, 4.0)) -> MethodResult:
    """Training-free Gaussian discriminant analysis on normalised embeddings: class means and
    one shared covariance, shrunk towards an isotropic v I. The shrinkage and the scale of v
    (around the mean within-class variance, or the between-class spread when there is a single
    shot and no within-class information) are chosen on the validation split by NLL. Scores are
    the GDA log-posteriors divided by tau, so softmax(tau * score) is the GDA posterior."""
    t0 = time.time()
    x = F.normalize(task.train.embed.double(), dim=-1)
    y = task.train.labels
    k, d = task.k, x.shape[1]
    mu = torch.stack([x[y == c].mean(0) for c in range(k)])
    r = x - mu[y]
    dof = x.shape[0] - k
    cov = r.t() @ r / max(1, dof) if dof > 0 else torch.zeros(d, d, dtype=torch.float64)
    v0 = float(torch.trace(cov)) / d
    if dof <= 0 or v0 <= 1e-8:
        v0 = float(((mu - mu.mean(0)) ** 2).sum(1).mean()) / d
        shrinkages = (1.0,)
    v0 = max(v0, 1e-8)

    def scorer(alpha, scale):
        sig = (1 - alpha) * cov + alpha * scale * v0 * torch.eye(d, dtype=torch.float64)
        prec = torch.linalg.inv(sig)
        w = mu @ prec
        b = -0.5 * (w * mu).sum(1)

        def score(fs):
            z = F.normalize(fs.embed.double(), dim=-1)
            return ((z @ w.t() + b) / task.tau).float()
        return score

    best = None
    for a in shrinkages:
        for sc_ in scales:
            sc = scorer(a, sc_)
            v = F.cross_entropy(task.tau * sc(task.val).double(), task.val.labels).item()
            if best is None or v < best[0]:
                best = (v, a, sc_, sc)
    _, alpha, scale, score = best
    return _training_free_result("gda", {"shrinkage": alpha, "variance_scale": scale}, score,
                                 task, t0)


def finetune(task: Task, cfg: TrainConfig, progress: bool = True, desc: str = "") -> MethodResult:
    """Train an adapter on ``task.train`` with ``cfg.optimizer``; evaluate on val (during
    training, every ``eval_every`` steps), test and OOD splits (after training)."""
    from tqdm.auto import tqdm
    import kalman_kernels as kk

    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    torch.manual_seed(cfg.seed)
    dev = task.device
    adapter = make_adapter(cfg.adapter, task.text, task.proj, seed=cfg.seed).to(dev)
    kind = adapter.input_kind
    xtr, ytr = task.inputs(task.train, kind).to(dev), task.train.labels.to(dev)
    xva, yva = task.inputs(task.val, kind).to(dev), task.val.labels.to(dev)
    params = [p for p in adapter.parameters() if p.requires_grad]
    lr = cfg.resolved_lr()
    steps = cfg.resolved_steps(xtr.shape[0], task.k)
    batch = cfg.resolved_batch(task.k)
    opt, sched = None, None
    if cfg.optimizer in ("kalman", "kalman-loss"):
        opt = kk.KalmanNGD(params, lr=lr, init_cov=cfg.resolved_init_cov(), obs_noise=cfg.obs_noise,
                           forgetting=cfg.forgetting, process_noise=cfg.process_noise,
                           backend=cfg.backend)
        if cfg.optimizer == "kalman":
            opt.track(adapter)
    else:
        if cfg.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))

    def ce_loss(xb, yb):
        return F.cross_entropy(task.tau * adapter.scores(xb), yb)

    seen = [0]

    def val_point(step):
        with torch.no_grad():
            p = torch.softmax(task.tau * adapter.scores(xva).double(), 1).cpu()
        return {"step": step, "images_seen": seen[0], **{f"val_{k}": v for k, v in M.classification_metrics(p, yva).items()}}

    every = max(1, min(cfg.eval_every, steps // 10))  # at least ~10 points on the curves
    gen = torch.Generator().manual_seed(cfg.seed)
    it = _batches(xtr.shape[0], ytr.cpu(), batch, gen)
    history = [val_point(0)]
    t0 = time.time()
    bar = tqdm(range(1, steps + 1), desc=desc or cfg.optimizer, disable=not progress,
               leave=False, unit="step")
    for step in bar:
        idx = next(it).to(dev)
        xb, yb = xtr[idx], ytr[idx]
        seen[0] += int(idx.numel())
        if cfg.optimizer == "kalman":
            opt.step(lambda: observation(adapter, xb, yb, cfg.obs))
        elif cfg.optimizer == "kalman-loss":
            opt.step(lambda: ce_loss(xb, yb))
        else:
            opt.zero_grad(set_to_none=True)
            loss = ce_loss(xb, yb)
            loss.backward()
            opt.step()
            sched.step()
        if step % every == 0 or step == steps:
            history.append(val_point(step))
            bar.set_postfix(val_acc=f"{history[-1].get('val_acc', float('nan')):.3f}")
    seconds = time.time() - t0
    bar.close()
    adapter.eval()

    def score(fs):
        with torch.no_grad():
            return adapter.scores(task.inputs(fs, kind).to(dev)).float().cpu()

    var_fn = None
    if cfg.optimizer in ("kalman", "kalman-loss"):
        def var_fn(fs):
            return predictive_variance(adapter, task.inputs(fs, kind).to(dev), opt.covariance,
                                       cfg.obs_noise).cpu()
    prob_fn = None
    if var_fn is not None and cfg.mc_samples > 0:
        def prob_fn(fs, t):
            """Monte-Carlo predictive: the same mc_samples draws theta ~ N(mu, diag P) for
            every split (the generator is re-seeded per call)."""
            g = torch.Generator(device=dev).manual_seed(10_000 + cfg.seed)
            x = task.inputs(fs, kind).to(dev)
            acc = None
            for _ in range(cfg.mc_samples):
                with opt.sampled_params(generator=g), torch.no_grad():
                    pr = torch.softmax(t * adapter.scores(x).double(), 1)
                acc = pr if acc is None else acc + pr
            return (acc / cfg.mc_samples).cpu()
    tau = task.tau
    yva = yva.cpu()
    if cfg.calibrate:
        tau = _fit_temperature(score(task.val), yva, task.tau)
    metrics, p = _evaluate(score, task, tau, var_fn, prob_fn)
    p_val = prob_fn(task.val, tau) if prob_fn else torch.softmax(tau * score(task.val).double(), 1)
    metrics["val"] = M.classification_metrics(p_val, yva)
    conf = asdict(cfg)
    conf["lr"] = lr
    conf["steps"] = steps
    conf["batch_size"] = batch
    conf["init_cov"] = cfg.resolved_init_cov()
    skipped = int(getattr(opt, "skipped_steps", 0) or 0) if cfg.optimizer.startswith("kalman") else 0
    res = MethodResult(cfg.optimizer, conf, metrics, history, seconds, tau,
                       M.reliability(p, task.test.labels), skipped)
    res.adapter = adapter
    res.opt = opt
    return res
