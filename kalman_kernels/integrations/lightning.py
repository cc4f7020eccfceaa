"""KalmanNGD under PyTorch Lightning (README, "Using KalmanNGD with trainers")."""
from __future__ import annotations

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:      # pragma: no cover - depends on the environment
    raise ImportError("kalman_kernels.integrations.KalmanObserveLoss needs lightning: pip "
                      "install 'kalman-kernels[trainers]' (or pip install lightning)") from exc

from . import find_kalman


class KalmanObserveLoss(Callback):
    """Observe every loss Lightning differentiates (``on_before_backward``).

    Needed where Lightning's closure alone does not carry the observation:
    ``accumulate_grad_batches > 1`` (Lightning runs the first micro-batches' backward
    outside ``optimizer.step``, and the closure returns only the last one's loss) and
    ``precision="16-mixed"`` (its GradScaler runs the closure itself and calls ``step()``
    without it). Under 16-mixed Lightning hands this hook the scaled loss; the callback
    divides the scale out (``scaler.get_scale()``, one host read per micro-batch), so the
    observation is never a scaled loss. Harmless without them: observed losses replace the
    closure's return value, which is the same loss.
    """

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            loss = loss.detach() / scaler.get_scale()
        for optimizer in trainer.optimizers:
            opt = find_kalman(optimizer)
            if opt is not None:
                opt.observe(loss.detach().reshape(()))
