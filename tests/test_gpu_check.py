"""The GPU path's CPU side: PRIVENC_TEST_DEVICE moves the device-capable tests (the `device`
fixture, marker `cuda`) to a card, and skips them where there is none."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import chosen_device

ROOT = Path(__file__).resolve().parents[1]
SMALL = "tests/test_models.py::test_attackers_output_logits"  # takes `device`; a forward pass each


def _pytest(*args: str, device: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PRIVENC_TEST_DEVICE"}
    if device is not None:
        env["PRIVENC_TEST_DEVICE"] = device
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_device_is_the_cpu_unless_the_variable_names_another(monkeypatch):
    monkeypatch.delenv("PRIVENC_TEST_DEVICE", raising=False)
    assert chosen_device() == torch.device("cpu")
    monkeypatch.setenv("PRIVENC_TEST_DEVICE", "cuda:1")
    assert chosen_device() == torch.device("cuda", 1)
    monkeypatch.setenv("PRIVENC_TEST_DEVICE", "gpu")
    with pytest.raises(pytest.UsageError, match="PRIVENC_TEST_DEVICE must be cpu, cuda or cuda:N, got 'gpu'"):
        chosen_device()


def test_device_capable_tests_run_on_the_cpu_by_default_and_are_marked_cuda():
    done = _pytest(SMALL, "-m", "cuda", device=None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout
    # the marker is what `-m` selects: none of them is left when it is excluded
    excluded = _pytest(SMALL, "-m", "not cuda", device=None)
    assert "4 deselected" in excluded.stdout and "passed" not in excluded.stdout, excluded.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without a card")
def test_asking_for_cuda_without_a_card_skips_with_the_reason():
    done = _pytest(SMALL, "-rs", device="cuda")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 skipped" in done.stdout and "passed" not in done.stdout
    assert "PRIVENC_TEST_DEVICE=cuda but CUDA is not available here" in done.stdout


def test_a_bad_device_name_stops_the_run_at_once():
    done = _pytest(SMALL, device="gpu")
    assert done.returncode != 0
    assert "PRIVENC_TEST_DEVICE must be cpu, cuda or cuda:N, got 'gpu'" in done.stdout + done.stderr
    assert "passed" not in done.stdout
