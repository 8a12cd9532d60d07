"""Adversarial training: the two steps, the loop, checkpoints and exact resume."""

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from conftest import needs_compiler, on_device
from privenc import checkpoint as ckpt
from privenc.adversarial import Players, classifier_step, encoder_step
from privenc.config import load_config
from privenc.errors import TrainingError
from privenc.losses import tail_penalty
from privenc.models import Classifier, Encoder
from privenc.runs import load_encoder
from privenc.training import compile_encoder, desirable_target, encoder_lr, train


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


def test_encoder_step_adds_the_tail_penalty_only_with_a_kurtosis_limit(tiny_config, device):
    images, labels = torch.randn(16, 3, 16, 16, device=device), torch.randint(0, 2, (16, 1), device=device)
    off = encoder_step(_players(tiny_config, device), torch.optim.SGD(_players(tiny_config).encoder.parameters(), 0.0),
                       images, labels, labels[:, 0], "label_flip", alpha=0.5)
    assert "encoder_tail_penalty" not in off
    players = _players(tiny_config, device)
    # a limit of 1.01 sits below any tanh output's kurtosis: the penalty is positive
    on = encoder_step(players, torch.optim.SGD(players.encoder.parameters(), 0.0), images, labels, labels[:, 0],
                      "label_flip", alpha=0.5, kurtosis_limit=1.01)
    assert on["encoder_tail_penalty"].item() > 0
    assert on["encoder_loss"].item() == pytest.approx(
        (on["encoder_private0_loss"] + 0.5 * on["encoder_desirable_loss"] + on["encoder_tail_penalty"]).item(),
        rel=1e-5)
    assert on["encoder_private0_loss"].item() == pytest.approx(off["encoder_private0_loss"].item(), rel=1e-5)


def test_the_tail_penalty_reads_the_values_before_the_tanh_through_a_wrapper(tiny_config):
    class Wrapper(nn.Module):  # stands for DDP: the plain module under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    players = _players(tiny_config)
    images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 2, (16, 1))
    with torch.no_grad():  # training mode: the same batch gives the same values
        pre_tanh = players.encoder.layers[:-1](images)
    wrapped = replace(players, encoder=Wrapper(players.encoder))
    stats = encoder_step(wrapped, torch.optim.SGD(players.encoder.parameters(), 0.0), images, labels, labels[:, 0],
                         "label_flip", alpha=0.5, kurtosis_limit=1.5)
    assert stats["encoder_tail_penalty"].item() == pytest.approx(tail_penalty(pre_tanh, 1.5).item(), rel=1e-5)
    assert stats["encoder_tail_penalty"].item() != pytest.approx(tail_penalty(torch.tanh(pre_tanh), 1.5).item(),
                                                                 rel=1e-3)
    assert not players.encoder.layers[-1]._forward_hooks  # the tap is gone after the step


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


# --------------------------------------------------------------------------- private ensembles and resets


def _ensemble(config, members, device="cpu"):
    """Players with one private task played by ``members`` classifiers and a desirable one."""
    torch.manual_seed(0)
    encoder = Encoder(config.encoder, config.data.image_size).to(device)
    c, h, _ = encoder.output_shape
    private = nn.ModuleList(Classifier(config.classifier, c, 2, h).to(device) for _ in range(members))
    return Players(encoder, private, Classifier(config.classifier, c, 2, h).to(device), private_ensemble=members)


def _batch(device="cpu", seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 16, 16, generator=generator).to(device)
    return images, torch.randint(0, 2, (8, 1), generator=generator).to(device)


def _encoder_gradient(players, images, labels, loss):
    opt = torch.optim.SGD(players.encoder.parameters(), lr=0.0)  # keeps the gradient, moves nothing
    stats = encoder_step(players, opt, images, labels, labels[:, 0], loss, alpha=0.0625)
    return torch.cat([p.grad.flatten() for p in players.encoder.parameters()]), stats


def test_players_lay_out_ensembles_task_by_task(tiny_config):
    players = _ensemble(tiny_config, 3)
    two_tasks = Players(players.encoder, nn.ModuleList([*players.private_classifiers, *players.private_classifiers]),
                        None, private_ensemble=3)
    assert two_tasks.n_private == 2
    assert two_tasks.members(1) == list(players.private_classifiers)  # indices 3, 4, 5 = task 1's members 0, 1, 2
    with pytest.raises(ValueError, match="do not make ensembles of 2"):
        Players(players.encoder, players.private_classifiers, None, private_ensemble=2)


@pytest.mark.parametrize("loss", ["label_flip", "standard_gan"])
def test_encoder_loss_depends_on_every_ensemble_member(tiny_config, loss, device):
    players = _ensemble(tiny_config, 3, device)
    images, labels = _batch(device)
    gradient, _ = _encoder_gradient(players, images, labels, loss)
    for m in range(3):
        member = players.private_classifiers[m]
        before = _params(member)
        with torch.no_grad():
            member.head[-1].weight.mul_(-2.0)  # change this member only
        changed, _ = _encoder_gradient(players, images, labels, loss)
        assert not torch.allclose(changed, gradient), f"member {m} does not reach the encoder's gradient"
        member.load_state_dict({**member.state_dict(), **before})
    restored, _ = _encoder_gradient(players, images, labels, loss)
    assert torch.allclose(restored, gradient)


def test_ensemble_private_term_is_the_members_mean(tiny_config):
    from privenc import losses

    players = _ensemble(tiny_config, 3)
    images, labels = _batch()
    for m in players.classifiers():
        m.eval()  # fixed statistics, so the hand computation sees the same logits as the step
    players.encoder.eval()
    with torch.no_grad():
        encodings = players.encoder(images)
        by_hand = sum(losses.label_flip(c(encodings)) for c in players.private_classifiers) / 3
        utility = losses.classifier_loss(players.desirable_classifier(encodings), labels[:, 0])
    _, stats = _encoder_gradient(players, images, labels, "label_flip")
    assert torch.allclose(stats["encoder_private0_loss"], by_hand)
    assert torch.allclose(stats["encoder_loss"], by_hand + 0.0625 * utility)


def test_classifier_step_trains_each_member_as_if_alone_and_logs_best_and_mean(tiny_config):
    import copy

    players = _ensemble(tiny_config, 3)
    solo = Players(players.encoder, nn.ModuleList([copy.deepcopy(players.private_classifiers[1])]))
    images, labels = _batch()
    with torch.no_grad():  # the step's accuracies are those of the logits before its update
        encodings = players.encoder(images)
        accuracies = [float((c(encodings).argmax(1) == labels[:, 0]).float().mean())
                      for c in players.private_classifiers]
    players = _ensemble(tiny_config, 3)  # the same weights again: the forward above moved BN statistics
    before = [_params(c) for c in players.private_classifiers]
    stats = classifier_step(players, torch.optim.Adam(players.classifier_parameters(), lr=1e-2), images, labels,
                            labels[:, 0])
    classifier_step(solo, torch.optim.Adam(solo.classifier_parameters(), lr=1e-2), images, labels, None)
    assert all(_changed(b, c) for b, c in zip(before, players.private_classifiers))
    for key, value in solo.private_classifiers[0].state_dict().items():
        assert torch.equal(players.private_classifiers[1].state_dict()[key], value), key
    assert float(stats["private0_train_acc"]) == pytest.approx(max(accuracies))
    assert float(stats["private0_mean_train_acc"]) == pytest.approx(sum(accuracies) / 3)


def test_one_member_and_no_reset_take_the_single_classifier_steps_exactly(tiny_config):
    """train.private_ensemble = 1 is the single classifier of before, to the bit: the steps are
    checked against a hand-written single-classifier step (the loop's numbers before and after
    are compared in the commit that added ensembles)."""
    import torch.nn.functional as F

    from privenc import losses

    players, reference = _players(tiny_config), _players(tiny_config)
    c_opt, r_c_opt = (torch.optim.Adam(p.classifier_parameters(), lr=1e-2) for p in (players, reference))
    e_opt, r_e_opt = (torch.optim.Adam(p.encoder.parameters(), lr=1e-2) for p in (players, reference))
    images, labels = _batch()
    classifier_step(players, c_opt, images, labels, labels[:, 0])
    encoder_step(players, e_opt, images, labels, labels[:, 0], "label_flip", alpha=0.0625)

    # (1) the reference classifier step, then (2) its encoder step
    with torch.no_grad():
        encodings = reference.encoder(images)
    r_c_opt.zero_grad()
    total = torch.zeros(()) + F.cross_entropy(reference.private_classifiers[0](encodings), labels[:, 0])
    (total + F.cross_entropy(reference.desirable_classifier(encodings), labels[:, 0])).backward()
    r_c_opt.step()
    for p in reference.classifier_parameters():
        p.requires_grad_(False)
    r_e_opt.zero_grad()
    encodings = reference.encoder(images)
    total = torch.zeros(()) + losses.label_flip(reference.private_classifiers[0](encodings))
    (total + 0.0625 * F.cross_entropy(reference.desirable_classifier(encodings), labels[:, 0])).backward()
    r_e_opt.step()
    for ours, theirs in zip(players.classifiers() + [players.encoder], reference.classifiers() + [reference.encoder]):
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key


def test_resets_rotate_over_members_every_n_encoder_steps():
    from privenc.training import member_to_reset

    config = load_config("demo", ["train.warmup_iters=3", "train.adversary_reset_every=2",
                                  "train.private_ensemble=3"])
    # before the iteration that starts after `step` steps: after encoder steps 2, 4, 6, 8, ...
    chosen = {step: member_to_reset(config, step) for step in range(14)}
    assert {s: m for s, m in chosen.items() if m is not None} == {5: 0, 7: 1, 9: 2, 11: 0, 13: 1}
    off = load_config("demo", ["train.warmup_iters=3", "train.private_ensemble=3"])
    assert all(member_to_reset(off, step) is None for step in range(14))


def test_reinitialize_draws_a_new_classifier_and_clears_its_adam_state(tiny_config, device):
    from privenc.training import reinitialize

    players = _ensemble(tiny_config, 2, device)
    opt = torch.optim.Adam(players.classifier_parameters(), lr=1e-2)
    images, labels = _batch(device)
    for _ in range(3):
        classifier_step(players, opt, images, labels, labels[:, 0])
    kept, reset = players.private_classifiers
    kept_before, trained = _params(kept), _params(reset)
    rng = torch.get_rng_state()
    reinitialize(reset, opt, seed=123)
    assert torch.equal(torch.get_rng_state(), rng), "a reset must not move the global random stream"
    torch.manual_seed(123)  # fresh = exactly the classifier a new construction with that seed draws
    c, h, _ = players.encoder.output_shape
    new = Classifier(tiny_config.classifier, c, 2, h)
    for key, value in new.state_dict().items():
        assert torch.equal(reset.state_dict()[key].cpu(), value), key
    assert _changed(trained, reset) and not _changed(kept_before, kept)
    assert all(p not in opt.state for p in reset.parameters())
    assert all(int(opt.state[p]["step"]) == 3 for p in kept.parameters())
    classifier_step(players, opt, images, labels, labels[:, 0])  # Adam starts the reset member again
    assert all(int(opt.state[p]["step"]) == 1 for p in reset.parameters())
    assert all(int(opt.state[p]["step"]) == 4 for p in kept.parameters())


@pytest.mark.slow
def test_resume_across_a_reset_is_exact(tiny_config, tmp_path, monkeypatch):
    """The exact-resume test with two members and a reset every 2 encoder steps: the resets
    before steps 5 and 7 fall on either side of the stop at step 6. The run logs the best and
    the mean member's accuracies and saves both members."""
    from dataclasses import replace

    import privenc.training as train_module

    resets = []
    real = train_module.reinitialize

    def counting(module, optimizer, seed):
        resets.append(seed)
        real(module, optimizer, seed)

    monkeypatch.setattr(train_module, "reinitialize", counting)
    config = replace(tiny_config, train=replace(tiny_config.train, private_ensemble=2, adversary_reset_every=2))
    train(config, tmp_path / "straight", progress=False)
    assert len(resets) == 2
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["val_private0_acc"] >= record["val_private0_mean_acc"]
        assert record["private0_train_acc"] >= record["private0_mean_train_acc"]
    stopped = replace(config, train=replace(config.train, iters=3))  # 3 warm-up + 3 = 6 steps
    train(stopped, tmp_path / "resumed", progress=False)
    (tmp_path / "resumed" / "config.toml").write_text(config.to_toml())
    train(config, tmp_path / "resumed", resume=True, progress=False)
    assert len(resets) == 4 and resets[2:] == resets[:2]
    a = ckpt.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = ckpt.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 9
    assert {key.split(".")[0] for key in a["private_classifiers"]} == {"0", "1"}
    for part in ("encoder", "private_classifiers", "desirable_classifier"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    for index, state in a["classifier_optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["classifier_optimizer"]["state"][index][key]), f"optimizer {index}.{key}"


@pytest.mark.slow
@needs_compiler
def test_compiled_encoder_steps_move_the_plain_module_as_eager_steps_do(tiny_config, device):
    # train.compile: both sides share one compiled wrapper over the plain encoder, whose
    # parameters the optimizer holds; a step through it equals an eager step.
    eager, compiled = _players(tiny_config, device), _players(tiny_config, device)
    classifier_side, encoder_side = compile_encoder(compiled, compiled)
    assert classifier_side.encoder is encoder_side.encoder and classifier_side.encoder is not compiled.encoder
    assert classifier_side.private_classifiers is compiled.private_classifiers
    images, labels = _batch(device)
    for players, side in ((eager, eager), (compiled, encoder_side)):
        opt = torch.optim.SGD(players.encoder.parameters(), lr=0.1)
        encoder_step(side, opt, images, labels, labels[:, 0], "label_flip", alpha=0.0625)
    assert _changed(_params(_players(tiny_config, device).encoder), compiled.encoder)
    for (name, a), b in zip(eager.encoder.state_dict().items(), compiled.encoder.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
@needs_compiler
def test_compiled_training_writes_a_plain_encoder_file(tiny_config, tmp_path):
    config = replace(tiny_config, train=replace(tiny_config.train, compile=True))
    path = train(config, tmp_path / "run", progress=False)
    # load_encoder loads strictly: a compiled wrapper's "_orig_mod." names would not load
    encoder = load_encoder(path)
    assert set(encoder.state_dict()) == set(Encoder(config.encoder, config.data.image_size).state_dict())
    assert ckpt.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 9
