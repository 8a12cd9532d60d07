"""`privenc sweep`: the expansion of --vary x --seeds into named runs, the checks made before any
training, the Pareto front on hand-made points, resuming (finished runs and cells are not
redone), sweep.json/md/png and the report of a sweep folder.

The numbers are tested on hand-made verification records (known in advance, milliseconds); one
tiny real sweep (2 encoder losses x 1 seed, 16 px, 9 training steps, no audit: about 10 s of CPU)
is computed once per module for the slow tier, whose tests that change it work on copies."""

import json
import shutil
from importlib.resources import files

import pytest

import privenc.grid as grid_module
import privenc.training as training_module
from conftest import TINY
from privenc.cli import main
from privenc.config import load_config
from privenc.errors import ConfigError
from privenc.report import build_report
from privenc.runs import CHECKPOINT_FILE, ENCODER_FILE, write_config
from privenc.sweep import (
    expand,
    pareto_front,
    parse_seeds,
    parse_vary,
    run_sweep,
    setting_name,
    split_values,
    summarize,
    sweep_markdown,
    train_runs,
    write_sweep,
)

SHORT = [*TINY, "verify.max_iters=6"]
LOSSES = "train.encoder_loss=label_flip,standard_gan"


def _no(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} ran again")
    return refuse


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    assert main(_command(out)) == 0  # through the command line, as a user runs it
    return out, json.loads((out / "sweep.json").read_text())


def _command(out) -> list[str]:
    sets = [word for item in SHORT for word in ("--set", item)]
    return ["sweep", "--config", "demo", "--vary", LOSSES, "--seeds", "0", *sets, "--no-audit", "--no-progress",
            "--out", str(out)]


@pytest.fixture
def copy(swept, tmp_path):
    out, result = swept
    shutil.copytree(out, tmp_path / "s")
    return tmp_path / "s", result


# --------------------------------------------------------------------------- expansion and naming


def test_values_split_on_commas_outside_brackets_and_quotes():
    assert split_values("0.1, 0.5,1") == ["0.1", "0.5", "1"]
    assert split_values("[[4],[8]],[[8],[8]]") == ["[[4],[8]]", "[[8],[8]]"]
    assert split_values('"a,b",c') == ['"a,b"', "c"]


def test_every_combination_of_values_and_seeds_is_a_named_run(tmp_path):
    vary = parse_vary(["train.encoder_loss=label_flip,standard_gan", "train.alpha=0.5,1"])
    planned = expand("demo", SHORT, vary, [0, 1], tmp_path)
    assert [run.name for run in planned] == [
        f"encoder_loss={loss},alpha={alpha},s{seed}"
        for loss in ("label_flip", "standard_gan") for alpha in ("0.5", "1.0") for seed in (0, 1)]
    run = planned[3]  # label_flip, alpha 1, seed 1
    assert run.run_dir == tmp_path / "runs" / "encoder_loss=label_flip,alpha=1.0,s1"
    assert (run.config.train.encoder_loss, run.config.train.alpha, run.config.train.seed) == ("label_flip", 1.0, 1)
    assert run.values == {"train.encoder_loss": "label_flip", "train.alpha": 1.0}
    # the split is the same for every run: only the training seed varies
    assert {r.config.data.seed for r in planned} == {load_config("demo", SHORT).data.seed}
    assert {r.config.train.iters for r in planned} == {6}  # --set applies to every run
    # no --seeds: the config's own training seed
    assert [r.config.train.seed for r in expand("demo", [*SHORT, "train.seed=7"], {}, None, tmp_path)] == [7]


def test_names_are_stable_and_sanitized():
    assert setting_name({"encoder.stages": [[4], [8]]}) == "stages=4_8"
    assert setting_name({"encoder.kernel_size": 3, "classifier.kernel_size": 5}) == \
        "encoder.kernel_size=3,classifier.kernel_size=5"  # the short name alone would be ambiguous
    assert setting_name({"train.amp": True, "train.encoder_lr": 1e-05}) == "amp=true,encoder_lr=1e-05"
    assert setting_name({}) == "base"


def test_two_values_that_name_the_same_folder_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="the same configuration name 'alpha=1.0'"):
        expand("demo", SHORT, parse_vary(["train.alpha=1,1.0"]), [0], tmp_path)


@pytest.mark.parametrize("flag, message", [
    ("train.alhpa=0.1,1", r"unknown key train.alhpa; valid keys of \[train\]: private, desirable, encoder_loss"),
    ("trian.alpha=0.1", "unknown section 'trian'"),
    ("train.alpha", "expected section.key=value1,value2"),
    ("train.seed=0,1", "give --seeds 0,1,2"),
    ("data.seed=0,1", "the data and its split must be the same"),
    ("verify.lr=1e-3,1e-4", "one verification protocol"),
    ("train.private=g1c0,g1c2", "one set of private tasks"),
    ("train.alpha=0.1,,1", "an empty value"),
])
def test_a_bad_vary_flag_is_refused_naming_what_is_valid(flag, message):
    with pytest.raises(ConfigError, match=message):
        parse_vary([flag])


def test_a_key_in_both_set_and_vary_or_a_bad_seed_list_is_refused():
    with pytest.raises(ConfigError, match="both by --set and by --vary"):
        parse_vary(["train.alpha=0.1,1"], ["train.alpha=0.5"])
    with pytest.raises(ConfigError, match="integers separated by commas"):
        parse_seeds("0,x")
    with pytest.raises(ConfigError, match="listed twice"):
        parse_seeds("1,1")


def test_a_bad_key_or_value_fails_before_any_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training_module, "train", _no("training"))
    out = tmp_path / "s"
    code = main(["sweep", "--set", "data.image_size=16", "--vary", "train.alhpa=0.1,1", "--out", str(out)])
    assert code == 2 and "valid keys of [train]" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--vary train.alpha=abc: train.alpha must be of type float"):
        run_sweep("demo", SHORT, ["train.alpha=0.5,abc"], [0], out, progress=False)
    with pytest.raises(ConfigError, match="must include identity"):
        run_sweep("demo", SHORT, [LOSSES], [0], out, references=["blur"], progress=False)
    assert not out.exists()


# --------------------------------------------------------------------------- the front


def test_the_front_keeps_only_points_no_other_beats_on_both_axes():
    # lower x (less private information) and higher y (more utility) are better
    points = [(10, 0), (20, 5), (15, -1), (30, 5), (5, -10)]
    # (15, -1) is beaten by (10, 0); (30, 5) by (20, 5): same utility, more leaked
    assert pareto_front(points) == [True, True, False, False, True]


def test_equal_points_both_stay_on_the_front_and_a_tie_on_one_axis_is_decided_by_the_other():
    assert pareto_front([(1, 1), (1, 1), (2, 0)]) == [True, True, False]
    assert pareto_front([(1, 1), (1, 2)]) == [False, True]
    assert pareto_front([(3, 1)]) == [True]


# --------------------------------------------------------------------------- the numbers, by hand


def _record(encoder: str, task: str, val: float, test: float, attacker: str = "paper") -> dict:
    return {"encoder": encoder, "task": task, "role": "private" if task == "g1c0" else "desirable",
            "attacker": attacker, "seed": 0, "val_acc_best": val, "val_bacc_best": val, "test_acc_best": test,
            "test_bacc_best": test, "test_bacc_ci95": [test - 0.05, min(1.0, test + 0.05)], "bacc_chance": 0.5,
            "test_acc_final": test, "n_test": 40, "saturated": True, "chance": 0.5, "info_bits": 0.1, "iters": 12,
            "curve": [[2, val, 0.5, val]], "seconds": 1.5}


# test balanced accuracy per (encoder, task); chance is 0.5, Identity keeps g1c1 at 0.95
TESTS = {("encoder_loss=label_flip,s0", "g1c0"): 0.60, ("encoder_loss=label_flip,s0", "g1c1"): 0.90,
         ("encoder_loss=label_flip,s1", "g1c0"): 0.70, ("encoder_loss=label_flip,s1", "g1c1"): 0.80,
         ("encoder_loss=standard_gan,s0", "g1c0"): 0.55, ("encoder_loss=standard_gan,s0", "g1c1"): 0.95,
         ("encoder_loss=standard_gan,s1", "g1c0"): 0.65, ("encoder_loss=standard_gan,s1", "g1c1"): 0.85,
         ("identity", "g1c0"): 1.00, ("identity", "g1c1"): 0.95, ("blur", "g1c0"): 0.75, ("blur", "g1c1"): 0.85}


@pytest.fixture
def by_hand(tmp_path):
    """A sweep's result from hand-made records: 2 losses x seeds 0, 1, Identity and Blur."""
    planned = expand("demo", SHORT, parse_vary([LOSSES]), [0, 1], tmp_path / "s")
    records = [_record(enc, task, test, test) for (enc, task), test in TESTS.items()]
    # a second attacker, better on test but worse on validation: the strongest is chosen on validation
    records.append(_record("encoder_loss=label_flip,s0", "g1c0", 0.55, 0.99, attacker="mlp"))
    result = summarize(planned, parse_vary([LOSSES]), records, ["identity", "blur"], load_config("demo", SHORT),
                       ["g1c0", "g1c1"], "privenc sweep --out s")
    return tmp_path / "s", records, result


def test_each_configuration_is_its_mean_over_seeds_with_the_min_max_spread(by_hand):
    _, _, result = by_hand
    label_flip, standard_gan = result["configurations"]
    assert [s["x"] for s in label_flip["seeds"]] == pytest.approx([10, 20])  # 100 * (0.60 - 0.5), not 0.99's
    assert label_flip["x"] == pytest.approx({"mean": 15, "min": 10, "max": 20, "std": 50 ** 0.5})
    assert label_flip["y"] == pytest.approx({"mean": -10, "min": -15, "max": -5, "std": 50 ** 0.5})
    assert standard_gan["x"]["mean"] == pytest.approx(10) and standard_gan["y"]["mean"] == pytest.approx(-5)
    assert label_flip["seeds"][1]["run"] == "runs/encoder_loss=label_flip,s1"
    # standard GAN leaks less and keeps more: label flip is off the front
    assert (label_flip["on_front"], standard_gan["on_front"]) == (False, True)
    assert result["front"] == ["encoder_loss=standard_gan"] and result["seeds"] == [0, 1]
    identity, blur = result["references"]
    assert (identity["x"], identity["y"]) == pytest.approx((50, 0))
    assert (blur["x"], blur["y"]) == pytest.approx((25, -10))
    assert label_flip["method"] == "label_flip" and label_flip["values"] == {"train.encoder_loss": "label_flip"}
    # the costs: every attacker of an encoder's cells (two tasks, and the mlp record), no training log here
    assert [s["verify_s"] for s in label_flip["seeds"]] == [4.5, 3.0] and identity["verify_s"] == 3.0
    assert label_flip["seeds"][0]["train_s"] is None


def test_sweep_files_and_the_report_of_a_sweep_folder(by_hand, tmp_path):
    out, records, result = by_hand
    result["configurations"][1]["audit"] = {"seed": 1, "run": "runs/encoder_loss=standard_gan,s1", "x": 30.0,
                                            "plain_x": 15.0, "converged": False, "rounds": 2,
                                            "folder": "audit/encoder_loss=standard_gan"}
    result["definitions"]["audit"] = "privenc audit of the least private seed"
    write_sweep(out, result)
    assert json.loads((out / "sweep.json").read_text()) == result
    table = (out / "sweep.md").read_text()
    assert "`privenc sweep --out s`" in table and "minus chance 1/K" in table and "min-max over seeds" in table
    rows = [line for line in table.splitlines() if line.startswith("| encoder_loss=")]
    assert rows == ["| encoder_loss=standard_gan | standard_gan | standard_gan | 2 | +10.0 [+5.0, +15.0] "
                    "| -5.0 [-10.0, +0.0] | yes | +30.0 (seed 1, not converged) |",
                    "| encoder_loss=label_flip | label_flip | label_flip | 2 | +15.0 [+10.0, +20.0] "
                    "| -10.0 [-15.0, -5.0] |  | — |"]  # the front first
    assert "| blur | +25.0 | -10.0 |" in table
    assert (out / "pareto.png").stat().st_size > 10_000
    # the report: the sweep's table and its figure redrawn from sweep.json, beside the usual tables
    (out / "grid" / "cells" / "all").mkdir(parents=True)
    (out / "grid" / "cells" / "all" / "verify.json").write_text(json.dumps(records))
    report = build_report([out], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"## Sweep — the privacy–utility front ({out})" in text and "## Table 2" in text
    assert sweep_markdown(result).split("\n", 2)[2] in text and "![privacy–utility front](pareto.png)" in text
    assert (tmp_path / "report" / "pareto.png").is_file() and "pareto.png" in report["figures"]
    assert report["sweeps"] == [{"folder": str(out), "front": ["encoder_loss=standard_gan"]}]


# --------------------------------------------------------------------------- a tiny sweep end to end


def _fake_run(folder, config):
    """A run folder with its config and what a finished (or interrupted) training leaves."""
    folder.mkdir(parents=True)
    write_config(config, folder)
    (folder / "checkpoints").mkdir()
    (folder / CHECKPOINT_FILE).write_bytes(b"")


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(tmp_path, monkeypatch):
    planned = expand("demo", SHORT, parse_vary([LOSSES]), [0], tmp_path)
    for run in planned:
        _fake_run(run.run_dir, run.config)
    (planned[0].run_dir / ENCODER_FILE).write_bytes(b"")  # the first finished, the second interrupted
    calls = []
    monkeypatch.setattr(training_module, "train", lambda config, run_dir, resume, progress: calls.append(
        (run_dir, resume, config.train.device)))
    assert train_runs(planned, progress=False, device="cpu") == 1
    assert calls == [(planned[1].run_dir, True, "cpu")]  # --device reaches the training, not the run's identity


@pytest.mark.slow
def test_the_tiny_sweep_writes_its_table_json_and_figure(swept):
    out, result = swept
    assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "pareto.png").stat().st_size > 10_000
    names = [c["name"] for c in result["configurations"]]
    assert names == ["encoder_loss=label_flip", "encoder_loss=standard_gan"]
    assert result["vary"] == {"train.encoder_loss": ["label_flip", "standard_gan"]}
    assert [r["name"] for r in result["references"]] == ["identity", "blur"]
    # each number recomputed from the grid's strongest attackers
    cells = {}
    for path in (out / "grid" / "cells").glob("*/verify.json"):
        for record in json.loads(path.read_text()):
            cells[(record["encoder"], record["task"])] = record  # one attacker per cell here
    identity_desirable = cells[("identity", "g1c1")]["test_bacc_best"]
    for c in result["configurations"]:
        (seed,) = c["seeds"]
        run = seed["run"].split("/")[1]
        private, desirable = cells[(run, "g1c0")], cells[(run, "g1c1")]
        assert seed["x"] == pytest.approx(100 * (private["test_bacc_best"] - private["bacc_chance"]))
        assert seed["y"] == pytest.approx(100 * (desirable["test_bacc_best"] - identity_desirable))
        assert c["x"] == {"mean": seed["x"], "min": seed["x"], "max": seed["x"], "std": 0.0}
        # the costs: the run's training clock and its cells' attackers
        # (tiny attackers may take under 0.05 s each, so the sums are compared, not tested for > 0)
        assert seed["train_s"] == pytest.approx(json.loads(
            (out / seed["run"] / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"], abs=0.05)
        # verify_s is rounded to 0.1 s: at most 0.05 off, plus float noise (a sum of 0.15 sits on the edge)
        assert seed["verify_s"] == pytest.approx(
            sum(r["seconds"] for path in (out / "grid" / "cells").glob("*/verify.json")
                for r in json.loads(path.read_text()) if r["encoder"] == run), abs=0.05 + 1e-9)
    assert result["references"][0]["y"] == 0.0  # Identity against itself
    means = [(c["x"]["mean"], c["y"]["mean"]) for c in result["configurations"]]
    assert [c["on_front"] for c in result["configurations"]] == pareto_front(means)
    assert result["front"] and all(c["audit"] is None for c in result["configurations"])
    table = (out / "sweep.md").read_text()
    assert result["command"].startswith(f"privenc sweep --config demo --vary {LOSSES} --seeds 0 --set")
    assert f"`{result['command']}`" in table and "| encoder_loss=label_flip | label_flip | label_flip | 1 |" in table
    assert "minus chance 1/K" in table and "min-max over seeds" in table
    assert "Time, in minutes of one process" in table and "over 2 runs (from their metrics logs)" in table


@pytest.mark.slow
def test_a_second_call_trains_and_verifies_nothing(copy, monkeypatch):
    out, result = copy
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/encoder.pt")}
    monkeypatch.setattr(training_module, "train", _no("training"))
    monkeypatch.setattr(grid_module, "_run_cell", _no("a grid cell"))
    assert main(_command(out)) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert again.pop("command").endswith(f"--out {out}")  # the copy's folder
    assert again == {key: value for key, value in result.items() if key != "command"}
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/encoder.pt")} == stamps


@pytest.mark.slow
def test_a_preset_whose_default_of_a_varied_key_changed_still_resumes_the_sweep(copy, monkeypatch, capsys):
    # A sweep's runs bring their own value of each varied key; a preset that changes its default
    # of one (as demo's encoder_loss did) must not make the finished grid refuse the rerun.
    out, _ = copy
    preset = files("privenc").joinpath("presets", "demo.toml").read_text()
    loss = load_config("demo").train.encoder_loss
    other = "negative_ce" if loss != "negative_ce" else "label_flip"
    changed = preset.replace(f'encoder_loss = "{loss}"', f'encoder_loss = "{other}"')
    assert changed != preset  # else the rerun below would test nothing
    (out.parent / "changed.toml").write_text(changed)
    monkeypatch.setattr(training_module, "train", _no("training"))
    monkeypatch.setattr(grid_module, "_run_cell", _no("a grid cell"))
    argv = _command(out)
    argv[argv.index("demo")] = str(out.parent / "changed.toml")
    assert main(argv) == 0
    stricter = out.parent / "stricter.toml"  # a key that is not varied still decides the cells
    stricter.write_text(preset.replace("\nlr = 1e-3", "\nlr = 2e-3"))
    argv[argv.index(str(out.parent / "changed.toml"))] = str(stricter)
    assert main(argv) == 2
    assert "verify.lr: 0.001 -> 0.002" in capsys.readouterr().err


def test_a_run_folder_trained_with_another_config_is_refused_before_training(tmp_path, monkeypatch):
    for run in expand("demo", SHORT, parse_vary([LOSSES]), [0], tmp_path):
        _fake_run(run.run_dir, run.config)
    monkeypatch.setattr(training_module, "train", _no("training"))
    with pytest.raises(ConfigError, match=r"encoder_loss=label_flip,s0 was trained with another config"
                                          r"(.|\n)*train.iters: 6 -> 7"):
        run_sweep("demo", [*SHORT, "train.iters=7"], [LOSSES], [0], tmp_path, progress=False)
    # where it runs may differ (runs.IGNORED["reuse"]): that reaches the training, which is refused here
    with pytest.raises(AssertionError, match="training ran again"):
        run_sweep("demo", [*SHORT, "train.device=cpu"], [LOSSES], [0], tmp_path, progress=False)


@pytest.mark.slow
def test_the_front_is_audited_and_drawn_beside_its_plain_point(copy, monkeypatch):
    """About 15 s: the audit of each front configuration, 2 rounds of tiny attackers."""
    out, result = copy
    monkeypatch.setattr(training_module, "train", _no("training"))
    audited = run_sweep("demo", SHORT, [LOSSES], [0], out, audit_rounds=2, progress=False)
    for c in audited["configurations"]:
        if not c["on_front"]:
            assert c["audit"] is None
            continue
        verdict = json.loads((out / c["audit"]["folder"] / "audit.json").read_text())["verdicts"]["g1c0"]
        assert c["audit"]["x"] == pytest.approx(verdict["above_chance_points"])
        assert verdict["rounds_run"] <= 2 and verdict["identity_test_bacc"] is not None  # from the grid
        assert c["audit"]["plain_x"] == c["x"]["max"] and c["audit"]["seed"] == 0
    assert "audited x" in (out / "sweep.md").read_text() and (out / "pareto.png").is_file()
