"""KalmanNGD: modes, tracking, param groups, schedulers, state_dict, sampling, bad input."""
import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import kalman_kernels as kk
from conftest import rel_err
from oracle_numpy import kalman_step, loss_step


def _regression(rng, n_samples=256, d=5, noise=0.05):
    x = torch.tensor(rng.standard_normal((n_samples, d)))
    w = torch.tensor(rng.standard_normal(d))
    y = x @ w + 0.3 + noise * torch.tensor(rng.standard_normal(n_samples))
    return x, y, w


def _flat(tensors):
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in tensors])


def test_batch_step_equals_oracle_with_autograd_jacobian(rng):
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    finally:
        torch.set_default_dtype(torch.float32)
    x = torch.tensor(rng.standard_normal((6, 4)))
    t = torch.tensor(rng.standard_normal((6, 2)))
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    # An independent Jacobian: torch.func over the functional model.
    jac = torch.func.jacrev(lambda *ps: torch.func.functional_call(
        model, dict(zip(names, ps)), (x,)).reshape(-1), argnums=tuple(range(len(params))))(*params)
    h = np.concatenate([j.detach().reshape(12, -1).numpy() for j in jac], 1)
    e = (t - model(x)).detach().reshape(-1).numpy()
    mu0 = _flat(params)
    mu_exp, p_exp, _, _, _ = kalman_step(mu0, np.full(mu0.size, 0.05), h, e, 0.2, lr=0.8,
                                         lam=0.99, q=1e-4, p_min=1e-12)
    opt = kk.KalmanNGD(model.parameters(), lr=0.8, init_cov=0.05, obs_noise=0.2,
                       forgetting=0.99, process_noise=1e-4)
    opt.step(lambda: (model(x), t))
    assert rel_err(_flat(params), mu_exp) <= 1e-10
    assert rel_err(_flat([opt.covariance(p) for p in params]), p_exp) <= 1e-10
    assert opt.last_info.num_obs == 12 and not opt.last_info.skipped


def test_loss_mode_equals_oracle(rng):
    model = nn.Linear(3, 2).double()
    x = torch.tensor(rng.standard_normal((8, 3)))
    y = torch.tensor(rng.standard_normal((8, 2)))
    params = list(model.parameters())
    loss = ((model(x) - y) ** 2).mean()
    g = _flat(torch.autograd.grad(loss, params))
    mu0 = _flat(params)
    mu_exp, p_exp, _, _ = loss_step(mu0, np.full(mu0.size, 0.1), g, float(loss.detach()), 0.05,
                                    lr=0.5, p_min=1e-12)
    opt = kk.KalmanNGD(model.parameters(), lr=0.5, init_cov=0.1, obs_noise=0.05)
    returned = opt.step(lambda: ((model(x) - y) ** 2).mean())
    assert float(returned) == pytest.approx(float(loss.detach()))
    assert rel_err(_flat(params), mu_exp) <= 1e-10
    assert rel_err(_flat([opt.covariance(p) for p in params]), p_exp) <= 1e-10
    assert all(p.grad is None for p in params)      # the optimizer does not touch .grad


def test_drives_least_squares_to_solution_and_covariance_shrinks(rng):
    x, y, w = _regression(rng)
    model = nn.Linear(5, 1).double()
    opt = kk.KalmanNGD(model.parameters(), init_cov=1.0, obs_noise=0.05 ** 2)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(design, y[:, None]).solution
    cov_max = [float(opt.covariance(model.weight).max())]
    for _epoch in range(3):
        for i in range(0, 256, 32):
            opt.step(lambda: (model(x[i:i + 32]).squeeze(-1), y[i:i + 32]))
            cov_max.append(float(opt.covariance(model.weight).max()))
    assert rel_err(model.weight.detach()[0], sol[:5, 0]) < 1e-2
    assert abs(float(model.bias.detach()) - float(sol[5])) < 1e-2
    assert all(b <= a * (1 + 1e-12) for a, b in zip(cov_max, cov_max[1:]))   # monotone
    assert cov_max[-1] < 1e-2 * cov_max[0]


def test_loss_mode_decreases_loss(rng):
    x, y, _ = _regression(rng)
    model = nn.Linear(5, 1)
    xf, yf = x.float(), y.float()
    opt = kk.KalmanNGD(model.parameters(), init_cov=0.1, obs_noise=1e-2, process_noise=1e-4)
    first = float(opt.step(lambda: ((model(xf).squeeze(-1) - yf) ** 2).mean()))
    for _ in range(150):
        last = float(opt.step(lambda: ((model(xf).squeeze(-1) - yf) ** 2).mean()))
    assert last < 0.05 * first


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)))


@pytest.mark.parametrize("target_shape", ["logits", "scalar"])
def test_tracked_kronecker_step_equals_dense_step(rng, target_shape):
    torch.set_default_dtype(torch.float64)
    try:
        dense, kron = _TwoLayer(), _TwoLayer()
    finally:
        torch.set_default_dtype(torch.float32)
    kron.load_state_dict(dense.state_dict())
    opt_d = kk.KalmanNGD(dense.parameters(), init_cov=0.05, obs_noise=0.1, forgetting=0.98)
    opt_k = kk.KalmanNGD(kron.parameters(), init_cov=0.05, obs_noise=0.1, forgetting=0.98)
    opt_k.track(kron)
    for _ in range(4):
        x = torch.tensor(rng.standard_normal((7, 6)))
        t = torch.tensor(rng.standard_normal((7, 3)))
        if target_shape == "logits":
            opt_d.step(lambda: (dense(x), t))
            opt_k.step(lambda: (kron(x), t))
        else:
            opt_d.step(lambda: (dense(x).sum(1), t[:, 0]))
            opt_k.step(lambda: (kron(x).sum(1), t[:, 0]))
    for (name, a), b in zip(dense.named_parameters(), kron.parameters()):
        assert rel_err(b, a) <= 1e-10, name
        assert rel_err(opt_k.covariance(b), opt_d.covariance(a)) <= 1e-10, name


def test_track_rejects_cross_sample_dependence():
    model = nn.Linear(4, 2)
    opt = kk.KalmanNGD(model.parameters()).track(model)
    x = torch.randn(5, 4)
    def centred():
        out = model(x)
        return out - out.mean(0, keepdim=True), torch.zeros(5, 2)

    # Each observation mixes every sample's output: not a Kronecker block.
    with pytest.raises(ValueError, match="another sample"):
        opt.step(centred)
    # A layer called twice per closure is not one Kronecker block: dense fallback, warned.
    with pytest.warns(RuntimeWarning, match="called 2 times"):
        opt.step(lambda: (model(x) + model(2 * x), torch.zeros(5, 2)))
    assert opt.state["filter"]["steps"] == 1
    with pytest.raises(ValueError, match="no nn.Linear"):
        opt.track(nn.ReLU())


def test_param_groups_have_their_own_step_scale(rng):
    def run(lr_b):
        torch.manual_seed(0)
        model = _TwoLayer()
        opt = kk.KalmanNGD([{"params": model.hidden.parameters()},
                            {"params": model.head.parameters(), "lr": lr_b, "init_cov": 0.02}],
                           init_cov=0.05, obs_noise=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(1)
        x, t = torch.randn(4, 6), torch.randn(4, 3)
        opt.step(lambda: (model(x), t))
        return [p.detach() - b for p, b in zip(model.parameters(), before)], opt, model
    full, _, _ = run(1.0)
    half, opt, model = run(0.5)
    # S does not depend on lr: the head's step halves, the hidden layer's is unchanged.
    assert rel_err(half[0], full[0]) <= 1e-5 and rel_err(half[1], full[1]) <= 1e-5
    assert rel_err(half[2], 0.5 * full[2]) <= 1e-5 and rel_err(half[3], 0.5 * full[3]) <= 1e-5
    assert float(opt.covariance(model.head.weight).max()) <= 0.02
    with pytest.raises(ValueError, match="obs_noise belongs to the observation"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "obs_noise": 0.3})


def test_lr_scheduler_drives_the_step_scale():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = kk.KalmanNGD(model.parameters(), lr=1.0, init_cov=0.1, obs_noise=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    assert opt.param_groups[0]["lr"] == 1.0
    opt.step(lambda: (model(torch.randn(4, 3)).squeeze(-1), torch.randn(4)))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    # The next step uses lr = 0.1: compare with a fresh functional step at lr 0.1.
    x, t = torch.randn(4, 3), torch.randn(4)
    shadow = copy.deepcopy(model)
    shadow_opt = kk.KalmanNGD(shadow.parameters(), lr=0.1, init_cov=0.1, obs_noise=0.1)
    shadow_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.step(lambda: (model(x).squeeze(-1), t))
    shadow_opt.step(lambda: (shadow(x).squeeze(-1), t))
    for a, b in zip(model.parameters(), shadow.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_exact_resume_through_file(rng, dtype):
    seed = int(rng.integers(1 << 30))
    data_gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(8, 4, generator=data_gen).to(dtype),
                torch.randn(8, 2, generator=data_gen).to(dtype)) for _ in range(10)]

    def fresh():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)
        opt = kk.KalmanNGD(model.parameters(), init_cov=0.05, obs_noise=0.1,
                           adaptive_obs_noise=0.2, gate=0.999, forgetting=0.99,
                           process_noise=1e-5)
        opt.track(model)
        return model, opt

    def run(model, opt, part):
        for x, t in part:
            opt.step(lambda: (model(x), t))

    straight, opt_s = fresh()
    run(straight, opt_s, batches)

    first, opt_1 = fresh()
    run(first, opt_1, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu")
    second, opt_2 = fresh()
    second.load_state_dict(saved["model"])
    opt_2.load_state_dict(saved["opt"])
    for p in second.parameters():
        assert opt_2.covariance(p).dtype == torch.float32     # not cast to the bf16 param dtype
    run(second, opt_2, batches[4:])
    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt_s.covariance(a), opt_2.covariance(b))
    assert opt_s.state["filter"] == opt_2.state["filter"]
    assert opt_s.state["filter"]["obs_noise"] != 0.1      # the adaptive noise was resumed


def test_sampled_params_draws_from_posterior_and_restores():
    model = nn.Linear(20, 10)
    opt = kk.KalmanNGD(model.parameters(), init_cov=0.04)
    with torch.no_grad():
        opt.covariance(model.weight).uniform_(0.01, 0.09)
    mean = model.weight.detach().clone()
    gen = torch.Generator().manual_seed(123)
    draws = []
    for _ in range(400):
        with opt.sampled_params(generator=gen):
            draws.append(model.weight.detach().clone())
        assert torch.equal(model.weight, mean)
    draws = torch.stack(draws)
    var = draws.var(0)
    ratio = var / opt.covariance(model.weight)
    assert 0.75 < float(ratio.median()) < 1.25
    assert float((draws.mean(0) - mean).abs().max()) < 0.1
    with pytest.raises(RuntimeError):
        with opt.sampled_params():
            raise RuntimeError("boom")
    assert torch.equal(model.weight, mean)


def test_non_finite_prediction_skips_counts_and_warns_once():
    model = nn.Linear(3, 2)
    opt = kk.KalmanNGD(model.parameters(), init_cov=0.1)
    opt.step(lambda: (model(torch.randn(4, 3)), torch.randn(4, 2)))
    before = [p.detach().clone() for p in model.parameters()]
    covs = [opt.covariance(p).clone() for p in model.parameters()]
    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(lambda: (model(x), torch.randn(4, 2)))
        opt.step(lambda: (model(torch.randn(4, 3)), torch.full((4, 2), float("inf"))))
        opt.step(lambda: model(x).sum())                          # loss mode, NaN loss
    assert sum("skipped" in str(w.message) for w in caught) == 1
    assert opt.skipped_steps == 3 and opt.state["filter"]["steps"] == 1
    for p, b, c in zip(model.parameters(), before, covs):
        assert torch.equal(p, b) and torch.equal(opt.covariance(p), c)


def test_bf16_and_fp16_parameters_train_with_float32_covariance(rng):
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        model = nn.Linear(4, 1).to(dtype)
        x = torch.randn(64, 4).to(dtype)
        y = (x.float() @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.2).to(dtype)
        opt = kk.KalmanNGD(model.parameters(), init_cov=1.0, obs_noise=1e-2)
        mse = lambda: float(((model(x).squeeze(-1) - y).float() ** 2).mean().detach())
        first = mse()
        for i in range(0, 64, 16):
            opt.step(lambda: (model(x[i:i + 16]).squeeze(-1), y[i:i + 16]))
        last = mse()
        assert last < 0.05 * first
        assert all(opt.covariance(p).dtype == torch.float32 for p in model.parameters())
        assert model.weight.dtype == dtype


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0.0}, "lr must be"), ({"lr": -1.0}, "lr must be"),
    ({"init_cov": 0.0}, "init_cov must be"), ({"init_cov": -1e-3}, "init_cov must be"),
    ({"obs_noise": 0.0}, "obs_noise must be"), ({"obs_noise": -0.1}, "obs_noise must be"),
    ({"forgetting": 0.0}, "forgetting must be in"), ({"forgetting": 1.01}, "forgetting must be in"),
    ({"process_noise": -1.0}, "process_noise must be"),
    ({"cov_floor": 1.0, "cov_ceiling": 0.1}, "cov_floor"),
    ({"adaptive_obs_noise": 2.0}, "adaptive_obs_noise"),
    ({"gate": 0.0}, "gate must be"), ({"cov_update": "ekf"}, "cov_update must be"),
    ({"backend": "nope"}, "backend must be one of"),
])
def test_bad_constructor_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kk.KalmanNGD(nn.Linear(2, 2).parameters(), **kwargs)


def test_bad_closures_are_named():
    model = nn.Linear(3, 2)
    opt = kk.KalmanNGD(model.parameters())
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"got no closure and no loss was observed"):
        opt.step()
    with pytest.raises(ValueError, match="pred has shape .* but target has shape"):
        opt.step(lambda: (model(x), torch.zeros(4, 3)))
    with pytest.raises(TypeError, match="closure must return"):
        opt.step(lambda: "loss")
    with pytest.raises(TypeError, match=r"loss of shape \(4, 2\).*must be a scalar"):
        opt.step(lambda: model(x))                     # a (4, 2) tensor, not a scalar
    with pytest.raises(ValueError, match="does not require grad"):
        opt.step(lambda: (model(x).detach(), torch.zeros(4, 2)))
    with pytest.raises(ValueError, match="one device"):
        opt.step(lambda: (model(x), torch.zeros(4, 2, device="meta")))
    assert opt.state["filter"]["steps"] == 0


def test_unavailable_backend_fails_at_construction_with_reason():
    for name, ok in kk.backends().items():
        if not ok:
            with pytest.raises(RuntimeError, match="not available"):
                kk.KalmanNGD(nn.Linear(2, 2).parameters(), backend=name)


def test_reduce_in_backward_equals_the_two_pass_loss_step(rng):
    x = torch.tensor(rng.standard_normal((16, 3)))
    y = torch.tensor(rng.standard_normal((16, 2)))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    fused = copy.deepcopy(plain)
    opt_p = kk.KalmanNGD(plain.parameters(), init_cov=0.1, obs_noise=0.05, forgetting=0.97,
                         process_noise=1e-4)
    opt_f = kk.KalmanNGD(fused.parameters(), init_cov=0.1, obs_noise=0.05, forgetting=0.97,
                         process_noise=1e-4)        # single pass by default

    def fused_closure():
        fused.zero_grad()
        loss = ((fused(x) - y) ** 2).mean()
        loss.backward()
        return loss.detach()

    for _ in range(5):
        opt_p.step(lambda: ((plain(x) - y) ** 2).mean())
        opt_f.step(fused_closure)
        # the hooks, not a recomputation, gave g^T P g
        assert opt_f.diagnostics()["loss_reduction"] == "in-backward"
        assert opt_p.diagnostics()["loss_reduction"].startswith("two-pass: the closure")
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert rel_err(b, a) <= 1e-12
        assert rel_err(opt_f.covariance(b), opt_p.covariance(a)) <= 1e-12

    def accumulated_closure():        # two backward passes: the hook sums are not g^T P g
        fused.zero_grad()
        for half in (slice(0, 8), slice(8, 16)):
            (((fused(x[half]) - y[half]) ** 2).mean() / 2).backward()
        return (((fused(x) - y) ** 2).mean()).detach()

    shadow = copy.deepcopy(fused)
    shadow_opt = kk.KalmanNGD(shadow.parameters(), init_cov=0.1, obs_noise=0.05,
                              forgetting=0.97, process_noise=1e-4)
    shadow_opt.load_state_dict(copy.deepcopy(opt_f.state_dict()))
    opt_f.step(accumulated_closure)
    assert opt_f.diagnostics()["loss_reduction"] == \
        "two-pass: several backward passes (gradient accumulation)"
    shadow_opt.step(lambda: ((shadow(x) - y) ** 2).mean())
    for a, b in zip(shadow.parameters(), fused.parameters()):
        assert rel_err(b, a) <= 1e-10


@pytest.mark.parametrize("reduce_in_backward", [False, True], ids=["two-pass", "hooked"])
def test_the_three_loss_closures_give_the_same_step(rng, reduce_in_backward):
    """torch.optim's closure (zero_grad, backward, return the loss), the same returning
    loss.detach(), and a closure returning the loss with its graph (KalmanNGD
    differentiates it) give identical parameters and covariances, with and without
    reduce_in_backward(), and all equal the oracle."""
    x = torch.tensor(rng.standard_normal((16, 5)))
    y = torch.tensor(rng.standard_normal((16, 1)))
    base = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    results = []
    for form in ("standard", "detached", "graph"):
        model = copy.deepcopy(base)
        opt = kk.KalmanNGD(model.parameters(), init_cov=0.05, obs_noise=0.3)
        opt.reduce_in_backward(reduce_in_backward)

        def closure(form=form, model=model, opt=opt):
            if form == "graph":
                return (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss if form == "standard" else loss.detach()

        for _ in range(3):
            opt.step(closure)
        path = opt.diagnostics()["loss_reduction"]
        assert (path == "in-backward") == (reduce_in_backward and form != "graph"), path
        results.append([t.detach().clone() for t in model.parameters()] +
                       [opt.covariance(p).clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert rel_err(b, a) <= 1e-12
    # and the first step equals the loss-mode oracle (docs/design.md, 2.2)
    model = copy.deepcopy(base)
    opt = kk.KalmanNGD(model.parameters(), init_cov=0.05, obs_noise=0.3)

    def standard():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    loss = (base(x) - y).pow(2).mean()
    g = torch.autograd.grad(loss, list(base.parameters()))
    n_params = sum(p.numel() for p in base.parameters())
    mu_new, p_new, _, _ = loss_step(_flat(base.parameters()), np.full(n_params, 0.05),
                                    _flat(g), float(loss.detach()), 0.3)
    opt.step(standard)
    assert rel_err(_flat(model.parameters()), mu_new) <= 1e-12
    assert rel_err(_flat([opt.covariance(p) for p in model.parameters()]), p_new) <= 1e-12


def test_gradient_accumulation_in_the_closure_is_the_accumulated_gradient(rng):
    """Two backward passes in one closure: the step uses the summed .grad (as torch.optim
    would), and the loss step sums g^T P g after backward (two passes, detected)."""
    model = nn.Linear(3, 1).double()
    opt = kk.KalmanNGD(model.parameters(), init_cov=0.1, obs_noise=0.5)
    xs = [torch.tensor(rng.standard_normal((4, 3))) for _ in range(2)]

    def closure():
        opt.zero_grad()
        total = 0.0
        for x in xs:
            loss = model(x).pow(2).mean()
            loss.backward()
            total = total + loss.detach()
        return total

    ref_model = copy.deepcopy(model)
    total = sum(ref_model(x).pow(2).mean() for x in xs)
    g = torch.autograd.grad(total, list(ref_model.parameters()))
    mu_new, p_new, _, _ = loss_step(_flat(ref_model.parameters()), np.full(4, 0.1), _flat(g),
                                    float(total.detach()), 0.5)
    opt.step(closure)
    assert opt.diagnostics()["loss_reduction"].startswith("two-pass: several backward")
    assert rel_err(_flat(model.parameters()), mu_new) <= 1e-12
    assert rel_err(_flat([opt.covariance(p) for p in model.parameters()]), p_new) <= 1e-12


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("adaptive", [0.0, 0.5])
def test_a_loss_step_whose_elementwise_pass_raises_leaves_every_counter_unchanged(
        monkeypatch, backend, adaptive):
    """On eager CPU the loss step records its outcome (counters, last_info, the adapted
    noise) before the elementwise pass, so that nothing but the return follows the pass;
    if that pass raises, the record is taken back and the state is as before the step."""
    from kalman_kernels.backends import resolve

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))
    opt = kk.KalmanNGD(model.parameters(), obs_noise=0.1, adaptive_obs_noise=adaptive,
                       gate=0.9, backend=backend)
    x = torch.randn(8, 5)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)
    before = opt.state_dict()
    params0 = [p.detach().clone() for p in model.parameters()]
    info0, steps0, skipped0 = opt.last_info, opt.steps_taken, opt.skipped_steps
    kernels = resolve(backend, torch.device("cpu"))

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault in loss_step_")

    monkeypatch.setattr(kernels, "loss_step_", broken)
    with pytest.raises(RuntimeError, match="injected fault"):
        opt.step(closure)
    assert opt.last_info is info0
    assert (opt.steps_taken, opt.skipped_steps) == (steps0, skipped0)
    after = opt.state_dict()
    assert after["state"][0]["kalman_filter"].keys() == before["state"][0]["kalman_filter"].keys()
    for key, value in before["state"][0]["kalman_filter"].items():
        assert torch.equal(torch.as_tensor(after["state"][0]["kalman_filter"][key]),
                           torch.as_tensor(value)), key
    for p, p0 in zip(model.parameters(), params0):
        assert torch.equal(p.detach(), p0)
    monkeypatch.undo()
    opt.step(closure)                      # and the next step goes on from there
    assert opt.steps_taken == steps0 + 1


@pytest.mark.parametrize("branch", ["host", "device"])
@pytest.mark.parametrize("gated", [False, True])
def test_filter_state_record_undo_restores_the_state_bit_for_bit(monkeypatch, branch, gated):
    """FilterState.record counts a step on either branch (host counters through numpy
    views on eager CPU; device tensor adds elsewhere, here forced) and its undo leaves the
    counters, the adapted noise and last_info exactly as before."""
    import kalman_kernels.functional as fn
    from kalman_kernels.ops import KalmanInfo

    if branch == "device":
        monkeypatch.setattr(fn, "readable_now", lambda t: False)
    state = fn.FilterState()
    state.reset("cpu", 0.1)
    state.adaptive = True
    for key in fn.COUNTERS:
        state.tensors[key].fill_(int(torch.randint(0, 50, ())))
    before = {k: v.clone() for k, v in state.tensors.items()}
    previous = state.last_info
    f64 = torch.float64
    info = KalmanInfo(mahalanobis=torch.tensor(3.0, dtype=f64),
                      gate_scale=torch.tensor(0.5 if gated else 1.0, dtype=f64),
                      skipped=torch.tensor(False), obs_noise=torch.tensor(0.3, dtype=f64),
                      cov_clamps=torch.tensor(7))
    with pytest.warns(RuntimeWarning, match="clamped to cov_floor"):
        undo = state.record(info)
    assert state.last_info is info and int(state.tensors["steps"]) == int(before["steps"]) + 1
    assert int(state.tensors["gated_steps"]) == int(before["gated_steps"]) + gated
    assert int(state.tensors["cov_clamps"]) == int(before["cov_clamps"]) + 7
    assert float(state.tensors["obs_noise"]) == 0.3
    undo()
    assert state.last_info is previous
    assert state.tensors.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(state.tensors[key], value), key


def test_loss_steps_without_numpy_views_match_the_numpy_path(monkeypatch):
    """On eager CPU the loss step writes its kernel scalars and counters through numpy
    views; a torch built without numpy falls back to torch ops with the same result."""
    import kalman_kernels.functional as fn
    import kalman_kernels.ops.loss_update as lu

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    base = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))
    data = [(torch.randn(9, 7), torch.randn(9, 1)) for _ in range(6)]

    def train():
        model = copy.deepcopy(base)
        opt = kk.KalmanNGD(model.parameters(), init_cov=1e-2, obs_noise=0.1, gate=0.99)
        for x, y in data:
            def closure():
                opt.zero_grad()
                loss = (model(x) - y).pow(2).mean()
                loss.backward()
                return loss
            opt.step(closure)
        return [p.detach().clone() for p in model.parameters()], opt

    params_np, opt_np = train()
    monkeypatch.setattr(lu, "numpy_view", lambda t: None)
    monkeypatch.setattr(lu, "_host_scalars", lu._HostScalarSlots())
    monkeypatch.setattr(fn, "numpy_view", lambda t: None)
    params_torch, opt_torch = train()
    for a, b in zip(params_np, params_torch):
        assert torch.equal(a, b)
    assert opt_np.steps_taken == opt_torch.steps_taken == len(data)
    assert opt_np.diagnostics()["gated_steps"] == opt_torch.diagnostics()["gated_steps"]
    assert opt_np.last_info.mahalanobis == opt_torch.last_info.mahalanobis
    # each run took the path it names
    assert isinstance(opt_np._filter._views["steps"][1], np.ndarray)
    assert isinstance(opt_torch._filter._views["steps"][1], torch.Tensor)
    assert all(v is None for v in lu._host_scalars.views)


def test_small_lr_warns_once_with_the_fix_and_default_construction_is_silent():
    model = nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # any warning fails the test
        kk.KalmanNGD(model.parameters())
        kk.KalmanNGD(model.parameters(), lr=1.0)
        kk.KalmanNGD(model.parameters(), lr=kk.optimizer.SMALL_LR)
        kk.KalmanNGD(model.parameters(), likelihood="categorical")
    with pytest.warns(UserWarning, match=r"lr=0\.001 .*step scale.*init_cov") as caught:
        opt = kk.KalmanNGD(model.parameters(), lr=1e-3)
    assert caught[0].filename == __file__                  # points at the user's line
    with warnings.catch_warnings(record=True) as again:    # once per optimizer
        warnings.simplefilter("always")
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": 1e-4})
        opt.step(lambda: (model(torch.randn(4, 3)), torch.randn(4, 2)))
    assert not [w for w in again if "step scale" in str(w.message)]


def test_small_lr_from_a_scheduler_or_param_group_warns_at_the_step():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    opt = kk.KalmanNGD(model.parameters())
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1e-3)
    with pytest.warns(UserWarning, match="step scale"):
        opt.step(lambda: (model(x), y))
    with pytest.warns(UserWarning, match=r"lr=0\.01 \(param group 1\)"):
        kk.KalmanNGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.01}])
    opt = kk.KalmanNGD(model.parameters())
    opt.param_groups[0]["lr"] = 0.02
    with pytest.warns(UserWarning, match=r"lr=0\.02 \(param group 0\)"):
        opt.step(lambda: (model(x), y))
