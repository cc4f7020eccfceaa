"""Hand-offs between KalmanNGD and trainers that do not pass it the loss (README, "Using
KalmanNGD with trainers").

* :class:`KalmanTrainer` (needs ``transformers``): a Hugging Face ``Trainer`` whose
  ``training_step`` hands each micro-batch's loss to ``KalmanNGD.observe`` (the Trainer calls
  ``optimizer.step()`` without a closure).
* :class:`KalmanObserveLoss` (needs ``lightning``): a Lightning callback that observes every
  loss Lightning differentiates, so gradient accumulation (``accumulate_grad_batches``) and
  ``precision="16-mixed"`` (whose GradScaler calls ``step()`` without the closure) observe
  exactly what backward differentiated. Automatic optimisation without either works with no
  callback: Lightning passes a closure that returns the loss.

Both import their framework only when used (``pip install "kalman-kernels[trainers]"``).
"""
from __future__ import annotations

__all__ = ["KalmanTrainer", "KalmanObserveLoss", "find_kalman"]


def find_kalman(optimizer):
    """The :class:`~kalman_kernels.KalmanNGD` inside a trainer's optimizer wrapper
    (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), or None."""
    from ..optimizer import KalmanNGD
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, KalmanNGD):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer",
                                                                     None)
        seen += 1
    return None


def __getattr__(name):
    if name == "KalmanTrainer":
        from .hf import KalmanTrainer
        return KalmanTrainer
    if name == "KalmanObserveLoss":
        from .lightning import KalmanObserveLoss
        return KalmanObserveLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
