"""KalmanNGD optimizer (being written in this session)."""
import torch


class KalmanNGD(torch.optim.Optimizer):
    pass
