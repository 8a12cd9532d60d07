"""Config: defaults, presets, overrides, and errors that name the key."""

import dataclasses
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from privenc.config import Config, config_diff, from_dict, load_config, preset_names
from privenc.errors import ConfigError
from privenc.runs import write_config


def test_presets_are_shipped_and_load():
    assert {"demo", "paper", "places-mini", "scenes", "faces"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(name), Config)


def test_the_defaults_name_no_task():
    # Task names belong to a source: a synthetic default would leak into every config without
    # a [train] section (issue 17); presets name their own.
    config = load_config(None, ['data.source="folder"', 'data.root="photos"'])
    assert config.train.private == [] and config.train.desirable == [] and config.verify.tasks == []
    assert all(load_config(name).train.private for name in preset_names())


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    preset = load_config("demo").to_dict()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. an output folder: --config demo still means the preset
    assert load_config("demo").to_dict() == preset
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="'mine' is a folder, not a TOML file; presets: .*demo"):
        load_config("mine")
    (tmp_path / "mine.toml").mkdir()
    with pytest.raises(ConfigError, match="'mine.toml' is a folder"):
        load_config("mine.toml")
    with pytest.raises(ConfigError, match="config file 'absent.toml' does not exist"):
        load_config("absent.toml")


def test_a_key_an_older_run_lacks_counts_as_its_default():
    new = load_config("demo").to_dict()
    old = load_config("demo").to_dict()
    del old["data"]["group_by"]  # a run from before data.group_by: it split per image
    assert config_diff(old, new) == []
    new["data"]["group_by"] = "person"
    assert config_diff(old, new) == ["data.group_by: '' -> 'person'"]


def test_scenes_and_faces_presets_name_the_shared_sets_and_their_tasks():
    scenes, faces = load_config("scenes"), load_config("faces")
    assert (scenes.data.source, scenes.data.root) == ("folder", "../shared/data/intel-scenes")
    assert (scenes.train.private, scenes.train.desirable) == (["street"], ["buildings"])
    assert sorted(scenes.verify.tasks) == ["buildings", "forest", "glacier", "mountain", "sea", "street"]
    assert (faces.data.source, faces.data.root) == ("csv", "../shared/data/lfw-faces/attributes.csv")
    assert (faces.train.private, faces.train.desirable) == (["attribute:gender"], ["attribute:smiling"])
    assert faces.verify.tasks == ["attribute:gender", "attribute:smiling", "attribute:expression"]
    assert faces.data.group_by == "person" and scenes.data.group_by == ""
    assert scenes.data.image_size == faces.data.image_size == 64  # sized for a CPU


def test_paper_preset_holds_the_papers_values():
    config = load_config("paper")
    assert (config.data.image_size, config.train.batch_size) == (224, 128)
    assert config.train.warmup_iters == 5000 and config.train.iters == 860000
    assert config.train.classifier_lr == 1e-4 and config.train.encoder_lr == 1e-4
    assert config.train.encoder_lr_decay == pytest.approx(0.1 ** 0.25)
    assert config.train.encoder_lr_decay_every == 200000
    assert config.train.alpha == 2 ** -4
    assert config.verify.lr == 1e-5 and config.verify.lr_raw == 1e-4


def test_overrides_win_over_the_preset_and_parse_toml_literals():
    config = load_config("demo", ["train.iters=7", "train.encoder_lr=2e-4", "train.private=g1c3",
                                  "train.desirable=[\"g1c1\", \"g1c2\"]", "data.cache=false"])
    assert config.train.iters == 7
    assert config.train.encoder_lr == 2e-4
    assert config.train.private == ["g1c3"]  # a bare string is the one-element list
    assert config.train.desirable == ["g1c1", "g1c2"]
    assert config.data.cache is False


def test_a_wrong_type_in_a_list_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.private must be of type list\[str\], got 3"):
        load_config("demo", ["train.private=3"])
    with pytest.raises(ConfigError, match=r"encoder\.stages\[0\]\[1\] must be of type int"):
        load_config("demo", ["encoder.stages=[[16, \"x\"]]"])


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["train.alpha=1"]).train.alpha == 1.0
    with pytest.raises(ConfigError, match=r"train\.iters must be of type int"):
        load_config(None, ["train.iters=1.5"])


@pytest.mark.parametrize("override, pattern", [
    ("train.itres=5", r"unknown key train\.itres; valid keys of \[train\]: .*iters"),
    ("trian.iters=5", r"unknown section 'trian'; valid: data, encoder"),
    ("train.encoder_lr=-1", r"train\.encoder_lr must be > 0"),
    ("train.batch_size=0", r"train\.batch_size must be >= 2"),
    ("train.alpha=-0.5", r"train\.alpha must be >= 0"),
    ("train.encoder_loss=\"wgan\"", r"train\.encoder_loss = 'wgan' is not valid; choose one of: label_flip"),
    ("encoder.norm=\"group\"", r"encoder\.norm = 'group' is not valid; choose one of: none, batch"),
    ("data.split=[0.9, 0.1, 0.0]", r"data\.split leaves a split empty"),
    ("data.split=[0.5, 0.1, 0.1]", r"data\.split must be three non-negative fractions summing to 1"),
    ("data.load_size=8", r"data\.load_size \(8\) must be >= data\.image_size"),
    ("verify.attackers=[\"transformer\"]", r"verify\.attackers\[\] = 'transformer' is not valid"),
    ("train.iters", r"expected section\.key=value"),
    ("verify.channels_last=\"yes\"", r"verify\.channels_last must be of type bool"),
    ("train.private_ensemble=0", r"train\.private_ensemble must be >= 1 \(private classifiers per private task"),
    ("train.kurtosis_limit=0.5", r"train\.kurtosis_limit must be 0 \(off\) or above 1"),
    ("train.adversary_reset_every=-1", r"train\.adversary_reset_every must be >= 0 \(encoder steps .*0 = never\)"),
    ("verify.lr_adaptive=-1e-4", r"verify\.lr_adaptive must be >= 0 \(0: verify\.lr\)"),
])
def test_invalid_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("demo", [override])


def test_layout_and_compilation_are_on_where_they_were_measured_faster():
    # benchmarks/layout.py: channels-last wins at the demo's sizes on a CPU; benchmarks/gpu_check.py:
    # bf16 + channels-last + a compiled encoder win for the paper preset on a GPU (its home)
    assert load_config(None).train.channels_last is False and load_config(None).train.compile is False
    assert load_config("demo").train.channels_last and load_config("demo").verify.channels_last
    assert not load_config("demo").train.compile
    paper = load_config("paper").train
    assert paper.amp and paper.channels_last and paper.compile
    assert not load_config("paper").verify.channels_last  # attackers on encodings: not measured


def test_places_source_needs_a_root():
    with pytest.raises(ConfigError, match=r"data\.root must be set"):
        from_dict({"data": {"source": "places365"}})


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="presets: .*demo"):
        load_config("no-such-preset")


def test_config_file_round_trips_through_toml(tmp_path):
    config = load_config("places-mini", ["train.iters=3", "train.private_ensemble=3",
                                         "train.adversary_reset_every=50"])
    write_config(config, tmp_path / "run")
    again = load_config(str(tmp_path / "run" / "config.toml"))
    assert again == config
    assert (again.train.private_ensemble, again.train.adversary_reset_every) == (3, 50)
    assert (tmp_path / "run" / "meta.json").exists()


def test_quotes_backslashes_and_lists_of_lists_round_trip_through_toml(tmp_path):
    config = load_config("demo")
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, root='C:\\data\\"mini" \'x\'\n\u00e9'),
        encoder=dataclasses.replace(config.encoder, stages=[[4], [8, 8], [16, 16, 16]]))
    write_config(config, tmp_path / "run")
    again = load_config(str(tmp_path / "run" / "config.toml"))
    assert again.data.root == 'C:\\data\\"mini" \'x\'\n\u00e9'
    assert again.encoder.stages == [[4], [8, 8], [16, 16, 16]]
    assert again == config


OLD_CONFIG = Path(__file__).parent / "data" / "config_written_before_tomli_w.toml"


def test_a_config_written_by_the_former_toml_writer_still_loads_as_written():
    # privenc wrote config.toml by hand (arrays and tables inline) until tomli-w; resuming a run
    # folder from then compares its config.toml with the config asked for now.
    written = tomllib.loads(OLD_CONFIG.read_text())
    config = load_config(str(OLD_CONFIG))
    loaded = config.to_dict()
    assert [(s, k, v) for s, table in written.items() for k, v in table.items() if loaded[s][k] != v] == []
    assert config.data.groups["group1"][:2] == ["arch", "army_base"]
    assert config.encoder.stages == [[8, 8], [16, 16], [32, 32], [32]]
    assert tomllib.loads(config.to_toml()) == loaded  # and the new writer writes the same values


def test_bad_toml_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train\niters = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(path))
