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

    ``update(acc, iteration)`` returns one of: "continue", "drop" (first plateau: drop the LR
    once), "stop" (second plateau). The best accuracy carries over the LR drop, so the second
    phase must beat everything seen so far to count as an improvement. Before ``min_iters``
    iterations neither is declared: a fine-tuned attacker can sit on a plateau at its start
    before it climbs (docs/results.md, 2026-12-02).
    """

    def __init__(self, patience: int, min_delta: float, min_iters: int = 0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.min_iters = min_iters
        self.best = -math.inf
        self.since_best = 0
        self.dropped = False

    def update(self, accuracy: float, iteration: int = 0) -> str:
        if accuracy >= self.best + self.min_delta:
            self.best, self.since_best = accuracy, 0
        else:
            self.since_best += 1
        if self.since_best < self.patience or iteration < self.min_iters:
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
    # The best checkpoint's decision rule (:class:`Decision`; argmax unless ``verify.calibrate``),
    # its threshold on the logit margin, and with ``verify.calibrate`` the same checkpoint's
    # test balanced accuracy by plain argmax with the running statistics.
    decision: str = "argmax"
    threshold: float | None = None
    test_bacc_uncalibrated: float | None = None


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """``model``'s logits on ``x`` in eval mode (float32, on the CPU); the model is left in training mode."""
    model.eval()
    logits = torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
    model.train()
    return logits


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapted(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 512) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are those of the inputs ``x`` (AdaBN, Li et
    al. 2016): the plain average over batches of ``batch_size``, every other module in eval mode
    (dropout off). An attacker holding a set of encodings, without their labels, can do this."""
    copied = copy.deepcopy(model).eval()
    for norm in _batch_norms(copied):
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
        norm.train()
    for i in range(0, len(x), batch_size):
        copied(x[i:i + batch_size].to(device))
    return copied.eval()


def _margin(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, 1] - logits[:, 0]


def tune_threshold(margin: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold on a binary attacker's logit margin (class 1 minus class 0) with the best
    balanced accuracy on these images, among 0 (argmax, kept on ties) and the margin's
    1st-99th percentiles."""
    candidates = torch.cat([torch.zeros(1), torch.quantile(margin, torch.linspace(0.01, 0.99, 99))])
    predicted = (margin[None, :] > candidates[:, None]).long()         # (candidates, images)
    # Every candidate at once, with balanced_accuracy's arithmetic (a float32 recall per class,
    # summed in float64 in class order), so that the choice, ties included, is the one that
    # scoring the candidates one by one makes.
    total, classes = torch.zeros(len(candidates), dtype=torch.float64), 0
    for c in labels.unique():
        if c >= 0:
            total, classes = total + (predicted[:, labels == c] == c).float().mean(1).double(), classes + 1
    return float(candidates[int(torch.argmax(total / classes))]) if classes else 0.0


@dataclass(frozen=True)
class Decision:
    """How an attacker's outputs become a class: BatchNorm statistics (the running ones kept in
    training, or each scored split's own: :func:`adapted`) and, on binary tasks, a threshold on
    the logit margin (None = argmax)."""

    own_statistics: bool = False
    threshold: float | None = None

    @property
    def rule(self) -> str:
        """argmax | threshold | adabn (own statistics; with a threshold on binary tasks)."""
        return "adabn" if self.own_statistics else "argmax" if self.threshold is None else "threshold"

    @property
    def statistics(self) -> str:
        """The key of :func:`split_logits`' output this decision reads: ``own`` or ``running``."""
        return "own" if self.own_statistics else "running"

    def predict(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        out = logits[self.statistics]
        return out.argmax(1) if self.threshold is None else (_margin(out) > self.threshold).long()


def split_logits(model: nn.Module, x: torch.Tensor, device: torch.device, calibrate: bool) -> dict[str, torch.Tensor]:
    """Logits on one split: ``running`` (BatchNorm running statistics); with ``calibrate`` and a
    model that has BatchNorm also ``own`` (normalized by this split's statistics)."""
    logits = {"running": _logits(model, x, device)}
    if calibrate and _batch_norms(model):
        logits["own"] = _logits(adapted(model, x, device), x, device)
    return logits


def best_decision(logits: dict[str, torch.Tensor], labels: torch.Tensor, calibrate: bool,
                  on: torch.Tensor | None = None) -> tuple[Decision, float]:
    """The decision best on the images ``on`` (a mask; all when None) and its balanced accuracy
    there. Without ``calibrate``: argmax on the running statistics. With it, also a threshold
    tuned on those images (binary tasks) and the split's own statistics (models with
    BatchNorm); ties keep the earlier, plainer rule."""
    on = torch.ones(len(labels), dtype=torch.bool) if on is None else on
    decisions = []
    for statistics, out in logits.items():
        own = statistics == "own"
        decisions.append(Decision(own))
        if calibrate and out.shape[1] == 2:
            decisions.append(Decision(own, tune_threshold(_margin(out)[on], labels[on])))
    scored = [(d, balanced_accuracy(d.predict(logits)[on], labels[on])) for d in decisions]
    return max(scored, key=lambda pair: pair[1])


@dataclass
class Scores:
    """One checkpoint on one split: accuracy, balanced accuracy, cross-entropy (nats)."""

    acc: float
    bacc: float
    ce: float
    predictions: torch.Tensor


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> float:
    valid = y >= 0
    return float(F.cross_entropy(logits[valid], y[valid])) if bool(valid.any()) else float("nan")


def _scores(logits: dict[str, torch.Tensor], decision: Decision, y: torch.Tensor) -> Scores:
    predictions = decision.predict(logits)
    ce = _cross_entropy(logits[decision.statistics], y)
    return Scores(float((predictions == y).float().mean()), balanced_accuracy(predictions, y), ce, predictions)


def score_split(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Scores:
    """``model`` on one split's encodings ``x`` with labels ``y``: argmax with the running
    statistics (scored in eval mode, then back in training mode)."""
    return _scores(split_logits(model, x, device, calibrate=False), Decision(), y)


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


def _crossfit(logits: dict[str, torch.Tensor], labels: torch.Tensor, mask: torch.Tensor,
              calibrate: bool) -> list[tuple[float, float]]:
    """[(score on the selection half, score on the confirmation half), and the other way round]
    of the decision best on the first half of each pair (:func:`confirmation_split`'s ``mask``),
    a threshold tuned on that half only."""
    pairs = []
    for way, on in enumerate((~mask, mask)):
        decision, _ = best_decision(logits, labels, calibrate, on)
        halves = half_scores(decision.predict(logits), labels, mask)
        pairs.append((halves[way], halves[1 - way]))
    return pairs


def fit_scaling(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> tuple[float, torch.Tensor]:
    """A temperature and a bias per class that minimize the cross-entropy of ``logits / T + b``
    on these labelled images (temperature scaling, Guo et al. 2017, with a bias: Platt scaling
    for two classes). Fitted on validation, it turns an attacker that is right more often but
    overconfident into a calibrated one without looking at test."""
    valid = labels >= 0
    logits, labels = logits[valid].double(), labels[valid]
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t, bias], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits * torch.exp(-log_t) + bias, labels)
        loss.backward()
        return loss

    if len(labels):
        optimizer.step(closure)
    return float(torch.exp(log_t.detach())), bias.detach().float()


def _final_scores(model: nn.Module, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], device: torch.device,
                  calibrate: bool, scale: bool = True) -> tuple[Scores, Scores, Decision, float | None]:
    """A checkpoint's validation and test scores under the decision best on validation (a
    threshold tuned on validation, each split normalized by its own statistics where chosen),
    that decision, and with ``calibrate`` its test balanced accuracy by plain argmax with the
    running statistics (read from the same test logits).

    With ``calibrate`` the test cross-entropy (the information estimate's) is that of the chosen
    statistics' logits scaled by :func:`fit_scaling` on validation: H(U) - CE bounds the
    information from below for any predictor fixed without the test labels, and the plain
    logits of an AdaBN- or threshold-chosen checkpoint can be so overconfident that the bound
    goes negative while the attacker reads the attribute. ``scale=False`` skips that fit where the
    cross-entropy is not read (the final checkpoint's)."""
    val_logits = split_logits(model, x["val"], device, calibrate)
    decision, _ = best_decision(val_logits, y["val"], calibrate)
    test_logits = split_logits(model, x["test"], device, decision.own_statistics)
    uncalibrated = balanced_accuracy(Decision().predict(test_logits), y["test"]) if calibrate else None
    test = _scores(test_logits, decision, y["test"])
    if calibrate and scale:
        temperature, bias = fit_scaling(val_logits[decision.statistics], y["val"])
        test.ce = _cross_entropy(test_logits[decision.statistics] / temperature + bias, y["test"])
    return _scores(val_logits, decision, y["val"]), test, decision, uncalibrated


def fit_classifier(model: nn.Module, data: Encoded, settings: VerifyConfig, lr: float, seed: int,
                   device: torch.device, family: str = "paper", progress: bool = False,
                   label: str = "", min_iters: int = 0) -> AttackerResult:
    """Train one classifier under the protocol. Shared by verification of learned encoders, the
    Identity and Blur baselines, every attacker family of the zoo and the audit's extra attacks.

    Training starts from ``model``'s weights as given, never re-initialized: fresh ones for
    verification (Sec. 4.1 trains attackers from scratch), the saved adversarial classifier for
    the adaptive attacker (:mod:`privenc.attacks`). Only the optimizer is new.

    With ``settings.channels_last``, convolutional attackers (:class:`Classifier`) and their data
    take the channels-last memory format; the numbers do not depend on it beyond float rounding.

    With ``settings.calibrate`` each evaluation scores the checkpoint under every decision rule of
    :func:`best_decision` and reads the best on validation; saturation, the kept checkpoint and
    the cross-fitted scores go by it, and test is scored under the rule chosen on validation.
    ``min_iters``: no saturation before that many iterations (:class:`Saturation`)."""
    model = model.to(device).train()
    x_all = data.x
    if isinstance(model, Classifier) and settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
        # Converted once; indexing a batch out of a channels-last tensor keeps the format.
        x_all = {split: x.contiguous(memory_format=torch.channels_last) for split, x in data.x.items()}
    # The fused kernel: the same update in one pass over the parameters, not one per tensor.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = x_all["train"], data.y["train"]
    batch = min(settings.batch_size, len(x_train))
    saturation = Saturation(settings.patience, settings.min_delta, min_iters)
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
        val_logits = split_logits(model, x_all["val"], device, settings.calibrate)
        decision, _ = best_decision(val_logits, data.y["val"], settings.calibrate)
        val = _scores(val_logits, decision, data.y["val"])
        current_lr = optimizer.param_groups[0]["lr"]
        curve.append([iteration, val.acc, current_lr, val.bacc])
        if val.bacc > best_val:
            best_val, best_state = val.bacc, copy.deepcopy(model.state_dict())
        for way, (here, there) in enumerate(_crossfit(val_logits, data.y["val"], halves_mask, settings.calibrate)):
            if here > crossfit[way][0]:
                crossfit[way] = [here, there]
        event = saturation.update(val.bacc, iteration)
        bar.set_postfix(val=f"{val.bacc:.3f}", best=f"{best_val:.3f}")
        if event == "drop":
            dropped_at = iteration
            for group in optimizer.param_groups:
                group["lr"] = current_lr * settings.lr_drop
        elif event == "stop":
            saturated = True
            break
    bar.close()
    val_final, test_final, _, _ = _final_scores(model, x_all, data.y, device, settings.calibrate, scale=False)
    model.load_state_dict(best_state)
    val_best, test_best, decision, uncalibrated = _final_scores(model, x_all, data.y, device, settings.calibrate)
    interval = bootstrap_balanced_accuracy(test_best.predictions, data.y["test"])
    return AttackerResult(family, seed, lr, iteration, saturated, dropped_at, val_best.acc, test_best.acc,
                          test_best.ce, val_final.acc, test_final.acc, curve, round(time.time() - started, 2),
                          val_bacc_best=val_best.bacc, test_bacc_best=test_best.bacc, test_bacc_ci95=interval,
                          val_bacc_final=val_final.bacc, test_bacc_final=test_final.bacc,
                          val_bacc_crossfit=crossfit, decision=decision.rule, threshold=decision.threshold,
                          test_bacc_uncalibrated=uncalibrated)


# --------------------------------------------------------------------------- information estimate


def label_entropy_bits(labels: torch.Tensor, num_classes: int) -> float:
    counts = torch.bincount(labels, minlength=num_classes).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def information_bits(labels: torch.Tensor, num_classes: int, cross_entropy_nats: float) -> float:
    """H(U) - CE (eq. 2): the attacker's cross-entropy upper-bounds H(U | E), so the difference
    is a lower bound on the information I(E; U) the encoding leaks about the attribute."""
    return label_entropy_bits(labels, num_classes) - cross_entropy_nats / math.log(2)
