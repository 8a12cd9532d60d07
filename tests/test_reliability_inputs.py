"""The bad-input catalogue of docs/reliability.md: every case goes through the command line as a
user would meet it and must end in one clear ``privenc: error: ...`` naming the file, line,
key or category (exit code 2, no traceback, no checkpoint written), or, where an option
allows it, in a counted and reported skip.

Lower-level tests of the same checks live in test_data_sources.py, test_data_tasks.py,
test_config.py and test_deploy.py; this file checks that they reach the user intact.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import DEMO_ALPHA, OTHER_ALPHA, TINY, PayloadMarker
from privenc import checkpoint as ckpt
from privenc import deploy
from privenc.cli import main
from privenc.config import load_config
from privenc.models import Encoder


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (40 * seed % 256, 90, 200)).save(path)
    return path


def _train(tmp_path: Path, data: list[str], private: str = "c0", desirable: str = "c1") -> list[str]:
    """``privenc train`` on a data source, with the tiny model and tasks of the source."""
    overrides = [*TINY, *data, f"train.private={private}",
                 f"train.desirable={desirable}" if desirable else "train.desirable=[]"]
    return ["-q", "train", *_sets(overrides), "--out", str(tmp_path / "new"), "--no-progress"]


# --------------------------------------------------------------------------- data sources


def _folder(tmp_path: Path, per_category: int = 6, categories=("c0", "c1", "c2")) -> Path:
    root = tmp_path / "folder"
    for k, category in enumerate(categories):
        for i in range(per_category):
            _image(root / category / f"img{i:03d}.png", k)
    return root


def _folder_train(tmp_path: Path, **kwargs) -> list[str]:
    return _train(tmp_path, ["data.source=folder", f"data.root={tmp_path / 'folder'}"], **kwargs)


def _bomb_png(path: Path, width: int = 30000, height: int = 30000) -> None:
    """A valid PNG header declaring an enormous image (a few bytes on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))


def _bad_image(kind: str):
    def build(tmp_path: Path, run: Path) -> list[str]:
        target = _folder(tmp_path) / "c1" / "img002.png"
        if kind == "zero_bytes":
            target.write_bytes(b"")
        elif kind == "truncated":
            target.write_bytes(target.read_bytes()[:40])
        elif kind == "not_an_image":
            target.write_text("name,age\nalice,30\n")
        else:
            _bomb_png(target)
        return _folder_train(tmp_path)
    return build


def _csv(tmp_path: Path, text: str, images: tuple[str, ...] = ()) -> Path:
    root = tmp_path / "faces"
    for i, rel in enumerate(images):
        _image(root / rel, i)
    root.mkdir(exist_ok=True)
    (root / "faces.csv").write_bytes(text.encode() if isinstance(text, str) else text)
    return root / "faces.csv"


GOOD_ROWS = "".join(f"img/{c}{i}.png,{c},{'fm'[i % 2]}\n" for c in ("c0", "c1", "c2") for i in range(6))
GOOD_IMAGES = tuple(f"img/{c}{i}.png" for c in ("c0", "c1", "c2") for i in range(6))


def _csv_case(header: str, extra: str = "", rows: str = GOOD_ROWS, private: str = "c0", data: tuple[str, ...] = ()):
    def build(tmp_path: Path, run: Path) -> list[str]:
        path = _csv(tmp_path, header + rows + extra, GOOD_IMAGES)
        return _train(tmp_path, ["data.source=csv", f"data.root={path}", *data], private=private)
    return build


def _csv_not_utf8(tmp_path: Path, run: Path) -> list[str]:
    path = _csv(tmp_path, b"path,category,gender\n" + GOOD_ROWS.encode() + "img/caf\u00e9.png,c0,f\n".encode("cp1252"),
                GOOD_IMAGES)
    return _train(tmp_path, ["data.source=csv", f"data.root={path}"])


CATEGORIES = "/a/airfield 0\n/a/alley 1\n/a/arch 2\n"


def _places_case(extra: str):
    def build(tmp_path: Path, run: Path) -> list[str]:
        root = tmp_path / "places"
        root.mkdir()
        (root / "categories_places365.txt").write_text(CATEGORIES)
        lines = []
        for label, category in enumerate(("airfield", "alley", "arch")):
            for i in range(1, 7):
                rel = f"/a/{category}/{i:08d}.jpg"
                _image(root / "data_256" / rel.lstrip("/"), label)
                lines.append(f"{rel} {label}\n")
        (root / "places365_train_standard.txt").write_text("".join(lines) + extra)
        data = ["data.source=places365", f"data.root={root}", 'data.groups={g = ["airfield", "alley", "arch"]}']
        return _train(tmp_path, data, private="airfield", desirable="alley")
    return build


# --------------------------------------------------------------------------- checkpoints and resuming


def _bad_checkpoint(kind: str):
    def build(tmp_path: Path, run: Path) -> list[str]:
        run = Path(shutil.copytree(run, tmp_path / "run"))
        path = run / "checkpoints" / "last.pt"
        if kind == "other_architecture":
            payload = ckpt.load(path)
            wide = load_config("demo", [*TINY, "encoder.stages=[[6], [8]]"])
            payload["encoder"] = Encoder(wide.encoder, 16).state_dict()
            ckpt.save(path, {k: v for k, v in payload.items() if k != "format_version"})
        elif kind == "truncated":
            path.write_bytes(path.read_bytes()[:1000])
        else:
            torch.save({"format_version": 1, "step": 9, "x": PayloadMarker(tmp_path / "payload-ran")}, path)
        return ["-q", "train", "--resume", str(run), "--no-progress"]
    return build


def _resume_changed(how: str):
    def build(tmp_path: Path, run: Path) -> list[str]:
        run = Path(shutil.copytree(run, tmp_path / "run"))
        argv = ["-q", "train", "--resume", str(run), "--no-progress"]
        if how == "set":
            return [*argv, "--set", f"train.alpha={OTHER_ALPHA}"]
        config = (run / "config.toml").read_text()
        (run / "config.toml").write_text(config.replace(f"alpha = {DEMO_ALPHA!r}", f"alpha = {OTHER_ALPHA!r}"))
        return argv
    return build


_ALPHA_CHANGE = re.escape(f"train.alpha: {DEMO_ALPHA} -> {OTHER_ALPHA}")


def _resume_without_checkpoint(tmp_path: Path, run: Path) -> list[str]:
    run = Path(shutil.copytree(run, tmp_path / "run"))
    shutil.rmtree(run / "checkpoints")
    (run / "encoder.pt").unlink()
    return ["-q", "train", "--resume", str(run), "--no-progress"]


def _verify_other_architecture(tmp_path: Path, run: Path) -> list[str]:
    run = Path(shutil.copytree(run, tmp_path / "run"))
    payload = ckpt.load(run / "encoder.pt")
    wide = load_config("demo", [*TINY, "encoder.stages=[[6], [8]]"])
    payload["state_dict"] = Encoder(wide.encoder, 16).state_dict()
    ckpt.save(run / "encoder.pt", {k: v for k, v in payload.items() if k != "format_version"})
    return ["-q", "verify", str(run), "--out", str(tmp_path / "v"), "--no-progress"]


def _config_case(*overrides: str):
    def build(tmp_path: Path, run: Path) -> list[str]:
        return ["-q", "train", *_sets([*TINY, *overrides]), "--out", str(tmp_path / "new"), "--no-progress"]
    return build


def _bad_toml(tmp_path: Path, run: Path) -> list[str]:
    (tmp_path / "mine.toml").write_text("[train]\niters = 3\nalpha = \n")
    return ["-q", "train", "--config", str(tmp_path / "mine.toml"), "--out", str(tmp_path / "new")]


def _existing_run(tmp_path: Path, run: Path) -> list[str]:
    return ["-q", "train", *_sets(TINY), "--out", str(run), "--no-progress"]


def _same_named_runs(tmp_path: Path, run: Path) -> list[str]:
    first, second = (Path(shutil.copytree(run, tmp_path / where / "run")) for where in ("a", "b"))
    return ["-q", "grid", "--encoders", str(first), str(second), "--tasks", "g1c0", *_sets(TINY),
            "--out", str(tmp_path / "grid")]


def _verify(spec_of) -> callable:
    def build(tmp_path: Path, run: Path) -> list[str]:
        return ["-q", "verify", spec_of(tmp_path, run), *_sets(TINY), "--task", "g1c0", "--out", str(tmp_path / "v"),
                "--no-progress"]
    return build


def _contract_file(tmp_path: Path, run: Path) -> str:
    (tmp_path / "encoder.onnx.json").write_text("{}\n")
    return str(tmp_path / "encoder.onnx.json")


def _truncated_onnx(tmp_path: Path, run: Path) -> str:
    out = deploy.export(run, "onnx", tmp_path / "encoder.onnx")
    out.write_bytes(out.read_bytes()[:200])  # its contract beside it is intact
    return str(out)


def _export_over(name: str):
    def build(tmp_path: Path, run: Path) -> list[str]:
        run = Path(shutil.copytree(run, tmp_path / "run"))
        return ["-q", "export", "--encoder", str(run), "--format", "torchscript", "--out", str(run / name)]
    return build


def _verify_twice(tmp_path: Path, run: Path) -> list[str]:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "verify.json").write_text("[]\n")  # an earlier verification's results
    return ["-q", "verify", "identity", *_sets(TINY), "--task", "g1c0", "--out", str(tmp_path / "v")]


def _train_into(tmp_path: Path, run: Path) -> list[str]:
    _image(tmp_path / "photos" / "holiday.png")
    return ["-q", "train", *_sets(TINY), "--out", str(tmp_path / "photos"), "--no-progress"]


# --------------------------------------------------------------------------- the catalogue

# id: (build(tmp_path, finished_run) -> argv, what the error must say)
CATALOGUE = {
    # image files
    "zero-byte image": (_bad_image("zero_bytes"), r"c1/img002\.png: empty file \(0 bytes\)"),
    "truncated image": (_bad_image("truncated"), r"c1/img002\.png: unreadable image"),
    "non-image file": (_bad_image("not_an_image"), r"c1/img002\.png: unreadable image"),
    "decompression bomb": (_bad_image("bomb"), r"c1/img002\.png: refused as a possible decompression bomb"),
    # paths
    "CSV path escaping the root": (_csv_case("path,category,gender\n", "../outside.png,c0,f\n"),
                                   r"faces\.csv:20: path '\.\./outside\.png' escapes the CSV's folder"),
    "CSV absolute path": (_csv_case("path,category,gender\n", "/etc/hostname,c0,f\n"),
                          r"faces\.csv:20: absolute path '/etc/hostname'"),
    "Places path escaping the root": (_places_case("/a/airfield/../../../../etc/hostname 0\n"),
                                      r"places365_train_standard\.txt:19: path .* escapes the category folder"),
    "CSV duplicated path": (_csv_case("path,category,gender\n", "img/c00.png,c1,m\n"),
                            r"faces\.csv:20: duplicated path 'img/c00\.png' \(also on line 2\)"),
    "Places duplicated path": (_places_case("/a/airfield/00000001.jpg 0\n"),
                               r"places365_train_standard\.txt:19: duplicated path .* \(also on line 1\)"),
    "CSV image file missing": (_csv_case("path,category,gender\n", "img/gone.png,c0,f\n"),
                               r"faces\.csv:20: image file missing: .*img/gone\.png"),
    # labels
    "Places label out of range": (_places_case("/a/airfield/00000099.jpg 999\n"),
                                  r"places365_train_standard\.txt:19: unknown label '999'"),
    "Places label not matching its path": (_places_case("/a/airfield/00000099.jpg 1\n"),
                                           r":19: '/a/airfield/00000099\.jpg' is labelled 1 \(alley\) "
                                           r"but does not lie"),
    # splits and tasks
    "split fraction of 0": (_config_case("data.split=[0.8, 0.2, 0.0]"), r"data\.split leaves a split empty"),
    "split left empty by too few images": (
        lambda tmp_path, run: (_folder(tmp_path, per_category=2), _folder_train(tmp_path))[1],
        r"the val split holds no image for the tasks c0, c1"),
    "task with a single class (attribute)": (
        _csv_case("path,category,gender\n", rows=GOOD_ROWS.replace(",m\n", ",f\n"), private="attribute:gender"),
        r"task 'attribute:gender': attribute 'gender' has a single class \['f'\]"),
    "task with a single class (no negatives)": (
        lambda tmp_path, run: (_folder(tmp_path, categories=("c0",)), _folder_train(tmp_path, desirable=""))[1],
        r"task 'c0': group all has no category other than 'c0'"),
    "task naming no category": (lambda tmp_path, run: (_folder(tmp_path), _folder_train(tmp_path, private="cO"))[1],
                                r"task 'cO': unknown category 'cO'"),
    # CSV structure
    "CSV without the path column": (_csv_case("file,category,gender\n"), r"faces\.csv: no 'path' column"),
    "CSV without the category column named": (_csv_case("path,scene,gender\n", data=("data.category_attribute=place",)),
                                              r"faces\.csv: no column 'place' \(data.category_attribute\)"),
    "CSV empty cell": (_csv_case("path,category,gender\n", "img/c10.png,,f\n"),
                       r"faces\.csv:20: empty cell in column 'category'"),
    "CSV ragged row": (_csv_case("path,category,gender\n", "img/c10.png,c1\n"),
                       r"faces\.csv:20: 2 cells, but the header has 3"),
    "CSV not UTF-8": (_csv_not_utf8, r"faces\.csv: not UTF-8 text"),
    # config
    "config key typo": (_config_case("train.iter=5"), r"unknown key train\.iter; valid keys of \[train\]"),
    "config section typo": (_config_case("trian.iters=5"), r"unknown section 'trian'"),
    "config file not TOML": (_bad_toml, r"mine\.toml: not valid TOML"),
    "negative learning rate": (_config_case("train.encoder_lr=-0.001"), r"train\.encoder_lr must be > 0, got -0\.001"),
    "batch size 0": (_config_case("train.batch_size=0"), r"train\.batch_size must be >= 2"),
    "alpha < 0": (_config_case("train.alpha=-1"), r"train\.alpha must be >= 0, got -1"),
    "wrong value type": (_config_case("train.iters=many"), r"train\.iters must be of type int, got 'many'"),
    # checkpoints and runs
    "checkpoint of another architecture": (_bad_checkpoint("other_architecture"),
                                           r"last\.pt: encoder does not match this architecture: shape mismatches"),
    "truncated checkpoint": (_bad_checkpoint("truncated"), r"last\.pt: not a readable checkpoint \(truncated"),
    "checkpoint with a pickled payload": (_bad_checkpoint("pickled"),
                                          r"last\.pt: refused to load: .*a pickled payload is never executed"),
    "encoder file of another architecture": (_verify_other_architecture,
                                             r"encoder\.pt: encoder does not match this architecture"),
    "resume with a changed --set": (_resume_changed("set"),
                                    r"refusing to resume with a changed config(.|\n)*" + _ALPHA_CHANGE),
    "resume with an edited config.toml": (_resume_changed("edit"),
                                          r"refusing to resume with a changed config"
                                          r"(.|\n)*" + _ALPHA_CHANGE),
    "resume before the first checkpoint": (_resume_without_checkpoint, r"it has no checkpoint yet .*start it again"),
    "new run over an existing one": (_existing_run, r"already holds a training run; use --resume"),
    "new run into a folder of other files": (_train_into, r"photos is not empty and not a training run folder"),
    "resume with --config": (lambda tmp_path, run: ["train", "--resume", str(run), "--config", "paper"],
                             r"--resume continues .* in place with its own config\.toml; drop --config"),
    "resume with --out": (lambda tmp_path, run: ["train", "--resume", str(run), "--out", str(tmp_path / "new")],
                          r"--resume continues .* in place with its own config\.toml; drop --out"),
    "--allow-config-change without --resume": (
        lambda tmp_path, run: ["train", *_sets(TINY), "--out", str(tmp_path / "new"), "--allow-config-change"],
        r"--allow-config-change only applies with --resume"),
    "resume to an end before the checkpoint": (
        lambda tmp_path, run: ["-q", "train", "--resume", str(shutil.copytree(run, tmp_path / "run")),
                               "--set", "train.iters=2", "--allow-config-change"],
        r"cannot resume .*run to end at step 5: its checkpoint is at step 9 already"),
    # devices
    "unknown train.device": (lambda tmp_path, run: ["-q", "train", *_sets(TINY), "--out", str(tmp_path / "new"),
                                                    "--device", "gpu"],
                             r"train\.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    "unknown verify --device": (lambda tmp_path, run: ["-q", "verify", "identity", *_sets(TINY), "--task", "g1c0",
                                                       "--out", str(tmp_path / "v"), "--device", "gpu"],
                                r"unknown device 'gpu'; use auto"),
    # what verify, grid and export are given
    "grid encoders sharing a cell name": (_same_named_runs, r"and '.*a/run' share the cell name 'run'"),
    "verify a folder that is not a run": (_verify(lambda tmp_path, run: str(tmp_path)),
                                          r"is not a training run folder \(no encoder\.pt inside\)"),
    "verify a run that does not exist": (_verify(lambda tmp_path, run: str(tmp_path / "nope")),
                                         r"'.*nope': no such run folder or file; give a training run folder"),
    "verify an export's contract": (_verify(_contract_file), r"encoder\.onnx\.json' is an export's input contract, "
                                                             r"not an encoder: give the exported file beside it"),
    "verify a truncated ONNX export": (_verify(_truncated_onnx), r"encoder\.onnx: not a loadable ONNX file"),
    "export over the run's config": (_export_over("config.toml"),
                                     r"refusing to overwrite .*config\.toml: it is not an earlier torchscript export"),
    "export over a checkpoint": (_export_over("checkpoints/last.pt"), r"refusing to overwrite .*last\.pt"),
    # output folders
    "verify into a folder with results": (_verify_twice, r"already holds verification results .*verify\.json"),
    "verify into a training run folder": (
        lambda tmp_path, run: ["-q", "verify", "identity", *_sets(TINY), "--task", "g1c0", "--out",
                               str(shutil.copytree(run, tmp_path / "run"))],
        r"run is a training run folder; give verify an output folder of its own"),
    "report into a training run folder": (
        lambda tmp_path, run: ["-q", "report", str(run), "--out", str(shutil.copytree(run, tmp_path / "run"))],
        r"run is a training run folder; give report an output folder of its own"),
    "grid into a training run folder": (
        lambda tmp_path, run: ["-q", "grid", "--encoders", "identity", "--tasks", "g1c0", *_sets(TINY), "--out",
                               str(shutil.copytree(run, tmp_path / "run"))],
        r"run is a training run folder; give grid an output folder of its own"),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_is_one_clear_error(case, tmp_path, finished_run, capsys):
    build, pattern = CATALOGUE[case]
    argv = build(tmp_path, finished_run)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "privenc: error: " in err, err
    message = err[err.index("privenc: error: "):]
    assert re.search(pattern, message), message
    assert not (tmp_path / "new" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "payload-ran").exists()  # the pickled payload never ran


def test_resume_with_a_changed_config_is_allowed_explicitly_with_the_difference_listed(finished_run, tmp_path, caplog):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    caplog.set_level("WARNING", logger="privenc")
    assert main(["-q", "train", "--resume", str(run), "--set", "train.iters=7", "--allow-config-change",
                 "--no-progress"]) == 0
    assert "train.iters: 6 -> 7" in caplog.text
    assert "iters = 7" in (run / "config.toml").read_text()
    assert ckpt.load(run / "checkpoints" / "last.pt")["step"] == 10


def test_unreadable_images_are_skipped_counted_and_reported_when_allowed(tmp_path, caplog):
    from privenc.data import prepare

    root = _folder(tmp_path)
    (root / "c1" / "img002.png").write_bytes(b"")
    _bomb_png(root / "c2" / "img004.png")
    config = load_config("demo", [*TINY, "data.source=folder", f"data.root={root}", "data.skip_bad_images=true"])
    data = prepare(config.data, ["c0", "c1"])
    data.write(tmp_path / "run")
    assert data.bad_images == ["c1/img002.png", "c2/img004.png"]
    assert (tmp_path / "run" / "bad_images.txt").read_text().split() == data.bad_images
    assert '"bad_images": 2' in (tmp_path / "run" / "tasks.json").read_text()
    assert "2 of 18 images are unreadable and left out" in caplog.text
    used = {data.source.ids[i] for split in data.indices.values() for i in split}
    assert not used & set(data.bad_images)


def test_resume_may_move_a_run_to_another_device(finished_run, tmp_path, capsys):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    assert main(["-q", "train", "--resume", str(run), "--device", "cpu", "--no-progress"]) == 0, capsys.readouterr().err


def test_a_demo_rerun_with_another_config_does_not_reuse_its_encoders(finished_run, tmp_path, capsys):
    # finished_run is the demo's label-flip encoder at the TINY settings; asked for another alpha,
    # the demo must not report it under the new settings.
    demo = tmp_path / "demo"
    shutil.copytree(finished_run, demo / "runs" / "label_flip")
    code = main(["-q", "demo", "--out", str(demo), *_sets([*TINY, f"train.alpha={OTHER_ALPHA}"]), "--jobs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "label_flip was trained with another config" in err
    assert f"train.alpha: {DEMO_ALPHA} -> {OTHER_ALPHA}" in err
    assert not (demo / "runs" / "standard_gan").exists() and not (demo / "grid").exists()


def test_verify_says_which_settings_a_trained_encoder_replaces(finished_run, tmp_path, caplog):
    caplog.set_level("WARNING", logger="privenc")
    verify_sets = [s for s in TINY if s.startswith("verify.")]
    assert main(["-q", "verify", str(finished_run), *_sets([*verify_sets, "classifier.stages=[[16], [16]]"]),
                 "--task", "g1c0", "--out", str(tmp_path / "v"), "--no-progress"]) == 0
    warning = next(r.getMessage() for r in caplog.records if "ignored for the trained encoders" in r.getMessage())
    assert "classifier.stages=[[16], [16]]" in warning and "verify.max_iters" not in warning


def test_verify_of_a_run_uses_the_runs_own_verification_settings_and_tasks(finished_run, tmp_path, capsys, caplog):
    # A run trained with one protocol is verified by that protocol unless --config says otherwise
    # (it used to get the demo preset's, silently); verify.tasks chooses the tasks.
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    config = load_config(str(run / "config.toml"), ["verify.lr=0.0042", "verify.attackers=[\"linear\"]",
                                                     "verify.tasks=[\"g1c2\"]"])
    (run / "config.toml").write_text(config.to_toml())
    assert main(["-q", "verify", str(run / "encoder.pt"), "--out", str(tmp_path / "v"), "--no-progress"]) == 0
    records = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert [(r["task"], r["attacker"], r["lr"], r["encoder"]) for r in records] == [("g1c2", "linear", 0.0042, "run")]
    other = Path(shutil.copytree(run, tmp_path / "other"))
    (other / "config.toml").write_text(load_config(str(run / "config.toml"), ["verify.lr=0.003"]).to_toml())
    caplog.set_level("WARNING", logger="privenc")
    assert main(["-q", "grid", "--encoders", str(run), "identity", str(other), "--out", str(tmp_path / "g")]) == 0
    assert "other was trained with other verification settings" in caplog.text
    assert "verify.lr: 0.003 -> 0.0042" in caplog.text
    cells = sorted(p.name for p in (tmp_path / "g" / "cells").iterdir())
    assert cells == ["identity__g1c2", "other__g1c2", "run__g1c2"]  # the baseline on the run's data and tasks
    identity = json.loads((tmp_path / "g" / "cells" / "identity__g1c2" / "verify.json").read_text())
    assert identity[0]["attacker"] == "linear" and identity[0]["n_test"] == records[0]["n_test"]


def test_an_encoder_is_named_after_its_run_however_it_is_given(finished_run, tmp_path, monkeypatch, capsys):
    from privenc.encoders import encoder_name, run_folder_of

    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    monkeypatch.chdir(run)
    assert encoder_name(".") == encoder_name("encoder.pt") == encoder_name(f"{run}/") == "run"
    shutil.copy(run / "encoder.pt", run / "from_elsewhere.pt")  # a file copied in is not that run's encoder
    assert run_folder_of("from_elsewhere.pt") is None and encoder_name("from_elsewhere.pt") == "from_elsewhere.pt"
    assert main(["-q", "grid", "--encoders", str(run), f"{run}/", "--tasks", "g1c0", "--out", str(tmp_path / "g")]) == 2
    assert "is listed twice" in capsys.readouterr().err
    # A config.toml that cannot be read is named, not only its bad key.
    (run / "config.toml").write_text((run / "config.toml").read_text() + "future_key = 1\n")
    assert main(["-q", "verify", "encoder.pt", "--out", str(tmp_path / "v")]) == 2
    assert f"{run / 'config.toml'}: unknown key verify.future_key" in capsys.readouterr().err


def test_resume_accepts_changed_verification_settings(finished_run, tmp_path, capsys):
    # They do not change what training computes; verify reads them from config.toml.
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    assert main(["-q", "train", "--resume", str(run), "--set", "verify.max_iters=20", "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert load_config(str(run / "config.toml")).verify.max_iters == 20


def test_a_run_stopped_before_its_config_was_written_may_be_started_again(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # what train() creates before config.toml
    (run / "checkpoints" / ".last.pt.1234.tmp").write_bytes(b"")
    assert main(["-q", "train", *_sets(TINY), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err


@pytest.mark.slow
def test_a_grid_takes_an_encoder_file_and_checks_tasks_against_the_data_its_cells_use(finished_run, tmp_path, capsys):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    loose = tmp_path / "loose" / "encoder.pt"
    loose.parent.mkdir()
    shutil.copy(run / "encoder.pt", loose)
    grid = tmp_path / "grid"
    # An encoder file alone brings no config.toml: its cells use the grid's data, where g9c9 does not exist.
    assert main(["-q", "grid", "--encoders", str(loose), "--tasks", "g1c0", "g9c9", *_sets(TINY),
                 "--out", str(grid)]) == 2
    assert "task 'g9c9': unknown category" in capsys.readouterr().err and not grid.exists()
    # ... and that data must have the encoder's input size.
    assert main(["-q", "grid", "--encoders", str(loose), "--tasks", "g1c0",
                 *_sets([*TINY, "data.image_size=48", "data.load_size=52"]), "--out", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "takes 16x16 images, but the data config gives 48" in err and "Traceback" not in err
    # A run folder's cells use the run's own data: here a folder source with categories c0, c1, c2.
    _folder(tmp_path)
    folder_run = tmp_path / "folder-run"
    assert main(["-q", "train", *_sets([*TINY, "data.source=folder", f"data.root={tmp_path / 'folder'}",
                                        "train.private=c0", "train.desirable=c1"]),
                 "--out", str(folder_run), "--no-progress"]) == 0
    for given in (folder_run, folder_run / "encoder.pt"):  # the run's encoder.pt is that run
        assert main(["-q", "grid", "--encoders", str(given), "--tasks", "g1c0", *_sets(TINY), "--out", str(grid)]) == 2
        assert "task 'g1c0': unknown category" in capsys.readouterr().err and not grid.exists()
    assert main(["-q", "grid", "--encoders", str(run / "encoder.pt"), str(loose), "--tasks", "g1c0", *_sets(TINY),
                 "--out", str(grid)]) == 0
    assert {p.name for p in (grid / "cells").iterdir()} == {"run__g1c0", "encoder.pt__g1c0"}


def test_failed_verify_and_report_remove_the_folders_they_created(finished_run, tmp_path, capsys):
    assert main(["-q", "verify", "identity", *_sets(TINY), "--task", "nosuch", "--out", str(tmp_path / "v")]) == 2
    assert main(["-q", "report", str(tmp_path / "nope"), "--out", str(tmp_path / "a" / "b" / "r")]) == 2
    assert "unknown category 'nosuch'" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() and not (tmp_path / "a").exists()


def test_an_export_killed_before_its_file_is_written_can_be_run_again(finished_run, tmp_path, monkeypatch):
    from privenc import atomic
    from privenc.deploy import formats

    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    real, writes = atomic.atomic_write_bytes, []

    def killed(path, data):  # the first of export's two files is written, then the process dies
        writes.append(path)
        if len(writes) > 1:
            raise KeyboardInterrupt
        real(path, data)

    # every write of export: the contract (text, through atomic_write_text) and the file itself
    monkeypatch.setattr(atomic, "atomic_write_bytes", killed)
    monkeypatch.setattr(formats, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        deploy.export(run, "torchscript")
    assert len(writes) == 2
    monkeypatch.setattr(atomic, "atomic_write_bytes", real)
    monkeypatch.setattr(formats, "atomic_write_bytes", real)
    assert main(["-q", "export", "--encoder", str(run), "--format", "torchscript"]) == 0
    assert (run / "encoder.torchscript.pt").is_file()


def test_quiet_also_between_data_and_inspect():
    from privenc.cli import build_parser

    assert build_parser().parse_args(["data", "-q", "inspect"]).quiet is True


@pytest.mark.slow
def test_a_csv_of_attributes_alone_trains_with_unknown_values_left_out(tmp_path, capsys):
    # path,gender,age with some ages unknown: the first attribute column draws the splits, and
    # the images in the run for gender whose age is unknown take no part in the age losses.
    rows = "".join(f"img/{i:02d}.png,{'fm'[i % 2]},{('young', 'old', '')[i % 3]}\n" for i in range(30))
    path = _csv(tmp_path, "path,gender,age\n" + rows, tuple(f"img/{i:02d}.png" for i in range(30)))
    argv = _train(tmp_path, ["data.source=csv", f"data.root={path}"], private="attribute:gender",
                  desirable="attribute:age")
    assert main(argv) == 0, capsys.readouterr().err
    metrics = (tmp_path / "new" / "metrics.jsonl").read_text()
    assert "NaN" not in metrics and (tmp_path / "new" / "encoder.pt").exists()


@pytest.mark.slow
def test_steps_without_a_known_label_are_left_out_of_the_logged_accuracy(tmp_path, capsys):
    # Age is known for 4 of 30 images: most batches of 4 hold none. Their accuracy is NaN, which
    # must neither stop training as a non-finite value nor reach metrics.jsonl.
    rows = "".join(f"img/{i:02d}.png,{'fm'[i % 2]},{('young', 'old')[i % 2] if i < 4 else ''}\n" for i in range(30))
    path = _csv(tmp_path, "path,gender,age\n" + rows, tuple(f"img/{i:02d}.png" for i in range(30)))
    argv = _train(tmp_path, ["data.source=csv", f"data.root={path}", "train.batch_size=4", "train.log_every=9"],
                  private="attribute:gender", desirable="attribute:age")
    assert main(argv) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "new" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["desirable_train_acc"] for r in records if "desirable_train_acc" in r]
    assert all(0.0 <= a <= 1.0 for a in logged)


def test_logged_means_leave_out_the_steps_without_a_known_label() -> None:
    from privenc.training import add_to_running_sums, logged_values

    sums, counts = {}, {}
    for accuracy in (float("nan"), 1.0, float("nan"), 0.0):
        add_to_running_sums(sums, counts, logged_values({"desirable_train_acc": torch.tensor(accuracy),
                                                         "encoder_loss": torch.tensor(2.0)}))
    assert sums["desirable_train_acc"] / counts["desirable_train_acc"] == 0.5  # counting NaN steps as 0: 0.25
    assert counts["encoder_loss"] == 4


def test_the_accuracy_of_a_batch_without_a_known_label_is_nan() -> None:
    from privenc.adversarial import _accuracy

    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    assert _accuracy(logits, torch.tensor([0, 0, -1])).item() == 0.5
    assert _accuracy(logits, torch.tensor([-1, -1, -1])).isnan()
