"""Scale-out under torchrun with CPU processes (gloo): data-parallel training, resume under
DDP, two "nodes" on this machine meeting through a rendezvous, and a grid whose cells are
spread over ranks. (Per-location statistics across ranks are checked against one process in
test_models.py.)"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import TINY
from privenc import checkpoint as ckpt
from privenc.grid import cell_dir


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "privenc", "-q", *args]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _sets(extra=()):
    return [x for s in [*TINY, *extra] for x in ("--set", s.replace(" ", ""))]


@pytest.mark.slow
def test_data_parallel_training_and_resume(tmp_path):
    run = tmp_path / "run"
    out = _torchrun("train", *_sets(), "--out", str(run), "--no-progress")
    assert out.stdout.count("encoder: ") == 1  # only rank 0 speaks and writes
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9]
    state = ckpt.load(run / "checkpoints" / "last.pt")
    assert state["step"] == 9 and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])

    _torchrun("train", "--resume", str(run), "--set", "train.iters=9", "--allow-config-change", "--no-progress")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]
    assert ckpt.load(run / "checkpoints" / "last.pt")["step"] == 12


@pytest.mark.slow
def test_two_nodes_meet_through_a_rendezvous_and_each_builds_its_own_cache(tmp_path):
    # What `torchrun --nnodes 2 --rdzv_backend c10d ...` does on two machines, on one: two node
    # agents of 2 ranks each, a shared run folder, a node-local image cache per node.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    nodes = []
    for node in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PRIVENC_CACHE": str(tmp_path / f"cache{node}")}
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "test",
                   "-m", "privenc", "train", *_sets(), "--out", str(run), "--no-progress"]
        nodes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [node.communicate(timeout=240) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outs):
        assert node.returncode == 0, stdout[-3000:] + stderr[-3000:]
    # Each node's cache was built once: by one of its two ranks, the other waited for it or found
    # it finished. (Whether the ranks overlapped is up to the scheduler, so the lock itself is
    # tested in test_data_pipeline.py, where the overlap is forced.)
    assert [stderr.count("built image cache") for _, stderr in outs] == [1, 1]
    assert all(len(list((tmp_path / f"cache{node}").glob("*.npy"))) == 1 for node in range(2))
    assert sum(stdout.count("encoder: ") for stdout, _ in outs) == 1  # rank 0 alone writes
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9]
    assert len(ckpt.load(run / "checkpoints" / "last.pt")["rng_ranks"]) == 4


@pytest.mark.slow
def test_grid_cells_are_spread_over_ranks_and_run_once(tmp_path):
    grid = tmp_path / "grid"
    tasks = ["g1c0", "g1c1", "g1c2"]
    out = _torchrun("grid", "--encoders", "identity", "blur", "--tasks", *tasks, "--out", str(grid), *_sets(),
                    "--device", "cpu")
    cells = [cell_dir(grid, e, t) / "verify.json" for e in ("identity", "blur") for t in tasks]
    assert all(c.exists() for c in cells)
    assert all(len(json.loads(c.read_text())) == 1 for c in cells)
    mtimes = [c.stat().st_mtime_ns for c in cells]
    _torchrun("grid", "--encoders", "identity", "blur", "--tasks", *tasks, "--out", str(grid), *_sets(),
              "--device", "cpu")
    assert [c.stat().st_mtime_ns for c in cells] == mtimes  # a rerun skips finished cells
    assert out.returncode == 0


def test_grid_ranks_of_a_node_each_take_their_own_gpu(tmp_path, monkeypatch, tiny_config):
    # What torchrun sets for the second rank of a node; no GPU here, so CUDA is faked and the
    # cell itself is not run: only the device it would be given is recorded.
    from privenc import grid

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    given = []
    monkeypatch.setattr(grid, "_run_cell", lambda spec, task, config, out, device, threads: given.append(device))
    grid.run_grid(["identity"], ["g1c0"], tiny_config, tmp_path / "grid", device="auto")
    assert given == ["cuda:1"]


def test_teardown_leaves_only_a_process_group_that_setup_joined(monkeypatch):
    # torch.distributed faked: what matters is which calls setup and teardown make.
    from privenc import distributed

    group = {"open": False, "destroyed": 0}

    def destroy():
        group.update(open=False, destroyed=group["destroyed"] + 1)

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: group["open"])
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: group.update(open=True))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", destroy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)

    world = distributed.setup("cpu")
    assert world.joined and (world.rank, world.size) == (1, 2) and group["open"]
    distributed.teardown(world)
    assert group == {"open": False, "destroyed": 1}

    group["open"] = True  # joined by the caller before: the caller leaves it
    world = distributed.setup("cpu")
    assert not world.joined
    distributed.teardown(world)
    assert group == {"open": True, "destroyed": 1}


def test_train_leaves_the_process_group_it_joined_also_when_it_fails(monkeypatch, tiny_config, tmp_path):
    # A rank must not exit with its group open (distributed.teardown); an error is no exception.
    from privenc import distributed
    from privenc import training as train_module

    left = []
    monkeypatch.setattr(distributed, "setup", lambda device: distributed.World(joined=True))
    monkeypatch.setattr(distributed, "teardown", lambda world: left.append(world))

    def broken(*args, **kwargs):
        raise RuntimeError("data preparation failed")

    monkeypatch.setattr(train_module, "prepare", broken)
    with pytest.raises(RuntimeError, match="data preparation failed"):
        train_module.train(tiny_config, tmp_path / "run", progress=False)
    assert left == [distributed.World(joined=True)]
