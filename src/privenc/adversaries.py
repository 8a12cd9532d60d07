"""The adversarial classifiers a training run ended against, as the starting points of attackers
that know the defence: the audit's ``adaptive`` attack, and ``adaptive`` among ``[verify]``'s
attackers.

The encoder was only ever trained to fool these classifiers and their predecessors, not to be
robust to a few more steps of them (docs/results.md, 2026-12-01, measures what that gives).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from privenc import checkpoint as ckpt
from privenc import runs
from privenc.encoders import LoadedEncoder
from privenc.errors import CheckpointError
from privenc.models import Classifier

ADAPTIVE = "adaptive"
"""The attacker family of ``[verify]`` that starts from a saved adversary instead of from scratch."""


def fresh_families(families: list[str]) -> list[str]:
    """The families of ``families`` that train from scratch (all but :data:`ADAPTIVE`)."""
    return [family for family in families if family != ADAPTIVE]


@dataclass(frozen=True)
class SavedAdversary:
    """One private classifier of a run's checkpoint: ``member`` of ``members`` for one task."""

    member: int
    members: int
    slot: int
    step: int
    weights: dict[str, torch.Tensor]
    path: Path

    def classifier(self, encoder: LoadedEncoder, channels: int, num_classes: int, size: int) -> Classifier:
        """A classifier of the run's architecture holding these weights (strictly loaded)."""
        model = Classifier(encoder.config.classifier, channels, num_classes, size)
        ckpt.load_state(model, self.weights, f"{self.path}: private classifier {self.slot} (member {self.member})")
        return model


def adaptive_reason(encoder: LoadedEncoder, task: str) -> str | None:
    """Why no saved adversary can start an attacker of ``task`` on ``encoder`` (None: one can).
    Only a training run folder holds the classifiers its encoder was trained against, and only
    for its private tasks."""
    if encoder.kind != "learned":
        return f"the {encoder.kind} baseline was not trained against an adversarial classifier"
    if encoder.exported is not None:
        return f"an exported {encoder.exported} file holds no adversarial classifier; audit the run it came from"
    if encoder.run_dir is None:
        return "an encoder file alone holds no adversarial classifier; give its training run folder"
    private = encoder.config.train.private
    if task not in private:
        return f"the encoder was not trained against {task} (its private tasks: {', '.join(private)})"
    path = encoder.run_dir / runs.CHECKPOINT_FILE
    if not path.is_file():
        return f"the run has no checkpoint ({path}) holding its adversarial classifiers"
    saved, final = int(ckpt.load(path)["step"]), int(ckpt.load(encoder.run_dir / runs.ENCODER_FILE)["step"])
    if saved != final:  # a run continued after its encoder was written: not the classifiers it ended against
        return f"the checkpoint is of step {saved} but the encoder of step {final}"
    return None


def saved_adversaries(encoder: LoadedEncoder, task: str) -> list[SavedAdversary]:
    """Every private classifier of ``task`` in the run's checkpoint (each member of an ensemble);
    call only where :func:`adaptive_reason` is None."""
    train = encoder.config.train
    path = encoder.run_dir / runs.CHECKPOINT_FILE
    payload = ckpt.load(path)
    members = getattr(train, "private_ensemble", 1)  # K classifiers per private task, at task_index * K + member
    saved = payload["private_classifiers"]
    slots = {key.split(".", 1)[0] for key in saved}
    if len(slots) != len(train.private) * members:
        raise CheckpointError(f"{path} holds {len(slots)} private classifiers; the run's config says "
                              f"{len(train.private)} private task(s) x {members} per task")
    found = []
    for member in range(members):
        slot = train.private.index(task) * members + member
        weights = {key.split(".", 1)[1]: value for key, value in saved.items() if key.split(".", 1)[0] == str(slot)}
        found.append(SavedAdversary(member, members, slot, int(payload["step"]), weights, path))
    return found
