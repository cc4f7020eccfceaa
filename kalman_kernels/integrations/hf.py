"""KalmanNGD under Hugging Face ``transformers.Trainer`` (README, "Using KalmanNGD with
trainers")."""
from __future__ import annotations

import warnings

import torch

try:
    from transformers import Trainer
except ImportError as exc:      # pragma: no cover - depends on the environment
    raise ImportError("kalman_kernels.integrations.KalmanTrainer needs transformers: pip "
                      "install 'kalman-kernels[trainers]' (or pip install transformers "
                      "accelerate)") from exc

from . import find_kalman


class KalmanTrainer(Trainer):
    """A ``transformers.Trainer`` for :class:`~kalman_kernels.KalmanNGD` in loss mode.

    The Trainer calls ``optimizer.step()`` without a closure, so the loss -- the
    observation -- must be handed over: ``training_step`` runs the Trainer's own step
    (forward, the loss divided over ``gradient_accumulation_steps``, backward, fp16 loss
    scaling through accelerate) and passes the loss it differentiated, unscaled, to
    ``KalmanNGD.observe``; the optimizer step then observes the sum over the accumulated
    micro-batches against the accumulated gradient.

    Pass the optimizer with ``optimizers=(KalmanNGD(model.parameters(), ...), None)``.
    Without a scheduler this Trainer keeps ``lr`` constant (``lr`` is KalmanNGD's step
    scale, 1.0 the exact update; the Trainer's default linear decay would shrink it to 0;
    pass ``optimizers=(opt, scheduler)`` for another). ``max_grad_norm > 0`` (the Trainer's
    default is 1.0) clips the gradient the filter observes and costs the single-pass loss
    step; KalmanNGD's ``gate`` does clipping's job: ``TrainingArguments(max_grad_norm=0)``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if find_kalman(self.optimizer) is None:
            raise TypeError("KalmanTrainer needs a KalmanNGD: pass "
                            "optimizers=(kk.KalmanNGD(model.parameters(), ...), None)")
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            warnings.warn(f"KalmanTrainer: max_grad_norm={self.args.max_grad_norm} clips the "
                          f"gradient KalmanNGD observes (and costs its single-pass loss "
                          f"step); use TrainingArguments(max_grad_norm=0) and KalmanNGD's "
                          f"gate for outlier batches", UserWarning, stacklevel=2)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer if optimizer is not None else self.optimizer, lambda _: 1.0)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Trainer.training_step returns loss.detach() of the very loss it called backward
        # on (after the gradient-accumulation division, before any fp16 scaling)
        loss = super().training_step(model, inputs, num_items_in_batch)
        find_kalman(self.optimizer).observe(loss)
        return loss
