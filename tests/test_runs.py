"""The run folder: its files, the encoder with its metadata, and the policies for starting,
resuming and reusing a run, tested without the command line."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from privenc import runs
from privenc.config import load_config
from privenc.errors import ConfigError
from privenc.training import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config("demo", TINY), run, progress=False)
    return run


@pytest.fixture
def finished_run(trained, tmp_path):
    """A finished run of its own (the policies write into config.toml)."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def test_resume_config_accepts_where_it_runs_and_verification_and_records_them(finished_run):
    config = runs.resume_config(finished_run, ["train.device=cpu", "verify.patience=7"])
    assert config.verify.patience == 7
    assert runs.read_config(finished_run).verify.patience == 7  # recorded for later commands


def test_resume_config_refuses_a_changed_training_config_unless_allowed(finished_run):
    with pytest.raises(ConfigError, match=r"train.alpha: .* -> 0.125"):
        runs.resume_config(finished_run, ["train.alpha=0.125"])
    assert runs.read_config(finished_run).train.alpha != 0.125  # nothing written on refusal
    assert runs.resume_config(finished_run, ["train.alpha=0.125"], allow_config_change=True).train.alpha == 0.125
    assert runs.read_config(finished_run).train.alpha == 0.125


def test_resume_config_refuses_to_shorten_a_run_and_names_missing_files(finished_run, tmp_path):
    with pytest.raises(ConfigError, match="cannot be shortened"):
        runs.resume_config(finished_run, ["train.iters=0", "train.warmup_iters=1"], allow_config_change=True)
    with pytest.raises(ConfigError, match="config.toml does not exist"):
        runs.resume_config(tmp_path / "nothing")
    (tmp_path / "fresh").mkdir()
    runs.write_config(runs.read_config(finished_run), tmp_path / "fresh")
    with pytest.raises(ConfigError, match="no checkpoint yet"):
        runs.resume_config(tmp_path / "fresh")


def test_new_run_folder_policy(finished_run, tmp_path):
    with pytest.raises(ConfigError, match="already holds a training run"):
        runs.check_new_run_folder(finished_run)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match="not empty and not a training run folder"):
        runs.check_new_run_folder(other)
    runs.check_new_run_folder(other, world_rank=1)  # only rank 0 looks
    (tmp_path / "killed" / "checkpoints").mkdir(parents=True)  # stopped before its config.toml
    runs.check_new_run_folder(tmp_path / "killed")
    runs.check_new_run_folder(tmp_path / "new")


def test_config_changes_by_purpose():
    old = {"train": {"device": "cpu", "alpha": 0.5, "compile": True}, "data": {"num_workers": 0},
           "verify": {"tasks": [], "lr": 1.0}}
    new = {"train": {"device": "cuda", "alpha": 0.5, "compile": False}, "data": {"num_workers": 4},
           "verify": {"tasks": ["a"], "lr": 2.0}}
    assert runs.config_changes(old, new, "resume") == ["data.num_workers: 0 -> 4"]
    assert runs.config_changes(old, new, "reuse") == ["train.compile: True -> False"]
    assert runs.config_changes(old, new, "grid") == ["train.device: 'cpu' -> 'cuda'", "train.compile: True -> False",
                                                     "data.num_workers: 0 -> 4", "verify.lr: 1.0 -> 2.0"]


def test_the_encoder_file_carries_its_metadata(finished_run, tiny_config):
    loaded = runs.read_encoder(finished_run)
    total = tiny_config.train.warmup_iters + tiny_config.train.iters
    assert loaded.step == total and loaded.path == finished_run / runs.ENCODER_FILE
    assert loaded.image_size == tiny_config.data.image_size
    assert loaded.encoder_config == tiny_config.to_dict()["encoder"]
    assert not loaded.module.training
    assert runs.encoder_written_at(loaded.path, total) and not runs.encoder_written_at(loaded.path, total - 1)
    assert [r["step"] for r in runs.read_metrics(finished_run)][-1] == total


def test_training_seconds_add_up_the_invocations_of_a_resumed_run(tmp_path):
    assert runs.training_seconds(tmp_path) is None  # no metrics log
    elapsed = [10.0, 20.0, 4.0, 15.5]  # interrupted after 20 s, resumed for 15.5 more
    (tmp_path / runs.METRICS_FILE).write_text("".join(
        f'{{"step": {i}, "elapsed_s": {e}}}\n' for i, e in enumerate(elapsed)))
    assert runs.training_seconds(tmp_path) == 35.5


def test_readers_of_run_folders_do_not_import_the_trainer():
    code = ("import sys, privenc.verification, privenc.report, privenc.deploy, privenc.grid, privenc.runs\n"
            "print('privenc.training' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
