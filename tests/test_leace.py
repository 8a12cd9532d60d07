"""The LEACE reference encoder: it erases what a linear probe sees of its private task and keeps
the rest, saves and loads like a run, and verify, grid, report and audit take its folder."""

import json

import numpy as np
import pytest
import torch

from privenc import leace, runs
from privenc.cli import main
from privenc.config import load_config
from privenc.data import prepare
from privenc.encoders import LoadedEncoder, attacker_lr, default_tasks, load_encoder_spec
from privenc.errors import CheckpointError, ConfigError, DataError
from privenc.grid import run_grid
from privenc.report import build_report

SIZE = 12
PRIVATE, DESIRABLE = "attribute:tint", "attribute:category"


def _write_images(root, count: int = 400, seed: int = 0):
    """A CSV of noisy SIZE x SIZE images with two independent attributes, both linearly
    decodable from the pixels: ``tint`` (warm: the red channel raised everywhere; cool: lowered)
    and ``category`` (patch: a bright green square in a corner; plain: none)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    lines = ["path,category,tint"]
    for i in range(count):
        warm, patch = bool(rng.integers(2)), bool(rng.integers(2))
        pixels = rng.normal(128, 30, (SIZE, SIZE, 3))
        pixels[..., 0] += 14 if warm else -14
        if patch:
            pixels[1:5, 1:5, 1] += 70
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png,{'patch' if patch else 'plain'},{'warm' if warm else 'cool'}")
    (root / "images.csv").write_text("\n".join(lines) + "\n")
    return root / "images.csv"


def _config(csv, *more):
    return load_config("demo", [
        "data.source=csv", f"data.root={csv}", f"data.image_size={SIZE}", f"data.load_size={SIZE}",
        "data.scale_range=[1.0, 1.0]", "encoder.stages=[[4], [8]]", "classifier.stages=[[8], [8]]",
        f"train.private=['{PRIVATE}']", f"train.desirable=['{DESIRABLE}']",
        "verify.attackers=['linear']", "verify.batch_size=32", "verify.eval_every=25", "verify.patience=3",
        "verify.max_iters=400", "verify.views=1", "verify.seeds=[0]", "verify.lr=1e-3", "verify.lr_raw=1e-3", *more])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("tinted"))


@pytest.fixture(scope="module")
def eraser(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("leace") / "tint"
    leace.erase(_config(images), PRIVATE, folder, device="cpu", progress=False)
    return folder


def _pixels(data, split):
    """The split's images through the evaluation transform, (N, 3, S, S) in [-1, 1], and labels (N, T)."""
    images, labels = zip(*(data.uint8_dataset(split)[k] for k in range(len(data.indices[split]))))
    return torch.stack(images).float().div(127.5).sub(1), torch.stack(labels)


def _probe_bacc(train_x, train_y, test_x, test_y, ridge: float = 1.0) -> float:
    """A closed-form linear probe: ridge regression on centred features to the centred 0/1
    label, thresholded at zero; its balanced accuracy on test."""
    mean_x, mean_y = train_x.mean(0), train_y.float().mean()
    xc = (train_x - mean_x).double()
    w = torch.linalg.solve(xc.T @ xc + ridge * torch.eye(xc.shape[1], dtype=xc.dtype),
                           xc.T @ (train_y.double() - mean_y))
    predicted = (((test_x - mean_x).double() @ w) > 0).long()
    return float(torch.stack([(predicted[test_y == k] == k).float().mean() for k in (0, 1)]).mean())


def test_a_linear_probe_falls_to_chance_on_the_erased_task_and_keeps_the_other(images, eraser):
    config = _config(images)
    data = prepare(config.data, [PRIVATE, DESIRABLE])
    (train_x, train_y), (test_x, test_y) = _pixels(data, "train"), _pixels(data, "test")
    module = leace.read_eraser(eraser)
    with torch.no_grad():
        erased_train, erased_test = module(train_x).flatten(1), module(test_x).flatten(1)
    raw = [_probe_bacc(train_x.flatten(1), train_y[:, t], test_x.flatten(1), test_y[:, t]) for t in (0, 1)]
    erased = [_probe_bacc(erased_train, train_y[:, t], erased_test, test_y[:, t]) for t in (0, 1)]
    assert min(raw) > 0.9  # both attributes are linearly decodable from the pixels
    assert erased[0] < 0.62  # the private one falls to chance (0.5; about 60 test images)
    assert erased[1] > 0.9  # the other one is kept


@pytest.mark.slow
def test_verify_grid_and_report_take_the_folder_beside_identity(images, eraser, tmp_path):
    config = _config(images)
    records = run_grid(["identity", str(eraser)], [PRIVATE, DESIRABLE], config, tmp_path / "grid")
    bacc = {(r["encoder"], r["task"]): r["test_bacc_best"] for r in records}
    assert bacc["identity", PRIVATE] > 0.9 and bacc["identity", DESIRABLE] > 0.9  # both decodable from pixels
    assert bacc["tint", PRIVATE] < 0.65  # erased: chance is 0.5, about 60 test images
    assert bacc["tint", DESIRABLE] > 0.9  # kept
    roles = {(r["encoder"], r["task"]): r["role"] for r in records}
    assert roles["tint", PRIVATE] == "private" and roles["tint", DESIRABLE] == "desirable"
    assert {r["encoder_kind"] for r in records if r["encoder"] == "tint"} == {"leace"}

    report = build_report([tmp_path / "grid"], tmp_path / "report", figures=False)
    table2 = (tmp_path / "report" / "report.md").read_text().split("## Table 2")[1]
    assert f"| tint (LEACE -{PRIVATE}) |" in table2
    assert [row["encoder"] for row in report["table2"]] == ["identity", "tint"]
    assert report["table2"][1]["label"] == f"LEACE -{PRIVATE}"


def test_the_erased_class_means_coincide_also_downsampled(images):
    config = _config(images)
    data = prepare(config.data, [PRIVATE])
    encoder, info = leace.fit(config, data, size=4, progress=False)
    assert encoder.output_shape == (3, 4, 4) and info["size"] == 4 and info["classes"] == ["cool", "warm"]
    x, y = _pixels(data, "train")
    y = y[:, 0]
    with torch.no_grad():
        before, after = encoder.pixels(x), encoder(x).flatten(1)
    gap = lambda z: float((z[y == 1].mean(0) - z[y == 0].mean(0)).norm())  # noqa: E731
    assert gap(before) > 0.2 and gap(after) < 1e-4 * gap(before)
    assert info["class_mean_gap_after"] < 1e-6 * info["class_mean_gap_before"]
    assert info["n_train"] == len(y)


def test_the_folder_loads_like_a_run_on_any_device(images, eraser, device):
    config = _config(images, "verify.max_iters=7")
    for spec in (str(eraser), str(eraser / runs.ENCODER_FILE)):
        loaded = load_encoder_spec(spec, config, device)
        assert (loaded.kind, loaded.name, loaded.label) == ("leace", "tint", f"LEACE -{PRIVATE}")
        assert loaded.run_dir == eraser.resolve() and loaded.config.verify.max_iters == 7
        assert loaded.config.train.private == [PRIVATE] and loaded.module.mean.device.type == device.type
    assert default_tasks(str(eraser), config) == [PRIVATE, DESIRABLE]
    fitted = leace.read_eraser(eraser)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    torch.testing.assert_close(loaded.module(x.to(device)).cpu(), fitted(x))
    assert set(fitted.state_dict()) == {"mean", "proj_left", "proj_right"}
    assert (eraser / "splits").is_dir() and runs.is_run(eraser)  # the attackers reuse its split
    saved = torch.load(eraser / runs.ENCODER_FILE, weights_only=True)
    assert saved["kind"] == "leace" and saved["task"] == PRIVATE and saved["rank"] == 2


def test_attackers_learn_at_the_rate_of_the_baseline_it_modifies(images, eraser):
    config = _config(images, "verify.lr=1e-5", "verify.lr_raw=1e-4")
    full = load_encoder_spec(str(eraser), config, torch.device("cpu"))
    assert attacker_lr(full) == 1e-4  # full resolution: pixels, like Identity
    small = LoadedEncoder("s", "leace", leace.LeaceEncoder(SIZE, 4, 2, PRIVATE), full.config, None)
    assert attacker_lr(small) == 1e-5  # downsampled: like Blur


def test_default_size_is_full_up_to_64_px_then_the_learned_output_size():
    assert leace.MAX_FULL_SIZE == 64
    assert leace.default_size(load_config("demo")) == 32
    assert leace.default_size(load_config("paper")) == 28  # 224 -> the encoder's 28 x 28
    with pytest.raises(ConfigError, match=r"--size 65 gives 12675 pixels.*give --size 64 or less"):
        leace.check_size(65, 224)
    with pytest.raises(ConfigError, match=r"--size 40 must be between 1 and the image size 32"):
        leace.check_size(40, 32)


def test_bad_input_is_named(images, eraser, tmp_path):
    config = _config(images)
    with pytest.raises(DataError, match="nope"):
        leace.erase(config, "attribute:nope", tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="already holds a LEACE eraser"):
        leace.erase(config, PRIVATE, eraser, progress=False)
    run = tmp_path / "run"
    run.mkdir()
    runs.write_config(config, run)
    with pytest.raises(ConfigError, match=r"holds a config\.toml but no encoder\.pt \(a training run, or an erase"):
        leace.erase(config, PRIVATE, run, progress=False)
    (run / runs.ENCODER_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match="is a training run folder"):
        leace.erase(config, PRIVATE, run, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"is not empty \(it holds 'notes.txt'\)"):
        leace.erase(config, PRIVATE, tmp_path / "other", progress=False)
    with pytest.raises(ConfigError, match="--size 13 must be between"):
        leace.erase(config, PRIVATE, tmp_path / "b", size=13, progress=False)
    # encode and export take trained encoders only: the message says what the file is
    with pytest.raises(CheckpointError, match="a LEACE eraser .*encode and export only trained encoders"):
        runs.read_encoder(eraser)


def test_erase_command_defaults_to_the_configs_private_task(images, tmp_path, capsys):
    config = tmp_path / "tinted.toml"
    config.write_text(_config(images).to_toml())
    out = tmp_path / "leace"
    assert main(["-q", "erase", "--config", str(config), "--out", str(out), "--device", "cpu", "--size", "6"]) == 0
    assert f"eraser: {out / runs.ENCODER_FILE}" in capsys.readouterr().out
    fitted = leace.read_eraser(out)
    assert fitted.task == PRIVATE and fitted.output_shape == (3, 6, 6)
    assert json.loads((out / "tasks.json").read_text())["tasks"][0]["name"] == PRIVATE
    assert main(["-q", "erase", "--config", str(config), "--out", str(out)]) == 2
    assert "already holds a LEACE eraser" in capsys.readouterr().err
    assert main(["-q", "erase", "--config", str(config), "--out", str(tmp_path / "x"), "--set",
                 f"train.private=['{PRIVATE}', 'attribute:category']"]) == 2
    assert "give --task" in capsys.readouterr().err


def test_audit_takes_the_folder_and_names_it(images, eraser, tmp_path):
    from privenc.audit import audit

    config = _config(images, "verify.max_iters=50")
    result = audit(str(eraser), config, [PRIVATE], tmp_path / "audit", max_rounds=1, device="cpu", progress=False)
    assert result["encoder_kind"] == "leace" and result["verdicts"][PRIVATE]["role"] == "private"
    assert (tmp_path / "audit" / "audit.md").read_text().startswith(f"# privenc audit: tint (LEACE -{PRIVATE})")
    plan = json.loads((tmp_path / "audit" / "plan.json").read_text())
    assert len(plan["encoder_sha256"]) == 64  # a refitted eraser must not reuse these trials
