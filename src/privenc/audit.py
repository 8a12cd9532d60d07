"""``privenc audit``: the strongest attacker a user can face, searched until it stops rising.

Plain verification trains one attacker family at one learning rate with short patience; on
real photos that was measured far too optimistic (issue 16: 55.3% by a preset-like protocol,
70.4% by a patient one, still rising). An audit widens the search round by round:

- round 0 is the encoder's own ``[verify]`` settings: what ``privenc verify`` reports;
- round k >= 1 trains the whole zoo (``paper``, ``wide``, ``mlp``, ``linear``) with 2^k times
  the patience and the iteration cap, 2^k times the augmented views (at most 8, or the
  settings' own if more), k more seeds, and the learning rates {own, 1e-3, 1e-4}, from round 2
  also the paper's 1e-5 (Sec. 4.1 trains attackers on encodings at 1e-5), every attacker scored
  also with calibrated decision rules (``verify.calibrate``: a threshold tuned on validation,
  each split normalized by its own BatchNorm statistics; the best on validation is kept);

until one more round raises the best *validation* balanced accuracy over all rounds so far by
less than a margin (``stop_rule="validation"``, the default). A hard budget (rounds, minutes)
stops it otherwise, and the verdict says "not converged" and by how much the last round still
rose.

That rise includes what choosing the best of more attackers adds by chance (measured: +1.74
points in a third round on lfw-faces while the chosen attacker's test score fell), so beside it
every round reports a *confirmed* rise, free of that selection: the validation images are split
once into two class-stratified halves (:func:`~privenc.attackers.confirmation_split`); the
attacker best on one half, at its checkpoint best on that half, is scored on the other, and the
other way round, and the confirmed score is the mean of the two (cross-fitting). Choosing the
checkpoint on the same half matters: with round 2's doubled patience an attacker evaluates
many more checkpoints, and one chosen on the whole split is lifted on both halves (the likely
reason a first version, which did so, read a 1.78-point confirmed rise on lfw-faces where test
did not rise: docs/results.md, 2026-12-01). ``stop_rule="confirmed"`` stops on it instead. It is
not the default because it is noisier: each score rests on half the images, so it stops early
more often where a round did find a better attacker (simulated by ``experiments/stop_rule.py``),
and stopping early weakens the attack while running on costs only time. Saturation still reads
the whole split, so the confirmation half is not entirely unseen by an attacker's stopping
time. The checkpoint an attacker keeps, and the worst case, are chosen on the whole validation
split either way, as plain verify chooses.

The attacker chosen on validation is then reported on test: balanced accuracy with its
bootstrap interval, accuracy and the majority rate, the information estimate in bits, and
Identity's number when given.

"Above chance" is always balanced accuracy minus its chance level 1/K (K = classes in the test
set): what an attacker that ignores its input scores, whatever the class frequencies. On the
paper's balanced detection tasks 1/K is also the majority rate, so the points are the same as
"above the majority rate" there; on an unbalanced attribute accuracy's majority rate would
hide an attacker that finds the minority class.

Resumable like the grid: each finished trial (attacker x learning rate x seed of one round) is
written atomically to ``OUT/trials/<task>/<trial>.json`` and a rerun reads it back instead of
training it again; so a rerun with a larger budget continues where the last one stopped.
Trials of a round run in parallel processes (``jobs``); round 1's are queued behind round 0's
from the start (round 0 cannot converge: there is nothing to rise from), so that a worker round
0 leaves idle starts on them, unless ``max_minutes`` must be checked before round 1.

After the zoo search of a task, the extra attacks of :mod:`privenc.attacks` run (``attacks``
chooses which; default all): the adaptive attacker, fine-tuned from the adversarial classifier
the encoder was trained against (a run folder with its checkpoint, on a task it was trained
against), and the multi-scale attacker, trained on encodings of views at several scales (every
encoder). They train under the protocol of the widest round the search ran (at least round 1's:
its patience, views, iteration cap and learning rates; the first seed), and are kept in
``OUT/attacks/<task>/<name>.json``. With ``jobs`` > 1 each is a job of the trials' process pool,
submitted as soon as its task's search has stopped (that protocol is all it depends on), so it
runs beside the other attacks and the next task's search; with ``jobs`` = 1 they run one after
another in this process. Every job is seeded as in this process, so the records are the same
either way, up to the last digits that CPU sums can change with the thread count (a worker runs
on cpu_count / jobs threads). The worst case is chosen on validation over the zoo and these; an
attack that does not apply is listed with the reason. Round 0 stays what plain
verification reports; without ``zoo`` among the attacks only round 0 of the search runs.

What each encoder gets: a run folder (or its encoder.pt) every attack; an encoder file alone or
a ``.safetensors`` / ``.torchscript.pt`` / ``.onnx`` export, on the config's data, all but the
adaptive attacker; Identity and Blur the zoo and the multi-scale attacker. ``privenc audit
--all-attributes`` adds every attribute of the encoder's data as a task
(:func:`privenc.encoders.all_attribute_tasks`): leakage of what it was never trained against.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from privenc.adversaries import ADAPTIVE, adaptive_reason, saved_adversaries
from privenc.atomic import atomic_write_text, ensure_writable, read_finished
from privenc.attackers import Encoded, encode_for_attackers
from privenc.attacks import (
    REGISTRY,
    ZOO,
    AttackContext,
    compute_outcome,
    known_outcome,
    parse_attacks,
    read_outcome,
    run_attack,
    summaries,
)
from privenc.config import ATTACKERS, Config, VerifyConfig, config_diff, from_dict
from privenc.distributed import resolve_device
from privenc.encoders import (
    LoadedEncoder,
    assert_unchanged,
    attacker_lr,
    check_tasks,
    freeze,
    learned_encoder_path,
    load_encoder_spec,
)
from privenc.errors import ConfigError
from privenc.models import build_attacker
from privenc.pools import spawn_pool
from privenc.runs import ENCODER_FILE, refuse_run_folder
from privenc.verdict import audit_markdown, verdict
from privenc.verification import attacker_record, roles_from_run, selection_score, strongest, verify

log = logging.getLogger(__name__)

LR_LADDER = (1e-3, 1e-4, 1e-5)
"""Learning rates added round by round: the presets' 1e-3, then 1e-4, then the paper's 1e-5."""
MAX_VIEWS = 8
"""Views stop doubling here: more views cost memory linearly (Identity caches raw images)."""
STOP_RULES = ("validation", "confirmed")
"""What a round's rise is measured on: the best validation score over all attackers (default),
or the cross-fitted confirmed score (:func:`confirmed_score`)."""
PLAN_FILE = "plan.json"
AUDIT_FILE = "audit.json"
"""The verdicts of a finished audit (what ``privenc report`` reads of an audit folder)."""


@dataclass(frozen=True)
class Trial:
    """One attacker of one round: a family at a learning rate and seed, under a round's protocol."""

    round: int
    family: str
    lr: float
    seed: int
    patience: int
    views: int
    max_iters: int
    member: int = 0
    """For ``adaptive``: which saved adversary of the task it starts from (an ensemble has K)."""
    calibrate: bool = False
    """Scored also with calibrated decision rules (``verify.calibrate``; every round from 1)."""

    @property
    def name(self) -> str:
        member = f"_m{self.member}" if self.member else ""
        calibrated = "_cal" if self.calibrate else ""
        return f"r{self.round}_{self.family}{member}_lr{self.lr:g}_s{self.seed}{calibrated}"


def converged(rise: float, margin: float) -> bool:
    """Whether a round's rise of balanced accuracy (a fraction; see :func:`deciding_rise`) is less
    than ``margin`` points. Scores are float32 fractions of whole images, so a rise of exactly
    the margin (3 more right of 300) can come out a hair below it; that is not less."""
    return rise < margin / 100 - 1e-6


def confirmed_score(records: list[dict[str, Any]]) -> float | None:
    """The validation score of the best of ``records`` without the lift of choosing it: the
    attacker, and its checkpoint, best on one half of validation, scored on the other half; both
    ways, averaged. Attackers tied on the choosing half count alike (the mean of their scores on
    the other), so the score does not depend on the order of the records. None when a record has
    no cross-fitted scores (written before they were kept)."""
    if not records or any(len(r.get("val_bacc_crossfit") or ()) != 2 for r in records):
        return None
    ways = []
    for way in (0, 1):
        pairs = [r["val_bacc_crossfit"][way] for r in records]
        best = max(chosen for chosen, _ in pairs)
        ways.append(statistics.mean(other for chosen, other in pairs if chosen == best))
    return sum(ways) / 2


def deciding_rise(last_round: dict[str, Any], stop_rule: str) -> float | None:
    """The rise the stopping rule reads from a round (the validation rise where no confirmed one
    could be measured)."""
    confirmed = last_round.get("confirmed_rise")
    return confirmed if stop_rule == "confirmed" and confirmed is not None else last_round["rise"]


def attack_protocol(settings: VerifyConfig, lr: float, k: int) -> tuple[VerifyConfig, tuple[float, ...], int]:
    """(settings, learning rates, seed) of the extra attacks after a search whose widest round
    was ``k``: that round's patience, views, iteration cap and learning rates (at least round
    1's, so that an extra attack is never narrower than the zoo's first widening), one seed."""
    trials = round_trials(settings, lr, max(1, k))
    first = trials[0]
    widened = dataclasses.replace(settings, patience=first.patience, views=first.views, max_iters=first.max_iters,
                                  calibrate=first.calibrate)
    return widened, tuple(dict.fromkeys(t.lr for t in trials)), settings.seeds[0]


def round_trials(settings: VerifyConfig, lr: float, k: int) -> list[Trial]:
    """The attackers of round ``k`` (see the module docstring); ``lr`` is the encoder's own
    attacker learning rate (``verify.lr``, or ``verify.lr_raw`` on raw pixels: :func:`attacker_lr`;
    round 0's ``adaptive`` takes ``verify.lr_adaptive`` where set, as plain verify does)."""
    if k == 0:
        return [Trial(0, family, settings.family_lr(family, lr), seed, settings.patience, settings.views,
                      settings.max_iters, calibrate=settings.calibrate)
                for family in settings.attackers for seed in settings.seeds]
    extra = [s for s in range(max(settings.seeds, default=-1) + 1, max(settings.seeds, default=-1) + 1 + k)]
    seeds = [*settings.seeds, *extra]
    lrs = list(dict.fromkeys([lr, *LR_LADDER[:min(k, 2) + 1]]))
    views = min(settings.views * 2 ** k, max(settings.views, MAX_VIEWS))
    return [Trial(k, family, rate, seed, settings.patience * 2 ** k, views, settings.max_iters * 2 ** k, calibrate=True)
            for family in ATTACKERS for rate in lrs for seed in seeds]


def _with_adversaries(trials: list[Trial], encoder: LoadedEncoder, task: str) -> list[Trial]:
    """``trials`` with each ``adaptive`` one (round 0, from ``verify.attackers``) once per saved
    adversary of ``task``, or left out where none applies, as :func:`privenc.verification.verify`
    does: round 0 stays what plain verify reports."""
    if all(t.family != ADAPTIVE for t in trials):
        return trials
    members = 0 if adaptive_reason(encoder, task) is not None else len(saved_adversaries(encoder, task))
    return [dataclasses.replace(t, member=m) for t in trials for m in (range(members) if t.family == ADAPTIVE else [0])]


# --------------------------------------------------------------------------- one trial (in a worker)


# Per process: the loaded encoder and the encodings of the latest (task, views); a worker runs
# many trials of one round, and encoding again for each would cost more than a small attacker.
_CACHE: dict[str, Any] = {}


def _loaded(spec: str, config_dict: dict[str, Any],
            device: torch.device) -> tuple[LoadedEncoder, dict[str, torch.Tensor]]:
    """The encoder of ``spec`` (frozen) and its snapshot, loaded once per process."""
    key = json.dumps([spec, config_dict, str(device)], sort_keys=True, default=str)
    if _CACHE.get("key") != key:
        encoder = load_encoder_spec(spec, from_dict(config_dict), device)
        _CACHE.clear()
        _CACHE.update(key=key, encoder=encoder, snapshot=freeze(encoder.module))
    return _CACHE["encoder"], _CACHE["snapshot"]


def _encoded(spec: str, config_dict: dict[str, Any], task: str, views: int,
             device: torch.device) -> tuple[LoadedEncoder, dict[str, torch.Tensor], Encoded]:
    encoder, _ = _loaded(spec, config_dict, device)
    if _CACHE.get("data_key") != (task, views):
        _CACHE.pop("encoded", None)  # free the previous views first: Identity's can be large
        _CACHE["encoded"] = encode_for_attackers(encoder, task, views, encoder.config.verify.batch_size, device)
        _CACHE["data_key"] = (task, views)
    return encoder, _CACHE["snapshot"], _CACHE["encoded"]


def _run_trial(spec: str, config_dict: dict[str, Any], task: str, role: str, trial: Trial, path: str,
               device: str, threads: int | None = None) -> str:
    """Train one attacker and write its record to ``path`` (atomically: a trial is done when
    its file exists)."""
    from privenc.attackers import fit_classifier

    _worker_settings(threads)
    torch_device = resolve_device(device)
    encoder, snapshot, encoded = _encoded(spec, config_dict, task, trial.views, torch_device)
    settings = dataclasses.replace(encoder.config.verify, patience=trial.patience, views=trial.views,
                                   max_iters=trial.max_iters, calibrate=trial.calibrate)
    channels, size = encoded.x["train"].shape[1], encoded.x["train"].shape[-1]
    torch.manual_seed(trial.seed)
    if trial.family == ADAPTIVE:
        adversary = saved_adversaries(encoder, task)[trial.member]
        model = adversary.classifier(encoder, channels, encoded.num_classes, size)
    else:
        model = build_attacker(trial.family, encoder.config.classifier, channels, encoded.num_classes, size)
    result = fit_classifier(model, encoded, settings, trial.lr, trial.seed, torch_device, trial.family,
                            label=f"{encoder.name}/{task}/{trial.name}",
                            min_iters=settings.family_min_iters(trial.family))
    assert_unchanged(encoder.module, snapshot, encoder.name)
    record = {**attacker_record(encoder, task, role, encoded, trial.views, result), "attack": ZOO,
              "round": trial.round, "trial": trial.name, "patience": trial.patience, "views": trial.views,
              "max_iters": trial.max_iters, "calibrate": trial.calibrate,
              **({"member": trial.member} if trial.family == ADAPTIVE else {})}
    atomic_write_text(Path(path), json.dumps(record, indent=1) + "\n")
    return path


def _worker_settings(threads: int | None) -> None:
    if threads is not None:  # a spawned worker: the parent's settings are not inherited
        from privenc.runtime import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(threads)


def _run_attack_job(spec: str, config_dict: dict[str, Any], name: str, task: str, role: str,
                    settings: VerifyConfig, lrs: tuple[float, ...], seed: int, device: str, folder: str,
                    threads: int) -> str:
    """Run the extra attack ``name`` of ``task`` in a worker, on the encoder rebuilt from its spec
    and config (shared with the worker's trials), and write its outcome to ``folder/<name>.json``
    (atomically); return that path. The main process asked :func:`~privenc.attacks.known_outcome`
    first: the attack applies and is not on disk under this protocol."""
    _worker_settings(threads)
    if name not in REGISTRY:  # registered in the main process at run time: a spawned worker never saw it
        raise ConfigError(f"attack {name!r} is not registered in a worker process, which knows only the attacks "
                          f"registered on importing privenc: audit with --jobs 1")
    torch_device = resolve_device(device)
    encoder, _ = _loaded(spec, config_dict, torch_device)
    context = AttackContext(spec, encoder, task, role, settings, lrs, seed, torch_device, Path(folder) / name)
    path = Path(folder) / f"{name}.json"
    compute_outcome(REGISTRY[name], context, path)
    return str(path)


def _read_trial(path: Path) -> dict[str, Any] | None:
    """A finished trial's record; None for a missing or broken file (then it runs again)."""
    record = read_finished(path, "audit: training that attacker again")
    return record if isinstance(record, dict) and "val_bacc_best" in record else None


# --------------------------------------------------------------------------- the search


def audit(encoder_spec: str, config: Config, tasks: list[str], out_dir: Path, margin: float = 1.0,
          max_rounds: int = 3, max_minutes: float | None = None, jobs: int = 1, identity: str | None = None,
          fail_above: float | None = None, device: str = "auto", progress: bool = True,
          attacks: list[str] | None = None, stop_rule: str = "validation") -> dict[str, Any]:
    """Search the attacker zoo for the worst case of ``encoder_spec`` on each task, then run the
    extra attacks; write ``OUT/audit.json`` and ``OUT/audit.md`` and return what audit.json holds.

    ``margin`` and ``fail_above`` are in points of balanced accuracy (1.0 = 0.01). The search of
    a task stops when a round raises the worst case by less than ``margin`` (converged; measured
    as ``stop_rule`` says, see the module docstring and :data:`STOP_RULES`), after ``max_rounds``
    rounds (round 0 included) or, before starting
    a round, once ``max_minutes`` of this call have passed (not converged). ``identity``:
    None, ``"compute"`` (plain verification of raw images on the encoder's data and settings,
    kept in ``OUT/identity``) or a verify or grid folder holding Identity's records.
    ``result["failed"]`` lists the tasks whose worst case is more than ``fail_above`` points
    of balanced accuracy above its chance level 1/K. ``attacks``: names from
    :func:`privenc.attacks.attack_names` (``zoo`` is the search beyond round 0); None = all.
    ``jobs``: processes that train a round's attackers and, after each task's search, its extra
    attacks (1: everything in this process, one after another).
    """
    out_dir = Path(out_dir)
    chosen = parse_attacks(None if attacks is None else ",".join(attacks))
    if not (isinstance(margin, (int, float)) and 0 <= margin < 100):
        raise ConfigError(f"--margin is in points of balanced accuracy, from 0 to under 100; got {margin}")
    if stop_rule not in STOP_RULES:
        raise ConfigError(f"--stop-rule must be one of {', '.join(STOP_RULES)}; got {stop_rule!r}")
    if max_rounds < 1:
        raise ConfigError(f"--max-rounds must be at least 1 (round 0 is plain verification), got {max_rounds}")
    if max_minutes is not None and not max_minutes >= 0:
        raise ConfigError(f"--max-minutes must be 0 or more, got {max_minutes}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if fail_above is not None and not -100 <= fail_above <= 100:
        raise ConfigError(f"--fail-above is in points of balanced accuracy above chance, -100 to 100; got {fail_above}")
    if not tasks:
        raise ConfigError("audit: no tasks; give --task")
    refuse_run_folder(out_dir, "audit")
    encoder = load_encoder_spec(encoder_spec, config, torch.device("cpu"))
    check_tasks(encoder.config.data, tasks)  # a typo must not wait for the first task's search
    ensure_writable(out_dir)
    settings = encoder.config.verify
    lr = attacker_lr(encoder)
    roles = roles_from_run(encoder.config, tasks) if encoder.kind in ("learned", "leace") else {}
    config_dict = encoder.config.to_dict()
    _check_plan(out_dir, {"encoder": encoder.name, "encoder_sha256": _encoder_digest(encoder_spec, encoder),
                          "config": config_dict})
    references = _identity_references(identity, encoder, tasks, out_dir, device, progress)

    started = time.time()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    extra = [name for name in chosen if name != ZOO]
    searches: dict[str, tuple[str, list[dict[str, Any]], list[dict[str, Any]], str]] = {}
    # Wall time of each round in this call, kept out of the verdicts: a resumed round reads its
    # trials back in ~0 s, and a verdict must not depend on how often the audit was resumed.
    round_seconds: dict[str, list[float]] = {}
    outcomes: dict[str, list[dict[str, Any]]] = {}
    started_attacks: dict[str, list[dict[str, Any] | Future[str]]] = {}
    attack_encoder: LoadedEncoder | None = None
    with ExitStack() as stack:
        pool = stack.enter_context(spawn_pool(jobs, cancel_on_error=True)) if jobs > 1 else None
        stack.callback(_CACHE.clear)  # the encodings of an in-process search are not needed after it
        for task in tasks:
            role = roles.get(task, "other")
            records: list[dict[str, Any]] = []
            rounds: list[dict[str, Any]] = []
            stopped_by = "max_rounds" if ZOO in chosen else "zoo_left_out"
            submitted: dict[int, list[Future[str]]] = {}
            for k in range(max_rounds if ZOO in chosen else 1):
                if k > 0 and max_minutes is not None and time.time() - started > 60 * max_minutes:
                    stopped_by = "max_minutes"
                    break
                trials = _with_adversaries(round_trials(settings, lr, k), encoder, task)
                if k == 0 and pool is not None and max_rounds > 1 and ZOO in chosen and max_minutes is None:
                    # Round 0 cannot converge (nothing to rise from), so round 1 runs whatever it
                    # finds: queued behind it, round 1 fills the workers round 0 leaves idle.
                    # Its wall time then counts from round 0's end.
                    submitted[0] = _submit_round(encoder_spec, config_dict, task, role, trials, out_dir, pool, device,
                                                 threads)
                    submitted[1] = _submit_round(encoder_spec, config_dict, task, role,
                                                 _with_adversaries(round_trials(settings, lr, 1), encoder, task),
                                                 out_dir, pool, device, threads)
                round_started = time.time()
                found = _run_round(encoder_spec, config_dict, task, role, trials, out_dir, pool, device, threads,
                                   progress, submitted.get(k))
                records += found
                # milliseconds: round 0 is one attacker, which a fast machine trains in well under 0.1 s on tiny data
                round_seconds.setdefault(task, []).append(round(time.time() - round_started, 3))
                best = max(map(selection_score, records))
                rise = None if not rounds else best - rounds[-1]["best_val_bacc"]
                confirmed = confirmed_score(records)
                confirmed_rise = (None if not rounds or confirmed is None or rounds[-1]["confirmed_bacc"] is None
                                  else confirmed - rounds[-1]["confirmed_bacc"])
                rounds.append({"round": k, "attackers": len(trials), "patience": trials[0].patience,
                               "views": trials[0].views, "max_iters": trials[0].max_iters,
                               "lrs": sorted({t.lr for t in trials}, reverse=True),
                               "families": list(dict.fromkeys(t.family for t in trials)),
                               "seeds": sorted({t.seed for t in trials}),
                               "round_best_val_bacc": max(map(selection_score, found)),
                               "best_val_bacc": best, "rise": rise,
                               "confirmed_bacc": confirmed, "confirmed_rise": confirmed_rise})
                log.info("audit %s round %d: best validation balanced accuracy %.3f%s%s", task, k, best,
                         "" if rise is None else f" (rose {100 * rise:.2f} points)",
                         "" if confirmed_rise is None else f"; confirmed rise {100 * confirmed_rise:.2f} points")
                deciding = deciding_rise(rounds[-1], stop_rule)
                if deciding is not None and converged(deciding, margin):
                    stopped_by = "margin"
                    break
            searches[task] = (role, records, rounds, stopped_by)
            # The extra attacks need only the widest round's protocol, known now: in a pool they
            # start at once, and the next task's trials queue behind them.
            protocol = attack_protocol(settings, lr, len(rounds) - 1)
            folder = out_dir / "attacks" / task.replace("/", "-")
            if pool is None:
                if extra and attack_encoder is None:  # loaded once, on the device, for the first extra attack
                    attack_encoder = load_encoder_spec(encoder_spec, config, resolve_device(device))
                outcomes[task] = _attacks_here(extra, encoder_spec, attack_encoder, task, role, protocol, folder,
                                               resolve_device(device), progress)
            else:
                started_attacks[task] = _start_attacks(extra, encoder_spec, config_dict, encoder, task, role,
                                                       protocol, folder, pool, device, threads)
        for task, found in started_attacks.items():
            outcomes[task] = _collect_attacks(task, extra, found, progress)
    verdicts = {task: verdict(task, role, records, rounds, stopped_by, margin, references.get(task), fail_above,
                              outcomes[task], stop_rule)
                for task, (role, records, rounds, stopped_by) in searches.items()}
    every_record = [*(r for _, records, _, _ in searches.values() for r in records),
                    *(r for found in outcomes.values() for outcome in found for r in outcome.get("records", []))]
    result = {"encoder": encoder.name, "encoder_kind": encoder.kind,
              **({"encoder_label": encoder.label} if encoder.label else {}), "tasks": tasks, "attacks": chosen,
              "attack_summaries": summaries(chosen), "margin_points": margin, "stop_rule": stop_rule,
              "max_rounds": max_rounds, "max_minutes": max_minutes, "fail_above_points": fail_above,
              "seconds": round(time.time() - started, 1),
              # every attacker's own seconds, also those read back from an earlier invocation
              # (a resumed audit's "seconds" counts only its own)
              "attacker_seconds": round(sum(r.get("seconds") or 0.0 for r in every_record), 1),
              "round_seconds": round_seconds,
              "verdicts": verdicts,
              "failed": [t for t, v in verdicts.items() if v["failed"]]}
    from privenc.figures import audit_figure

    for task, v in verdicts.items():
        name = f"audit_{task.replace('/', '-')}.png"  # as the trials' and attacks' folders name tasks
        v["figure"] = audit_figure(v, encoder.label or encoder.name, out_dir / name).name
    atomic_write_text(out_dir / AUDIT_FILE, json.dumps(result, indent=1) + "\n")
    atomic_write_text(out_dir / "audit.md", audit_markdown(result))
    return result


def _trial_paths(out_dir: Path, task: str, trials: list[Trial]) -> dict[Trial, Path]:
    folder = out_dir / "trials" / task.replace("/", "-")
    return {trial: folder / f"{trial.name}.json" for trial in trials}


def _submit_round(spec: str, config_dict: dict[str, Any], task: str, role: str, trials: list[Trial], out_dir: Path,
                  pool: ProcessPoolExecutor, device: str, threads: int) -> list[Future[str]]:
    """Queue the trials of one round that are not finished on disk in ``pool``; their futures."""
    paths = _trial_paths(out_dir, task, trials)
    return [pool.submit(_run_trial, spec, config_dict, task, role, trial, str(paths[trial]), device, threads)
            for trial in trials if _read_trial(paths[trial]) is None]


def _run_round(spec: str, config_dict: dict[str, Any], task: str, role: str, trials: list[Trial], out_dir: Path,
               pool: ProcessPoolExecutor | None, device: str, threads: int, progress: bool,
               submitted: list[Future[str]] | None = None) -> list[dict[str, Any]]:
    """Every trial of one round, reading finished ones back; their records in trial order.
    ``submitted``: the round's futures where :func:`_submit_round` queued it already."""
    paths = _trial_paths(out_dir, task, trials)

    def bar(left: int) -> tqdm:
        return tqdm(total=len(trials), initial=len(trials) - left, desc=f"audit {task} round {trials[0].round}",
                    unit="attacker", disable=not progress)

    if pool is None:
        todo = [trial for trial in trials if _read_trial(paths[trial]) is None]
        progress_bar = bar(len(todo))
        for trial in todo:
            _run_trial(spec, config_dict, task, role, trial, str(paths[trial]), device)
            progress_bar.update(1)
    else:
        futures = submitted if submitted is not None else _submit_round(spec, config_dict, task, role, trials,
                                                                        out_dir, pool, device, threads)
        progress_bar = bar(len(futures))
        for future in as_completed(futures):
            future.result()
            progress_bar.update(1)
    progress_bar.close()
    records = [_read_trial(paths[trial]) for trial in trials]
    missing = [trial.name for trial, record in zip(trials, records) if record is None]
    if missing:  # written by _run_trial just now: only a file system failing under us gets here
        raise OSError(f"audit: trial results missing after the round: {', '.join(missing)} in "
                      f"{paths[trials[0]].parent}")
    return records  # type: ignore[return-value]


def _attacks_here(names: list[str], spec: str, encoder: LoadedEncoder | None, task: str, role: str,
                  protocol: tuple[VerifyConfig, tuple[float, ...], int], folder: Path, device: torch.device,
                  progress: bool) -> list[dict[str, Any]]:
    """The extra attacks ``names`` of ``task`` one after another in this process (``--jobs 1``),
    reading finished ones back; their outcomes in the order of ``names``."""
    widened, lrs, seed = protocol
    outcomes = []
    for name in tqdm(names, desc=f"audit {task} attacks", unit="attack", disable=not progress or not names):
        context = AttackContext(spec, encoder, task, role, widened, lrs, seed, device, folder / name)
        outcomes.append(run_attack(REGISTRY[name], context, folder / f"{name}.json"))
        _log_skipped(task, outcomes[-1])
    return outcomes


def _start_attacks(names: list[str], spec: str, config_dict: dict[str, Any], encoder: LoadedEncoder, task: str,
                   role: str, protocol: tuple[VerifyConfig, tuple[float, ...], int], folder: Path,
                   pool: ProcessPoolExecutor, device: str, threads: int) -> list[dict[str, Any] | Future[str]]:
    """The extra attacks ``names`` of ``task`` in the pool: for each, in order, its outcome when
    it needs no attacking (skipped, or finished on disk under this protocol), else the future of
    the job that computes it. ``encoder`` (on the CPU) only answers whether an attack applies."""
    widened, lrs, seed = protocol
    found: list[dict[str, Any] | Future[str]] = []
    for name in names:
        context = AttackContext(spec, encoder, task, role, widened, lrs, seed, torch.device("cpu"), folder / name)
        outcome = known_outcome(REGISTRY[name], context, folder / f"{name}.json")
        if outcome is None:
            found.append(pool.submit(_run_attack_job, spec, config_dict, name, task, role, widened, lrs, seed,
                                     device, str(folder), threads))
        else:
            _log_skipped(task, outcome)
            found.append(outcome)
    return found


def _collect_attacks(task: str, names: list[str], found: list[dict[str, Any] | Future[str]],
                     progress: bool) -> list[dict[str, Any]]:
    """Wait for the jobs of :func:`_start_attacks` and read their outcomes back from disk."""
    futures = [item for item in found if isinstance(item, Future)]
    bar = tqdm(total=len(found), initial=len(found) - len(futures), desc=f"audit {task} attacks", unit="attack",
               disable=not progress or not found)
    for future in as_completed(futures):
        future.result()
        bar.update(1)
    bar.close()
    outcomes = []
    for name, item in zip(names, found):
        if isinstance(item, Future):
            item = read_outcome(Path(item.result()))
            if item is None:  # written by _run_attack_job just now: only a file system failing under us gets here
                raise OSError(f"audit: the outcome of attack {name} on {task} is missing after its job")
        outcomes.append(item)
    return outcomes


def _log_skipped(task: str, outcome: dict[str, Any]) -> None:
    if "skipped" in outcome:
        log.info("audit %s: attack %s skipped: %s", task, outcome["attack"], outcome["skipped"])


def _encoder_digest(spec: str, encoder: LoadedEncoder) -> str | None:
    """The learned encoder's (or LEACE eraser's) file hash: a rerun after retraining the run, or
    refitting the eraser, must not reuse trials."""
    if encoder.kind not in ("learned", "leace"):
        return None
    path = learned_encoder_path(spec)
    return hashlib.sha256((path / ENCODER_FILE if path.is_dir() else path).read_bytes()).hexdigest()


def _check_plan(out_dir: Path, plan: dict[str, Any]) -> None:
    """Refuse to add to an audit folder made for another encoder or other settings: its trials
    would be mixed with these. The budget (margin, rounds, minutes) may change: a rerun with a
    larger one continues the search."""
    path = out_dir / PLAN_FILE
    new = json.loads(json.dumps(plan))
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if isinstance(old, dict):
            diff = [f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in new if key != "config"
                    and old.get(key) != new[key]]
            diff += config_diff(old.get("config") or {}, new["config"], ignore=("verify.tasks",))
            if diff:
                raise ConfigError(f"refusing to add to the audit {out_dir}: its trials were computed for another "
                                  f"encoder or settings ({path}); use a new --out, or delete the folder:\n  "
                                  + "\n  ".join(diff))
    atomic_write_text(path, json.dumps(new, indent=1) + "\n")


def _identity_references(identity: str | None, encoder: LoadedEncoder, tasks: list[str], out_dir: Path,
                         device: str, progress: bool) -> dict[str, dict[str, Any]]:
    """Identity's strongest attacker per task, by plain verification: computed into OUT/identity
    (reused when there), or read from a verify or grid folder."""
    if identity is None or encoder.kind == "identity":
        return {}
    if identity == "compute":
        folder = out_dir / "identity"
        records = (json.loads((folder / "verify.json").read_text()) if (folder / "verify.json").is_file()
                   else verify("identity", encoder.config, tasks, folder, device=device, progress=progress))
    else:
        root = Path(identity)
        if not root.is_dir():
            raise ConfigError(f"--identity {identity!r}: give 'compute' or a verify or grid folder holding "
                              f"Identity's verify.json")
        records = [r for path in sorted(root.rglob("verify.json")) for r in json.loads(path.read_text())]
    best = {task: r for (name, task), r in strongest(records).items() if name == "identity"}
    missing = [t for t in tasks if t not in best]
    if missing:
        raise ConfigError(f"--identity {identity!r} holds no Identity records for {', '.join(missing)}")
    return best
