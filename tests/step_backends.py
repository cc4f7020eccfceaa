"""The backends that run a whole step (ops.kalman_update_ / loss_update_) on CPU tensors here.

A backend module that loads but does not serve CPU tensors (an extension of an older op
contract, or a GPU backend) is left out; the cpp backend joins as soon as it declares CPU in
its DEVICES, the Triton interpreter when TRITON_INTERPRET=1.
"""
import torch

import kalman_kernels as kk
from kalman_kernels.backends import resolve


def step_backends():
    names = []
    for name, ok in kk.backends().items():
        if not ok:
            continue
        try:
            resolve(name, torch.device("cpu"))
        except (RuntimeError, ValueError):
            continue
        names.append(name)
    return names
