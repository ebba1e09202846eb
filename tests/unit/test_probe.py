"""The linear probe on features whose best achievable accuracy is known by hand."""

from __future__ import annotations

import pytest
import torch

from helip.trainer.tools import probe


def _labels(*values: int) -> torch.Tensor:
    return torch.tensor(values)


def test_separable_features_score_one():
    """Two clusters on either side of the line x = y, with a margin of 0.5: a linear rule gets every point."""
    generator = torch.Generator().manual_seed(0)
    offsets = torch.rand(40, 2, generator=generator) - 0.5
    features = torch.cat([offsets[:20] + torch.tensor([-1.0, 1.0]), offsets[20:] + torch.tensor([1.0, -1.0])])
    labels = torch.tensor([0] * 20 + [1] * 20)
    train, test = probe.split_indices(labels, 0.5, seed=1)
    acc = probe.accuracy(features[train], labels[train], features[test], labels[test])
    assert acc == 1.0


def test_three_separable_classes_score_one():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, -1.0], [-0.9, -1.1]])
    labels = _labels(0, 0, 1, 1, 2, 2)
    assert probe.accuracy(features, labels, features, labels) == 1.0


def test_overlapping_points_cap_accuracy_at_three_quarters():
    """The fourth test point sits exactly on the third but carries the other label: no rule, linear or not, can
    get both; the probe fitted on clean clusters gets the other three, so exactly 3/4."""
    train_features = torch.tensor([[-1.0, 0.0]] * 3 + [[1.0, 0.0]] * 3)
    train_labels = _labels(0, 0, 0, 1, 1, 1)
    test_features = torch.tensor([[-1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    test_labels = _labels(0, 0, 1, 0)
    assert probe.accuracy(train_features, train_labels, test_features, test_labels) == 0.75


def test_constant_features_predict_the_majority_class():
    """Features that say nothing leave the bias alone to decide: every test point gets the training majority (1),
    which is right for 2 of the 4 test points."""
    train_labels = _labels(0, 1, 1, 1, 2)
    test_labels = _labels(1, 0, 1, 2)
    features = torch.ones(5, 3)
    assert probe.accuracy(features, train_labels, torch.ones(4, 3), test_labels) == 0.5


def test_fit_is_deterministic_and_uses_every_class():
    features = torch.randn(30, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(30) % 3
    first = probe.fit(features, labels, n_classes=5)
    second = probe.fit(features, labels, n_classes=5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].shape == (5, 4) and first[1].shape == (5,)


def test_weight_decay_shrinks_the_weights():
    features = torch.tensor([[-1.0], [-0.5], [0.5], [1.0]])
    labels = _labels(0, 0, 1, 1)
    weak, _ = probe.fit(features, labels, 2, probe.ProbeConfig(weight_decay=1e-3))
    strong, _ = probe.fit(features, labels, 2, probe.ProbeConfig(weight_decay=1.0))
    assert strong.norm() < weak.norm()


def test_split_is_stratified_seeded_disjoint_and_whole():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 2 + [3])
    train, test = probe.split_indices(labels, 0.3, seed=7)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(len(labels)))
    # Per class: 3 of 10, 1 of 4, 1 of 2 (each side keeps one), 0 of 1 (a lone sample only trains).
    assert torch.bincount(labels[test], minlength=4).tolist() == [3, 1, 1, 0]
    again = probe.split_indices(labels, 0.3, seed=7)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    held_out = {tuple(probe.split_indices(labels, 0.3, seed=s)[1].tolist()) for s in range(6)}
    assert len(held_out) > 1  # the seed matters
    with pytest.raises(ValueError, match="at least 2 samples"):
        probe.split_indices(torch.tensor([0, 1, 2]), 0.5, seed=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"max_iter": 0}, "max_iter"),
        ({"test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        probe.ProbeConfig(**kwargs)
