"""Tasks (parsing, labels, balanced selection, combination) and splits (disjoint, stratified,
deterministic, recorded and read back) on a tiny in-memory source."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter

import numpy as np
import pytest

from privenc.data.base import Source
from privenc.data.manifest import CsvSource
from privenc.data.splits import make_splits, read_splits, split_counts, write_splits
from privenc.data.tasks import Task, combine_tasks, parse_task, select
from privenc.errors import DataError


class FakeSource(Source):
    """``counts`` images per category, laid out category after category; no files."""

    def __init__(self, counts: dict[str, int], groups: dict[str, list[str]], **attributes: list[str]) -> None:
        self.name = "fake"
        self.ids = [f"{c}/{j}" for c, n in counts.items() for j in range(n)]
        self.attributes = {"category": [c for c, n in counts.items() for _ in range(n)], **attributes}
        self.groups = groups

    def load(self, index: int) -> np.ndarray:
        return np.full((4, 4, 3), index % 256, dtype=np.uint8)


def scenes(**extra: list[str]) -> FakeSource:
    counts = {"park": 30, "beach": 100, "forest": 100, "desert": 100, "city": 50, "alone": 5}
    return FakeSource(counts, {"outdoor": ["park", "beach", "forest", "desert"], "solo": ["alone"]}, **extra)


ALL = np.arange(385)


# --------------------------------------------------------------------------- parsing


def test_parse_detect_task():
    task = parse_task(" park ", scenes())
    assert task == Task(name="park", kind="detect", classes=("other", "park"), positive="park",
                        negatives=("beach", "forest", "desert"))
    assert task.num_classes == 2


def test_parse_categorical_task():
    source = scenes(weather=["sun", "rain", ""] * 128 + ["sun"])
    task = parse_task("attribute:weather", source)
    assert task.kind == "categorical" and task.classes == ("rain", "sun") and task.attribute == "weather"
    labels = task.labels(source, np.arange(6))
    assert labels.tolist() == [1, 0, -1, 1, 0, -1]
    assert set(select(task, source, ALL, 0).tolist()) == {i for i in ALL if source.attributes["weather"][i]}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("parc", r"task 'parc': unknown category 'parc'; did you mean 'park'"),
        ("city", r"task 'city': category 'city' is in no group \(groups: outdoor, solo\)"),
        ("alone", r"task 'alone': group solo has no category other than 'alone', so there are no negatives"),
        ("attribute:wether", r"task 'attribute:wether': unknown attribute 'wether'.*did you mean 'weather'"),
        ("attribute:season", r"task 'attribute:season': attribute 'season' has a single class \['winter'\]"),
        ("  ", "empty task name"),
        ("combined:park", r"task 'combined:park': expected combined:<task>\+<task>"),
        ("combined:park+attribute:weather", r"combined tasks must be binary detection tasks; not: attribute:weather"),
        ("combined:park+park", r"combined task names a task twice: park\+park"),
    ],
)
def test_parse_task_errors(spec, message):
    source = scenes(weather=["sun", "rain"] * 192 + ["sun"], season=["winter"] * 385)
    with pytest.raises(DataError, match=message):
        parse_task(spec, source)


def test_empty_category_is_named_as_such():
    source = scenes()
    source.empty_categories = ("glacier",)
    with pytest.raises(DataError, match=r"category 'glacier' has no images"):
        parse_task("glacier", source)


def test_category_in_two_groups_draws_negatives_from_both():
    source = FakeSource({"a": 3, "b": 3, "c": 3}, {"g1": ["a", "b"], "g2": ["c", "a"]})
    assert parse_task("a", source).negatives == ("b", "c")


# --------------------------------------------------------------------------- labels and selection


def test_detect_labels_are_defined_for_every_image():
    source = scenes()
    labels = parse_task("park", source).labels(source, ALL)
    assert labels.dtype == np.int64 and labels.tolist() == [1] * 30 + [0] * 355


def test_detect_selection_is_balanced_and_spread_over_the_group():
    source = scenes()
    task = parse_task("park", source)
    chosen = select(task, source, ALL, seed=3)
    assert chosen.dtype == np.int64 and np.all(np.diff(chosen) > 0)
    labels = task.labels(source, chosen)
    assert labels.sum() == 30 and len(chosen) == 60  # 50/50
    negatives = Counter(source.attributes["category"][i] for i in chosen[labels == 0])
    assert negatives == {"beach": 10, "forest": 10, "desert": 10}  # equal shares, nothing outside the group
    np.testing.assert_array_equal(chosen, select(task, source, ALL, seed=3))  # deterministic
    assert not np.array_equal(chosen, select(task, source, ALL, seed=4))


def test_detect_selection_stays_within_the_given_indices():
    source = scenes()
    subset = np.arange(0, 385, 2)
    chosen = select(parse_task("park", source), source, subset, seed=0)
    assert set(chosen.tolist()) <= set(subset.tolist())


def test_short_categories_hand_their_share_to_the_others():
    source = FakeSource({"p": 31, "x": 2, "y": 50, "z": 50}, {"g": ["p", "x", "y", "z"]})
    chosen = select(parse_task("p", source), source, np.arange(133), seed=0)
    negatives = Counter(source.attributes["category"][i] for i in chosen if source.attributes["category"][i] != "p")
    assert negatives["x"] == 2 and negatives["y"] + negatives["z"] == 29
    assert abs(negatives["y"] - negatives["z"]) <= 1


def test_too_few_negatives_takes_all_and_warns(caplog):
    source = FakeSource({"p": 20, "x": 3, "y": 4}, {"g": ["p", "x", "y"]})
    with caplog.at_level(logging.WARNING):
        chosen = select(parse_task("p", source), source, np.arange(27), seed=0)
    assert len(chosen) == 27 and "only 7 negatives for 20 positives" in caplog.text


def test_combined_task():
    source = scenes()
    park, beach = parse_task("park", source), parse_task("beach", source)
    assert combine_tasks([park]) is park
    both = combine_tasks([park, beach])
    assert both.name == "combined:park+beach" and both.kind == "combined"
    assert both.classes == ("none", "park", "beach") and both.num_classes == 3
    assert parse_task("combined:park+beach", source) == both
    labels = both.labels(source, ALL)
    assert labels.tolist() == [1] * 30 + [2] * 100 + [0] * 255
    chosen = select(both, source, ALL, seed=0)
    union = np.union1d(select(park, source, ALL, 0), select(beach, source, ALL, 0))
    np.testing.assert_array_equal(chosen, union)
    with pytest.raises(DataError, match="no tasks to combine"):
        combine_tasks([])


def test_combined_first_positive_wins():
    source = FakeSource({"a": 2, "b": 2}, {"g": ["a", "b"]})
    a = parse_task("a", source)
    fake_b = Task(name="also_a", kind="detect", classes=("other", "a"), positive="a", negatives=("b",))
    assert combine_tasks([a, fake_b]).labels(source, np.arange(4)).tolist() == [1, 1, 0, 0]


# --------------------------------------------------------------------------- splits


FRACTIONS = [0.7, 0.15, 0.15]


def test_splits_are_disjoint_complete_stratified_and_deterministic():
    source = scenes()
    splits = make_splits(source, FRACTIONS, seed=0)
    assert list(splits) == ["train", "val", "test"]
    together = np.concatenate(list(splits.values()))
    assert len(together) == len(np.unique(together)) == len(source)  # disjoint and complete
    categories = source.attributes["category"]
    for split, share in zip(splits, FRACTIONS):
        counts = Counter(categories[i] for i in splits[split])
        assert counts["beach"] == round(100 * share) and abs(counts["city"] - 50 * share) <= 0.5
        assert counts["alone"] >= 1  # 5 images: still in every split
        assert np.all(np.diff(splits[split]) > 0) and splits[split].dtype == np.int64
    again = make_splits(source, FRACTIONS, seed=0)
    assert all(np.array_equal(splits[s], again[s]) for s in splits)
    other = make_splits(source, FRACTIONS, seed=1)
    assert not np.array_equal(splits["test"], other["test"])


def test_adding_a_category_leaves_the_other_splits_unchanged():
    small = FakeSource({"a": 20, "b": 20}, {"g": ["a", "b"]})
    large = FakeSource({"a": 20, "b": 20, "c": 20}, {"g": ["a", "b", "c"]})
    first, second = make_splits(small, FRACTIONS, 5), make_splits(large, FRACTIONS, 5)
    for s in first:
        np.testing.assert_array_equal(first[s], second[s][second[s] < 40])


def test_split_counts():
    assert split_counts(100, FRACTIONS) == [70, 15, 15]
    assert split_counts(3, FRACTIONS) == [1, 1, 1]
    assert split_counts(10, [0.98, 0.01, 0.01]) == [8, 1, 1]
    assert split_counts(2, FRACTIONS) == [2, 0, 0]
    assert sum(split_counts(17, [0.5, 0.3, 0.2])) == 17


def test_max_per_category_and_exclude():
    source = scenes()
    splits = make_splits(source, FRACTIONS, seed=0, max_per_category=20)
    counts = Counter(source.attributes["category"][i] for s in splits.values() for i in s)
    assert counts["beach"] == 20 and counts["alone"] == 5
    excluded = make_splits(source, FRACTIONS, seed=0, max_per_category=20, exclude=splits["val"][:3])
    assert not set(splits["val"][:3].tolist()) & set(np.concatenate(list(excluded.values())).tolist())


def test_tiny_categories_and_bad_fractions(caplog):
    source = FakeSource({"a": 10, "b": 2}, {"g": ["a", "b"]})
    with caplog.at_level(logging.WARNING):
        splits = make_splits(source, FRACTIONS, seed=0)
    assert set(splits["train"].tolist()) >= {10, 11}
    assert "fewer than 3 images cannot be in every split: b" in caplog.text
    message = r"category 'a' \(10 images\): split fractions \[0\.9, 0\.1, 0\.0\] leave its test split empty"
    with pytest.raises(DataError, match=message):
        make_splits(source, [0.9, 0.1, 0.0], seed=0)
    with pytest.raises(DataError, match="three non-negative numbers summing to 1"):
        make_splits(source, [0.5, 0.5], seed=0)


def test_per_image_splits_are_unchanged_bit_for_bit():
    # The digest of the splits as made before data.group_by existed (commit 3ba3088): without
    # the option, runs keep the splits they had.
    digest = hashlib.sha256()
    for seed in (0, 3):
        for name, indices in make_splits(scenes(), FRACTIONS, seed=seed, max_per_category=90).items():
            digest.update(name.encode())
            digest.update(indices.tobytes())
    assert digest.hexdigest()[:16] == "c633173c1bffefaf"


def people_csv(tmp_path, people: int = 40) -> CsvSource:
    """A CSV of ``people`` persons with 1 to 8 photos each, of one gender each (no files)."""
    rng = np.random.default_rng(1)
    lines = ["path,gender,person"]
    for p in range(people):
        gender = "f" if p % 3 == 0 else "m"
        lines += [f"img/{p}_{k}.jpg,{gender},person{p}" for k in range(int(rng.integers(1, 9)))]
    (tmp_path / "people.csv").write_text("\n".join(lines) + "\n")
    return CsvSource(tmp_path / "people.csv", check_files=False)


def test_group_splits_keep_each_person_in_one_split_near_the_fractions(tmp_path):
    source = people_csv(tmp_path)
    splits = make_splits(source, FRACTIONS, seed=0, group_by="person")
    together = np.concatenate(list(splits.values()))
    assert len(together) == len(np.unique(together)) == len(source)  # disjoint and complete
    people = {s: {source.attributes["person"][i] for i in splits[s].tolist()} for s in splits}
    assert not (people["train"] & people["val"] or people["train"] & people["test"] or people["val"] & people["test"])
    for s, share in zip(splits, FRACTIONS):
        for gender in ("f", "m"):
            n = sum(1 for g in source.attributes["gender"] if g == gender)
            got = sum(1 for i in splits[s].tolist() if source.attributes["gender"][i] == gender)
            assert abs(got - share * n) <= 8, (s, gender, got, share * n)  # within one person's photos
    again = make_splits(source, FRACTIONS, seed=0, group_by="person")
    assert all(np.array_equal(splits[s], again[s]) for s in splits)
    other = make_splits(source, FRACTIONS, seed=1, group_by="person")
    assert not np.array_equal(splits["test"], other["test"])
    assert not np.array_equal(splits["test"], make_splits(source, FRACTIONS, seed=0)["test"])


def test_group_splits_name_a_missing_or_empty_column(tmp_path):
    source = people_csv(tmp_path, people=6)
    with pytest.raises(DataError, match=r"data\.group_by = 'persn': the csv source has no such column; its attributes "
                                        r"are gender, person; did you mean 'person'\?"):
        make_splits(source, FRACTIONS, seed=0, group_by="persn")
    source.attributes["person"][2] = ""
    with pytest.raises(DataError, match=r"image 'img/.*' has no person \(an empty cell\)"):
        make_splits(source, FRACTIONS, seed=0, group_by="person")


def test_group_splits_too_few_groups(tmp_path):
    source = FakeSource({"a": 6}, {"g": ["a"]}, person=["x"] * 3 + ["y"] * 3)
    with pytest.raises(DataError, match=r"2 groups for 6 images leave the \w+ split empty"):
        make_splits(source, FRACTIONS, seed=0, group_by="person")


def test_splits_written_and_read_back(tmp_path):
    source = scenes()
    splits = make_splits(source, FRACTIONS, seed=0)
    write_splits(source, splits, tmp_path)
    assert (tmp_path / "splits" / "val.txt").read_text().splitlines()[0] == source.ids[splits["val"][0]]
    back = read_splits(source, tmp_path)
    assert all(np.array_equal(splits[s], back[s]) for s in splits)


def test_read_splits_errors(tmp_path):
    source = scenes()
    write_splits(source, make_splits(source, FRACTIONS, seed=0), tmp_path)
    with open(tmp_path / "splits" / "test.txt", "a") as f:
        f.write("glacier/0\n")
    lineno = len((tmp_path / "splits" / "test.txt").read_text().splitlines())
    with pytest.raises(DataError, match=rf"test\.txt:{lineno}: image 'glacier/0' is not in this fake source"):
        read_splits(source, tmp_path)
    first = (tmp_path / "splits" / "train.txt").read_text().splitlines()[0]
    (tmp_path / "splits" / "test.txt").write_text(first + "\n")
    with pytest.raises(DataError, match=rf"image '{first}' is in both the train and test splits"):
        read_splits(source, tmp_path)
    (tmp_path / "splits" / "val.txt").unlink()
    with pytest.raises(DataError, match=r"split file missing: .*val\.txt"):
        read_splits(source, tmp_path)
