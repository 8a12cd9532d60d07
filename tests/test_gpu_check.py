"""The GPU path's CPU side: PRIVENC_TEST_DEVICE moves the device-capable tests (the `device`
fixture, marker `cuda`) to a card, and skips them where there is none; benchmarks/gpu_check.py
runs its dry run (--device cpu --quick) and records a section cut by its time limit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import chosen_device

ROOT = Path(__file__).resolve().parents[1]
SMALL = "tests/test_models.py::test_attackers_output_logits"  # takes `device`; a forward pass each
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"


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


@pytest.mark.slow  # starts a process
def test_device_capable_tests_run_on_the_cpu_by_default_and_are_marked_cuda():
    done = _pytest(SMALL, "-m", "cuda", device=None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout
    # the marker is what `-m` selects: none of them is left when it is excluded
    excluded = _pytest(SMALL, "-m", "not cuda", device=None)
    assert "4 deselected" in excluded.stdout and "passed" not in excluded.stdout, excluded.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without a card")
@pytest.mark.slow  # starts a process
def test_asking_for_cuda_without_a_card_skips_with_the_reason():
    done = _pytest(SMALL, "-rs", device="cuda")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 skipped" in done.stdout and "passed" not in done.stdout
    assert "PRIVENC_TEST_DEVICE=cuda but CUDA is not available here" in done.stdout


@pytest.mark.slow  # starts a process
def test_a_bad_device_name_stops_the_run_at_once():
    done = _pytest(SMALL, device="gpu")
    assert done.returncode != 0
    assert "PRIVENC_TEST_DEVICE must be cpu, cuda or cuda:N, got 'gpu'" in done.stdout + done.stderr
    assert "passed" not in done.stdout


def _gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PRIVENC_TEST_DEVICE")}
    return subprocess.run([sys.executable, str(GPU_CHECK), "--device", "cpu", "--quick", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # starts a process
def test_gpu_check_dry_run_runs_every_section_and_writes_its_numbers(tmp_path):
    done = _gpu_check(tmp_path / "out")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["tests", "step", "loader", "attackers", "smoke"]
    assert {name: r["status"] for name, r in sections.items()} == dict.fromkeys(sections, "done")
    assert sections["tests"]["exit_code"] == 0 and sections["tests"]["summary"].startswith("4 passed")
    variants = sections["step"]["variants"]
    assert list(variants) == ["eager fp32", "bf16 autocast", "bf16 + channels-last",
                              "bf16 + channels-last + cudnn.benchmark"]  # no compile in a dry run
    assert all(v["it_per_s"] > 0 and v["images_per_s"] == 2 * 8 * v["it_per_s"] for v in variants.values())
    search = sections["step"]["largest_batch"]
    assert search["variant"] in variants
    # On a loaded machine the search's own process may not start in its time: then it is cut.
    assert search["probes"][:1] == [{"batch": 8, "fits": True}] or search["cut"], search
    assert sections["loader"]["rates"]["0"] > 0 and sections["loader"]["demand_images_per_s"] > 0
    assert sections["attackers"]["rates"]["paper"]["attacker_iterations_per_s"] > 0
    smoke = sections["smoke"]
    assert smoke["train"]["exit_code"] == 0 and smoke["verify"]["exit_code"] == 0
    assert smoke["train"]["last_record"]["step"] == 4 and smoke["verify"]["attackers"][0]["task"] == "g1c0"
    markdown = (tmp_path / "out" / "gpu.md").read_text()
    for number, name in enumerate(sections, 1):
        assert f"## {number}. {name}: done" in markdown


@pytest.mark.slow  # starts a process
def test_gpu_check_records_a_section_cut_by_its_time_limit(tmp_path):
    # 3 s in all, all of it the step section's: it cannot time a variant for 30.
    done = _gpu_check(tmp_path / "out", "--sections", "step", "--budget", "3", "--seconds", "30")
    assert done.returncode == 1
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert report["sections"]["step"]["status"] == "cut" and report["sections"]["step"]["seconds"] < 10
    assert "## 2. step: cut" in (tmp_path / "out" / "gpu.md").read_text()


@pytest.mark.slow  # starts a process
def test_the_selected_sections_share_the_whole_budget(tmp_path):
    # A run of the smoke alone once gave it 28% of --budget and cut it (device run, 2026-11-30).
    done = _gpu_check(tmp_path / "out", "--sections", "loader,attackers", "--budget", "50")
    assert done.returncode == 0, done.stderr
    limits = {name: record["limit_s"]
              for name, record in json.loads((tmp_path / "out" / "gpu.json").read_text())["sections"].items()}
    assert set(limits) == {"loader", "attackers"}
    assert 23 < limits["loader"] < 24.5  # 50 x 0.07 / (0.07 + 0.08)
    assert limits["attackers"] >= 50 * 0.08 / 0.15  # its share and what the loader left
