"""Adversarial training: the two steps, the loop, checkpoints and exact resume."""

import json

import pytest
import torch
from torch import nn

from conftest import on_device
from privenc import checkpoint as ckpt
from privenc.adversarial import Players, classifier_step, encoder_step
from privenc.config import load_config
from privenc.errors import TrainingError
from privenc.models import Classifier, Encoder
from privenc.runs import load_encoder
from privenc.training import desirable_target, encoder_lr, train


def _players(config, device="cpu"):
    torch.manual_seed(0)
    encoder = Encoder(config.encoder, config.data.image_size).to(device)
    c, h, _ = encoder.output_shape
    return Players(encoder, nn.ModuleList([Classifier(config.classifier, c, 2, h).to(device)]),
                   Classifier(config.classifier, c, 2, h).to(device))


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.named_parameters())


def test_classifier_step_changes_only_classifier_weights(tiny_config, device):
    players = _players(tiny_config, device)
    opt = torch.optim.Adam(players.classifier_parameters(), lr=1e-2)
    enc, priv = _params(players.encoder), _params(players.private_classifiers)
    des = _params(players.desirable_classifier)
    images, labels = torch.randn(8, 3, 16, 16, device=device), torch.randint(0, 2, (8, 1), device=device)
    stats = classifier_step(players, opt, images, labels, labels[:, 0])
    assert not _changed(enc, players.encoder)
    assert _changed(priv, players.private_classifiers) and _changed(des, players.desirable_classifier)
    assert {"private0_loss", "desirable_loss", "classifier_loss"} <= set(stats)


@pytest.mark.parametrize("loss", ["label_flip", "standard_gan", "negative_ce"])
def test_encoder_step_changes_only_encoder_weights(tiny_config, loss, device):
    players = _players(tiny_config, device)
    opt = torch.optim.Adam(players.encoder.parameters(), lr=1e-2)
    enc, priv = _params(players.encoder), _params(players.private_classifiers)
    des = _params(players.desirable_classifier)
    images, labels = torch.randn(8, 3, 16, 16, device=device), torch.randint(0, 2, (8, 1), device=device)
    encoder_step(players, opt, images, labels, labels[:, 0], loss, alpha=0.0625)
    assert _changed(enc, players.encoder)
    assert not _changed(priv, players.private_classifiers) and not _changed(des, players.desirable_classifier)
    # classifiers are trainable again after the step
    assert all(p.requires_grad for p in players.classifier_parameters())


def test_desirable_target_combines_tasks_as_n_plus_one_way():
    columns = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])
    assert desirable_target(columns).tolist() == [0, 1, 2, 1]
    assert desirable_target(columns[:, :1]).tolist() == [0, 1, 0, 1]


def test_encoder_lr_schedule_decays_every_k_adversarial_iterations():
    config = load_config("demo", ["train.warmup_iters=10", "train.encoder_lr=1.0", "train.encoder_lr_decay=0.5",
                                  "train.encoder_lr_decay_every=5"])
    assert [encoder_lr(config, s) for s in (0, 10, 14, 15, 20)] == [1.0, 1.0, 1.0, 0.5, 0.25]


def test_smoke_run_writes_metrics_checkpoints_and_encoder(tiny_config, tmp_path, device):
    path = train(on_device(tiny_config, device), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9]
    assert records[0]["phase"] == "warmup" and records[-1]["phase"] == "adversarial"
    for key in ("val_private0_acc", "val_desirable_acc", "collapse_zero_var_frac", "collapse_low_var_frac",
                "encoder_lr", "private0_train_acc", "encoder_loss"):
        assert key in records[-1]
    assert (run / "checkpoints" / "last.pt").exists() and (run / "config.toml").exists()
    assert (run / "splits" / "train.txt").exists()
    encoder = load_encoder(path)
    assert ckpt.load(run / "checkpoints" / "last.pt")["step"] == 9
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert encoder(x).shape == (2, 3, 8, 8)


@pytest.mark.slow
def test_resume_is_exact(tiny_config, tmp_path, device):
    tiny_config = on_device(tiny_config, device)
    train(tiny_config, tmp_path / "straight", progress=False)
    # the same run, stopped after 4 steps (a checkpoint), then resumed to the end
    from dataclasses import replace

    stopped = replace(tiny_config, train=replace(tiny_config.train, iters=1))  # 3 warm-up + 1 = 4 steps
    train(stopped, tmp_path / "resumed", progress=False)
    (tmp_path / "resumed" / "config.toml").write_text(tiny_config.to_toml())
    train(tiny_config, tmp_path / "resumed", resume=True, progress=False)
    a = ckpt.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = ckpt.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 9
    for part in ("encoder", "private_classifiers", "desirable_classifier"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "a metrics record was logged twice"


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_named(tiny_config, tmp_path, monkeypatch):
    import privenc.adversarial as adversarial

    real = adversarial.losses.classifier_loss

    def poisoned(logits, labels):
        return real(logits, labels) * float("nan")

    train(tiny_config, tmp_path / "run", progress=False)
    good = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    monkeypatch.setattr(adversarial.losses, "classifier_loss", poisoned)
    from dataclasses import replace

    longer = replace(tiny_config, train=replace(tiny_config.train, iters=20))
    (tmp_path / "run" / "config.toml").write_text(longer.to_toml())
    with pytest.raises(TrainingError, match=r"non-finite .* at step 10.*last good checkpoint is .*last\.pt \(step 9\)"):
        train(longer, tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == good


@pytest.mark.slow
def test_classifier_steps_per_encoder_step(tiny_config, tmp_path, monkeypatch):
    """train.classifier_steps = k: k classifier updates before each encoder update (warm-up: one)."""
    from dataclasses import replace

    import privenc.training as train_module

    calls = {"classifier": 0, "encoder": 0}

    def counting(name, real):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(train_module, "classifier_step", counting("classifier", train_module.classifier_step))
    monkeypatch.setattr(train_module, "encoder_step", counting("encoder", train_module.encoder_step))
    config = replace(tiny_config, train=replace(tiny_config.train, classifier_steps=3))
    train(config, tmp_path / "run", progress=False)
    t = config.train
    assert calls == {"classifier": t.warmup_iters + 3 * t.iters, "encoder": t.iters}


def test_within_training_validation_batches_are_a_fixed_random_sample_of_the_split(tiny_config):
    from privenc.data import prepare
    from privenc.training import _validation_batches

    data = prepare(tiny_config.data, ["g1c0", "g1c1"])
    split = data.dataset("val", augment=False)
    labels = torch.stack([split[i][1] for i in range(len(split))])  # (N, 2): g1c0, g1c1
    # The split is stored task by task, positives first: a slice from its start holds the
    # positives of g1c0 and nothing else.
    assert bool((labels[:3, 0] == 1).all())

    def sample(seed):
        return torch.cat([b[1] for b in _validation_batches(data, batch_size=2, count=3, seed=seed)])

    drawn = sample(0)
    assert len(drawn) == 6 < len(labels)
    assert set(drawn[:, 0].tolist()) == {0, 1}  # both classes of the private task
    assert bool(((drawn[:, 0] == 0) & (drawn[:, 1] == 0)).any())  # and images of neither task
    assert torch.equal(drawn, sample(0))
    assert not torch.equal(drawn, sample(1))
