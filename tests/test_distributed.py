"""Scale-out under torchrun with CPU processes (gloo): data-parallel training, resume under
DDP, two "nodes" on this machine meeting through a rendezvous, a grid whose cells are
spread over ranks, and a sweep (each run over all ranks, then its grid spread over them).
(Per-location statistics across ranks are checked against one process in test_models.py.)"""

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY
from privenc import checkpoint as ckpt
from privenc.cli import main
from privenc.grid import cell_dir


def _torchrun(*args: str, timeout: int = 240, quiet: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "privenc", *(["-q"] if quiet else []), *args]
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


def _untimed(value):
    """sweep.json without its measured seconds (train_s, verify_s), which no two runs share."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in ("train_s", "verify_s")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


SWEEP = ["sweep", "--config", "demo", "--vary", "train.encoder_loss=label_flip,standard_gan", "--seeds", "0",
         *_sets(["verify.max_iters=6"]), "--no-audit", "--no-progress", "--device", "cpu"]


@pytest.mark.slow
def test_a_sweep_under_torchrun_trains_each_run_over_all_ranks_and_resumes(tmp_path):
    """About 60 s on the loaded 2-core machine: the sweep in one process, the same under
    torchrun (2 runs x 8 cells), then an interrupted torchrun sweep resumed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1)
    try:
        assert main([*SWEEP, "--jobs", "1", "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one = json.loads((tmp_path / "one" / "sweep.json").read_text())
    out = tmp_path / "two"
    printed = _torchrun(*SWEEP, "--out", str(out)).stdout
    two = json.loads((out / "sweep.json").read_text())
    assert printed.count("# privenc sweep") == 1 and printed.count("figure: ") == 1  # rank 0 alone reports

    # The same sweep: configurations, seeds, runs and cells. The references' numbers too: they do
    # not depend on the trainings, and are those of one process only if no rank's cells mixed
    # batch statistics with another's. The runs' own numbers may differ: with 2 ranks each draws
    # its own augmentations, as `torchrun ... privenc train` does.
    assert two["command"] == one["command"].replace(str(tmp_path / "one"), str(out))
    for key in ("seeds", "vary", "tasks", "references", "definitions", "config"):
        assert _untimed(two[key]) == _untimed(one[key]), key

    def shape(result):
        return [(c["name"], c["values"], c["method"], [(s["seed"], s["run"]) for s in c["seeds"]])
                for c in result["configurations"]]

    assert shape(two) == shape(one) and len(two["configurations"]) == 2
    cells = sorted(p.relative_to(out) for p in out.glob("grid/cells/*/verify.json"))
    assert len(cells) == 8 and cells == sorted(p.relative_to(tmp_path / "one")
                                               for p in (tmp_path / "one").glob("grid/cells/*/verify.json"))
    for c in two["configurations"]:  # trained by both ranks together, written by rank 0 once
        run = out / c["seeds"][0]["run"]
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [3, 6, 9]
        assert len(ckpt.load(run / "checkpoints" / "last.pt")["rng_ranks"]) == 2

    # Interrupted: one run's encoder not written yet, one cell missing. That cell is rank 0's
    # share (cell i runs on rank i mod 2), so rank 1 has nothing to do and must wait, not hang.
    resumed = out / two["configurations"][1]["seeds"][0]["run"]
    (resumed / "encoder.pt").unlink()
    missing = cell_dir(out / "grid", "identity", "g1c0")
    (missing / "verify.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("grid/cells/*/verify.json")}
    log = _torchrun(*SWEEP, "--out", str(out), quiet=False).stderr
    assert "1 already trained, 1 to train" in log and f"resumed {resumed} at step 9" in log
    assert "1 to run on rank 0/2" in log and "0 to run on rank 1/2" in log
    assert {p: p.stat().st_mtime_ns for p in out.glob("grid/cells/*/verify.json") if p in stamps} == stamps
    assert (resumed / "encoder.pt").is_file() and (missing / "verify.json").is_file()
    # The same encoder, the same numbers (the re-run cell's attacker time is measured afresh).
    assert _untimed(json.loads((out / "sweep.json").read_text())) == _untimed(two)


def _late_rank(rank: int, port: int) -> None:
    # A default group that gives up after 2 s, and a rank 0 that reaches the wait 5 s late.
    from privenc import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=2))
    try:
        if rank == 0:
            time.sleep(5)
        distributed.wait_for_all(distributed.World(rank, 2, rank))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_wait_for_each_other_longer_than_the_default_group_allows():
    # What a sweep's ranks do after their shares of the grid, which may end hours apart.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_late_rank, args=(port,), nprocs=2, join=True)


def test_a_sweep_refuses_a_batch_the_ranks_cannot_share_before_any_training(tmp_path, monkeypatch):
    from privenc import training
    from privenc.errors import ConfigError
    from privenc.sweep import run_sweep

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setenv("WORLD_SIZE", "3")  # torchrun's 3 ranks; TINY's batch is 8
    with pytest.raises(ConfigError, match="train.batch_size 8 is the global batch, shared by the 3 torchrun ranks"):
        run_sweep("demo", TINY, ["train.alpha=0.5,1"], [0], tmp_path / "s", progress=False)


def test_sweep_ranks_train_what_rank_0_found_left(tmp_path, monkeypatch, tiny_config):
    # Rank 1 sees a finished run (a stale view of a shared folder, say): it follows rank 0's
    # list, or it would skip a training the other rank waits in.
    from privenc import distributed, sweep, training

    planned = sweep.expand("demo", TINY, sweep.parse_vary(["train.alpha=0.5,1"]), [0], tmp_path)
    for run in planned:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "encoder.pt").write_bytes(b"")
    monkeypatch.setattr(distributed, "from_main", lambda world, obj: [(1, True)])  # what rank 0 sent
    calls = []
    monkeypatch.setattr(training, "train", lambda config, run_dir, resume, progress: calls.append((run_dir, resume)))
    assert sweep.train_runs(planned, progress=False, world=distributed.World(1, 2, 1)) == 1
    assert calls == [(planned[1].run_dir, True)]


def test_a_sweep_joins_the_process_group_for_the_device_it_was_given(tmp_path, monkeypatch):
    # --device cpu on a machine with CUDA: gloo, not NCCL, which cannot carry CPU tensors.
    from privenc import distributed
    from privenc.sweep import run_sweep

    asked = []

    def setup(device):
        asked.append(device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(distributed, "setup", setup)
    for device in ("cpu", "auto"):
        with pytest.raises(RuntimeError, match="stop here"):
            run_sweep("demo", [*TINY, "train.device=cuda"], ["train.alpha=0.5,1"], [0], tmp_path / "s",
                      device=device, progress=False)
    assert asked == ["cpu", "cuda"]  # --device wins; auto leaves the config's train.device


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
