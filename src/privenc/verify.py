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

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from privenc import distributed, runs
from privenc.adversarial import balanced_accuracy
from privenc.atomic import atomic_write_text, ensure_writable
from privenc.config import Config, DataConfig, VerifyConfig
from privenc.data import TaskData, open_source, parse_task, prepare
from privenc.data.transforms import BatchTransform
from privenc.errors import ConfigError, VerificationError
from privenc.models import Classifier, build_attacker, build_encoder

log = logging.getLogger(__name__)

BASELINES = ("identity", "blur")


# --------------------------------------------------------------------------- saturation


class Saturation:
    """Tracks the protocol's phases from a stream of validation accuracies.

    ``update(acc)`` returns one of: "continue", "drop" (first plateau: drop the LR once),
    "stop" (second plateau). The best accuracy carries over the LR drop, so the second phase
    must beat everything seen so far to count as an improvement.
    """

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = -math.inf
        self.since_best = 0
        self.dropped = False

    def update(self, accuracy: float) -> str:
        if accuracy >= self.best + self.min_delta:
            self.best, self.since_best = accuracy, 0
        else:
            self.since_best += 1
        if self.since_best < self.patience:
            return "continue"
        if not self.dropped:
            self.dropped, self.since_best = True, 0
            return "drop"
        return "stop"


# --------------------------------------------------------------------------- encoders


@dataclass
class LoadedEncoder:
    name: str
    kind: str               # learned | identity | blur
    module: nn.Module
    config: Config          # the config that defines its data (a run's own, for learned encoders)
    run_dir: Path | None    # training run folder (its splits are reused)


def learned_encoder_path(spec: str) -> Path:
    """The path of a learned encoder given to ``verify`` or ``grid`` (a training run folder or
    its ``encoder.pt``); anything else is a ConfigError that says what was expected."""
    path = Path(spec)
    expected = "give a training run folder, its encoder.pt, 'identity' or 'blur'"
    if not path.exists():
        raise ConfigError(f"encoder {spec!r}: no such run folder or file; {expected}")
    if path.is_dir() and not runs.is_finished(path):
        what = "an unfinished training run" if runs.is_run(path) else "not a training run folder"
        raise ConfigError(f"encoder {spec!r} is {what} (no {runs.ENCODER_FILE} inside); {expected}")
    if path.is_file() and (path.suffix in (".onnx", ".safetensors", ".json") or path.name.endswith(".torchscript.pt")):
        raise ConfigError(f"encoder {spec!r} is an exported file; verification loads the encoder it was exported "
                          f"from: {expected}")
    return path


def run_folder_of(spec: str) -> Path | None:
    """The training run folder of a learned encoder given as that folder or as its encoder.pt:
    the folder holding its config.toml. None for a baseline, any other file (an encoder file
    alone, or copied into another run's folder under another name), or a path that is not there
    (:func:`learned_encoder_path` says what is wrong with it)."""
    if spec in BASELINES:
        return None
    path = Path(spec).resolve()
    folder = path if path.is_dir() else path.parent if path.name == runs.ENCODER_FILE and path.is_file() else None
    return folder if folder is not None and runs.is_run(folder) else None


def encoder_name(spec: str) -> str:
    """How results name an encoder: a baseline's name, its run folder's name (also when given
    as the run's encoder.pt), else the file name."""
    if spec in BASELINES:
        return spec
    folder = run_folder_of(spec)
    return folder.name if folder is not None else Path(spec).resolve().name


def check_tasks(data: DataConfig, tasks: list[str]) -> None:
    """Parse every task against the data it will be verified on: errors name the task."""
    source = open_source(data)
    for task in tasks:
        parse_task(task, source)


def load_encoder_spec(spec: str, config: Config, device: torch.device) -> LoadedEncoder:
    """``identity``, ``blur``, a training run folder or its encoder.pt. A learned encoder in a
    run folder brings its own data config (input size, split) and reuses the run's splits; an
    encoder file alone is verified on ``config``'s data, which must have its input size.
    Verification settings are always ``config``'s."""
    if spec in BASELINES:
        module = build_encoder(spec, config.encoder, config.data.image_size)
        return LoadedEncoder(spec, spec, module.to(device).eval(), config, None)
    path = learned_encoder_path(spec)
    module = runs.load_encoder(path, device)
    run_dir = run_folder_of(spec)
    run_config = runs.read_config(run_dir) if run_dir is not None else copy.deepcopy(config)
    run_config.verify = config.verify
    if module.image_size != run_config.data.image_size:
        where = (f"its run's config ({run_dir / runs.CONFIG_FILE}) says {run_config.data.image_size}" if run_dir
                 else f"the data config gives {run_config.data.image_size} (data.image_size; an encoder file "
                      f"alone is verified on the --config data: give its run folder, or set data.image_size)")
        raise ConfigError(f"encoder {spec!r} takes {module.image_size}x{module.image_size} images, but {where}")
    return LoadedEncoder(encoder_name(spec), "learned", module, run_config, run_dir)


def freeze(module: nn.Module) -> dict[str, torch.Tensor]:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, snapshot: dict[str, torch.Tensor], name: str) -> None:
    """The probe pattern's last check: verification must not have moved the fixed encoder."""
    for key, value in module.state_dict().items():
        if not torch.equal(value, snapshot[key]):
            raise AssertionError(f"encoder {name} changed during verification ({key})")


# --------------------------------------------------------------------------- encode once


@dataclass
class Encoded:
    """Cached encodings of one task's pool: train (several augmented views), val, test."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    num_classes: int


@torch.no_grad()
def encode_task(encoder: nn.Module, data: TaskData, views: int, batch_size: int, device: torch.device,
                progress: bool = False) -> Encoded:
    xs: dict[str, torch.Tensor] = {}
    ys: dict[str, torch.Tensor] = {}
    for split, augment, repeats in (("train", True, views), ("val", False, 1), ("test", False, 1)):
        dataset = data.uint8_dataset(split)
        transform = BatchTransform(data.config, augment)  # on the device, a batch at a time
        chunks, labels = [], []
        for _ in range(repeats):
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
            for images, label in tqdm(loader, desc=f"encode {split}", leave=False, disable=not progress):
                chunks.append(encoder(transform(images.to(device))).float().cpu())
                labels.append(label[:, 0])
        xs[split], ys[split] = torch.cat(chunks), torch.cat(labels)
        bad = int((~torch.isfinite(xs[split]).flatten(1).all(dim=1)).sum())
        if bad:  # attackers would train on NaN and report garbage accuracies
            raise VerificationError(f"the encoder produced non-finite values (NaN or Inf) for {bad} of "
                                    f"{len(xs[split])} {split} encodings of task {data.tasks[0].name!r}")
    return Encoded(xs, ys, data.tasks[0].num_classes)


def encode_for_attackers(encoder: LoadedEncoder, task: str, views: int, batch_size: int, device: torch.device,
                         progress: bool = False) -> Encoded:
    """One task's pool through the fixed encoder, on its run's splits: the same encodings
    whatever ran before in this process (verify, a grid cell, an audit trial)."""
    data = prepare(encoder.config.data, [task], run_dir=encoder.run_dir)
    # The augmented views come from the global generator: seed it, so that a cell's numbers
    # do not depend on what ran before it in this process (grid order, a resumed grid).
    torch.manual_seed(encoder.config.data.seed)
    return encode_task(encoder.module, data, views, batch_size, device, progress)


# --------------------------------------------------------------------------- one attacker


@dataclass
class AttackerResult:
    attacker: str
    seed: int
    lr: float
    iters: int
    saturated: bool
    lr_dropped_at: int | None
    val_acc_best: float
    test_acc_best: float
    test_ce_best: float
    val_acc_final: float
    test_acc_final: float
    curve: list[list[float]] = field(default_factory=list)   # [iteration, val accuracy, lr, val balanced acc]
    seconds: float = 0.0
    # Balanced accuracy (mean per-class recall) of the same checkpoints; the best-validation
    # checkpoint is the one with the best validation balanced accuracy.
    val_bacc_best: float = float("nan")
    test_bacc_best: float = float("nan")
    test_bacc_ci95: list[float] = field(default_factory=list)  # [lo, hi], bootstrap over test images
    val_bacc_final: float = float("nan")
    test_bacc_final: float = float("nan")


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             batch_size: int = 512) -> tuple[torch.Tensor, float]:
    """(predicted classes, mean cross-entropy in nats) of ``model`` on ``x``."""
    model.eval()
    predictions, total_ce = [], 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size].to(device)).float()
        target = y[i:i + batch_size].to(device)
        predictions.append(logits.argmax(1).cpu())
        total_ce += float(F.cross_entropy(logits, target, reduction="sum"))
    model.train()
    return torch.cat(predictions), total_ce / len(x)


@dataclass
class Scores:
    """One checkpoint on one split: accuracy, balanced accuracy, cross-entropy (nats)."""

    acc: float
    bacc: float
    ce: float
    predictions: torch.Tensor


def _scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Scores:
    predictions, ce = _predict(model, x, y, device)
    return Scores(float((predictions == y).float().mean()), balanced_accuracy(predictions, y), ce, predictions)


def balanced_accuracy_chance(labels: torch.Tensor) -> float:
    """1/K for the K classes present: what any attacker that ignores its input scores in
    balanced accuracy (always one class: recall 1 on it, 0 on the others)."""
    return 1.0 / max(1, len(labels.unique()))


def bootstrap_balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor, resamples: int = 1000,
                                seed: int = 0, level: float = 0.95) -> list[float]:
    """[lo, hi]: the percentile interval of balanced accuracy over ``resamples`` resamplings of
    the test images with replacement (fixed ``seed``, so a result file is reproducible). Unlike
    a binomial interval it needs no formula for a mean of recalls over unequal classes.
    A class that a resample happens to miss is left out of that resample's mean."""
    n = len(labels)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(n, (resamples, n), generator=generator)       # (B, n)
    truth, hit = labels[index], predictions[index] == labels[index]     # (B, n) each
    recalls = []
    for c in labels.unique():
        member = truth == c
        count = member.sum(1)
        recalls.append(torch.where(count > 0, (hit & member).sum(1) / count.clamp(min=1), torch.nan))
    values = torch.stack(recalls).double().nanmean(0)                 # (B,)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return [lo, hi]


def fit_classifier(model: nn.Module, data: Encoded, settings: VerifyConfig, lr: float, seed: int,
                   device: torch.device, family: str = "paper", progress: bool = False,
                   label: str = "") -> AttackerResult:
    """Train one classifier from scratch under the protocol. Shared by verification of learned
    encoders, the Identity and Blur baselines and every attacker family of the zoo.

    With ``settings.channels_last``, convolutional attackers (:class:`Classifier`) and their data
    take the channels-last memory format; the numbers do not depend on it beyond float rounding."""
    model = model.to(device).train()
    x_all = data.x
    if isinstance(model, Classifier) and settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
        # Converted once; indexing a batch out of a channels-last tensor keeps the format.
        x_all = {split: x.contiguous(memory_format=torch.channels_last) for split, x in data.x.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = x_all["train"], data.y["train"]
    batch = min(settings.batch_size, len(x_train))
    saturation = Saturation(settings.patience, settings.min_delta)
    # best_val: validation balanced accuracy, by which saturation and the kept checkpoint go
    best_state, best_val, dropped_at = copy.deepcopy(model.state_dict()), -1.0, None
    curve: list[list[float]] = []
    started = time.time()
    iteration, saturated = 0, False
    bar = tqdm(total=settings.max_iters, desc=label or family, leave=False, disable=not progress, unit="it")
    while iteration < settings.max_iters:
        index = torch.randint(len(x_train), (batch,), generator=generator)
        logits = model(x_train[index].to(device))
        loss = F.cross_entropy(logits.float(), y_train[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1
        bar.update(1)
        if iteration % settings.eval_every and iteration != settings.max_iters:
            continue
        if not torch.isfinite(loss):  # checked when evaluating (no GPU sync per step); NaN weights stay NaN
            raise VerificationError(f"{label or family}: non-finite attacker loss by iteration {iteration} "
                                    f"(lr {optimizer.param_groups[0]['lr']:g}); its accuracies would be meaningless")
        val = _scores(model, x_all["val"], data.y["val"], device)
        current_lr = optimizer.param_groups[0]["lr"]
        curve.append([iteration, val.acc, current_lr, val.bacc])
        if val.bacc > best_val:
            best_val, best_state = val.bacc, copy.deepcopy(model.state_dict())
        event = saturation.update(val.bacc)
        bar.set_postfix(val=f"{val.bacc:.3f}", best=f"{best_val:.3f}")
        if event == "drop":
            dropped_at = iteration
            for group in optimizer.param_groups:
                group["lr"] = current_lr * settings.lr_drop
        elif event == "stop":
            saturated = True
            break
    bar.close()
    val_final = _scores(model, x_all["val"], data.y["val"], device)
    test_final = _scores(model, x_all["test"], data.y["test"], device)
    model.load_state_dict(best_state)
    val_best = _scores(model, x_all["val"], data.y["val"], device)
    test_best = _scores(model, x_all["test"], data.y["test"], device)
    interval = bootstrap_balanced_accuracy(test_best.predictions, data.y["test"])
    return AttackerResult(family, seed, lr, iteration, saturated, dropped_at, val_best.acc, test_best.acc,
                          test_best.ce, val_final.acc, test_final.acc, curve, round(time.time() - started, 2),
                          val_bacc_best=val_best.bacc, test_bacc_best=test_best.bacc, test_bacc_ci95=interval,
                          val_bacc_final=val_final.bacc, test_bacc_final=test_final.bacc)


# --------------------------------------------------------------------------- information estimate


def label_entropy_bits(labels: torch.Tensor, num_classes: int) -> float:
    counts = torch.bincount(labels, minlength=num_classes).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def information_bits(labels: torch.Tensor, num_classes: int, cross_entropy_nats: float) -> float:
    """H(U) - CE (eq. 2): the attacker's cross-entropy upper-bounds H(U | E), so the difference
    is a lower bound on the information I(E; U) the encoding leaks about the attribute."""
    return label_entropy_bits(labels, num_classes) - cross_entropy_nats / math.log(2)


# --------------------------------------------------------------------------- the command


def verify(encoder_spec: str, config: Config, tasks: list[str], out_dir: Path, roles: dict[str, str] | None = None,
           device: str = "auto", progress: bool = True, overwrite: bool = False) -> list[dict[str, Any]]:
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
    lr = settings.lr_raw if encoder.kind == "identity" else settings.lr
    # A learned encoder's own private/desirable tasks are marked; a baseline has none.
    roles = roles or (roles_from_run(encoder.config, tasks) if encoder.kind == "learned" else {})
    records: list[dict[str, Any]] = []
    for task in tasks:
        encoded = encode_for_attackers(encoder, task, settings.views, settings.batch_size, torch_device, progress)
        channels, size = encoded.x["train"].shape[1], encoded.x["train"].shape[-1]
        for family in settings.attackers:
            for seed in settings.seeds:
                torch.manual_seed(seed)
                model = build_attacker(family, encoder.config.classifier, channels, encoded.num_classes, size)
                result = fit_classifier(model, encoded, settings, lr, seed, torch_device, family, progress,
                                        label=f"{encoder.name}/{task}/{family}/{seed}")
                records.append(attacker_record(encoder, task, roles.get(task, "other"), encoded, settings.views,
                                               result))
                log.info("%s %s %s seed %d: test balanced acc %.3f [%.3f, %.3f], acc %.3f (best-val model), "
                         "%s after %d iterations", encoder.name, task, family, seed, result.test_bacc_best,
                         *result.test_bacc_ci95, result.test_acc_best,
                         "saturated" if result.saturated else "NOT saturated", result.iters)
    assert_unchanged(encoder.module, snapshot, encoder.name)
    atomic_write_text(out_dir / "verify.json", json.dumps(records, indent=1) + "\n")
    atomic_write_text(out_dir / "summary.md", summarize(records))
    return records


def attacker_record(encoder: LoadedEncoder, task: str, role: str, encoded: Encoded, views: int,
                    result: AttackerResult) -> dict[str, Any]:
    """One verify.json record: the attacker's result with what it is measured against.
    ``chance`` is the majority rate (accuracy's chance level), ``bacc_chance`` 1/K (balanced
    accuracy's)."""
    return {
        "encoder": encoder.name, "encoder_kind": encoder.kind, "task": task, "role": role,
        "chance": _majority_rate(encoded.y["test"], encoded.num_classes),
        "bacc_chance": balanced_accuracy_chance(encoded.y["test"]),
        "n_train": int(len(encoded.y["train"]) // views),
        "n_val": int(len(encoded.y["val"])), "n_test": int(len(encoded.y["test"])),
        **asdict(result),
        "info_bits": information_bits(encoded.y["test"], encoded.num_classes, result.test_ce_best),
    }


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
    lines += ["", "bits: H(task) - the attacker's test cross-entropy, a lower bound on the information the "
              "encoding leaks about the task; below 0 when that cross-entropy exceeds the label entropy (an "
              "attacker worse than guessing the class frequencies), which bounds nothing beyond 0.",
              "bal. acc: balanced accuracy, the mean per-class recall (chance 1/K for K classes); its 95% "
              "interval is a bootstrap over the test images (1000 resamples, fixed seed); the checkpoint kept is "
              "the one with the best validation balanced accuracy.",
              "", "Strongest attacker per encoder and task (selected by validation balanced accuracy):", "",
              "| encoder | task | role | test bal. acc [95% CI] | bal. chance (1/K) | test acc | majority rate "
              "| saturated |", "|---|---|---|---|---|---|---|---|"]
    for (enc, task), r in strongest(records).items():
        bacc_chance = f"{r['bacc_chance']:.3f}" if "bacc_chance" in r else "—"
        lines.append(f"| {enc} | {task} | {r['role']} | {_bacc_cells(r)[1]} | {bacc_chance} "
                     f"| {r['test_acc_best']:.3f} | {r['chance']:.3f} | {'yes' if r['saturated'] else 'no'} |")
    return "\n".join(lines) + "\n"
