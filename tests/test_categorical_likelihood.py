"""KalmanNGD(likelihood="categorical"): the closure returns (logits, labels); each sample is
observed through the softmax probabilities of K - 1 classes with the noise
c (diag(p) - p p^T) of the categorical distribution (docs/math.md, "The categorical
likelihood").

* Exactness: float64, 1e-8, against an independent dense-Jacobian EKF of the drop-one-class
  form written here (Jacobian of softmax(logits)[:, kept] by torch.func.jacrev over the
  flattened parameters), over several sequential steps with forgetting and process noise,
  for a linear softmax model and a two-layer MLP, untracked (dense) and tracked
  (Kronecker), K = 2 and K = 5, B = 1 among the batches, class indices and soft targets,
  on every backend the kernel tests parametrise over (tests/kernel_backends.py). The
  implementation drops each sample's most probable class, the oracle the last one (and
  the first one, which must agree): so the comparison also checks that the dropped class
  does not matter.
* The natural-gradient identity of the full-covariance filter (the math, not the code).
* The gate (m = B (K - 1) degrees of freedom), param groups, the skip of a non-finite
  batch (state unchanged bit for bit), state_dict round trips, loss mode unchanged,
  torch.compile of the functional categorical step, meta tensors, two gloo ranks, and bad
  inputs.

Every test draws fresh random inputs; the seed is in every assertion message.
"""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kalman_kernels as kk
from conftest import draw_seed, rel_err
from gloo_ranks import run_on_gloo_ranks
from kalman_kernels import observations, ops
from op_checks import bits
from step_backends import step_backends

F64 = torch.float64
BACKENDS = step_backends()
TOL = 1e-8
HYPER = dict(lr=0.9, init_cov=0.3, forgetting=0.97, process_noise=1e-3, cov_floor=1e-9)


def _seed() -> int:
    return draw_seed()    # fresh every run, replayable from the test's reported seed


# ---------------------------------------------------------------------- models and data
class _MLP(nn.Module):
    def __init__(self, d, hidden, k):
        super().__init__()
        self.hidden = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, k)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)))


def _model(kind: str, k: int, gen: torch.Generator, d: int = 5, hidden: int = 7) -> nn.Module:
    model = nn.Linear(d, k) if kind == "linear" else _MLP(d, hidden, k)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():     # logits of order 1: moderate probabilities
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=F64))
    return model


def _soft(b, k, gen):
    w = torch.rand(b, k, generator=gen, dtype=F64) + 0.05
    return w / w.sum(1, keepdim=True)


def _batches(gen, k, plan, d=5):
    """plan: (B, "labels" | "soft") per step."""
    out = []
    for b, kind in plan:
        x = torch.randn(b, d, generator=gen, dtype=F64)
        y = (torch.randint(0, k, (b,), generator=gen) if kind == "labels" else
             _soft(b, k, gen))
        out.append((x, y))
    return out


def _chi2():
    # imported when needed: the gloo workers import this module, and scipy.stats costs them
    # a second each
    from scipy.stats import chi2
    return chi2


def _flat(tensors):
    return torch.cat([t.detach().to(F64).reshape(-1) for t in tensors])


# ---------------------------------------------------------------------- the oracle
def _per_element(model, groups, key):
    """A per-element tensor of hyper-parameter ``key``: groups maps parameter name -> dict."""
    return torch.cat([torch.full((p.numel(),), float(groups(n)[key]), dtype=F64)
                      for n, p in model.named_parameters()])


def _oracle(model, batches, *, c, drop="last", gate=None, rule="kalman", groups=None,
            cov_ceiling=math.inf, conds=None):
    """The dense-Jacobian float64 EKF of the drop-one-class observation, written from the
    formulas: H = d softmax(logits)[:, kept] / d theta (flattened, by jacrev), e = y - p on
    the kept classes, R = blockdiag_j c (diag(p_j) - p_j p_j^T) on the kept classes,
    P- = P / lam + q, S = H diag(P-) H^T + R, mu += lr s P- H^T S^-1 e,
    P = clamp(P- - P-^2 diag(H^T S^-1 H)) (or the information rule). Returns
    (mu, P, [(d2, s) per step]); ``conds``, a list, gets each step's cond(S)."""
    groups = groups or (lambda name: HYPER)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    lr, lam, q = (_per_element(model, groups, k) for k in ("lr", "forgetting", "process_noise"))
    floor = _per_element(model, groups, "cov_floor")
    mu = _flat(model.parameters())
    cov = _per_element(model, groups, "init_cov")

    def probs(theta, x):
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return torch.softmax(torch.func.functional_call(model, params, (x,)), dim=1)

    steps = []
    for x, target in batches:
        p = probs(mu, x)
        b, k = p.shape
        kept = list(range(1, k)) if drop == "first" else list(range(k - 1))
        y = F.one_hot(target, k).to(F64) if target.dim() == 1 else target.to(F64)
        h = torch.func.jacrev(lambda th: probs(th, x)[:, kept].reshape(-1))(mu)
        pk = p[:, kept]
        e = (y[:, kept] - pk).reshape(-1)
        r = torch.block_diag(*[c * (torch.diag(v) - torch.outer(v, v)) for v in pk])
        p_pred = cov / lam + q
        s_mat = h @ (p_pred[:, None] * h.T) + r
        s_inv = torch.linalg.inv(s_mat)
        if conds is not None:
            conds.append(float(torch.linalg.cond(s_mat)))
        d2 = float(e @ s_inv @ e)
        s = 1.0 if gate is None else min(1.0, math.sqrt(_chi2().ppf(gate, len(e)) / d2))
        mu = mu + lr * s * p_pred * (h.T @ (s_inv @ e))
        if rule == "kalman":
            cov = p_pred - p_pred ** 2 * torch.einsum("ji,jk,ki->i", h, s_inv, h)
        else:
            cov = 1.0 / (1.0 / p_pred + torch.einsum("ji,jk,ki->i", h, torch.linalg.inv(r), h))
        cov = torch.minimum(torch.maximum(cov, floor), torch.full_like(cov, cov_ceiling))
        steps.append((d2, s))
    return mu, cov, steps


def _run(model, batches, backend, *, tracked=False, kb=None, **kwargs):
    """KalmanNGD(likelihood="categorical") over ``batches`` on ``kb``'s device (CPU without
    one); returns (model, opt, losses)."""
    device = "cpu" if kb is None else kb.device
    model = copy.deepcopy(model).to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    opt = kk.KalmanNGD(model.parameters(), likelihood="categorical", backend=backend,
                       **{**HYPER, **kwargs})
    if tracked:
        opt.track(model)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # no dense fallback, no skip
        with (kb.active() if kb is not None else _nothing()):
            for x, y in batches:
                losses.append(opt.step(lambda: (model(x), y)))
    return model, opt, losses


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _tol(kb):
    # Compiled Triton kernels compute some float64 terms in float32 (tests/kernel_backends.py,
    # exact64); the interpreter (CPU tensors) computes them in float64.
    return TOL if (kb.exact64 or kb.interpreted) else 1e-4


# ====================================================================== exactness
PLAN = [(3, "labels"), (1, "labels"), (4, "soft"), (1, "soft"), (2, "labels")]


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("tracked", [False, True], ids=["dense", "tracked"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_steps_equal_the_dense_drop_one_class_ekf(kb, kind, tracked, k):
    kb.need_registered()
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    model = _model(kind, k, gen)
    batches = _batches(gen, k, PLAN)
    # K = 5: the default tempering (1.0, obs_noise not passed); K = 2: an explicit one
    kwargs = {} if k == 5 else {"obs_noise": 0.7}
    c = kwargs.get("obs_noise", 1.0)
    mu, cov, steps = _oracle(model, batches, c=c)
    trained, opt, losses = _run(model, batches, kb.name, tracked=tracked, kb=kb, **kwargs)
    tol = _tol(kb)
    msg = f"seed {seed}, {kb}"
    assert rel_err(_flat(trained.parameters()), mu) <= tol, msg
    assert rel_err(_flat([opt.covariance(p) for p in trained.parameters()]), cov) <= tol, msg
    info = opt.last_info
    assert info.num_obs == PLAN[-1][0] * (k - 1) and not info.skipped, msg
    assert info.mahalanobis == pytest.approx(steps[-1][0], rel=1e-6), msg
    assert opt.steps_taken == len(PLAN) and opt.skipped_steps == 0, msg
    # the returned value: the batch's mean cross-entropy before its step
    x, y = batches[0]
    expected = F.cross_entropy(model(x), y).detach()
    assert float(losses[0]) == pytest.approx(float(expected), rel=1e-12), msg


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_the_oracle_drops_first_or_last_class_alike(kind):
    """The K - 1 residuals of one choice are an invertible linear map of another's; the
    step is invariant under it (H -> T H, R -> T R T^T, e -> T e)."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    model = _model(kind, 4, gen)
    batches = _batches(gen, 4, [(3, "labels"), (2, "soft"), (1, "labels")])
    first = _oracle(model, batches, c=0.8, drop="first", gate=0.9)
    last = _oracle(model, batches, c=0.8, drop="last", gate=0.9)
    assert rel_err(first[0], last[0]) <= 1e-10, f"seed {seed}"
    assert rel_err(first[1], last[1]) <= 1e-10, f"seed {seed}"
    for (d2_a, s_a), (d2_b, s_b) in zip(first[2], last[2]):
        assert d2_a == pytest.approx(d2_b, rel=1e-10) and s_a == pytest.approx(s_b, rel=1e-10)
    # ... and the dropped class matters to nothing but the labels: a different
    # observation (K - 1 = 3 classes only) gives a different step, so the test can fail.
    other = _oracle(model, [(x, y if y.dim() == 2 else (y + 1) % 4) for x, y in batches],
                    c=0.8)
    assert rel_err(other[0], last[0]) > 1e-6, f"seed {seed}"


def test_full_covariance_step_is_the_natural_gradient_of_the_cross_entropy():
    """One step of the full-covariance filter with the drop-one-class observation:
    Sigma+^-1 = Sigma^-1 + J^T Lambda J / c and mu+ = mu + Sigma+ J^T (y - p) / c, with J
    the Jacobian of the logits (K rows per sample, every class) and Lambda = blockdiag_j
    (diag(p_j) - p_j p_j^T). This checks the math of docs/math.md, not the code."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    d, k, b, c = 2, 3, 2, 0.6
    model = _model("linear", k, gen, d=d)
    x = torch.randn(b, d, generator=gen, dtype=F64)
    y = F.one_hot(torch.randint(0, k, (b,), generator=gen), k).to(F64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    mu = _flat(model.parameters())
    n = mu.numel()

    def logits(theta):
        ps = {nm: t.reshape(s) for nm, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return torch.func.functional_call(model, ps, (x,))

    a = torch.randn(n, n, generator=gen, dtype=F64)
    sigma = 0.2 * (a @ a.T / n + torch.eye(n, dtype=F64))     # a full SPD prior
    p = torch.softmax(logits(mu), 1)
    jac = torch.func.jacrev(lambda th: logits(th).reshape(-1))(mu)              # (B K, n)
    lam = torch.block_diag(*[torch.diag(v) - torch.outer(v, v) for v in p])     # (B K, B K)
    for drop in (0, k - 1):
        kept = [j * k + i for j in range(b) for i in range(k) if i != drop]
        h = (lam @ jac)[kept]
        r = c * lam[kept][:, kept]
        e = (y - p).reshape(-1)[kept]
        s_mat = h @ sigma @ h.T + r
        gain = sigma @ h.T @ torch.linalg.inv(s_mat)
        mu_new = mu + gain @ e
        sigma_new = (torch.eye(n, dtype=F64) - gain @ h) @ sigma
        info = torch.linalg.inv(sigma) + jac.T @ lam @ jac / c
        assert rel_err(torch.linalg.inv(sigma_new), info) <= 1e-8, f"seed {seed}"
        nat = mu + sigma_new @ jac.T @ (y - p).reshape(-1) / c
        assert rel_err(mu_new - mu, nat - mu) <= 1e-8, f"seed {seed}"
    # the identity is not vacuous: the Gaussian observation of the logits differs
    assert rel_err(torch.linalg.inv(sigma_new), torch.linalg.inv(sigma) + jac.T @ jac / c) > 1e-3


# ====================================================================== gate, groups, rules
@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_counts_m_equal_b_times_k_minus_1_degrees_of_freedom(backend):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    k = 4
    model = _model("mlp", k, gen)
    batches = _batches(gen, k, [(3, "labels"), (5, "labels")])
    # labels = each sample's least probable class and a sharp likelihood (c = 0.2): d2
    # (about sum_j (1 - p_label) / (c p_label)) far above the gate's quantile
    batches = [(x, model(x).argmin(1).detach()) for x, _ in batches]
    mu, cov, steps = _oracle(model, batches, c=0.2, gate=0.02, rule="information")
    trained, opt, _ = _run(model, batches, backend, tracked=True, gate=0.02, obs_noise=0.2,
                           cov_update="information")
    msg = f"seed {seed}"
    tol = TOL      # every backend here runs on CPU tensors, float64 throughout
    assert rel_err(_flat(trained.parameters()), mu) <= tol, msg
    assert rel_err(_flat([opt.covariance(p) for p in trained.parameters()]), cov) <= tol, msg
    assert all(s < 1 for _, s in steps), msg               # the gate did act
    info = opt.last_info
    assert info.num_obs == 5 * (k - 1), msg
    assert info.gate_scale == pytest.approx(steps[-1][1], rel=1e-6), msg
    assert info.p_value == pytest.approx(float(_chi2().sf(steps[-1][0], 5 * (k - 1))),
                                         rel=1e-5), msg
    assert opt.diagnostics()["gated_steps"] == 2, msg


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_keep_their_own_hyper_parameters(backend):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    k = 3
    model = _model("mlp", k, gen)
    batches = _batches(gen, k, [(2, "labels"), (3, "soft"), (1, "labels")])
    head = dict(HYPER, lr=0.5, init_cov=0.1, forgetting=0.9, process_noise=1e-2)
    mu, cov, _ = _oracle(model, batches, c=0.5,
                         groups=lambda name: head if name.startswith("head") else HYPER)
    trained = copy.deepcopy(model)
    opt = kk.KalmanNGD([{"params": trained.hidden.parameters()},
                        {"params": trained.head.parameters(), **{key: head[key] for key in
                                                                ("lr", "init_cov", "forgetting",
                                                                 "process_noise")}}],
                       likelihood="categorical", obs_noise=0.5, backend=backend, **HYPER)
    opt.track(trained.head)
    for x, y in batches:
        opt.step(lambda: (trained(x), y))
    tol = TOL      # every backend here runs on CPU tensors, float64 throughout
    assert rel_err(_flat(trained.parameters()), mu) <= tol, f"seed {seed}"
    assert rel_err(_flat([opt.covariance(p) for p in trained.parameters()]), cov) <= tol, \
        f"seed {seed}"
    # the likelihood belongs to the observation, not to a group
    with pytest.raises(ValueError, match="likelihood belongs to the observation"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=F64))],
                             "likelihood": "gaussian"})


# ====================================================================== skip, defaults, modes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tracked", [False, True], ids=["dense", "tracked"])
def test_non_finite_logits_skip_and_leave_the_state_bit_for_bit(backend, tracked):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    k = 3
    model = _model("mlp", k, gen)
    opt = kk.KalmanNGD(model.parameters(), likelihood="categorical", backend=backend, **HYPER)
    if tracked:
        opt.track(model)
    x, y = _batches(gen, k, [(4, "labels")])[0]
    opt.step(lambda: (model(x), y))                 # a covariance that is not the prior
    before = [bits(t).clone() for p in model.parameters() for t in (p, opt.covariance(p))]
    for bad in (float("nan"), float("inf")):
        spoil = torch.ones(4, k, dtype=F64)
        spoil[1, 2] = bad                           # one non-finite logit
        with pytest.warns(RuntimeWarning, match="skipped") if bad != bad else _nothing():
            opt.step(lambda: (model(x) * spoil, y))
        assert opt.last_info.skipped, f"seed {seed}"
        after = [bits(t) for p in model.parameters() for t in (p, opt.covariance(p))]
        assert all(torch.equal(a, b) for a, b in zip(after, before)), f"seed {seed}"
    assert opt.skipped_steps == 2 and opt.steps_taken == 1
    opt.step(lambda: (model(x), y))                 # and the filter goes on
    assert not opt.last_info.skipped and opt.steps_taken == 2


def test_default_tempering_is_one_and_an_explicit_obs_noise_is_kept():
    import inspect
    default = inspect.signature(kk.KalmanNGD).parameters["obs_noise"].default
    assert default == 1e-2 and isinstance(default, float) and repr(default) == "0.01"
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    model = _model("mlp", 4, gen)
    batches = _batches(gen, 4, [(3, "labels"), (2, "soft")])
    runs = {}
    for name, kwargs in (("default", {}), ("one", {"obs_noise": 1.0}),
                         ("explicit", {"obs_noise": 1e-2})):
        trained, opt, _ = _run(model, batches, "reference", **kwargs)
        runs[name] = (_flat(trained.parameters()), opt)
    assert torch.equal(runs["default"][0], runs["one"][0])
    assert not torch.allclose(runs["default"][0], runs["explicit"][0])
    assert runs["default"][1].diagnostics()["obs_noise"] == 1.0
    assert runs["explicit"][1].diagnostics()["obs_noise"] == 1e-2
    conds = []
    mu, _, _ = _oracle(model, batches, c=1e-2, conds=conds)
    # c = 1e-2 shrinks R, and with a confident softmax S = H P- H^T + R can be nearly
    # singular (cond(S) up to 2e12 seen): both solves then agree only to ~eps * cond(S)
    tol = max(TOL, 4 * torch.finfo(F64).eps * max(conds))
    assert rel_err(runs["explicit"][0], mu) <= tol, f"seed {seed}, cond(S) {max(conds):.1e}"
    # a 0-d tensor is a scalar too
    _, opt, _ = _run(model, batches, "reference", obs_noise=torch.tensor(1e-2, dtype=F64))
    assert torch.equal(_flat(opt.param_groups[0]["params"]), runs["explicit"][0])


def test_gaussian_default_is_unchanged():
    """likelihood="gaussian" (the default) with the default obs_noise is today's filter
    with r = 1e-2, bit for bit."""
    torch.manual_seed(_seed())
    model = _MLP(5, 7, 3)
    x, t = torch.randn(6, 5), torch.randn(6, 3)
    results = []
    for kwargs in ({}, {"obs_noise": 1e-2}, {"likelihood": "gaussian"}):
        net = copy.deepcopy(model)
        opt = kk.KalmanNGD(net.parameters(), init_cov=0.05, **kwargs)
        out = opt.step(lambda: (net(x), t))
        results.append((_flat(net.parameters()), _flat([opt.covariance(p) for p in
                                                         net.parameters()]), out))
        assert "likelihood" not in opt.state["filter"]
        assert opt.diagnostics()["obs_noise"] == 1e-2
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("obs_noise", [None, 0.3])
def test_loss_mode_is_unaffected_by_the_likelihood(obs_noise):
    torch.manual_seed(_seed())
    model = _MLP(5, 7, 3).double()
    x, y = torch.randn(6, 5, dtype=F64), torch.randint(0, 3, (6,))
    kwargs = {} if obs_noise is None else {"obs_noise": obs_noise}
    results = []
    for likelihood in ("gaussian", "categorical"):
        net = copy.deepcopy(model)
        opt = kk.KalmanNGD(net.parameters(), init_cov=0.05, likelihood=likelihood, **kwargs)
        for _ in range(2):
            opt.step(lambda: F.cross_entropy(net(x), y))
        results.append(_flat(list(net.parameters()) + [opt.covariance(p) for p in
                                                       net.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], _flat(list(model.parameters()) * 2))


# ====================================================================== state_dict
@pytest.mark.parametrize("tracked", [False, True], ids=["dense", "tracked"])
def test_state_dict_round_trip_resumes_exactly(tracked):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    model = _model("mlp", 5, gen)
    batches = _batches(gen, 5, [(3, "labels"), (2, "soft"), (4, "labels"), (1, "soft")])

    def fresh(**kwargs):
        net = copy.deepcopy(model)
        opt = kk.KalmanNGD(net.parameters(), likelihood="categorical", gate=0.999,
                           **{**HYPER, **kwargs})
        if tracked:
            opt.track(net)
        return net, opt

    def run(net, opt, part):
        for x, y in part:
            opt.step(lambda: (net(x), y))

    straight, opt_s = fresh(obs_noise=0.6)
    run(straight, opt_s, batches)
    first, opt_1 = fresh(obs_noise=0.6)
    run(first, opt_1, batches[:2])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)                      # weights_only: plain values only
    assert saved["opt"]["state"][0]["kalman_filter"]["likelihood"] == "categorical"
    second, opt_2 = fresh()                         # obs_noise not passed: restored from the state
    second.load_state_dict(saved["model"])
    opt_2.load_state_dict(saved["opt"])
    assert opt_2.diagnostics()["obs_noise"] == 0.6
    run(second, opt_2, batches[2:])
    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.equal(a, b), f"seed {seed}"
        assert torch.equal(opt_s.covariance(a), opt_2.covariance(b)), f"seed {seed}"
    assert opt_s.state["filter"] == opt_2.state["filter"]
    # a state saved under one likelihood is refused by the other, and nothing changes
    gaussian = kk.KalmanNGD(copy.deepcopy(model).parameters(), **HYPER)
    before = copy.deepcopy(gaussian.state_dict())
    with pytest.raises(ValueError, match="likelihood='categorical'"):
        gaussian.load_state_dict(opt_s.state_dict())
    assert gaussian.state_dict()["state"].keys() == before["state"].keys()
    with pytest.raises(ValueError, match="likelihood='gaussian'"):
        fresh()[1].load_state_dict(before)
    # a saved tempering that is no noise is refused, naming where it is, and nothing changes
    bad = opt_s.state_dict()
    bad["state"][0]["kalman_filter"]["tempering"] = torch.tensor(-1.0, dtype=torch.float64)
    net, opt = fresh(obs_noise=0.6)
    with pytest.raises(ValueError, match=r"saved tempering \('tempering' in each parameter "
                                         r"entry's 'kalman_filter'\).*got -1.0"):
        opt.load_state_dict(bad)
    assert opt.diagnostics()["obs_noise"] == 0.6 and opt.steps_taken == 0


# ====================================================================== compile, meta
def _functional_step(backend, tempering):
    """The categorical step of a linear head W x + b written with the ops layer: the
    Jacobian of the kept probabilities is Lambda_kept (x for W: a Kronecker block, 1 for b)."""
    def step(w, wc, b, bc, x, labels):
        logits = x @ w.T + b
        keep, residual, noise, loss = observations.categorical_terms(logits, labels, tempering)
        p = torch.softmax(logits.to(F64), 1)
        k = p.shape[1]
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        lam_kept = lam.gather(1, keep[:, :, None].expand(-1, -1, k)).to(w.dtype)
        blocks = [ops.KronBlock(w, wc, x, lam_kept), ops.DenseBlock(b, bc, lam_kept.reshape(-1, k))]
        hyper = ops.StepHyper(HYPER["lr"], HYPER["forgetting"], HYPER["process_noise"],
                              HYPER["cov_floor"])
        info = ops.kalman_step_(blocks, [hyper, hyper], residual, noise, gate=0.99,
                                backend=backend)
        return info.mahalanobis_tensor, info.skipped_tensor, loss
    return step


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpp") if b in BACKENDS])
def test_functional_categorical_step_compiles_fullgraph_and_equals_the_optimizer(backend):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    k, d = 4, 5
    model = _model("linear", k, gen, d=d)
    x, y = _batches(gen, k, [(3, "labels")])[0]
    torch._dynamo.reset()

    def state():
        return [model.weight.detach().clone(), torch.full((k, d), HYPER["init_cov"], dtype=F64),
                model.bias.detach().clone(), torch.full((k,), HYPER["init_cov"], dtype=F64)]

    eager, compiled = state(), state()
    out_e = _functional_step(backend, 0.8)(*eager, x, y)
    out_c = torch.compile(_functional_step(backend, 0.8), fullgraph=True,
                          backend="aot_eager")(*compiled, x, y)
    for a, b in zip(out_e, out_c):
        assert torch.allclose(a.to(F64), b.to(F64), rtol=1e-10, atol=0), f"seed {seed}"
    for a, b in zip(eager, compiled):
        assert rel_err(b, a) <= 1e-10, f"seed {seed}"
    trained, opt, _ = _run(model, [(x, y)], backend, tracked=True, obs_noise=0.8, gate=0.99)
    assert rel_err(compiled[0], trained.weight) <= TOL and rel_err(compiled[2], trained.bias) <= TOL
    assert rel_err(compiled[1], opt.covariance(trained.weight)) <= TOL, f"seed {seed}"
    assert not torch.equal(eager[0], model.weight), "the step did not move the weight"


@pytest.mark.parametrize("tracked", [False, True], ids=["dense", "tracked"])
def test_optimizer_step_runs_on_meta_tensors(tracked):
    """No host read of a device value: on meta tensors any such read raises."""
    model = _MLP(5, 4, 3).to("meta")
    opt = kk.KalmanNGD(model.parameters(), likelihood="categorical", gate=0.99,
                       backend="reference")
    if tracked:
        opt.track(model, verify="never")
    x = torch.randn(6, 5, device="meta")
    for labels in (torch.zeros(6, dtype=torch.int64, device="meta"),
                   torch.zeros(6, 3, device="meta")):
        loss = opt.step(lambda: (model(x), labels))
        assert loss.device.type == "meta" and opt.last_info.num_obs == 12
    assert opt.state["filter"]["steps"].device.type == "meta"


def test_unreadable_bad_labels_skip_instead_of_raising(monkeypatch):
    """Where label values cannot be read without a device synchronisation (GPUs,
    torch.compile), out-of-range labels and soft targets that do not sum to 1 make the
    target non-finite: the step is skipped, the state unchanged. Emulated here by
    declaring the CPU unreadable."""
    monkeypatch.setattr(observations, "readable_now", lambda t: False)
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    model = _model("linear", 3, gen)
    opt = kk.KalmanNGD(model.parameters(), likelihood="categorical", **HYPER)
    x = torch.randn(4, 5, generator=gen, dtype=F64)
    before = [bits(t).clone() for p in model.parameters() for t in (p, opt.covariance(p))]
    bad = [torch.tensor([0, 3, 1, 2]), torch.tensor([0, -1, 1, 2]),
           torch.full((4, 3), 0.4, dtype=F64), torch.tensor([[1.2, -0.2, 0.0]] * 4, dtype=F64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for labels in bad:
            opt.step(lambda: (model(x), labels))
            assert opt.last_info.skipped, f"seed {seed}"
    after = [bits(t) for p in model.parameters() for t in (p, opt.covariance(p))]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert opt.skipped_steps == 4
    opt.step(lambda: (model(x), torch.tensor([0, 2, 1, 2])))
    assert not opt.last_info.skipped


# ====================================================================== bad input
def _opt(**kwargs):
    model = nn.Linear(3, 4).double()
    return model, kk.KalmanNGD(model.parameters(), likelihood="categorical", **kwargs)


@pytest.mark.parametrize("labels, error, match", [
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"int64.*labels\.long\(\)"),
    (torch.tensor([0, 1, 2], dtype=torch.int32), TypeError, r"must be int64, got torch.int32"),
    (torch.tensor([True, False, True]), TypeError, r"must be int64, got torch.bool"),
    (torch.tensor([0, 4, 1]), ValueError, r"class indices in \[0, 3\].*from 0 to 4"),
    (torch.tensor([0, -1, 1]), ValueError, r"class indices in \[0, 3\]"),
    (torch.tensor([0, 1]), ValueError, r"labels has 2 entries but logits has 3 rows"),
    (torch.full((3, 4), 0.3, dtype=F64), ValueError, r"sum to 1.*off by 2\.000e-01"),
    (torch.tensor([[1.5, -0.5, 0.0, 0.0]] * 3, dtype=F64), ValueError, r"probabilities >= 0"),
    (torch.ones(3, 4, dtype=torch.int64), TypeError, r"floating-point probabilities"),
    (torch.full((3, 5), 0.2, dtype=F64), ValueError, r"shape of logits, \(3, 4\)"),
    (torch.zeros(3, 4, 1), ValueError, r"\(B,\) = \(3,\) \(int64\) or soft targets"),
])
def test_bad_labels_raise_clearly_and_change_nothing(labels, error, match):
    model, opt = _opt()
    x = torch.randn(3, 3, dtype=F64)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        opt.step(lambda: (model(x), labels))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.steps_taken == 0 and opt.skipped_steps == 0
    opt.step(lambda: (model(x), torch.tensor([0, 3, 1])))      # still usable
    assert opt.steps_taken == 1


def test_bad_logits_raise_clearly():
    model, opt = _opt()
    x = torch.randn(3, 3, dtype=F64)
    y = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match=r"K = 1 class.*K >= 2.*torch\.cat"):
        opt.step(lambda: (model(x)[:, :1], y.clamp(max=0)))
    with pytest.raises(ValueError, match=r"logits must have shape \(B, K\)"):
        opt.step(lambda: (model(x)[:, 0], y))
    with pytest.raises(ValueError, match=r"logits must have shape \(B, K\) with B >= 1"):
        opt.step(lambda: (model(x)[:0], y[:0]))
    with pytest.raises(ValueError, match="logits does not require grad"):
        opt.step(lambda: (model(x).detach(), y))
    with pytest.raises(TypeError, match=r"\(logits, labels\) as tensors"):
        opt.step(lambda: (model(x), [0, 1, 0]))
    with pytest.raises(ValueError, match="put them on one device"):
        opt.step(lambda: (model(x), y.to("meta")))
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        opt.step(lambda: (torch.randn(3, 4, dtype=F64, requires_grad=True), y))
    assert opt.steps_taken == 0


def test_bad_settings_raise_clearly():
    params = lambda: nn.Linear(3, 4).parameters()     # noqa: E731
    with pytest.raises(ValueError, match=r"scalar obs_noise.*shape \(6, 6\)"):
        kk.KalmanNGD(params(), likelihood="categorical", obs_noise=torch.eye(6))
    with pytest.raises(ValueError, match=r"scalar obs_noise.*shape \(6,\)"):
        kk.KalmanNGD(params(), likelihood="categorical", obs_noise=torch.ones(6))
    with pytest.raises(ValueError, match="adaptive_obs_noise cannot be used"):
        kk.KalmanNGD(params(), likelihood="categorical", adaptive_obs_noise=0.1)
    with pytest.raises(ValueError, match="max_obs_per_update cannot be used"):
        kk.KalmanNGD(params(), likelihood="categorical", max_obs_per_update=8)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        kk.KalmanNGD(params(), likelihood="softmax")
    with pytest.raises(ValueError, match="finite number > 0"):
        kk.KalmanNGD(params(), likelihood="categorical", obs_noise=-1.0)
    with pytest.raises(ValueError, match="likelihood belongs to the observation"):
        kk.KalmanNGD([{"params": params(), "likelihood": "categorical"}])
    # the Gaussian likelihood keeps its (m,) / (m, m) noise and adaptive noise
    kk.KalmanNGD(params(), obs_noise=torch.ones(6), adaptive_obs_noise=0.0)
    kk.KalmanNGD(params(), adaptive_obs_noise=0.1)


# ====================================================================== two ranks
DIST_STEPS = 3
DIST_NAN_STEP = 1


def _dist_batch(seed, rank, step, k=3):
    gen = torch.Generator().manual_seed(seed * 1000 + step * 10 + rank)
    return _batches(gen, k, [(2 + rank, "labels" if step % 2 == 0 else "soft")])[0]


def _dist_model(seed, k=3):
    return _model("mlp", k, torch.Generator().manual_seed(seed), d=5, hidden=4)


def _dist_worker(rank, world, seed):
    import torch.distributed as dist
    model = _dist_model(seed)
    opt = kk.KalmanNGD(model.parameters(), likelihood="categorical", obs_noise=0.8,
                       process_group=dist.group.WORLD, **HYPER)
    opt.track(model)
    for step in range(DIST_STEPS):
        x, y = _dist_batch(seed, rank, step)
        if step == DIST_NAN_STEP and rank == world - 1:
            x = torch.full_like(x, float("nan"))     # every rank must skip this step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step(lambda: (model(x), y))
    return {"params": [p.detach().clone() for p in model.parameters()],
            "covs": [opt.covariance(p).clone() for p in model.parameters()],
            "skipped": opt.skipped_steps}


def _dist_emulation(seed, world):
    """The block-diagonal update over the ranks: u = sum_r H_r^T S_r^-1 e_r and
    d = sum_r diag(H_r^T S_r^-1 H_r), each rank's terms from its own drop-one-class
    observation (the oracle above, one rank at a time)."""
    model = _dist_model(seed)
    mu = _flat(model.parameters())
    cov = torch.full_like(mu, HYPER["init_cov"])
    lr, lam, q = HYPER["lr"], HYPER["forgetting"], HYPER["process_noise"]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def probs(theta, x):
        ps = {n: t.reshape(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return torch.softmax(torch.func.functional_call(model, ps, (x,)), 1)

    for step in range(DIST_STEPS):
        if step == DIST_NAN_STEP:
            continue
        p_pred = cov / lam + q
        u, d = torch.zeros_like(mu), torch.zeros_like(mu)
        for rank in range(world):
            x, y = _dist_batch(seed, rank, step)
            p = probs(mu, x)
            k = p.shape[1]
            y = F.one_hot(y, k).to(F64) if y.dim() == 1 else y
            h = torch.func.jacrev(lambda th: probs(th, x)[:, :k - 1].reshape(-1))(mu)
            e = (y - p)[:, :k - 1].reshape(-1)
            r = torch.block_diag(*[0.8 * (torch.diag(v) - torch.outer(v, v))
                                   for v in p[:, :k - 1]])
            s_inv = torch.linalg.inv(h @ (p_pred[:, None] * h.T) + r)
            u += h.T @ (s_inv @ e)
            d += torch.einsum("ji,jk,ki->i", h, s_inv, h)
        mu = mu + lr * p_pred * u
        cov = (p_pred - p_pred ** 2 * d).clamp_min(HYPER["cov_floor"])
    return mu, cov


def test_two_gloo_ranks_apply_one_identical_update():
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    seed, world = draw_seed(20), 2
    results = run_on_gloo_ranks(_dist_worker, world, seed, timeout_s=60)
    for a, b in zip(results[0]["params"] + results[0]["covs"],
                    results[1]["params"] + results[1]["covs"]):
        assert torch.equal(a, b), f"seed {seed}"               # bit for bit across ranks
    mu, cov = _dist_emulation(seed, world)
    assert rel_err(_flat(results[0]["params"]), mu) <= TOL, f"seed {seed}"
    assert rel_err(_flat(results[0]["covs"]), cov) <= TOL, f"seed {seed}"
    assert results[0]["skipped"] == 1 and results[1]["skipped"] == 1
