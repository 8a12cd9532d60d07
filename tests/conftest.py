"""Shared fixtures: a tiny configuration that trains in seconds on a CPU, an isolated
image cache so tests never touch ~/.cache, and the device that device-capable tests run on
(``PRIVENC_TEST_DEVICE``: cpu by default, cuda on a machine with a card)."""

import dataclasses
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from privenc.config import Config, load_config
from privenc.training import train

PLACES_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "places365-mini"

TINY = [
    "data.image_size=16", "data.load_size=18", "data.synthetic_per_category=20",
    "encoder.stages=[[4], [8]]", "classifier.stages=[[8], [8]]",
    "train.private=g1c0", "train.desirable=g1c1", "train.batch_size=8", "train.warmup_iters=3",
    "train.iters=6", "train.log_every=3", "train.checkpoint_every=4", "train.val_batches=1",
    "verify.batch_size=8", "verify.eval_every=2", "verify.patience=1", "verify.max_iters=12", "verify.views=1",
    "verify.seeds=[0]",
]
# Resume and rerun tests change alpha away from the demo's own value, whatever the preset ships.
DEMO_ALPHA = load_config("demo").train.alpha
OTHER_ALPHA = DEMO_ALPHA / 2


needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="torch.compile on a CPU needs a C compiler")


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


def chosen_device() -> torch.device:
    """The device named by ``PRIVENC_TEST_DEVICE`` (default cpu); a bad value stops the run."""
    name = os.environ.get("PRIVENC_TEST_DEVICE", "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise pytest.UsageError(f"PRIVENC_TEST_DEVICE must be cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


def pytest_configure(config) -> None:
    chosen_device()  # a typo in the variable fails the run at once, not each test on its own


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items) -> None:
    # A test that takes the device fixture is device-capable: `-m cuda` selects exactly those.
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture
def device(monkeypatch) -> torch.device:
    """Where a device-capable test runs: cpu unless ``PRIVENC_TEST_DEVICE`` says cuda; such a
    test is skipped when it asks for a card that is not there."""
    chosen = chosen_device()
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"PRIVENC_TEST_DEVICE={chosen} but CUDA is not available here")
        if (chosen.index or 0) >= torch.cuda.device_count():
            pytest.skip(f"PRIVENC_TEST_DEVICE={chosen} but only {torch.cuda.device_count()} CUDA device(s) here")
        # The tests compare with float32 references at float32 tolerances; cuDNN's default TF32
        # convolutions keep 10 mantissa bits (the library leaves cuDNN's default alone).
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return chosen


def on_device(config: Config, device: torch.device) -> Config:
    """``config`` with training on ``device``."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, device=str(device)))


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
