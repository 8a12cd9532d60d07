"""The command line: help, errors as one clear line, and the subcommands end to end."""

import os
import subprocess
import sys

import pytest

from conftest import DEMO_ALPHA, OTHER_ALPHA, TINY
from privenc.cli import build_parser, main


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {"train", "verify", "grid", "report", "demo", "data", "config"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
    assert "usage: privenc" in capsys.readouterr().out


def test_train_help_names_the_options_against_retrained_attackers(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for key in ("train.private_ensemble", "train.adversary_reset_every", "train.classifier_steps"):
        assert key in text


def test_config_errors_are_one_line_not_a_traceback(capsys):
    assert main(["config", "--set", "train.itres=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("privenc: error: unknown key train.itres") and "Traceback" not in err


def test_config_prints_the_resolved_toml(capsys):
    assert main(["config", "--config", "paper", "--set", "train.iters=5"]) == 0
    out = capsys.readouterr().out
    assert "iters = 5" in out and "image_size = 224" in out


def test_data_inspect_synthetic(capsys):
    assert main(["data", "inspect", "synthetic", *sum((["--set", s] for s in TINY[:3]), [])]) == 0
    out = capsys.readouterr().out
    assert "g1c0" in out and "g2c7" in out


def test_data_inspect_uses_only_the_tasks_someone_chose(tmp_path, capsys):
    from PIL import Image

    csv = tmp_path / "faces.csv"
    for name in "abcd":
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    csv.write_text("path,gender\na.png,f\nb.png,m\nc.png,f\nd.png,m\n")
    assert main(["-q", "data", "inspect", str(csv)]) == 0  # was: task 'g1c0': unknown category 'g1c0'
    out = capsys.readouterr().out
    assert "gender (the category): 2 values" in out and "task " not in out
    assert main(["-q", "data", "inspect", str(csv), "--task", "attribute:gender"]) == 0
    assert "task attribute:gender (categorical, 2 classes):" in capsys.readouterr().out
    assert main(["-q", "data", "inspect", "--config", "demo", "--set", "data.synthetic_per_category=3"]) == 0
    assert "task g1c0 (detect, 2 classes):" in capsys.readouterr().out  # the preset's own tasks


def test_train_and_verify_without_a_task_say_which_setting_names_one(tmp_path, capsys):
    config = tmp_path / "no-task.toml"
    config.write_text('[data]\nsource = "synthetic"\n')
    assert main(["-q", "train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "no private task: set train.private" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["-q", "verify", "identity", "--config", str(config), "--out", str(tmp_path / "v")]) == 2
    assert "no task; give --task" in capsys.readouterr().err and not (tmp_path / "v").exists()


def test_the_demo_fallback_brings_no_synthetic_task_to_other_data(tmp_path, capsys):
    from PIL import Image

    for name in ("a/0.png", "b/0.png", "b/1.png"):
        (tmp_path / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "photos" / name)
    photos = ["--set", "data.source=folder", "--set", f"data.root={tmp_path / 'photos'}"]
    assert main(["-q", "train", *photos, "--set", "train.desirable=b", "--out", str(tmp_path / "run")]) == 2
    assert "no private task: set train.private" in capsys.readouterr().err  # not: unknown category 'g1c0'
    assert main(["-q", "verify", "identity", *photos, "--out", str(tmp_path / "v")]) == 2
    assert "no task; give --task" in capsys.readouterr().err


@pytest.mark.slow
def test_train_verify_report_through_the_cli(tmp_path, capsys):
    sets = sum((["--set", s] for s in TINY), [])
    run = tmp_path / "run"
    assert main(["-q", "train", *sets, "--out", str(run), "--no-progress"]) == 0
    assert main(["-q", "train", *sets, "--out", str(run), "--no-progress"]) == 2  # refuses to overwrite
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["-q", "train", "--resume", str(run), "--set", f"train.alpha={OTHER_ALPHA}", "--no-progress"]) == 2
    assert f"train.alpha: {DEMO_ALPHA} -> {OTHER_ALPHA}" in capsys.readouterr().err
    assert main(["-q", "verify", str(run), *sets, "--out", str(tmp_path / "v"), "--no-progress"]) == 0
    assert "Strongest attacker" in capsys.readouterr().out
    assert main(["-q", "report", str(run), str(tmp_path / "v"), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").exists()


@pytest.mark.slow
def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "privenc", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("privenc ")


@pytest.mark.slow
def test_quiet_silences_every_progress_bar_including_the_image_cache(tmp_path):
    sets = [arg for s in TINY for arg in ("--set", s)]

    def stderr_of(*flags: str, name: str) -> str:
        env = {**os.environ, "PRIVENC_CACHE": str(tmp_path / f"cache-{name}")}  # built afresh: its bar shows
        env.pop("PRIVENC_PROGRESS", None)
        out = subprocess.run([sys.executable, "-m", "privenc", *flags, "train", *sets, "--out", str(tmp_path / name)],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return out.stderr

    assert "decoding synthetic images" in stderr_of(name="loud")
    assert "decoding" not in stderr_of("-q", name="quiet")


def _sets(items) -> list[str]:
    return [arg for s in items for arg in ("--set", s)]


def test_quiet_is_accepted_before_or_after_the_subcommand():
    parser = build_parser()
    for argv, quiet in ((["verify", "identity", "--out", "v"], False),
                        (["-q", "verify", "identity", "--out", "v"], True),
                        (["verify", "identity", "--out", "v", "-q"], True), (["data", "inspect", "-q"], True)):
        assert parser.parse_args(argv).quiet is quiet, argv


def test_a_grid_checks_every_encoder_and_task_before_running_any_cell(tmp_path, capsys):
    grid = tmp_path / "grid"
    assert main(["-q", "grid", "--encoders", "identity", "--tasks", "g1c0", "g9c9", *_sets(TINY),
                 "--out", str(grid)]) == 2
    assert "task 'g9c9': unknown category" in capsys.readouterr().err
    assert main(["-q", "grid", "--encoders", "identity", str(tmp_path / "nope"), "--tasks", "g1c0", *_sets(TINY),
                 "--out", str(grid)]) == 2
    assert "nope': no such run folder or file" in capsys.readouterr().err
    assert not grid.exists()  # neither the identity cell nor anything else ran


@pytest.mark.slow
def test_training_without_a_bar_logs_each_log_step_and_records_the_version(tmp_path, caplog):
    import json

    from privenc import __version__

    caplog.set_level("INFO", logger="privenc")
    run = tmp_path / "run"
    assert main(["train", *_sets(TINY), "--out", str(run), "--no-progress"]) == 0
    steps = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("step ")]
    assert steps == ["3/9", "6/9", "9/9"]
    assert json.loads((run / "meta.json").read_text())["privenc"] == __version__


def test_a_failed_verify_or_report_leaves_no_empty_output_folder(tmp_path, capsys):
    assert main(["-q", "verify", str(tmp_path / "nope"), "--out", str(tmp_path / "v")]) == 2
    assert main(["-q", "report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["-q", "report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() and not (tmp_path / "r").exists()
