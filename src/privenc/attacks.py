"""The audit's extra attacks: attackers other than the zoo's fresh families on the plain
encodings, whose records join the zoo's when ``privenc audit`` picks the worst case.

The zoo search (:mod:`privenc.audit`, attack name ``zoo``) trains every family from scratch on
encodings of the training augmentation. An extra attack changes something else: where the
attacker starts (``adaptive``: from the adversarial classifier the encoder was trained against),
or what it is trained on (``multiscale``: encodings of views at several scales). Each is an
:class:`Attack` in :data:`REGISTRY`:

- ``applies(context)`` returns None when the attack applies to this encoder and task, else the
  reason it does not (the verdict lists skipped attacks with their reasons);
- ``run(context)`` returns one or more records with the keys of the zoo's trial records
  (:data:`RECORD_KEYS`, as :func:`privenc.verification.attacker_record` builds them, plus
  ``patience``, ``views`` and ``max_iters``); :func:`record` builds one from a fitted attacker.
  The runner adds ``"attack": name``.

What ``run`` receives is an :class:`AttackContext`: the encoder (a
:class:`~privenc.encoders.LoadedEncoder` on ``device``, frozen; its ``config`` holds the data
and the run's train settings), the spec it was loaded from, the task and its role, the
protocol (``settings``: the encoder's ``[verify]`` with the patience, views and iteration cap
of the audit's widest round so far, at least round 1's; ``lrs``; ``seed``), the device, and a
folder of its own for figures or side files (created by the attack if it writes there). A
new attack is one function pair and a :func:`register` call; a standalone attack function
joins like this::

    register(Attack("reconstruction", "a decoder inverting the encoding (every encoder)",
                    lambda ctx: None,
                    lambda ctx: [reconstruction_attack(ctx.encoder, ctx.task, ctx.role, ctx.device,
                                                       ctx.out_dir, seed=ctx.seed)]))

The runner (:func:`run_attack`) freezes the encoder, checks afterwards that it did not move,
and writes the records atomically to ``OUT/attacks/<task>/<name>.json`` with the protocol they
were computed under; a rerun under the same protocol reads them back instead of attacking again.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privenc.adversaries import adaptive_reason, fresh_families, saved_adversaries
from privenc.atomic import atomic_write_text, read_finished
from privenc.attackers import AttackerResult, Encoded, encode_for_attackers, fit_classifier, score_split
from privenc.config import VerifyConfig
from privenc.data.transforms import ScaledView
from privenc.encoders import LoadedEncoder, assert_unchanged, freeze
from privenc.errors import ConfigError
from privenc.models import build_attacker
from privenc.verification import attacker_record

log = logging.getLogger(__name__)

ZOO = "zoo"
"""The zoo search's name among the attacks (it is audit.py's round loop, not in the registry)."""

RECORD_KEYS = ("val_bacc_best", "val_acc_best", "test_bacc_best", "test_bacc_ci95", "test_acc_best", "chance",
               "bacc_chance", "n_test", "info_bits", "attacker", "seed", "lr", "iters", "saturated", "patience",
               "views", "max_iters")
"""What every record of an attack holds: the verdict reads these."""


@dataclass
class AttackContext:
    """What an attack is given (see the module docstring)."""

    spec: str
    encoder: LoadedEncoder
    task: str
    role: str
    settings: VerifyConfig
    lrs: tuple[float, ...]
    seed: int
    device: torch.device
    out_dir: Path

    def protocol(self) -> dict[str, Any]:
        """What the records depend on besides the encoder and config (checked on a rerun)."""
        return {"patience": self.settings.patience, "views": self.settings.views,
                "max_iters": self.settings.max_iters, "lrs": list(self.lrs), "seed": self.seed,
                "calibrate": self.settings.calibrate, "min_iters_adaptive": self.settings.min_iters_adaptive}


@dataclass(frozen=True)
class Attack:
    name: str
    summary: str
    """What it is, in one line (audit.json and audit.md quote it)."""
    applies: Callable[[AttackContext], str | None]
    run: Callable[[AttackContext], list[dict[str, Any]]]


REGISTRY: dict[str, Attack] = {}


def register(attack: Attack) -> Attack:
    if attack.name == ZOO or attack.name in REGISTRY:
        raise ValueError(f"an attack named {attack.name!r} is already registered")
    REGISTRY[attack.name] = attack
    return attack


ZOO_SUMMARY = "fresh attackers of every family on the plain encodings, widened round by round"


def summaries(names: list[str]) -> dict[str, str]:
    """What each of ``names`` is, in one line."""
    return {name: ZOO_SUMMARY if name == ZOO else REGISTRY[name].summary for name in names}


def attack_names() -> list[str]:
    """Every attack ``--attacks`` accepts, the zoo first."""
    return [ZOO, *REGISTRY]


def parse_attacks(text: str | None) -> list[str]:
    """``--attacks`` as a list: comma-separated names, or None for all of them."""
    if text is None:
        return attack_names()
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in attack_names()]
    if unknown or not names:
        raise ConfigError(f"--attacks {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'no attack named'}; "
                          f"give a comma-separated list of {', '.join(attack_names())}")
    return list(dict.fromkeys(names))


def record(ctx: AttackContext, encoded: Encoded, views: int, result: AttackerResult,
           **extra: Any) -> dict[str, Any]:
    """One record of an attack: the attacker's result as verify.json holds it, the protocol,
    and what the attack adds (``extra``)."""
    return {**attacker_record(ctx.encoder, ctx.task, ctx.role, encoded, views, result),
            "patience": ctx.settings.patience, "views": views, "max_iters": ctx.settings.max_iters, **extra}


def run_attack(attack: Attack, ctx: AttackContext, path: Path) -> dict[str, Any]:
    """The outcome of ``attack`` on ``ctx``: ``{"attack", "skipped": reason}``, or
    ``{"attack", "protocol", "records"}`` read back from ``path`` when it holds this protocol's,
    else computed and written there."""
    found = known_outcome(attack, ctx, path)
    return found if found is not None else compute_outcome(attack, ctx, path)


def known_outcome(attack: Attack, ctx: AttackContext, path: Path) -> dict[str, Any] | None:
    """The outcome of ``attack`` on ``ctx`` when it needs no attacking: skipped (with the
    reason), or read back from ``path`` when that holds this protocol's; else None. The audit
    asks this in its own process before it hands an attack to a worker."""
    reason = attack.applies(ctx)
    if reason is not None:
        return {"attack": attack.name, "skipped": reason}
    found = read_outcome(path)
    if found is not None and found.get("protocol") == ctx.protocol():
        return found
    if found is not None:
        log.info("audit: %s was computed under another protocol (%s); attacking again", path, found.get("protocol"))
    return None


def compute_outcome(attack: Attack, ctx: AttackContext, path: Path) -> dict[str, Any]:
    """Run ``attack`` on ``ctx`` (it applies: :func:`known_outcome` said so), check that the
    encoder did not move and that every record holds :data:`RECORD_KEYS`, and write the outcome
    to ``path`` atomically: an attack is done when its file exists."""
    snapshot = freeze(ctx.encoder.module)
    records = attack.run(ctx)
    assert_unchanged(ctx.encoder.module, snapshot, ctx.encoder.name)
    if not records:
        raise ValueError(f"attack {attack.name!r} returned no records")
    for item in records:
        missing = [key for key in RECORD_KEYS if key not in item]
        if missing:  # a bug of the attack, not the user's input
            raise ValueError(f"attack {attack.name!r} returned a record without {', '.join(missing)}")
        item["attack"] = attack.name
    outcome = {"attack": attack.name, "protocol": ctx.protocol(), "records": records}
    atomic_write_text(path, json.dumps(outcome, indent=1) + "\n")
    return outcome


def read_outcome(path: Path) -> dict[str, Any] | None:
    """A finished attack's file; None for a missing or broken one (then it runs again)."""
    outcome = read_finished(path, "audit: attacking again")
    ok = isinstance(outcome, dict) and isinstance(outcome.get("records"), list) and outcome["records"]
    return outcome if ok else None


# --------------------------------------------------------------------------- adaptive: from the adversary


def _adaptive_applies(ctx: AttackContext) -> str | None:
    return adaptive_reason(ctx.encoder, ctx.task)


def _adaptive_run(ctx: AttackContext) -> list[dict[str, Any]]:
    """One attacker per private classifier of the task (every member of an ensemble), started
    from its saved weights (:mod:`privenc.adversaries`) and fine-tuned under the protocol at
    each learning rate. Each record also keeps what the saved classifier scored unchanged
    (``start_val_bacc``, ``start_test_bacc``)."""
    encoder = ctx.encoder
    views = ctx.settings.views
    encoded = encode_for_attackers(encoder, ctx.task, views, ctx.settings.batch_size, ctx.device)
    channels, size = encoded.x["train"].shape[1], encoded.x["train"].shape[-1]
    records = []
    for adversary in saved_adversaries(encoder, ctx.task):
        member, members = adversary.member, adversary.members
        for lr in ctx.lrs:
            model = adversary.classifier(encoder, channels, encoded.num_classes, size).to(ctx.device)
            start = {split: score_split(model, encoded.x[split], encoded.y[split], ctx.device).bacc
                     for split in ("val", "test")}
            result = fit_classifier(model, encoded, ctx.settings, lr, ctx.seed, ctx.device, "paper",
                                    label=f"{encoder.name}/{ctx.task}/adaptive/{member}/lr{lr:g}",
                                    min_iters=ctx.settings.family_min_iters("adaptive"))
            records.append(record(ctx, encoded, views, result, member=member, checkpoint_step=adversary.step,
                                  start_val_bacc=start["val"], start_test_bacc=start["test"],
                                  detail=f"from private classifier {member + 1} of {members} of the checkpoint of "
                                         f"step {adversary.step} ({100 * start['val']:.1f}% on validation as "
                                         f"saved)"))
            log.info("%s %s adaptive member %d lr %g: test balanced acc %.3f (saved classifier %.3f)", encoder.name,
                     ctx.task, member, lr, result.test_bacc_best, start["test"])
    return records


ADAPTIVE = register(Attack(
    "adaptive", "fine-tuned from the adversarial classifier the encoder was trained against (run folders, "
    "their private tasks)", _adaptive_applies, _adaptive_run))


# --------------------------------------------------------------------------- multiscale: views at several scales


SCALES = (0.75, 1.0, 1.25)
"""Scales of the multi-scale attacker's training views, relative to the evaluation view: 0.75
zooms out (the image padded with black), 1.25 zooms in beyond the training augmentation's
usual ``data.scale_range``."""


def _multiscale_applies(ctx: AttackContext) -> str | None:
    # Every encoder, an ONNX export of fixed input size too: a ScaledView resamples each view
    # to data.image_size before it is encoded, so only the content's scale changes.
    return None


def _multiscale_run(ctx: AttackContext) -> list[dict[str, Any]]:
    """The round-0 families (``verify.attackers`` but ``adaptive``) at each learning rate, trained
    on encodings of views at :data:`SCALES` (each training image at every scale, as many times as it takes
    to reach the protocol's views; random crop positions) and chosen and scored on the usual
    evaluation views: the encoder is deployed on those. An encoder trained only on the
    training augmentation's scales may leak at others, and an attacker that sees several
    scales learns what stays the same across them."""
    encoder = ctx.encoder
    per_scale = math.ceil(ctx.settings.views / len(SCALES))
    transforms = [ScaledView(encoder.config.data, scale) for scale in SCALES for _ in range(per_scale)]
    views = len(transforms)
    encoded = encode_for_attackers(encoder, ctx.task, views, ctx.settings.batch_size, ctx.device,
                                   train_views=transforms)
    channels, size = encoded.x["train"].shape[1], encoded.x["train"].shape[-1]
    records = []
    for family in fresh_families(ctx.settings.attackers):
        for lr in ctx.lrs:
            torch.manual_seed(ctx.seed)
            model = build_attacker(family, encoder.config.classifier, channels, encoded.num_classes, size)
            result = fit_classifier(model, encoded, ctx.settings, lr, ctx.seed, ctx.device, family,
                                    label=f"{encoder.name}/{ctx.task}/multiscale/{family}/lr{lr:g}")
            records.append(record(ctx, encoded, views, result, scales=list(SCALES),
                                  detail=f"trained on {views} views at scales {', '.join(map(str, SCALES))}"))
    return records


MULTISCALE = register(Attack(
    "multiscale", "trained on encodings of views at scales 0.75, 1, 1.25 (every encoder)", _multiscale_applies,
    _multiscale_run))


# --------------------------------------------------------------------------- reconstruction: invert the encoding


def _reconstruction_applies(ctx: AttackContext) -> str | None:
    return None  # a decoder can be trained on any encoder's outputs


def _reconstruction_run(ctx: AttackContext) -> list[dict[str, Any]]:
    """:func:`privenc.reconstruction.reconstruction_attack`: a decoder trained on the training
    split to invert the encoding; its record's scores are those of an attacker trained on raw
    images (Identity's, under the encoder's own ``[verify]`` protocol) applied to the
    reconstructions, beside PSNR and SSIM; its figure goes to the attack's folder."""
    from privenc.reconstruction import reconstruction_attack

    found = reconstruction_attack(ctx.encoder, ctx.task, ctx.role, ctx.device, ctx.out_dir, seed=ctx.seed)
    verify = ctx.encoder.config.verify  # the protocol its Identity attacker trained under
    found.update(patience=verify.patience, views=verify.views, max_iters=verify.max_iters,
                 detail=f"PSNR {found['psnr']:.2f} dB, SSIM {found['ssim']:.3f} (mean training image: "
                        f"{found['baseline_psnr']:.2f} dB, {found['baseline_ssim']:.3f})")
    return [found]


RECONSTRUCTION = register(Attack(
    "reconstruction", "a decoder inverting the encoding, scored by PSNR/SSIM and by an attacker trained on raw "
    "images applied to its reconstructions (every encoder)", _reconstruction_applies, _reconstruction_run))
