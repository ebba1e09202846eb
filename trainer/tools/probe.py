"""Linear probe: multinomial logistic regression on frozen features, the usual check of what an image encoder knows.

Full-batch L-BFGS in float64 from a zero start: no randomness, so the same features give the same accuracy. The
weights (not the bias) carry an L2 penalty, which keeps the problem strictly convex and the solution finite even on
linearly separable features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProbeConfig:
    weight_decay: float = 1e-3  # L2 penalty on the weights: loss = cross-entropy + weight_decay / 2 * |W|^2
    max_iter: int = 500  # L-BFGS iterations
    test_fraction: float = 0.5  # share of each class held out for scoring when no separate training set is given
    seed: int = 0  # of that split

    def __post_init__(self):
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


def split_indices(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices), stratified: each class holds out a seeded round(n * test_fraction) of its n
    samples, but keeps at least one on each side when it has two or more; a class of one sample only trains."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in labels.unique():  # sorted, so the draws do not depend on the samples' order of classes
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(len(members) * test_fraction)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    test_indices = torch.cat(test) if test else torch.empty(0, dtype=torch.long)
    if len(test_indices) == 0:
        raise ValueError("a train/test split needs a class with at least 2 samples")
    return torch.cat(train).sort().values, test_indices.sort().values


def fit(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    config: ProbeConfig = ProbeConfig(),
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [n_classes, D], bias [n_classes]) in float64 minimising mean cross-entropy + the L2 penalty.

    features: [N, D] floats; labels: [N] ints in [0, n_classes). device: where to fit (default: the features'),
    e.g. a GPU for ImageNet-sized sets; the result comes back on the CPU.
    """
    device = torch.device(device) if device is not None else features.device
    x = features.detach().to(device, torch.float64)
    y = labels.detach().to(device).long()
    weights = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights, bias],
        max_iter=config.max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weights.T + bias, y) + 0.5 * config.weight_decay * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach().cpu(), bias.detach().cpu()


def accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    n_classes: int | None = None,
    config: ProbeConfig = ProbeConfig(),
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy on the test set of a probe fitted on the training set (classes: 0..n_classes-1, by default
    up to the largest label seen). A tie between classes goes to the lower index."""
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise ValueError("the linear probe needs non-empty training and test sets")
    if n_classes is None:
        n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    weights, bias = fit(train_features, train_labels, n_classes, config, device)
    predicted = (test_features.cpu().to(torch.float64) @ weights.T + bias).argmax(dim=1)
    return (predicted == test_labels.long()).double().mean().item()
