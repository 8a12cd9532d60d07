"""``privenc sweep``: the privacy–utility trade-off of many trainings, and its Pareto front.

A sweep takes a config, the values to vary (``--vary train.alpha=0.1,0.5,1``, any key of the
schema but the few below) and training seeds. It trains every combination of values x seeds
into ``SWEEP/runs/<values>,s<seed>/``, verifies each run and the reference encoders (Identity,
Naive Blur, any other encoder given) on the tasks with :func:`privenc.grid.run_grid` into
``SWEEP/grid``, reduces each configuration to two numbers per seed and their mean and spread,
finds the configurations on the front, audits those with :func:`privenc.audit.audit`, and
writes ``sweep.json``, ``sweep.md`` and ``pareto.png``. Every step is resumable: a finished run
is skipped, an unfinished one resumed from its checkpoint, finished grid cells and audit trials
are read back, so a rerun with one more seed or value trains only what is new.

The two numbers, in points (1 point = 0.01), both from the strongest attacker of a grid cell
(chosen on validation balanced accuracy, reported on test):

- x, privacy (lower is better): the private task's test balanced accuracy minus its chance
  level 1/K (K classes; on the balanced detection tasks this is also the majority rate); with
  several private tasks, the highest of them (the worst case);
- y, utility (higher is better): the desirable task's test balanced accuracy minus Identity's
  (raw images) on the same task; with several desirable tasks, their mean.

Seeds vary ``train.seed`` (the encoder's and classifiers' initial weights, the batch order); the
data split and the validation sample stay fixed (``data.seed``), so every configuration, seed
and reference is measured on the same test images. A configuration is the mean over its seeds;
its spread is the min-max range (std is also recorded). The front is drawn through
configuration means, never through single seeds, so a lucky seed cannot put a configuration on
it.

Under torchrun the ranks do not split the runs: every rank takes part in every training
(data-parallel, as ``privenc train`` under torchrun), one run after another, rank 0 deciding
which runs are left; then each rank verifies its share of the grid's cells, outside the process
group, and waits for the others; rank 0 alone reduces, audits and writes (docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from privenc import distributed, runs
from privenc.atomic import atomic_write_text, ensure_writable
from privenc.config import SECTIONS, Config, load_config
from privenc.encoders import BASELINES, check_tasks, encoder_name, learned_encoder_path
from privenc.errors import ConfigError
from privenc.pools import spawn_pool

log = logging.getLogger(__name__)

SEED_KEY = "train.seed"
"""What ``--seeds`` varies: the training seed. ``data.seed`` (the split) stays the config's."""

# Keys a sweep may not vary, and why: every point of the figure must be measured on the same
# test images, tasks and verification protocol as Identity's reference.
NOT_VARIED = {
    "data": "the data and its split must be the same for every run and for the references",
    "verify": "one verification protocol measures every run and reference (set it with --set)",
    "train.private": "the x axis is measured on one set of private tasks",
    "train.desirable": "the y axis is measured on one set of desirable tasks",
    SEED_KEY: "the training seed is what --seeds varies",
}

SPREAD = "min-max over seeds"
X_DEFINITION = ("x: private task's test balanced accuracy minus chance 1/K, in points (the highest over private "
                "tasks); lower is more private")
Y_DEFINITION = ("y: desirable task's test balanced accuracy minus Identity's on the same task, in points (mean over "
                "desirable tasks); higher keeps more utility")


# --------------------------------------------------------------------------- what to train


@dataclass
class SweepRun:
    """One training of the sweep: a configuration (its varied values) at one seed."""

    setting: str                 # the configuration's name, e.g. "encoder_loss=label_flip,alpha=0.5"
    values: dict[str, Any]       # the varied keys and their values (as the config holds them)
    seed: int
    config: Config
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name


def split_values(text: str) -> list[str]:
    """``0.1,0.5,1`` -> three value texts; commas inside brackets or quotes belong to one value
    (``encoder.stages=[[4],[8]],[[8],[8]]`` is two values)."""
    values, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_vary(items: list[str], overrides: list[str] | tuple[str, ...] = ()) -> dict[str, list[str]]:
    """``--vary section.key=v1,v2`` flags as {key: [value texts]}, keys checked against the
    schema; the texts are parsed later by the rules of ``--set``, when the configs are built."""
    vary: dict[str, list[str]] = {}
    set_keys = {item.partition("=")[0].strip() for item in overrides}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        section, _, name = key.partition(".")
        if not sep or not name:
            raise ConfigError(f"--vary {item!r}: expected section.key=value1,value2,..., e.g. train.alpha=0.1,0.5,1")
        if section not in SECTIONS:
            raise ConfigError(f"--vary {item!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
        fields = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if name not in fields:
            raise ConfigError(f"--vary {item!r}: unknown key {key}; valid keys of [{section}]: {', '.join(fields)}")
        reason = NOT_VARIED.get(key) or NOT_VARIED.get(section)
        if reason:
            raise ConfigError(f"--vary {key}: a sweep does not vary it: {reason}"
                              + ("; give --seeds 0,1,2" if key == SEED_KEY else "; give it with --set"))
        if key in vary:
            raise ConfigError(f"--vary {key} is given twice; list all its values in one flag: {key}=v1,v2")
        if key in set_keys:
            raise ConfigError(f"{key} is given both by --set and by --vary; drop one")
        values = split_values(text)
        if any(not v for v in values):
            raise ConfigError(f"--vary {item!r}: an empty value; separate values by single commas")
        vary[key] = values
    return vary


def parse_seeds(text: str | None) -> list[int] | None:
    """``0,1,2`` -> [0, 1, 2]; None (not given) stays None: the config's own train.seed."""
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


def value_text(value: Any) -> str:
    """A config value as it appears in a run's name: floats by repr (1.0, 0.0625, 1e-05), so
    that ``alpha=1`` and ``alpha=1.0`` name the same run, lists compact."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return repr(value) if isinstance(value, float) else str(value)


def setting_name(values: dict[str, Any]) -> str:
    """``encoder_loss=label_flip,alpha=0.5``: each varied key (without its section, unless two
    sections vary a key of that name) with its value, characters other than letters, digits
    and ``. _ + -`` replaced by ``_``, in the order of the --vary flags. No varied key: base."""
    short = [key.partition(".")[2] for key in values]
    parts = []
    for key, value in values.items():
        label = key.partition(".")[2] if short.count(key.partition(".")[2]) == 1 else key
        text = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._+-]", "_", value_text(value))).strip("_")
        parts.append(f"{label}={text or '_'}")
    return ",".join(parts) or "base"


def expand(source: str | None, overrides: list[str], vary: dict[str, list[str]], seeds: list[int] | None,
           out_dir: Path) -> list[SweepRun]:
    """Every combination of the varied values x seeds, as configs built by the rules of --set
    (a bad value fails here, before any training), in the order of the flags, seeds last."""
    combos: list[list[tuple[str, str]]] = [[]]
    for key, texts in vary.items():
        combos = [[*combo, (key, text)] for combo in combos for text in texts]
    base = load_config(source, overrides)
    seeds = seeds if seeds is not None else [base.train.seed]
    planned: list[SweepRun] = []
    names: dict[str, str] = {}
    for combo in combos:
        sets = [f"{key}={text}" for key, text in combo]
        try:
            config = load_config(source, [*overrides, *sets])
        except ConfigError as err:
            raise ConfigError(f"--vary {', '.join(sets)}: {err}") from None
        values = {key: getattr(getattr(config, key.partition(".")[0]), key.partition(".")[2]) for key, _ in combo}
        setting = setting_name(values)
        given = ", ".join(sets)
        if setting in names:
            raise ConfigError(f"--vary: {names[setting]} and {given} give the same configuration name {setting!r} "
                              f"(the same value twice, or values that differ only in characters a folder name "
                              f"drops); drop one")
        names[setting] = given
        for seed in seeds:
            seeded = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
            planned.append(SweepRun(setting, values, seed, seeded, Path(out_dir) / "runs" / f"{setting},s{seed}"))
    return planned


def check_run_folder(run: SweepRun) -> None:
    """A run folder of the sweep is reused only if it was trained with this run's config
    (where it runs and the verification settings may differ: runs.IGNORED["reuse"])."""
    if runs.is_run(run.run_dir):
        diff = runs.config_changes(runs.read_config(run.run_dir).to_dict(), run.config.to_dict(), "reuse")
        if diff:
            raise ConfigError(f"{run.run_dir} was trained with another config than this sweep gives it; use a new "
                              f"--out, or delete that run folder to train it again:\n  " + "\n  ".join(diff))
    if not runs.has_checkpoint(run.run_dir):
        runs.check_new_run_folder(run.run_dir)


# --------------------------------------------------------------------------- training


def train_runs(planned: list[SweepRun], jobs: int = 1, progress: bool = True,
               world: distributed.World | None = None, device: str = "auto") -> int:
    """Train every run that has no encoder yet (resuming those with a checkpoint), ``jobs`` at a
    time in spawned processes, or one after another, data-parallel over the ranks, under
    torchrun; returns how many were trained. One bar counts the finished runs. ``device``
    (unless auto) replaces train.device: where a run trains is not part of what it is, so the
    grid's config and a rerun elsewhere stay the same sweep.

    Under torchrun every rank takes part in every training, so the ranks must agree on which
    runs are left and which resume: rank 0 looks at the folders and tells the others (a rank
    reading a shared folder a moment later, or through another node's cache, could see another
    state and wait in a training the others skipped)."""
    from privenc.training import train, train_worker

    world = world or distributed.World()
    left = None  # (index, whether it resumes) of each run without an encoder, as rank 0 finds them
    if world.is_main:
        left = [(i, runs.has_checkpoint(run.run_dir)) for i, run in enumerate(planned)
                if not runs.is_finished(run.run_dir)]
    left = distributed.from_main(world, left)
    todo = [planned[i] for i, _ in left]
    resume = {planned[i].run_dir: has_checkpoint for i, has_checkpoint in left}
    if device != "auto":
        todo = [dataclasses.replace(run, config=dataclasses.replace(
            run.config, train=dataclasses.replace(run.config.train, device=device))) for run in todo]
    bar = tqdm(total=len(planned), initial=len(planned) - len(todo), desc="sweep runs", unit="run",
               disable=not (progress and world.is_main), dynamic_ncols=True)
    if world.is_main:
        how = (f", each data-parallel over {world.size} ranks" if world.distributed and todo
               else f", {min(jobs, len(todo))} in parallel" if jobs > 1 and len(todo) > 1 else "")
        log.info("sweep: %d runs, %d already trained, %d to train%s", len(planned), len(planned) - len(todo),
                 len(todo), how)
    if jobs > 1 and len(todo) > 1 and not world.distributed:
        # One process per run, the cores shared: small convolutions use one core well, several poorly.
        threads = max(1, (os.cpu_count() or 1) // min(jobs, len(todo)))
        with spawn_pool(min(jobs, len(todo))) as pool:
            futures = {pool.submit(train_worker, run.config.to_dict(), str(run.run_dir), threads): run
                       for run in todo}
            for future in as_completed(futures):
                future.result()
                log.info("sweep: trained %s", futures[future].name)
                bar.update(1)
    else:
        for run in todo:
            train(run.config, run.run_dir, resume=resume[run.run_dir], progress=False)
            bar.update(1)
    bar.close()
    return len(todo)


# --------------------------------------------------------------------------- the numbers


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (x, y), whether no other point dominates it: lower x (less leaked) and higher y
    (more kept) are better, and a point dominates another when it is at least as good on both and
    strictly better on one. Equal points do not dominate each other, so both stay on the front."""
    return [not any(ox <= x and oy >= y and (ox < x or oy > y) for ox, oy in points) for x, y in points]


def _spread(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "min": min(values), "max": max(values), "std": std}


def point(best: dict[tuple[str, str], dict[str, Any]], encoder: str, private: list[str],
          desirable: list[str]) -> dict[str, Any]:
    """One encoder's x and y (see the module docstring) from the strongest attacker per task,
    with the balanced accuracies they come from."""
    def bacc(name: str, task: str) -> dict[str, Any]:
        record = best.get((name, task))
        if record is None:
            raise ConfigError(f"sweep: no verification of {name} on {task} in the grid; rerun the sweep to compute it")
        return record

    private_bacc = {t: bacc(encoder, t)["test_bacc_best"] for t in private}
    desirable_bacc = {t: bacc(encoder, t)["test_bacc_best"] for t in desirable}
    x = max(100 * (private_bacc[t] - bacc(encoder, t)["bacc_chance"]) for t in private)
    y = sum(100 * (desirable_bacc[t] - bacc("identity", t)["test_bacc_best"]) for t in desirable) / len(desirable)
    return {"x": x, "y": y, "private_bacc": private_bacc, "desirable_bacc": desirable_bacc}


def attacker_seconds(records: list[dict[str, Any]], encoder: str) -> float:
    """Seconds of attacker training in an encoder's verification cells (one process each;
    encoding the images is not counted)."""
    return round(sum(r.get("seconds", 0.0) for r in records if r["encoder"] == encoder), 1)


def summarize(planned: list[SweepRun], vary: dict[str, list[str]], records: list[dict[str, Any]],
              references: list[str], config: Config, tasks: list[str], command: str) -> dict[str, Any]:
    """What sweep.json holds (without audits): per configuration its values, method, per-seed
    points, their mean and spread in x and y, and whether its mean is on the front; the
    references' points; the definitions of the axes; the base config."""
    from privenc.verification import strongest

    best = strongest(records)
    private, desirable = config.train.private, config.train.desirable
    settings: dict[str, dict[str, Any]] = {}
    for run in planned:
        entry = settings.setdefault(run.setting, {
            "name": run.setting, "values": run.values, "method": run.config.train.encoder_loss, "seeds": []})
        entry["seeds"].append({"seed": run.seed, "run": f"runs/{run.name}",
                               **point(best, run.name, private, desirable),
                               "train_s": runs.training_seconds(run.run_dir),
                               "verify_s": attacker_seconds(records, run.name)})
    configurations = list(settings.values())
    for entry in configurations:
        entry["x"] = _spread([s["x"] for s in entry["seeds"]])
        entry["y"] = _spread([s["y"] for s in entry["seeds"]])
    front = pareto_front([(c["x"]["mean"], c["y"]["mean"]) for c in configurations])
    for entry, on in zip(configurations, front):
        entry["on_front"] = on
        entry["audit"] = None
    return {
        "command": command, "seed_key": SEED_KEY, "seeds": list(dict.fromkeys(run.seed for run in planned)),
        "vary": {key: list(dict.fromkeys(value_text(run.values[key]) for run in planned)) for key in vary},
        "tasks": {"private": private, "desirable": desirable, "verified": tasks},
        "references": [{"name": encoder_name(spec), **point(best, encoder_name(spec), private, desirable),
                        "verify_s": attacker_seconds(records, encoder_name(spec))} for spec in references],
        "definitions": {"x": X_DEFINITION, "y": Y_DEFINITION, "spread": SPREAD,
                        "front": "configurations whose mean no other configuration's mean dominates (lower x and "
                                 "higher y are better)", "audit": None},
        "configurations": configurations,
        "front": [c["name"] for c in sorted(configurations, key=lambda c: c["x"]["mean"]) if c["on_front"]],
        "config": config.to_dict(),
    }


def write_sweep(out_dir: Path, result: dict[str, Any]) -> None:
    """sweep.json, sweep.md and pareto.png (each written atomically)."""
    from privenc.figures import pareto_figure

    atomic_write_text(Path(out_dir) / "sweep.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(Path(out_dir) / "sweep.md", sweep_markdown(result))
    pareto_figure(result, Path(out_dir) / "pareto.png")


# --------------------------------------------------------------------------- the sweep


def run_sweep(source: str | None, overrides: list[str], vary_flags: list[str], seeds: list[int] | None,
              out_dir: Path, tasks: list[str] | None = None, references: list[str] | None = None, jobs: int = 1,
              audit_front: bool = True, audit_rounds: int = 2, device: str = "auto", progress: bool = True,
              command: str = "privenc sweep") -> dict[str, Any] | None:
    """Train, verify, reduce and audit a sweep into ``out_dir`` (see the module docstring);
    returns what sweep.json holds (None on the ranks other than 0 under torchrun).

    ``tasks``: what the grid verifies (default: verify.tasks, else the private and desirable
    tasks; those two are always added). ``references``: encoders verified beside the runs, as
    ``privenc grid`` takes them; Identity must be one (y is measured against it)."""
    from privenc.grid import check_same_config, collect, run_grid

    out_dir = Path(out_dir)
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if audit_rounds < 1:
        raise ConfigError(f"--audit-rounds must be at least 1 (round 0 is plain verification), got {audit_rounds}")
    references = list(references if references is not None else ["identity", "blur"])
    if "identity" not in references:
        raise ConfigError("--references must include identity: y is the desirable accuracy minus Identity's")
    # ---- everything checked before the first training: keys, values, tasks, folders, references
    vary = parse_vary(vary_flags, overrides)
    planned = expand(source, overrides, vary, seeds, out_dir)
    base = load_config(source, overrides)
    private, desirable = base.train.private, base.train.desirable
    if not private or not desirable:
        raise ConfigError("a sweep needs train.private and train.desirable (x is measured on the private task, y on "
                          "the desirable one); set them with --set")
    tasks = list(dict.fromkeys([*private, *desirable, *(tasks or base.verify.tasks)]))
    check_tasks(base.data, tasks)
    for spec in references:
        if spec not in BASELINES:
            learned_encoder_path(spec)  # a missing or unfinished reference fails now, naming it
    runs.refuse_run_folder(out_dir, "sweep")
    ensure_writable(out_dir)
    ranks = distributed.launched().size
    for run in planned:
        check_run_folder(run)
        if run.config.train.batch_size % ranks:
            raise ConfigError(f"{run.name}: train.batch_size {run.config.train.batch_size} is the global batch, "
                              f"shared by the {ranks} torchrun ranks, and is not divisible by {ranks}; give a "
                              f"multiple of {ranks} with --set, or run on another number of ranks")
    check_same_config(out_dir / "grid", base.to_dict(), tuple(vary))

    # ---- train, then verify runs and references. Under torchrun every rank takes part in every
    # training (data-parallel, as `privenc train`), one run after another; then each rank runs its
    # share of the grid's cells alone (in spawned processes: grid.run_grid says why) and waits for
    # the others, however long their cells take, before rank 0 reads them all.
    world = distributed.setup(device if device != "auto" else base.train.device)
    try:
        train_runs(planned, jobs, progress, world, device)
        run_grid([str(run.run_dir) for run in planned] + references, tasks, base, out_dir / "grid", jobs=jobs,
                 device=device, ignore=tuple(vary))
        distributed.wait_for_all(world)
    finally:
        distributed.teardown(world)
    if not world.is_main:
        return None

    # ---- reduce, audit the front, write
    result = summarize(planned, vary, collect(out_dir / "grid"), references, base, tasks, command)
    if audit_front:
        result["definitions"]["audit"] = (f"privenc audit of the configuration's least private seed (highest x) on "
                                          f"the private tasks, at most {audit_rounds} rounds")
        for entry in result["configurations"]:
            if entry["on_front"]:
                entry["audit"] = audit_configuration(entry, base, private, out_dir, audit_rounds, jobs, device,
                                                     progress)
    write_sweep(out_dir, result)
    return result


def audit_configuration(entry: dict[str, Any], config: Config, private: list[str], out_dir: Path, rounds: int,
                        jobs: int, device: str, progress: bool) -> dict[str, Any]:
    """``privenc audit`` of a front configuration's least private seed (the highest x: the
    conservative choice, and one audit per configuration keeps it affordable) on the private
    tasks, into ``SWEEP/audit/<configuration>``; Identity's numbers come from the grid."""
    from privenc.audit import audit

    chosen = max(entry["seeds"], key=lambda s: s["x"])
    folder = out_dir / "audit" / entry["name"]
    log.info("sweep: auditing %s (seed %d) on %s", entry["name"], chosen["seed"], ", ".join(private))
    result = audit(str(out_dir / chosen["run"]), config, private, folder, max_rounds=rounds, jobs=jobs,
                   identity=str(out_dir / "grid"), device=device, progress=progress)
    verdicts = result["verdicts"]
    return {"seed": chosen["seed"], "run": chosen["run"], "folder": f"audit/{entry['name']}",
            "x": max(v["above_chance_points"] for v in verdicts.values()), "plain_x": chosen["x"],
            "converged": all(v["converged"] for v in verdicts.values()), "rounds": rounds}


# --------------------------------------------------------------------------- the table


def _range(stats: dict[str, float]) -> str:
    return f"{stats['mean']:+.1f} [{stats['min']:+.1f}, {stats['max']:+.1f}]"


def sweep_markdown(result: dict[str, Any]) -> str:
    """sweep.md: one row per configuration (front first, by x), then the references."""
    keys = list(result["vary"])
    head = "| configuration | method | " + "".join(f"{k} | " for k in keys)
    lines = ["# privenc sweep", "", f"`{result['command']}`", "",
             f"Seeds ({result['seed_key']}): {', '.join(map(str, result['seeds']))}; private: "
             f"{', '.join(result['tasks']['private'])}; desirable: {', '.join(result['tasks']['desirable'])}.", "",
             f"- {result['definitions']['x']}.", f"- {result['definitions']['y']}.",
             f"- Each value: mean over seeds [{result['definitions']['spread']}]; front: "
             f"{result['definitions']['front']}.", "",
             head + "seeds | x: private − chance | y: desirable − Identity | front | audited x |",
             "|---" * (len(keys) + 7) + "|"]
    ordered = sorted(result["configurations"], key=lambda c: (not c["on_front"], c["x"]["mean"]))
    for c in ordered:
        audited = c.get("audit")
        audit_cell = "—" if not audited else (f"{audited['x']:+.1f} (seed {audited['seed']}"
                                              f"{'' if audited['converged'] else ', not converged'})")
        values = "".join(f"{value_text(c['values'][k])} | " for k in keys)
        lines.append(f"| {c['name']} | {c['method']} | {values}{len(c['seeds'])} | {_range(c['x'])} "
                     f"| {_range(c['y'])} | {'yes' if c['on_front'] else ''} | {audit_cell} |")
    lines += ["", "References (one verification each):", "",
              "| encoder | x: private − chance | y: desirable − Identity |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['x']:+.1f} | {r['y']:+.1f} |" for r in result["references"]]
    lines += time_lines(result)
    if result["definitions"].get("audit"):
        lines += ["", f"Audited x: {result['definitions']['audit']} (`SWEEP/audit/<configuration>/audit.md`)."]
    return "\n".join(lines) + "\n"


def time_lines(result: dict[str, Any]) -> list[str]:
    """What the sweep cost, in minutes of one process (sweep.json from before these were kept
    has none: no lines)."""
    seeds = [s for c in result["configurations"] for s in c["seeds"]]
    trained = [s["train_s"] / 60 for s in seeds if s.get("train_s") is not None]
    verified = [s["verify_s"] / 60 for s in seeds if s.get("verify_s") is not None]
    if not trained and not verified:
        return []
    def minutes(values: list[float], unit: str) -> str:
        stats = _spread(values)
        return f"{stats['mean']:.1f} {unit} [{stats['min']:.1f}-{stats['max']:.1f}]"

    parts = []
    if trained:
        parts.append(f"training {minutes(trained, 'min per run')} over {len(trained)} runs (from their metrics logs)")
    if verified:
        parts.append(f"verification {minutes(verified, 'attacker-minutes per run')}")
    references = [f"{r['name']} {r['verify_s'] / 60:.1f}" for r in result["references"] if "verify_s" in r]
    if references:
        parts.append("references " + ", ".join(references) + " attacker-minutes")
    return ["", "Time, in minutes of one process (`--jobs N` runs N side by side): " + "; ".join(parts) + "."]
