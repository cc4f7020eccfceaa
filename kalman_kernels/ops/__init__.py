"""Functional, in-place Kalman steps (the layer between the optimizer and the kernels).

* :func:`kalman_update_` (:mod:`.kalman_update`): one step over parameter blocks
  (:class:`DenseBlock`, :class:`KronBlock`, :mod:`.blocks`) that share one observation;
* :func:`loss_update_` (:mod:`.loss_update`): the loss-observation step (docs/design.md, 2.2);
* :func:`class_head_update_` (:mod:`.class_head`): the class-structured step of a linear
  head over K classes (docs/design.md, 2.6), built from torch ops so it runs on any device;
* :func:`categorical_head_update_` (:mod:`.categorical_head`): the exact step of a softmax
  head observed through its categorical likelihood (same per-class structure).

The passes over the parameters go to a backend (``reference``, ``cpp``, ``triton``,
``cuda``); the small m x m work stays here, in float64, on the parameters' device, composed
once from the reference's equations in :mod:`._terms` for every path (single, sequential and
distributed batch steps; the loss step on host floats and on device tensors). Scale-out's
collectives are :mod:`kalman_kernels.distributed`. Nothing
is written until the inputs have been validated; no step reads a device value on the host
(docs/design.md, 4.2), and a non-finite observation leaves the state unchanged bit for bit.
"""
# Beyond ``__all__``, the ``X as X`` imports re-export on purpose: the argument checks the
# optimizer calls as ``ops.check_gate`` etc., the ``Block`` union type (for annotations) and
# ``runs_by_hyper``.
from ._common import KalmanInfo, StepHyper
from ._common import check_gate as check_gate
from ._common import check_hyper as check_hyper
from ._common import obs_noise_matrix as obs_noise_matrix
from .blocks import Block as Block
from .blocks import DenseBlock, KronBlock
from .categorical_head import CategoricalHeadInfo, categorical_head_update_
from .class_head import ClassHeadInfo, class_head_predictive_variance, class_head_update_
from .kalman_update import kalman_step_, kalman_update_
from .loss_update import loss_observation_step_, loss_update_
from .loss_update import runs_by_hyper as runs_by_hyper

__all__ = ["DenseBlock", "KronBlock", "KalmanInfo", "StepHyper", "kalman_update_",
           "loss_update_", "kalman_step_", "loss_observation_step_", "class_head_update_",
           "ClassHeadInfo", "class_head_predictive_variance", "categorical_head_update_",
           "CategoricalHeadInfo"]
