"""The verification protocol (Sec. 4.1): an encoder is only as private as the best classifier
that can be trained on its outputs after it is fixed.

Like a linear-probe evaluation (MoCo, DINO): load the encoder strictly, freeze it, train fresh
attackers from scratch on its encodings, and check afterwards that it did not change. Because
the encoder is fixed, the data are encoded once (several augmented views of each training
image) and attackers train on the cached encodings.

Each attacker: Adam at ``lr`` until validation accuracy saturates (no improvement of at least
``min_delta`` for ``patience`` evaluations), then one 10x LR drop and training until it
saturates again. A run that reaches ``max_iters`` first is reported as not saturated.

Validation and test are scored by balanced accuracy (the mean per-class recall; chance is 1/K
for K classes whatever their frequencies) beside plain accuracy and the majority rate: an
attacker that always answers the majority class scores the majority rate in accuracy but 1/K
balanced, so only the balanced number stays honest on unbalanced attributes (lfw gender is
77% male). Saturation, the checkpoint kept and the strongest attacker are all chosen by
validation balanced accuracy, the measure that is reported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from privenc import distributed, runs
from privenc.adversaries import ADAPTIVE, adaptive_reason, saved_adversaries
from privenc.atomic import atomic_write_text, ensure_writable
from privenc.attackers import (
    AttackerResult,
    Encoded,
    balanced_accuracy_chance,
    encode_for_attackers,
    fit_classifier,
    information_bits,
)
from privenc.config import Config
from privenc.encoders import LoadedEncoder, assert_unchanged, attacker_lr, check_tasks, freeze, load_encoder_spec
from privenc.errors import ConfigError
from privenc.models import build_attacker
from privenc.norms import output_variance

log = logging.getLogger(__name__)


def verify(encoder_spec: str, config: Config, tasks: list[str], out_dir: Path | str,
           roles: dict[str, str] | None = None, device: str = "auto", progress: bool = True,
           overwrite: bool = False) -> list[dict[str, Any]]:
    """Verify one encoder on ``tasks``; writes ``OUT/verify.json`` and ``OUT/summary.md``
    (an existing ``verify.json`` is an error unless ``overwrite``: the grid redoes broken cells).

    Returns one record per task x attacker x seed.
    """
    torch_device = distributed.resolve_device(device)
    out_dir = Path(out_dir)
    runs.refuse_run_folder(out_dir, "verify")
    if not overwrite and (out_dir / "verify.json").exists():
        raise ConfigError(f"{out_dir} already holds verification results ({out_dir / 'verify.json'}); use another "
                          f"--out, or delete that file to verify again")
    encoder = load_encoder_spec(encoder_spec, config, torch_device)
    check_tasks(encoder.config.data, tasks)  # a typo in the last task must not wait for the others, nor leave a folder
    ensure_writable(out_dir)  # results are written at the end: fail before the work, not after
    snapshot = freeze(encoder.module)
    settings = encoder.config.verify
    # A learned encoder's own private/desirable tasks are marked (a LEACE eraser's: the task it
    # erases and its config's desirable ones); a baseline has none.
    roles = roles or (roles_from_run(encoder.config, tasks) if encoder.kind in ("learned", "leace") else {})
    records: list[dict[str, Any]] = []
    for task in tasks:
        encoded = encode_for_attackers(encoder, task, settings.views, settings.batch_size, torch_device, progress)
        channels, size = encoded.x["train"].shape[1], encoded.x["train"].shape[-1]
        for family, member, model_for in _attackers(encoder, task, settings.attackers):
            for seed in settings.seeds:
                torch.manual_seed(seed)
                model = model_for(channels, encoded.num_classes, size)
                result = fit_classifier(model, encoded, settings, attacker_lr(encoder, family), seed, torch_device,
                                        family, progress, label=f"{encoder.name}/{task}/{family}/{seed}",
                                        min_iters=settings.family_min_iters(family))
                records.append({**attacker_record(encoder, task, roles.get(task, "other"), encoded, settings.views,
                                                  result), **({} if member is None else {"member": member})})
                log.info("%s %s %s seed %d: test balanced acc %.3f [%.3f, %.3f], acc %.3f (best-val model), "
                         "%s after %d iterations", encoder.name, task, family, seed, result.test_bacc_best,
                         *result.test_bacc_ci95, result.test_acc_best,
                         "saturated" if result.saturated else "NOT saturated", result.iters)
    assert_unchanged(encoder.module, snapshot, encoder.name)
    atomic_write_text(out_dir / "verify.json", json.dumps(records, indent=1) + "\n")
    atomic_write_text(out_dir / "summary.md", summarize(records))
    return records


def _attackers(encoder: LoadedEncoder, task: str,
               families: list[str]) -> list[tuple[str, int | None, Callable[[int, int, int], torch.nn.Module]]]:
    """(family, ensemble member or None, a builder of its starting model) for each attacker of
    ``families`` on ``task``: fresh weights, or for ``adaptive`` each saved adversary of the task
    (none where no run adversary applies: a baseline, or a task the encoder was not trained against)."""
    found = []
    for family in families:
        if family != ADAPTIVE:
            found.append((family, None, partial(build_attacker, family, encoder.config.classifier)))
            continue
        reason = adaptive_reason(encoder, task)
        if reason is not None:
            log.info("%s %s: no adaptive attacker: %s", encoder.name, task, reason)
            continue
        for adversary in saved_adversaries(encoder, task):
            found.append((family, adversary.member, partial(adversary.classifier, encoder)))
    return found


def attacker_record(encoder: LoadedEncoder, task: str, role: str, encoded: Encoded, views: int,
                    result: AttackerResult) -> dict[str, Any]:
    """One verify.json record: the attacker's result with what it is measured against.
    ``chance`` is the majority rate (accuracy's chance level), ``bacc_chance`` 1/K (balanced
    accuracy's)."""
    return {
        "encoder": encoder.name, "encoder_kind": encoder.kind, "task": task, "role": role,
        **({"encoder_label": encoder.label} if encoder.label else {}),
        "chance": _majority_rate(encoded.y["test"], encoded.num_classes),
        "bacc_chance": balanced_accuracy_chance(encoded.y["test"]),
        "n_train": int(len(encoded.y["train"]) // views),
        "n_val": int(len(encoded.y["val"])), "n_test": int(len(encoded.y["test"])),
        **asdict(result),
        "info_bits": information_bits(encoded.y["test"], encoded.num_classes, result.test_ce_best),
        **(test_collapse(encoded) if encoder.kind == "learned" else {}),
    }


def test_collapse(encoded: Encoded) -> dict[str, float]:
    """The collapse diagnostics of a learned encoder on this task's test images: images it never
    trained on, where the variance constraint must still hold (training logs measure it on a few
    validation batches; issue 17 asks about unseen images at scale)."""
    return {f"test_{key}": value for key, value in output_variance(encoded.x["test"]).items()}


def roles_from_run(config: Config, tasks: list[str]) -> dict[str, str]:
    roles = {t: "private" for t in config.train.private}
    roles.update({t: "desirable" for t in config.train.desirable})
    return {t: roles.get(t, "other") for t in tasks}


def _majority_rate(labels: torch.Tensor, num_classes: int) -> float:
    return float(torch.bincount(labels, minlength=num_classes).max()) / len(labels)


def selection_score(record: dict[str, Any]) -> float:
    """What the strongest attacker is chosen by: validation balanced accuracy, the measure that
    is reported (a record written before it was recorded: validation accuracy)."""
    return record.get("val_bacc_best", record["val_acc_best"])


def strongest(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (encoder, task): the attacker with the highest validation balanced accuracy (never
    selected on test). Privacy of a private task is judged by this attacker."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        key = (record["encoder"], record["task"])
        if key not in best or selection_score(record) > selection_score(best[key]):
            best[key] = record
    return best


def _bacc_cells(record: dict[str, Any]) -> tuple[str, str]:
    """(validation, test [95% CI]) balanced accuracy as table cells; '—' for an older record."""
    if "test_bacc_best" not in record:
        return "—", "—"
    lo, hi = record["test_bacc_ci95"]
    return f"{record['val_bacc_best']:.3f}", f"{record['test_bacc_best']:.3f} [{lo:.3f}, {hi:.3f}]"


def summarize(records: list[dict[str, Any]]) -> str:
    lines = ["| encoder | task | role | attacker | seed | val bal. acc | test bal. acc [95% CI] | val acc | test acc "
             "| test acc (final) | bits | iterations |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        val_bacc, test_bacc = _bacc_cells(r)
        lines.append(f"| {r['encoder']} | {r['task']} | {r['role']} | {r['attacker']} | {r['seed']} "
                     f"| {val_bacc} | {test_bacc} | {r['val_acc_best']:.3f} | {r['test_acc_best']:.3f} "
                     f"| {r['test_acc_final']:.3f} "
                     f"| {r['info_bits']:.3f} | {r['iters']}{'' if r['saturated'] else ' (not saturated)'} |")
    lines += ["", "bits: H(task) - the attacker's test cross-entropy (with verify.calibrate, of its logits after a "
              "temperature and bias fitted on validation), a lower bound on the information the "
              "encoding leaks about the task; below 0 when that cross-entropy exceeds the label entropy (an "
              "attacker worse than guessing the class frequencies), which bounds nothing beyond 0.",
              "bal. acc: balanced accuracy, the mean per-class recall (chance 1/K for K classes); its 95% "
              "interval is a bootstrap over the test images, each class resampled within itself (1000 resamples, "
              "fixed seed); the checkpoint kept is the one with the best validation balanced accuracy.",
              "", "Strongest attacker per encoder and task (selected by validation balanced accuracy):", "",
              "| encoder | task | role | test bal. acc [95% CI] | bal. chance (1/K) | test acc | majority rate "
              "| saturated |", "|---|---|---|---|---|---|---|---|"]
    for (enc, task), r in strongest(records).items():
        bacc_chance = f"{r['bacc_chance']:.3f}" if "bacc_chance" in r else "—"
        lines.append(f"| {enc} | {task} | {r['role']} | {_bacc_cells(r)[1]} | {bacc_chance} "
                     f"| {r['test_acc_best']:.3f} | {r['chance']:.3f} | {'yes' if r['saturated'] else 'no'} |")
    return "\n".join(lines) + "\n"
