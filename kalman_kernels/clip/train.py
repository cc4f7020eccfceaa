"""Few-shot training on cached features: KalmanNGD (batch or loss observations), AdamW / SGD
baselines (cosine schedule, CoOp style), zero-shot and GDA (training-free) references.

Probabilities are softmax(tau * scores) with tau the backbone's CLIP logit scale (capped at
100), the same for every method. Optionally (``calibrate=True``) tau is re-fitted on the
validation split by NLL, again for every method alike. The validation split (min(shots, 4)
images per class, disjoint from the shots) is the only data used for any selection; the test
and OOD splits are only ever evaluated.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

import kalman_kernels as kk

from . import metrics as M
from .adapters import make_adapter, observation, predictive_variance
from .cache import FeatureSet
from .head_filter import HeadKalman, uses_head_filter
from .progress import progress

OPTIMIZERS = ("kalman", "kalman-paper", "kalman-loss", "adamw", "sgd", "ivon")
KALMAN_METHODS = ("kalman", "kalman-paper", "kalman-loss")
BASELINES = ("zero-shot", "gda")
DEFAULT_LR = {"kalman": 1.0, "kalman-paper": 1.0, "kalman-loss": 1.0, "adamw": 1e-3, "sgd": 1e-1,
              "ivon": 1e-1}
# Prior covariance P0 per adapter. The update of the scores scales with P0 |H|^2 / r, and |H|
# depends on the parametrisation: the head's Jacobian rows are unit image vectors, the
# CLIP-Adapter's pass through 0.2 x a near-zero W2. Chosen on the stand-in's few-shot pool minus
# the shots (not the test split), see docs/clip.md.
DEFAULT_INIT_COV = {"head": 1e-3, "proj": 1e-3, "clip-adapter": 1e-1}
DEFAULT_OBS_NOISE = 1e-2
# The seed paper's configuration (method ``kalman-paper``): CLIP-Adapter, the paired cosine
# observation with target 1, adaptive observation noise and the Mahalanobis gate.
PAPER_PRESET = {"adapter": "clip-adapter", "obs": "paired", "adaptive_obs_noise": 0.1,
                "gate": 0.999}
# The application's default ``kalman`` (chosen on 5 tasks x 3 shot counts x 3 seeds, see
# docs/clip.md, ``python -m kalman_kernels.clip.study``): the head under the categorical
# likelihood (no observation noise to choose), iterated Kalman updates from the prior to the
# MAP (re-linearised, damped), one (d+1) x (d+1) covariance block per class, the predictive
# averaged over a grid of prior variances P0 weighted by their Laplace evidence (no validation
# data used), and the probit predictive. The previous default (cosine logits as Gaussian
# observations, 10 tempered passes, r chosen on validation) is
# ``likelihood="gaussian", fit="passes", obs="cosine-logits", grid=GAUSSIAN_R_GRID``.
GAUSSIAN_R_GRID = [{"obs_noise": 1e-3}, {"obs_noise": 1e-2}, {"obs_noise": 1e-1}]
KALMAN_DEFAULTS = {"likelihood": "categorical", "fit": "map", "prior": "evidence-average",
                   "head_cov": "auto", "obs": "logits", "epochs": 10.0, "tempered": True,
                   "adaptive_obs_noise": 0.0, "gate": None, "probit": True, "grid": []}
LIKELIHOODS = ("gaussian", "categorical")
FITS = ("passes", "map")
PRIORS = ("fixed", "evidence", "evidence-average")
HEAD_COVS = ("auto", "block", "diag")
#: ``head_cov="auto"`` keeps one block per class while a posterior's K (d+1)^2 float64 stay
#: within this many elements (134 MB: K = 10 at d = 512 fits, K = 100 does not), else the
#: diagonal (docs/clip.md, "The head's covariance")
AUTO_BLOCK_ELEMENTS = 2 ** 24
#: images per Kalman step of the fit to the MAP: up to this many shots the step is the exact
#: Gauss-Newton step (O(K n^3 + K n^2 d)); beyond, minibatched passes (clip.head_posterior)
MAP_MAX_BATCH = 512


#: posterior draws of IVON's Monte-Carlo predictive at evaluation
IVON_TEST_SAMPLES = 32


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
    obs_noise: Optional[float] = None   # Gaussian: r (None: DEFAULT_OBS_NOISE); categorical:
                                        # the tempering multiplier c (None: 1.0)
    likelihood: Optional[str] = None    # Kalman: "gaussian" or "categorical" (None: the
                                        # method's default)
    fit: Optional[str] = None           # categorical head: "passes" (sequential EKF passes)
                                        # or "map" (iterated to the MAP, Laplace posterior)
    prior: Optional[str] = None         # categorical head, fit "map": "fixed" (init_cov),
                                        # "evidence" (best P0 of prior_grid by the Laplace
                                        # evidence) or "evidence-average" (evidence-weighted)
    head_cov: Optional[str] = None      # categorical head: "block" (per class), "diag", or
                                        # "auto" (block while small, see AUTO_BLOCK_ELEMENTS)
    prior_grid: Optional[tuple] = None  # P0 candidates for the evidence (None: the default)
    prior_scale: float = 1.0            # categorical head: prior mean = scale * text embeddings
    prior_scales: Optional[tuple] = None  # prior "evidence*": also weigh these prior-mean
                                        # scales by the evidence (None: prior_scale alone)
    adaptive_obs_noise: Optional[float] = None  # Kalman: EMA rate beta of the innovation-based
                                        # r (0: off; None: the method's default)
    gate: Optional[float] = None        # Kalman: chi-square probability of the Mahalanobis gate
                                        # (None: the method's default; 0: off)
    tempered: bool = False              # Kalman, epochs E > 1: r multiplied by E (one pass's
                                        # evidence)
    forgetting: float = 1.0
    process_noise: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0
    eval_every: int = 20
    calibrate: bool = False
    mc_samples: int = 0                 # Kalman only: predictive = mean softmax over
                                        # theta ~ N(mu, P)
    probit: Optional[bool] = None       # Kalman only: softmax(tau mu / sqrt(1 + pi/8 tau^2 var)),
                                        # var = H P H^T + r (None: the method's default)
    max_obs: int = 2048                 # dense-S Kalman paths: batch capped so that
                                        # m * K <= max_obs
    backend: str = "auto"

    def resolved(self) -> "TrainConfig":
        """The method's preset applied (``kalman-paper``: PAPER_PRESET's adapter and
        observation), and its defaults for what was left None (adaptive noise, gate)."""
        cfg = self
        if cfg.optimizer == "kalman-paper":
            cfg = replace(cfg, adapter=PAPER_PRESET["adapter"], obs=PAPER_PRESET["obs"])
        defaults = (PAPER_PRESET if cfg.optimizer == "kalman-paper" else KALMAN_DEFAULTS
                    if cfg.optimizer == "kalman" else {"adaptive_obs_noise": 0.0, "gate": None})
        beta = (defaults["adaptive_obs_noise"] if cfg.adaptive_obs_noise is None
                else cfg.adaptive_obs_noise)
        gate = defaults["gate"] if cfg.gate is None else (cfg.gate or None)
        probit = (defaults.get("probit", False) if cfg.probit is None else cfg.probit)
        if beta != cfg.adaptive_obs_noise or gate != cfg.gate or probit != cfg.probit:
            cfg = replace(cfg, adaptive_obs_noise=float(beta), gate=gate, probit=bool(probit))
        own = dict(KALMAN_DEFAULTS) if cfg.optimizer == "kalman" else {}
        if cfg.init_cov is not None:
            own["prior"] = "fixed"      # a P0 given explicitly is the prior: nothing selected
        picked = {k: (getattr(cfg, k) if getattr(cfg, k) is not None else own.get(k, fallback))
                  for k, fallback in (("likelihood", "gaussian"), ("fit", "passes"),
                                      ("prior", "fixed"), ("head_cov", "diag"))}
        if any(picked[k] != getattr(cfg, k) for k in picked):
            cfg = replace(cfg, **picked)
        return cfg

    def validate(self) -> "TrainConfig":
        """Raise a one-line ValueError naming the field for a value no method accepts."""
        for name, allowed in (("likelihood", LIKELIHOODS), ("fit", FITS), ("prior", PRIORS),
                              ("head_cov", HEAD_COVS)):
            v = getattr(self, name)
            if v is not None and v not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {v!r}")
        if self.prior_grid is not None and (not self.prior_grid or
                                            any(not float(g) > 0 for g in self.prior_grid)):
            raise ValueError(f"prior_grid must be prior variances > 0, got {self.prior_grid!r}")
        return self

    def categorical_head(self) -> bool:
        """The Kalman head under the categorical likelihood (``clip.head_posterior``)."""
        cfg = self.resolved()
        return (cfg.optimizer == "kalman" and cfg.adapter == "head"
                and cfg.likelihood == "categorical")

    def is_kalman(self) -> bool:
        return self.optimizer in KALMAN_METHODS

    def resolved_batch(self, n_classes: int) -> int:
        """The dense Kalman logits path forms S over m K observations (float64, (m K)^2), so
        its batch is capped at m K <= max_obs. The head's class-structured path (plain or
        cosine logits, docs/design.md, 2.6) has no cap: its blocks are B x B per class."""
        cfg = self.resolved()
        if (cfg.optimizer in ("kalman", "kalman-paper") and cfg.obs in ("logits", "cosine-logits")
                and cfg.adapter != "head"):
            return max(1, min(cfg.batch_size, cfg.max_obs // max(1, n_classes)))
        return cfg.batch_size

    def resolved_steps(self, n_train: int, n_classes: int = 1) -> int:
        if self.epochs is None:
            return int(self.steps)
        b = min(self.resolved_batch(n_classes), n_train)
        return max(1, math.ceil(self.epochs * n_train / b))

    def resolved_init_cov(self) -> float:
        cfg = self.resolved()
        if cfg.init_cov is None:
            return DEFAULT_INIT_COV.get(cfg.adapter, 1e-3)
        return float(cfg.init_cov)

    def resolved_obs_noise(self) -> float:
        """r (Gaussian) or the tempering c (categorical), multiplied by the number of passes
        when ``tempered`` (E > 1 passes then carry the evidence of one). An iterated fit to
        the MAP re-linearises instead of making passes: no multiplier there."""
        cfg = self.resolved()
        base = (cfg.obs_noise if cfg.obs_noise is not None else
                1.0 if cfg.likelihood == "categorical" else DEFAULT_OBS_NOISE)
        if (cfg.tempered and cfg.epochs is not None and cfg.epochs > 1
                and not (cfg.categorical_head() and cfg.fit == "map")):
            return float(base) * float(cfg.epochs)
        return float(base)

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
    obs_noise: Optional[float] = None             # Kalman: the final r (adapted or not)
    adapter: Optional[torch.nn.Module] = field(default=None, repr=False, compare=False)
    opt: Optional[object] = field(default=None, repr=False, compare=False)  # the trained optimizer

    _JSON_FIELDS = ("method", "config", "metrics", "history", "seconds", "temperature",
                    "skipped_steps", "obs_noise")

    def to_json(self):
        d = {k: getattr(self, k) for k in self._JSON_FIELDS}
        d["config"] = dict(self.config)
        d["reliability"] = None
        if self.reliability is not None:
            d["reliability"] = {k: [None if (isinstance(v, float) and math.isnan(v)) else v
                                    for v in np.asarray(a, dtype=float).tolist()]
                                for k, a in self.reliability.items()}
        return d


class Task:
    """Everything a method needs: features of the splits, class text features, logit scale."""

    def __init__(self, train: FeatureSet, val: FeatureSet, test: FeatureSet,
                 ood: Dict[str, FeatureSet], text_feats: torch.Tensor, logit_scale: float,
                 proj: Optional[torch.Tensor] = None, n_classes: Optional[int] = None,
                 calibrate: bool = False, device="cpu"):
        self.train, self.val, self.test, self.ood = train, val, test, ood
        self.text = text_feats.float()
        self.tau = float(logit_scale)
        self.proj = proj
        self.k = n_classes or text_feats.shape[0]
        self.calibrate = bool(calibrate)   # training-free methods: fit tau on validation
        self.device = torch.device(device)  # where adapters are trained (features moved there)

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
    if task.calibrate:
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


def run_gda(task: Task, shrinkages=(0.1, 0.3, 0.6, 0.9),
            scales=(0.25, 0.5, 1.0, 2.0, 4.0)) -> MethodResult:
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


def finetune(task: Task, cfg: TrainConfig, progress_bar: bool = True, desc: str = "",
             **legacy) -> MethodResult:
    """Train an adapter on ``task.train`` with ``cfg.optimizer``; evaluate on val (during
    training, every ``eval_every`` steps), test and OOD splits (after training)."""
    if "progress" in legacy:
        progress_bar = legacy.pop("progress")
    if legacy:
        raise TypeError(f"unexpected arguments {sorted(legacy)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; "
                         f"choose from {', '.join(OPTIMIZERS)}")
    cfg.validate()
    torch.manual_seed(cfg.seed)
    if cfg.categorical_head():
        return _finetune_categorical_head(task, cfg)
    run = _setup(task, cfg)
    t0 = time.time()
    history = _train(run, progress_bar, desc or cfg.optimizer)
    seconds = time.time() - t0
    return _final_result(run, history, seconds)


@dataclass
class _Run:
    """What the training steps share: the task, the resolved config, the adapter and its
    inputs, the optimizer (or head filter) and the schedule."""
    task: Task
    method: str
    cfg: TrainConfig
    adapter: torch.nn.Module
    kind: str
    xtr: torch.Tensor
    ytr: torch.Tensor
    xva: torch.Tensor
    yva: torch.Tensor
    opt: object
    sched: Optional[object]
    steps: int
    batch: int
    lr: float


def _setup(task: Task, cfg: TrainConfig) -> _Run:
    """Adapter, inputs and optimizer of a run (``kalman-paper`` becomes its preset)."""
    method = cfg.optimizer
    rc = cfg.resolved()
    dev = task.device
    # the head's score form follows the Kalman observation model; gradient baselines train the
    # plain head with cross-entropy
    adapter = make_adapter(rc.adapter, task.text, task.proj, seed=rc.seed,
                           obs=rc.obs if rc.is_kalman() else "logits").to(dev)
    kind = adapter.input_kind
    xtr, ytr = task.inputs(task.train, kind).to(dev), task.train.labels.to(dev)
    xva, yva = task.inputs(task.val, kind).to(dev), task.val.labels.to(dev)
    lr = cfg.resolved_lr()
    steps = cfg.resolved_steps(xtr.shape[0], task.k)
    batch = cfg.resolved_batch(task.k)
    opt, sched = _make_optimizer(adapter, rc, cfg, lr, steps, n_train=xtr.shape[0])
    return _Run(task, method, rc, adapter, kind, xtr, ytr, xva, yva, opt, sched, steps, batch, lr)


def _make_optimizer(adapter, rc: TrainConfig, cfg: TrainConfig, lr: float, steps: int,
                    n_train: int = 1):
    import kalman_kernels as kk
    params = [p for p in adapter.parameters() if p.requires_grad]
    if rc.is_kalman():
        kw = dict(lr=lr, obs_noise=cfg.resolved_obs_noise(), forgetting=rc.forgetting,
                  process_noise=rc.process_noise, adaptive_obs_noise=rc.adaptive_obs_noise,
                  gate=rc.gate)
        if (uses_head_filter(adapter, "kalman", rc.obs) and rc.optimizer != "kalman-loss"
                and rc.likelihood == "gaussian"):
            return HeadKalman(adapter, init_cov=cfg.resolved_init_cov(), **kw), None
        if rc.likelihood == "categorical" and rc.optimizer != "kalman-loss":
            kw["likelihood"] = "categorical"
        opt = kk.KalmanNGD(params, init_cov=cfg.resolved_init_cov(), backend=rc.backend, **kw)
        if rc.optimizer != "kalman-loss":
            opt.track(adapter)
        return opt, None
    if rc.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=rc.weight_decay)
    elif rc.optimizer == "ivon":
        import ivon
        # the effective sample size is the number of training images (the few shots); IVON's
        # own defaults otherwise (Hessian init 1, weight decay 1e-4 unless given)
        opt = ivon.IVON(params, lr=lr, ess=float(n_train),
                        weight_decay=rc.weight_decay or 1e-4)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=rc.momentum, weight_decay=rc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    return opt, sched


def _train_step(run: _Run, xb: torch.Tensor, yb: torch.Tensor) -> None:
    cfg, adapter, opt = run.cfg, run.adapter, run.opt
    if isinstance(opt, HeadKalman):
        opt.step(xb, yb)
    elif cfg.optimizer == "kalman-loss":
        opt.step(lambda: F.cross_entropy(run.task.tau * adapter.scores(xb), yb))
    elif cfg.is_kalman() and cfg.likelihood == "categorical":
        opt.step(lambda: (run.task.tau * adapter.scores(xb), yb))
    elif cfg.is_kalman():
        opt.step(lambda: observation(adapter, xb, yb, cfg.obs))
    elif cfg.optimizer == "ivon":
        # one posterior sample per step (IVON's default training mode)
        with opt.sampled_params(train=True):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(run.task.tau * adapter.scores(xb), yb).backward()
        opt.step()
        run.sched.step()
    else:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(run.task.tau * adapter.scores(xb), yb).backward()
        opt.step()
        run.sched.step()


def _val_point(run: _Run, step: int, seen: int) -> Dict[str, float]:
    with torch.no_grad():
        p = torch.softmax(run.task.tau * run.adapter.scores(run.xva).double(), 1).cpu()
    return {"step": step, "images_seen": seen,
            **{f"val_{k}": v for k, v in M.classification_metrics(p, run.yva.cpu()).items()}}


#: Called as ``callback(desc, optimizer, adapter)`` after the first step of every run whose
#: optimizer is a KalmanNGD, while :func:`report_optimizers` is active (the CLI's --verbose).
_optimizer_report = None


@contextlib.contextmanager
def report_optimizers(callback):
    """Within the block, ``callback(desc, optimizer, adapter)`` is called after the first
    step of each run that trains with :class:`~kalman_kernels.KalmanNGD` (e.g. to print
    ``optimizer.describe(adapter)``, which the first step has filled in)."""
    global _optimizer_report
    previous, _optimizer_report = _optimizer_report, callback
    try:
        yield
    finally:
        _optimizer_report = previous


def _train(run: _Run, progress_bar: bool, desc: str) -> List[Dict[str, float]]:
    """The training loop; returns the validation curve (step 0 = the prior / zero-shot)."""
    every = max(1, min(run.cfg.eval_every, run.steps // 10))  # at least ~10 curve points
    gen = torch.Generator().manual_seed(run.cfg.seed)
    it = _batches(run.xtr.shape[0], run.ytr.cpu(), run.batch, gen)
    seen = 0
    history = [_val_point(run, 0, seen)]
    bar = progress(range(1, run.steps + 1), desc=desc, enabled=progress_bar, unit="step")
    for step in bar:
        idx = next(it).to(run.xtr.device)
        seen += int(idx.numel())
        _train_step(run, run.xtr[idx], run.ytr[idx])
        if step == 1 and _optimizer_report is not None and isinstance(run.opt, kk.KalmanNGD):
            _optimizer_report(desc, run.opt, run.adapter)
        if step % every == 0 or step == run.steps:
            history.append(_val_point(run, step, seen))
            bar.set_postfix(val_acc=f"{history[-1].get('val_acc', float('nan')):.3f}")
    run.adapter.eval()
    return history


def _predictors(run: _Run):
    """score_fn(fs), var_fn(fs) (Kalman: predictive variance) and prob_fn(fs, tau)
    (Monte-Carlo predictive when mc_samples > 0) of the trained adapter."""
    task, adapter, opt, cfg, dev = run.task, run.adapter, run.opt, run.cfg, run.task.device

    def score(fs):
        with torch.no_grad():
            return adapter.scores(task.inputs(fs, run.kind).to(dev)).float().cpu()

    var_fn = prob_fn = None
    if cfg.optimizer == "ivon":
        def prob_fn(fs, t):
            """IVON's predictive: the mean softmax over IVON_TEST_SAMPLES posterior draws."""
            x = task.inputs(fs, run.kind).to(dev)
            torch.manual_seed(10_000 + cfg.seed)
            acc = 0
            for _ in range(IVON_TEST_SAMPLES):
                with opt.sampled_params(), torch.no_grad():
                    acc = acc + torch.softmax(t * adapter.scores(x).double(), 1)
            return (acc / IVON_TEST_SAMPLES).cpu()
    if cfg.is_kalman():
        if isinstance(opt, HeadKalman):
            def var_fn(fs):
                return opt.predictive_variance(task.inputs(fs, run.kind).to(dev)).cpu()
        else:
            # the categorical likelihood's noise is the label's own randomness, not a score
            # noise: the score variance is the parameters' alone
            r = 0.0 if cfg.likelihood == "categorical" else _final_obs_noise(run)

            def var_fn(fs):
                return predictive_variance(adapter, task.inputs(fs, run.kind).to(dev),
                                           opt.covariance, r).cpu()
        if cfg.mc_samples > 0:
            def prob_fn(fs, t):
                """Monte-Carlo predictive: the same mc_samples draws theta ~ N(mu, diag P) for
                every split (the generator is re-seeded per call)."""
                g = torch.Generator(device=dev).manual_seed(10_000 + cfg.seed)
                x = task.inputs(fs, run.kind).to(dev)
                acc = None
                for _ in range(cfg.mc_samples):
                    with opt.sampled_params(generator=g), torch.no_grad():
                        pr = torch.softmax(t * adapter.scores(x).double(), 1)
                    acc = pr if acc is None else acc + pr
                return (acc / cfg.mc_samples).cpu()
        elif cfg.probit:
            def prob_fn(fs, t):
                """Probit-style predictive of Gaussian scores N(mu, var): each class logit
                t mu is divided by sqrt(1 + pi/8 t^2 var) (the filter's own spread: the
                parameters' P and the observation noise r)."""
                mu = score(fs).double()
                var = var_fn(fs).double()
                return torch.softmax(t * mu / torch.sqrt(1 + (math.pi / 8) * t * t * var), 1)
    return score, var_fn, prob_fn


def _final_obs_noise(run: _Run) -> Optional[float]:
    """The observation noise r of the last step (adapted when adaptive noise is on)."""
    if not run.cfg.is_kalman():
        return None
    if isinstance(run.opt, HeadKalman):
        return run.opt.obs_noise
    info = run.opt.last_info
    if info is not None and info.obs_noise is not None:
        return float(info.obs_noise)
    return replace(run.cfg, optimizer=run.method).resolved_obs_noise()


def _final_result(run: _Run, history, seconds: float) -> MethodResult:
    """Metrics on val, test and OOD of the trained adapter (tau re-fitted on val when
    ``calibrate``), as a MethodResult carrying the adapter and the optimizer."""
    task, cfg = run.task, run.cfg
    score, var_fn, prob_fn = _predictors(run)
    tau = task.tau
    yva = run.yva.cpu()
    if cfg.calibrate:
        tau = _fit_temperature(score(task.val), yva, task.tau)
    metrics, p = _evaluate(score, task, tau, var_fn, prob_fn)
    p_val = prob_fn(task.val, tau) if prob_fn else torch.softmax(tau * score(task.val).double(), 1)
    metrics["val"] = M.classification_metrics(p_val, yva)
    conf = asdict(cfg)
    conf.update(method=run.method, lr=run.lr, steps=run.steps, batch_size=run.batch,
                init_cov=run.cfg.resolved_init_cov() if cfg.is_kalman() else None,
                obs_noise=replace(cfg, optimizer=run.method).resolved_obs_noise()
                if cfg.is_kalman() else None,
                kalman_path=("class-structured head (ops.class_head)"
                             if isinstance(run.opt, HeadKalman) else
                             "KalmanNGD" if cfg.is_kalman() else None))
    skipped = int(getattr(run.opt, "skipped_steps", 0) or 0) if cfg.is_kalman() else 0
    return MethodResult(run.method, conf, metrics, history, seconds, tau,
                        M.reliability(p, task.test.labels), skipped, _final_obs_noise(run),
                        adapter=run.adapter, opt=run.opt)


# ----------------------------------------------------------------------------------------
# The head under the categorical likelihood (``clip.head_posterior``)
# ----------------------------------------------------------------------------------------
def _finetune_categorical_head(task: Task, cfg: TrainConfig) -> MethodResult:
    """The ``kalman`` head under the categorical likelihood: sequential EKF passes
    (``fit="passes"``) or iterated updates to the MAP with a Laplace posterior (``fit="map"``,
    the prior variance fixed or from the evidence). Evaluated like every method; the returned
    adapter holds the (highest-weight) posterior mean, ``opt`` the posterior."""
    from . import head_posterior as HP
    from .adapters import LinearHead
    rc = cfg.resolved()
    if rc.obs != "logits":
        raise ValueError(f"obs={rc.obs!r}: the categorical head scores with plain logits; the "
                         f"cosine and paired observations need likelihood='gaussian'")
    if rc.adaptive_obs_noise or rc.gate:
        raise ValueError("adaptive_obs_noise / gate: the categorical likelihood's noise is the "
                         "label's own (no level to adapt) and the head's fit has no gate; use "
                         "likelihood='gaussian' for them")
    t0 = time.time()
    dev = task.device
    xtr = HP.augment(task.train.embed.to(dev))
    ytr = task.train.labels.to(dev)
    theta0 = HP.prior_mean(task.text.to(dev), rc.prior_scale)
    tau = task.tau
    c = cfg.resolved_obs_noise()
    p0 = cfg.resolved_init_cov() if rc.init_cov is not None else 1e-3
    n = xtr.shape[0]
    # at the MAP all shots are one observation up to MAP_MAX_BATCH images (the exact
    # Gauss-Newton step); the passes use the configured batch
    batch = min(n, MAP_MAX_BATCH) if rc.fit == "map" else min(rc.batch_size, n)
    head_cov = rc.head_cov
    if head_cov == "auto":
        head_cov = ("block" if theta0.shape[0] * theta0.shape[1] ** 2 <= AUTO_BLOCK_ELEMENTS
                    else "diag")
    details: Dict = {}
    if rc.fit == "map":
        common = dict(logit_scale=tau, obs_noise=c, covariance=head_cov,
                      max_batch=max(batch, 1))
        if rc.prior == "fixed":
            post = HP.fit_map(xtr, ytr, theta0, p0, **common)
            model = HP.PosteriorMixture([post], [1.0], [(p0, post.log_evidence)])
        else:
            grid = tuple(rc.prior_grid) if rc.prior_grid else HP.DEFAULT_GRID
            base, scales = ((HP.prior_mean(task.text.to(dev)), tuple(rc.prior_scales))
                            if rc.prior_scales else (theta0, (1.0,)))
            model = HP.fit_by_evidence(xtr, ytr, base, grid=grid, mean_scales=scales,
                                       average=rc.prior == "evidence-average", **common)
        details = {"prior_variances": [m.init_cov for m in model.members],
                   "prior_weights": model.weights,
                   "iterations": [m.iterations for m in model.members],
                   "converged": all(m.converged for m in model.members),
                   "evidence_grid": model.evidence_grid}
        seen = sum(m.iterations for m in model.members) * n
    else:
        # sequential passes linearised at the running mean (the EKF), r x E when tempered
        epochs = max(1, int(round(rc.epochs or 1)))
        gen = torch.Generator().manual_seed(rc.seed)
        mean = theta0.clone()
        cov = HP._prior_cov(theta0, p0, head_cov)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            m2, cov, _, _ = HP.kalman_pass(mean, cov, xtr[perm], ytr[perm], logit_scale=tau,
                                           obs_noise=c, max_batch=batch)
            mean = m2
        post = HP.HeadPosterior(mean, cov, p0, tau)
        model = HP.PosteriorMixture([post], [1.0])
        seen = epochs * n
    seconds = time.time() - t0

    best = model.best
    head = LinearHead(task.text, bias=True).to(dev)
    with torch.no_grad():
        head.head.weight.copy_(best.mean[:, :-1].float())
        head.head.bias.copy_(best.mean[:, -1].float())
    predictive = "probit" if rc.probit else "map"

    def feats(fs):
        return HP.augment(task.inputs(fs, "embed").to(dev))

    def score(fs):
        return model.scores(feats(fs)).float().cpu()

    def var_fn(fs):
        return model.score_variance(feats(fs)).float().cpu()

    def prob_fn(fs, t):
        if rc.mc_samples > 0:     # the same draws for every split (re-seeded per call)
            g = torch.Generator(device=dev).manual_seed(10_000 + rc.seed)
            return model.sample_probs(feats(fs), t, rc.mc_samples, generator=g).cpu()
        return model.probs(feats(fs), t, predictive).cpu()

    def val_point(m, step, seen_):
        p = m.probs(feats(task.val), tau, predictive).cpu()
        return {"step": step, "images_seen": seen_,
                **{f"val_{k}": v for k, v in
                   M.classification_metrics(p, task.val.labels).items()}}

    prior_only = HP.PosteriorMixture(
        [HP.HeadPosterior(theta0, HP._prior_cov(theta0, p0, head_cov), p0, tau)], [1.0])
    history = [val_point(prior_only, 0, 0), val_point(model, 1, seen)]
    t_cal = tau
    if cfg.calibrate:
        t_cal = _fit_temperature(score(task.val), task.val.labels, tau)
    metrics, p = _evaluate(score, task, t_cal, var_fn, prob_fn)
    metrics["val"] = M.classification_metrics(prob_fn(task.val, t_cal), task.val.labels)
    conf = asdict(cfg)
    conf.update(method=cfg.optimizer, likelihood=rc.likelihood, fit=rc.fit, prior=rc.prior,
                head_cov=head_cov, obs_noise=c, init_cov=p0 if rc.prior == "fixed" or
                rc.fit == "passes" else None, batch_size=batch, probit=rc.probit,
                kalman_path="categorical head (clip.head_posterior, ops.categorical_head)",
                **details)
    return MethodResult(cfg.optimizer, conf, metrics, history, seconds, t_cal,
                        M.reliability(p, task.test.labels), 0, c, adapter=head,
                        opt=model.attach(head.head))
