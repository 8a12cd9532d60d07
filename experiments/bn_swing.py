"""Where do an attacker's validation swings come from? A diagnostic of one run's adaptive attacker.

    python experiments/bn_swing.py RUN [--task g1c0] [--lr 1e-4] [--iters 3000] [--views 8]

Plain verify scores an attacker every ``eval_every`` iterations in eval mode, with the BatchNorm
running statistics it collected while training, and keeps the best-validation checkpoint. On the
demo's encoders those scores swing by up to 20 points between evaluations 50 iterations apart,
so longer patience buys more draws. This trains the adaptive attacker (the run's saved private
classifier, fine-tuned) and scores it every 50 iterations four ways:

- ``running``: as verify does;
- ``precise``: BatchNorm statistics re-estimated on 4,096 training encodings first;
- ``calibrated``: the precise model with its decision threshold tuned on validation (binary tasks);
- ``split``: BatchNorm normalizing each split with that split's own statistics (the whole split
  as one batch in training mode: an attacker holding many encodings can do this), and the
  threshold tuned on validation (binary tasks).

Printed: each evaluation, then per way the best score, the mean of the last ten evaluations
and the mean step between evaluations, on validation and on test. It writes nothing.

The diagnostic behind ``verify.calibrate``, which builds the last two ways into every attacker
(:func:`privenc.attackers.best_decision`); kept as it ran for docs/results.md (2026-12-02).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from privenc.adversaries import saved_adversaries
from privenc.attackers import balanced_accuracy, encode_for_attackers, score_split
from privenc.config import load_config
from privenc.encoders import load_encoder_spec


def precise(model: nn.Module, x_train: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are the plain average over 4,096 training inputs."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average
    copied.train()
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))[:4096]
    with torch.no_grad():
        for start in range(0, len(order), 256):
            copied(x_train[order[start:start + 256]])
    return copied.eval()


def calibrated(model: nn.Module, x_val, y_val, x_test, y_test, own_statistics: bool) -> tuple[float, float]:
    """Balanced accuracy on validation and test with the logit-difference threshold best on
    validation; ``own_statistics``: each split normalized by its own BatchNorm statistics."""
    model = copy.deepcopy(model).train(own_statistics)
    with torch.no_grad():
        val, test = ((lambda out: out[:, 1] - out[:, 0])(model(x)) for x in (x_val, x_test))
    thresholds = torch.quantile(val, torch.linspace(0.02, 0.98, 97)).tolist()
    best = max(thresholds, key=lambda t: balanced_accuracy((val > t).long(), y_val))
    return balanced_accuracy((val > best).long(), y_val), balanced_accuracy((test > best).long(), y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--task", default="g1c0")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--views", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    encoder = load_encoder_spec(args.run, load_config(f"{args.run}/config.toml"), device)
    data = encode_for_attackers(encoder, args.task, args.views, 64, device)
    x, y = data.x, data.y
    model = saved_adversaries(encoder, args.task)[0].classifier(encoder, x["train"].shape[1], data.num_classes,
                                                               x["train"].shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    ways = {"running": [], "precise": [], "calibrated": [], "split": []}  # (val, test) per evaluation
    for iteration in range(1, args.iters + 1):
        index = torch.randint(len(x["train"]), (64,), generator=generator)
        loss = F.cross_entropy(model(x["train"][index]), y["train"][index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if iteration % 50:
            continue
        fixed = precise(model, x["train"])
        for name, scored in (("running", model), ("precise", fixed)):
            ways[name].append(tuple(score_split(scored, x[s], y[s], device).bacc for s in ("val", "test")))
        if data.num_classes == 2:
            ways["calibrated"].append(calibrated(fixed, x["val"], y["val"], x["test"], y["test"], False))
            ways["split"].append(calibrated(model, x["val"], y["val"], x["test"], y["test"], True))
        print(iteration, "  ".join(f"{name} {100 * v[-1][0]:.1f}/{100 * v[-1][1]:.1f}" for name, v in ways.items()
                                   if v), flush=True)
    for name, scores in ways.items():
        for split, column in (("val", 0), ("test", 1)):
            values = [s[column] for s in scores]
            if len(values) < 2:
                continue
            step = statistics.mean(abs(b - a) for a, b in zip(values, values[1:]))
            print(f"{name} {split}: best {100 * max(values):.1f}  last ten {100 * statistics.mean(values[-10:]):.1f}"
                  f"  mean step {100 * step:.1f}")


if __name__ == "__main__":
    main()
