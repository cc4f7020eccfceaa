"""The kernel ops, defined once: per op its schema, its argument checks, its fake (meta)
implementation, its default kernel and the one Python wrapper every backend calls it through.

* **Schema** (:data:`SCHEMAS`): the op's arguments and returns, for every namespace that
  :func:`define` creates: ``kalman_kernels`` (the ops ``backend="auto"`` calls: the C++
  extensions register kernels for their CPU and CUDA dispatch keys) and
  ``kalman_kernels_triton`` (Triton serves the same device as ``cuda``, so it needs its own
  names; tests add the emulated CUDA kernels' namespace).
* **Checks** (``_check_<op>``): the contract's shapes, dtypes, in-place contiguity, ``ok`` and
  hyper-parameters, read from metadata only (never a tensor's value). The fake, the default
  kernel and the Triton kernels run them; the C++ kernels run the same rules from one header,
  ``csrc/kk_checks.h``, with the same messages.
* **Fake** (``_fake_<op>``): output shapes and dtypes, for ``torch.compile``, FakeTensors and
  ``meta`` tensors.
* **Default kernel** (``_default_<op>``): the pure-PyTorch reference
  (:mod:`kalman_kernels.reference`), registered as ``CompositeExplicitAutograd``: a device
  whose dispatch key has no compiled kernel (CPU without the C++ extension, CUDA without the
  CUDA one, any other device) still runs the op (docs/design.md, 4.3).
* **Wrapper** (:class:`Kernels`, one method per op): the signature of the reference function
  of the same name (the backend contract, ``kalman_kernels/backends/README.md``) and the
  conversions every backend needs, written once: ``(m, *shape)`` Jacobians as (m, n) views,
  2-D ``grad_outputs`` as (B, 1, d_out), ``cov_ceiling=None`` as infinity, Python numbers
  for ``coef`` / ``weight`` / ``ok`` as device tensors, empty tensor lists answered without
  a kernel. A backend module binds it to its namespace (``Kernels(NAME, namespace, DEVICES)``);
  adding a backend adds no wrapper.

Semantics are those of the functions of the same name in :mod:`kalman_kernels.reference`. In
short: ``ok`` is a 0-d ``bool`` tensor on the ops' device and an in-place op writes nothing
when it is false (the skip predicate of a sync-free step, docs/design.md, 4.2); ``coef``
(m,), ``whitening`` (m, m) and the loss step's ``coef`` / ``weight`` (0-d) are float64
device tensors; Kronecker blocks are sample-grouped, ``inputs`` (B, d_in) and
``grad_outputs`` (B, K, d_out) with m = B K observations in (j, k) order.

Nothing here reads a tensor's value on the host: the wrappers run under
``torch.compile(fullgraph=True)`` and inside a CUDA graph.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from .. import reference as ref

NAMESPACE = "kalman_kernels"
TRITON_NAMESPACE = "kalman_kernels_triton"

F64 = torch.float64
_INF = float("inf")
_PARAM_DTYPES = (torch.float32, F64, torch.float16, torch.bfloat16)
_COV_DTYPES = (torch.float32, F64)

_UPDATE_SCALARS = ("float forgetting, float process_noise, float cov_floor, float cov_ceiling, "
                   "bool information")

#: op name -> schema (arguments and returns), the single source of truth.
SCHEMAS: Dict[str, str] = {
    "innovation_cov_dense":
        "(Tensor jac, Tensor cov, float forgetting, float process_noise) -> Tensor",
    "innovation_cov_kron":
        "(Tensor inputs, Tensor grad_outputs, Tensor cov, float forgetting, "
        "float process_noise) -> Tensor",
    "fused_update_dense_":
        "(Tensor(a!) param, Tensor(b!) cov, Tensor jac, Tensor coef, Tensor whitening, "
        f"Tensor ok, {_UPDATE_SCALARS}) -> ()",
    "fused_update_kron_":
        "(Tensor(a!) weight, Tensor(b!) cov, Tensor inputs, Tensor grad_outputs, Tensor coef, "
        f"Tensor whitening, Tensor ok, {_UPDATE_SCALARS}) -> ()",
    "loss_quad_form":
        "(Tensor[] grads, Tensor[] covs, float forgetting, float process_noise) -> Tensor",
    "loss_step_":
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] covs, Tensor coef, Tensor weight, "
        f"Tensor ok, {_UPDATE_SCALARS}) -> ()",
    "step_terms_dense":
        "(Tensor jac, Tensor coef, Tensor whitening) -> (Tensor, Tensor)",
    "step_terms_kron":
        "(Tensor inputs, Tensor grad_outputs, Tensor coef, Tensor whitening) -> (Tensor, Tensor)",
    "apply_terms_":
        "(Tensor(a!) param, Tensor(b!) cov, Tensor direction, Tensor diag_term, Tensor ok, "
        f"{_UPDATE_SCALARS}) -> ()",
}


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any operand is float64, else float32: the dtype of step terms."""
    return F64 if any(t.dtype == F64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------
# Argument checks: one rule set, the same as csrc/kk_checks.h (messages included)
# --------------------------------------------------------------------------------------
def _fail_unless(cond, op: str, message) -> None:
    torch._check(cond, lambda: f"kalman_kernels::{op}: {message()}")


def _dtype(op: str, name: str, t: torch.Tensor, dtypes=_PARAM_DTYPES) -> None:
    names = ("float32, float64, float16 or bfloat16" if dtypes is _PARAM_DTYPES
             else "float32 or float64")
    _fail_unless(t.dtype in dtypes, op, lambda: f"{name} must be {names}, got {t.dtype}")


def _inplace(op: str, name: str, t: torch.Tensor) -> None:
    # a kernel writes the storage as one flat array; a copy would drop the update
    _fail_unless(t.is_contiguous(), op,
                 lambda: f"{name} is updated in place and must be contiguous (shape "
                         f"{tuple(t.shape)}, strides {t.stride()}); keep the state in "
                         f"contiguous storage")


def _ok(op: str, ok: torch.Tensor) -> None:
    _fail_unless(ok.dim() == 0 and ok.dtype == torch.bool, op,
                 lambda: f"ok must be a 0-d bool tensor (the step's skip predicate), got "
                         f"{ok.dtype} of shape {tuple(ok.shape)}")


def _hyper(op: str, forgetting, process_noise, cov_floor=0.0, cov_ceiling=0.0) -> None:
    # Python numbers only: under torch.compile they may be symbolic, and the kernels check
    # them again at run time
    values = (forgetting, process_noise, cov_floor, cov_ceiling)
    if not all(type(v) in (float, int, bool) for v in values):
        return
    _fail_unless(math.isfinite(forgetting) and forgetting > 0, op,
                 lambda: f"forgetting must be finite and > 0, got {forgetting}")
    _fail_unless(math.isfinite(process_noise), op,
                 lambda: f"process_noise must be finite, got {process_noise}")
    _fail_unless(not (math.isnan(cov_floor) or math.isnan(cov_ceiling)), op,
                 lambda: "cov_floor / cov_ceiling must not be NaN")


def _dense(op: str, jac: torch.Tensor, n, n_from: str) -> None:
    _fail_unless(jac.dim() == 2, op, lambda: f"jac must be (m, n), got {tuple(jac.shape)}")
    _fail_unless(jac.shape[1] == n, op,
                 lambda: f"jac must be (m, n) with n = {n} ({n_from}), got {tuple(jac.shape)}")
    _dtype(op, "jac", jac)


def _kron(op: str, inputs: torch.Tensor, grad_outputs: torch.Tensor, what=None,
          what_name: str = "") -> None:
    """inputs (B, d_in), grad_outputs (B, K, d_out); ``what`` (the covariance or the weight),
    when given, (d_out, d_in)."""
    _fail_unless(inputs.dim() == 2 and grad_outputs.dim() == 3, op,
                 lambda: f"inputs must be (B, d_in) and grad_outputs (B, K, d_out), got "
                         f"{tuple(inputs.shape)} and {tuple(grad_outputs.shape)}")
    _fail_unless(inputs.shape[0] == grad_outputs.shape[0], op,
                 lambda: f"inputs has {inputs.shape[0]} rows, grad_outputs "
                         f"{grad_outputs.shape[0]}")
    if what is not None:
        _fail_unless(what.dim() == 2 and what.shape[0] == grad_outputs.shape[2]
                     and what.shape[1] == inputs.shape[1], op,
                     lambda: f"{what_name} must be (d_out, d_in) = ({grad_outputs.shape[2]}, "
                             f"{inputs.shape[1]}) for inputs (B, d_in) and grad_outputs "
                             f"(B, K, d_out), got {tuple(what.shape)}")
    _dtype(op, "inputs", inputs)
    _dtype(op, "grad_outputs", grad_outputs)


def _terms(op: str, coef: torch.Tensor, whitening: torch.Tensor, m) -> None:
    _fail_unless(coef.dim() == 1 and coef.shape[0] == m, op,
                 lambda: f"coef must be (m,) = ({m},), got {tuple(coef.shape)}")
    _fail_unless(whitening.dim() == 2 and whitening.shape[0] == m and whitening.shape[1] == m,
                 op, lambda: f"whitening must be (m, m) = ({m}, {m}), got "
                             f"{tuple(whitening.shape)}")
    _dtype(op, "coef", coef, _COV_DTYPES)
    _dtype(op, "whitening", whitening, _COV_DTYPES)


def _numel(op: str, n, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        _fail_unless(t.numel() == n, op,
                     lambda name=name, t=t: f"{name} has {t.numel()} elements, the parameter {n}")


def _lists(op: str, **lists: Sequence[torch.Tensor]) -> None:
    names = list(lists)
    lengths = [len(v) for v in lists.values()]
    _fail_unless(len(set(lengths)) == 1, op,
                 lambda: f"{', '.join(names)} differ in length ({', '.join(map(str, lengths))})")
    for i, ts in enumerate(zip(*lists.values())):
        for name, t in zip(names[1:], ts[1:]):
            _fail_unless(t.numel() == ts[0].numel(), op,
                         lambda i=i, name=name, t=t, first=ts[0]:
                         f"{name}[{i}] has {t.numel()} elements, {names[0]}[{i}] {first.numel()}")


def _check_innovation_cov_dense(jac, cov, forgetting, process_noise):
    op = "innovation_cov_dense"
    _dense(op, jac, cov.numel(), "cov's elements")
    _dtype(op, "cov", cov, _COV_DTYPES)
    _hyper(op, forgetting, process_noise)


def _check_innovation_cov_kron(inputs, grad_outputs, cov, forgetting, process_noise):
    op = "innovation_cov_kron"
    _kron(op, inputs, grad_outputs, cov, "cov")
    _dtype(op, "cov", cov, _COV_DTYPES)
    _hyper(op, forgetting, process_noise)


def _check_fused_update_dense_(param, cov, jac, coef, whitening, ok, forgetting, process_noise,
                               cov_floor, cov_ceiling, information):
    op = "fused_update_dense_"
    _inplace(op, "param", param)
    _inplace(op, "cov", cov)
    _numel(op, param.numel(), cov=cov)
    _dense(op, jac, param.numel(), "the parameter's elements")
    _terms(op, coef, whitening, jac.shape[0])
    _ok(op, ok)
    _dtype(op, "param", param)
    _dtype(op, "cov", cov, _COV_DTYPES)
    _hyper(op, forgetting, process_noise, cov_floor, cov_ceiling)


def _check_fused_update_kron_(weight, cov, inputs, grad_outputs, coef, whitening, ok,
                              forgetting, process_noise, cov_floor, cov_ceiling, information):
    op = "fused_update_kron_"
    _fail_unless(weight.dim() == 2 and cov.shape == weight.shape, op,
                 lambda: f"weight must be 2-D and cov of its shape, got {tuple(weight.shape)} "
                         f"and {tuple(cov.shape)}")
    _inplace(op, "weight", weight)
    _inplace(op, "cov", cov)
    _kron(op, inputs, grad_outputs, weight, "weight")
    _terms(op, coef, whitening, grad_outputs.shape[0] * grad_outputs.shape[1])
    _ok(op, ok)
    _dtype(op, "weight", weight)
    _dtype(op, "cov", cov, _COV_DTYPES)
    _hyper(op, forgetting, process_noise, cov_floor, cov_ceiling)


def _check_loss_quad_form(grads, covs, forgetting, process_noise):
    op = "loss_quad_form"
    _lists(op, grads=grads, covs=covs)
    for i, (g, c) in enumerate(zip(grads, covs)):
        _dtype(op, f"grads[{i}]", g)
        _dtype(op, f"covs[{i}]", c, _COV_DTYPES)
    _hyper(op, forgetting, process_noise)


def _check_loss_step_(params, grads, covs, coef, weight, ok, forgetting, process_noise,
                      cov_floor, cov_ceiling, information):
    op = "loss_step_"
    _lists(op, params=params, grads=grads, covs=covs)
    for i, (p, g, c) in enumerate(zip(params, grads, covs)):
        _inplace(op, f"params[{i}]", p)
        _inplace(op, f"covs[{i}]", c)
        _dtype(op, f"params[{i}]", p)
        _dtype(op, f"grads[{i}]", g)
        _dtype(op, f"covs[{i}]", c, _COV_DTYPES)
    _fail_unless(coef.numel() == 1 and weight.numel() == 1, op,
                 lambda: f"coef and weight must be scalars, got {tuple(coef.shape)} and "
                         f"{tuple(weight.shape)}")
    _ok(op, ok)
    _hyper(op, forgetting, process_noise, cov_floor, cov_ceiling)


def _check_step_terms_dense(jac, coef, whitening):
    op = "step_terms_dense"
    _fail_unless(jac.dim() == 2, op, lambda: f"jac must be (m, n), got {tuple(jac.shape)}")
    _dtype(op, "jac", jac)
    _terms(op, coef, whitening, jac.shape[0])


def _check_step_terms_kron(inputs, grad_outputs, coef, whitening):
    op = "step_terms_kron"
    _kron(op, inputs, grad_outputs)
    _terms(op, coef, whitening, grad_outputs.shape[0] * grad_outputs.shape[1])


def _check_apply_terms_(param, cov, direction, diag_term, ok, forgetting, process_noise,
                        cov_floor, cov_ceiling, information):
    op = "apply_terms_"
    _inplace(op, "param", param)
    _inplace(op, "cov", cov)
    _numel(op, param.numel(), cov=cov, direction=direction, diag_term=diag_term)
    _ok(op, ok)
    _dtype(op, "param", param)
    for name, t in (("cov", cov), ("direction", direction), ("diag_term", diag_term)):
        _dtype(op, name, t, _COV_DTYPES)
    _hyper(op, forgetting, process_noise, cov_floor, cov_ceiling)


CHECKS = {name: globals()[f"_check_{name}"] for name in SCHEMAS}


# --------------------------------------------------------------------------------------
# Fakes: the checks, then the outputs' shapes and dtypes (torch.compile, FakeTensor, meta)
# --------------------------------------------------------------------------------------
def _fake_innovation_cov_dense(jac, cov, forgetting, process_noise):
    _check_innovation_cov_dense(jac, cov, forgetting, process_noise)
    return jac.new_empty((jac.shape[0], jac.shape[0]), dtype=F64)


def _fake_innovation_cov_kron(inputs, grad_outputs, cov, forgetting, process_noise):
    _check_innovation_cov_kron(inputs, grad_outputs, cov, forgetting, process_noise)
    m = grad_outputs.shape[0] * grad_outputs.shape[1]
    return inputs.new_empty((m, m), dtype=F64)


def _fake_fused_update_dense_(*args):
    _check_fused_update_dense_(*args)


def _fake_fused_update_kron_(*args):
    _check_fused_update_kron_(*args)


def _fake_loss_quad_form(grads, covs, forgetting, process_noise):
    _check_loss_quad_form(grads, covs, forgetting, process_noise)
    device = grads[0].device if len(grads) else torch.device("cpu")
    return torch.empty((), dtype=F64, device=device)


def _fake_loss_step_(*args):
    _check_loss_step_(*args)


def _fake_step_terms_dense(jac, coef, whitening):
    _check_step_terms_dense(jac, coef, whitening)
    dtype = _acc_dtype(jac)
    return jac.new_empty((jac.shape[1],), dtype=dtype), jac.new_empty((jac.shape[1],), dtype=dtype)


def _fake_step_terms_kron(inputs, grad_outputs, coef, whitening):
    _check_step_terms_kron(inputs, grad_outputs, coef, whitening)
    shape = (grad_outputs.shape[2], inputs.shape[1])
    dtype = _acc_dtype(inputs, grad_outputs)
    return inputs.new_empty(shape, dtype=dtype), inputs.new_empty(shape, dtype=dtype)


def _fake_apply_terms_(*args):
    _check_apply_terms_(*args)


# --------------------------------------------------------------------------------------
# Default kernels: the checks, then the reference (a device with no compiled kernel)
# --------------------------------------------------------------------------------------
def _default_innovation_cov_dense(*args):
    _check_innovation_cov_dense(*args)
    return ref.innovation_cov_dense(*args)


def _default_innovation_cov_kron(*args):
    _check_innovation_cov_kron(*args)
    return ref.innovation_cov_kron(*args)


def _default_fused_update_dense_(*args):
    _check_fused_update_dense_(*args)
    ref.fused_update_dense_(*args)


def _default_fused_update_kron_(*args):
    _check_fused_update_kron_(*args)
    ref.fused_update_kron_(*args)


def _default_loss_quad_form(*args):
    _check_loss_quad_form(*args)
    return ref.loss_quad_form(*args)


def _default_loss_step_(*args):
    _check_loss_step_(*args)
    ref.loss_step_(*args)


def _default_step_terms_dense(jac, coef, whitening):
    _check_step_terms_dense(jac, coef, whitening)
    u, d = ref.step_terms_dense(jac, coef, whitening)
    dtype = _acc_dtype(jac)       # the reference computes in float64; the schema's dtype
    return u.to(dtype), d.to(dtype)


def _default_step_terms_kron(inputs, grad_outputs, coef, whitening):
    _check_step_terms_kron(inputs, grad_outputs, coef, whitening)
    u, d = ref.step_terms_kron(inputs, grad_outputs, coef, whitening)
    dtype = _acc_dtype(inputs, grad_outputs)
    return u.to(dtype), d.to(dtype)


def _default_apply_terms_(*args):
    _check_apply_terms_(*args)
    ref.apply_terms_(*args)


_libraries: Dict[str, torch.library.Library] = {}


def define(namespace: str = NAMESPACE) -> str:
    """Define every op of :data:`SCHEMAS` under ``namespace``, once, with its fake and its
    default kernel. Returns the namespace; backends then register their kernels for the
    names (``TORCH_LIBRARY_IMPL`` in C++, ``torch.library.Library.impl`` in Python), which
    take precedence over the default kernel on their dispatch keys."""
    if namespace in _libraries:
        return namespace
    lib = torch.library.Library(namespace, "FRAGMENT")
    scope = globals()
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)
        torch.library.register_fake(f"{namespace}::{name}", scope[f"_fake_{name}"], lib=lib)
        lib.impl(name, scope[f"_default_{name}"], "CompositeExplicitAutograd")
    _libraries[namespace] = lib
    return namespace


# --------------------------------------------------------------------------------------
# The wrapper: the backend contract's entry points over one op namespace
# --------------------------------------------------------------------------------------
def _rows(jac: torch.Tensor) -> torch.Tensor:
    return jac if jac.dim() == 2 else jac.reshape(jac.shape[0], -1)


def _grouped(grad_outputs: torch.Tensor) -> torch.Tensor:
    return grad_outputs.unsqueeze(1) if grad_outputs.dim() == 2 else grad_outputs


def _ceiling(x) -> float:
    return _INF if x is None else float(x)


def _pred(ok, device) -> torch.Tensor:
    """``ok`` as a 0-d bool device tensor (a Python bool becomes one: a host-to-device copy
    of a constant, no synchronisation)."""
    if isinstance(ok, torch.Tensor):
        return ok
    return torch.tensor(bool(ok), dtype=torch.bool, device=device)


def _scalar(x, device) -> torch.Tensor:
    """A 0-d float64 device tensor from a tensor of one element or a Python number."""
    if isinstance(x, torch.Tensor):
        return x.reshape(()) if x.dim() else x
    return torch.tensor(float(x), dtype=F64, device=device)


class Kernels:
    """The nine entry points of the backend contract, bound to the ops of one namespace.

    ``name`` is the backend's name (``kk.backends()``); ``devices`` the device types it
    serves: an entry point refuses a tensor on another device type before the dispatcher
    could route it to another backend's kernel (``None``: no check, the dispatcher picks).
    ``hint`` is appended to that refusal. The ops' overloads are looked up once, here.
    """

    def __init__(self, name: str, namespace: str = NAMESPACE,
                 devices: Optional[Sequence[str]] = None, label: Optional[str] = None,
                 hint: Optional[str] = None):
        self.NAME = name
        self.namespace = define(namespace)
        self.ops = getattr(torch.ops, namespace)
        self._devices: Optional[Tuple[str, ...]] = tuple(devices) if devices else None
        self._label = label or name
        self._hint = hint
        # .default: the overload itself, one Python frame fewer per call (the loss step's
        # host code runs with cold caches; see ops/loss_update.py)
        self._op = {name: getattr(self.ops, name).default for name in SCHEMAS}
        self._resolved: Optional[Kernels] = None if self._devices else self

    def resolved(self) -> "Kernels":
        """These entry points without the device check, for a caller that chose them for its
        tensors' device (``kalman_kernels.backends.resolve`` checks the device once): the
        check reads ``tensor.device``, which costs about 10 us per call when the step's
        host code runs with cold caches (``benchmarks/host_overhead.py``)."""
        if self._resolved is None:
            twin = copy.copy(self)
            twin._devices, twin._resolved = None, twin
            self._resolved = twin
        return self._resolved

    def entry_points(self) -> Dict[str, object]:
        """name -> bound entry point, for a backend module to expose as its attributes."""
        return {name: getattr(self, name) for name in ENTRY_POINTS}

    def __repr__(self) -> str:
        return f"Kernels({self.NAME!r}, {self.namespace!r}, devices={self._devices})"

    def _refuse(self, op: str, arg: str, t: torch.Tensor) -> None:
        wanted = " or ".join(self._devices)
        raise RuntimeError(
            f"backend={self._label!r}: {op} needs {wanted} tensors, but {arg} is on "
            f"{t.device}; move the tensors to a {wanted} device or use backend='auto' (any "
            f"device)" + (f". {self._hint}" if self._hint else ""))

    def _check_device(self, op: str, arg: str, t: torch.Tensor) -> None:
        # the first tensor decides: a kernel then checks that every other is on its device
        if t.device.type not in self._devices:
            self._refuse(op, arg, t)

    # ------------------------------------------------------------------ entry points
    def innovation_cov_dense(self, jac: torch.Tensor, cov: torch.Tensor, forgetting: float = 1.0,
                             process_noise: float = 0.0) -> torch.Tensor:
        """H diag(P-) H^T, float64 (m, m); jac is (m, n) or (m, *shape), cov n elements."""
        if self._devices:
            self._check_device("innovation_cov_dense", "jac", jac)
        return self._op["innovation_cov_dense"](_rows(jac), cov.reshape(-1), float(forgetting),
                                                float(process_noise))

    def innovation_cov_kron(self, inputs: torch.Tensor, grad_outputs: torch.Tensor,
                            cov: torch.Tensor, forgetting: float = 1.0,
                            process_noise: float = 0.0) -> torch.Tensor:
        """S of a sample-grouped Kronecker block, (B K, B K) float64, without building H."""
        if self._devices:
            self._check_device("innovation_cov_kron", "inputs", inputs)
        return self._op["innovation_cov_kron"](inputs, _grouped(grad_outputs), cov,
                                               float(forgetting), float(process_noise))

    def fused_update_dense_(self, param: torch.Tensor, cov: torch.Tensor, jac: torch.Tensor,
                            coef: torch.Tensor, whitening: torch.Tensor, ok: torch.Tensor,
                            forgetting: float, process_noise: float, cov_floor: float,
                            cov_ceiling: float, information: bool) -> None:
        """In place when ``ok``: param += P- (.) H^T coef ; cov = rule(P-, ||F H_i||^2)."""
        if self._devices:
            self._check_device("fused_update_dense_", "param", param)
        self._op["fused_update_dense_"](param, cov, _rows(jac), coef, whitening,
                                        _pred(ok, param.device), float(forgetting),
                                        float(process_noise), float(cov_floor),
                                        _ceiling(cov_ceiling), bool(information))

    def fused_update_kron_(self, weight: torch.Tensor, cov: torch.Tensor, inputs: torch.Tensor,
                           grad_outputs: torch.Tensor, coef: torch.Tensor,
                           whitening: torch.Tensor, ok: torch.Tensor, forgetting: float,
                           process_noise: float, cov_floor: float, cov_ceiling: float,
                           information: bool) -> None:
        """The sample-grouped Kronecker form of :meth:`fused_update_dense_` (H never formed)."""
        if self._devices:
            self._check_device("fused_update_kron_", "weight", weight)
        self._op["fused_update_kron_"](weight, cov, inputs, _grouped(grad_outputs), coef,
                                       whitening, _pred(ok, weight.device), float(forgetting),
                                       float(process_noise), float(cov_floor),
                                       _ceiling(cov_ceiling), bool(information))

    def loss_quad_form(self, grads: Sequence[torch.Tensor], covs: Sequence[torch.Tensor],
                       forgetting: float = 1.0, process_noise: float = 0.0) -> torch.Tensor:
        """sum over tensors of g^T P- g, a 0-d float64 tensor on the tensors' device."""
        if len(grads) == 0:
            return torch.zeros((), dtype=F64)
        if self._devices:
            self._check_device("loss_quad_form", "grads[0]", grads[0])
        return self._op["loss_quad_form"](list(grads), list(covs), float(forgetting),
                                          float(process_noise))

    def loss_step_(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   covs: Sequence[torch.Tensor], coef, weight, ok, forgetting: float,
                   process_noise: float, cov_floor: float, cov_ceiling: float,
                   information: bool) -> None:
        """In place over every tensor when ``ok``: mu += coef P- (.) g ; P = rule(P-, weight g^2).
        ``coef`` and ``weight``: 0-d float64 device tensors (or Python numbers)."""
        if len(params) == 0:
            return
        device = params[0].device
        if self._devices:
            self._check_device("loss_step_", "params[0]", params[0])
        self._op["loss_step_"](list(params), list(grads), list(covs), _scalar(coef, device),
                               _scalar(weight, device), _pred(ok, device), float(forgetting),
                               float(process_noise), float(cov_floor), _ceiling(cov_ceiling),
                               bool(information))

    def step_terms_dense(self, jac: torch.Tensor, coef: torch.Tensor, whitening: torch.Tensor):
        """(H^T coef, diag(H^T F^T F H)), each (n,): the terms ranks all-reduce
        (docs/design.md, 2.5); float64 for a float64 Jacobian, else float32."""
        if self._devices:
            self._check_device("step_terms_dense", "jac", jac)
        return self._op["step_terms_dense"](_rows(jac), coef, whitening)

    def step_terms_kron(self, inputs: torch.Tensor, grad_outputs: torch.Tensor,
                        coef: torch.Tensor, whitening: torch.Tensor):
        """The two Kronecker step terms, each (d_out, d_in) (docs/design.md, 2.5)."""
        if self._devices:
            self._check_device("step_terms_kron", "inputs", inputs)
        return self._op["step_terms_kron"](inputs, _grouped(grad_outputs), coef, whitening)

    def apply_terms_(self, param: torch.Tensor, cov: torch.Tensor, direction: torch.Tensor,
                     diag_term: torch.Tensor, ok: torch.Tensor, forgetting: float,
                     process_noise: float, cov_floor: float, cov_ceiling: float,
                     information: bool) -> None:
        """In place when ``ok``: param += P- (.) direction ; cov = rule(P-, diag_term)."""
        if self._devices:
            self._check_device("apply_terms_", "param", param)
        self._op["apply_terms_"](param, cov, direction, diag_term, _pred(ok, param.device),
                                 float(forgetting), float(process_noise), float(cov_floor),
                                 _ceiling(cov_ceiling), bool(information))


#: The wrapper's entry points, in the order of the contract (a backend module exposes them).
ENTRY_POINTS = tuple(SCHEMAS)
assert all(callable(getattr(Kernels, name, None)) for name in ENTRY_POINTS), \
    "every op of SCHEMAS needs its wrapper in Kernels"
