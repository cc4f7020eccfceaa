"""A small offline demo: fit a classifier with KalmanNGD and with AdamW, side by side.

Run with ``python -m kalman_kernels.demo``. It uses scikit-learn's bundled 8x8 digits
(no download), a 64-32-10 MLP, and prints the test NLL / accuracy curves of both
optimizers. KalmanNGD runs in batch-observation mode: the K = 10 class probabilities of
each image are the observations (m*K per batch) with one-hot targets, so the filter
fits the predictive distribution directly (an extended Kalman filter through the
softmax). KalmanNGD gets no learning-rate search; AdamW (cross-entropy) gets a small
one on a validation split and its best lr is used.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

from .optimizer import KalmanNGD


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    mean, std = x[:1000].mean(0), x[:1000].std(0) + 0.1
    x = (x - mean) / std
    return (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), (x[1300:], y[1300:])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


@torch.no_grad()
def evaluate(model, x, y):
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train(name, model, train_set, eval_set, steps, batch, lr, seed, log_every):
    x, y = train_set
    g = torch.Generator().manual_seed(seed)
    curve = []
    if name == "kalman":
        opt = KalmanNGD(model.parameters(), init_cov=1e-2, obs_noise=0.03,
                        process_noise=1e-6).track(model)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb, yb = x[idx], y[idx]
        if name == "kalman":
            target = F.one_hot(yb, 10).float()
            opt.step(lambda: (model(xb).softmax(1), target))  # noqa: B023 - called in step()
        else:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        if step % log_every == 0 or step == steps:
            curve.append((step,) + evaluate(model, *eval_set))
    return curve


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_set, val_set, test_set = load_digits_split(args.seed)
    start = time.perf_counter()

    best_lr, best_acc = None, -1.0
    for lr in (1e-3, 3e-3, 1e-2, 3e-2):
        curve = train("adamw", make_model(args.seed), train_set, val_set, args.steps, args.batch,
                      lr, args.seed, args.steps)
        if curve[-1][2] > best_acc:
            best_lr, best_acc = lr, curve[-1][2]
    print(f"AdamW lr chosen on the validation split: {best_lr:g}")

    kalman = train("kalman", make_model(args.seed), train_set, test_set, args.steps, args.batch,
                   None, args.seed, args.log_every)
    adamw = train("adamw", make_model(args.seed), train_set, test_set, args.steps, args.batch,
                  best_lr, args.seed, args.log_every)
    print(f"\nDigits (sklearn, 8x8), MLP 64-32-10, batch {args.batch}, test split of "
          f"{len(test_set[0])} images, {torch.get_num_threads()} threads")
    print(f"{'step':>6} | {'KalmanNGD NLL':>13} {'acc':>6} | {'AdamW NLL':>10} {'acc':>6}")
    for (step, kl, ka), (_, al, aa) in zip(kalman, adamw):
        print(f"{step:>6} | {kl:>13.4f} {ka:>6.3f} | {al:>10.4f} {aa:>6.3f}")
    print(f"\nwall time {time.perf_counter() - start:.1f} s")
    return {"kalman": kalman, "adamw": adamw, "adamw_lr": best_lr}


if __name__ == "__main__":
    main()
