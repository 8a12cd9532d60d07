"""The audit's extra attacks (privenc.attacks): the registry seam, resuming, the choice of the
worst case over the zoo and the attacks, and --attacks.

Audits here run round 0 only (one tiny attacker on Blur) unless a test needs more; the extra
attacks under test are stand-ins registered for the test, so what is tested is the seam."""

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import privenc.attacks as attacks_module
import privenc.audit as audit_module
from conftest import TINY
from privenc import checkpoint as ckpt
from privenc import runs
from privenc.attackers import Encoded, encode_for_attackers, fit_classifier
from privenc.attacks import ADAPTIVE, MULTISCALE, RECORD_KEYS, REGISTRY, ZOO, Attack, AttackContext, parse_attacks
from privenc.audit import attack_protocol, audit, round_trials
from privenc.cli import main
from privenc.config import load_config
from privenc.data.manifest import CsvSource
from privenc.data.tasks import attribute_tasks
from privenc.data.transforms import BatchTransform, ScaledView
from privenc.deploy import EXPORT_SUFFIX, export
from privenc.encoders import all_attribute_tasks, load_encoder_spec
from privenc.errors import CheckpointError, ConfigError
from privenc.models import Classifier
from privenc.verification import strongest, verify

SHORT = ["verify.max_iters=6"]


@pytest.fixture
def config():
    return load_config("demo", TINY + SHORT)


def _record(val, test, **extra):
    values = {"val_bacc_best": val, "val_acc_best": val, "test_bacc_best": test,
              "test_bacc_ci95": [test - 0.05, test + 0.05], "test_acc_best": test, "chance": 0.5,
              "bacc_chance": 0.5, "n_test": 40, "info_bits": 0.1,
              "attacker": "paper", "seed": 0, "lr": 1e-3, "iters": 6, "saturated": True, "patience": 2,
              "views": 2, "max_iters": 12}
    return {**values, **extra}


@pytest.fixture
def strong(monkeypatch):
    """A stand-in attack stronger than anything on validation; counts its runs and keeps what
    it was given."""
    calls = []

    def run(ctx):
        calls.append(ctx)
        return [_record(0.99, 0.97, detail="a stand-in"), _record(0.60, 0.99)]

    monkeypatch.setitem(REGISTRY, "strong", Attack("strong", "a stand-in", lambda ctx: None, run))
    return calls


@pytest.fixture
def inapplicable(monkeypatch):
    def refuse(ctx):
        raise AssertionError("a skipped attack ran")

    monkeypatch.setitem(REGISTRY, "never", Attack("never", "a stand-in", lambda ctx: f"not for {ctx.encoder.kind}",
                                                  refuse))


def test_an_extra_attack_joins_the_worst_case_chosen_on_validation(config, tmp_path, strong, inapplicable):
    out = tmp_path / "a"
    result = audit("blur", config, ["g1c0"], out, max_rounds=1, progress=False, attacks=[ZOO, "strong", "never"])
    verdict = result["verdicts"]["g1c0"]
    worst = verdict["worst_case"]
    # the record best on validation wins, not the one best on test
    assert (worst["attack"], worst["val_bacc_best"], worst["test_bacc_best"]) == ("strong", 0.99, 0.97)
    assert worst["round"] is None and worst["detail"] == "a stand-in"
    assert verdict["above_chance_points"] == pytest.approx(47.0)
    # plain verify stays round 0 of the zoo
    zoo = json.loads(next((out / "trials" / "g1c0").glob("r0_*.json")).read_text())
    assert verdict["plain_verify_test_bacc"] == zoo["test_bacc_best"] and zoo["attack"] == ZOO
    rows = {row["attack"]: row for row in verdict["attacks"]}
    assert list(rows)[:1] == [ZOO] and rows[ZOO]["attackers"] == 1
    assert (rows["strong"]["attackers"], rows["strong"]["best_val_bacc"], rows["strong"]["test_bacc_best"]) == (
        2, 0.99, 0.97)
    assert rows["never"] == {"attack": "never", "skipped": "not for blur"}
    saved = json.loads((out / "attacks" / "g1c0" / "strong.json").read_text())
    assert [r["attack"] for r in saved["records"]] == ["strong", "strong"]
    assert not (out / "attacks" / "g1c0" / "never.json").exists()
    text = (out / "audit.md").read_text()
    assert "worst case (strong) 97.0%" in text and "| never | skipped: not for blur |" in text
    assert "attack `strong`, `paper` lr 0.001 seed 0, a stand-in (patience 2" in text
    # what the attack was given: the encoder, the task, and round 1's protocol (at least)
    (ctx,) = strong
    widened, lrs, seed = attack_protocol(config.verify, config.verify.lr, 1)
    one = round_trials(config.verify, config.verify.lr, 1)[0]
    assert (ctx.task, ctx.role, ctx.encoder.kind, ctx.lrs, ctx.seed) == ("g1c0", "other", "blur", lrs, seed)
    assert (ctx.settings.patience, ctx.settings.views, ctx.settings.max_iters) == (one.patience, one.views,
                                                                                   one.max_iters)
    assert ctx.out_dir == out / "attacks" / "g1c0" / "strong"


def test_an_attack_is_read_back_on_a_rerun_and_redone_under_another_protocol(config, tmp_path, strong):
    out = tmp_path / "a"
    first = audit("blur", config, ["g1c0"], out, max_rounds=1, progress=False, attacks=["strong"])
    again = audit("blur", config, ["g1c0"], out, max_rounds=1, progress=False, attacks=["strong"])
    assert len(strong) == 1 and again["verdicts"] == first["verdicts"]
    path = out / "attacks" / "g1c0" / "strong.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps(dict(saved, protocol=dict(saved["protocol"], patience=99))))
    audit("blur", config, ["g1c0"], out, max_rounds=1, progress=False, attacks=["strong"])
    assert len(strong) == 2 and json.loads(path.read_text())["protocol"] == saved["protocol"]


def test_the_protocol_follows_the_widest_round_and_is_at_least_round_one(config):
    settings = config.verify
    for k, widest in ((0, 1), (1, 1), (2, 2)):
        widened, lrs, seed = attack_protocol(settings, 1e-2, k)
        trials = round_trials(settings, 1e-2, widest)
        assert (widened.patience, widened.views, widened.max_iters) == (trials[0].patience, trials[0].views,
                                                                        trials[0].max_iters)
        assert set(lrs) == {t.lr for t in trials} and 1e-2 in lrs and seed == settings.seeds[0]


def test_attacks_choose_what_runs(config, tmp_path, strong):
    result = audit("blur", config, ["g1c0"], tmp_path / "zoo", max_rounds=1, progress=False, attacks=[ZOO])
    verdict = result["verdicts"]["g1c0"]
    assert [row["attack"] for row in verdict["attacks"]] == [ZOO] and not strong
    assert verdict["stopped_by"] == "max_rounds"  # the zoo search, stopped by its budget
    # without the zoo, round 0 (plain verify) still runs, and nothing after it
    result = audit("blur", config, ["g1c0"], tmp_path / "strong", max_rounds=3, progress=False, attacks=["strong"])
    verdict = result["verdicts"]["g1c0"]
    assert (verdict["rounds_run"], verdict["stopped_by"], verdict["converged"]) == (1, "zoo_left_out", False)
    assert result["attacks"] == ["strong"] and len(strong) == 1
    assert "The zoo search beyond round 0 was left out (--attacks)." in (tmp_path / "strong" / "audit.md").read_text()


def test_attack_names_are_checked(tmp_path, capsys):
    assert parse_attacks(None)[0] == ZOO and parse_attacks(" zoo, zoo") == [ZOO]
    for bad in ("zoo,nope", ",", ""):
        with pytest.raises(ConfigError, match="give a comma-separated list of zoo"):
            parse_attacks(bad)
    assert main(["-q", "audit", "blur", "--attacks", "zoo,nope", "--task", "g1c0", "--out", str(tmp_path / "a")]) == 2
    assert "unknown nope" in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_a_record_without_the_keys_is_refused(config, tmp_path, monkeypatch):
    incomplete = {k: v for k, v in _record(0.9, 0.9).items() if k != "info_bits"}
    monkeypatch.setitem(REGISTRY, "broken", Attack("broken", "", lambda ctx: None, lambda ctx: [incomplete]))
    with pytest.raises(ValueError, match="'broken' returned a record without info_bits"):
        audit("blur", config, ["g1c0"], tmp_path / "a", max_rounds=1, progress=False, attacks=["broken"])
    assert "info_bits" in RECORD_KEYS


# --------------------------------------------------------------------------- adaptive


def _context(spec, config, task, tmp_path, lrs=(1e-3,)):
    settings = replace(config.verify, max_iters=4, patience=1)
    return AttackContext(spec, load_encoder_spec(spec, config, torch.device("cpu")), task, "private", settings,
                         lrs, 0, torch.device("cpu"), tmp_path / "adaptive")


def test_fit_classifier_starts_from_the_given_weights(config):
    model = Classifier(config.classifier, 3, 2, 8)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.125)  # nothing a fresh initialization gives
    generator = torch.Generator().manual_seed(0)
    x = {split: torch.randn(16, 3, 8, 8, generator=generator) for split in ("train", "val", "test")}
    y = {split: torch.arange(16) % 2 for split in x}
    settings = replace(config.verify, max_iters=2, eval_every=1, patience=5)
    fit_classifier(model, Encoded(x, y, 2), settings, 0.0, 0, torch.device("cpu"))  # lr 0: Adam moves nothing
    assert all(torch.equal(p, torch.full_like(p, 0.125)) for p in model.parameters())


def test_the_adaptive_attacker_starts_from_the_saved_classifier(finished_run, config, tmp_path, monkeypatch):
    started = []
    real = attacks_module.fit_classifier

    def spy(model, *args, **kwargs):
        started.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(attacks_module, "fit_classifier", spy)
    ctx = _context(str(finished_run), config, "g1c0", tmp_path, lrs=(1e-3, 1e-4))
    assert ADAPTIVE.applies(ctx) is None
    records = ADAPTIVE.run(ctx)
    saved = ckpt.load(finished_run / runs.CHECKPOINT_FILE)["private_classifiers"]
    weights = {k[len("0."):]: v for k, v in saved.items() if k.startswith("0.")}
    assert len(started) == 2 and all(state.keys() == weights.keys() for state in started)
    assert all(torch.equal(state[k], weights[k]) for state in started for k in weights)
    assert [(r["member"], r["lr"], r["checkpoint_step"]) for r in records] == [(0, 1e-3, 9), (0, 1e-4, 9)]
    assert all(set(RECORD_KEYS) <= set(r) and 0 <= r["start_val_bacc"] <= 1 for r in records)
    assert records[0]["detail"].startswith("from private classifier 1 of 1 of the checkpoint of step 9 (")


def test_one_adaptive_attacker_per_ensemble_member(finished_run, config, tmp_path, monkeypatch):
    """The layout of train.private_ensemble = K: K classifiers per private task, at index
    task_index * K + member (g1c0 is task 0: slots 0 and 1)."""
    run = shutil.copytree(finished_run, tmp_path / "run")
    path = run / runs.CHECKPOINT_FILE
    payload = ckpt.load(path)
    one = {k[2:]: v for k, v in payload["private_classifiers"].items() if k.startswith("0.")}
    payload["private_classifiers"] = {**{f"0.{k}": v for k, v in one.items()},
                                      **{f"1.{k}": v + 1.0 if v.is_floating_point() else v for k, v in one.items()}}
    ckpt.save(path, {k: v for k, v in payload.items() if k != "format_version"})
    started = []
    real = attacks_module.fit_classifier
    monkeypatch.setattr(attacks_module, "fit_classifier",
                        lambda model, *a, **k: started.append(next(iter(model.state_dict().values())).clone())
                        or real(model, *a, **k))
    ctx = _context(str(run), config, "g1c0", tmp_path)
    ctx.encoder.config.train.private_ensemble = 2  # the field of the ensemble option
    records = ADAPTIVE.run(ctx)
    assert [r["member"] for r in records] == [0, 1]
    first = next(iter(one.values()))
    assert torch.equal(started[0], first) and torch.equal(started[1], first + 1.0)
    ctx.encoder.config.train.private_ensemble = 3
    with pytest.raises(CheckpointError, match="holds 2 private classifiers; the run's config says 1 private"):
        ADAPTIVE.run(ctx)


def test_the_adaptive_attacker_says_why_it_does_not_apply(finished_run, config, tmp_path):
    reasons = {"blur": ("blur", "g1c0"), "other task": (str(finished_run), "g1c1")}
    alone = tmp_path / "alone.pt"
    shutil.copy(finished_run / runs.ENCODER_FILE, alone)
    reasons["encoder file alone"] = (str(alone), "g1c0")
    bare = shutil.copytree(finished_run, tmp_path / "bare")
    (bare / runs.CHECKPOINT_FILE).unlink()
    reasons["no checkpoint"] = (str(bare), "g1c0")
    said = {what: ADAPTIVE.applies(_context(spec, config, task, tmp_path)) for what, (spec, task) in reasons.items()}
    assert said == {
        "blur": "the blur baseline was not trained against an adversarial classifier",
        "other task": "the encoder was not trained against g1c1 (its private tasks: g1c0)",
        "encoder file alone": "an encoder file alone holds no adversarial classifier; give its training run folder",
        "no checkpoint": f"the run has no checkpoint ({bare / runs.CHECKPOINT_FILE}) holding its adversarial "
                         f"classifiers"}
    # given as its encoder.pt, a run is still a run folder
    assert ADAPTIVE.applies(_context(str(finished_run / runs.ENCODER_FILE), config, "g1c0", tmp_path)) is None


def test_verify_can_start_attackers_from_the_saved_adversaries(finished_run, config, tmp_path, monkeypatch):
    import privenc.verification as verification_module

    started = []
    real = verification_module.fit_classifier

    def spy(model, data, settings, lr, seed, device, family, *args, **kwargs):
        started.append((family, seed, {k: v.clone() for k, v in model.state_dict().items()}))
        return real(model, data, settings, lr, seed, device, family, *args, **kwargs)

    monkeypatch.setattr(verification_module, "fit_classifier", spy)
    config = replace(config, verify=replace(config.verify, attackers=["paper", "adaptive"], seeds=[0, 1]))
    records = verify(str(finished_run), config, ["g1c0", "g1c1"], tmp_path / "v", progress=False)
    # adaptive only on the private task, once per seed; the desirable task and Blur get none
    assert [(r["task"], r["attacker"], r["seed"]) for r in records] == [
        ("g1c0", "paper", 0), ("g1c0", "paper", 1), ("g1c0", "adaptive", 0), ("g1c0", "adaptive", 1),
        ("g1c1", "paper", 0), ("g1c1", "paper", 1)]
    assert [r.get("member") for r in records[2:4]] == [0, 0]
    # fine-tuning takes verify.lr_adaptive (the demo preset sets one); from scratch, verify.lr
    assert config.verify.lr_adaptive not in (0, config.verify.lr)
    scratch, tuned = config.verify.lr, config.verify.lr_adaptive
    assert [r["lr"] for r in records] == [scratch, scratch, tuned, tuned, scratch, scratch]
    saved = ckpt.load(finished_run / runs.CHECKPOINT_FILE)["private_classifiers"]
    weights = {k[len("0."):]: v for k, v in saved.items() if k.startswith("0.")}
    adaptive = [state for family, _, state in started if family == "adaptive"]
    assert len(adaptive) == 2 and all(torch.equal(state[k], weights[k]) for state in adaptive for k in weights)
    fresh = [state for family, _, state in started if family == "paper"]
    assert not any(all(torch.equal(state[k], weights[k]) for k in weights) for state in fresh)
    assert {r["attacker"] for r in verify("blur", config, ["g1c0"], tmp_path / "b", progress=False)} == {"paper"}
    # an audit's round 0 is that same plain verify
    out = tmp_path / "a"
    result = audit(str(finished_run), config, ["g1c0"], out, max_rounds=1, attacks=["zoo"], progress=False)
    names = sorted(p.stem for p in (out / "trials" / "g1c0").glob("*.json"))
    lrs = {"paper": f"{config.verify.lr:g}", "adaptive": f"{config.verify.lr_adaptive:g}"}
    suffix = "_cal" if config.verify.calibrate else ""  # the demo preset calibrates
    assert names == sorted(f"r0_{family}_lr{lrs[family]}_s{seed}{suffix}" for family in lrs for seed in (0, 1))
    assert result["verdicts"]["g1c0"]["rounds"][0]["families"] == ["paper", "adaptive"]
    plain = max((r for r in records if r["task"] == "g1c0"), key=lambda r: r["val_bacc_best"])
    assert result["verdicts"]["g1c0"]["plain_verify_test_bacc"] == pytest.approx(plain["test_bacc_best"], abs=0.02)


def test_adaptive_alone_is_not_a_verify_protocol():
    with pytest.raises(ConfigError, match="needs a family trained from scratch"):
        load_config("demo", ['verify.attackers=["adaptive"]'])
    assert load_config("demo", ['verify.attackers=["mlp", "adaptive"]']).verify.attackers == ["mlp", "adaptive"]


@pytest.mark.slow  # 15-40 s on the 2-core VM
def test_an_audit_of_a_run_folder_runs_the_adaptive_attacker(finished_run, config, tmp_path):
    out = tmp_path / "a"
    result = audit(str(finished_run), config, ["g1c0"], out, max_rounds=1, progress=False,
                   attacks=["zoo", "adaptive"])
    rows = {row["attack"]: row for row in result["verdicts"]["g1c0"]["attacks"]}
    lrs = attack_protocol(config.verify, config.verify.lr, 1)[1]
    assert rows["adaptive"]["attackers"] == len(lrs)
    saved = json.loads((out / "attacks" / "g1c0" / "adaptive.json").read_text())
    assert [r["lr"] for r in saved["records"]] == list(lrs) and saved["protocol"]["lrs"] == list(lrs)
    worst = result["verdicts"]["g1c0"]["worst_case"]
    every = [*saved["records"], *map(json.loads, map(Path.read_text, (out / "trials" / "g1c0").glob("*.json")))]
    best = max(r["val_bacc_best"] for r in every)
    # on tiny data attackers tie; the worst case is one of the best on validation
    assert worst["val_bacc_best"] == best
    assert worst["attack"] in {r["attack"] for r in every if r["val_bacc_best"] == best}


def _without_seconds(value):
    if isinstance(value, dict):
        return {key: _without_seconds(item) for key, item in value.items() if key != "seconds"}
    return [_without_seconds(item) for item in value] if isinstance(value, list) else value


@pytest.mark.slow  # two audits of two tasks, one in spawned processes: 23 s under load on the 2-core VM
def test_jobs_run_the_extra_attacks_in_the_pool_with_the_same_records(finished_run, config, tmp_path, monkeypatch):
    tasks, attacks = ["g1c0", "g1c1"], ["adaptive", "multiscale"]  # g1c1: adaptive skipped; its search overlaps
    # --jobs 1 on a worker's thread count: CPU sums may differ in the last digits with the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        one = audit(str(finished_run), config, tasks, tmp_path / "one", max_rounds=1, progress=False, attacks=attacks)
    finally:
        torch.set_num_threads(threads)

    def refuse(*args, **kwargs):
        raise AssertionError("an extra attack ran in the main process")

    monkeypatch.setattr(attacks_module, "compute_outcome", refuse)  # spawned workers import the real one
    two = audit(str(finished_run), config, tasks, tmp_path / "two", max_rounds=1, jobs=2, progress=False,
                attacks=attacks)
    # the same records, file by file, and the same verdicts: only the seconds differ
    files = {run: sorted(path.relative_to(tmp_path / run) for path in (tmp_path / run / "attacks").rglob("*.json"))
             for run in ("one", "two")}
    assert files["one"] == files["two"] and len(files["one"]) == 3
    for file in files["one"]:
        assert (_without_seconds(json.loads((tmp_path / "one" / file).read_text()))
                == _without_seconds(json.loads((tmp_path / "two" / file).read_text()))), file
    assert _without_seconds(two["verdicts"]) == _without_seconds(one["verdicts"])
    # a rerun in the pool reads every attack back: nothing is handed to a worker
    monkeypatch.setattr(audit_module, "_run_attack_job", refuse)
    again = audit(str(finished_run), config, tasks, tmp_path / "two", max_rounds=1, jobs=2, progress=False,
                  attacks=attacks)
    assert again["verdicts"] == two["verdicts"]


# --------------------------------------------------------------------------- multiscale


def test_scaled_views_rescale_around_the_evaluation_view(config):
    data = replace(config.data, load_size=16, image_size=16)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    # scale 1 with nothing to crop is the evaluation view itself
    assert torch.allclose(ScaledView(data, 1.0)(images), BatchTransform(data, augment=False)(images), atol=1e-5)
    # zoomed out: the image shrunk into the middle, black around it
    small = ScaledView(data, 0.5)(images)
    assert small.shape == (2, 3, 16, 16)
    assert (small[..., :4, :] == -1).all() and (small[..., 12:, :] == -1).all() and (small[..., :, :4] == -1).all()
    shrunk = torch.nn.functional.avg_pool2d(images.float(), 2) / 127.5 - 1  # 2x2 means: bilinear at half size
    assert torch.allclose(small[..., 4:12, 4:12], shrunk, atol=1e-4)
    # zoomed in: a crop of the enlarged image, inside the value range, no black padding
    large = ScaledView(data, 1.25)(torch.full((2, 3, 16, 16), 200, dtype=torch.uint8))
    assert torch.allclose(large, torch.full_like(large, 200 / 127.5 - 1))
    with pytest.raises(ValueError, match="scale must be > 0"):
        ScaledView(data, 0.0)


def test_the_multiscale_attacker_trains_on_views_at_every_scale(config, tmp_path, monkeypatch):
    seen = {}
    real = attacks_module.encode_for_attackers

    def spy(encoder, task, views, batch_size, device, progress=False, train_views=None):
        seen["scales"] = [view.scale for view in train_views]
        seen["encoded"] = real(encoder, task, views, batch_size, device, progress, train_views)
        return seen["encoded"]

    monkeypatch.setattr(attacks_module, "encode_for_attackers", spy)
    config = replace(config, verify=replace(config.verify, attackers=["paper", "linear"]))
    ctx = _context("blur", config, "g1c0", tmp_path, lrs=(1e-3,))
    ctx.settings = replace(ctx.settings, views=4)  # two views of each scale reach 4
    assert MULTISCALE.applies(ctx) is None
    records = MULTISCALE.run(ctx)
    assert seen["scales"] == [0.75, 0.75, 1.0, 1.0, 1.25, 1.25]
    assert [(r["attacker"], r["lr"]) for r in records] == [("paper", 1e-3), ("linear", 1e-3)]
    encoded = seen["encoded"]
    assert all(r["views"] == 6 and r["n_train"] * 6 == len(encoded.y["train"]) for r in records)
    assert all(set(RECORD_KEYS) <= set(r) and r["scales"] == [0.75, 1.0, 1.25] for r in records)
    # val and test are the evaluation views, as plain verification encodes them
    plain = encode_for_attackers(ctx.encoder, "g1c0", 1, 8, torch.device("cpu"))
    assert torch.equal(encoded.x["test"], plain.x["test"]) and torch.equal(encoded.x["val"], plain.x["val"])


# --------------------------------------------------------------------------- exported encoders


@pytest.fixture(scope="module")
def exports(finished_run, tmp_path_factory):
    """The finished run exported in every format (each with its contract)."""
    folder = tmp_path_factory.mktemp("exports")
    return {fmt: export(finished_run, fmt, folder / f"encoder{EXPORT_SUFFIX[fmt]}")
            for fmt in ("safetensors", "torchscript", "onnx")}


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_an_exported_file_is_verified_on_the_config_data(finished_run, exports, config, tmp_path, fmt):
    loaded = load_encoder_spec(str(exports[fmt]), config, torch.device("cpu"))
    assert (loaded.kind, loaded.exported, loaded.run_dir, loaded.name) == ("learned", fmt, None,
                                                                            exports[fmt].name)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded.module(images), runs.load_encoder(finished_run)(images), atol=1e-5)
    ctx = _context(str(exports[fmt]), config, "g1c0", tmp_path)
    assert ADAPTIVE.applies(ctx) == (f"an exported {fmt} file holds no adversarial classifier; audit the run it "
                                     f"came from")
    assert MULTISCALE.applies(ctx) is None
    other = replace(config, data=replace(config.data, load_size=20))
    with pytest.raises(ConfigError, match=r"exported for data.load_size = 18 .* --set data.load_size=18"):
        load_encoder_spec(str(exports[fmt]), other, torch.device("cpu"))


def test_a_torchscript_file_without_its_contract_is_refused(exports, config, tmp_path):
    alone = shutil.copy(exports["torchscript"], tmp_path / "encoder.torchscript.pt")
    with pytest.raises(CheckpointError, match="input contract .*encoder.torchscript.pt.json is missing"):
        load_encoder_spec(str(alone), config, torch.device("cpu"))


def test_an_onnx_export_feeds_the_attackers_what_its_safetensors_twin_does(exports, config, tmp_path, device):
    """Same encoder, same seeds: the .onnx (onnxruntime, on the CPU) and the .safetensors (torch,
    on ``device``) give the attackers the same encodings, the multi-scale attacker's views too
    (they are resampled to the encoder's fixed input size before encoding), and verify picks the
    same strongest attacker with the same scores."""
    onnx, twin = (load_encoder_spec(str(exports[fmt]), config, device) for fmt in ("onnx", "safetensors"))
    scaled = [ScaledView(config.data, scale) for scale in (0.75, 1.25)]
    for views in (None, scaled):
        a, b = (encode_for_attackers(e, "g1c0", 2, 8, device, train_views=views) for e in (onnx, twin))
        for split in ("train", "val", "test"):
            assert a.x[split].shape == b.x[split].shape and a.x[split].shape[1:] == (3, 8, 8)
            assert (a.x[split] - b.x[split]).abs().max() <= 1e-5 and torch.equal(a.y[split], b.y[split])
    found = [strongest(verify(str(exports[fmt]), config, ["g1c0"], tmp_path / fmt, device=str(device),
                              progress=False)) for fmt in ("onnx", "safetensors")]
    (key, best), (twin_key, twin_best) = (next(iter(f.items())) for f in found)
    assert key == ("encoder.onnx", "g1c0") and twin_key == ("encoder.safetensors", "g1c0")
    for field in ("attacker", "seed", "iters", "val_bacc_best", "test_bacc_best", "test_acc_best"):
        assert best[field] == pytest.approx(twin_best[field], abs=1e-6), field


def test_an_onnx_export_without_onnxruntime_names_the_extra(exports, config, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(ConfigError, match=r"needs the 'onnxruntime' package: pip install 'privenc\[export\]'"):
        load_encoder_spec(str(exports["onnx"]), config, torch.device("cpu"))


def test_an_onnx_file_is_checked_against_its_contract(exports, config, tmp_path):
    copy = Path(shutil.copy(exports["onnx"], tmp_path / "encoder.onnx"))
    contract = json.loads(Path(f"{exports['onnx']}.json").read_text())
    contract["input"]["image_size"] = 20  # the contract of another export: its images would not fit
    Path(f"{copy}.json").write_text(json.dumps(contract))
    with pytest.raises(CheckpointError, match=r"input has shape \['batch', 3, 16, 16\], but its input contract "
                                              r"says \(batch, 3, 20, 20\)"):
        load_encoder_spec(str(copy), config, torch.device("cpu"))
    copy.write_bytes(exports["onnx"].read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError, match="not a loadable ONNX file"):
        load_encoder_spec(str(copy), config, torch.device("cpu"))
    loaded = load_encoder_spec(str(exports["onnx"]), config, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"takes \(batch, 3, 16, 16\) images, got \(2, 3, 20, 20\)"):
        loaded.module(torch.zeros(2, 3, 20, 20))


@pytest.mark.slow  # an audit: 10-20 s on the 2-core VM
@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_an_audit_of_an_exported_file_runs_all_but_the_adaptive_attacker(exports, config, tmp_path, fmt):
    result = audit(str(exports[fmt]), config, ["g1c0"], tmp_path / "a", max_rounds=1, progress=False)
    rows = {row["attack"]: row for row in result["verdicts"]["g1c0"]["attacks"]}
    assert rows["adaptive"]["skipped"].startswith(f"an exported {fmt} file holds no adversarial classifier")
    assert rows["zoo"]["attackers"] == 1 and rows["multiscale"]["attackers"] >= 1
    assert rows["reconstruction"]["attackers"] == 1
    assert f"| adaptive | skipped: an exported {fmt} file" in (tmp_path / "a" / "audit.md").read_text()


# --------------------------------------------------------------------------- every attribute


def _faces(root):
    """A CSV manifest of 48 tiny images: gender, smiling, person (12 people), one constant column."""
    (root / "img").mkdir(parents=True)
    lines = ["path,gender,smiling,person,camera"]
    for k in range(48):
        Image.fromarray(np.full((14, 14, 3), 5 * k, dtype=np.uint8)).save(root / "img" / f"{k:02d}.png")
        lines.append(f"img/{k:02d}.png,{'mf'[k % 2]},{'yes' if k % 3 else 'no'},p{k % 12},same")
    (root / "faces.csv").write_text("\n".join(lines) + "\n")
    return root / "faces.csv"


def test_every_attribute_of_a_csv_source_is_a_task(tmp_path):
    source = CsvSource(_faces(tmp_path))
    assert attribute_tasks(source) == ["attribute:gender", "attribute:smiling", "attribute:person"]
    assert attribute_tasks(source, group_by="person") == ["attribute:gender", "attribute:smiling"]


def _faces_sets(tmp_path):
    return [*TINY, *SHORT, "data.source=csv", f"data.root={_faces(tmp_path / 'data')}", "data.group_by=person",
            f"data.cache_dir={tmp_path / 'cache'}", "train.private=attribute:smiling", "train.desirable=[]"]


def test_all_attributes_are_those_of_the_encoders_data(tmp_path, finished_run):
    config = load_config("demo", _faces_sets(tmp_path))
    assert all_attribute_tasks("blur", config) == ["attribute:gender", "attribute:smiling"]
    # a run brings its own data: the synthetic scenes' cues, not the config's CSV columns
    assert "attribute:gender" not in all_attribute_tasks(str(finished_run), config)


@pytest.mark.slow  # an audit of two tasks from the command line: 15 s under load on the 2-core VM
def test_all_attributes_audits_each_beside_the_tasks_given(tmp_path):
    sets = _faces_sets(tmp_path)
    args = ["-q", "audit", "blur", "--config", "demo", *[f"--set={item}" for item in sets],
            "--task", "attribute:smiling", "--all-attributes", "--attacks", "zoo", "--max-rounds", "1",
            "--out", str(tmp_path / "a")]
    assert main(args) == 0
    result = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert result["tasks"] == ["attribute:smiling", "attribute:gender"]  # person is data.group_by
    assert {task: v["role"] for task, v in result["verdicts"].items()} == {"attribute:smiling": "other",
                                                                          "attribute:gender": "other"}


def test_all_attributes_needs_a_source_with_attributes(tmp_path):
    for category in ("cat", "dog"):
        (tmp_path / category).mkdir()
        Image.fromarray(np.zeros((14, 14, 3), dtype=np.uint8)).save(tmp_path / category / "0.png")
    config = load_config("demo", [*TINY, "data.source=folder", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="the folder source has no attribute to audit besides its categories"):
        all_attribute_tasks("blur", config)
