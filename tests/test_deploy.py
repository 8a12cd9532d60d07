"""Deployment: encoding folders and CSV lists into shards (manifest, resume, errors, refusals),
exports that reproduce the PyTorch encoder, and loading that refuses bad files clearly."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, PayloadMarker
from privenc import deploy
from privenc.cli import main
from privenc.config import load_config
from privenc.data.images import read_image, resize_square
from privenc.data.transforms import eval_transform
from privenc.deploy import formats, shards
from privenc.errors import CheckpointError, ConfigError, DataError, ExportError
from privenc.figures import equalize
from privenc.models import Encoder
from privenc.runs import load_encoder, save_encoder

# --------------------------------------------------------------------------- fixtures


def _make_run(run_dir: Path, seed: int = 0, overrides: tuple[str, ...] = ()) -> Path:
    """A run folder with a tiny encoder whose running statistics are not the defaults (a few
    seeded training-mode passes), as training would leave it: encoder.pt + config.toml."""
    config = load_config("demo", [*TINY, *overrides])
    torch.manual_seed(seed)
    encoder = Encoder(config.encoder, config.data.image_size)
    size = config.data.image_size
    with torch.no_grad():
        for _ in range(3):
            encoder(torch.rand(8, 3, size, size) * 2 - 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config.to_toml())
    save_encoder(run_dir / "encoder.pt", config, encoder, step=3)
    return run_dir


@pytest.fixture
def run(tmp_path) -> Path:
    return _make_run(tmp_path / "run")


def _save_image(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


@pytest.fixture
def images(tmp_path) -> Path:
    """7 readable images of several sizes and modes in nested folders, a file that is not an
    image, and files that are not inputs (a text file, a hidden image)."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(5):
        _save_image(root / ("b" if i % 2 else "a") / f"img{i}.png",
                    rng.integers(0, 256, (17 + 3 * i, 30 - 2 * i, 3), dtype=np.uint8))
    _save_image(root / "a" / "deep" / "gray.jpg", rng.integers(0, 256, (24, 24), dtype=np.uint8))
    _save_image(root / "rgba.png", rng.integers(0, 256, (20, 26, 4), dtype=np.uint8))
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "notes.txt").write_text("ignored")
    _save_image(root / ".hidden.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    return root


def _expected(encoder: Encoder, path: Path) -> np.ndarray:
    """Training's evaluation path, image by image: decode, resize_square, eval_transform."""
    from privenc.config import DataConfig

    image = resize_square(read_image(path), 18)
    x = eval_transform(DataConfig(image_size=16, load_size=18))(torch.from_numpy(image.copy()).permute(2, 0, 1))
    with torch.no_grad():
        return encoder(x[None])[0].numpy()


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- encode


def test_manifest_lists_every_input_once_and_rows_hold_their_encodings(run, images, tmp_path, device):
    out = tmp_path / "out"
    summary = deploy.encode(run, images, out, shard_size=3, batch_size=2, device=str(device), progress=False)

    records = _manifest(out)
    expected_paths = ["a/broken.jpg", "a/deep/gray.jpg", "a/img0.png", "a/img2.png", "a/img4.png",
                      "b/img1.png", "b/img3.png", "rgba.png"]
    assert [r["path"] for r in records] == expected_paths  # sorted, recursive, each once
    assert [r["index"] for r in records] == list(range(8))
    assert summary == {"images": 8, "encoded": 7, "errors": 1, "shards": 3, "shards_written": 3,
                       "shards_reused": 0, "previews": 0, "out_dir": str(out), "manifest": str(out / "manifest.jsonl")}

    bad = records[0]
    assert bad["status"] == "error" and bad["shard"] is None and bad["row"] is None
    assert "broken.jpg" in bad["error"] and "unreadable image" in bad["error"]

    # rows are assigned in order within each shard, skipping the unreadable image
    assert [(r["shard"], r["row"]) for r in records[1:]] == [
        ("shard-00000.npy", 0), ("shard-00000.npy", 1), ("shard-00001.npy", 0), ("shard-00001.npy", 1),
        ("shard-00001.npy", 2), ("shard-00002.npy", 0), ("shard-00002.npy", 1)]
    encoder = load_encoder(run)
    for record in records[1:]:
        shard = np.load(out / record["shard"])
        assert shard.dtype == np.float32 and shard.shape[1:] == (3, 8, 8)
        np.testing.assert_allclose(shard[record["row"]], _expected(encoder, images / record["path"]), atol=1e-5)

    meta = json.loads((out / "encode.json").read_text())
    assert meta["encoder_sha256"] == deploy.file_sha256(run / "encoder.pt")
    assert meta["options"]["shard_size"] == 3 and meta["contract"]["input"]["load_size"] == 18


def test_rerun_rewrites_only_unfinished_shards(run, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    deploy.encode(run, images, out, shard_size=3, batch_size=2, progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    shard0_mtimes = [(out / f"shard-00000{ext}").stat().st_mtime_ns for ext in (".npy", ".jsonl")]

    # a shard with only one of its two files is not done: both cases are re-encoded
    (out / "shard-00002.npy").unlink()
    (out / "shard-00001.jsonl").unlink()
    written = []
    real_write = shards._write_shard
    monkeypatch.setattr(shards, "_write_shard", lambda o, k, *a: (written.append(k), real_write(o, k, *a)))
    summary = deploy.encode(run, images, out, shard_size=3, batch_size=2, progress=False)

    assert written == [1, 2]
    assert (summary["shards_written"], summary["shards_reused"]) == (2, 1)
    assert [(out / f"shard-00000{ext}").stat().st_mtime_ns for ext in (".npy", ".jsonl")] == shard0_mtimes
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == before
    assert len(_manifest(out)) == 8


def test_an_interrupted_encode_resumes_from_its_finished_shards(run, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_encode = shards._encode_shard
    calls = []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(shards, "_encode_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        deploy.encode(run, images, out, shard_size=3, progress=False)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.jsonl", "shard-00000.npy"]
    assert not (out / "manifest.jsonl").exists()
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files

    monkeypatch.setattr(shards, "_encode_shard", real_encode)
    summary = deploy.encode(run, images, out, shard_size=3, progress=False)
    assert (summary["shards_written"], summary["shards_reused"], summary["images"]) == (2, 1, 8)
    fresh = tmp_path / "fresh"
    deploy.encode(run, images, fresh, shard_size=3, progress=False)
    for name in ("shard-00000.npy", "shard-00001.npy", "shard-00002.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(fresh / name))
    assert _manifest(out) == _manifest(fresh)


def test_csv_input_follows_the_path_column_and_reports_missing_files(run, images, tmp_path):
    listing = images / "list.csv"
    listing.write_text("path,label\nb/img3.png,x\nmissing.png,y\na/deep/gray.jpg,x\n")
    out = tmp_path / "out"
    summary = deploy.encode(run, listing, out, progress=False)

    records = _manifest(out)
    assert [r["path"] for r in records] == ["b/img3.png", "missing.png", "a/deep/gray.jpg"]
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert "image file missing" in records[1]["error"] and "missing.png" in records[1]["error"]
    assert (summary["encoded"], summary["errors"]) == (2, 1)
    shard = np.load(out / "shard-00000.npy")
    encoder = load_encoder(run)
    np.testing.assert_allclose(shard[1], _expected(encoder, images / "a/deep/gray.jpg"), atol=1e-5)

    escaping = tmp_path / "escaping.csv"
    escaping.write_text("path\n../outside.png\n")
    with pytest.raises(DataError, match="escapes"):
        deploy.encode(run, escaping, tmp_path / "out2", progress=False)


def test_previews_are_the_first_encodings_equalized_over_the_shard(run, images, tmp_path):
    out = tmp_path / "out"
    summary = deploy.encode(run, images, out, shard_size=4, previews=2, progress=False)
    assert summary["previews"] == 2
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["preview-00000.png", "preview-00001.png"]

    shown = equalize(np.load(out / "shard-00000.npy"))  # (n, C, H, W) in [0, 1]
    scale = 112 // 8
    for i in range(2):
        png = np.asarray(Image.open(out / "previews" / f"preview-{i:05d}.png"))  # (H * scale, W * scale, 3)
        assert png.shape == (8 * scale, 8 * scale, 3)
        expected = (shown[i] * 255).round().astype(np.uint8).transpose(1, 2, 0)
        np.testing.assert_array_equal(png[::scale, ::scale], expected)


def test_output_folder_inside_the_input_is_not_an_input(run, images):
    out = images / "encoded"
    deploy.encode(run, images, out, previews=3, progress=False)
    summary = deploy.encode(run, images, out, previews=3, progress=False)  # previews are PNGs under the input
    assert summary["images"] == 8 and summary["shards_reused"] == 1


def test_refuses_another_encoder_or_other_options_in_the_same_folder(run, images, tmp_path, capsys):
    out = tmp_path / "out"
    deploy.encode(run, images, out, shard_size=3, progress=False)
    other = _make_run(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="another encoder"):
        deploy.encode(other, images, out, shard_size=3, progress=False)
    with pytest.raises(ConfigError, match="shard_size: 3 -> 4"):
        deploy.encode(run, images, out, shard_size=4, progress=False)
    (images / "new.png").write_bytes((images / "rgba.png").read_bytes())
    with pytest.raises(ConfigError, match="images: 8 -> 9"):
        deploy.encode(run, images, out, shard_size=3, progress=False)
    (images / "new.png").unlink()
    # batch size, device and previews do not change the shards
    assert deploy.encode(run, images, out, shard_size=3, batch_size=1, device="cpu", previews=1,
                         progress=False)["shards_reused"] == 3

    assert main(["-q", "encode", "--encoder", str(other), "--input", str(images), "--output", str(out),
                 "--shard-size", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("privenc: error: refusing to encode into") and "Traceback" not in err

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "shard-00000.npy").write_bytes(b"")
    with pytest.raises(ConfigError, match="not empty"):
        deploy.encode(run, images, stranger, progress=False)


def test_encode_through_the_cli_prints_a_summary_with_the_errors(run, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "encode", "--encoder", str(run), "--input", str(images), "--output", str(out),
                 "--shard-size", "5", "--batch-size", "3", "--device", "cpu", "--previews", "2",
                 "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("encoded 7 of 8 images into 2 shard(s) (0 reused), 1 error(s)")
    assert (out / "previews" / "preview-00001.png").exists()


# --------------------------------------------------------------------------- export


def _random_images(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_onnx_and_torchscript_exports_match_the_encoder(run, tmp_path):
    import onnxruntime

    encoder = load_encoder(run)
    onnx_path = deploy.export(run, "onnx", tmp_path / "enc.onnx")
    ts_path = deploy.export(run, "torchscript")
    assert ts_path == run / "encoder.torchscript.pt"
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in recent torch
        scripted = torch.jit.load(str(ts_path))
    for batch in (1, 5):  # the batch axis is dynamic in both
        x = _random_images(batch, seed=10 + batch)
        with torch.no_grad():
            reference = encoder(x).numpy()
            from_ts = scripted(x).numpy()
        from_onnx = session.run(None, {"image": x.numpy()})[0]
        assert from_onnx.shape == from_ts.shape == (batch, 3, 8, 8)
        np.testing.assert_allclose(from_onnx, reference, atol=1e-4, rtol=0)
        np.testing.assert_allclose(from_ts, reference, atol=1e-4, rtol=0)

    contract = json.loads((tmp_path / "enc.onnx.json").read_text())
    assert contract["format"] == "onnx" and contract["onnx_opset"] == deploy.ONNX_OPSET
    assert contract["input"]["shape"] == ["batch", 3, 16, 16]
    assert contract["input"]["value_range"] == [-1.0, 1.0] and contract["input"]["channels"] == "RGB"
    assert contract["input"]["normalization"].startswith("(x / 255 - 0.5) / 0.5")
    assert contract["input"]["load_size"] == 18 and "center-crop 16x16" in contract["input"]["resize_crop"]
    assert contract["output"]["shape"] == ["batch", 3, 8, 8]
    assert contract["encoder_config"]["stages"] == [[4], [8]]
    assert contract["source_sha256"] == deploy.file_sha256(run / "encoder.pt")
    assert contract["privenc_version"] and contract["check"]["max_abs_diff"] <= 1e-4
    assert (run / "encoder.torchscript.pt.json").is_file()


def test_safetensors_export_rebuilds_the_encoder_exactly(run, images, tmp_path):
    from safetensors.torch import load_file

    path = deploy.export(run, "safetensors")
    encoder = load_encoder(run)
    rebuilt, contract = deploy.load_safetensors(path)
    assert not rebuilt.training and contract["input"]["load_size"] == 18
    # by hand, as someone without privenc.deploy would: privenc.models.Encoder + strict loading
    from privenc.config import EncoderConfig

    by_hand = Encoder(EncoderConfig(**contract["encoder_config"]), contract["input"]["image_size"])
    by_hand.load_state_dict(load_file(path), strict=True)
    by_hand.eval()
    x = _random_images(5, seed=3)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), encoder(x)) and torch.equal(by_hand(x), encoder(x))

    # the safetensors file alone is enough to encode, with the same shards as the run folder
    deploy.encode(run, images, tmp_path / "from_run", progress=False)
    deploy.encode(path, images, tmp_path / "from_safetensors", progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "from_run" / "shard-00000.npy"),
                                  np.load(tmp_path / "from_safetensors" / "shard-00000.npy"))


def test_export_cli_writes_the_file_and_its_contract(run, tmp_path, capsys):
    out = tmp_path / "exports" / "model.onnx"
    assert main(["-q", "export", "--encoder", str(run), "--format", "onnx", "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "exports" / "model.onnx.json").is_file()
    assert str(out) in capsys.readouterr().out


# --------------------------------------------------------------------------- refusing bad files


def _bad_encoder_file(kind: str, run: Path, tmp_path: Path) -> Path:
    """Replace ``run/encoder.pt`` by a bad one of ``kind``; returns the marker path (pickled)."""
    path = run / "encoder.pt"
    marker = tmp_path / "payload-ran"
    if kind == "other_widths":  # the file's own config disagrees with its state dict
        small = load_config("demo", TINY)
        wide = load_config("demo", [*TINY, "encoder.stages=[[6], [8]]"])
        save_encoder(path, small, Encoder(wide.encoder, 16), step=1)
    elif kind == "other_run_config":  # a consistent file, but not the run's architecture
        wide = load_config("demo", [*TINY, "encoder.stages=[[6], [8]]"])
        save_encoder(path, wide, Encoder(wide.encoder, 16), step=1)
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickled":
        torch.save({"format_version": 1, "kind": "learned", "x": PayloadMarker(marker)}, path)
    return marker


def test_the_pickled_payload_is_real(tmp_path):
    """The payload used below does run when loaded unsafely (so its refusal means something)."""
    marker = tmp_path / "ran"
    torch.save({"x": PayloadMarker(marker)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)["x"].close()
    assert marker.exists()


@pytest.mark.parametrize("kind", ["other_widths", "truncated", "pickled"])
def test_load_encoder_refuses_bad_files_clearly(kind, run, tmp_path):
    marker = _bad_encoder_file(kind, run, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_encoder(run)
    assert str(run / "encoder.pt") in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["other_widths", "other_run_config", "truncated", "pickled"])
@pytest.mark.parametrize("command", ["encode", "export"])
def test_commands_refuse_bad_encoder_files_clearly(kind, command, run, images, tmp_path, capsys):
    marker = _bad_encoder_file(kind, run, tmp_path)
    with pytest.raises(CheckpointError, match=str(run / "encoder.pt")):
        deploy.open_encoder(run)
    argv = (["encode", "--input", str(images), "--output", str(tmp_path / "out"), "--no-progress"]
            if command == "encode" else ["export", "--format", "onnx"])
    assert main(["-q", *argv[:1], "--encoder", str(run), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("privenc: error: ") and str(run / "encoder.pt") in err and "Traceback" not in err
    assert not marker.exists()
    assert not list((tmp_path / "out").glob("shard-*")) and not (run / "encoder.onnx").exists()


def test_safetensors_of_another_architecture_or_truncated_is_refused(run, tmp_path, capsys):
    path = deploy.export(run, "safetensors", tmp_path / "enc.safetensors")
    from safetensors.torch import save_file

    # the contract's widths with another encoder's tensors
    wide = load_config("demo", [*TINY, "encoder.stages=[[6], [8]]"])
    metadata = {deploy.CONTRACT_KEY: (tmp_path / "enc.safetensors.json").read_text()}
    save_file(Encoder(wide.encoder, 16).state_dict(), tmp_path / "other.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match="other.safetensors: encoder does not match this architecture"):
        deploy.load_safetensors(tmp_path / "other.safetensors")

    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        deploy.load_safetensors(tmp_path / "cut.safetensors")
    assert main(["-q", "export", "--encoder", str(tmp_path / "cut.safetensors"), "--format", "onnx"]) == 2
    assert "cut.safetensors" in capsys.readouterr().err


def test_an_export_that_differs_is_not_written(run, tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "EXPORT_TOLERANCE", -1.0)  # any difference, even 0, is too much
    with pytest.raises(ExportError, match="nothing was written"):
        deploy.export(run, "torchscript", tmp_path / "enc.pt")
    assert not (tmp_path / "enc.pt").exists() and not (tmp_path / "enc.pt.json").exists()
