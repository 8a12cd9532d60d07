"""`privenc audit`: the round schedule, stopping by margin and by budget, resuming from the
trials on disk, the choice on validation and the --fail-above gate.

One audit of the Blur baseline on tiny data (rounds 0 and 1: 17 attackers, seconds) is
computed once per module; each test works on its own copy, and reruns with another budget
read its trials back instead of training them again."""

import json
import shutil
from dataclasses import replace

import pytest

import privenc.audit as audit_module
from conftest import TINY
from privenc.audit import LR_LADDER, audit, confirmed_score, converged, round_trials
from privenc.cli import main
from privenc.config import ATTACKERS, load_config
from privenc.errors import ConfigError, DataError
from privenc.verdict import verdict as _verdict

SHORT = ["verify.max_iters=6"]  # attackers of 6 iterations (12 in round 1): the search is what is tested


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An audit stopped by a huge margin: round 1 cannot rise by 100 points, so it stops there."""
    config = load_config("demo", TINY + SHORT)
    out = tmp_path_factory.mktemp("audit") / "blur"
    result = audit("blur", config, ["g1c0"], out, margin=99.0, max_rounds=5, progress=False)
    return config, out, result


@pytest.fixture
def copy(finished, tmp_path):
    config, out, result = finished
    shutil.copytree(out, tmp_path / "a")
    return config, tmp_path / "a", result


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr(audit_module, "_run_trial", refuse)


def test_rounds_widen_the_search():
    settings = replace(load_config("demo").verify, attackers=["paper"], seeds=[0], patience=3, views=2,
                       max_iters=1500)
    zero, one, two = (round_trials(settings, 1e-3, k) for k in range(3))
    assert [(t.family, t.lr, t.seed, t.patience, t.views, t.max_iters) for t in zero] == [
        ("paper", 1e-3, 0, 3, 2, 1500)]  # round 0 is plain verification
    assert {t.family for t in one} == set(ATTACKERS) and {t.lr for t in one} == {1e-3, 1e-4}
    assert {t.seed for t in one} == {0, 1} and len(one) == len(ATTACKERS) * 2 * 2
    assert (one[0].patience, one[0].views, one[0].max_iters) == (6, 4, 3000)
    assert {t.lr for t in two} == set(LR_LADDER) and {t.seed for t in two} == {0, 1, 2}  # the paper's 1e-5 too
    assert (two[0].patience, two[0].views) == (12, 8)
    assert round_trials(settings, 1e-2, 1)[0].lr == 1e-2  # the encoder's own rate stays in


def test_a_huge_margin_stops_after_round_one(finished):
    _, out, result = finished
    verdict = result["verdicts"]["g1c0"]
    assert (verdict["converged"], verdict["stopped_by"], verdict["rounds_run"]) == (True, "margin", 2)
    rounds = verdict["rounds"]
    assert verdict["last_rise_points"] == pytest.approx(100 * (rounds[1]["best_val_bacc"] - rounds[0]["best_val_bacc"]))
    assert len(list((out / "trials" / "g1c0").glob("*.json"))) == 1 + len(ATTACKERS) * 2 * 2
    assert json.loads((out / "audit.json").read_text()) == json.loads(json.dumps(result))
    assert "Converged after round 1" in (out / "audit.md").read_text()
    # each round's wall time, beside the verdict and not in it (a resumed audit must not change a verdict)
    walls = result["round_seconds"]["g1c0"]
    assert len(walls) == 2 and all(s >= 0 for s in walls) and walls[1] > 0 and "seconds" not in rounds[0]
    assert sum(walls) <= result["seconds"] + 0.1  # the rounds are parts of the call's wall time
    assert "| confirmed rise (points) | wall time, this call |" in (out / "audit.md").read_text()
    # every trial keeps its validation halves, and each round the confirmed score of the search so far
    trials = [json.loads(p.read_text()) for p in (out / "trials" / "g1c0").glob("*.json")]
    assert all(len(t["val_bacc_crossfit"]) == 2 and t["val_bacc_crossfit"][0][0] >= t["val_bacc_crossfit"][1][1]
               for t in trials)
    assert [r["confirmed_bacc"] for r in rounds] == [
        confirmed_score([t for t in trials if t["round"] <= k]) for k in range(2)]
    assert verdict["stop_rule"] == "validation" and verdict["last_confirmed_rise_points"] == pytest.approx(
        100 * (rounds[1]["confirmed_bacc"] - rounds[0]["confirmed_bacc"]))


def test_every_attack_that_applies_runs_by_default(finished):
    _, out, result = finished
    rows = {row["attack"]: row for row in result["verdicts"]["g1c0"]["attacks"]}
    assert list(rows) == ["zoo", "adaptive", "multiscale", "reconstruction"] and result["attacks"] == list(rows)
    assert rows["zoo"]["attackers"] == 1 + len(ATTACKERS) * 2 * 2
    assert rows["adaptive"] == {"attack": "adaptive",
                                "skipped": "the blur baseline was not trained against an adversarial classifier"}
    saved = json.loads((out / "attacks" / "g1c0" / "multiscale.json").read_text())["records"]
    assert rows["multiscale"]["attackers"] == len(saved) and {r["attack"] for r in saved} == {"multiscale"}
    text = (out / "audit.md").read_text()
    assert "| adaptive | skipped: the blur baseline" in text
    assert "Attacks: `zoo`, fresh attackers of every family" in text and "`multiscale`, trained on" in text
    # the reconstruction: one record scored by a raw-image attacker, with PSNR and SSIM, and its figure
    (rebuilt,) = json.loads((out / "attacks" / "g1c0" / "reconstruction.json").read_text())["records"]
    assert rebuilt["attacker"] == "reconstruction" and rebuilt["psnr"] > 0 and -1 <= rebuilt["ssim"] <= 1
    assert (out / "attacks" / "g1c0" / "reconstruction" / rebuilt["figure"]).is_file()
    assert f"| reconstruction (PSNR {rebuilt['psnr']:.2f} dB" in text
    # the figure of the task: every attack and the rounds, linked from audit.md
    figure = result["verdicts"]["g1c0"]["figure"]
    assert figure == "audit_g1c0.png" and (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![g1c0: every attack and the rounds]({figure})" in text


def test_in_a_pool_round_one_queues_behind_round_zero_with_the_same_trials(finished, tmp_path, monkeypatch):
    """Round 0 cannot converge, so round 1's attackers are queued before round 0 is collected
    (a worker round 0 leaves idle starts on them); the trials are those of the sequential search."""
    config, out, _ = finished
    events = []
    submit, collect = audit_module._submit_round, audit_module._run_round

    def spy_submit(*args, **kwargs):
        events.append(("submit", args[4][0].round))
        return submit(*args, **kwargs)

    def spy_collect(*args, **kwargs):
        events.append(("collect", args[4][0].round))
        return collect(*args, **kwargs)

    monkeypatch.setattr(audit_module, "_submit_round", spy_submit)
    monkeypatch.setattr(audit_module, "_run_round", spy_collect)
    result = audit("blur", config, ["g1c0"], tmp_path / "pool", margin=99.0, max_rounds=2, jobs=2, progress=False,
                   attacks=["zoo"])
    assert events == [("submit", 0), ("submit", 1), ("collect", 0), ("collect", 1)]
    names = sorted(p.name for p in (tmp_path / "pool" / "trials" / "g1c0").glob("*.json"))
    assert names == sorted(p.name for p in (out / "trials" / "g1c0").glob("*.json"))
    assert len(result["round_seconds"]["g1c0"]) == 2
    # with a time budget round 1 waits for the check before it, as it always did
    events.clear()
    audit("blur", config, ["g1c0"], tmp_path / "timed", margin=99.0, max_rounds=2, max_minutes=60, jobs=2,
          progress=False, attacks=["zoo"])
    assert events == [("collect", 0), ("submit", 0), ("collect", 1), ("submit", 1)]


def test_the_worst_case_is_the_trial_with_the_best_validation_score(finished):
    _, out, result = finished
    trials = [json.loads(p.read_text()) for p in sorted((out / "trials" / "g1c0").glob("*.json"))]
    trials += json.loads((out / "attacks" / "g1c0" / "multiscale.json").read_text())["records"]
    worst = result["verdicts"]["g1c0"]["worst_case"]
    assert worst["val_bacc_best"] == max(t["val_bacc_best"] for t in trials)
    chosen = [t for t in trials if (t["attack"], t["attacker"], t["lr"], t["seed"], t.get("round")) ==
              (worst["attack"], worst["attacker"], worst["lr"], worst["seed"], worst["round"])]
    assert len(chosen) == 1 and chosen[0]["test_bacc_best"] == worst["test_bacc_best"]


def test_the_choice_is_made_on_validation_never_on_test():
    base = {"chance": 0.5, "bacc_chance": 0.5, "n_test": 100, "iters": 10, "saturated": True, "patience": 1,
            "views": 1, "test_acc_best": 0.6, "info_bits": 0.1}
    records = [dict(base, attacker="a", seed=0, lr=1e-3, round=0, val_bacc_best=0.70, test_bacc_best=0.90,
                    test_bacc_ci95=[0.85, 0.95], val_acc_best=0.7),
               dict(base, attacker="b", seed=0, lr=1e-4, round=1, val_bacc_best=0.80, test_bacc_best=0.60,
                    test_bacc_ci95=[0.49, 0.70], val_acc_best=0.8)]
    rounds = [{"rise": None, "best_val_bacc": 0.7}, {"rise": 0.1, "best_val_bacc": 0.8}]
    verdict = _verdict("t", "private", records, rounds, "max_rounds", 1.0, None, fail_above=5.0)
    assert verdict["worst_case"]["attacker"] == "b" and verdict["plain_verify_test_bacc"] == 0.90
    assert verdict["above_chance_points"] == pytest.approx(10.0) and verdict["at_chance"] is True
    assert verdict["failed"] is True and verdict["converged"] is False
    assert verdict["last_rise_points"] == pytest.approx(10.0)


def test_the_budget_stops_it_not_converged_with_the_last_rise(copy, monkeypatch):
    config, out, first = copy
    _no_training(monkeypatch)  # rounds 0 and 1 are on disk: a rerun trains nothing
    result = audit("blur", config, ["g1c0"], out, margin=0.0, max_rounds=2, progress=False)
    verdict = result["verdicts"]["g1c0"]
    assert (verdict["converged"], verdict["stopped_by"], verdict["rounds_run"]) == (False, "max_rounds", 2)
    assert verdict["last_rise_points"] == first["verdicts"]["g1c0"]["last_rise_points"]
    text = (out / "audit.md").read_text()
    assert "NOT converged: the round budget ran out after round 1; the last round still rose" in text
    assert f"still rose {verdict['last_rise_points']:.2f} points" in text
    # no time left after round 0: stopped there, with no rise to report
    result = audit("blur", config, ["g1c0"], out, margin=0.0, max_rounds=5, max_minutes=0, progress=False)
    verdict = result["verdicts"]["g1c0"]
    assert (verdict["stopped_by"], verdict["rounds_run"], verdict["last_rise_points"]) == ("max_minutes", 1, None)
    assert "the time budget ran out after round 0" in (out / "audit.md").read_text()


def test_a_rerun_reads_the_same_numbers_without_training(copy, monkeypatch):
    config, out, first = copy
    _no_training(monkeypatch)
    again = audit("blur", config, ["g1c0"], out, margin=99.0, max_rounds=5, progress=False)
    assert again["verdicts"] == first["verdicts"]
    assert len(again["round_seconds"]["g1c0"]) == again["verdicts"]["g1c0"]["rounds_run"]
    # its own wall time is only that of reading back; the attackers' seconds are all still counted
    trials = [json.loads(p.read_text()) for p in out.glob("trials/g1c0/*.json")]
    attacks = [r for p in out.glob("attacks/g1c0/*.json") for r in json.loads(p.read_text())["records"]]
    assert again["attacker_seconds"] == first["attacker_seconds"] == pytest.approx(
        sum(r["seconds"] for r in trials + attacks), abs=0.2)
    assert f"{again['attacker_seconds']:.0f} attacker-seconds in all" in (out / "audit.md").read_text()


def test_a_rerun_with_other_settings_is_refused(copy):
    config, out, _ = copy
    other = replace(config, verify=replace(config.verify, lr=1e-2))
    with pytest.raises(ConfigError, match="verify.lr"):
        audit("blur", other, ["g1c0"], out, progress=False)


def test_fail_above_gates_the_exit_status(copy, capsys):
    _, out, first = copy
    above = first["verdicts"]["g1c0"]["above_chance_points"]
    args = ["-q", "audit", "blur", "--config", "demo", *[f"--set={item}" for item in TINY + SHORT], "--task", "g1c0",
            "--out", str(out), "--margin", "99"]
    assert main([*args, "--fail-above", f"{above + 1}"]) == 0
    assert main([*args, "--fail-above", f"{above - 1}"]) == 1
    assert "above --fail-above" in capsys.readouterr().err
    assert json.loads((out / "audit.json").read_text())["failed"] == ["g1c0"]


@pytest.mark.parametrize("bad", [{"margin": -1.0}, {"margin": 100.0}, {"max_rounds": 0}, {"max_minutes": -1.0}])
def test_bad_settings_are_config_errors(tiny_config, tmp_path, bad):
    with pytest.raises(ConfigError):
        audit("blur", tiny_config, ["g1c0"], tmp_path / "a", progress=False, **bad)
    assert not (tmp_path / "a").exists()


def test_an_unknown_task_is_refused_before_any_work(tiny_config, tmp_path):
    with pytest.raises(DataError, match="nope"):
        audit("blur", tiny_config, ["nope"], tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()


def test_identity_is_quoted_from_a_verify_folder(copy, monkeypatch, tmp_path):
    config, out, _ = copy
    _no_training(monkeypatch)
    folder = tmp_path / "identity"
    folder.mkdir()
    weak = {"encoder": "identity", "task": "g1c0", "val_acc_best": 0.9, "val_bacc_best": 0.6, "test_bacc_best": 0.61,
            "test_bacc_ci95": [0.5, 0.7]}
    strong = dict(weak, val_acc_best=0.8, val_bacc_best=0.95, test_bacc_best=0.93, test_bacc_ci95=[0.88, 0.97])
    (folder / "verify.json").write_text(json.dumps([weak, strong]))
    result = audit("blur", config, ["g1c0"], out, margin=99.0, identity=str(folder), progress=False)
    verdict = result["verdicts"]["g1c0"]
    assert (verdict["identity_test_bacc"], verdict["identity_test_bacc_ci95"]) == (0.93, [0.88, 0.97])
    assert "Identity 93.0%" in (out / "audit.md").read_text()
    with pytest.raises(ConfigError, match="no Identity records for g1c1"):
        audit("blur", config, ["g1c0", "g1c1"], out, identity=str(folder), progress=False)


def test_a_rise_of_exactly_the_margin_is_not_convergence():
    # Measured (an audit of the demo's negative-CE encoder): best validation scores 0.7100000083446503
    # then 0.7199999988079071, a rise of exactly 1 point that read as "less than 1 point".
    rise = 0.7199999988079071 - 0.7100000083446503
    assert rise < 0.01
    assert not converged(rise, 1.0)
    assert converged(0.0099, 1.0)
    assert converged(0.0, 0.5) and not converged(0.006, 0.5)


def _scripted_rounds(monkeypatch, script):
    """Replace the training of a round by records made up per round: (first half, second half)
    per attacker, at one checkpoint best on both; the whole validation score their mean."""
    base = {"encoder": "blur", "task": "g1c0", "role": "other", "attack": "zoo", "chance": 0.5, "bacc_chance": 0.5,
            "n_test": 100, "iters": 10, "saturated": True, "test_acc_best": 0.6, "test_bacc_best": 0.6,
            "test_bacc_ci95": [0.5, 0.7], "info_bits": 0.1, "val_acc_best": 0.6, "seconds": 1.0}

    def run_round(spec, config_dict, task, role, trials, *args):
        halves = script[trials[0].round]
        return [dict(base, attacker=t.family, lr=t.lr, seed=t.seed, round=t.round, patience=t.patience,
                     views=t.views, val_bacc_crossfit=[list(h), list(h[::-1])], val_bacc_best=sum(h) / 2)
                for t, h in zip(trials, halves + [(0.5, 0.5)] * (len(trials) - len(halves)))]

    monkeypatch.setattr(audit_module, "_run_round", run_round)


def test_a_rise_by_selection_alone_is_not_confirmed(tiny_config, tmp_path, monkeypatch):
    # Round 1's best attacker is lucky on the first half (0.80) and worse than round 0's on the
    # second (0.69); the best on the second half is 0.71 on the first: cross-fitted, 0.70 as in
    # round 0. The best validation score rose 4.5 points, the confirmed score not at all.
    script = {0: [(0.70, 0.70)], 1: [(0.80, 0.69), (0.71, 0.71)], 2: [(0.90, 0.71)]}
    _scripted_rounds(monkeypatch, script)
    result = audit("blur", tiny_config, ["g1c0"], tmp_path / "c", max_rounds=3, attacks=["zoo"], progress=False,
                   stop_rule="confirmed")
    verdict = result["verdicts"]["g1c0"]
    assert (verdict["converged"], verdict["stopped_by"], verdict["rounds_run"]) == (True, "margin", 2)
    assert verdict["last_rise_points"] == pytest.approx(4.5)
    assert verdict["last_confirmed_rise_points"] == pytest.approx(0.0, abs=1e-6)
    assert [r["confirmed_bacc"] for r in verdict["rounds"]] == pytest.approx([0.70, 0.70])
    text = (tmp_path / "c" / "audit.md").read_text()
    assert "Converged after round 1 (last confirmed rise 0.00 < 1 points)" in text
    assert "rose 4.50 points in that round" in text
    # the default rule keeps searching on the same records, to the round budget, and says what
    # the confirmed rise was
    result = audit("blur", tiny_config, ["g1c0"], tmp_path / "v", max_rounds=3, attacks=["zoo"], progress=False)
    verdict = result["verdicts"]["g1c0"]
    assert (verdict["stop_rule"], verdict["converged"], verdict["stopped_by"], verdict["rounds_run"]) == (
        "validation", False, "max_rounds", 3)
    text = (tmp_path / "v" / "audit.md").read_text()
    assert "the last round still rose 6.00 points (rise of the best validation score)" in text
    assert f"Confirmed rise {verdict['last_confirmed_rise_points']:.2f} points" in text


def test_a_confirmed_rise_keeps_the_search_going(tiny_config, tmp_path, monkeypatch):
    # a better attacker on both halves is a real rise: round 2 is searched, and there it stops
    _scripted_rounds(monkeypatch, {0: [(0.70, 0.70)], 1: [(0.76, 0.75)], 2: [(0.77, 0.755)]})
    result = audit("blur", tiny_config, ["g1c0"], tmp_path / "c", max_rounds=5, attacks=["zoo"], progress=False,
                   stop_rule="confirmed")
    verdict = result["verdicts"]["g1c0"]
    assert (verdict["converged"], verdict["rounds_run"]) == (True, 3)
    assert [r["confirmed_rise"] for r in verdict["rounds"]] == pytest.approx([None, 0.055, 0.0075])


def test_confirmed_score_is_cross_fitted_and_needs_halves_on_every_record():
    # best on the first half: 0.6 on the second; best on the second: 0.8 on the first
    # (the second record's best on half 2 is another checkpoint than its best on half 1)
    records = [{"val_bacc_crossfit": [[0.9, 0.6], [0.65, 0.85]]}, {"val_bacc_crossfit": [[0.8, 0.75], [0.8, 0.7]]}]
    assert confirmed_score(records) == pytest.approx((0.6 + 0.7) / 2)
    assert confirmed_score([records[0], {"val_bacc_best": 0.8}]) is None
    assert confirmed_score([]) is None
    # attackers tied on the choosing half count alike, whatever their order
    tied = [{"val_bacc_crossfit": [[0.8, 0.5], [0.7, 0.6]]}, {"val_bacc_crossfit": [[0.8, 0.7], [0.6, 0.9]]}]
    assert confirmed_score(tied) == confirmed_score(tied[::-1]) == pytest.approx(((0.5 + 0.7) / 2 + 0.6) / 2)


def test_an_unknown_stop_rule_is_a_config_error(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="stop-rule"):
        audit("blur", tiny_config, ["g1c0"], tmp_path / "a", stop_rule="test", progress=False)
