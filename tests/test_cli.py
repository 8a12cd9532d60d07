"""The command line: help, errors as one clear line, and the subcommands end to end."""

import os
import subprocess
import sys

import pytest

from conftest import TINY
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


def test_train_verify_report_through_the_cli(tmp_path, capsys):
    sets = sum((["--set", s] for s in TINY), [])
    run = tmp_path / "run"
    assert main(["-q", "train", *sets, "--out", str(run), "--no-progress"]) == 0
    assert main(["-q", "train", *sets, "--out", str(run), "--no-progress"]) == 2  # refuses to overwrite
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["-q", "train", "--resume", str(run), "--set", "train.alpha=0.25", "--no-progress"]) == 2
    assert "train.alpha: 0.5 -> 0.25" in capsys.readouterr().err
    assert main(["-q", "verify", str(run), *sets, "--out", str(tmp_path / "v"), "--no-progress"]) == 0
    assert "Strongest attacker" in capsys.readouterr().out
    assert main(["-q", "report", str(run), str(tmp_path / "v"), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").exists()


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "privenc", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("privenc ")


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
