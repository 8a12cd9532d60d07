"""Calibrated decision rules (``verify.calibrate``): a threshold tuned on validation and each
split normalized by its own BatchNorm statistics (AdaBN)."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from privenc.attackers import (
    Decision,
    Encoded,
    _final_scores,
    adapted,
    best_decision,
    fit_classifier,
    fit_scaling,
    information_bits,
    tune_threshold,
)
from privenc.config import load_config
from privenc.models import build_attacker


def test_a_tuned_threshold_finds_a_shifted_boundary_and_keeps_argmax_on_ties():
    labels = torch.tensor([0] * 50 + [1] * 50)
    margin = torch.cat([torch.linspace(1.0, 2.0, 50), torch.linspace(2.5, 3.5, 50)])  # argmax: all class 1
    threshold = tune_threshold(margin, labels)
    assert 2.0 <= threshold < 2.5
    assert tune_threshold(torch.cat([-margin[:50], margin[50:]]), labels) == 0.0  # argmax already perfect
    logits = {"running": torch.stack([torch.zeros(100), margin], 1)}
    decision, score = best_decision(logits, labels, calibrate=True)
    assert decision.rule == "threshold" and score == pytest.approx(1.0)
    plain, plain_score = best_decision(logits, labels, calibrate=False)
    assert plain == Decision() and plain_score == pytest.approx(0.5)


def test_the_threshold_search_chooses_as_scoring_each_candidate_one_by_one_would():
    from privenc.adversarial import balanced_accuracy

    def one_by_one(margin: torch.Tensor, labels: torch.Tensor) -> float:  # the definition
        candidates = [0.0, *torch.quantile(margin, torch.linspace(0.01, 0.99, 99)).tolist()]
        return max(candidates, key=lambda t: balanced_accuracy((margin > t).long(), labels))

    generator = torch.Generator().manual_seed(0)
    for case in range(60):
        n = int(torch.randint(20, 400, (1,), generator=generator))
        labels = (torch.rand(n, generator=generator) < [0.5, 0.2, 0.9][case % 3]).long()
        labels[torch.rand(n, generator=generator) < 0.05] = -1  # unlabelled images are ignored
        margin = torch.randn(n, generator=generator) + labels.clamp(min=0) * 0.7
        if case % 2:  # coarse margins: many thresholds tie, and the first of them must win
            margin = (margin * 2).round() / 2
        assert tune_threshold(margin, labels) == one_by_one(margin, labels)
    assert tune_threshold(torch.randn(10), torch.full((10,), -1)) == 0.0  # nothing labelled: argmax


def test_adabn_normalizes_by_the_scored_inputs_and_leaves_the_model_alone():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Flatten())
    x = torch.randn(300, 3, 2, 2) * 3 + 5
    copy = adapted(model, x, torch.device("cpu"), batch_size=100)
    norm = copy[0]
    assert torch.allclose(norm.running_mean, x.mean((0, 2, 3)), atol=0.2)
    assert torch.allclose(norm.running_var, x.var((0, 2, 3)), rtol=0.1)
    assert not copy.training
    assert torch.allclose(model[0].running_mean, torch.zeros(3)) and model.training  # the original untouched
    with torch.no_grad():
        out = copy(x)
        assert abs(float(out.mean())) < 0.05 and torch.equal(out, copy(x))  # normalized, and no dropout


def _shifted(offset: float) -> Encoded:
    """Labels by the sign of channel 0's mean; validation and test encodings shifted by
    ``offset`` against the training ones (as augmented training views can be against plain ones)."""
    generator = torch.Generator().manual_seed(0)
    base = {split: torch.randn(256, 3, 4, 4, generator=generator) for split in ("train", "val", "test")}
    y = {split: (x[:, 0].mean((1, 2)) > 0).long() for split, x in base.items()}
    x = {split: v + (offset if split != "train" else 0.0) for split, v in base.items()}
    return Encoded(x, y, 2)


@pytest.mark.parametrize("calibrate", [False, True])
def test_a_calibrated_attacker_reads_through_a_shift_that_defeats_argmax(calibrate):
    config = load_config("demo")
    settings = replace(config.verify, max_iters=300, eval_every=25, patience=50, views=1, calibrate=calibrate)
    torch.manual_seed(0)
    model = build_attacker("paper", config.classifier, 3, 2, 4)
    result = fit_classifier(model, _shifted(1.5), settings, 1e-3, 0, torch.device("cpu"), "paper")
    if calibrate:
        assert result.decision in ("threshold", "adabn")
        assert result.test_bacc_best > 0.8
        assert result.test_bacc_uncalibrated < result.test_bacc_best - 0.15  # the same checkpoint by argmax
        assert result.test_bacc_ci95[0] <= result.test_bacc_best <= result.test_bacc_ci95[1]
    else:
        assert result.decision == "argmax" and result.threshold is None and result.test_bacc_uncalibrated is None
        assert result.test_bacc_best < 0.7


def test_calibration_changes_nothing_without_batchnorm_on_a_multiclass_task():
    generator = torch.Generator().manual_seed(1)
    x = {split: torch.randn(60, 3, 2, 2, generator=generator) for split in ("train", "val", "test")}
    y = {split: torch.arange(60) % 3 for split in x}
    logits = {"running": torch.randn(60, 3, generator=generator)}
    decision, score = best_decision(logits, y["val"], calibrate=True)  # no threshold for 3 classes
    assert decision == Decision()
    config = load_config("demo")
    for family in ("linear", "mlp"):  # no BatchNorm: no statistics of their own to take
        results = []
        for calibrate in (False, True):
            torch.manual_seed(0)
            model = build_attacker(family, config.classifier, 3, 3, 2)
            settings = replace(config.verify, max_iters=40, eval_every=10, views=1, calibrate=calibrate)
            results.append(fit_classifier(model, Encoded(x, y, 3), settings, 1e-3, 0, torch.device("cpu"), family))
        assert results[1].decision == "argmax"
        assert results[0].test_bacc_best == results[1].test_bacc_best and results[0].curve == results[1].curve


def test_the_audit_calibrates_every_widened_round_and_its_extra_attacks():
    from privenc.audit import attack_protocol, round_trials

    settings = replace(load_config("demo").verify, calibrate=False)
    assert not any(t.calibrate for t in round_trials(settings, 1e-3, 0))  # round 0 is plain verify
    assert all(t.calibrate and t.name.endswith("_cal") for t in round_trials(settings, 1e-3, 1))
    assert attack_protocol(settings, 1e-3, 0)[0].calibrate
    assert all(t.calibrate for t in round_trials(replace(settings, calibrate=True), 1e-3, 0))


def test_scaling_fitted_on_labelled_logits_recovers_their_temperature_and_bias():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (20000,), generator=generator)
    evidence = (2 * labels - 1).float() + torch.randn(20000, generator=generator)  # log-odds 2 * evidence
    logits = torch.stack([torch.zeros(20000), 8 * evidence + 3], 1)                # 4x overconfident, shifted
    temperature, bias = fit_scaling(logits, labels)
    assert temperature == pytest.approx(4.0, rel=0.05)
    assert float(bias[1] - bias[0]) == pytest.approx(-0.75, abs=0.05)


@pytest.mark.parametrize("calibrate", [False, True])
def test_the_information_estimate_of_an_overconfident_attacker_is_read_through_scaling_fitted_on_validation(calibrate):
    # A fixed linear attacker that is right ~76% of the time, 10 times too confident: its plain
    # cross-entropy exceeds H(U), a negative bound; scaled on validation it bounds from above 0.
    generator = torch.Generator().manual_seed(0)
    x = {split: torch.randn(2000, 1, 1, 1, generator=generator) for split in ("train", "val", "test")}
    y = {split: (v.flatten() + torch.randn(2000, generator=generator) > 0).long() for split, v in x.items()}
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-10.0], [10.0]]))
        model[1].bias.zero_()
    _, test, _, _ = _final_scores(model, x, y, torch.device("cpu"), calibrate)
    bits = information_bits(y["test"], 2, test.ce)
    assert test.bacc == pytest.approx(0.75, abs=0.03)
    if calibrate:
        assert 0.1 < bits < 0.5, bits  # about 0.2-0.3 bits for a Gaussian channel of this strength
    else:
        assert bits < -1.0, bits
