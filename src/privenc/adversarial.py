"""The two-player step of adversarial encoder training (Sec. 3 of the paper).

Like the dcgan example: (1) update the classifiers on detached encodings, (2) update the
encoder against the fixed classifiers. The two steps take different mini-batches (the caller
passes them); each returns a dict of floats for logging.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from privenc import losses
from privenc.norms import output_variance

ACCURACY_SUFFIX = "_train_acc"
"""Logged training accuracies end with it; they are NaN for a batch without a known label."""


@dataclass
class Players:
    """The encoder and the classifiers it plays against.

    ``private_classifiers`` is a flat ModuleList of ``n_private * private_ensemble`` classifiers:
    the members of private task ``k`` are at indices ``k * private_ensemble + m`` for
    ``m = 0 .. private_ensemble - 1`` (``train.private_ensemble``; with the default 1 it is one
    classifier per task, index k, as checkpoints of every earlier version hold them).
    ``desirable_classifier`` is one (N+1)-way classifier for N desirable tasks, or None (utility
    then comes only from the variance constraint built into the encoder's output normalization).
    """

    encoder: nn.Module
    private_classifiers: nn.ModuleList
    desirable_classifier: nn.Module | None = None
    private_ensemble: int = 1

    def __post_init__(self) -> None:
        if self.private_ensemble < 1 or len(self.private_classifiers) % self.private_ensemble:
            raise ValueError(f"{len(self.private_classifiers)} private classifiers do not make ensembles of "
                             f"{self.private_ensemble}")

    @property
    def n_private(self) -> int:
        return len(self.private_classifiers) // self.private_ensemble

    def members(self, task: int) -> list[nn.Module]:
        """The ensemble of private task ``task`` (a list of one without an ensemble)."""
        k = self.private_ensemble
        return list(self.private_classifiers[task * k:(task + 1) * k])

    def classifiers(self) -> list[nn.Module]:
        found = list(self.private_classifiers)
        if self.desirable_classifier is not None:
            found.append(self.desirable_classifier)
        return found

    def classifier_parameters(self) -> list[nn.Parameter]:
        return [p for c in self.classifiers() for p in c.parameters()]


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def classifier_step(
    players: Players,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    private_labels: torch.Tensor,
    desirable_labels: torch.Tensor | None,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """(1) Classifiers minimize cross-entropy on the true labels of the current encodings.

    ``private_labels`` is (B, P), one column per private task; ``desirable_labels`` is (B,) for
    the (N+1)-way desirable classifier. The encoder is fixed here: encodings are computed
    without gradient, so nothing flows back into it.

    Every member of a private ensemble trains on the same batch: one encoder pass serves all,
    and the members differ by their initialization (and their resets), as Wu et al.'s budget
    models do. The loss is the sum over members, so each member's gradient is exactly the one
    it would get alone. Per task the logged loss is the members' mean, the accuracy the best
    member's (``private{k}_train_acc``, so that a freshly reset member does not make the
    adversary look weaker than its best part); with an ensemble, ``private{k}_mean_train_acc``
    adds the members' mean.
    """
    with torch.no_grad(), _autocast(images.device, amp):
        encodings = players.encoder(images)
    encodings = encodings.detach().float()
    optimizer.zero_grad(set_to_none=True)
    stats: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=images.device)
    with _autocast(images.device, amp):
        for k in range(players.n_private):
            member_losses, member_accuracies = [], []
            for classifier in players.members(k):
                logits = classifier(encodings).float()
                member_losses.append(losses.classifier_loss(logits, private_labels[:, k]))
                member_accuracies.append(_accuracy(logits, private_labels[:, k]))
                total = total + member_losses[-1]
            stats[f"private{k}_loss"] = torch.stack(member_losses).detach().mean()
            stats.update(_member_accuracies(f"private{k}", member_accuracies))
        if players.desirable_classifier is not None:
            logits = players.desirable_classifier(encodings).float()
            loss = losses.classifier_loss(logits, desirable_labels)
            total = total + loss
            stats["desirable_loss"] = loss.detach()
            stats[f"desirable{ACCURACY_SUFFIX}"] = _accuracy(logits, desirable_labels)
    total.backward()
    optimizer.step()
    stats["classifier_loss"] = total.detach()
    return stats


def _member_accuracies(prefix: str, accuracies: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The best member's accuracy under the name a single classifier's has; with more than one
    member, their mean beside it. NaN (no known label) stays NaN in both."""
    if len(accuracies) == 1:
        return {f"{prefix}{ACCURACY_SUFFIX}": accuracies[0]}
    stacked = torch.stack(accuracies)
    return {f"{prefix}{ACCURACY_SUFFIX}": stacked.max(), f"{prefix}_mean{ACCURACY_SUFFIX}": stacked.mean()}


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction right over the images whose label is known; NaN if none is (training leaves
    that step out of the logged mean instead of counting it as 0)."""
    accuracy = losses.mean_over_known((logits.argmax(1) == labels).float(), labels)
    return torch.where(labels.ne(losses.UNKNOWN).any(), accuracy, torch.full_like(accuracy, float("nan")))


def encoder_step(
    players: Players,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    private_labels: torch.Tensor,
    desirable_labels: torch.Tensor | None,
    encoder_loss: str,
    alpha: float,
    amp: bool = False,
    kurtosis_limit: float = 0.0,
) -> dict[str, torch.Tensor]:
    """(2) The encoder minimizes its private term (label flip by default) plus alpha times the
    desirable classifier's cross-entropy (Sec. 3: min_E I_u(E) - alpha I_v(E)), plus, with a
    ``kurtosis_limit``, the excess above it of the kurtosis over the batch of the values its
    tanh receives (:func:`privenc.losses.tail_penalty`; 0 = off, the paper's loss).

    The classifiers are fixed: their parameters get no gradient (requires_grad is switched
    off for the step) and only the encoder's optimizer steps.

    Against an ensemble of K private classifiers the private term is the mean over members of
    the loss against each: the expected loss against an attacker drawn from the ensemble, and a
    gradient from every member. Wu et al. (ECCV 2018) instead suppress only the currently
    strongest budget model (a max over members); that hands the encoder one member's gradient
    at a time and switches abruptly between members, while the mean already leans toward the
    strongest: a member's label-flip (or standard-GAN) loss grows with its confidence.
    """
    classifier_params = players.classifier_parameters()
    for p in classifier_params:
        p.requires_grad_(False)
    try:
        optimizer.zero_grad(set_to_none=True)
        stats: dict[str, torch.Tensor] = {}
        with _autocast(images.device, amp):
            with _pre_tanh_tap(players.encoder, enabled=bool(kurtosis_limit)) as pre_tanh:
                encodings = players.encoder(images).float()
            total = torch.zeros((), device=images.device)
            for k in range(players.n_private):
                # The label flip target is the opposite of what each classifier predicts now,
                # not of the true label: it drives the classifiers to low confidence.
                loss = torch.stack([
                    losses.encoder_private_loss(encoder_loss, classifier(encodings).float(), private_labels[:, k])
                    for classifier in players.members(k)
                ]).mean()  # of one member: that member's loss, to the bit
                total = total + loss
                stats[f"encoder_private{k}_loss"] = loss.detach()
            if players.desirable_classifier is not None:
                logits = players.desirable_classifier(encodings).float()
                utility = losses.classifier_loss(logits, desirable_labels)
                total = total + alpha * utility
                stats["encoder_desirable_loss"] = utility.detach()
            if kurtosis_limit:
                penalty = losses.tail_penalty(pre_tanh[0], kurtosis_limit)
                total = total + penalty
                stats["encoder_tail_penalty"] = penalty.detach()
        total.backward()
        optimizer.step()
    finally:
        for p in classifier_params:
            p.requires_grad_(True)
    stats["encoder_loss"] = total.detach()
    return stats


@contextmanager
def _pre_tanh_tap(encoder: nn.Module, enabled: bool):
    """Within the block, a list that the encoder's forward fills with the input of its final
    tanh (the output normalization's values, which the variance constraint holds to unit
    variance). Read there and not from the tanh outputs: tanh squashes exactly the rare large
    values that a heavy-tailed output hides its variance in (a kurtosis bound on tanh outputs
    left output elements with kurtosis 7-12 before the tanh on lfw-faces: docs/results.md).
    A forward hook on the plain module, so that DDP and torch.compile wrappers run as usual."""
    captured: list[torch.Tensor] = []
    if not enabled:
        yield captured
        return
    plain = encoder
    while hasattr(plain, "module") or hasattr(plain, "_orig_mod"):  # DDP, then torch.compile
        plain = plain._orig_mod if hasattr(plain, "_orig_mod") else plain.module
    tanh = plain.layers[-1]
    if not isinstance(tanh, nn.Tanh):
        raise TypeError(f"train.kurtosis_limit needs an encoder that ends in tanh, got {type(tanh).__name__}")
    handle = tanh.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].float()))
    try:
        yield captured
    finally:
        handle.remove()


def balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in ``labels`` (negative = unlabelled, ignored) of the fraction
    of them predicted right."""
    recalls = [float((predictions[labels == c] == c).float().mean()) for c in labels.unique() if c >= 0]
    return sum(recalls) / len(recalls) if recalls else float("nan")


@torch.no_grad()
def evaluate(
    players: Players,
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
) -> dict[str, float]:
    """Validation accuracy of the current classifiers on the current encoder (Table 1, top
    block: 'within adversarial training'), and collapse diagnostics of the encoder output.

    Accuracies are balanced (the mean of the per-class recalls): the training images are the
    union of every task's images, so a private category is a minority there and plain accuracy
    would credit a classifier that always answers "no"; balanced, chance is 1/K as in the
    verification protocol's balanced test sets. A private ensemble reports its best member
    as ``val_private{k}_acc`` (what the encoder has not yet defeated) and the members' mean as
    ``val_private{k}_mean_acc``.

    Everything runs in eval mode (running statistics), as the fixed encoder would be used.
    Collapse diagnostics (Sec. 4.2): the variance over images of each pre-tanh output element;
    the variance constraint asks for 1 everywhere, a collapsed element has ~0.
    """
    modules = [players.encoder, *players.classifiers()]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        private_hits: list[list[torch.Tensor]] = [[] for _ in players.private_classifiers]
        desirable_hits: list[torch.Tensor] = []
        private_truth: list[torch.Tensor] = []
        desirable_truth: list[torch.Tensor] = []
        outputs = []
        for images, private_labels, desirable_labels in batches:
            encodings = players.encoder(images).float()
            outputs.append(encodings.cpu())
            private_truth.append(private_labels.cpu())
            for i, classifier in enumerate(players.private_classifiers):
                private_hits[i].append(classifier(encodings).argmax(1).cpu())
            if players.desirable_classifier is not None:
                desirable_hits.append(players.desirable_classifier(encodings).argmax(1).cpu())
                desirable_truth.append(desirable_labels.cpu())
        truth = torch.cat(private_truth)
        result: dict[str, float] = {}
        for k in range(players.n_private):
            # as in training: the best member under the single classifier's name, then the mean
            members = range(k * players.private_ensemble, (k + 1) * players.private_ensemble)
            accuracies = [balanced_accuracy(torch.cat(private_hits[i]), truth[:, k]) for i in members]
            result[f"val_private{k}_acc"] = max(accuracies)
            if len(accuracies) > 1:
                result[f"val_private{k}_mean_acc"] = sum(accuracies) / len(accuracies)
        if players.desirable_classifier is not None:
            result["val_desirable_acc"] = balanced_accuracy(torch.cat(desirable_hits), torch.cat(desirable_truth))
        result.update(output_variance(torch.cat(outputs)))
        return result
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
