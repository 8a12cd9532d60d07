"""How often each stopping rule of `privenc audit` stops after round 1, by simulation.

    python experiments/stop_rule.py [--sims 400] [--margin 1.0]

The audit stops when a round raises the worst case by less than a margin. Measured on the best
validation score over all attackers (``--stop-rule validation``, the default), that rise
includes what choosing the best of more attackers adds by chance. Measured on held-out halves
(``--stop-rule confirmed``: the attacker best on one half of validation scored on the other,
both ways, averaged) it does not, but each score rests on half the images. This simulates the
two, and the one-way variant (chosen on one half, scored on the other), on a balanced binary
task:

- round 0: ``--round0`` attackers (plain verify's seeds) of true accuracy P0;
- round 1: ``--round1`` attackers, a quarter of them (one family of four) of true accuracy
  P0 + delta, the others P0;
- each attacker is right on each validation image with its true accuracy; with probability
  rho it copies a draw shared by all attackers for that image (attackers err on the same hard
  images), otherwise it draws on its own. rho 0 is the most selection can add.

Printed: per validation size, rho and delta, the fraction of simulated audits that each rule
calls converged after round 1 (a rise below the margin). With delta 0 the right answer is to
stop; with delta above the margin, to go on. The attackers of a real audit are neither
independent nor equally good, so these are the rules' behaviour under a model, not a
measurement of any audit (docs/results.md, 2026-12-01, has both).
"""

from __future__ import annotations

import argparse

import numpy as np


def simulate(n_val: int, rho: float, delta: float, args: argparse.Namespace,
             rng: np.random.Generator) -> tuple[float, float]:
    """(fraction converged by the validation rule, by the confirmed rule)."""
    half = np.arange(n_val) % 2 == 1  # confirmation half (the classes are balanced and interleaved)
    accuracies = np.array([args.p0] * args.round0 + [args.p0 + delta / 100] * (args.round1 // 4)
                          + [args.p0] * (args.round1 - args.round1 // 4))
    stops = np.zeros(3)
    for _ in range(args.sims):
        shared = rng.random(n_val) < args.p0  # the images every copying attacker gets right
        copy = rng.random((len(accuracies), n_val)) < rho
        own = rng.random((len(accuracies), n_val)) < accuracies[:, None]
        right = np.where(copy, shared[None, :], own)
        # a better attacker also gets right some images that the shared draw gets wrong
        better = accuracies > args.p0
        lift = rng.random((int(better.sum()), n_val)) < (accuracies[better, None] - args.p0) / (1 - args.p0)
        right[better] |= copy[better] & lift
        full, selection, confirmation = right.mean(1), right[:, ~half].mean(1), right[:, half].mean(1)
        r0 = slice(0, args.round0)
        validation_rise = full.max() - full[r0].max()
        confirmed_rise = confirmation[selection.argmax()] - confirmation[r0][selection[r0].argmax()]
        swapped_rise = selection[confirmation.argmax()] - selection[r0][confirmation[r0].argmax()]
        crossed_rise = (confirmed_rise + swapped_rise) / 2
        stops += [validation_rise < args.margin / 100, confirmed_rise < args.margin / 100,
                  crossed_rise < args.margin / 100]
    return tuple(stops / args.sims)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sims", type=int, default=400)
    parser.add_argument("--margin", type=float, default=1.0, help="points (default 1)")
    parser.add_argument("--p0", type=float, default=0.75, help="round 0's true accuracy (default 0.75)")
    parser.add_argument("--round0", type=int, default=3, help="attackers in round 0 (default 3)")
    parser.add_argument("--round1", type=int, default=32, help="attackers in round 1 (default 32)")
    parser.add_argument("--n-val", type=int, nargs="+", default=[300, 864, 1900])
    parser.add_argument("--rho", type=float, nargs="+", default=[0.0, 0.7])
    parser.add_argument("--delta", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"converged after round 1 (margin {args.margin:g} points; {args.sims} simulated audits per row; "
          f"round 0: {args.round0} attackers at {100 * args.p0:.0f}%, round 1: {args.round1}, a quarter of them "
          f"delta better)\n")
    print("| validation images | rho | delta (points) | validation rule | confirmed, one way | confirmed, both ways |")
    print("|---|---|---|---|---|---|")
    for n_val in args.n_val:
        for rho in args.rho:
            for delta in args.delta:
                rates = simulate(n_val, rho, delta, args, rng)
                print(f"| {n_val} | {rho:g} | {delta:g} | " + " | ".join(f"{100 * r:.0f}%" for r in rates) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
