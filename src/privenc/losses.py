"""Losses of the adversarial game (Sec. 3): pure functions of logits and labels.

The classifiers (private and desirable) always minimize cross-entropy on the true labels.
The encoder's term against the private classifier is one of three, named by
``train.encoder_loss``:

* ``label_flip`` (the paper's): cross-entropy toward the *opposite of what the classifier
  currently predicts*. It pushes the classifier toward low confidence rather than toward
  confident mistakes, which a retrained attacker would simply invert (Sec. 3, Table 1).
* ``standard_gan``: log-loss toward the incorrect (flipped true) label, the usual GAN
  generator trick; the paper's baseline that looks private during training but is not.
* ``negative_ce``: minus the classifier's cross-entropy, the literal objective of eq. (1).

For K > 2 classes the paper's binary "opposite label" is generalized to a uniform target
over the K - 1 other classes; for K = 2 this is exactly the binary rule. All losses are
means over the batch. No state, no ``.item()``, no collectives: callers decide what to log.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from privenc.config import ENCODER_LOSSES
from privenc.data.tasks import UNKNOWN


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k p_k log softmax(logits)_k``.

    Cross-entropy against a target distribution rather than a class index: the label-flip
    and standard-GAN targets of the K-way generalization spread mass over K - 1 classes.
    ``logits`` and ``target_probs`` are (B, K); each target row should sum to one.
    """
    return _soft_cross_entropy_per_image(logits, target_probs).mean()


def _soft_cross_entropy_per_image(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    if logits.shape != target_probs.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target_probs {tuple(target_probs.shape)} differ")
    log_probs = F.log_softmax(logits.float(), dim=1)
    return -(target_probs.to(log_probs.dtype) * log_probs).sum(dim=1)


def _all_but(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Uniform distribution over every class except ``classes`` (one per row); (B, K)."""
    if num_classes < 2:
        raise ValueError(f"flipping a label needs at least 2 classes, got {num_classes}")
    others = 1.0 - F.one_hot(classes, num_classes).float()
    return others / (num_classes - 1)


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the true labels: what the private and desirable classifiers minimize
    (Sec. 3: theta_u = argmin E[L(Phi(E(x)), u)]), and what the encoder minimizes, weighted
    by alpha, for the desirable tasks.

    Labels of ``UNKNOWN`` (an empty value of a categorical attribute, on images that are in the
    run for another task) are left out of the mean; a batch without a known label gives 0.
    """
    loss = F.cross_entropy(logits.float(), labels, ignore_index=UNKNOWN)  # NaN if none is known
    return torch.where(labels.ne(UNKNOWN).any(), loss, torch.zeros_like(loss))


def mean_over_known(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of the per-image ``values`` over the images whose label is known; 0 if none is.

    With every label known it is exactly ``values.mean()`` (selected, not recomputed), so runs
    without unknown labels are unchanged to the last bit. No host synchronization.
    """
    known = labels.ne(UNKNOWN)
    masked = (values * known).sum() / known.sum().clamp(min=1)
    return torch.where(known.all(), values.mean(), masked)


def label_flip(logits: torch.Tensor) -> torch.Tensor:
    """The paper's encoder loss against the private classifier (Sec. 3, "label flip").

    Cross-entropy toward the opposite of the label the classifier currently predicts. The
    prediction (argmax) is taken on detached logits: it only chooses the target, and the
    gradient flows through the log-softmax alone. At the optimum the classifier is maximally
    uncertain, instead of confidently wrong. Binary: target = 1 - argmax. K-way: target uniform
    over the K - 1 classes other than the argmax (the binary rule for K = 2). Needs no labels.
    """
    predicted = logits.detach().argmax(dim=1)
    return soft_cross_entropy(logits, _all_but(predicted, logits.shape[1]))


def standard_gan(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The "standard GAN" baseline (Sec. 3 and Table 1): log-loss toward the incorrect label.

    Binary: target = 1 - true label. K-way: uniform over the classes other than the true one.
    It drives the classifier toward confident mistakes, so a retrained attacker recovers the
    private attribute by inverting them (Table 1: ~84% at verification).
    """
    per_image = _soft_cross_entropy_per_image(logits, _all_but(labels.clamp(min=0), logits.shape[1]))
    return mean_over_known(per_image, labels)


def negative_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the cross-entropy on the true labels: the encoder's side of the min-max in eq. (1).

    Unbounded below, hence unstable; kept as the paper's literal objective for comparison.
    """
    return -classifier_loss(logits, labels)


def encoder_private_loss(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The encoder's term against the private classifier, by ``train.encoder_loss`` name.

    ``label_flip`` ignores ``labels`` (it flips the classifier's prediction, not the truth).
    """
    if name == "label_flip":
        return label_flip(logits)
    if name == "standard_gan":
        return standard_gan(logits, labels)
    if name == "negative_ce":
        return negative_ce(logits, labels)
    raise ValueError(f"unknown encoder loss {name!r}; choose one of: {', '.join(ENCODER_LOSSES)}")


def kurtosis_over_batch(encodings: torch.Tensor) -> torch.Tensor:
    """The kurtosis E[(e - mean)^4] / var^2 over the batch (dim 0) of every element of
    ``encodings`` (B, ...): 3 for a normal distribution, 1/(p(1-p)) - 3 for a value that sits
    at one level for a fraction 1 - p of the images and another for p. An element that does not
    vary over the batch reads 0."""
    centred = encodings.float().flatten(1) - encodings.float().flatten(1).mean(0)
    m2 = centred.square().mean(0)
    return centred.square().square().mean(0) / (m2.square() + 1e-12)


def tail_penalty(encodings: torch.Tensor, limit: float) -> torch.Tensor:
    """Mean over the elements of ``encodings`` (B, ...; the encoder applies it to the values
    its tanh receives) of how far their kurtosis over the batch exceeds ``limit`` (0 where it
    does not): what ``train.kurtosis_limit`` adds to the encoder's loss.

    The output normalization holds every element to unit variance over the batch, and an encoder
    that hides everything can meet that with an output that is one constant for nearly every
    image and far off for a rare few: unit variance, no information about the rest
    (docs/results.md: the variance-only encoders on lfw-faces and intel-scenes). Such an
    element has a large kurtosis; bounding it forces the variance to be spread over the images."""
    return (kurtosis_over_batch(encodings) - limit).clamp(min=0).mean()
