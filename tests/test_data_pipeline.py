"""From config to tensors: transforms, the image cache, bad-image handling, prepare (pool,
labels, run-folder records, resume), inspect and open_source, on tiny generated images."""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from privenc.config import DataConfig
from privenc.data import (
    DataError,
    FolderSource,
    ImageDataset,
    LazyImages,
    cache,
    inspect,
    open_images,
    open_source,
    prepare,
)
from privenc.data.cache import cache_file
from privenc.data.images import resize_square
from privenc.data.transforms import eval_transform, train_transform

MINI = Path(__file__).resolve().parents[2] / "shared/data/places365-mini"


def make_tree(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """Class folders of small noise images of varied shapes (so resizing is exercised)."""
    rng = np.random.default_rng(seed)
    for category, n in counts.items():
        for j in range(n):
            h, w = 14 + j % 5, 12 + (j * 3) % 9
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            (root / category).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / category / f"{j:03d}.png")
    return root


COUNTS = {"a": 8, "b": 10, "c": 6, "d": 6}


def folder_cfg(tmp_path: Path, **overrides) -> DataConfig:
    root = tmp_path / "tree"
    if not root.exists():
        make_tree(root, COUNTS)
    values = dict(source="folder", root=str(root), load_size=12, image_size=10, cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    return DataConfig(**values)


# --------------------------------------------------------------------------- transforms


def test_eval_transform_is_deterministic_center_crop():
    cfg = DataConfig(load_size=12, image_size=8)
    image = torch.arange(3 * 12 * 12, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(3, 12, 12)
    out = eval_transform(cfg)(image)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    expected = (image[:, 2:10, 2:10].float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(eval_transform(cfg)(image), out)


def test_train_transform_is_random_in_range_and_seedable():
    cfg = DataConfig(load_size=16, image_size=12, scale_range=[0.5, 1.5])  # 0.5: pads up to 12
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    transform = train_transform(cfg)
    torch.manual_seed(0)
    outs = [transform(image) for _ in range(8)]
    for out in outs:
        assert out.shape == (3, 12, 12) and out.dtype == torch.float32
        assert out.min() >= -1 and out.max() <= 1
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    torch.manual_seed(0)
    torch.testing.assert_close(transform(image), outs[0])
    full = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    assert transform(full).max() == 1.0


# --------------------------------------------------------------------------- cache


def test_cache_is_built_once_reused_and_equal_to_uncached(tmp_path, monkeypatch):
    cfg = folder_cfg(tmp_path)
    source = open_source(cfg)
    indices = np.arange(len(source))
    cached, bad = open_images(source, indices, cfg)
    assert bad == []
    path = cache_file(source, indices, cfg.load_size, Path(cfg.cache_dir))
    stat = path.stat()
    lock = f".{path.name}.lock"  # kept: removing a lock file others may wait on would race
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".json").name, lock])

    lazy = LazyImages(source, cfg.load_size)
    for i in indices:
        assert cached[i].shape == (12, 12, 3) and cached[i].dtype == np.uint8
        np.testing.assert_array_equal(cached[i], lazy[i])
        np.testing.assert_array_equal(cached[i], resize_square(source.load(i), 12))

    def no_decoding(self, index):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(FolderSource, "load", no_decoding)
    again, _ = open_images(open_source(cfg), indices, cfg)
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_ino == stat.st_ino
    np.testing.assert_array_equal(again[3], cached[3])


def test_cache_key_follows_load_size_and_files(tmp_path):
    cfg = folder_cfg(tmp_path)
    source = open_source(cfg)
    indices = np.arange(len(source))
    first = cache_file(source, indices, 12, Path(cfg.cache_dir))
    assert cache_file(source, indices, 16, Path(cfg.cache_dir)) != first
    assert cache_file(source, indices[:-1], 12, Path(cfg.cache_dir)) != first
    make_tree(Path(cfg.root), {"a": 1}, seed=9)  # rewrites a/000.png
    assert cache_file(open_source(cfg), indices, 12, Path(cfg.cache_dir)) != first


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    cfg = folder_cfg(tmp_path)
    source = open_source(cfg)
    calls = []

    def fail_late(index):
        calls.append(index)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return np.zeros((12, 12, 3), dtype=np.uint8)

    monkeypatch.setattr(source, "load", fail_late)
    with pytest.raises(KeyboardInterrupt):
        open_images(source, np.arange(len(source)), cfg)
    assert [p.name for p in Path(cfg.cache_dir).iterdir() if not p.name.endswith(".lock")] == []


def test_a_cache_being_built_is_waited_for_not_built_twice(tmp_path, monkeypatch, caplog):
    # The ranks of a node (or parallel grid cells) asking for the same cache at once: one
    # builds, the others wait on its lock and then reuse the finished file.
    pytest.importorskip("fcntl")

    caplog.set_level(logging.INFO, logger="privenc.data.cache")
    cfg = folder_cfg(tmp_path)
    builder, waiter = open_source(cfg), open_source(cfg)
    indices = np.arange(len(builder))
    path = cache_file(builder, indices, cfg.load_size, Path(cfg.cache_dir))

    def no_decoding(index):
        raise AssertionError("the waiting process decoded images: the cache was built twice")

    monkeypatch.setattr(waiter, "load", no_decoding)
    result = {}
    with cache._exclusive(path):
        thread = threading.Thread(target=lambda: result.update(images=open_images(waiter, indices, cfg)[0]))
        thread.start()
        deadline = time.monotonic() + 30
        while "waiting for another process" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "waiting for another process" in caplog.text and thread.is_alive()
        cache._build(path, builder, indices, cfg.load_size, skip_bad=False, num_workers=0)
        built = path.stat().st_ino
    thread.join(timeout=30)
    assert path.stat().st_ino == built  # reused, not rebuilt and renamed over
    np.testing.assert_array_equal(result["images"][5], resize_square(builder.load(5), 12))


def test_a_file_system_without_locks_still_gets_its_cache(tmp_path, monkeypatch, caplog):
    fcntl = pytest.importorskip("fcntl")

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cfg = folder_cfg(tmp_path)
    source = open_source(cfg)
    with caplog.at_level(logging.WARNING, logger="privenc.data.cache"):
        images, _ = open_images(source, np.arange(len(source)), cfg)
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text
    np.testing.assert_array_equal(images[2], resize_square(source.load(2), 12))


@pytest.mark.slow
def test_a_builder_that_dies_hands_the_build_to_a_waiting_process(tmp_path):
    # The kernel drops a dead process's lock; the process that waited finds no cache and builds it.
    pytest.importorskip("fcntl")
    cfg = folder_cfg(tmp_path)
    source = open_source(cfg)
    indices = np.arange(len(source))
    path = cache_file(source, indices, cfg.load_size, Path(cfg.cache_dir))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from privenc.data import cache; "
         "lock = cache._exclusive(Path(sys.argv[1])); lock.__enter__(); print('locked', flush=True); time.sleep(60)",
         str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = {}
        thread = threading.Thread(target=lambda: result.update(images=open_images(source, indices, cfg)[0]))
        thread.start()
        thread.join(timeout=1)
        assert thread.is_alive() and not path.exists()  # waiting on the holder, not building
    finally:
        holder.kill()
        holder.wait()
    thread.join(timeout=30)
    np.testing.assert_array_equal(result["images"][5], resize_square(source.load(5), 12))


def test_cache_built_by_worker_processes(tmp_path):
    cfg = folder_cfg(tmp_path, num_workers=1)
    source = open_source(cfg)
    images, _ = open_images(source, np.arange(len(source)), cfg)
    np.testing.assert_array_equal(images[7], resize_square(source.load(7), 12))


# --------------------------------------------------------------------------- bad images


def spoil(cfg: DataConfig, name: str = "b/003.png") -> str:
    path = Path(cfg.root) / name
    path.write_bytes(path.read_bytes()[:40])  # truncated PNG
    return name


def test_bad_image_is_an_error_by_default(tmp_path):
    cfg = folder_cfg(tmp_path)
    spoil(cfg)
    with pytest.raises(DataError, match=r"b/003\.png: unreadable image"):
        prepare(cfg, ["b"])  # found while building the cache


def test_bad_image_is_an_error_on_access_without_cache(tmp_path):
    cfg = folder_cfg(tmp_path, cache=False)
    bad = spoil(cfg)
    data = prepare(cfg, ["b"])  # no validation pass unless skip_bad_images
    position = data.source.ids.index(bad)
    split = next(s for s, i in data.indices.items() if position in i)
    dataset = data.dataset(split, augment=False)
    with pytest.raises(DataError, match=r"b/003\.png: unreadable image"):
        dataset[int(np.searchsorted(dataset.indices, position))]


@pytest.mark.parametrize("cache", [True, False])
def test_bad_images_skipped_counted_and_reported(tmp_path, cache, caplog):
    cfg = folder_cfg(tmp_path, cache=cache, skip_bad_images=True)
    bad = spoil(cfg)
    (Path(cfg.root) / "c" / "001.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        data = prepare(cfg, ["b"])
    assert data.bad_images == [bad, "c/001.png"]
    assert "2 of 30 images are unreadable" in caplog.text
    position = data.source.ids.index(bad)
    assert all(position not in split for split in data.splits.values())
    assert sum(len(s) for s in data.splits.values()) == 28
    data.write(tmp_path / "run")
    assert (tmp_path / "run" / "bad_images.txt").read_text() == f"{bad}\nc/001.png\n"
    if cache:  # reusing the cache reports the same bad images without decoding
        assert prepare(cfg, ["b"]).bad_images == data.bad_images
        with pytest.raises(DataError, match=r"b/003\.png: unreadable image"):
            prepare(folder_cfg(tmp_path, cache=True), ["b"])


# --------------------------------------------------------------------------- prepare


def test_prepare_one_task(tmp_path):
    cfg = folder_cfg(tmp_path, groups={"g": ["a", "b", "c"]})
    data = prepare(cfg, ["a"])
    assert [t.name for t in data.tasks] == ["a"]
    for split in ("train", "val", "test"):
        labels = data.labels[split]
        assert labels.shape == (len(data.indices[split]), 1) and labels.dtype == np.int64
        assert labels.sum() * 2 == len(labels)  # balanced
        categories = {data.source.attributes["category"][i] for i in data.indices[split]}
        assert "d" not in categories  # not in a's group
        assert set(data.indices[split].tolist()) <= set(data.splits[split].tolist())
    dataset = data.dataset("train", augment=True)
    assert isinstance(dataset, ImageDataset)
    x, y = dataset[0]
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert y.shape == (1,) and y.dtype == torch.int64
    loader = torch.utils.data.DataLoader(data.dataset("val", augment=False), batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape[1:] == (3, 10, 10) and yb.shape[1] == 1


def test_prepare_several_tasks_pool_is_the_union(tmp_path):
    cfg = folder_cfg(tmp_path)
    one, two = prepare(cfg, ["a"]), prepare(cfg, ["a", "attribute:category"])
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(two.indices[split], two.splits[split])  # categorical: all
        assert set(one.indices[split].tolist()) <= set(two.indices[split].tolist())
        assert two.labels[split].shape == (len(two.indices[split]), 2)


def test_uncached_and_cached_datasets_agree(tmp_path):
    on, off = prepare(folder_cfg(tmp_path), ["a"]), prepare(folder_cfg(tmp_path, cache=False), ["a"])
    for k in range(len(on.indices["test"])):
        torch.testing.assert_close(on.dataset("test", False)[k][0], off.dataset("test", False)[k][0])


def test_prepare_writes_run_records_and_resumes(tmp_path):
    cfg = folder_cfg(tmp_path)
    data = prepare(cfg, ["a"])
    run = tmp_path / "run"
    data.write(run)
    summary = json.loads((run / "tasks.json").read_text())
    task = summary["tasks"][0]
    assert task["name"] == "a" and task["classes"] == ["other", "a"]
    assert task["counts"]["train"]["a"] == int(data.labels["train"].sum())
    assert summary["split_sizes"]["train"] == len(data.splits["train"])
    assert (run / "splits" / "train.txt").read_text().splitlines() == [data.source.ids[i] for i in data.splits["train"]]
    # A run folder with splits keeps them even if the seed would now split differently.
    resumed = prepare(folder_cfg(tmp_path, seed=7), ["a"], run_dir=run)
    for split in data.splits:
        np.testing.assert_array_equal(resumed.splits[split], data.splits[split])


def test_prepare_resume_refuses_images_outside_the_configuration(tmp_path):
    data = prepare(folder_cfg(tmp_path), ["a"])
    data.write(tmp_path / "run")
    with pytest.raises(DataError, match=r"run/splits uses images .* data\.max_per_category changed"):
        prepare(folder_cfg(tmp_path, max_per_category=3), ["a"], run_dir=tmp_path / "run")


def test_prepare_checks_tasks_before_caching(tmp_path):
    cfg = folder_cfg(tmp_path)
    with pytest.raises(DataError, match=r"unknown category 'aa'"):
        prepare(cfg, ["aa"])
    assert not Path(cfg.cache_dir).exists()


def test_group_without_negatives_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"group solo has no category other than 'a', so there are no negatives"):
        prepare(folder_cfg(tmp_path, groups={"solo": ["a"]}), ["a"])


# --------------------------------------------------------------------------- open_source and inspect


def test_open_source_dispatch(tmp_path):
    cfg = folder_cfg(tmp_path)
    assert type(open_source(cfg)).__name__ == "FolderSource"
    (Path(cfg.root) / "m.csv").write_text("path,kind\na/000.png,x\nb/000.png,y\n")
    csv = open_source(DataConfig(source="csv", root=str(Path(cfg.root) / "m.csv"), category_attribute="kind"))
    assert type(csv).__name__ == "CsvSource" and csv.attributes["category"] == ["x", "y"]
    with pytest.raises(DataError, match="unknown data.source 'lmdb'"):
        open_source(DataConfig(source="lmdb"))
    with pytest.raises(DataError, match="Places-365 root .*nowhere"):
        open_source(DataConfig(source="places365", root=str(tmp_path / "nowhere")))


def test_open_source_synthetic():
    synthetic = pytest.importorskip("privenc.data.synthetic")
    source = open_source(DataConfig(synthetic_per_category=3, load_size=16, image_size=12))
    assert isinstance(source, synthetic.SyntheticSource)
    assert source.load(0).shape == (16, 16, 3) and source.groups


def test_inspect_report(tmp_path):
    cfg = folder_cfg(tmp_path)
    report = inspect(cfg, ["a", "attribute:category"])
    assert "images: 30 in 4 categories" in report
    assert "splits: train 21, val 5, test 4" in report
    assert "image sizes (HxW over 30 sampled): min 14x12" in report
    assert "all: a, b, c, d" in report
    assert "task a (detect, 2 classes):" in report
    assert "task attribute:category (categorical, 4 classes):" in report


def make_faces_csv(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A CSV manifest ``path,gender,smiling,person`` over tiny noise images, one per row."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["path,gender,smiling,person"]
    for k, (gender, smiling, person) in enumerate(rows):
        Image.fromarray(np.full((14, 14, 3), k % 256, dtype=np.uint8)).save(root / "img" / f"{k:03d}.png")
        lines.append(f"img/{k:03d}.png,{gender},{smiling},{person}")
    (root / "faces.csv").write_text("\n".join(lines) + "\n")
    return root / "faces.csv"


def test_inspect_describes_a_csv_without_tasks(tmp_path):
    rows = [("m", "yes", "ann")] * 6 + [("m", "", "bob")] * 3 + [("f", "no", "cy")] * 3
    csv = make_faces_csv(tmp_path, rows)
    report = inspect(DataConfig(source="csv", root=str(csv), load_size=12, image_size=10))
    assert "images: 12 in 2 categories (column 'gender': splits are stratified by it)" in report
    assert "  f             3  25.0%" in report and "  m             9  75.0%" in report
    assert "gender (the category): 2 values, majority m 75.0%" in report
    assert "smiling: 2 values, majority yes 66.7%, 3 unknown" in report  # of the 9 known
    assert "yes 6 (66.7%), no 3 (33.3%)" in report
    assert "person: 3 values, majority ann 50.0%" in report
    assert "task " not in report  # no task named, none described


def test_grouped_splits_are_recorded_and_inspected(tmp_path):
    rows = [("m" if p % 2 else "f", "yes" if k % 2 else "no", f"p{p}") for p in range(10) for k in range(p % 3 + 1)]
    cfg = DataConfig(source="csv", root=str(make_faces_csv(tmp_path, rows)), load_size=12, image_size=10,
                     group_by="person", split=[0.6, 0.2, 0.2], cache_dir=str(tmp_path / "cache"))
    data = prepare(cfg, ["attribute:smiling"])
    data.write(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "tasks.json").read_text())
    assert summary["group_by"] == "person" and sum(summary["groups_per_split"].values()) == 10
    person_of = dict(zip(data.source.ids, data.source.attributes["person"]))
    people = [{person_of[i] for i in (tmp_path / "run" / "splits" / f"{s}.txt").read_text().split()}
              for s in data.splits]
    assert sum(map(len, people)) == len(set().union(*people)) == 10  # every person in exactly one split file
    report = inspect(cfg)
    assert "disjoint by person: 10 groups (train " in report and "none in two splits" in report


def test_inspect_summarizes_an_attribute_with_many_values(tmp_path):
    rows = [("m", "yes", f"p{k:02d}") for k in range(11)] + [("f", "no", "p00")] * 3
    report = inspect(DataConfig(source="csv", root=str(make_faces_csv(tmp_path, rows)), load_size=12, image_size=10))
    assert "person: 11 values, majority p00 28.6%" in report
    assert "p00 4 (28.6%), p01 1 (7.1%), p02 1 (7.1%), p03 1 (7.1%), p04 1 (7.1%), ..." in report
    assert "images per value: min 1, median 1, max 4; 0 values with at least 10 images" in report


@pytest.mark.skipif(not MINI.is_dir(), reason=f"places365-mini not found at {MINI}")
def test_prepare_places_mini(tmp_path):
    cfg = DataConfig(source="places365", root=str(MINI), groups={"group1": ["army_base", "airport_terminal", "arch"]},
                     load_size=16, image_size=12, cache_dir=str(tmp_path / "cache"))
    data = prepare(cfg, ["army_base"])
    assert {s: len(i) for s, i in data.splits.items()} == {"train": 210, "val": 45, "test": 45}
    assert {s: int(lab.sum()) for s, lab in data.labels.items()} == {"train": 70, "val": 15, "test": 15}
    assert data.dataset("test", augment=False)[0][0].shape == (3, 12, 12)


# --------------------------------------------------------------------------- batched transforms


def _batch_cfg(**kw):
    from privenc.config import DataConfig

    return DataConfig(**{"image_size": 8, "load_size": 12, **kw})


def test_batch_eval_transform_equals_the_per_image_one():
    from privenc.data.transforms import BatchTransform, eval_transform

    cfg = _batch_cfg()
    images = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8)
    batched = BatchTransform(cfg, augment=False)(images)
    single = torch.stack([eval_transform(cfg)(im) for im in images])
    assert torch.allclose(batched, single, atol=1e-6)


def test_batch_train_transform_without_room_to_move_is_the_identity():
    from privenc.data.transforms import BatchTransform

    cfg = _batch_cfg(image_size=12, scale_range=[1.0, 1.0])
    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    out = BatchTransform(cfg, augment=True)(images)
    assert torch.allclose(out, images.float() / 127.5 - 1, atol=1e-5)


def test_batch_train_transform_crops_shifts_and_scales_randomly():
    from privenc.data.transforms import BatchTransform

    cfg = _batch_cfg(scale_range=[1.0, 1.5])
    ramp = torch.arange(12, dtype=torch.float32).mul(20).to(torch.uint8)  # brightness grows along x
    images = ramp.expand(64, 3, 12, 12).contiguous()
    torch.manual_seed(0)
    out = BatchTransform(cfg, augment=True)(images)
    assert out.shape == (64, 3, 8, 8) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    left = out[:, 0, 0, 0]
    assert left.std() > 0.05  # crops start at different places
    slope = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) / 7
    assert slope.max() - slope.min() > 0.01  # and at different scales (a zoom flattens the ramp)
    torch.manual_seed(0)
    assert torch.equal(BatchTransform(cfg, augment=True)(images), out)  # seeded: reproducible
