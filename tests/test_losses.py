"""Each loss against a hand computation on small explicit logits (Sec. 3 of the paper)."""

from __future__ import annotations

import math

import pytest
import torch

from privenc.losses import (
    classifier_loss,
    encoder_private_loss,
    kurtosis_over_batch,
    label_flip,
    negative_ce,
    soft_cross_entropy,
    standard_gan,
    tail_penalty,
)
from privenc.norms import PerLocationBatchNorm


def log_softmax(row: list[float]) -> list[float]:
    """Plain-Python log-softmax, independent of the torch code under test."""
    log_z = math.log(sum(math.exp(v) for v in row))
    return [v - log_z for v in row]


BINARY = [[2.0, 0.5], [-1.0, 1.0], [0.3, 0.2]]
"""Predictions: class 0, class 1, class 0."""
BINARY_LABELS = [0, 0, 1]

THREE_WAY = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
"""Predictions: class 1, class 2."""
THREE_WAY_LABELS = [0, 2]


def test_classifier_loss_is_cross_entropy_on_true_labels() -> None:
    expected = -sum(log_softmax(row)[y] for row, y in zip(BINARY, BINARY_LABELS)) / 3
    got = classifier_loss(torch.tensor(BINARY), torch.tensor(BINARY_LABELS))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_soft_cross_entropy_by_hand() -> None:
    logits = [[1.0, 0.0, -1.0]]
    target = [[0.25, 0.25, 0.5]]
    lp = log_softmax(logits[0])
    expected = -(0.25 * lp[0] + 0.25 * lp[1] + 0.5 * lp[2])
    assert soft_cross_entropy(torch.tensor(logits), torch.tensor(target)).item() == pytest.approx(expected, abs=1e-6)


def test_label_flip_binary_targets_the_opposite_of_the_prediction() -> None:
    # Labels play no part: predictions 0, 1, 0 give targets 1, 0, 1.
    lp = [log_softmax(row) for row in BINARY]
    expected = -(lp[0][1] + lp[1][0] + lp[2][1]) / 3
    assert label_flip(torch.tensor(BINARY)).item() == pytest.approx(expected, abs=1e-6)
    assert encoder_private_loss("label_flip", torch.tensor(BINARY), torch.tensor(BINARY_LABELS)).item() == \
        pytest.approx(expected, abs=1e-6)


def test_label_flip_k_way_is_uniform_over_the_other_classes() -> None:
    lp = [log_softmax(row) for row in THREE_WAY]
    row0 = -(lp[0][0] + lp[0][2]) / 2  # argmax 1
    row1 = -(lp[1][0] + lp[1][1]) / 2  # argmax 2
    assert label_flip(torch.tensor(THREE_WAY)).item() == pytest.approx((row0 + row1) / 2, abs=1e-6)


def test_label_flip_gradient_flows_to_logits_but_not_through_the_argmax() -> None:
    logits = torch.tensor(BINARY, requires_grad=True)
    label_flip(logits).backward()
    assert logits.grad is not None
    # d/dz of mean_b CE(z_b, t_b) is (softmax(z_b) - t_b) / B with t fixed: the target chosen by
    # the argmax acts as a constant.
    targets = [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    for b, row in enumerate(BINARY):
        probs = [math.exp(v) for v in log_softmax(row)]
        for k in range(2):
            assert logits.grad[b, k].item() == pytest.approx((probs[k] - targets[b][k]) / 3, abs=1e-6)


def test_label_flip_minimum_is_an_uncertain_classifier() -> None:
    # Binary: a confident classifier (either way) costs more than an uncertain one, which is
    # the point of the loss (Sec. 3): no confident mistakes for an attacker to invert.
    uncertain = label_flip(torch.tensor([[0.0, 0.0]])).item()
    assert uncertain == pytest.approx(math.log(2), abs=1e-6)
    assert label_flip(torch.tensor([[3.0, 0.0]])).item() > uncertain
    assert label_flip(torch.tensor([[0.0, 3.0]])).item() > uncertain


def test_standard_gan_binary_targets_the_flipped_true_label() -> None:
    lp = [log_softmax(row) for row in BINARY]
    expected = -(lp[0][1] + lp[1][1] + lp[2][0]) / 3
    got = standard_gan(torch.tensor(BINARY), torch.tensor(BINARY_LABELS))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert encoder_private_loss("standard_gan", torch.tensor(BINARY), torch.tensor(BINARY_LABELS)).item() == \
        pytest.approx(expected, abs=1e-6)


def test_standard_gan_k_way_is_uniform_over_the_wrong_classes() -> None:
    lp = [log_softmax(row) for row in THREE_WAY]
    row0 = -(lp[0][1] + lp[0][2]) / 2  # true label 0
    row1 = -(lp[1][0] + lp[1][1]) / 2  # true label 2
    got = standard_gan(torch.tensor(THREE_WAY), torch.tensor(THREE_WAY_LABELS))
    assert got.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)


def test_negative_ce_is_the_mean_log_probability_of_the_true_label() -> None:
    # Row [1, 2, 0.5], label 0: log(e^1 + e^2 + e^0.5) = 2.464369, log p = 1 - 2.464369 = -1.464369.
    # Row [0, -1, 3], label 2: log(e^0 + e^-1 + e^3) = 3.065884, log p = 3 - 3.065884 = -0.065884.
    # The encoder minimizes -CE = mean log p = (-1.464369 - 0.065884) / 2.
    expected = -0.765126
    logits, labels = torch.tensor(THREE_WAY), torch.tensor(THREE_WAY_LABELS)
    assert negative_ce(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert encoder_private_loss("negative_ce", logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_unknown_encoder_loss_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="label_flip, standard_gan, negative_ce"):
        encoder_private_loss("wasserstein", torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))


def test_balanced_accuracy_is_the_mean_recall_and_ignores_unlabelled():
    from privenc.adversarial import balanced_accuracy

    labels = torch.tensor([0, 0, 0, 1, -1])
    # always "0": recall 1 on class 0, 0 on class 1 -> 0.5 (plain accuracy would say 0.75)
    assert balanced_accuracy(torch.tensor([0, 0, 0, 0, 0]), labels) == 0.5
    assert balanced_accuracy(torch.tensor([0, 1, 0, 1, 1]), labels) == pytest.approx((2 / 3 + 1) / 2)


def test_unknown_labels_are_left_out_of_the_losses_that_use_labels() -> None:
    # -1 marks an image whose categorical value is empty (it is in the run for another task).
    logits = torch.tensor(THREE_WAY + [[0.7, 0.1, -0.4]])
    labels = torch.tensor(THREE_WAY_LABELS + [-1])
    known_logits, known = torch.tensor(THREE_WAY), torch.tensor(THREE_WAY_LABELS)
    for loss in (classifier_loss, standard_gan, negative_ce):
        assert loss(logits, labels).item() == pytest.approx(loss(known_logits, known).item(), abs=1e-6)
    # With every label known the result is bit for bit the plain mean, so runs are unchanged.
    assert torch.equal(classifier_loss(known_logits, known),
                       torch.nn.functional.cross_entropy(known_logits, known))


def test_a_batch_without_a_known_label_gives_zero_loss_and_finite_gradients() -> None:
    logits = torch.tensor(THREE_WAY, requires_grad=True)
    for loss in (classifier_loss, standard_gan, negative_ce):
        value = loss(logits, torch.tensor([-1, -1]))
        value.backward()
        assert value.item() == 0.0 and torch.isfinite(logits.grad).all()
        logits.grad = None


def test_kurtosis_over_batch_by_hand() -> None:
    torch.manual_seed(0)
    two_levels = torch.zeros(100, 1)
    two_levels[:10] = 5.0  # 10% of the images away from the rest: 1 / (0.1 * 0.9) - 3
    normal = torch.randn(200_000, 1)
    constant = torch.full((100, 1), 0.7)
    values = kurtosis_over_batch(torch.cat([two_levels, normal[:100], constant], dim=1))
    assert values[0].item() == pytest.approx(1 / 0.09 - 3, rel=1e-5)
    assert values[2].item() == pytest.approx(0.0, abs=1e-6)
    assert kurtosis_over_batch(normal).item() == pytest.approx(3.0, abs=0.05)
    assert kurtosis_over_batch(torch.zeros(8, 2, 3, 3)).shape == (18,)  # every element of an encoding


def test_tail_penalty_is_the_mean_excess_and_zero_below_the_limit() -> None:
    two_levels = torch.zeros(100, 2)
    two_levels[:10, 0] = 1.0   # kurtosis 8.11
    two_levels[:50, 1] = 1.0   # half and half: kurtosis 1
    assert tail_penalty(two_levels, 3.0).item() == pytest.approx((1 / 0.09 - 3 - 3) / 2, rel=1e-5)
    assert tail_penalty(two_levels, 10.0).item() == 0.0


def test_tail_penalty_spreads_an_output_that_hides_its_variance_in_a_few_images() -> None:
    """The collapse it is there for: behind a per-location BN without affine (the encoder's
    output layer), every element has unit variance over the batch, but one that is constant for
    63 images of 64 has a huge kurtosis; descending the penalty alone spreads it out."""
    torch.manual_seed(0)
    raw = torch.randn(64, 2, 3, 3) * 1e-3
    raw[0] += 1.0  # one image carries all the variance
    raw.requires_grad_(True)
    norm = PerLocationBatchNorm(2, 3, 3, scale=False, bias=False).train()
    optimizer = torch.optim.Adam([raw], lr=0.05)
    start = kurtosis_over_batch(torch.tanh(norm(raw))).median().item()
    for _ in range(200):
        optimizer.zero_grad()
        penalty = tail_penalty(torch.tanh(norm(raw)), 3.0)
        penalty.backward()
        optimizer.step()
    end = kurtosis_over_batch(torch.tanh(norm(raw)))
    assert start > 30
    assert end.max().item() < 3.2, end
