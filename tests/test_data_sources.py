"""Image decoding and the three file sources (Places-365 layout, class folders, CSV manifest),
including every bad-input case: each error must name the file, line, column or category."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privenc.config import PLACES_GROUPS
from privenc.data.folder import FolderSource
from privenc.data.images import read_image, resize_square
from privenc.data.manifest import CsvSource
from privenc.data.places365 import Places365Source
from privenc.data.tasks import parse_task, select
from privenc.errors import DataError

MINI = Path(__file__).resolve().parents[2] / "shared/data/places365-mini"
needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason=f"places365-mini not found at {MINI}")


def write_image(path: Path, size: tuple[int, int] = (12, 10), color=(200, 30, 40), mode: str = "RGB") -> Path:
    """A tiny solid image; the format follows the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    ("mode", "color", "suffix", "expected"),
    [
        ("L", 100, ".png", (100, 100, 100)),
        ("LA", (100, 7), ".png", (100, 100, 100)),
        ("RGBA", (10, 20, 30, 0), ".png", (10, 20, 30)),
        ("1", 1, ".png", (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), ".jpg", (255, 255, 255)),
        ("RGB", (10, 200, 30), ".bmp", (10, 200, 30)),
    ],
)
def test_read_image_converts_modes_to_rgb(tmp_path, mode, color, suffix, expected):
    path = write_image(tmp_path / f"x{suffix}", (7, 5), color, mode)
    image = read_image(path)
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), expected, atol=3)


def test_read_image_palette(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (6, 4), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    assert Image.open(path).mode == "P"
    image = read_image(path)
    assert image.shape == (4, 6, 3)
    np.testing.assert_array_equal(image[0, 0], (0, 128, 255))


def test_read_image_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (8, 4)).save(path, exif=exif)
    assert read_image(path).shape == (8, 4, 3)


def test_read_image_missing(tmp_path):
    with pytest.raises(DataError, match=r"image file missing: .*nope\.jpg"):
        read_image(tmp_path / "nope.jpg")


def test_read_image_zero_bytes(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        read_image(tmp_path / "empty.jpg")


def test_read_image_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not pixels")
    with pytest.raises(DataError, match=r"notes\.jpg: unreadable image"):
        read_image(tmp_path / "notes.jpg")


def test_read_image_truncated(tmp_path):
    path = tmp_path / "cut.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.jpg: unreadable image .*truncated"):
        read_image(path)


@pytest.mark.parametrize("limit", [60, 10])  # warning zone (<= 2x the limit) and error zone
def test_read_image_refuses_decompression_bombs(tmp_path, monkeypatch, limit):
    path = write_image(tmp_path / "bomb.png", (10, 10))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError, match=r"bomb\.png: refused as a possible decompression bomb"):
        read_image(path)


def test_resize_square_center_crops_the_shorter_side():
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    image[:, 30:50] = 255  # a bright central band survives the center crop
    out = resize_square(image, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out[:, 5:15].min() > 200 and out[:, 0].max() < 50
    same = np.ones((20, 20, 3), dtype=np.uint8)
    assert resize_square(same, 20) is same


# --------------------------------------------------------------------------- Places-365 layout

CATEGORIES = ["/a/airfield", "/a/army_base", "/a/arena/hockey", "/b/bar", "/b/beach"]


def fake_places(root: Path, counts: dict[str, int], folder: str = "data_256", extra: str = "") -> Path:
    """The official layout with tiny images: ``counts`` maps '/a/airfield' -> images."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "categories_places365.txt").write_text("".join(f"{c} {k}\n" for k, c in enumerate(CATEGORIES)))
    lines = []
    for category, n in counts.items():
        label = CATEGORIES.index(category)
        for j in range(1, n + 1):
            rel = f"{category}/{j:08d}.jpg"
            lines.append(f"{rel} {label}\n")
            write_image(root / folder / rel.lstrip("/"), (8, 8), (10 * label, 20, 30))
    (root / "places365_train_standard.txt").write_text("".join(lines) + extra)
    return root


GROUPS = {"g": ["airfield", "army_base", "arena/hockey"]}


def test_places_parses_only_group_categories(tmp_path):
    root = fake_places(tmp_path / "p", {"/a/airfield": 3, "/a/army_base": 2, "/a/arena/hockey": 2, "/b/beach": 4})
    source = Places365Source(root, GROUPS)
    assert source.ids[:4] == ["a/airfield/00000001.jpg", "a/airfield/00000002.jpg", "a/airfield/00000003.jpg",
                              "a/army_base/00000001.jpg"]
    assert len(source) == 7  # beach is in no group: not loaded
    assert source.attributes["category"].count("arena/hockey") == 2
    assert source.groups == GROUPS and source.empty_categories == ()
    assert source.load(0).shape == (8, 8, 3)
    assert source.image_path(0) == root / "data_256/a/airfield/00000001.jpg"


def test_places_prefers_data_256_and_falls_back_to_data_large(tmp_path):
    root = fake_places(tmp_path / "p", {"/a/airfield": 2, "/a/army_base": 2}, folder="data_large")
    source = Places365Source(root, {"g": ["airfield", "army_base"]})
    assert source.image_root.name == "data_large" and source.load(0).shape == (8, 8, 3)
    (root / "data_large").rename(root / "elsewhere")
    with pytest.raises(DataError, match="no image folder in .*data_256 or data_large"):
        Places365Source(root, {"g": ["airfield", "army_base"]})


def test_places_missing_root_and_files(tmp_path):
    with pytest.raises(DataError, match=r"Places-365 root .*nowhere does not exist"):
        Places365Source(tmp_path / "nowhere", GROUPS)
    root = fake_places(tmp_path / "p", {"/a/airfield": 1, "/a/army_base": 1})
    (root / "places365_train_standard.txt").unlink()
    with pytest.raises(DataError, match=r"file list missing: .*places365_train_standard\.txt"):
        Places365Source(root, GROUPS)
    (root / "categories_places365.txt").unlink()
    with pytest.raises(DataError, match=r"category list missing: .*categories_places365\.txt"):
        Places365Source(root, GROUPS)


def test_places_malformed_list_line_names_the_line(tmp_path):
    root = fake_places(tmp_path / "p", {"/a/airfield": 2, "/a/army_base": 1}, extra="/a/airfield/x.jpg\n")
    with pytest.raises(DataError, match=r"places365_train_standard\.txt:4: malformed line '/a/airfield/x\.jpg'"):
        Places365Source(root, GROUPS)


def test_places_unknown_label_and_wrong_folder(tmp_path):
    root = fake_places(tmp_path / "p", {"/a/airfield": 2}, extra="/a/airfield/x.jpg 99\n")
    with pytest.raises(DataError, match=r"places365_train_standard\.txt:3: unknown label '99'"):
        Places365Source(root, GROUPS)
    root = fake_places(tmp_path / "q", {"/a/airfield": 2}, extra="/b/bar/x.jpg 1\n")
    with pytest.raises(DataError, match=r":3: '/b/bar/x\.jpg' is labelled 1 \(army_base\)"):
        Places365Source(root, GROUPS)


def test_places_malformed_category_line(tmp_path):
    root = fake_places(tmp_path / "p", {"/a/airfield": 1})
    with open(root / "categories_places365.txt", "a") as f:
        f.write("/c/cafe three\n")
    with pytest.raises(DataError, match=r"categories_places365\.txt:6: malformed line"):
        Places365Source(root, GROUPS)


def test_places_unknown_category_lists_close_matches(tmp_path):
    root = fake_places(tmp_path / "p", {"/a/airfield": 1, "/a/army_base": 1})
    with pytest.raises(DataError, match=r"'arena_hockey' is not a Places-365 category.*did you mean 'arena/hockey'"):
        Places365Source(root, {"g": ["airfield", "arena_hockey"]})


def test_places_category_without_images_is_dropped_then_refused_by_tasks(tmp_path, caplog):
    root = fake_places(tmp_path / "p", {"/a/airfield": 2, "/a/army_base": 2})
    with caplog.at_level(logging.WARNING):
        source = Places365Source(root, GROUPS)
    assert "no images for arena/hockey" in caplog.text
    assert source.groups == {"g": ["airfield", "army_base"]}
    assert source.empty_categories == ("arena/hockey",)
    with pytest.raises(DataError, match=r"task 'arena/hockey': category 'arena/hockey' has no images"):
        parse_task("arena/hockey", source)


def test_places_no_images_for_any_group_category(tmp_path):
    root = fake_places(tmp_path / "p", {"/b/beach": 2})
    with pytest.raises(DataError, match=r"places365_train_standard\.txt lists no images for any group category"):
        Places365Source(root, GROUPS)


def test_places_missing_image_file_names_file_and_line(tmp_path):
    root = fake_places(tmp_path / "p", {"/a/airfield": 3, "/a/army_base": 1})
    (root / "data_256/a/airfield/00000002.jpg").unlink()
    with pytest.raises(DataError, match=r"image file missing: .*a/airfield/00000002\.jpg .*train_standard\.txt:2\)"):
        Places365Source(root, GROUPS)
    # Without the check, the missing file surfaces (by name) when it is loaded.
    source = Places365Source(root, GROUPS, check_files=False)
    with pytest.raises(DataError, match=r"image file missing: .*00000002\.jpg"):
        source.load(1)


def test_places_fingerprint_follows_list_file_and_categories(tmp_path):
    root = fake_places(tmp_path / "p", {"/a/airfield": 2, "/a/army_base": 2, "/a/arena/hockey": 1})
    first = Places365Source(root, GROUPS).fingerprint()
    assert Places365Source(root, GROUPS).fingerprint() == first
    assert Places365Source(root, {"g": ["airfield", "army_base"]}).fingerprint() != first
    list_file = root / "places365_train_standard.txt"
    os.utime(list_file, ns=(1, list_file.stat().st_mtime_ns + 10**9))
    assert Places365Source(root, GROUPS).fingerprint() != first


@needs_mini
def test_places_mini_group1():
    source = Places365Source(MINI, {"group1": PLACES_GROUPS["group1"]})
    categories = source.attributes["category"]
    assert len(source) == 1000 + 9 * 100
    assert categories.count("airfield") == 1000 and categories.count("arena/hockey") == 100
    assert source.ids[0] == "a/airfield/00000001.jpg"
    assert source.load(0).shape == (256, 256, 3)
    task = parse_task("army_base", source)
    chosen = select(task, source, np.arange(len(source)), seed=0)
    labels = task.labels(source, chosen)
    assert labels.sum() == 100 and len(chosen) == 200  # balanced 50/50
    negatives = [categories[i] for i in chosen[labels == 0]]
    assert sorted(set(negatives)) == sorted(set(PLACES_GROUPS["group1"]) - {"army_base"})
    assert max(negatives.count(c) for c in set(negatives)) <= 12  # 100 over 9 categories


@needs_mini
def test_places_mini_default_groups_drop_the_absent_categories(caplog):
    with caplog.at_level(logging.WARNING):
        source = Places365Source(MINI)
    assert set(source.empty_categories) == {"auto_showroom", "atrium/public", "auto_factory"}
    assert len(source.groups["group2"]) == 7 and len(source.groups["group1"]) == 10
    assert "auto_showroom" in caplog.text
    with pytest.raises(DataError, match="'auto_showroom' has no images"):
        parse_task("auto_showroom", source)


# --------------------------------------------------------------------------- class folders


def make_tree(root: Path, counts: dict[str, int]) -> Path:
    for category, n in counts.items():
        for j in range(n):
            write_image(root / category / f"{j:03d}.png", (9, 7), (j * 20 % 255, 50, 90))
    return root


def test_folder_source(tmp_path, caplog):
    root = make_tree(tmp_path / "t", {"cat": 2, "dog": 3})
    write_image(root / "dog" / "puppies" / "p.jpg")  # nested: still a dog
    (root / "dog" / "notes.txt").write_text("ignored")
    (root / "cat" / ".hidden.png").write_bytes(b"")
    (root / "empty").mkdir()
    write_image(root / "stray.png")
    with caplog.at_level(logging.WARNING):
        source = FolderSource(root)
    assert source.ids == ["cat/000.png", "cat/001.png", "dog/000.png", "dog/001.png", "dog/002.png",
                          "dog/puppies/p.jpg"]
    assert source.attributes["category"] == ["cat"] * 2 + ["dog"] * 4
    assert source.groups == {"all": ["cat", "dog"]} and source.empty_categories == ("empty",)
    assert "stray" not in " ".join(source.ids) and "belong to no category" in caplog.text
    assert source.load(5).shape == (10, 12, 3)


def test_folder_source_groups_and_errors(tmp_path):
    root = make_tree(tmp_path / "t", {"cat": 1, "dog": 1, "cow": 1})
    assert FolderSource(root, {"pets": ["cat", "dog"]}).groups == {"pets": ["cat", "dog"]}
    with pytest.raises(DataError, match=r"group 'pets': unknown category 'dgo' .*did you mean 'dog'"):
        FolderSource(root, {"pets": ["cat", "dgo"]})
    with pytest.raises(DataError, match=r"image folder root .*absent does not exist"):
        FolderSource(tmp_path / "absent")
    (tmp_path / "bare" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images found under .*bare"):
        FolderSource(tmp_path / "bare")


def test_folder_fingerprint_follows_files(tmp_path):
    root = make_tree(tmp_path / "t", {"cat": 2, "dog": 2})
    first = FolderSource(root).fingerprint()
    assert FolderSource(root).fingerprint() == first
    write_image(root / "cat" / "000.png", (9, 7), (1, 2, 3))
    os.utime(root / "cat" / "000.png", ns=(1, 10**18))
    assert FolderSource(root).fingerprint() != first


# --------------------------------------------------------------------------- CSV manifest


def make_csv(root: Path, text: str, images: tuple[str, ...] = ("a.jpg", "b.jpg", "c.jpg", "sub/d.png")) -> Path:
    for name in images:
        write_image(root / name)
    path = root / "faces.csv"
    path.write_text(text)
    return path


def test_csv_source(tmp_path):
    csv_path = make_csv(tmp_path, "path,gender,age\na.jpg,f,young\nb.jpg , m ,\n./sub/d.png,f,old\n")
    source = CsvSource(csv_path, "gender")
    assert source.ids == ["a.jpg", "b.jpg", "sub/d.png"]
    assert source.attributes["gender"] == ["f", "m", "f"] and source.attributes["category"] == ["f", "m", "f"]
    assert source.attributes["age"] == ["young", "", "old"]  # empty = unknown, allowed outside path/category
    assert source.groups == {"all": ["f", "m"]}
    assert source.load(2).shape == (10, 12, 3)
    task = parse_task("attribute:age", source)
    assert task.classes == ("old", "young")
    assert task.labels(source, np.arange(3)).tolist() == [1, -1, 0]


def test_csv_without_a_category_column_draws_categories_from_its_first_attribute(tmp_path, caplog):
    caplog.set_level("INFO")
    csv_path = make_csv(tmp_path, "path,gender,age\na.jpg,f,young\nb.jpg,m,\nc.jpg,f,old\n")
    source = CsvSource(csv_path)  # data.category_attribute left at "category"
    assert source.attributes["category"] == ["f", "m", "f"] and source.groups == {"all": ["f", "m"]}
    assert "first attribute column, 'gender'" in caplog.text
    with pytest.raises(DataError, match=r"faces\.csv:3: empty cell in column 'age' \(the category column"):
        CsvSource(csv_path, "age")
    make_csv(tmp_path, "path,age,gender\na.jpg,young,f\nb.jpg,,m\n")
    with pytest.raises(DataError, match=r"faces\.csv:3: empty cell in column 'age' \(the CSV has no 'category' "
                                        r"column, so its first attribute column is the category"):
        CsvSource(csv_path)
    make_csv(tmp_path, "path,id,gender\na.jpg,17,f\nb.jpg,18,m\nc.jpg,19,f\n")
    with pytest.raises(DataError, match=r"first attribute column 'id' has a different value on every row"):
        CsvSource(csv_path)


def test_csv_without_path_column(tmp_path):
    csv_path = make_csv(tmp_path, "file,gender\na.jpg,f\n")
    with pytest.raises(DataError, match=r"faces\.csv: no 'path' column; columns are file, gender"):
        CsvSource(csv_path, "gender")


def test_csv_without_the_named_attribute(tmp_path):
    csv_path = make_csv(tmp_path, "path,gender,age\na.jpg,f,1\n")
    with pytest.raises(DataError, match=r"faces\.csv: no column 'scene' .*attribute columns are gender, age"):
        CsvSource(csv_path, "scene")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,gender\na.jpg,f\n,m\n", r"faces\.csv:3: empty cell in column 'path'"),
        ("path,gender\na.jpg,f\nb.jpg,\n", r"faces\.csv:3: empty cell in column 'gender'"),
        ("path,gender\na.jpg,f\nmissing.jpg,m\n", r"faces\.csv:3: image file missing: .*missing\.jpg"),
        ("path,gender\n../a.jpg,f\n", r"faces\.csv:2: path '\.\./a\.jpg' escapes the CSV's folder"),
        ("path,gender\nsub/../../a.jpg,f\n", r"faces\.csv:2: path 'sub/\.\./\.\./a\.jpg' escapes"),
        ("path,gender\n/etc/passwd,f\n", r"faces\.csv:2: absolute path '/etc/passwd'"),
        ("path,gender\na.jpg,f\nb.jpg,m\n./a.jpg,m\n", r"faces\.csv:4: duplicated path '\./a\.jpg' \(also on line 2\)"),
        ("path,gender\na.jpg,f,extra\n", r"faces\.csv:2: 3 cells, but the header has 2"),
        ("path,gender,path\na.jpg,f,b.jpg\n", r"faces\.csv:1: duplicated column\(s\) 'path'"),
        ("path,gender\n", r"faces\.csv: no rows after the header"),
        ("", r"faces\.csv: empty file"),
    ],
)
def test_csv_bad_input(tmp_path, text, message):
    csv_path = make_csv(tmp_path, text)
    with pytest.raises(DataError, match=message):
        CsvSource(csv_path, "gender")


def test_csv_category_column_conflict_and_missing_file(tmp_path):
    csv_path = make_csv(tmp_path, "path,category,gender\na.jpg,x,f\n")
    with pytest.raises(DataError, match=r"has a 'category' column but data\.category_attribute = 'gender'"):
        CsvSource(csv_path, "gender")
    with pytest.raises(DataError, match=r"CSV manifest .*none\.csv does not exist"):
        CsvSource(tmp_path / "none.csv")


def test_csv_missing_file_deferred_without_check(tmp_path):
    csv_path = make_csv(tmp_path, "path,gender\na.jpg,f\ngone.jpg,m\n")
    source = CsvSource(csv_path, "gender", check_files=False)
    with pytest.raises(DataError, match=r"image file missing: .*gone\.jpg"):
        source.load(1)


# --------------------------------------------------------------------------- the scenes and faces presets

SHARED = Path(__file__).resolve().parents[2] / "shared/data"


@pytest.mark.parametrize(("preset", "kind", "folder"), [("scenes", "image folder root", "intel-scenes"),
                                                          ("faces", "CSV manifest", "attributes.csv")])
def test_a_preset_whose_shared_folder_is_absent_says_how_to_set_data_root(tmp_path, monkeypatch, preset, kind, folder):
    from privenc.config import load_config
    from privenc.data import open_source

    monkeypatch.chdir(tmp_path)  # the presets name ../shared/data/..., relative to the current folder
    message = (rf"{kind} \.\./shared/data/.*{folder} does not exist \(relative to the current folder {tmp_path}\); "
               rf"point data.root at it, e\.g\. --set data\.root=/path/to/{folder}")
    with pytest.raises(DataError, match=message):
        open_source(load_config(preset).data)


@pytest.mark.skipif(not (SHARED / "intel-scenes").is_dir(), reason=f"intel-scenes not found under {SHARED}")
def test_scenes_preset_tasks_on_the_real_photos():
    from privenc.config import load_config
    from privenc.data import open_source

    config = load_config("scenes", [f"data.root={SHARED / 'intel-scenes'}"])
    source = open_source(config.data)
    assert len(source) == 17039 and source.groups == {"all": sorted(config.verify.tasks)}
    street = parse_task(config.train.private[0], source)
    assert street.positive == "street" and len(street.negatives) == 5
    assert source.load(0).shape == (96, 96, 3)


@pytest.mark.skipif(not (SHARED / "lfw-faces").is_dir(), reason=f"lfw-faces not found under {SHARED}")
def test_faces_preset_splits_by_person_on_the_real_photos():
    from privenc.config import load_config
    from privenc.data import make_splits, open_source

    config = load_config("faces", [f"data.root={SHARED / 'lfw-faces' / 'attributes.csv'}"])
    source = open_source(config.data)
    for spec in [*config.train.private, *config.train.desirable, *config.verify.tasks]:
        parse_task(spec, source)
    splits = make_splits(source, config.data.split, config.data.seed, group_by=config.data.group_by)
    people = [{source.attributes["person"][i] for i in splits[s].tolist()} for s in ("train", "val", "test")]
    assert sum(map(len, people)) == len(set().union(*people)) == 5605  # nobody in two splits
    for split, share in zip(splits, config.data.split):
        assert abs(len(splits[split]) - share * len(source)) < 10, split
