"""``KalmanNGD.describe()``: what the filter does with each parameter (docs/design.md, 3).

One row per parameter of the optimizer: its name (from a module given to ``describe`` or
tracked with ``track``; else its param group and position), shape and dtype, the block kind
its last step gave it, the memory of its covariance, and a note saying why where that is not
obvious (above all: why a parameter of a tracked layer got a dense block instead of a
Kronecker one). The kinds:

* ``kronecker``: the weight of a tracked ``nn.Linear``, observed through its sample-grouped
  Kronecker block (docs/design.md, 2.1);
* ``dense``: batch mode's dense Jacobian block (every other parameter the prediction
  reaches, the bias of a tracked layer, and a tracked weight that fell back);
* ``loss-diagonal``: loss mode, where every parameter the loss reaches is updated from its
  gradient (docs/design.md, 2.2);
* ``unused``: a trainable parameter the last observation did not reach: its covariance goes
  through the predict step alone;
* ``frozen``: ``requires_grad`` is False: the optimizer skips it;
* ``not stepped``: a trainable parameter that no step has seen yet (the closure's result
  decides between loss and batch mode).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch

KINDS = ("kronecker", "dense", "loss-diagonal", "unused", "frozen", "not stepped")


@dataclass(frozen=True)
class ParamReport:
    """One parameter's row of :class:`OptimizerReport`."""

    name: str                    #: "fc.weight", or "group 0, param 1" without a name
    group: int                   #: its param group
    index: int                   #: its position in the group
    shape: Tuple[int, ...]
    dtype: torch.dtype
    kind: str                    #: one of :data:`KINDS`
    cov_bytes: int               #: the covariance's memory (what it will take if not made yet)
    cov_allocated: bool          #: whether the covariance exists already
    note: Optional[str] = None   #: why, where the kind needs a reason (a dense fallback, ...)


@dataclass
class OptimizerReport:
    """The rows of :meth:`KalmanNGD.describe`, one per parameter; ``str()`` is a table."""

    rows: List[ParamReport] = field(default_factory=list)
    mode: Optional[str] = None   #: "loss" or "batch": the mode of the last step (None: none)

    def __iter__(self) -> Iterator[ParamReport]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> ParamReport:
        return self.rows[i]

    @property
    def total_cov_bytes(self) -> int:
        return sum(r.cov_bytes for r in self.rows)

    def count(self, kind: str) -> int:
        """The number of parameters of ``kind``."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return sum(r.kind == kind for r in self.rows)

    def as_dicts(self) -> List[dict]:
        """The rows as plain dicts (for logging or JSON: ``dtype`` as its name)."""
        out = []
        for r in self.rows:
            d = asdict(r)
            d["dtype"] = str(r.dtype).replace("torch.", "")
            d["shape"] = list(r.shape)
            out.append(d)
        return out

    def __str__(self) -> str:
        header = ("parameter", "shape", "dtype", "block", "cov memory", "note")
        lines = [(r.name, "x".join(map(str, r.shape)) or "scalar",
                  str(r.dtype).replace("torch.", ""), r.kind,
                  _bytes(r.cov_bytes) + ("" if r.cov_allocated or not r.cov_bytes else "*"),
                  r.note or "") for r in self.rows]
        widths = [max([len(h)] + [len(line[i]) for line in lines])
                  for i, h in enumerate(header[:-1])]

        def fmt(cells) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]

        mode = {"loss": "loss-observation mode", "batch": "batch-observation mode",
                None: "no step yet"}[self.mode]
        out = [f"KalmanNGD: {len(self.rows)} parameters, {mode}",
               fmt(header).rstrip(), fmt(["-" * w for w in widths] + ["----"]).rstrip()]
        out += [fmt(line).rstrip() for line in lines]
        kinds = ", ".join(f"{self.count(k)} {k}" for k in KINDS if self.count(k))
        out.append(f"total covariance memory {_bytes(self.total_cov_bytes)} ({kinds})"
                   + ("; * not allocated yet" if any(not r.cov_allocated and r.cov_bytes
                                                    for r in self.rows) else ""))
        return "\n".join(out)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def build_report(param_groups, state, captures, param_names, last_blocks,
                 module=None) -> OptimizerReport:
    """The report of ``KalmanNGD.describe``, from the optimizer's param groups and state,
    its tracked layers (``captures``), the names ``track`` recorded, and what its last step
    gave each parameter (``last_blocks``: mode, reached, unreached, and in batch mode the
    Kronecker weights, their biases and the fallbacks with their reasons). Reads no device
    value."""
    names = dict(param_names)
    if module is not None:
        names = {p: n for n, p in module.named_parameters(remove_duplicate=False)}
        names = {**param_names, **names}
    name_of = {id(p): n for p, n in names.items()}
    tracked = {id(layer.weight): layer for layer in captures}
    tracked_bias = {id(layer.bias) for layer in captures if layer.bias is not None}
    mode, reached, unreached, batch = last_blocks or (None, (), (), None)
    kron_weights, kron_biases, fallen = batch if batch is not None else ((), (), ())
    reached = {id(p) for p in reached}
    unreached = {id(p) for p in unreached}
    kron_w = {id(p) for p in kron_weights}
    kron_b = {id(p) for p in kron_biases}
    fallbacks = {id(p): why for p, why in fallen}
    rows = []
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            key = id(p)
            cov = state[p].get("cov") if p in state else None
            numel = p.numel() * (2 if p.is_complex() else 1)
            size = (cov.numel() * cov.element_size() if cov is not None else
                    0 if not p.requires_grad else
                    numel * (8 if p.dtype in (torch.float64, torch.complex128) else 4))
            note = None
            if not p.requires_grad:
                kind, note = "frozen", "requires_grad is False"
            elif key in unreached:
                kind = "unused"
                note = ("the last observation did not reach it: its covariance went "
                        "through the predict step alone")
            elif mode == "loss" and key in reached:
                kind = "loss-diagonal"
                if key in tracked:
                    note = "tracked, but track() applies to batch mode only"
            elif mode == "batch" and key in kron_w:
                kind = "kronecker"
            elif mode == "batch" and key in reached:
                kind = "dense"
                if key in kron_b:
                    note = "bias of a tracked layer: its Jacobian is the layer's D"
                elif key in fallbacks:
                    note = f"tracked, fell back to dense: {fallbacks[key]}"
                elif key in tracked:
                    note = "tracked, fell back to dense"
                elif key in tracked_bias:
                    note = "bias of a tracked layer that fell back to dense"
            elif key in tracked:
                kind, note = "not stepped", "tracked: a Kronecker block in batch mode"
            else:
                kind = "not stepped"
                if key in tracked_bias:
                    note = "bias of a tracked layer: a dense block in batch mode"
            if key in fallbacks and kind not in ("dense", "frozen"):
                note = f"tracked, fell back to dense: {fallbacks[key]}"
            rows.append(ParamReport(
                name=name_of.get(key, f"group {gi}, param {pi}"), group=gi, index=pi,
                shape=tuple(p.shape), dtype=p.dtype, kind=kind, cov_bytes=size,
                cov_allocated=cov is not None, note=note))
    return OptimizerReport(rows, mode)
