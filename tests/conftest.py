"""Shared fixtures: a tiny configuration that trains in seconds on a CPU, and an isolated
image cache so tests never touch ~/.cache."""

from pathlib import Path

import pytest
import torch

from privenc.config import Config, load_config
from privenc.train import train

PLACES_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "places365-mini"

TINY = [
    "data.image_size=16", "data.load_size=18", "data.synthetic_per_category=20",
    "encoder.stages=[[4], [8]]", "classifier.stages=[[8], [8]]",
    "train.private=g1c0", "train.desirable=g1c1", "train.batch_size=8", "train.warmup_iters=3",
    "train.iters=6", "train.log_every=3", "train.checkpoint_every=4", "train.val_batches=1",
    "verify.batch_size=8", "verify.eval_every=2", "verify.patience=1", "verify.max_iters=12", "verify.views=1",
]


class PayloadMarker:
    """Unpickling this would create ``path``: a stand-in for a malicious payload in a file that
    must be loaded with ``weights_only=True``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    import os

    os.environ["PRIVENC_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def tiny_config() -> Config:
    return load_config("demo", TINY)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run (9 steps; checkpoints at 4, 8, 9), trained on one thread; the
    reliability tests work on copies of it (one training for both of their files)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(load_config("demo", TINY), run, progress=False)
    torch.set_num_threads(threads)
    return run


@pytest.fixture(autouse=True)
def _progress_setting_per_test(monkeypatch):
    # `privenc -q` run in-process (main([...])) sets PRIVENC_PROGRESS=0 for the process and its
    # children; undone after each test so that no test depends on the order they ran in.
    monkeypatch.setenv("PRIVENC_PROGRESS", "1")
