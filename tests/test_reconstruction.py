"""The reconstruction attack: the decoder really learns to invert an encoder that keeps the
image (Identity, Blur) and cannot invert noise; scores by hand; the record, the figure and the
frozen encoder.

The attacks on tiny data (16 px, 28 training images, a decoder of width 8 for 80 iterations)
run once per module; each takes about two seconds."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import TINY
from privenc.config import load_config
from privenc.data import prepare
from privenc.encoders import LoadedEncoder, load_encoder_spec
from privenc.errors import ConfigError, VerificationError
from privenc.models import build_encoder
from privenc.reconstruction import Decoder, DecoderSettings, image_scores, reconstruction_attack

QUICK = DecoderSettings(width=8, eval_every=10, patience=3, max_iters=80)
CPU = torch.device("cpu")


class NoiseEncoder(nn.Module):
    """An 'encoder' whose output ignores the image: nothing to reconstruct."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape[0], 3, x.shape[-2] // 2, x.shape[-1] // 2)


class DriftingEncoder(nn.Module):
    """An encoder that changes a buffer of its own each time it runs: the attack must notice."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


@pytest.fixture(scope="module")
def config():
    return load_config("demo", TINY)


@pytest.fixture(scope="module")
def attacks(config, tmp_path_factory):
    """identity, blur and noise attacked once each: (records, output folder)."""
    out = tmp_path_factory.mktemp("reconstruction")
    encoders = [load_encoder_spec("identity", config, CPU), load_encoder_spec("blur", config, CPU),
                LoadedEncoder("noise", "noise", NoiseEncoder(), config, None)]
    records = {e.name: reconstruction_attack(e, "g1c0", "private", CPU, out / e.name, settings=QUICK) for e in encoders}
    return records, out


@pytest.mark.parametrize("name", ["identity", "blur"])
def test_the_decoder_really_reduces_its_loss(attacks, name):
    record = attacks[0][name]
    curve = [mse for _, mse in record["decoder_curve"]]
    assert curve[0] == record["decoder_val_mse_initial"] and record["decoder_val_mse_best"] == min(curve)
    assert record["decoder_val_mse_best"] < 0.7 * record["decoder_val_mse_initial"]
    # better than the mean training image, what a decoder that learned nothing would give
    assert record["decoder_val_mse_best"] < 0.8 * record["baseline_val_mse"]
    assert record["psnr"] > record["baseline_psnr"] and record["ssim"] > record["baseline_ssim"]


def test_an_image_is_recovered_from_itself_and_not_from_noise(attacks):
    records = attacks[0]
    assert records["identity"]["psnr"] > records["noise"]["psnr"] + 3
    assert records["identity"]["ssim"] > records["noise"]["ssim"] + 0.2
    # noise carries nothing: no better than the mean image, whatever the decoder tried
    assert records["noise"]["psnr"] < records["noise"]["baseline_psnr"] + 0.5


def test_the_record_has_the_standard_keys(attacks):
    record = attacks[0]["blur"]
    standard = {"encoder", "encoder_kind", "task", "role", "chance", "bacc_chance", "n_train", "n_val", "n_test",
                "attacker", "seed", "lr", "iters", "saturated", "val_acc_best", "test_acc_best", "val_bacc_best",
                "test_bacc_best", "test_bacc_ci95", "info_bits", "curve", "seconds"}
    extra = {"psnr", "ssim", "baseline_psnr", "baseline_ssim", "decoder_iters", "decoder_saturated",
             "decoder_val_mse_best", "raw_val_bacc", "raw_test_bacc", "figure"}
    assert standard | extra <= set(record)
    assert (record["attacker"], record["encoder"], record["task"], record["role"]) == (
        "reconstruction", "blur", "g1c0", "private")
    assert record["lr"] == load_config("demo", TINY).verify.lr_raw  # the Identity attacker's rate
    lo, hi = record["test_bacc_ci95"]
    assert 0 <= lo <= record["test_bacc_best"] <= hi <= 1
    data = prepare(load_config("demo", TINY).data, ["g1c0"])
    assert (record["n_train"], record["n_test"]) == (len(data.indices["train"]), len(data.indices["test"]))
    assert record["bacc_chance"] == 0.5
    assert record["decoder_iters"] == record["decoder_curve"][-1][0] <= QUICK.max_iters
    assert json.loads(json.dumps(record)) == record  # plain data, ready for a results file


def test_the_figure_is_written(attacks):
    records, out = attacks
    for name, record in records.items():
        path = out / name / record["figure"]
        assert path.name == "reconstruction_g1c0.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_learned_encoder_is_not_moved(config, tmp_path):
    torch.manual_seed(0)
    module = build_encoder("learned", config.encoder, config.data.image_size)
    module.train()  # the attack must freeze it: its batch-norm statistics would move in train mode
    before = {k: v.clone() for k, v in module.state_dict().items()}
    encoder = LoadedEncoder("untrained", "learned", module, config, None)
    record = reconstruction_attack(encoder, "g1c0", "private", "cpu", tmp_path,
                                   settings=DecoderSettings(width=4, eval_every=5, max_iters=10))
    assert record["encoder_kind"] == "learned" and (tmp_path / record["figure"]).is_file()
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_an_encoder_that_changes_is_caught(config, tmp_path):
    encoder = LoadedEncoder("drifting", "drifting", DriftingEncoder(), config, None)
    with pytest.raises(AssertionError, match="drifting changed"):
        reconstruction_attack(encoder, "g1c0", "other", CPU, tmp_path,
                              settings=DecoderSettings(width=4, eval_every=5, max_iters=5))


def test_scores_by_hand():
    torch.manual_seed(0)
    originals = torch.rand(4, 3, 16, 16) * 1.6 - 0.8   # in [-0.8, 0.8]: a shift stays inside [-1, 1]
    shifted = originals + 0.2                           # 0.1 in [0, 1] pixels: MSE 0.01, PSNR 20 dB
    assert image_scores(shifted, originals)["psnr"] == pytest.approx(20.0, abs=1e-6)
    assert image_scores(originals, originals)["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert math.isinf(image_scores(originals, originals)["psnr"])
    assert image_scores(torch.zeros_like(originals), originals)["ssim"] < 0.5
    assert image_scores(originals[:, :, :8, :8], originals[:, :, :8, :8])["ssim"] == pytest.approx(1.0)  # small
    # 40 images of 32 px are scored in two chunks: the same means as in one call
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = torch.rand(40, 3, 32, 32), torch.rand(40, 3, 32, 32)
    scores = image_scores(a * 2 - 1, b * 2 - 1)
    assert scores["ssim"] == pytest.approx(float(structural_similarity_index_measure(a.double(), b.double(),
                                                                                     data_range=1.0)))
    assert scores["psnr"] == pytest.approx(float(peak_signal_noise_ratio(a.double(), b.double(), data_range=1.0,
                                                                         dim=(1, 2, 3))))


@pytest.mark.parametrize("shape,size", [((3, 16, 16), 16), ((3, 8, 8), 32), ((5, 7, 7), 32), ((1, 1, 1), 16)])
def test_the_decoder_maps_any_encoding_to_the_image_size(shape, size):
    decoder = Decoder(shape, size, width=4)
    assert decoder(torch.randn(2, *shape)).shape == (2, 3, size, size)


def test_bad_inputs_say_what_to_give(config, tmp_path):
    class Flat(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    with pytest.raises(VerificationError, match=r"\(C, h, w\) encodings"):
        reconstruction_attack(LoadedEncoder("flat", "flat", Flat(), config, None), "g1c0", "other", CPU, tmp_path,
                              settings=QUICK)
    with pytest.raises(ConfigError, match="width must be a whole number >= 1"):
        reconstruction_attack(load_encoder_spec("identity", config, CPU), "g1c0", "other", CPU, tmp_path,
                              settings=DecoderSettings(width=0))


def test_the_raw_image_attacker_is_fitted_once_per_images_and_protocol(config, tmp_path, monkeypatch, caplog):
    # It does not depend on the encoder: a second encoder on the same images reuses it, with the
    # numbers of a fresh fit; another protocol, or the cache off, fits anew.
    import privenc.reconstruction as reconstruction

    monkeypatch.setenv("PRIVENC_CACHE", str(tmp_path / "cache"))
    fits = []
    real_fit = reconstruction.fit_classifier
    monkeypatch.setattr(reconstruction, "fit_classifier", lambda *a, **k: fits.append(1) or real_fit(*a, **k))

    def attack(name, cfg):
        return reconstruction_attack(load_encoder_spec(name, cfg, CPU), "g1c0", "private", CPU,
                                     tmp_path / f"{name}-{len(fits)}", settings=QUICK)

    attack("identity", config)
    with caplog.at_level("INFO", logger="privenc"):
        kept = attack("blur", config)
    assert len(fits) == 1 and "reusing the raw-image attacker" in caplog.text
    assert len(list((tmp_path / "cache" / "attackers").glob("raw-paper-*.pt"))) == 1

    fresh = attack("blur", load_config("demo", [*TINY, "data.cache=false"]))
    assert len(fits) == 2
    same = ("raw_val_bacc", "raw_test_bacc", "iters", "saturated", "val_bacc_best", "test_bacc_best",
            "test_bacc_ci95", "test_acc_best", "info_bits")
    assert {k: kept[k] for k in same} == {k: fresh[k] for k in same}

    attack("blur", load_config("demo", [*TINY, "verify.patience=2"]))
    assert len(fits) == 3 and len(list((tmp_path / "cache" / "attackers").glob("*.pt"))) == 2

    # a kept file cut short is fitted again and replaced, with a warning
    for path in (tmp_path / "cache" / "attackers").glob("*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="privenc"):
        again = attack("blur", config)
    assert len(fits) == 4 and "fitting the raw-image attacker again" in caplog.text
    assert again["raw_test_bacc"] == kept["raw_test_bacc"]
