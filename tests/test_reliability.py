"""Fault injection: a run must survive a kill, a crash while saving, a full disk and non-finite
values without losing finished work or silently changing a result (docs/reliability.md).

Kill tests start the real command line in a subprocess, SIGKILL it at a seeded random moment
after its first result file exists, finish the work in this process and compare with an
uninterrupted run, bit for bit (CPU, one thread on both sides). PRIVENC_FAULT_SEED picks other
kill moments (the delay is in every failure message, so a failure can be replayed).
Write failures are injected inside ``atomic.atomic_write_bytes``, which every result file
goes through, by swapping the ``os``/``tempfile`` modules it sees for proxies.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import privenc
from conftest import TINY
from privenc import atomic, deploy
from privenc import checkpoint as ckpt
from privenc.cli import main
from privenc.config import load_config
from privenc.errors import TrainingError, VerificationError
from privenc.grid import cell_dir, run_grid
from privenc.models import Encoder
from privenc.report import build_report
from privenc.runs import load_encoder, save_encoder
from privenc.training import train
from privenc.verification import verify

SRC = Path(privenc.__file__).resolve().parents[1]
FAULT_SEED = int(os.environ.get("PRIVENC_FAULT_SEED", "0"))


# --------------------------------------------------------------------------- helpers


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(autouse=True)
def one_thread():
    """Both sides of a bitwise comparison use one thread (the subprocesses get OMP_NUM_THREADS=1):
    a reduction split over another number of threads may round differently. (One thread is
    also the fastest for these tiny models on a shared CI machine.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _start(args: list[str], log: Path, patch: str = "") -> subprocess.Popen:
    """``privenc -q ARGS`` in a new process (one thread); ``patch`` is Python run first in it,
    to slow a phase down so that a kill lands inside the work rather than after it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    code = f"import sys, time\n{patch}\nfrom privenc.cli import main\nsys.exit(main(sys.argv[1:]))"
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, "-c", code, "-q", *args], env=env, stdout=handle,
                                stderr=subprocess.STDOUT)


def _kill_after(proc: subprocess.Popen, ready, window: float, seed: int, log: Path) -> dict:
    """SIGKILL ``proc`` a seeded random delay in [0, window) s after ``ready()`` first holds."""
    deadline = time.time() + 120
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before it was ready:\n{log.read_text()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"not ready after 120 s:\n{log.read_text()}")
        time.sleep(0.01)
    delay = random.Random(seed).uniform(0, window)
    time.sleep(delay)
    running = proc.poll() is None
    proc.kill()
    proc.wait()
    return {"delay_s": round(delay, 3), "killed_mid_run": running, "seed": seed}


def _assert_same(a, b, where: str = "") -> None:
    """Recursive equality; tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


def _records(records: list[dict]) -> list[dict]:
    """Verification records without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


class _Proxy:
    """A module whose attributes are the real module's, except the ones given."""

    def __init__(self, real, **overrides) -> None:
        self._real = real
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._real, name)


class _HalfWritten:
    """A file handle that writes half of what it is given, then fails like a full disk."""

    def __init__(self, handle, error: BaseException) -> None:
        self.handle, self.error = handle, error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data: bytes) -> int:
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise self.error

    def __getattr__(self, name):
        return getattr(self.handle, name)


@pytest.fixture
def faults(monkeypatch):
    """``faults.fail(name, stage, error)``: writing the file ``name`` through
    ``atomic_write_bytes`` fails at ``stage`` -- "write" (half the bytes reach the temporary
    file, then ``error``) or "rename" (the complete temporary file is never renamed into place)."""

    class Faults:
        rules: dict[str, tuple[str, BaseException]] = {}
        names: dict[int, str] = {}
        hits: list[str] = []

        def fail(self, name: str, stage: str, error: BaseException | None = None) -> None:
            self.rules[name] = (stage, error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    state = Faults()
    state.rules, state.names, state.hits = {}, {}, []

    def mkstemp(dir=None, prefix=None, suffix=None):
        fd, path = __import__("tempfile").mkstemp(dir=dir, prefix=prefix, suffix=suffix)
        state.names[fd] = (prefix or "")[1:-1]  # ".last.pt." -> "last.pt"
        return fd, path

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = os.fdopen(fd, mode, *args, **kwargs)
        rule = state.rules.get(state.names.get(fd, ""))
        if rule and rule[0] == "write":
            state.hits.append(state.names[fd])
            return _HalfWritten(handle, rule[1])
        return handle

    def replace_(src, dst):
        rule = state.rules.get(Path(dst).name)
        if rule and rule[0] == "rename":
            state.hits.append(Path(dst).name)
            raise rule[1]
        return os.replace(src, dst)

    monkeypatch.setattr(atomic, "tempfile", _Proxy(__import__("tempfile"), mkstemp=mkstemp))
    monkeypatch.setattr(atomic, "os", _Proxy(os, fdopen=fdopen, replace=replace_))
    return state


def _tiny_encoder_run(run: Path, seed: int = 0) -> Path:
    """A run folder holding a tiny encoder.pt and its config.toml (what encode needs)."""
    config = load_config("demo", TINY)
    torch.manual_seed(seed)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(config.to_toml())
    save_encoder(run / "encoder.pt", config, Encoder(config.encoder, config.data.image_size), step=1)
    return run


def _images(root: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / f"{i // 10}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 22, 3), dtype=np.uint8)).save(path)
    (root / "9" / "broken.png").parent.mkdir(exist_ok=True)
    (root / "9" / "broken.png").write_bytes(b"not an image")
    return root


# --------------------------------------------------------------------------- killed mid-run


@pytest.mark.slow
def test_training_killed_at_a_random_moment_resumes_to_the_same_weights(tmp_path):
    overrides = [*TINY, "train.iters=24", "train.checkpoint_every=1", "train.device=cpu"]
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = _start(["train", *_sets(overrides), "--out", str(killed), "--no-progress"], log)
    train(load_config("demo", overrides), tmp_path / "straight", progress=False)  # while it starts
    kill = _kill_after(proc, (killed / "checkpoints" / "last.pt").exists, 1.0, FAULT_SEED, log)

    # the killed run restarts from its last checkpoint; a finished one says so and changes nothing
    assert main(["-q", "train", "--resume", str(killed), "--no-progress"]) == 0, kill
    for name in ("checkpoints/last.pt", "encoder.pt"):
        _assert_same(ckpt.load(tmp_path / "straight" / name), ckpt.load(killed / name), f"{name} {kill}")
    assert _metrics(killed) == _metrics(tmp_path / "straight"), kill
    assert not _tmp_files(killed), kill


def test_resuming_a_finished_run_changes_nothing_and_a_missing_encoder_is_written(finished_run, tmp_path, caplog):
    run = _copy(finished_run, tmp_path / "run")
    files = {p: p.read_bytes() for p in (run / "checkpoints" / "last.pt", run / "encoder.pt", run / "metrics.jsonl")}
    caplog.set_level("INFO", logger="privenc")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "already complete (step 9 of 9)" in caplog.text
    assert {p: p.read_bytes() for p in files} == files

    (run / "encoder.pt").unlink()  # killed after its last checkpoint, before the encoder file
    assert main(["-q", "train", "--resume", str(run), "--no-progress"]) == 0
    _assert_same(ckpt.load(finished_run / "encoder.pt"), ckpt.load(run / "encoder.pt"), "encoder.pt")


def test_traces_of_a_kill_are_ignored_on_resume(finished_run, tmp_path):
    """What a SIGKILL can leave: a half-written temporary checkpoint and a metrics line cut off."""
    config = load_config(str(finished_run / "config.toml"))
    stopped = tmp_path / "stopped"
    train(replace(config, train=replace(config.train, iters=1)), stopped, progress=False)  # 4 steps
    (stopped / "config.toml").write_text(config.to_toml())
    partial = (finished_run / "checkpoints" / "last.pt").read_bytes()
    (stopped / "checkpoints" / ".last.pt.k1ll3d.tmp").write_bytes(partial[: len(partial) // 3])
    with (stopped / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 6, "phase": "adv')  # the kill came during this append
    train(config, stopped, resume=True, progress=False)
    _assert_same(ckpt.load(finished_run / "checkpoints" / "last.pt"), ckpt.load(stopped / "checkpoints" / "last.pt"),
                 "last.pt")
    steps = [r["step"] for r in _metrics(stopped)]
    assert steps == sorted(set(steps)) and steps[-1] == 9
    assert not _tmp_files(stopped)


@pytest.mark.slow
def test_encode_killed_at_a_random_moment_resumes_to_the_same_shards(tmp_path):
    run, images = _tiny_encoder_run(tmp_path / "run"), _images(tmp_path / "images", 44)
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    # Slowed between each shard's .npy and its manifest part, the window where a kill hurts most.
    patch = ("import privenc.atomic as c\nw = c.atomic_write_text\n"
             "c.atomic_write_text = lambda *a: (time.sleep(0.08), w(*a))[1]")
    args = ["--encoder", str(run), "--input", str(images), "--shard-size", "4", "--batch-size", "3",
            "--device", "cpu", "--no-progress"]
    proc = _start(["encode", *args, "--output", str(killed)], log, patch)
    straight = deploy.encode(run, images, tmp_path / "straight", shard_size=4, batch_size=3, device="cpu",
                             progress=False)
    kill = _kill_after(proc, (killed / "shard-00000.jsonl").exists, 0.8, FAULT_SEED + 1, log)
    done = {p: p.stat().st_mtime_ns for p in killed.glob("shard-*")
            if p.with_suffix(".jsonl").exists() and p.with_suffix(".npy").exists()}

    summary = deploy.encode(run, images, killed, shard_size=4, batch_size=3, device="cpu", progress=False)
    assert summary["shards"] == straight["shards"] == 12 and summary["errors"] == 1, kill
    assert summary["shards_reused"] == len(done) // 2, kill
    assert {p: p.stat().st_mtime_ns for p in done} == done, f"a finished shard was encoded again {kill}"
    for k in range(12):
        name = f"shard-{k:05d}"
        assert np.array_equal(np.load(killed / f"{name}.npy"), np.load(tmp_path / "straight" / f"{name}.npy")), kill
        assert (killed / f"{name}.jsonl").read_text() == (tmp_path / "straight" / f"{name}.jsonl").read_text()
    assert (killed / "manifest.jsonl").read_text() == (tmp_path / "straight" / "manifest.jsonl").read_text()


@pytest.mark.slow
def test_grid_killed_at_a_random_moment_loses_no_cell_and_runs_none_twice(tmp_path):
    encoders, tasks = ["identity", "blur"], ["g1c0", "g1c1"]
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    patch = ("import privenc.verification as v\nf = v.fit_classifier\n"
             "v.fit_classifier = lambda *a, **k: (time.sleep(0.25), f(*a, **k))[1]")
    args = ["--encoders", *encoders, "--tasks", *tasks, "--device", "cpu", *_sets(TINY)]
    proc = _start(["grid", *args, "--out", str(killed)], log, patch)
    config = load_config("demo", TINY)
    straight = run_grid(encoders, tasks, config, tmp_path / "straight", device="cpu")
    kill = _kill_after(proc, lambda: any(killed.glob("cells/*/verify.json")), 0.8, FAULT_SEED + 2, log)
    done = {p: (p.stat().st_mtime_ns, p.read_text()) for p in killed.glob("cells/*/verify.json")}

    records = run_grid(encoders, tasks, config, killed, device="cpu")
    cells = {(e, t): cell_dir(killed, e, t) for e in encoders for t in tasks}
    assert sorted(p.name for p in (killed / "cells").iterdir()) == sorted(c.name for c in cells.values()), kill
    for (encoder, task), folder in cells.items():
        cell = json.loads((folder / "verify.json").read_text())
        assert [(r["encoder"], r["task"]) for r in cell] == [(encoder, task)], kill
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in done} == done, f"a finished cell ran again {kill}"
    assert _records(records) == _records(straight), kill


def test_grid_recomputes_a_cell_whose_result_is_not_complete(tmp_path, monkeypatch):
    import privenc.grid as grid_module

    config = load_config("demo", TINY)
    grid = tmp_path / "grid"
    record = [{"encoder": "identity", "task": "g1c0"}]
    for task, text in (("g1c0", json.dumps(record)), ("g1c1", json.dumps(record)[:20]), ("g1c2", "[]")):
        cell_dir(grid, "identity", task).mkdir(parents=True)
        (cell_dir(grid, "identity", task) / "verify.json").write_text(text)
    (cell_dir(grid, "identity", "g2c0")).mkdir()
    (cell_dir(grid, "identity", "g2c0") / ".verify.json.x.tmp").write_text("[{")  # a kill's leftover
    ran = []
    monkeypatch.setattr(grid_module, "_run_cell", lambda spec, task, *a: ran.append(task))
    records = run_grid(["identity"], ["g1c0", "g1c1", "g1c2", "g2c0"], config, grid)
    assert ran == ["g1c1", "g1c2", "g2c0"]
    assert records == record  # the cut-short file is never read as a result


def test_grid_refuses_to_mix_cells_of_another_config(tmp_path, monkeypatch, capsys):
    import privenc.grid as grid_module

    monkeypatch.setattr(grid_module, "_run_cell", lambda *a: None)
    grid = tmp_path / "grid"
    run_grid(["identity"], ["g1c0"], load_config("demo", TINY), grid)
    argv = ["-q", "grid", "--encoders", "identity", "blur", "--tasks", "g1c0", "--out", str(grid)]
    assert main([*argv, *_sets([*TINY, "verify.max_iters=50"])]) == 2
    assert "verify.max_iters: 12 -> 50" in capsys.readouterr().err
    assert main([*argv, *_sets(TINY)]) == 0  # the same config may add encoders and tasks


# --------------------------------------------------------------------------- crash while saving


@pytest.mark.parametrize("stage", ["write", "rename"])
def test_crash_while_saving_a_checkpoint_leaves_the_previous_one(finished_run, tmp_path, faults, stage):
    run = _copy(finished_run, tmp_path / "run")
    before = (run / "checkpoints" / "last.pt").read_bytes()
    config = load_config(str(run / "config.toml"))
    longer = replace(config, train=replace(config.train, iters=20))
    faults.fail("last.pt", stage, RuntimeError("power cut"))
    with pytest.raises(RuntimeError, match="power cut"):
        train(longer, run, resume=True, progress=False)
    assert faults.hits == ["last.pt"]
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert ckpt.load(run / "checkpoints" / "last.pt")["step"] == 9
    assert not _tmp_files(run)


@pytest.mark.parametrize("stage", ["write", "rename"])
def test_crash_while_saving_the_encoder_report_or_config_leaves_the_previous_file(finished_run, tmp_path, faults,
                                                                                 stage, capsys):
    run = _copy(finished_run, tmp_path / "run")
    build_report([run], tmp_path / "report", figures=False)
    saved = {p: p.read_bytes() for p in (run / "encoder.pt", run / "config.toml", tmp_path / "report" / "report.json")}
    config = load_config(str(run / "config.toml"))
    for name in ("encoder.pt", "config.toml", "report.json"):
        faults.fail(name, stage)
    with pytest.raises(OSError, match="encoder.pt"):
        save_encoder(run / "encoder.pt", config, Encoder(config.encoder, config.data.image_size), step=99)
    assert main(["-q", "train", "--resume", str(run), "--set", "train.iters=7", "--allow-config-change"]) == 2
    assert f"cannot write {run / 'config.toml'}" in capsys.readouterr().err
    with pytest.raises(OSError, match="report.json"):
        build_report([run], tmp_path / "report", figures=False)
    assert {p: p.read_bytes() for p in saved} == saved
    load_encoder(run)
    json.loads((tmp_path / "report" / "report.json").read_text())
    assert not _tmp_files(tmp_path)


def test_crash_while_writing_a_shard_keeps_the_finished_ones(tmp_path, faults):
    run, images = _tiny_encoder_run(tmp_path / "run"), _images(tmp_path / "images", 10)
    out = tmp_path / "out"
    faults.fail("shard-00001.npy", "write")
    with pytest.raises(OSError, match=r"cannot write .*shard-00001\.npy: No space left on device"):
        deploy.encode(run, images, out, shard_size=4, device="cpu", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["encode.json", "shard-00000.jsonl", "shard-00000.npy"]
    first = (out / "shard-00000.npy").stat().st_mtime_ns
    assert np.load(out / "shard-00000.npy").shape == (4, 3, 8, 8)
    faults.rules.clear()
    summary = deploy.encode(run, images, out, shard_size=4, device="cpu", progress=False)
    assert summary["shards_reused"] == 1 and summary["images"] == 11
    assert (out / "shard-00000.npy").stat().st_mtime_ns == first


# --------------------------------------------------------------------------- full disk, unwritable folder


def test_disk_full_during_a_checkpoint_is_one_clear_line_and_keeps_the_last_one(finished_run, tmp_path, faults,
                                                                              capsys):
    run = _copy(finished_run, tmp_path / "run")
    before = (run / "checkpoints" / "last.pt").read_bytes()
    faults.fail("last.pt", "write")
    argv = ["-q", "train", "--resume", str(run), "--set", "train.iters=20", "--allow-config-change", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"privenc: error: [Errno 28] cannot write {run / 'checkpoints' / 'last.pt'}: "
                       f"No space left on device; the previous last.pt, if any, is unchanged")
    assert not any("Traceback" in line for line in err)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before and not _tmp_files(run)


def test_disk_full_for_the_image_cache_is_refused_before_writing(tmp_path, monkeypatch):
    import privenc.data.cache as cache

    monkeypatch.setattr(cache, "shutil", _Proxy(shutil, disk_usage=lambda path: SimpleNamespace(free=1000)))
    config = load_config("demo", [*TINY, f"data.cache_dir={tmp_path / 'cache'}"])
    from privenc.data import prepare

    with pytest.raises(OSError, match=r"image cache .*needs 0\.3 MiB but .* has 0\.0 MiB free") as info:
        prepare(config.data, ["g1c0"])
    assert info.value.errno == errno.ENOSPC
    left = list((tmp_path / "cache").iterdir())
    assert [(p.suffix, p.stat().st_size) for p in left] == [(".lock", 0)]  # the build lock alone, empty


def _unwritable_argv(command: str, out: str, run: Path, images: Path) -> list[str]:
    return {
        "train": ["train", *_sets(TINY), "--out", out, "--no-progress"],
        "verify": ["verify", "identity", *_sets(TINY), "--task", "g1c0", "--out", out, "--no-progress"],
        "grid": ["grid", "--encoders", "identity", "--tasks", "g1c0", *_sets(TINY), "--out", out],
        "encode": ["encode", "--encoder", str(run), "--input", str(images), "--output", out, "--no-progress"],
        "report": ["report", str(run), "--out", out],
    }[command]


@pytest.mark.parametrize("command", ["train", "verify", "grid", "encode", "report"])
def test_an_unwritable_output_folder_is_refused_before_any_work(command, finished_run, tmp_path, monkeypatch, capsys):
    import privenc.data.dataset as dataset

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")

    for module in ("privenc.training", "privenc.attackers", "privenc.data"):
        monkeypatch.setattr(f"{module}.prepare", no_work)
    monkeypatch.setattr(dataset, "prepare", no_work)
    monkeypatch.setattr("privenc.deploy.shards._encode_shard", no_work)
    monkeypatch.setattr("privenc.report.read_folders", no_work)
    images = _images(tmp_path / "images", 2)
    (tmp_path / "a_file").write_text("not a folder")
    out = str(tmp_path / "a_file" / "out")  # root ignores permissions, not a file in the way
    assert main(["-q", *_unwritable_argv(command, out, finished_run, images)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("privenc: error: ") and "Not a directory" in err and out in err, err
    assert "\n" not in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, a folder nobody can write to")
def test_a_read_only_output_folder_is_refused_before_verification(capsys):
    assert main(["-q", "verify", "identity", *_sets(TINY), "--task", "g1c0", "--out", "/proc", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("privenc: error: ") and "the output folder /proc is not writable" in err, err


# --------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_encoder_stops_training_with_the_step_and_last_checkpoint(finished_run, tmp_path, monkeypatch,
                                                                               value):
    import privenc.training as train_module

    run = _copy(finished_run, tmp_path / "run")
    before = (run / "checkpoints" / "last.pt").read_bytes()
    config = load_config(str(run / "config.toml"))
    real, calls = train_module.encoder_step, []

    def poisoning(players, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 11 of the resumed run; its last checkpoint is at step 9
            with torch.no_grad():
                first = next(players.encoder.parameters())
                first[(0,) * first.dim()] = value
        return real(players, *args, **kwargs)

    monkeypatch.setattr(train_module, "encoder_step", poisoning)
    with pytest.raises(TrainingError) as info:
        train(replace(config, train=replace(config.train, iters=20)), run, resume=True, progress=False)
    message = str(info.value)
    assert re.match(r"non-finite .*encoder_loss at step 11; training stopped\. Non-finite weights in: encoder",
                    message), message
    assert f"last good checkpoint is {run / 'checkpoints' / 'last.pt'} (step 9)" in message
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert all(torch.isfinite(v).all() for v in ckpt.load(run / "checkpoints" / "last.pt")["encoder"].values())


def test_an_encoder_with_non_finite_weights_is_refused_by_verify_and_encode(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    payload = ckpt.load(run / "encoder.pt")
    next(iter(payload["state_dict"].values())).view(-1)[0] = float("nan")
    ckpt.save(run / "encoder.pt", {k: v for k, v in payload.items() if k != "format_version"})
    assert main(["-q", "verify", str(run), "--out", str(tmp_path / "v"), "--no-progress"]) == 2
    assert "non-finite values (NaN or Inf)" in capsys.readouterr().err
    images = _images(tmp_path / "images", 2)
    assert main(["-q", "encode", "--encoder", str(run), "--input", str(images), "--output", str(tmp_path / "e")]) == 2
    assert str(run / "encoder.pt") in capsys.readouterr().err
    assert not (tmp_path / "v" / "verify.json").exists() and not list((tmp_path / "e").glob("shard-*"))


def test_verification_refuses_non_finite_encodings_or_attacker_losses(tmp_path, monkeypatch):
    import privenc.encoders as encoders_module
    import privenc.verification as verify_module

    config = load_config("demo", TINY)
    real_build = encoders_module.build_encoder

    class NaNForSome(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x).clone()
            out[::3] = float("nan")
            return out

    monkeypatch.setattr(encoders_module, "build_encoder", lambda *a: NaNForSome(real_build(*a)))
    with pytest.raises(VerificationError, match=r"non-finite values \(NaN or Inf\) for \d+ of \d+ train encodings"):
        verify("blur", config, ["g1c0"], tmp_path / "v", progress=False)
    monkeypatch.setattr(encoders_module, "build_encoder", real_build)

    class NaNOut(torch.nn.Module):
        def forward(self, x):
            return x * float("nan")

    real_attacker = verify_module.build_attacker
    monkeypatch.setattr(verify_module, "build_attacker", lambda *a: torch.nn.Sequential(real_attacker(*a), NaNOut()))
    with pytest.raises(VerificationError, match="blur/g1c0/paper/0: non-finite attacker loss by iteration 2"):
        verify("blur", config, ["g1c0"], tmp_path / "v", progress=False)
    assert not (tmp_path / "v" / "verify.json").exists()


# --------------------------------------------------------------------------- determinism


def test_same_seed_and_config_give_bitwise_identical_training(finished_run, tmp_path):
    train(load_config("demo", TINY), tmp_path / "again", progress=False)
    for name in ("checkpoints/last.pt", "encoder.pt"):
        _assert_same(ckpt.load(finished_run / name), ckpt.load(tmp_path / "again" / name), name)
    assert _metrics(finished_run) == _metrics(tmp_path / "again")
    for name in ("splits/train.txt", "splits/val.txt", "splits/test.txt", "tasks.json"):
        assert (finished_run / name).read_text() == (tmp_path / "again" / name).read_text()


def test_same_encoder_verified_twice_gives_identical_records(finished_run, tmp_path):
    config = load_config("demo", TINY)
    first = verify(str(finished_run), config, ["g1c0"], tmp_path / "a", progress=False)
    second = verify(str(finished_run), config, ["g1c0"], tmp_path / "b", progress=False)
    assert _records(first) == _records(second) and first[0]["curve"]


def test_resuming_with_loader_workers_warns_that_it_is_not_bitwise_exact(finished_run, tmp_path, caplog):
    run = _copy(finished_run, tmp_path / "run")
    config = load_config(str(run / "config.toml"))
    config = replace(config, data=replace(config.data, num_workers=1), train=replace(config.train, iters=7))
    train(config, run, resume=True, progress=False)
    assert "data.num_workers = 1: the resumed run is not bitwise identical" in caplog.text
