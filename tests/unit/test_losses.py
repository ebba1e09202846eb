"""HNML and HelipLoss against hand-computed values, autograd and open_clip's ClipLoss and SigLipLoss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from helip.trainer.pairs.losses import HelipLoss, LossConfig, hnml

# A hand-checkable batch: B=3 pairs in D=2, every row of unit length.
#   images x0=(1,0) x1=(0,1) x2=(.6,.8); texts t0=(.8,.6) t1=(0,1) t2=(1,0)
# Cosine similarities S[a, b] = <x_a, t_b>:
#        t0    t1    t2
#   x0  0.80  0.00  1.00
#   x1  0.60  1.00  0.00
#   x2  0.96  0.80  0.60
IMAGES = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
TEXTS = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
# Anchor 0 has hard pair 2; anchor 1 has hard pair 0.
COUPLES = [[0, 2], [1, 0]]


def features(rows, requires_grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=requires_grad)


def couples(rows):
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


@pytest.mark.parametrize(
    ("margin", "expected"),
    [
        # (0,2): a = max(0, m + S[0,2] - S[0,0]) = m + 0.2     b = max(0, m + S[2,0] - S[0,0]) = m + 0.16
        # (1,0): a = max(0, m + S[1,0] - S[1,1]) = m - 0.4     b = max(0, m + S[0,1] - S[1,1]) = m - 1.0
        (0.0, (0.2 + 0.16 + 0.0 + 0.0) / 4),
        (0.2, (0.4 + 0.36 + 0.0 + 0.0) / 4),  # (1,0) still inside the margin: 0.19
        (0.5, (0.7 + 0.66 + 0.1 + 0.0) / 4),  # image->text of (1,0) becomes active: 0.365
        (2.0, (2.2 + 2.16 + 1.6 + 1.0) / 4),  # every hinge active: 1.74
    ],
)
def test_pair_hnml_matches_hand_computed_values(margin, expected):
    value = hnml(features(IMAGES), features(TEXTS), couples(COUPLES), margin)
    assert value.dim() == 0
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64))


def test_pair_hnml_gradient_matches_hand_derivation():
    # margin 0.5: active hinges a(0,2) = .5 + x0.t2 - x0.t0, b(0,2) = .5 + t0.x2 - t0.x0, a(1,0) = .5 + x1.t0 - x1.t1,
    # each weighted 1/4 (mean over 2 * M = 4 hinge terms).
    #   d/dx0 = (t2 - t0) - t0 = (.2,-.6) + (-.8,-.6) = (-.6,-1.2)   d/dx1 = t0 - t1 = (.8,-.4)   d/dx2 = t0 = (.8,.6)
    #   d/dt0 = -x0 + (x2 - x0) + x1 = (-1.4, 1.8)                    d/dt1 = -x1 = (0,-1)         d/dt2 = x0 = (1,0)
    images, texts = features(IMAGES, requires_grad=True), features(TEXTS, requires_grad=True)
    hnml(images, texts, couples(COUPLES), margin=0.5).backward()
    torch.testing.assert_close(images.grad, features([[-0.6, -1.2], [0.8, -0.4], [0.8, 0.6]]) / 4)
    torch.testing.assert_close(texts.grad, features([[-1.4, 1.8], [0.0, -1.0], [1.0, 0.0]]) / 4)


# Four pairs for the paper's form, so that anchors have normal negatives next to their hard pairs:
#   adds x3=(-1,0), t3=(.6,.8). S[a, b] = <x_a, t_b>:
#        t0    t1    t2    t3
#   x0  0.80  0.00  1.00  0.60
#   x1  0.60  1.00  0.00  0.80
#   x2  0.96  0.80  0.60  1.00
#   x3 -0.80  0.00 -1.00 -0.60
IMAGES_4 = IMAGES + [[-1.0, 0.0]]
TEXTS_4 = TEXTS + [[0.6, 0.8]]
# Anchor 0 has hard pairs {1, 3}; anchor 3 has hard pair {2}.
COUPLES_4 = [[0, 1], [0, 3], [3, 2]]


@pytest.mark.parametrize(
    ("margin", "expected"),
    [
        # anchor 0, I->T: least hard = min(S[0,1], S[0,3]) = 0; normal k=2: max(0, m + 1 - 0)          -> (m + 1) / 4
        #           T->I: least hard = min(S[1,0], S[3,0]) = -.8; normal k=2: max(0, m + .96 + .8)     -> (m + 1.76) / 4
        # anchor 3, I->T: least hard = S[3,2] = -1; normals k=0,1: (m - .8 + 1) + (m + 0 + 1)          -> (2m + 1.2) / 4
        #           T->I: least hard = S[2,3] = 1; normals: max(0, m + .6 - 1) + max(0, m + .8 - 1)    -> 0 for m < .2
        # hnml = mean over anchors of (I->T + T->I) / 2
        (0.0, ((1.0 + 1.76) / 8 + (1.2 + 0.0) / 8) / 2),  # 0.2475
        (0.1, ((1.1 + 1.86) / 8 + (1.4 + 0.0) / 8) / 2),  # 0.2725
    ],
)
def test_paper_hnml_matches_hand_computed_values(margin, expected):
    value = hnml(features(IMAGES_4), features(TEXTS_4), couples(COUPLES_4), margin, form="paper")
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64))


def test_paper_hnml_gradient_matches_hand_derivation():
    # margin 0, weights 1/(B * 2 anchors * 2 directions) = 1/16 on each active hinge:
    #   anchor 0 I->T: x0.t2 - x0.t1 (the argmin hard pair is t1)     anchor 0 T->I: t0.x2 - t0.x3
    #   anchor 3 I->T: (x3.t0 - x3.t2) + (x3.t1 - x3.t2)             anchor 3 T->I: inactive
    #   d/dx0 = t2 - t1 = (1,-1)     d/dx2 = t0 = (.8,.6)     d/dx3 = -t0 + t0 + t1 - 2 t2 = (-2, 1)   d/dx1 = 0
    #   d/dt0 = x2 - x3 + x3 = (.6,.8)   d/dt1 = -x0 + x3 = (-2, 0)   d/dt2 = x0 - 2 x3 = (3, 0)       d/dt3 = 0
    images, texts = features(IMAGES_4, requires_grad=True), features(TEXTS_4, requires_grad=True)
    hnml(images, texts, couples(COUPLES_4), 0.0, form="paper").backward()
    torch.testing.assert_close(images.grad, features([[1.0, -1.0], [0.0, 0.0], [0.8, 0.6], [-2.0, 1.0]]) / 16)
    torch.testing.assert_close(texts.grad, features([[0.6, 0.8], [-2.0, 0.0], [3.0, 0.0], [0.0, 0.0]]) / 16)


@pytest.mark.parametrize("form", ["pair", "paper"])
def test_hnml_gradcheck(form):
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(6, 5, generator=generator, dtype=torch.float64), dim=1).requires_grad_()
    texts = F.normalize(torch.randn(6, 5, generator=generator, dtype=torch.float64), dim=1).requires_grad_()
    hard = couples([[0, 1], [0, 2], [3, 4], [5, 0]])
    # A large margin keeps every hinge away from its kink, where the derivative is undefined.
    assert torch.autograd.gradcheck(lambda i, t: hnml(i, t, hard, margin=3.0, form=form), (images, texts))


@pytest.mark.parametrize("form", ["pair", "paper"])
def test_hnml_of_no_couples_is_zero(form):
    value = hnml(features(IMAGES), features(TEXTS), couples([]), 0.2, form=form)
    assert torch.equal(value, torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize(
    ("bad_couples", "message"),
    [
        (torch.tensor([[0, 1]], dtype=torch.int32), "int64"),
        (torch.tensor([0, 1]), r"\[M, 2\]"),
        (torch.tensor([[0, 3]]), r"\[0, 3\)"),
        (torch.tensor([[-1, 0]]), r"\[0, 3\)"),
        (torch.tensor([[1, 1]]), "itself"),
    ],
)
def test_hnml_rejects_malformed_couples(bad_couples, message):
    with pytest.raises(ValueError, match=message):
        hnml(features(IMAGES), features(TEXTS), bad_couples, 0.2)


def test_loss_config_rejects_bad_values():
    with pytest.raises(ValueError, match="margin"):
        LossConfig(margin=-0.1)
    with pytest.raises(ValueError, match="hnml_weight"):
        LossConfig(hnml_weight=-1.0)
    with pytest.raises(ValueError, match="hnml_form"):
        LossConfig(hnml_form="triplet")


def random_batch(batch_size=8, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(batch_size, dim, generator=generator), dim=1)
    texts = F.normalize(torch.randn(batch_size, dim, generator=generator), dim=1)
    return images, texts, torch.tensor(1 / 0.07)


def test_contrastive_part_is_open_clips_clip_loss():
    images, texts, scale = random_batch()
    losses = HelipLoss(LossConfig())(images, texts, scale, couples([[0, 1]]))
    assert torch.equal(losses["contrastive"], ClipLoss()(images, texts, scale))
    # and that is CLIP's symmetric cross-entropy, written out independently
    logits = scale * images @ texts.T
    labels = torch.arange(len(images))
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(losses["contrastive"], expected)


@pytest.mark.parametrize(
    ("config", "hard"),
    [
        (LossConfig(hnml_weight=1.0), None),
        (LossConfig(hnml_weight=1.0), couples([])),
        (LossConfig(hnml_weight=0.0), couples([[0, 1], [2, 3]])),
        (LossConfig(hnml_weight=0.0, hnml_form="paper"), couples([[0, 1], [2, 3]])),
    ],
)
def test_without_hnml_total_is_exactly_the_clip_loss(config, hard):
    images, texts, scale = random_batch()
    losses = HelipLoss(config)(images, texts, scale, hard)
    assert losses["total"] is losses["contrastive"]
    assert torch.equal(losses["total"], ClipLoss()(images, texts, scale))


def test_hnml_is_still_reported_when_its_weight_is_zero():
    images, texts, scale = random_batch()
    hard = couples([[0, 1], [2, 3]])
    losses = HelipLoss(LossConfig(margin=2.5, hnml_weight=0.0))(images, texts, scale, hard)
    torch.testing.assert_close(losses["hnml"], hnml(images, texts, hard, 2.5))
    assert losses["hnml"] > 0 and not losses["hnml"].requires_grad


@pytest.mark.parametrize("form", ["pair", "paper"])
def test_total_adds_weighted_hnml_and_backpropagates_through_both(form):
    images, texts, scale = random_batch()
    images.requires_grad_()
    texts.requires_grad_()
    hard = couples([[0, 1], [2, 3], [4, 0]])
    config = LossConfig(margin=2.5, hnml_weight=0.5, hnml_form=form)
    losses = HelipLoss(config)(images, texts, scale, hard)
    expected_hnml = hnml(images, texts, hard, 2.5, form=form)
    assert expected_hnml > 0
    torch.testing.assert_close(losses["hnml"], expected_hnml)
    torch.testing.assert_close(losses["total"], ClipLoss()(images, texts, scale) + 0.5 * expected_hnml)

    (grad_total,) = torch.autograd.grad(losses["total"], images, retain_graph=True)
    (grad_clip,) = torch.autograd.grad(losses["contrastive"], images, retain_graph=True)
    (grad_hnml,) = torch.autograd.grad(losses["hnml"], images)
    torch.testing.assert_close(grad_total, grad_clip + 0.5 * grad_hnml)
    assert grad_hnml.abs().sum() > 0


SIGLIP_BIAS = torch.tensor(-10.0)  # open_clip_train's starting logit_bias for --siglip


@pytest.mark.parametrize(
    ("config", "hard"),
    [
        (LossConfig(kind="siglip"), couples([[0, 1], [2, 3]])),  # margin loss off: λ = 0
        (LossConfig(kind="siglip", hnml_weight=1.0), None),  # no couples in the batch
    ],
)
def test_siglip_total_is_exactly_open_clips_siglip_loss(config, hard):
    images, texts, _ = random_batch()
    scale = torch.tensor(10.0)  # SigLIP's starting temperature
    losses = HelipLoss(config)(images, texts, scale, hard, logit_bias=SIGLIP_BIAS)
    assert losses["total"] is losses["contrastive"]
    assert torch.equal(losses["total"], SigLipLoss()(images, texts, scale, SIGLIP_BIAS))
    # and that is SigLIP's sigmoid loss written out: +1 labels on the diagonal, -1 elsewhere, summed over the
    # batch's B x B pairs and divided by B
    logits = scale * images @ texts.T + SIGLIP_BIAS
    labels = 2 * torch.eye(len(images)) - 1
    torch.testing.assert_close(losses["contrastive"], -F.logsigmoid(labels * logits).sum() / len(images))


@pytest.mark.parametrize("form", ["pair", "paper"])
def test_siglip_total_adds_weighted_hnml_on_the_batch_couples(form):
    images, texts, _ = random_batch()
    images.requires_grad_()
    scale, bias = torch.tensor(10.0), SIGLIP_BIAS.clone().requires_grad_()
    hard = couples([[0, 1], [2, 3], [4, 0]])
    config = LossConfig(kind="siglip", margin=2.5, hnml_weight=0.5, hnml_form=form)
    losses = HelipLoss(config)(images, texts, scale, hard, logit_bias=bias)
    expected_hnml = hnml(images, texts, hard, 2.5, form=form)  # the same margin term as with CLIP's loss
    assert expected_hnml > 0
    torch.testing.assert_close(losses["hnml"], expected_hnml)
    torch.testing.assert_close(losses["total"], SigLipLoss()(images, texts, scale, bias) + 0.5 * expected_hnml)
    (grad_total,) = torch.autograd.grad(losses["total"], images, retain_graph=True)
    (grad_siglip,) = torch.autograd.grad(losses["contrastive"], images, retain_graph=True)
    (grad_hnml,) = torch.autograd.grad(losses["hnml"], images, retain_graph=True)
    torch.testing.assert_close(grad_total, grad_siglip + 0.5 * grad_hnml)
    (grad_bias,) = torch.autograd.grad(losses["total"], bias)  # the bias learns through the sigmoid term
    assert grad_bias.abs() > 0


def test_siglip_needs_the_models_logit_bias():
    images, texts, scale = random_batch()
    with pytest.raises(ValueError, match="logit_bias"):
        HelipLoss(LossConfig(kind="siglip"))(images, texts, scale)


def test_loss_kind_is_checked_naming_the_field():
    with pytest.raises(ValueError, match="loss.kind"):
        LossConfig(kind="softmax")


def test_siglip_reaches_other_ranks_as_dist_impl_says():
    siglip = HelipLoss(LossConfig(kind="siglip", dist_impl="gather"), rank=1, world_size=2).contrastive_loss
    assert isinstance(siglip, SigLipLoss)
    assert (siglip.dist_impl, siglip.rank, siglip.world_size) == ("gather", 1, 2)
    with pytest.raises(ValueError, match="loss.dist_impl"):
        LossConfig(dist_impl="ring")
