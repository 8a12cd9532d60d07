"""The audit's verdict per task: the worst case over every attacker of the zoo search and of
the extra attacks (chosen on validation, reported on test as balanced accuracy with its
interval), against chance, plain verification and Identity, with the best of each attack and
the attacks skipped and why; and audit.md, the verdicts as a person reads them.
"""

from __future__ import annotations

from typing import Any

from privenc.verification import selection_score

WORST_CASE_KEYS = ("attack", "attacker", "seed", "lr", "round", "patience", "views", "iters", "saturated",
                   "val_bacc_best", "test_bacc_best", "test_bacc_ci95", "test_acc_best", "info_bits", "detail",
                   "decision", "test_bacc_uncalibrated")
"""What the verdict quotes of the chosen attacker (``round`` is None and ``detail`` says what
else identifies it for an extra attack)."""

STOPPED = {"max_rounds": "the round budget", "max_minutes": "the time budget"}


def verdict(task: str, role: str, records: list[dict[str, Any]], rounds: list[dict[str, Any]], stopped_by: str,
             margin: float, identity: dict[str, Any] | None, fail_above: float | None,
             attacks: list[dict[str, Any]] = (), stop_rule: str = "validation") -> dict[str, Any]:
    """``records``: the zoo's trials (rounds); ``attacks``: the outcomes of the extra attacks
    (:func:`privenc.attacks.run_attack`), whose records join the choice of the worst case.
    ``stop_rule``: which rise decided convergence (:data:`privenc.audit.STOP_RULES`)."""
    extra = [r for outcome in attacks for r in outcome.get("records", [])]
    # Chosen on validation, as verify chooses; the zoo comes first, so it wins a tie.
    worst = {"attack": "zoo", "round": None, "detail": None,
             **max([*records, *extra], key=selection_score)}
    plain = max((r for r in records if r["round"] == 0), key=selection_score)
    above = 100 * (worst["test_bacc_best"] - worst["bacc_chance"])
    return {
        "task": task, "role": role,
        "converged": stopped_by == "margin", "stopped_by": stopped_by, "rounds_run": len(rounds),
        "stop_rule": stop_rule,
        # the best validation score's rise (what the default rule reads) and the confirmed one,
        # free of the lift of choosing among more attackers (privenc.audit.confirmed_score)
        "last_rise_points": _points(rounds[-1]["rise"]),
        "last_confirmed_rise_points": _points(rounds[-1].get("confirmed_rise")),
        "rounds": rounds,
        "worst_case": {key: worst.get(key) for key in WORST_CASE_KEYS},
        "attacks": [_attack_summary("zoo", records), *(
            {"attack": o["attack"], "skipped": o["skipped"]} if "skipped" in o
            else _attack_summary(o["attack"], o["records"]) for o in attacks)],
        "majority_rate": worst["chance"], "bacc_chance": worst["bacc_chance"], "n_test": worst["n_test"],
        "above_chance_points": above,
        # the interval reaches chance: no evidence that the attacker beats guessing
        "at_chance": worst["test_bacc_ci95"][0] <= worst["bacc_chance"],
        "plain_verify_test_bacc": plain["test_bacc_best"],
        "identity_test_bacc": None if identity is None else identity.get("test_bacc_best"),
        "identity_test_bacc_ci95": None if identity is None else identity.get("test_bacc_ci95"),
        "failed": fail_above is not None and above > fail_above,
    }


def _points(rise: float | None) -> float | None:
    return None if rise is None else 100 * rise


def deciding_rise_points(v: dict[str, Any]) -> tuple[float | None, str]:
    """(the rise in points that the verdict's stopping rule read, what it was measured on)."""
    confirmed = v.get("last_confirmed_rise_points")
    if v.get("stop_rule", "validation") == "confirmed" and confirmed is not None:
        return confirmed, "confirmed rise"
    return v["last_rise_points"], "rise of the best validation score"


def _attack_summary(name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One attack's row: its attacker chosen on validation, and that attacker's test numbers."""
    best = max(records, key=selection_score)
    return {"attack": name, "attackers": len(records), "best_val_bacc": selection_score(best),
            "test_bacc_best": best["test_bacc_best"], "test_bacc_ci95": best["test_bacc_ci95"],
            "detail": best.get("detail")}  # e.g. the reconstruction's PSNR and SSIM


def verdict_line(v: dict[str, Any], margin: float) -> str:
    w = v["worst_case"]
    lo, hi = w["test_bacc_ci95"]
    text = (f"{v['task']} ({v['role']}): worst case ({w['attack']}) {100 * w['test_bacc_best']:.1f}% balanced "
            f"accuracy [{100 * lo:.1f}, {100 * hi:.1f}], {v['above_chance_points']:+.1f} points vs chance "
            f"{100 * v['bacc_chance']:.1f}% ({'at chance' if v['at_chance'] else 'above chance'}); accuracy "
            f"{100 * w['test_acc_best']:.1f}%, majority rate {100 * v['majority_rate']:.1f}%; "
            f"{w['info_bits']:.3f} bits; plain verify {100 * v['plain_verify_test_bacc']:.1f}%")
    if v["identity_test_bacc"] is not None:
        text += f"; Identity {100 * v['identity_test_bacc']:.1f}%"
    rise, measure = deciding_rise_points(v)
    if v["stopped_by"] == "zoo_left_out":
        text += ". The zoo search beyond round 0 was left out (--attacks)."
    elif v["converged"]:
        text += f". Converged after round {v['rounds_run'] - 1} (last {measure} {rise:.2f} < {margin:g} points)."
    else:
        budget = STOPPED[v["stopped_by"]]
        still = ("no round after round 0 to compare" if rise is None
                 else f"the last round still rose {rise:.2f} points ({measure})")
        text += f". NOT converged: {budget} ran out after round {v['rounds_run'] - 1}; {still}."
    validation, confirmed = v["last_rise_points"], v.get("last_confirmed_rise_points")
    if measure == "confirmed rise" and validation is not None:
        text += f" The best validation score over all attackers rose {validation:.2f} points in that round."
    elif confirmed is not None and v["stopped_by"] != "zoo_left_out":
        text += (f" Confirmed rise {confirmed:.2f} points (free of the lift of choosing among more attackers; "
                 f"--stop-rule confirmed stops on it).")
    if v["failed"]:
        text += " FAILED the --fail-above gate."
    return text


def _wall(seconds: float) -> str:
    """A round's wall time in this call (a resumed round that reads its trials back: ~0 s)."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def audit_markdown(result: dict[str, Any]) -> str:
    margin = result["margin_points"]
    label = f" ({result['encoder_label']})" if result.get("encoder_label") else ""
    lines = [f"# privenc audit: {result['encoder']}{label}", "",
             f"Margin {margin:g} points of validation balanced accuracy ("
             + ("the confirmed rise: the attacker best on one half of validation scored on the other, "
                "both ways" if result.get("stop_rule", "validation") == "confirmed"
                else "the rise of the best validation score")
             + f"); at most {result['max_rounds']} rounds"
             + (f" and {result['max_minutes']:g} minutes" if result["max_minutes"] is not None else "")
             + f"; {result['seconds']:.0f} s of wall time in this invocation"
             + (f", {result['attacker_seconds']:.0f} attacker-seconds in all (summed over every attacker and "
                f"attack, those of earlier invocations included)" if "attacker_seconds" in result else "")
             + ".", "",
             "Attacks: " + "; ".join(f"`{name}`, {text}" for name, text in result["attack_summaries"].items())
             + ".", ""]
    for task, v in result["verdicts"].items():
        w = v["worst_case"]
        figure = [f"![{task}: every attack and the rounds]({v['figure']})", ""] if v.get("figure") else []
        lines += [f"## {task}", "", verdict_line(v, margin), "", *figure,
                  f"Chosen on validation: attack `{w['attack']}`, `{w['attacker']}` lr {w['lr']:g} seed {w['seed']}"
                  + (f" of round {w['round']}" if w["round"] is not None else "")
                  + (f", {w['detail']}" if w["detail"] else "")
                  + f" (patience {w['patience']}, views {w['views']}, {w['iters']} iterations"
                  f"{'' if w['saturated'] else ', not saturated'}"
                  + (f"; decision rule {w['decision']}, {100 * w['test_bacc_uncalibrated']:.1f}% on test by argmax"
                     if w.get("decision") not in (None, "argmax") and w.get("test_bacc_uncalibrated") is not None
                     else "")
                  + "); validation balanced accuracy "
                  f"{100 * w['val_bacc_best']:.1f}%.", "",
                  "| attack | attackers | best val bal. acc | its test bal. acc [95% CI] |", "|---|---|---|---|"]
        for a in v["attacks"]:
            if "skipped" in a:
                lines.append(f"| {a['attack']} | skipped: {a['skipped']} | — | — |")
            else:
                lo, hi = a["test_bacc_ci95"]
                name = a["attack"] + (f" ({a['detail']})" if a.get("detail") else "")
                lines.append(f"| {name} | {a['attackers']} | {100 * a['best_val_bacc']:.1f}% "
                             f"| {100 * a['test_bacc_best']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] |")
        lines += ["",
                  "| round | attackers | families | learning rates | seeds | patience | views | max iterations "
                  "| round's best val bal. acc | best so far | rise (points) | confirmed so far "
                  "| confirmed rise (points) | wall time, this call |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        walls = result.get("round_seconds", {}).get(task, [])
        for r in v["rounds"]:
            wall = _wall(walls[r["round"]]) if r["round"] < len(walls) else "—"
            rise = "—" if r["rise"] is None else f"{100 * r['rise']:.2f}"
            confirmed = "—" if r.get("confirmed_bacc") is None else f"{100 * r['confirmed_bacc']:.1f}%"
            confirmed_rise = "—" if r.get("confirmed_rise") is None else f"{100 * r['confirmed_rise']:.2f}"
            lines.append(f"| {r['round']} | {r['attackers']} | {', '.join(r['families'])} "
                         f"| {', '.join(f'{x:g}' for x in r['lrs'])} | {', '.join(map(str, r['seeds']))} "
                         f"| {r['patience']} | {r['views']} | {r['max_iters']} | {100 * r['round_best_val_bacc']:.1f}% "
                         f"| {100 * r['best_val_bacc']:.1f}% | {rise} | {confirmed} | {confirmed_rise} | {wall} |")
        lines.append("")
    lines += ["Balanced accuracy is the mean per-class recall; its chance level is 1/K for K classes, and "
              "\"points vs chance\" is the worst case minus 1/K. The interval is a bootstrap over the test images "
              "(1000 resamples, each class within itself); \"at chance\" means it reaches 1/K. bits: H(task) "
              "minus the attacker's test cross-entropy (calibrated attackers: of their logits after a temperature "
              "and bias fitted on validation), a lower bound on the information the encoding leaks; below 0 it "
              "bounds nothing.",
              ""]
    if result["fail_above_points"] is not None:
        gate = ", ".join(result["failed"]) or "none"
        lines += [f"Gate --fail-above {result['fail_above_points']:g} points: failed tasks: {gate}.", ""]
    return "\n".join(lines)
