"""Worker pools that do not outlive their command (privenc/pools.py): killed or terminated, a
command takes its spawned workers with it instead of leaving them on the cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from privenc.cli import _sigterm_as_exit

WORKER_SCRIPT = """
import os, sys, time
from privenc.pools import spawn_pool

def task(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(300)

if __name__ == "__main__":
    with spawn_pool(2) as pool:
        for i in range(2):
            pool.submit(task, os.path.join(sys.argv[1], f"worker{i}"))
        time.sleep(300)
"""


def _alive(pid: int) -> bool:
    # A worker that exited but that no one has reaped yet (an orphan waits for init) is a zombie.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} after {timeout:.0f} s"
        time.sleep(0.2)


def _workers(parent: int) -> list[int]:
    """The parent's spawned pool workers (not its resource tracker)."""
    found = []
    for task in Path(f"/proc/{parent}/task").glob("*"):
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                found.append(int(child))
    return found


def _kill(parent: subprocess.Popen, workers: list[int]) -> None:
    # A failing test must not leave its workers behind: without the watch, an orphan blocks on
    # its task queue forever.
    parent.kill()
    for pid in workers:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads processes from /proc (Linux)")


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    # SIGKILL: the parent runs no code of its own, so only the workers' own watch can end them.
    script = tmp_path / "pool_script.py"
    script.write_text(WORKER_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    pids: list[int] = []
    try:
        files = [tmp_path / "worker0", tmp_path / "worker1"]
        _wait_for(lambda: all(f.is_file() and f.read_text() for f in files), 120, "the workers did not start")
        pids = [int(f.read_text()) for f in files]
        assert all(map(_alive, pids))
        parent.kill()
        parent.wait()
        _wait_for(lambda: not any(map(_alive, pids)), 15, "workers outlived their killed parent")
    finally:
        _kill(parent, pids)


@pytest.mark.slow
def test_sigterm_stops_a_grid_with_its_workers_and_says_so(tmp_path):
    # Cells far longer than the test (patience and iterations out of reach), two in parallel.
    sets = [*TINY, "verify.max_iters=100000", "verify.patience=100000", "verify.eval_every=1000"]
    command = [sys.executable, "-m", "privenc", "grid", "--encoders", "identity", "blur", "--tasks", "g1c0",
               "--jobs", "2", "--device", "cpu", "--out", str(tmp_path / "grid")]
    for item in sets:
        command += ["--set", item]
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers: list[int] = []
    try:
        _wait_for(lambda: len(_workers(parent.pid)) == 2 or parent.poll() is not None, 120,
                  "the grid's two workers did not start")
        assert parent.poll() is None, parent.communicate()
        workers = _workers(parent.pid)
        time.sleep(3)  # into their cells, past the imports
        parent.send_signal(signal.SIGTERM)
        _, stderr = parent.communicate(timeout=30)
        assert parent.returncode == 128 + signal.SIGTERM, stderr[-2000:]
        assert "privenc: terminated" in stderr
        _wait_for(lambda: not any(map(_alive, workers)), 10, "the grid's workers outlived it")
        assert not list((tmp_path / "grid").glob("cells/*/verify.json"))  # no cell claims to be done
    finally:
        _kill(parent, workers)


def test_sigterm_is_handled_for_the_command_and_restored_but_left_alone_under_torchrun(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with _sigterm_as_exit():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    # A rank blocked in a collective runs no Python handler: torchrun's SIGTERM must end it as usual.
    monkeypatch.setenv("LOCAL_RANK", "0")
    with _sigterm_as_exit():
        assert signal.getsignal(signal.SIGTERM) is before
