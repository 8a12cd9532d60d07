"""experiments/reproduce.py: every run it would train has a valid configuration."""

import importlib.util
from pathlib import Path

from privenc.config import load_config

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "reproduce.py"


def _module():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_reproduction_run_is_a_valid_config():
    runs = _module().runs("g1c0", "g1c1", "g1c2", seeds=[0, 1])
    assert {"label_flip", "standard_gan", "negative_ce", "label_flip-seed1", "keep_g1c1_g1c2",
            "variance_none", "variance_batch", "variance_per_location_affine", "variance_per_location"} <= set(runs)
    for name, overrides in runs.items():
        config = load_config("demo", overrides)
        assert config.train.private == ["g1c0"], name
    assert load_config("demo", runs["keep_g1c1_g1c2"]).train.desirable == ["g1c1", "g1c2"]
    assert load_config("demo", runs["variance_batch"]).train.desirable == []
    assert load_config("demo", runs["variance_batch"]).encoder.norm == "batch"
    assert load_config("demo", runs["standard_gan"]).train.encoder_loss == "standard_gan"
    assert load_config("demo", runs["label_flip-seed1"]).train.seed == 1
