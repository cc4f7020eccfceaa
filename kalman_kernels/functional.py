"""The functional step of :class:`~kalman_kernels.KalmanNGD` (docs/design.md, 1).

Like ``torch.optim.AdamW``, the optimizer class validates its arguments and gathers what a
step needs (parameters, gradients or observation blocks, covariances, hyper-parameters);
one function per mode then does the step:

* :func:`kalman_ngd_loss_step`: loss-observation mode (docs/design.md, 2.2), through
  :func:`kalman_kernels.ops.loss_observation_step_`;
* :func:`kalman_ngd_batch_step`: batch-observation mode, Gaussian or categorical
  (docs/design.md, 2 and 2.7), through :func:`kalman_kernels.ops.kalman_step_`.

Both take a :class:`FilterState`, the optimizer-wide state that a step changes besides the
parameters and covariances: the counters (``steps``, ``skipped_steps``, ``gated_steps``,
``cov_clamps``), the adapted observation noise, ``last_info``, the device flags whose host
reactions (warnings, a rank mismatch) wait until the value has reached the host, and the
undo of a step's bookkeeping when its last pass raises. A step reads nothing on the host
(docs/design.md, 4.2): the counters are device tensors, added to on the device, except on
eager CPU, where the step decided on the host anyway.

The functions are this package's internals: their signatures may change (docs/design.md,
3); ``KalmanNGD`` is the stable interface.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch

from . import ops
from . import reference as ref
from ._deferred import PendingFlags, compiling, readable_now
from .ops import KalmanInfo, StepHyper
from .ops._common import numpy_view

#: The counters of a :class:`FilterState`, int64 tensors saved with the optimizer state.
COUNTERS = ("steps", "skipped_steps", "gated_steps", "cov_clamps")
#: Key of ``optimizer.state`` that holds the filter-wide state (:class:`FilterState`).
FILTER_KEY = "filter"
#: Key inside each parameter's entry of ``state_dict()["state"]`` that carries the
#: filter-wide state (see :func:`saved_form`).
SAVED_KEY = "kalman_filter"


def saved_form(sd: dict) -> dict:
    """``Optimizer.state_dict()`` with the filter-wide state moved from its own key into
    every parameter's entry, as Adam's ``step`` travels: ``torch.distributed.checkpoint``
    (``get_optimizer_state_dict``) requires every state key to name a parameter, with or
    without FSDP. A state with no parameter entry keeps the key (nothing else can carry
    it). The entries share the filter's tensors (torch.save stores them once)."""
    state = dict(sd["state"])
    if not any(key != FILTER_KEY for key in state):
        return sd
    filt = dict(state.pop(FILTER_KEY, {}))
    for key in list(state):
        state[key] = dict(state[key], **{SAVED_KEY: filt})
    return dict(sd, state=state)


def loaded_form(sd: dict) -> dict:
    """The inverse of :func:`saved_form`: the filter-wide state back under its own key (the
    first parameter entry's copy). A state dict saved with the key (a parameter-less state,
    or one from an earlier release) passes unchanged."""
    state = dict(sd.get("state", {}))
    filt = None
    for key, entry in list(state.items()):
        if isinstance(entry, dict) and SAVED_KEY in entry:
            entry = dict(entry)
            saved = entry.pop(SAVED_KEY)
            filt = saved if filt is None else filt
            state[key] = entry
    if filt is not None and FILTER_KEY not in state:
        state[FILTER_KEY] = filt
    return dict(sd, state=state)


class FilterState:
    """The optimizer-wide state of the filter. ``tensors`` is the dict saved as
    ``optimizer.state["filter"]``: the counters, the adapted noise ``obs_noise`` (0-d
    float64, or None for a tensor noise) and, with the categorical likelihood, its
    ``likelihood`` and ``tempering``. ``warned`` holds the keys of the warnings already
    given (each warns once per optimizer)."""

    def __init__(self) -> None:
        self.tensors: dict = {}
        self.last_info: Optional[KalmanInfo] = None
        self.pending = PendingFlags()
        self.warned: set = set()
        self.adaptive = False          # set by each step: keep the adapted noise
        self._views: dict = {}         # counter key -> (counter tensor, its numpy view)

    def __getstate__(self) -> dict:
        # Copies (copy.deepcopy, pickle) carry the values: the counters and noise, the last
        # step's report and the warnings given. The device flags still pending are read
        # first (their host reactions are closures over this object), and the counters'
        # numpy views are made again for the copy's own tensors.
        self.pending.poll(wait=True)
        state = dict(self.__dict__)
        del state["pending"], state["_views"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.pending = PendingFlags()
        self._views = {}

    def reset(self, device, obs_noise) -> dict:
        """Fresh counters on ``device``, and a scalar ``obs_noise`` as the noise to adapt
        (None for a tensor noise, which does not adapt); returns the new ``tensors``."""
        self.tensors = {key: torch.zeros((), dtype=torch.int64, device=device)
                        for key in COUNTERS}
        self.tensors["obs_noise"] = (None if isinstance(obs_noise, torch.Tensor) else
                                     torch.tensor(obs_noise, dtype=torch.float64, device=device))
        return self.tensors

    def restore(self, device, saved: dict) -> dict:
        """The counters and noise of a saved ``tensors`` dict, copied to ``device`` (a
        counter missing from an older state starts at 0); returns the new ``tensors``."""
        self.tensors = {key: torch.as_tensor(saved.get(key, 0), dtype=torch.int64)
                        .to(device).clone() for key in COUNTERS}
        r = saved.get("obs_noise")
        self.tensors["obs_noise"] = (None if r is None else
                                     torch.as_tensor(r, dtype=torch.float64).to(device).clone())
        return self.tensors

    def obs_noise(self, fixed):
        """The noise of the next step: the adapted one while adaptation is on, else
        ``fixed``."""
        r = self.tensors.get("obs_noise")
        return r if (r is not None and self.adaptive) else fixed

    def counter(self, key: str) -> int:
        """A counter as a Python int (reads the device)."""
        value = self.tensors[key]
        if value.device.type == "meta":
            raise RuntimeError(f"KalmanNGD.{key}: the optimizer state is on the meta device, "
                               f"which holds no values (shapes only)")
        return int(value)

    def warn_once(self, key: str, message: str, category=RuntimeWarning) -> None:
        """Warn ``message`` unless ``key`` warned before (never while torch.compile
        traces), pointing at the first caller outside this package and torch: the user's
        line that built the optimizer or called ``step``."""
        if key in self.warned or compiling():
            return
        self.warned.add(key)
        warnings.warn(message, category, stacklevel=user_stacklevel())

    def record(self, info: KalmanInfo) -> Callable[[], None]:
        """Count the step of ``info`` and keep it as ``last_info``; keep the adapted noise;
        react to its flags once they reach the host (the skip warning, the Kalman rule's
        clamps under a process group, a rank mismatch; see :mod:`kalman_kernels._deferred`).
        Returns the undo of exactly this bookkeeping, for a step whose last pass raises
        after its outcome was recorded: the state is then bit for bit as before."""
        filt = self.tensors
        previous = (self.last_info, filt.get("obs_noise"))
        self.last_info = info
        host_skipped = None
        flags = info.extras.get("host_flags")     # a step decided on the host (eager CPU)
        if (flags is not None and filt["steps"].is_cpu) or (
                readable_now(info.skipped_tensor) and readable_now(filt["steps"])):
            # eager CPU: the flags are host values already; one increment per counter
            if flags is None:
                skipped = bool(info.skipped_tensor)
                flags = (skipped, not skipped and float(info.gate_scale_tensor) < 1)
            host_skipped, gated = flags
            bumped = [self._host_counter("skipped_steps" if host_skipped else "steps")]
            if gated:
                bumped.append(self._host_counter("gated_steps"))
            for count in bumped:
                count[...] += 1

            def undo_counts() -> None:
                for count in bumped:
                    count[...] -= 1
        else:
            device = filt["steps"].device
            skipped = info.skipped_tensor.to(device)
            applied = (~skipped).to(torch.int64)
            gated = ((~skipped) & (info.gate_scale_tensor.to(device) < 1)).to(torch.int64)
            skipped = skipped.to(torch.int64)
            filt["skipped_steps"].add_(skipped)
            filt["steps"].add_(applied)
            filt["gated_steps"].add_(gated)

            def undo_counts() -> None:
                filt["skipped_steps"].sub_(skipped)
                filt["steps"].sub_(applied)
                filt["gated_steps"].sub_(gated)
        clamps = info.cov_clamps_tensor
        if clamps is not None:
            clamps = clamps.to(filt["cov_clamps"].device)
            filt["cov_clamps"].add_(clamps)
            if "clamps" not in self.warned:
                self.pending.add(info.cov_clamps_tensor > 0, self._on_clamps(info))
        if self.adaptive and info.obs_noise_tensor is not None:
            filt["obs_noise"] = info.obs_noise_tensor.detach().to(torch.float64).reshape(())
        if info.mismatch_tensor is not None:
            self.pending.add(info.mismatch_tensor, _raise_on_mismatch)

        def undo() -> None:
            self.last_info, filt["obs_noise"] = previous
            undo_counts()
            if clamps is not None:
                filt["cov_clamps"].sub_(clamps)

        if "skip" in self.warned or host_skipped is False:
            return undo

        def on_skip(was_skipped: bool) -> None:
            if was_skipped:
                self.warn_once("skip", f"KalmanNGD: step skipped ({info.reason}); parameters "
                               f"and covariances are unchanged. Further skips are counted in "
                               f"optimizer.skipped_steps without a warning.")

        self.pending.add(info.skipped_tensor, on_skip)
        return undo

    def _on_clamps(self, info: KalmanInfo):
        def on_clamps(any_clamped: bool) -> None:
            if any_clamped:
                self.warn_once(
                    "clamps", f"KalmanNGD: under process_group the 'kalman' covariance rule "
                    f"pushed {info.cov_clamps} covariance elements below zero (the ranks' "
                    f"summed diag(H^T S^-1 H) exceeded 1/P-); they were clamped to cov_floor, "
                    f"which freezes those parameters. Use cov_update='information' for "
                    f"multi-process training (it cannot go below zero); "
                    f"diagnostics()['cov_clamps'] counts them. Warned once.")
        return on_clamps

    def _host_counter(self, key: str):
        """The numpy view of a CPU counter tensor: a step counts through it with no
        dispatcher call (an ``add_`` on a 0-d tensor costs tens of microseconds in the cold
        caches the kernels leave; see ops/loss_update.py). Re-made when the tensor is
        replaced (load_state_dict)."""
        tensor = self.tensors[key]
        entry = self._views.get(key)
        if entry is None or entry[0] is not tensor:
            view = numpy_view(tensor)
            # no numpy in this torch build: the tensor itself (+= 1 is then an add_)
            entry = self._views[key] = (tensor, tensor if view is None else view)
        return entry[1]


def user_stacklevel() -> int:
    """``stacklevel`` of the first caller outside this package and torch (the line that
    built the optimizer or called ``step``), for a warning raised by the caller."""
    inside = (os.path.dirname(os.path.abspath(__file__)),
              os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _raise_on_mismatch(mismatch: bool) -> None:
    if mismatch:
        raise ValueError("KalmanNGD(process_group=...): the ranks' parameter shapes or "
                         "hyper-parameters differ (their hash is compared at every step); the "
                         "step was skipped on every rank. Every rank must change param_groups "
                         "alike (e.g. the same LR scheduler).")


def predict_only_(entries: Sequence[Tuple[torch.Tensor, StepHyper]], ok: torch.Tensor) -> None:
    """Covariances (cov, hyper) of parameters the observation does not reach go through the
    predict step alone, clamped (docs/design.md, 2, step 1), where ``ok`` (the step was
    applied); a no-op predict (lam = 1, q = 0, no bounds) is not run."""
    for cov, hp in entries:
        if hp.forgetting != 1.0 or hp.process_noise != 0.0 or hp.cov_floor > 0 or \
                math.isfinite(hp.cov_ceiling):
            new = ref.predict_cov(cov, hp.forgetting, hp.process_noise)
            new = new.clamp_(hp.cov_floor, hp.cov_ceiling)
            cov.copy_(torch.where(ok.to(cov.device), new, cov))


# ---------------------------------------------------------------------- the steps
def kalman_ngd_loss_step(params, grads, covs, hypers: Sequence[StepHyper], loss,
                         state: FilterState, *, obs_noise: float, gate: Optional[float] = None,
                         adaptive_obs_noise: float = 0.0, backend: str = "auto",
                         quad_form: Optional[torch.Tensor] = None, process_group=None,
                         rank_key: Optional[int] = None,
                         untouched: Sequence[Tuple[torch.Tensor, StepHyper]] = ()
                         ) -> KalmanInfo:
    """One loss-observation step (docs/design.md, 2.2), in place.

    ``params``, ``grads``, ``covs``, ``hypers``: the parameters the loss reached, their
    gradients (detached), covariances and hyper-parameters; ``loss``: the 0-d loss;
    ``obs_noise``: the configured scalar r (the state's adapted r replaces it while
    ``adaptive_obs_noise`` > 0); ``quad_form``: g^T P- g when it was summed during backward;
    ``process_group`` / ``rank_key``: scale-out (:mod:`kalman_kernels.distributed`; every
    rank passes the same parameters, zero gradients where its loss is flat);
    ``untouched``: (cov, hyper) of the parameters the loss did not reach, which go through
    the predict step alone. The outcome is counted in ``state`` (before the elementwise pass
    on eager CPU, undone if that pass raises). Returns the step's
    :class:`~kalman_kernels.ops.KalmanInfo`, also ``state.last_info``.
    """
    state.adaptive = adaptive_obs_noise > 0.0
    info = ops.loss_observation_step_(
        params, grads, covs, hypers, loss, state.obs_noise(obs_noise), gate=gate,
        backend=backend, adaptive_rate=adaptive_obs_noise, quad_form=quad_form,
        process_group=process_group, rank_key=rank_key, on_decided=state.record)
    if untouched:
        predict_only_(untouched, ~info.skipped_tensor)
    return info


def kalman_ngd_batch_step(blocks, hypers: Sequence[StepHyper], residual: torch.Tensor,
                          obs_noise, state: FilterState, *, gate: Optional[float] = None,
                          adaptive_obs_noise: float = 0.0, backend: str = "auto",
                          process_group=None, max_obs_per_update: Optional[int] = None,
                          untouched: Sequence[Tuple[torch.Tensor, torch.Tensor, StepHyper]] = (),
                          param_order=None, rank_key: Optional[int] = None) -> KalmanInfo:
    """One batch-observation step (docs/design.md, 2), in place.

    ``blocks`` / ``hypers``: the observation's parameter blocks
    (:class:`~kalman_kernels.ops.DenseBlock`, :class:`~kalman_kernels.ops.KronBlock`) and
    their hyper-parameters; ``residual``: e (m,), float64; ``obs_noise``: R (a float, an
    (m,) or (m, m) tensor; the categorical observation's (m, m) noise), replaced by the
    state's adapted r while ``adaptive_obs_noise`` > 0; ``max_obs_per_update``: sequential
    sub-batches; ``untouched``: (param, cov, hyper) of the parameters the observation does
    not reach (the predict step alone; under a process group, zero terms in the all-reduce,
    whose layout ``param_order`` fixes). The outcome is counted in ``state``. Returns the
    :class:`~kalman_kernels.ops.KalmanInfo`, also ``state.last_info``.
    """
    state.adaptive = adaptive_obs_noise > 0.0
    distributed = process_group is not None
    info = ops.kalman_step_(blocks, hypers, residual, state.obs_noise(obs_noise), gate=gate,
                            backend=backend, adaptive_rate=adaptive_obs_noise,
                            process_group=process_group, max_obs_per_update=max_obs_per_update,
                            untouched=untouched if distributed else (),
                            param_order=param_order, rank_key=rank_key)
    if not distributed and untouched:
        predict_only_([(c, hp) for _, c, hp in untouched], ~info.skipped_tensor)
    state.record(info)
    return info
