"""KalmanNGD in the training loops people use (README, "Using KalmanNGD with trainers"):
a plain loop (closure or observe()), gradient accumulation, clipping, torch.amp (bf16
autocast, GradScaler), PyTorch Lightning and Hugging Face Trainer; and the closure's return
kinds. Every run is compared with the float64 loss-mode oracle (docs/design.md, 2.2) fed
with the loss and gradient that the step should observe."""
import copy
import importlib.util
import tempfile
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import kalman_kernels as kk
from conftest import rel_err
from oracle_numpy import loss_step

INIT_COV, R = 0.05, 0.3


def _loss_step_diag(mu, prior, g, loss, r):
    """docs/design.md, 2.2 in float64 numpy, elementwise (for sizes where the full-matrix
    oracle, oracle_numpy.loss_step, would not fit): S = g^T P- g + r, e = -L,
    mu += P- g e / S, P = P- - P-^2 g^2 / S; ``prior`` is P- (after the predict step)."""
    s = float(np.sum(g * g * prior)) + r
    return mu + prior * g * (-loss) / s, prior - prior ** 2 * g ** 2 / s


def _flat(tensors):
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in tensors])


def _net(d=5, h=3, dtype=torch.float64):
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 1)).to(dtype)


def _mse(model, x, y):
    return (model(x) - y).pow(2).mean()


class Oracle:
    """The float64 loss-mode filter over a copy of the model: ``step(losses)`` observes the
    sum of the given loss closures (each a function of the model) and its gradient."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).double()
        self.cov = np.full(sum(p.numel() for p in self.model.parameters()), INIT_COV)

    def step(self, *loss_fns, transform=None):
        params = list(self.model.parameters())
        total = sum(fn(self.model) for fn in loss_fns)
        g = torch.autograd.grad(total, params)
        if transform is not None:
            g = transform(g)
        mu, self.cov, _, _ = loss_step(_flat(params), self.cov, _flat(g),
                                       float(total.detach()), R)
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(torch.from_numpy(mu[offset:offset + p.numel()]).reshape(p.shape))
                offset += p.numel()

    def check(self, model, opt, tol=1e-10):
        assert rel_err(_flat(model.parameters()), _flat(self.model.parameters())) <= tol
        assert rel_err(_flat([opt.covariance(p) for p in model.parameters()]), self.cov) <= tol


def _batches(n, size=4, d=5, dtype=torch.float64):
    return [(torch.randn(size, d, dtype=dtype), torch.randn(size, 1, dtype=dtype))
            for _ in range(n)]


def _path(opt):
    return opt.diagnostics()["loss_reduction"]


# ---------------------------------------------------------------------- (a) a plain loop
def test_plain_loop_closure_and_observe_equal_the_oracle_single_pass():
    """torch.optim's closure and observe() + step() give the oracle's step, both through
    the single-pass reduction (one backward per step)."""
    base = _net()
    batches = _batches(4)
    oracle = Oracle(base)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    o1 = kk.KalmanNGD(m1.parameters(), init_cov=INIT_COV, obs_noise=R)
    o2 = kk.KalmanNGD(m2.parameters(), init_cov=INIT_COV, obs_noise=R)
    for x, y in batches:
        def closure():
            o1.zero_grad()
            loss = _mse(m1, x, y)
            loss.backward()
            return loss
        o1.step(closure)
        assert _path(o1) == "in-backward"
        o2.zero_grad()
        loss = _mse(m2, x, y)
        loss.backward()
        o2.observe(loss).step()
        oracle.step(lambda m: _mse(m, x, y))
    assert _path(o2) == "in-backward"      # from the second step on (hooks installed)
    oracle.check(m1, o1)
    oracle.check(m2, o2)


def test_step_without_closure_or_observation_names_the_fix():
    model = _net()
    opt = kk.KalmanNGD(model.parameters())
    _mse(model, *_batches(1)[0]).backward()
    with pytest.raises(ValueError, match=r"observe\(loss\).*KalmanTrainer.*KalmanObserveLoss"):
        opt.step()


def test_observe_checks_its_argument():
    model = _net()
    opt = kk.KalmanNGD(model.parameters())
    with pytest.raises(TypeError, match="loss tensor you called backward on"):
        opt.observe(0.5)
    with pytest.raises(TypeError, match="1-element floating"):
        opt.observe(torch.ones(3))
    with pytest.raises(TypeError, match="1-element floating"):
        opt.observe(torch.tensor(1))
    # observed, but zero_grad() drops the gradients and the observation with them
    loss = _mse(model, *_batches(1)[0])
    loss.backward()
    opt.observe(loss)
    opt.zero_grad()
    with pytest.raises(ValueError, match="no loss was observed"):
        opt.step()
    # observed without any gradient
    opt.observe(loss.detach())
    with pytest.raises(ValueError, match="no parameter of this optimizer has a gradient"):
        opt.step()


# ---------------------------------------------------------------------- closure return kinds
def _closure(model, opt, x, y, kind):
    def closure():
        if kind == "graph":
            return _mse(model, x, y)                  # KalmanNGD differentiates it
        opt.zero_grad()
        loss = _mse(model, x, y)
        loss.backward()
        if kind == "tensor":
            return loss
        if kind == "detached":
            return loss.detach()                      # a 0-d tensor without grad
        if kind == "numpy":
            return np.float64(loss.item())            # a NumPy number after backward
        return loss.item()                            # a Python number after backward
    return closure


@pytest.mark.parametrize("kind", ["tensor", "detached", "number", "numpy", "graph"])
def test_closure_return_kinds_equal_the_oracle(kind):
    base = _net()
    model = copy.deepcopy(base)
    opt = kk.KalmanNGD(model.parameters(), init_cov=INIT_COV, obs_noise=R)
    oracle = Oracle(base)
    for x, y in _batches(3):
        out = opt.step(_closure(model, opt, x, y, kind))
        assert isinstance(out, torch.Tensor) and out.numel() == 1
        oracle.step(lambda m: _mse(m, x, y))
    oracle.check(model, opt)


def test_closure_return_kinds_that_are_refused_or_do_nothing():
    model = _net()
    opt = kk.KalmanNGD(model.parameters(), init_cov=INIT_COV, obs_noise=R)
    x, y = _batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"Python number .* no backward.*loss\.backward\(\)"):
        opt.step(lambda: _mse(model, x, y).detach().item())
    with pytest.raises(TypeError, match="closure must return"):
        opt.step(lambda: True)
    with pytest.raises(ValueError, match="does not require grad"):
        opt.step(lambda: _mse(model, x, y).detach())

    def backward_then_none():
        _mse(model, x, y).backward()
    with pytest.raises(TypeError, match="returned None"):
        opt.step(backward_then_none)
    # None without backward: nothing observed, nothing changes (as torch.optim without grads)
    assert opt.step(lambda: None) is None
    assert opt.steps_taken == 0
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_a_copied_tape_starts_empty():
    """copy.deepcopy / pickle of the backward hooks' record between steps (it holds weak
    references to live gradients): the copy keeps the switch and starts empty."""
    import pickle
    model = _net()
    opt = kk.KalmanNGD(model.parameters()).reduce_in_backward(False)
    loss = _mse(model, *_batches(1)[0])
    loss.backward()
    opt.observe(loss)
    assert opt._tape.shares and opt._tape.observed is not None
    for copied in (copy.deepcopy(opt._tape), pickle.loads(pickle.dumps(opt._tape))):
        assert copied.enabled is False and not copied.shares and copied.observed is None


# ---------------------------------------------------------------------- (d) accumulation
def test_gradient_accumulation_observes_the_summed_loss():
    """Two micro-batches per step, each loss divided by 2 before backward: in one closure
    (returning the sum) and with observe() per micro-batch, the step observes the summed
    loss against the accumulated gradient; the reduction is two-pass (detected)."""
    base = _net()
    batches = _batches(6)
    oracle = Oracle(base)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    o1 = kk.KalmanNGD(m1.parameters(), init_cov=INIT_COV, obs_noise=R)
    o2 = kk.KalmanNGD(m2.parameters(), init_cov=INIT_COV, obs_noise=R)
    for (xa, ya), (xb, yb) in zip(batches[0::2], batches[1::2]):
        def closure():
            o1.zero_grad()
            total = 0.0
            for x, y in ((xa, ya), (xb, yb)):
                loss = _mse(m1, x, y) / 2
                loss.backward()
                total = total + loss.detach()
            return total
        o1.step(closure)
        assert _path(o1) == "two-pass: several backward passes (gradient accumulation)"
        for x, y in ((xa, ya), (xb, yb)):
            loss = _mse(m2, x, y) / 2
            loss.backward()
            o2.observe(loss)
        o2.step()
        o2.zero_grad()
        assert _path(o2) == "two-pass: several backward passes (gradient accumulation)"
        oracle.step(lambda m: _mse(m, xa, ya) / 2, lambda m: _mse(m, xb, yb) / 2)
    oracle.check(m1, o1)
    oracle.check(m2, o2)


def test_accumulation_across_the_closure_is_detected():
    """A backward outside the closure, then step(closure) whose backward adds to it: the
    closure's loss does not cover the gradient -- refused, naming the fixes; observing the
    outside micro-batch (and the closure's) makes it exact."""
    base = _net()
    (xa, ya), (xb, yb) = _batches(2)
    model = copy.deepcopy(base)
    opt = kk.KalmanNGD(model.parameters(), init_cov=INIT_COV, obs_noise=R)
    opt.step(lambda: _mse(model, xa, ya))           # installs the hooks
    oracle = Oracle(base)
    oracle.step(lambda m: _mse(m, xa, ya))

    def closure(observe=False):
        loss = _mse(model, xb, yb) / 2
        loss.backward()
        if observe:
            opt.observe(loss)
        return loss

    (_mse(model, xa, ya) / 2).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="accumulat.*observe"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    # observed before, but the closure's own backward not observed: refused
    loss = _mse(model, xa, ya) / 2
    loss.backward()
    opt.observe(loss)
    with pytest.raises(ValueError, match="closure's own backward pass was not"):
        opt.step(closure)
    opt.zero_grad()
    loss = _mse(model, xa, ya) / 2
    loss.backward()
    opt.observe(loss)
    opt.step(lambda: closure(observe=True))
    oracle.step(lambda m: _mse(m, xa, ya) / 2, lambda m: _mse(m, xb, yb) / 2)
    oracle.check(model, opt)


def test_grads_edited_after_backward_fall_back_to_two_pass():
    """Clipping between backward and step (in the closure, and before step()) and an edit
    of the covariance: the hook sum is not the step's g^T P g any more; detected, and the
    step equals the oracle on the clipped gradient."""
    base = _net()
    batches = _batches(3)
    model = copy.deepcopy(base)
    opt = kk.KalmanNGD(model.parameters(), init_cov=INIT_COV, obs_noise=R)
    oracle = Oracle(base)

    def clip(grads, max_norm=0.05):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                     for g in grads]))
        scale = min(1.0, max_norm / (float(norm) + 1e-6))
        return [g * scale for g in grads]

    x, y = batches[0]

    def closure():
        opt.zero_grad()
        loss = _mse(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        return loss
    opt.step(closure)
    assert _path(opt) == "two-pass: a gradient was changed after backward (e.g. clipping)"
    oracle.step(lambda m: _mse(m, x, y), transform=clip)

    x, y = batches[1]
    opt.zero_grad()
    loss = _mse(model, x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    opt.observe(loss).step()
    assert _path(opt).startswith("two-pass: a gradient was changed")
    oracle.step(lambda m: _mse(m, x, y), transform=clip)
    oracle.check(model, opt)

    x, y = batches[2]
    opt.zero_grad()
    loss = _mse(model, x, y)
    loss.backward()
    p0 = next(model.parameters())
    with torch.no_grad():
        opt.covariance(p0).mul_(0.5)          # an edit after the hook read it
    oracle.cov[:p0.numel()] *= 0.5
    opt.observe(loss).step()
    # these gradients are small: their shares are summed at the step, from the edited P
    assert _path(opt) == "in-backward"
    oracle.step(lambda m: _mse(m, x, y))
    oracle.check(model, opt)


def test_a_covariance_edited_after_its_hook_falls_back_to_two_pass():
    """A gradient large enough to be summed in its hook (MIN_SHARE_NUMEL), then its
    covariance edited before the step: the hook's share is stale; detected."""
    from kalman_kernels._loss_tape import MIN_SHARE_NUMEL
    w = nn.Parameter(torch.randn(MIN_SHARE_NUMEL + 3, dtype=torch.float64) * 0.01)
    x = torch.randn(MIN_SHARE_NUMEL + 3, dtype=torch.float64)
    opt = kk.KalmanNGD([w], init_cov=INIT_COV, obs_noise=R)
    loss = (w * x).sum().tanh()
    loss.backward()
    with torch.no_grad():
        opt.covariance(w).mul_(0.5)
    mu, cov = _loss_step_diag(_flat([w]), np.full(w.numel(), INIT_COV * 0.5),
                              _flat([w.grad]), float(loss.detach()), R)
    opt.observe(loss).step()
    assert _path(opt) == "two-pass: a covariance was changed after backward"
    assert rel_err(_flat([w]), mu) <= 1e-10
    assert rel_err(_flat([opt.covariance(w)]), cov) <= 1e-10


# ---------------------------------------------------------------------- (e) torch.amp
def test_bf16_autocast_observes_the_loss_and_gradient_backward_made():
    """autocast(bf16) forward, float32 parameters: closure and observe() equal the oracle
    fed with the very loss and gradient the step saw."""
    model = _net(dtype=torch.float32)
    opt = kk.KalmanNGD(model.parameters(), init_cov=INIT_COV, obs_noise=R)
    for i, (x, y) in enumerate(_batches(4, dtype=torch.float32)):
        mu0, p0 = _flat(model.parameters()), _flat([opt.covariance(p) for p in
                                                     model.parameters()])
        seen = {}

        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _mse(model, x, y)
            assert loss.dtype == torch.float32      # mse_loss autocasts to float32
            loss.backward()
            seen["loss"] = float(loss.detach())
            seen["g"] = _flat([p.grad for p in model.parameters()])
            return loss
        if i % 2:
            opt.observe(closure()).step()
        else:
            opt.step(closure)
        assert _path(opt) == "in-backward"
        mu, cov, _, _ = loss_step(mu0, p0, seen["g"], seen["loss"], R)
        assert rel_err(_flat(model.parameters()), mu) <= 1e-5
        assert rel_err(_flat([opt.covariance(p) for p in model.parameters()]), cov) <= 1e-5


def _scaler(init_scale=2.0 ** 10):
    return torch.amp.GradScaler("cpu", init_scale=init_scale)


def test_gradscaler_observes_the_unscaled_loss_and_gradients():
    """scaler.scale(loss).backward(); opt.observe(loss); scaler.step(opt): the step unscales
    the gradients (GradScaler hands that to the optimizer) and observes the unscaled loss --
    equal to the oracle without any scaling. A closure is refused; an overflow skips."""
    base = _net(dtype=torch.float32)
    batches = _batches(3, dtype=torch.float32)
    model = copy.deepcopy(base)
    opt = kk.KalmanNGD(model.parameters(), init_cov=INIT_COV, obs_noise=R)
    scaler = _scaler()
    oracle = Oracle(base)
    for x, y in batches:
        opt.zero_grad()
        loss = _mse(model, x, y)
        scaler.scale(loss).backward()
        opt.observe(loss)
        scaler.step(opt)
        scaler.update()
        assert _path(opt).startswith("two-pass: a GradScaler")
        oracle.step(lambda m: _mse(m, x.double(), y.double()))
    oracle.check(model, opt, tol=2e-5)
    assert opt.steps_taken == 3

    x, y = batches[0]
    def closure():
        opt.zero_grad()
        scaler.scale(_mse(model, x, y)).backward()
        return _mse(model, x, y)
    with pytest.raises(RuntimeError, match=r"GradScaler\.step\(opt, closure\)"):
        scaler.step(opt, closure)
    scaler.update()
    # the failed scaled step left no scaler attributes behind: a plain closure step works
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")

    # an overflow: the unscaled gradient is infinite, the step is skipped, nothing changes
    big = _scaler(init_scale=3e38)
    opt.zero_grad()
    loss = _mse(model, x, y) * 10
    big.scale(loss).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.observe(loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        big.step(opt)
    big.update()
    assert opt.skipped_steps == 1 and opt.steps_taken == 3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gradscaler_after_an_explicit_unscale_for_clipping():
    """scaler.unscale_(opt), clip, scaler.step(opt): the step does not unscale twice."""
    base = _net(dtype=torch.float32)
    model = copy.deepcopy(base)
    opt = kk.KalmanNGD(model.parameters(), init_cov=INIT_COV, obs_noise=R)
    scaler = _scaler()
    x, y = _batches(1, dtype=torch.float32)[0]
    loss = _mse(model, x, y)
    scaler.scale(loss).backward()
    opt.observe(loss)
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)    # a no-op clip
    scaler.step(opt)
    scaler.update()
    oracle = Oracle(base)
    oracle.step(lambda m: _mse(m, x.double(), y.double()))
    oracle.check(model, opt, tol=2e-5)


# ---------------------------------------------------------------------- the exactness
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_pass_equals_two_pass_and_the_float64_reference(backend, dtype):
    """The default (single-pass where exact) loss step equals reduce_in_backward(False)
    and the float64 oracle, on odd sizes, with forgetting and process noise, per-group
    hyper-parameters."""
    torch.manual_seed(torch.initial_seed() % 2**31)
    # (301, 223) is summed in its backward hook; the others, under MIN_SHARE_NUMEL, at
    # the step
    shapes = [(7, 3), (301, 223), (1,), (5, 1, 2)]
    base = [torch.randn(s, dtype=dtype) for s in shapes]
    xs = [torch.randn(s, dtype=dtype) for s in shapes]
    results = []
    for enabled in (True, False):
        ps = [nn.Parameter(b.clone()) for b in base]
        opt = kk.KalmanNGD([{"params": ps[:2]}, {"params": ps[2:], "forgetting": 0.97,
                                                  "process_noise": 1e-4}],
                           init_cov=0.02, obs_noise=0.4, backend=backend)
        opt.reduce_in_backward(enabled)
        for k in range(3):
            def closure():
                opt.zero_grad()
                loss = sum(((p * x).sum() * (k + 1)).tanh() for p, x in zip(ps, xs))
                loss.backward()
                return loss
            opt.step(closure)
            assert (_path(opt) == "in-backward") == enabled
        results.append((ps, opt))
    (ps1, o1), (ps2, o2) = results
    for a, b in zip(ps1, ps2):
        assert rel_err(a, b) <= (1e-12 if dtype == torch.float64 else 1e-6)
        assert rel_err(o1.covariance(a), o2.covariance(b)) <= (1e-12 if dtype == torch.float64
                                                              else 1e-6)
    # the float64 oracle, step by step
    mu = _flat(base)
    cov = np.full(mu.size, 0.02)
    sizes = [b.numel() for b in base]
    lam = np.concatenate([np.full(n, 1.0 if i < 2 else 0.97) for i, n in enumerate(sizes)])
    q = np.concatenate([np.full(n, 0.0 if i < 2 else 1e-4) for i, n in enumerate(sizes)])
    for k in range(3):
        ps = [nn.Parameter(torch.from_numpy(part).reshape(s)) for part, s in
              zip(np.split(mu, np.cumsum(sizes)[:-1]), shapes)]
        loss = sum(((p * x.double()).sum() * (k + 1)).tanh() for p, x in zip(ps, xs))
        g = _flat(torch.autograd.grad(loss, ps))
        prior = cov / lam + q            # the predict step, per element
        mu, cov = _loss_step_diag(mu, prior, g, float(loss.detach()), 0.4)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert rel_err(_flat(ps1), mu) <= tol
    assert rel_err(_flat([o1.covariance(p) for p in ps1]), cov) <= tol


# ---------------------------------------------------------------------- (b) Lightning
HAVE_LIGHTNING = importlib.util.find_spec("lightning") is not None
HAVE_TRANSFORMERS = (importlib.util.find_spec("transformers") is not None
                     and importlib.util.find_spec("accelerate") is not None)
needs_lightning = pytest.mark.skipif(not HAVE_LIGHTNING, reason=(
    "lightning is not installed (pip install -e '.[trainers]'; the test extra installs it)"))
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason=(
    "transformers/accelerate are not installed (pip install -e '.[trainers]'; the test "
    "extra installs them)"))


def _lightning_fit(base, batches, accumulate=1, callbacks=(), precision="64-true",
                   plugins=()):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(base)
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append((x.detach().clone(), y.detach().clone()))
            return _mse(self.net, x, y)

        def configure_optimizers(self):
            self.opt = kk.KalmanNGD(self.parameters(), init_cov=INIT_COV, obs_noise=R)
            return self.opt

    module = Module()
    trainer = pl.Trainer(max_steps=len(batches) // accumulate, accumulate_grad_batches=accumulate,
                         callbacks=list(callbacks), logger=False, plugins=list(plugins),
                         **({} if plugins else {"precision": precision}),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = torch.utils.data.TensorDataset(torch.cat([x for x, _ in batches]),
                                              torch.cat([y for _, y in batches]))
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=len(batches[0][0])))
    return module


@needs_lightning
def test_lightning_automatic_optimisation_closure_equals_the_oracle():
    """Lightning passes a closure that runs training_step and backward and returns the
    loss: no callback needed; one backward per step takes the single-pass reduction."""
    base = _net()
    batches = _batches(3)
    module = _lightning_fit(base, batches)
    assert module.opt.steps_taken == 3
    assert _path(module.opt) == "in-backward"
    oracle = Oracle(base)
    for x, y in module.seen:
        oracle.step(lambda m: _mse(m, x, y))
    oracle.check(module.net, module.opt)


@needs_lightning
def test_lightning_accumulate_grad_batches_needs_the_callback_and_then_is_exact():
    from kalman_kernels.integrations import KalmanObserveLoss
    base = _net()
    batches = _batches(4)
    with pytest.raises(ValueError, match="accumulate_grad_batches.*KalmanObserveLoss"):
        _lightning_fit(base, batches, accumulate=2)
    module = _lightning_fit(base, batches, accumulate=2, callbacks=[KalmanObserveLoss()])
    assert module.opt.steps_taken == 2
    oracle = Oracle(base)
    seen = module.seen
    for (xa, ya), (xb, yb) in zip(seen[0::2], seen[1::2]):
        # Lightning divides each micro-batch's loss by accumulate_grad_batches
        oracle.step(lambda m: _mse(m, xa, ya) / 2, lambda m: _mse(m, xb, yb) / 2)
    oracle.check(module.net, module.opt)


@needs_lightning
def test_lightning_bf16_mixed_steps_on_the_loss_backward_made():
    base = _net(dtype=torch.float32)
    batches = _batches(3, dtype=torch.float32)
    module = _lightning_fit(base, batches, precision="bf16-mixed")
    assert module.opt.steps_taken == 3 and module.opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    assert _path(module.opt) == "in-backward"


@needs_lightning
def test_lightning_16_mixed_with_a_grad_scaler_needs_the_callback_and_observes_unscaled():
    """16-mixed with a GradScaler (on CPU given explicitly; Lightning makes one on CUDA):
    Lightning runs the closure itself, then scaler.step(opt) without it. Without the
    callback the step names the fix; with it, the observed loss is divided by the scale
    (Lightning hands on_before_backward the scaled loss) and the gradients are unscaled by
    the step: the run follows the oracle (fp16 autocast forward: loose tolerance, while a
    scaled observation would be off by the scale, 1024)."""
    from lightning.pytorch.plugins import MixedPrecision

    from kalman_kernels.integrations import KalmanObserveLoss

    def plugin():
        return MixedPrecision("16-mixed", "cpu",
                              scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    base = _net(dtype=torch.float32)
    batches = _batches(3, dtype=torch.float32)
    with pytest.raises(ValueError, match="no loss was observed.*KalmanObserveLoss"):
        _lightning_fit(base, batches, plugins=[plugin()])
    module = _lightning_fit(base, batches, plugins=[plugin()], callbacks=[KalmanObserveLoss()])
    assert module.opt.steps_taken == 3 and module.opt.skipped_steps == 0
    assert _path(module.opt).startswith("two-pass: a GradScaler")
    oracle = Oracle(base)
    for x, y in module.seen:
        oracle.step(lambda m: _mse(m, x.double(), y.double()))
    oracle.check(module.net, module.opt, tol=2e-2)


# ---------------------------------------------------------------------- (c) HF Trainer
class _HFNet(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.net = copy.deepcopy(base)
        self.seen = []

    def forward(self, x, labels):
        self.seen.append((x.detach().clone(), labels.detach().clone()))
        return {"loss": _mse(self.net, x, labels)}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_train(trainer_cls, base, steps, accumulation=1, max_grad_norm=0.0):
    from transformers import TrainingArguments
    model = _HFNet(base)
    opt = kk.KalmanNGD(model.parameters(), init_cov=INIT_COV, obs_noise=R)
    data = _Rows(torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=steps,
                                 gradient_accumulation_steps=accumulation,
                                 max_grad_norm=max_grad_norm, use_cpu=True, report_to=[],
                                 save_strategy="no", logging_strategy="no", disable_tqdm=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer_cls(model=model, args=args, train_dataset=data,
                        optimizers=(opt, None)).train()
    return model, opt


@needs_transformers
@pytest.mark.parametrize("accumulation", [1, 2])
def test_hf_kalman_trainer_observes_the_loss_it_differentiated(accumulation):
    """KalmanTrainer hands each micro-batch's loss (divided over the accumulation steps) to
    observe(); the steps equal the oracle on the batches the model saw; lr stays 1.0."""
    from kalman_kernels.integrations import KalmanTrainer
    base = _net()
    model, opt = _hf_train(KalmanTrainer, base, steps=3, accumulation=accumulation)
    assert opt.steps_taken == 3
    assert opt.param_groups[0]["lr"] == 1.0
    assert _path(opt) == ("in-backward" if accumulation == 1 else
                          "two-pass: several backward passes (gradient accumulation)")
    oracle = Oracle(base)
    seen = model.seen
    for i in range(0, len(seen), accumulation):
        micro = seen[i:i + accumulation]
        oracle.step(*[lambda m, x=x, y=y: _mse(m, x, y) / accumulation for x, y in micro])
    oracle.check(model.net, opt)


@needs_transformers
def test_hf_plain_trainer_raises_naming_kalman_trainer_and_clipping_warns():
    from transformers import Trainer

    from kalman_kernels.integrations import KalmanTrainer
    with pytest.raises(ValueError, match="KalmanTrainer"):
        _hf_train(Trainer, _net(), steps=1)
    from transformers import TrainingArguments
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[], max_grad_norm=1.0)
        model = _HFNet(_net())
        with pytest.warns(UserWarning, match="max_grad_norm=0"):
            KalmanTrainer(model=model, args=args,
                          optimizers=(kk.KalmanNGD(model.parameters()), None))
        with pytest.raises(TypeError, match="needs a KalmanNGD"):
            KalmanTrainer(model=model, args=args,
                          optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
