"""Verification: saturation logic, the frozen encoder, baselines, grid resumption, report."""

import json

import pytest
import torch

from conftest import on_device
from privenc.attackers import Saturation, information_bits, label_entropy_bits
from privenc.figures import equalize
from privenc.grid import cell_dir, collect, run_grid
from privenc.report import build_report
from privenc.training import train
from privenc.verification import verify


def _events(curve, patience=2, min_delta=0.01):
    saturation = Saturation(patience, min_delta)
    return [saturation.update(acc) for acc in curve]


def test_saturation_plateau_then_drop_then_second_plateau():
    events = _events([0.6, 0.7, 0.7, 0.705, 0.8, 0.8, 0.8])
    # improvement, improvement, 1 without, 2 without -> drop; then 0.8 improves, 2 without -> stop
    assert events == ["continue", "continue", "continue", "drop", "continue", "continue", "stop"]


def test_saturation_improvements_smaller_than_min_delta_do_not_count():
    assert _events([0.5, 0.505, 0.509], patience=2, min_delta=0.01) == ["continue", "continue", "drop"]


def test_saturation_keeps_the_best_across_the_drop():
    # after the drop the curve must beat 0.9 by min_delta, not just its own start
    assert _events([0.9, 0.5, 0.5, 0.6, 0.7], patience=2) == ["continue", "continue", "drop", "continue", "stop"]


def test_saturation_waits_for_min_iters_then_drops_on_the_plateau_it_saw():
    saturation = Saturation(2, 0.01, min_iters=400)
    events = [saturation.update(0.6, iteration) for iteration in range(100, 700, 100)]
    # plateaued from 300 on, but nothing is declared before 400; then a second plateau of 2
    assert events == ["continue", "continue", "continue", "drop", "continue", "stop"]
    assert _events([0.6] * 3) == ["continue", "continue", "drop"]  # without it: at 300


def test_an_attacker_given_min_iters_trains_through_its_early_plateau():
    from dataclasses import replace

    from privenc.attackers import Encoded, fit_classifier
    from privenc.config import load_config
    from privenc.models import build_attacker

    generator = torch.Generator().manual_seed(0)
    x = {split: torch.randn(64, 3, 4, 4, generator=generator) for split in ("train", "val", "test")}
    y = {split: torch.randint(0, 2, (64,), generator=generator) for split in x}  # nothing to learn: plateaus
    config = load_config("demo")
    settings = replace(config.verify, max_iters=1000, eval_every=10, patience=2, views=1, min_iters_adaptive=300)
    results = [fit_classifier(build_attacker("linear", config.classifier, 3, 2, 4), Encoded(x, y, 2), settings, 1e-3,
                              0, torch.device("cpu"), "linear", min_iters=settings.family_min_iters(family))
               for family in ("paper", "adaptive")]
    assert results[0].iters < 300 and results[0].lr_dropped_at < 300
    assert results[1].lr_dropped_at >= 300 and results[1].iters > results[1].lr_dropped_at
    assert results[1].saturated


def test_saturation_never_stops_on_a_rising_curve():
    assert set(_events([0.1 * i for i in range(10)])) == {"continue"}


def test_information_estimate():
    labels = torch.tensor([0, 1, 0, 1])
    assert label_entropy_bits(labels, 2) == pytest.approx(1.0)
    # an attacker at chance (CE = ln 2) learns nothing; a perfect one (CE = 0) learns 1 bit
    assert information_bits(labels, 2, 0.6931471805599453) == pytest.approx(0.0, abs=1e-9)
    assert information_bits(labels, 2, 0.0) == pytest.approx(1.0)


@pytest.fixture
def trained_run(tiny_config, tmp_path_factory, device):
    run = tmp_path_factory.mktemp("runs") / "lf"
    train(on_device(tiny_config, device), run, progress=False)
    return run


@pytest.mark.slow
def test_verify_learned_encoder_leaves_it_unchanged_and_records_everything(tiny_config, trained_run, tmp_path,
                                                                            monkeypatch, device):
    import privenc.verification as verify_module

    frozen = {}
    real = verify_module.assert_unchanged

    def spy(module, snapshot, name):
        frozen["params"] = [p.requires_grad for p in module.parameters()]
        frozen["training"] = module.training
        real(module, snapshot, name)

    monkeypatch.setattr(verify_module, "assert_unchanged", spy)
    before = (trained_run / "encoder.pt").read_bytes()
    records = verify(str(trained_run), tiny_config, ["g1c0", "g1c2"], tmp_path / "v", device=str(device),
                     progress=False)
    assert frozen == {"params": [False] * len(frozen["params"]), "training": False}
    assert (trained_run / "encoder.pt").read_bytes() == before
    # the demo preset's attackers: 'paper' everywhere, 'adaptive' on the run's private task
    assert [(r["task"], r["role"], r["attacker"]) for r in records] == [
        ("g1c0", "private", "paper"), ("g1c0", "private", "adaptive"), ("g1c2", "other", "paper")]
    for r in records:
        assert 0 <= r["test_acc_best"] <= 1 and r["iters"] <= 12 and r["curve"]
        assert r["curve"][0][0] == 2  # evaluated every eval_every iterations
        # the variance constraint on the task's test images (unseen): fractions of the output elements
        assert 0 <= r["test_collapse_zero_var_frac"] <= r["test_collapse_low_var_frac"] <= 1
        assert 0 <= r["test_collapse_zero_spread_frac"] <= r["test_collapse_low_spread_frac"] <= 1
        assert r["test_output_var_mean"] > 0
    saved = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert saved == json.loads(json.dumps(records))
    assert "Strongest attacker" in (tmp_path / "v" / "summary.md").read_text()


@pytest.mark.slow
def test_verify_detects_a_changed_encoder(tiny_config, trained_run, tmp_path, monkeypatch):
    import privenc.attackers as attackers_module

    real = attackers_module.encode_task

    def tampering(encoder, *args, **kwargs):
        with torch.no_grad():
            next(encoder.parameters()).add_(1.0)
        return real(encoder, *args, **kwargs)

    monkeypatch.setattr(attackers_module, "encode_task", tampering)
    with pytest.raises(AssertionError, match="changed during verification"):
        verify(str(trained_run), tiny_config, ["g1c0"], tmp_path / "v", progress=False)


def test_not_saturated_is_reported(tiny_config, tmp_path, device):
    from dataclasses import replace

    config = replace(tiny_config, verify=replace(tiny_config.verify, patience=50, max_iters=4))
    records = verify("blur", config, ["g1c0"], tmp_path / "v", device=str(device), progress=False)
    assert records[0]["saturated"] is False and records[0]["iters"] == 4
    assert "test_collapse_low_var_frac" not in records[0]  # a baseline has no variance constraint to check
    assert "(not saturated)" in (tmp_path / "v" / "summary.md").read_text()


@pytest.mark.slow
def test_grid_skips_finished_cells_and_report_holds_the_numbers(tiny_config, trained_run, tmp_path, monkeypatch):
    grid = tmp_path / "grid"
    records = run_grid([str(trained_run), "identity"], ["g1c0", "g1c1"], tiny_config, grid)
    # one attacker per cell, and the run's adaptive one on its private task g1c0 (the demo preset's attackers)
    assert sorted((r["encoder"], r["task"], r["attacker"]) for r in records) == [
        ("identity", "g1c0", "paper"), ("identity", "g1c1", "paper"),
        ("lf", "g1c0", "adaptive"), ("lf", "g1c0", "paper"), ("lf", "g1c1", "paper")]
    assert all((cell_dir(grid, e, t) / "verify.json").exists() for e in (str(trained_run), "identity")
               for t in ("g1c0", "g1c1"))

    import privenc.grid as grid_module

    ran = []
    monkeypatch.setattr(grid_module, "_run_cell", lambda spec, task, *a: ran.append((spec, task)))
    (cell_dir(grid, "identity", "g1c1") / "verify.json").unlink()
    run_grid([str(trained_run), "identity"], ["g1c0", "g1c1"], tiny_config, grid)
    assert ran == [("identity", "g1c1")]

    report = build_report([trained_run, grid], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    for record in collect(grid):
        assert f"{record['test_acc_best']:.3f}" in text
    assert report["table1"][0]["verified_test"] is not None
    assert (tmp_path / "report" / "figure1_g1c0.png").exists() and (tmp_path / "report" / "figure3.png").exists()
    assert "−" in text and "+" in text  # private and desirable cells are marked


def test_equalize_is_rank_per_location():
    values = torch.tensor([[[[1.0, 10.0]]], [[[3.0, -5.0]]], [[[2.0, 0.0]]]]).numpy()  # (3, 1, 1, 2)
    eq = equalize(values)
    assert eq[:, 0, 0, 0].tolist() == [0.0, 1.0, 0.5]
    assert eq[:, 0, 0, 1].tolist() == [1.0, 0.0, 0.5]


def test_wilson_interval_matches_a_hand_computation():
    from privenc.report import wilson_halfwidth

    # p = 0.8, n = 100: centre 0.7898, interval [0.7112, 0.8666] -> half-width 0.0777
    assert abs(wilson_halfwidth(0.8, 100) - 0.0777) < 5e-4
    assert wilson_halfwidth(0.5, 400) < wilson_halfwidth(0.5, 100)  # more test images, tighter


def test_grid_runs_identity_cells_first(tiny_config, tmp_path, monkeypatch):
    """The costliest cells start first, so that no worker idles at the end."""
    import privenc.grid as grid

    order = []
    monkeypatch.setattr(grid, "_run_cell", lambda spec, task, *args: order.append((spec, task)))
    grid.run_grid(["blur", "identity"], ["g1c0", "g1c1"], tiny_config, tmp_path / "grid", jobs=1)
    assert order == [("identity", "g1c0"), ("identity", "g1c1"), ("blur", "g1c0"), ("blur", "g1c1")]


@pytest.mark.slow
def test_an_attacker_learns_the_same_in_either_memory_format(tiny_config):
    """verify.channels_last changes how tensors sit in memory, not what the attacker learns."""
    from dataclasses import replace

    from privenc.attackers import Encoded, fit_classifier
    from privenc.models import Classifier

    generator = torch.Generator().manual_seed(0)
    y = {split: torch.randint(0, 2, (n,), generator=generator) for split, n in (("train", 96), ("val", 40),
                                                                                   ("test", 40))}
    # A learnable signal: the label shifts the mean of one channel.
    x = {split: torch.randn(len(labels), 3, 8, 8, generator=generator) + labels.view(-1, 1, 1, 1) * torch.tensor(
        [1.0, 0.0, 0.0]).view(1, 3, 1, 1) for split, labels in y.items()}
    data = Encoded(x, y, num_classes=2)
    results = {}
    for layout in (False, True):
        settings = replace(tiny_config.verify, channels_last=layout, max_iters=30, eval_every=10, patience=50)
        torch.manual_seed(0)
        model = Classifier(tiny_config.classifier, 3, 2, 8)
        results[layout] = fit_classifier(model, data, settings, 1e-3, 0, torch.device("cpu"))
    plain, nhwc = results[False], results[True]
    assert [row[1] for row in nhwc.curve] == [row[1] for row in plain.curve]
    assert nhwc.test_acc_best == plain.test_acc_best > 0.6
    assert abs(nhwc.test_ce_best - plain.test_ce_best) < 1e-4


def test_balanced_accuracy_is_the_mean_recall_of_a_known_confusion_matrix():
    from privenc.adversarial import balanced_accuracy
    from privenc.attackers import balanced_accuracy_chance

    # class 0: 8 images, 6 right; class 1: 2 images, 1 right; class 2: 5 images, 5 right
    labels = torch.tensor([0] * 8 + [1] * 2 + [2] * 5)
    predictions = torch.tensor([0] * 6 + [1, 2] + [1, 0] + [2] * 5)
    assert balanced_accuracy(predictions, labels) == pytest.approx((6 / 8 + 1 / 2 + 5 / 5) / 3)
    assert float((predictions == labels).float().mean()) == pytest.approx(12 / 15)  # accuracy differs
    # always answering the majority class: accuracy 8/15, balanced 1/3 = the balanced chance level
    assert balanced_accuracy(torch.zeros(15, dtype=torch.long), labels) == pytest.approx(1 / 3)
    assert balanced_accuracy_chance(labels) == pytest.approx(1 / 3)


def test_bootstrap_interval_contains_the_point_and_narrows_with_more_test_images():
    from privenc.adversarial import balanced_accuracy
    from privenc.attackers import bootstrap_balanced_accuracy

    generator = torch.Generator().manual_seed(1)
    widths = []
    for n in (100, 1600):
        labels = torch.randint(0, 2, (n,), generator=generator)
        right = torch.rand(n, generator=generator) < 0.7  # a 70%-right attacker
        predictions = torch.where(right, labels, 1 - labels)
        point = balanced_accuracy(predictions, labels)
        lo, hi = bootstrap_balanced_accuracy(predictions, labels)
        assert lo < point < hi
        assert bootstrap_balanced_accuracy(predictions, labels) == [lo, hi]  # a fixed seed
        widths.append(hi - lo)
    # 16x the images: about a quarter of the width (the binomial half-width at n=100 is 0.09)
    assert 0.12 < widths[0] < 0.24 and widths[1] < widths[0] / 3


def test_bootstrap_interval_stays_around_the_point_with_rare_classes():
    # lfw-faces' expression: two large classes and rare ones of a test image or two. A resample
    # of the pooled images misses a rare class about a third of the time and, dropping its
    # recall of 0 from the mean, lifted the whole interval above the point estimate.
    from privenc.adversarial import balanced_accuracy
    from privenc.attackers import bootstrap_balanced_accuracy

    generator = torch.Generator().manual_seed(2)
    labels = torch.cat([torch.zeros(300, dtype=torch.long), torch.ones(300, dtype=torch.long),
                        torch.tensor([2, 3, 4])])
    right = torch.rand(603, generator=generator) < 0.9
    right[600:] = False  # every rare image missed: recall 0 on classes 2-4
    predictions = torch.where(right, labels, (labels + 1) % 2)
    point = balanced_accuracy(predictions, labels)
    lo, hi = bootstrap_balanced_accuracy(predictions, labels)
    assert lo < point < hi
    assert abs((lo + hi) / 2 - point) < 0.2 * (hi - lo)  # centred, not pushed up
    # unlabelled images (negative labels) change nothing, as in balanced_accuracy
    more = torch.cat([labels, torch.full((50,), -1)])
    assert bootstrap_balanced_accuracy(torch.cat([predictions, torch.zeros(50, dtype=torch.long)]), more) == [lo, hi]


def test_the_strongest_attacker_is_chosen_by_validation_balanced_accuracy():
    from privenc.verification import strongest

    base = {"encoder": "e", "task": "t"}
    # a: better plain validation accuracy (majority-class answers), b: better balanced
    a = dict(base, attacker="a", val_acc_best=0.80, val_bacc_best=0.55)
    b = dict(base, attacker="b", val_acc_best=0.70, val_bacc_best=0.65)
    assert strongest([a, b])[("e", "t")]["attacker"] == "b"
    # records written before balanced accuracy was recorded: chosen by accuracy, as they were
    old = [{k: v for k, v in r.items() if k != "val_bacc_best"} for r in (a, b)]
    assert strongest(old)[("e", "t")]["attacker"] == "a"


def test_the_kept_checkpoint_is_the_one_with_the_best_validation_balanced_accuracy(tiny_config):
    from dataclasses import replace

    from privenc.attackers import Encoded, fit_classifier
    from privenc.models import Classifier

    generator = torch.Generator().manual_seed(0)
    # unbalanced labels (80% class 0) with a learnable signal
    y = {split: (torch.rand(n, generator=generator) < 0.2).long() for split, n in (("train", 200), ("val", 60),
                                                                                    ("test", 60))}
    x = {split: torch.randn(len(labels), 3, 8, 8, generator=generator) + 0.2 * labels.view(-1, 1, 1, 1)
         for split, labels in y.items()}
    settings = replace(tiny_config.verify, max_iters=60, eval_every=5, patience=50)
    torch.manual_seed(0)
    result = fit_classifier(Classifier(tiny_config.classifier, 3, 2, 8), Encoded(x, y, 2), settings, 1e-3, 0,
                            torch.device("cpu"))
    val_baccs = [row[3] for row in result.curve]
    assert result.val_bacc_best == pytest.approx(max(val_baccs))
    first_best = val_baccs.index(max(val_baccs))
    assert result.val_acc_best == pytest.approx(result.curve[first_best][1])  # that checkpoint's accuracy
    assert result.val_acc_best < max(row[1] for row in result.curve)  # here not the best-accuracy one
    lo, hi = result.test_bacc_ci95
    assert lo <= result.test_bacc_best <= hi


def test_the_confirmation_halves_split_every_class_and_stay_fixed():
    from privenc.attackers import confirmation_split, half_scores

    labels = torch.tensor([0] * 7 + [1] * 4 + [2] * 1 + [-1] * 2)
    mask = confirmation_split(labels)
    assert torch.equal(mask, confirmation_split(labels.clone()))  # the same halves for every attacker
    assert [int(mask[labels == c].sum()) for c in (0, 1, 2)] == [4, 2, 1]  # each class halved
    # a predictor right on exactly the selection half's images of class 0
    predictions = labels.clone()
    predictions[(labels == 0) & mask] = 1
    selection, confirmation = half_scores(predictions, labels)
    assert selection == pytest.approx(1.0) and confirmation == pytest.approx((0 + 1 + 1) / 3)


def test_each_half_keeps_its_own_best_checkpoint_and_the_other_halfs_score_there(monkeypatch):
    from dataclasses import replace

    import privenc.attackers as attackers_module
    from privenc.attackers import Encoded, fit_classifier
    from privenc.config import load_config
    from privenc.models import build_attacker

    seen = []
    real = attackers_module.half_scores
    monkeypatch.setattr(attackers_module, "half_scores", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    generator = torch.Generator().manual_seed(0)
    x = {split: torch.randn(64, 3, 4, 4, generator=generator) for split in ("train", "val", "test")}
    y = {split: (x[split][:, 0].mean((1, 2)) > 0).long() for split in x}  # learnable, noisily
    settings = replace(load_config("demo").verify, max_iters=40, eval_every=2, patience=50, views=1, calibrate=False)
    model = build_attacker("linear", load_config("demo").classifier, 3, 2, 4)
    result = fit_classifier(model, Encoded(x, y, 2), settings, 0.05, 0, torch.device("cpu"), "linear")
    assert len(seen) == 40  # one per evaluation and way
    assert seen[0::2] == seen[1::2]  # argmax: the same predictions whichever half chose the rule
    seen = seen[0::2]
    first = max(range(len(seen)), key=lambda i: (seen[i][0], -i))  # the earliest of the best, as kept
    second = max(range(len(seen)), key=lambda i: (seen[i][1], -i))
    assert result.val_bacc_crossfit == [[seen[first][0], seen[first][1]], [seen[second][1], seen[second][0]]]
