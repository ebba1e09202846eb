"""HELIP's training objective: CLIP's (or SigLIP's) contrastive loss plus the Hard Negative Margin Loss (HNML).

Reference: H. Wang et al., "Getting More Juice Out of Your Data: Hard Pair Refinement Enhances
Visual-Language Models Without Extra Data" (HELIP), arXiv:2305.05208 (v3, NAACL 2025; v2 was titled
"Boosting Visual-Language Models by Exploiting Hard Pairs").

The method in our words. A batch holds pairs (I_k, T_k) with L2-normalised embeddings x_k (image) and
t_k (text); s(a, b) = <a, b> is their cosine similarity, *not* scaled by the CLIP temperature. Some pairs
are *anchors* and, for an anchor i, the batch also holds some of its hard pairs H_i (pairs that Hard Pair
Mining found close to i in the joint image-text space). A hard couple (i, j) says "j ∈ H_i". The total
objective is

    total = contrastive + λ · hnml

where `contrastive` is open_clip's symmetric InfoNCE over the whole (rank-gathered) batch (`LossConfig.kind`
"clip") or open_clip's SigLIP sigmoid loss ("siglip": every image-text pair of the batch is a binary decision,
with the model's learned logit_bias; other ranks' text features are passed round as negatives), and λ is
`LossConfig.hnml_weight`. Two readings of HNML are implemented; `LossConfig.hnml_form` picks one.

* ``"pair"`` (default; the design document, §1 "Loss"): every couple (i, j) asks the anchor's own positive pair to beat
  the hard pair by a margin m, in both retrieval directions:

      a_ij = max(0, m + s(I_i, T_j) − s(I_i, T_i))     image i must prefer its own text to T_j
      b_ij = max(0, m + s(T_i, I_j) − s(T_i, I_i))     text i must prefer its own image to I_j
      hnml = 1/(2M) Σ_(i,j) (a_ij + b_ij)              mean over the 2·M hinge terms of M couples

  Couples are directed: (i, j) makes i the anchor. A caller that wants j to be pushed from i as well
  passes (j, i) too.

* ``"paper"``: the paper's Eq. 6 as third-party code quotes it (the paper's own section could not be
  read when this was written: check it before relying on this form). It orders *negatives* rather than
  the positive against a negative: the anchor's normal negatives (batch pairs that are neither i nor in
  H_i) must be less similar to it than its least similar hard pair,

      ℓ_i^{I→T} = 1/B Σ_{k ∉ H_i ∪ {i}} max(0, m + s(I_i, T_k) − min_{j ∈ H_i} s(I_i, T_j))

  with B the local batch size and m = 0 in the paper. We add the text→image twin ℓ_i^{T→I} (swap the
  roles of images and texts) and average hnml = mean_i (ℓ_i^{I→T} + ℓ_i^{T→I}) / 2 over the anchors that
  have at least one couple.

Both forms use only the *local* batch: a hard pair is placed in the same rank's batch as its anchor, so
no gather is needed and `hard_couples` index local rows.

HNML is the same for both kinds: it reads cosine similarities, not the loss's scaled (and biased) logits.

Bit-exactness contract: when λ == 0 or there are no couples, `total` *is* the contrastive tensor (the same
object), not `contrastive + 0 * hnml`, so turning HELIP off reproduces plain CLIP (or SigLIP) training bit for bit
(and a NaN/inf in an unused HNML can never leak into the gradient).
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss, SigLipLoss

from helip.trainer.pairs.loss_config import HNML_FORMS, HnmlForm, LossConfig


def check_hard_couples(hard_couples: torch.Tensor, batch_size: int) -> None:
    """Raise ValueError unless `hard_couples` is an int64 [M, 2] of (anchor, hard pair) local row indices.

    Shape and dtype are always checked; the values (in range, anchor != hard pair) only when the tensor is
    on the CPU, where reading them costs no device synchronisation. The batch composer builds couples on
    the CPU, so they are checked where they enter.
    """
    if hard_couples.dtype != torch.long or hard_couples.dim() != 2 or hard_couples.shape[1] != 2:
        raise ValueError(
            f"hard_couples must be an int64 tensor of shape [M, 2], got {hard_couples.dtype} "
            f"{tuple(hard_couples.shape)}"
        )
    if hard_couples.device.type != "cpu" or hard_couples.numel() == 0:
        return
    if int(hard_couples.min()) < 0 or int(hard_couples.max()) >= batch_size:
        raise ValueError(
            f"hard_couples index rows of the local batch: values must be in [0, {batch_size}), got "
            f"[{int(hard_couples.min())}, {int(hard_couples.max())}]"
        )
    self_couples = hard_couples[:, 0] == hard_couples[:, 1]
    if bool(self_couples.any()):
        raise ValueError(f"hard_couples pair an anchor with itself: {hard_couples[self_couples].tolist()}")


def _hnml_pair(similarity: torch.Tensor, hard_couples: torch.Tensor, margin: float) -> torch.Tensor:
    anchors, hard = hard_couples[:, 0], hard_couples[:, 1]
    positive = similarity[anchors, anchors]
    image_to_text = torch.relu(margin + similarity[anchors, hard] - positive)
    # similarity[k, i] = s(I_k, T_i) = s(T_i, I_k): the text→image score of text i against image k.
    text_to_image = torch.relu(margin + similarity[hard, anchors] - positive)
    return (image_to_text.sum() + text_to_image.sum()) / (2 * hard_couples.shape[0])


def _hnml_paper(similarity: torch.Tensor, hard_couples: torch.Tensor, margin: float) -> torch.Tensor:
    batch_size = similarity.shape[0]
    is_hard = torch.zeros(batch_size, batch_size, dtype=torch.bool, device=similarity.device)
    is_hard[hard_couples[:, 0], hard_couples[:, 1]] = True
    anchors = is_hard.any(dim=1).nonzero().squeeze(1)
    is_hard = is_hard[anchors]  # [A, B]: row a marks H_{anchors[a]}
    is_normal = ~is_hard
    is_normal[torch.arange(anchors.numel(), device=similarity.device), anchors] = False

    def one_direction(rows: torch.Tensor) -> torch.Tensor:
        # rows[a, k]: similarity of anchor a's query (its image, or its text) to candidate k's other modality.
        inf = torch.tensor(float("inf"), dtype=rows.dtype, device=rows.device)
        least_hard = torch.where(is_hard, rows, inf).amin(dim=1, keepdim=True)
        hinge = torch.relu(margin + rows - least_hard)
        # where(), not a multiplication by the mask, so that masked entries also carry no gradient.
        hinge = torch.where(is_normal, hinge, torch.zeros_like(hinge))
        return hinge.sum(dim=1) / batch_size

    image_to_text = one_direction(similarity[anchors])
    text_to_image = one_direction(similarity[:, anchors].T)
    return ((image_to_text + text_to_image) / 2).mean()


def hnml(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    hard_couples: torch.Tensor,
    margin: float,
    form: HnmlForm = "pair",
) -> torch.Tensor:
    """Hard Negative Margin Loss of one local batch (see the module docstring for both forms).

    image_features, text_features: [B, D], L2-normalised rows (not re-normalised here); row k is pair k.
    hard_couples: int64 [M, 2] of (anchor row, hard-pair row), on any device; M == 0 gives a zero scalar.
    Returns a scalar tensor in the features' dtype, differentiable w.r.t. both feature tensors.
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"image_features and text_features must both be [B, D], got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    if form not in HNML_FORMS:
        raise ValueError(f"form must be one of {HNML_FORMS}, got {form!r}")
    check_hard_couples(hard_couples, image_features.shape[0])
    if hard_couples.shape[0] == 0:
        return torch.zeros((), dtype=image_features.dtype, device=image_features.device)
    hard_couples = hard_couples.to(image_features.device)
    # [B, B] cosine similarities, similarity[a, b] = s(I_a, T_b); the temperature is not applied because
    # the margin is defined on cosine similarity.
    similarity = image_features @ text_features.T
    if form == "pair":
        return _hnml_pair(similarity, hard_couples, margin)
    return _hnml_paper(similarity, hard_couples, margin)


class HelipLoss(torch.nn.Module):
    """contrastive (open_clip's ClipLoss, or its SigLipLoss when config.kind is "siglip") + λ · HNML. Holds no
    parameters: SigLIP's logit_bias, like the temperature, is the model's and comes in with each call.

    rank, world_size: this process's place among the data-parallel ranks; the contrastive loss reaches across
    them as open_clip_train's does (ClipLoss gathers features, SigLipLoss passes text features between ranks as
    config.dist_impl says), HNML stays local.
    """

    def __init__(self, config: LossConfig | None = None, rank: int = 0, world_size: int = 1) -> None:
        config = config if config is not None else LossConfig()
        super().__init__()
        self.config = config
        if config.kind == "siglip":
            self.contrastive_loss = SigLipLoss(rank=rank, world_size=world_size, dist_impl=config.dist_impl)
        else:
            self.contrastive_loss = ClipLoss(
                local_loss=config.local_loss,
                gather_with_grad=config.gather_with_grad,
                cache_labels=True,
                rank=rank,
                world_size=world_size,
            )

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        hard_couples: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the losses of one local batch.

        image_features, text_features: [B, D] L2-normalised (as open_clip's model returns them).
        logit_scale: scalar tensor, already exponentiated (open_clip's `logit_scale.exp()` output).
        hard_couples: int64 [M, 2] of (anchor, hard pair) rows of the local batch, or None.
        logit_bias: the model's learned bias (open_clip's output "logit_bias"); required by "siglip", unused by
            "clip".
        Returns {"contrastive", "hnml", "total"}, scalars. `total` is the `contrastive` tensor itself when
        λ == 0 or there are no couples; `hnml` is then a detached value for logging only (zero when there
        are no couples).
        """
        if self.config.kind == "siglip":
            if logit_bias is None:
                raise ValueError(
                    "loss.kind siglip needs the model's logit_bias: build the model with open_clip's "
                    "init_logit_bias (helip's build_model(..., siglip=True)) and pass its output's logit_bias"
                )
            contrastive = self.contrastive_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            contrastive = self.contrastive_loss(image_features, text_features, logit_scale)
        no_couples = hard_couples is None or hard_couples.shape[0] == 0
        if no_couples:
            zero = torch.zeros((), dtype=contrastive.dtype, device=contrastive.device)
            return {"contrastive": contrastive, "hnml": zero, "total": contrastive}
        if self.config.hnml_weight == 0:
            with torch.no_grad():
                margin_loss = hnml(
                    image_features, text_features, hard_couples, self.config.margin, self.config.hnml_form
                )
            return {"contrastive": contrastive, "hnml": margin_loss, "total": contrastive}
        margin_loss = hnml(image_features, text_features, hard_couples, self.config.margin, self.config.hnml_form)
        total = contrastive + self.config.hnml_weight * margin_loss
        return {"contrastive": contrastive, "hnml": margin_loss, "total": total}
