"""The embedded synthetic scenes: determinism, bookkeeping, and that every cue is drawn as designed."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from privenc.data.synthetic import (
    _SDF,
    ASSIGNMENT,
    BUILTIN_GROUPS,
    CUE_PROBABILITY,
    CUE_TYPES,
    GENERATOR_VERSION,
    LAYOUTS,
    PALETTES,
    TEXTURES,
    VOCABULARY,
    SyntheticSource,
    cue_values,
)
from privenc.errors import DataError


@pytest.fixture(scope="module")
def small() -> SyntheticSource:
    return SyntheticSource(size=24, per_category=6, seed=3)


def test_shapes_ids_and_attributes(small):
    images = small.generate_all()
    n = 16 * 6
    assert images.shape == (n, 24, 24, 3) and images.dtype == np.uint8
    assert len(small) == len(small.ids) == n
    assert small.ids[0] == "synthetic/g1c0/000000" and small.ids[-1] == "synthetic/g2c7/000005"
    assert len(set(small.ids)) == n
    assert small.groups == BUILTIN_GROUPS
    assert sorted(small.groups) == ["g1", "g2"] and all(len(c) == 8 for c in small.groups.values())
    for key, values in small.attributes.items():
        assert len(values) == n, key
    for i, image_id in enumerate(small.ids):
        category = small.attributes["category"][i]
        assert image_id.split("/")[1] == category
        assert category in small.groups[small.attributes["group"][i]]
    counts = {c: small.attributes["category"].count(c) for c in small.categories}
    assert set(counts.values()) == {6}
    assert images.std() > 20  # not blank


def test_deterministic_given_seed(small):
    again = SyntheticSource(size=24, per_category=6, seed=3).generate_all()
    np.testing.assert_array_equal(small.generate_all(), again)
    other = SyntheticSource(size=24, per_category=6, seed=4).generate_all()
    assert (other != again).mean() > 0.5


def test_load_equals_generate_all(small):
    images = small.generate_all()
    for i in range(len(small)):
        np.testing.assert_array_equal(small.load(i), images[i])
    # batching and chunking do not change an image
    np.testing.assert_array_equal(small.generate([5, 70, 3], chunk=2), images[[5, 70, 3]])
    np.testing.assert_array_equal(np.stack(small.load_many([9, 1])), images[[9, 1]])


def test_images_depend_only_on_seed_category_index():
    full = SyntheticSource(size=20, per_category=5, seed=1)
    sub = SyntheticSource(size=20, per_category=3, seed=1, groups={"mix": ["g2c4", "g1c1"]})
    assert sub.categories == ["g2c4", "g1c1"] and sub.ids[0] == "synthetic/g2c4/000000"
    images = full.generate_all()
    for i, image_id in enumerate(sub.ids):
        np.testing.assert_array_equal(sub.load(i), images[full.ids.index(image_id)])
        assert sub.attributes["palette"][i] == full.attributes["palette"][full.ids.index(image_id)]


def test_unknown_category_or_empty_group_is_an_error():
    with pytest.raises(DataError, match="g3c0"):
        SyntheticSource(groups={"g1": ["g1c0", "g3c0"]})
    with pytest.raises(DataError, match="empty"):
        SyntheticSource(groups={"g1": []})
    with pytest.raises(DataError, match="cue type"):
        SyntheticSource(per_category=1).generate([0], cues=["smell"])


def test_fingerprint_tracks_everything_that_changes_pictures():
    base = SyntheticSource(size=20, per_category=4, seed=0)
    assert f"v{GENERATOR_VERSION}" in base.fingerprint()
    variants = [SyntheticSource(size=24, per_category=4, seed=0), SyntheticSource(size=20, per_category=5, seed=0),
                SyntheticSource(size=20, per_category=4, seed=1),
                SyntheticSource(size=20, per_category=4, seed=0, groups={"a": ["g1c0", "g1c1"]})]
    prints = {base.fingerprint()} | {v.fingerprint() for v in variants}
    assert len(prints) == 5
    assert SyntheticSource(size=20, per_category=4, seed=0).fingerprint() == base.fingerprint()


def test_cue_values_are_injective_within_a_group_and_shared_across_groups():
    for group, categories in BUILTIN_GROUPS.items():
        values = np.array([cue_values(c) for c in categories])  # (category, cue type)
        for t, cue in enumerate(CUE_TYPES):
            assert sorted(values[:, t]) == list(range(len(VOCABULARY[cue]))), (group, cue)
    # both groups use the same vocabularies, paired differently
    assert ASSIGNMENT["g1"] != ASSIGNMENT["g2"]
    assert not set(ASSIGNMENT["g1"]) & set(ASSIGNMENT["g2"])


def test_no_two_categories_are_confusable_in_several_cues():
    """Neighbouring values (one step on the circle of orientations, hues or directions) are easy
    to confuse; no pair of categories may be neighbours in two cue types, and similar shapes never
    come with neighbouring textures (else one noisy cue would decide between them)."""
    similar_shapes = {frozenset(p) for p in
                      [("disk", "square"), ("disk", "ring"), ("square", "ring"), ("plus", "cross")]}
    for group, rows in ASSIGNMENT.items():
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                neighbours = [min((a[t] - b[t]) % 8, (b[t] - a[t]) % 8) <= 1 for t in (1, 2, 3)]
                assert sum(neighbours) <= 1, (group, a, b)
                if frozenset((VOCABULARY["shape"][a[0]], VOCABULARY["shape"][b[0]])) in similar_shapes:
                    assert not neighbours[0], (group, a, b)


def test_vocabulary_shapes_have_nearly_equal_ink():
    """A blurred image must not reveal the shape through the amount of dark pixels."""
    u = np.linspace(-1.6, 1.6, 401, dtype=np.float32)
    areas = [(sdf(u[None, :], u[:, None]) < 0).mean() * 3.2**2 for sdf in _SDF[: len(VOCABULARY["shape"])]]
    assert max(areas) / min(areas) < 1.35


def test_cue_presence_statistics():
    source = SyntheticSource(size=8, per_category=300, seed=0)
    present = np.array([[v != "none" for v in source.attributes[cue]] for cue in CUE_TYPES]).T  # (N, cue)
    assert present.any(axis=1).all()  # every image shows at least one cue
    for t, cue in enumerate(CUE_TYPES):
        assert abs(present[:, t].mean() - CUE_PROBABILITY) < 0.02, cue
        expected = [VOCABULARY[cue][cue_values(c)[t]] for c in source.attributes["category"]]
        shown = np.array(source.attributes[cue])
        assert (shown[present[:, t]] == np.array(expected)[present[:, t]]).all()
    # presence is independent across cue types (up to the "at least one" rule)
    both = (present[:, 0] & present[:, 1]).mean()
    assert abs(both - CUE_PROBABILITY**2) < 0.02


def test_forcing_cues_changes_only_those_cues(small):
    images = small.generate_all()
    everything = small.generate_all(cues=CUE_TYPES)
    all_present = np.array([all(small.attributes[c][i] != "none" for c in CUE_TYPES) for i in range(len(small))])
    assert all_present.sum() > 20
    np.testing.assert_array_equal(everything[all_present], images[all_present])
    nothing = small.generate_all(cues=[])
    for cue in CUE_TYPES:
        single = small.generate_all(cues=[cue])
        changed = (np.abs(single.astype(int) - nothing).max(axis=3) > 8).mean(axis=(1, 2))
        assert (changed > 0.02).all(), cue  # every image visibly shows the forced cue


def _cue_only(category: str, cue: str, n: int = 40, size: int = 36) -> np.ndarray:
    source = SyntheticSource(size=size, per_category=n, seed=0, groups={"one": [category]})
    return source.generate_all(cues=[cue]).astype(float) / 255.0


@pytest.mark.parametrize("category", ["g1c1", "g2c6"])
def test_texture_cue_is_a_grating_at_the_category_orientation(category):
    images = _cue_only(category, "texture").mean(axis=3)  # (n, S, S) luminance
    power = (np.abs(np.fft.fft2(images - images.mean(axis=(1, 2), keepdims=True))) ** 2).mean(axis=0)
    freq = np.fft.fftfreq(images.shape[1])
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    power[np.hypot(fx, fy) < 0.1] = 0  # ignore the low-frequency nuisance
    ky, kx = np.unravel_index(power.argmax(), power.shape)
    angle = np.degrees(np.arctan2(fy[ky, kx], fx[ky, kx])) % 180
    expected = 22.5 * cue_values(category)[1]
    assert TEXTURES[cue_values(category)[1]] == f"{expected:g}deg"
    assert min(abs(angle - expected), 180 - abs(angle - expected)) < 12


@pytest.mark.parametrize("category", ["g1c0", "g1c3", "g2c5"])
def test_palette_cue_sets_the_mean_hue(category):
    mean_rgb = _cue_only(category, "palette").mean(axis=(0, 1, 2))
    hue = colorsys.rgb_to_hsv(*mean_rgb)[0]
    expected = cue_values(category)[2] / len(PALETTES)
    assert min(abs(hue - expected), 1 - abs(hue - expected)) < 0.05


@pytest.mark.parametrize("category", ["g1c2", "g2c1"])
def test_layout_cue_brightens_towards_its_direction(category):
    mean = _cue_only(category, "layout", n=60).mean(axis=(0, 3))  # (S, S)
    u = np.arange(mean.shape[0]) - (mean.shape[0] - 1) / 2
    gx, gy = (mean * u[None, :]).sum(), (mean * u[:, None]).sum()  # y points down
    angle = np.degrees(np.arctan2(gy, gx)) % 360
    expected = 45.0 * cue_values(category)[3]
    assert LAYOUTS[cue_values(category)[3]].startswith("bright-")
    assert min(abs(angle - expected), 360 - abs(angle - expected)) < 20
