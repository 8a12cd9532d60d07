"""Attackers trained on a fixed encoder's outputs: the encodings cached once (several augmented
views of each training image), the protocol's saturation rule, :func:`fit_classifier` (the one
function that trains a classifier for verification, the baselines, the attacker zoo and the
audit), its scores (accuracy, balanced accuracy with a bootstrap interval) and the information
estimate in bits.
"""


from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from privenc.adversarial import balanced_accuracy
from privenc.config import VerifyConfig
from privenc.data import TaskData, prepare
from privenc.data.transforms import BatchTransform
from privenc.encoders import LoadedEncoder
from privenc.errors import VerificationError
from privenc.models import Classifier

log = logging.getLogger(__name__)


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


@dataclass
class Encoded:
    """Cached encodings of one task's pool: train (several augmented views), val, test."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    num_classes: int
    inputs: dict[str, torch.Tensor] | None = None  # the encoder's input images, with keep_inputs


@torch.no_grad()
def encode_task(encoder: nn.Module, data: TaskData, views: int, batch_size: int, device: torch.device,
                progress: bool = False, train_views: list[Callable[[torch.Tensor], torch.Tensor]] | None = None,
                keep_inputs: bool = False) -> Encoded:
    """``views`` augmented views of each training image (the training augmentation), and val and
    test by the evaluation transform. ``train_views``, when given, replaces the training
    augmentation: one view per transform (uint8 batch -> encoder input), e.g. the multi-scale
    attacker's rescaled views; val and test stay what the encoder meets when deployed.
    ``keep_inputs`` also keeps each encoding's input image (the reconstruction attack's target)."""
    xs: dict[str, torch.Tensor] = {}
    ys: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    train_transforms = train_views or [BatchTransform(data.config, augment=True)] * views
    for split, transforms in (("train", train_transforms), ("val", [BatchTransform(data.config, augment=False)]),
                              ("test", [BatchTransform(data.config, augment=False)])):
        dataset = data.uint8_dataset(split)
        chunks, labels, inputs = [], [], []
        for transform in transforms:  # on the device, a batch at a time
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
            for images, label in tqdm(loader, desc=f"encode {split}", leave=False, disable=not progress):
                image = transform(images.to(device))
                chunks.append(encoder(image).float().cpu())
                labels.append(label[:, 0])
                if keep_inputs:
                    inputs.append(image.float().cpu())
        xs[split], ys[split] = torch.cat(chunks), torch.cat(labels)
        if keep_inputs:
            kept[split] = torch.cat(inputs)
        bad = int((~torch.isfinite(xs[split]).flatten(1).all(dim=1)).sum())
        if bad:  # attackers would train on NaN and report garbage accuracies
            raise VerificationError(f"the encoder produced non-finite values (NaN or Inf) for {bad} of "
                                    f"{len(xs[split])} {split} encodings of task {data.tasks[0].name!r}")
    return Encoded(xs, ys, data.tasks[0].num_classes, kept if keep_inputs else None)


def encode_for_attackers(encoder: LoadedEncoder, task: str, views: int, batch_size: int, device: torch.device,
                         progress: bool = False,
                         train_views: list[Callable[[torch.Tensor], torch.Tensor]] | None = None) -> Encoded:
    """One task's pool through the fixed encoder, on its run's splits: the same encodings
    whatever ran before in this process (verify, a grid cell, an audit trial). ``train_views``:
    see :func:`encode_task`."""
    data = prepare(encoder.config.data, [task], run_dir=encoder.run_dir)
    # The augmented views come from the global generator: seed it, so that a cell's numbers
    # do not depend on what ran before it in this process (grid order, a resumed grid).
    torch.manual_seed(encoder.config.data.seed)
    return encode_task(encoder.module, data, views, batch_size, device, progress, train_views)


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
    # Cross-fitted on the two halves of :func:`confirmation_split`: [[best score on half 1, the
    # same checkpoint's on half 2], [best on half 2, that checkpoint's on half 1]]; the audit's
    # confirmed rise (privenc.audit.confirmed_score).
    val_bacc_crossfit: list[list[float]] = field(default_factory=list)


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


def score_split(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Scores:
    """``model`` on one split's encodings ``x`` with labels ``y`` (scored in eval mode, then back in
    training mode)."""
    predictions, ce = _predict(model, x, y, device)
    return Scores(float((predictions == y).float().mean()), balanced_accuracy(predictions, y), ce, predictions)


def balanced_accuracy_chance(labels: torch.Tensor) -> float:
    """1/K for the K classes present: what any attacker that ignores its input scores in
    balanced accuracy (always one class: recall 1 on it, 0 on the others)."""
    return 1.0 / max(1, len(labels.unique()))


def confirmation_split(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A boolean mask over the validation images: True for the confirmation half. Each class is
    split in two by a fixed permutation, so every attacker of one task sees the same halves.

    Why: the best validation score over many attackers rises by selection alone (the winner of
    many draws on one split), so an audit that stops when it stops rising may never stop. Chosen
    on the selection half, an attacker's score on the confirmation half is not inflated by that
    choice (docs/results.md, 2026-12-01)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        index = (labels == c).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        mask[index[len(index) // 2:]] = True
    return mask


def half_scores(predictions: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> list[float]:
    """[first half, second half] balanced accuracy of ``predictions`` on validation (``mask``:
    :func:`confirmation_split` of ``labels``, computed when not given)."""
    mask = confirmation_split(labels) if mask is None else mask
    return [balanced_accuracy(predictions[~mask], labels[~mask]), balanced_accuracy(predictions[mask], labels[mask])]


def bootstrap_balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor, resamples: int = 1000,
                                seed: int = 0, level: float = 0.95) -> list[float]:
    """[lo, hi]: the percentile interval of balanced accuracy over ``resamples`` resamplings of
    the test images with replacement (fixed ``seed``, so a result file is reproducible). Unlike
    a binomial interval it needs no formula for a mean of recalls over unequal classes.

    Stratified: each class is resampled within itself, keeping its size. Resampling the pooled
    images instead drops a rare class from some resamples, and with it that class's recall
    (often 0) from the mean, which pushed the interval above the point estimate on lfw-faces'
    expression (8 classes, three of 9-12 photos). Negative labels (unlabelled) are ignored, as
    in :func:`~privenc.adversarial.balanced_accuracy`."""
    generator = torch.Generator().manual_seed(seed)
    recalls = []
    for c in labels.unique():
        if c < 0:
            continue
        hit = (predictions[labels == c] == c).float()                 # (n_c,)
        index = torch.randint(len(hit), (resamples, len(hit)), generator=generator)
        recalls.append(hit[index].mean(1))                               # (B,)
    if not recalls:
        return [float("nan"), float("nan")]
    values = torch.stack(recalls).double().mean(0)                       # (B,)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return [lo, hi]


def fit_classifier(model: nn.Module, data: Encoded, settings: VerifyConfig, lr: float, seed: int,
                   device: torch.device, family: str = "paper", progress: bool = False,
                   label: str = "") -> AttackerResult:
    """Train one classifier under the protocol. Shared by verification of learned encoders, the
    Identity and Blur baselines, every attacker family of the zoo and the audit's extra attacks.

    Training starts from ``model``'s weights as given, never re-initialized: fresh ones for
    verification (Sec. 4.1 trains attackers from scratch), the saved adversarial classifier for
    the adaptive attacker (:mod:`privenc.attacks`). Only the optimizer is new.

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
    # Each half's best evaluation and the other half's score there: a checkpoint chosen on one
    # half and scored on the other, free of the lift of choosing it (the audit's confirmed rise).
    halves_mask = confirmation_split(data.y["val"])
    crossfit = [[-1.0, float("nan")], [-1.0, float("nan")]]
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
        val = score_split(model, x_all["val"], data.y["val"], device)
        current_lr = optimizer.param_groups[0]["lr"]
        curve.append([iteration, val.acc, current_lr, val.bacc])
        if val.bacc > best_val:
            best_val, best_state = val.bacc, copy.deepcopy(model.state_dict())
        first, second = half_scores(val.predictions, data.y["val"], halves_mask)
        if first > crossfit[0][0]:
            crossfit[0] = [first, second]
        if second > crossfit[1][0]:
            crossfit[1] = [second, first]
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
    val_final = score_split(model, x_all["val"], data.y["val"], device)
    test_final = score_split(model, x_all["test"], data.y["test"], device)
    model.load_state_dict(best_state)
    val_best = score_split(model, x_all["val"], data.y["val"], device)
    test_best = score_split(model, x_all["test"], data.y["test"], device)
    interval = bootstrap_balanced_accuracy(test_best.predictions, data.y["test"])
    return AttackerResult(family, seed, lr, iteration, saturated, dropped_at, val_best.acc, test_best.acc,
                          test_best.ce, val_final.acc, test_final.acc, curve, round(time.time() - started, 2),
                          val_bacc_best=val_best.bacc, test_bacc_best=test_best.bacc, test_bacc_ci95=interval,
                          val_bacc_final=val_final.bacc, test_bacc_final=test_final.bacc,
                          val_bacc_crossfit=crossfit)


# --------------------------------------------------------------------------- information estimate


def label_entropy_bits(labels: torch.Tensor, num_classes: int) -> float:
    counts = torch.bincount(labels, minlength=num_classes).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def information_bits(labels: torch.Tensor, num_classes: int, cross_entropy_nats: float) -> float:
    """H(U) - CE (eq. 2): the attacker's cross-entropy upper-bounds H(U | E), so the difference
    is a lower bound on the information I(E; U) the encoding leaks about the attribute."""
    return label_entropy_bits(labels, num_classes) - cross_entropy_nats / math.log(2)
