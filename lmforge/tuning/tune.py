"""Hyperparameter search: many short pretraining runs of one recipe, each with some fields changed.

A search space maps recipe keys (``train.learning_rate``) to distributions. Each trial trains the
recipe with its own values into ``<workdir>/<study>/trial_NNNN/``; its objective is the final
validation loss, and validations along the way let Optuna's median pruner stop trials that are clearly
behind. Trials that search only model and training fields share one copy of the data, tokenizer and
tokens, built once in ``base/`` and linked into every trial folder: stage manifests fingerprint
settings and inputs, never paths, so the linked stages count as up to date. The Optuna study is kept in
``study.db`` next to the trials, so running the same command again continues the search.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
import yaml
from optuna.trial import TrialState
from pydantic import BaseModel

from lmforge import pipeline
from lmforge.artifacts import RunLayout, atomic_write_json, atomic_write_text, fresh_folder
from lmforge.config import Recipe, apply_overrides, parse_value, recipe_to_yaml, validate_recipe
from lmforge.errors import LmforgeError
from lmforge.training.pretrain import pretrain

SAMPLERS = ("tpe", "random", "grid")
DEFAULT_TRIALS = 20
FORMS = "uniform:LOW:HIGH, loguniform:LOW:HIGH, int:LOW:HIGH[:STEP] or choice:A,B,..."
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STATE_ORDER = {"complete": 0, "pruned": 1, "failed": 2, "interrupted": 3, "running": 4}


@dataclass(frozen=True)
class Param:
    """One searched recipe key and its distribution (``kind``: uniform, loguniform, int or choice)."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: int = 1
    choices: tuple = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return "choice:" + ",".join(_show(value, exact=True) for value in self.choices)
        step = f":{self.step}" if self.kind == "int" and self.step != 1 else ""
        return f"{self.kind}:{_show(self.low, exact=True)}:{_show(self.high, exact=True)}{step}"

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step)
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")

    def grid_values(self) -> list | None:
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return list(range(self.low, self.high + 1, self.step))
        return None

    def probe_values(self) -> list:
        """Values checked against the recipe before any training."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [self.low, self.high]
        # A value strictly between the bounds, at an irrational fraction of the range so that it is
        # never a whole number, also catches a float range over an integer field.
        return [self.low, self.low + (self.high - self.low) * (math.sqrt(5) - 1) / 2, self.high]


def parse_param(text: str) -> Param:
    """``KEY=DIST`` as given to ``--param``, e.g. ``train.learning_rate=loguniform:1e-4:1e-2``."""
    key, has_equals, definition = text.partition("=")
    if not has_equals or not key.strip() or not definition.strip():
        raise LmforgeError(f"--param {text!r}: expected KEY=DIST with DIST one of {FORMS}")
    return parse_distribution(key.strip(), definition.strip())


def parse_distribution(key: str, definition: Any) -> Param:
    """A distribution written as ``kind:...``; a YAML list (from a --space file) is a choice."""
    if isinstance(definition, list):
        return Param(key, "choice", choices=_choices(key, definition, str(definition)))
    if not isinstance(definition, str):
        raise LmforgeError(f"search parameter `{key}`: expected one of {FORMS}, got {definition!r}")
    kind, _, rest = definition.partition(":")
    fields = rest.split(":")

    def bad(reason: str) -> LmforgeError:
        return LmforgeError(f"search parameter `{key}={definition}`: {reason}")

    if kind == "choice":
        return Param(key, "choice", choices=_choices(key, rest.split(","), definition))
    if kind in ("uniform", "loguniform"):
        if len(fields) != 2:
            raise bad(f"expected {kind}:LOW:HIGH")
        low, high = (_number(text, bad) for text in fields)
        if kind == "loguniform" and low <= 0:
            raise bad("loguniform needs LOW > 0")
    elif kind == "int":
        if len(fields) not in (2, 3):
            raise bad("expected int:LOW:HIGH or int:LOW:HIGH:STEP")
        low, high, step = (_integer(text, bad) for text in fields + ["1"] * (3 - len(fields)))
        if step < 1 or (high - low) % step:
            raise bad(f"STEP must be a positive divisor of HIGH - LOW ({high - low})")
    else:
        raise bad(f"unknown distribution `{kind}`; use {FORMS}")
    if not low < high:
        raise bad("LOW must be below HIGH")
    return Param(key, kind, low, high, step) if kind == "int" else Param(key, kind, low, high)


def read_space_file(path: Path) -> dict[str, Any]:
    """A YAML mapping of recipe keys to distributions; nested sections (``train: {learning_rate: ...}``) work too."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"search space file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise LmforgeError(f"search space {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict) or not raw:
        raise LmforgeError(f"search space {path} must be a mapping of KEY: DIST, e.g. `train.learning_rate: loguniform:1e-4:1e-2`")
    return _flatten(raw)


def parse_space(param_texts: list[str], space_file: Path | None = None, fixed: dict | None = None) -> list[Param]:
    """The search space from ``--param`` definitions and an optional ``--space`` file (``--param`` wins).

    ``fixed`` holds the recipe overrides given on the command line; a key cannot be both fixed and searched.
    """
    definitions = read_space_file(space_file) if space_file is not None else {}
    params = {key: parse_distribution(key, definition) for key, definition in definitions.items()}
    for text in param_texts:
        param = parse_param(text)
        params[param.key] = param
    if not params:
        raise LmforgeError("nothing to search: give at least one --param KEY=DIST (or --space FILE)")
    known = recipe_keys()
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean `{close[0]}`?" if close else "see `lmforge recipe --reference`"
            raise LmforgeError(f"cannot search unknown key `{key}`; {hint}")
    both = sorted(set(params) & set(fixed or {}))
    if both:
        raise LmforgeError(f"`{both[0]}` is both fixed (--{both[0]}) and searched (--param); drop one of them")
    return list(params.values())


def recipe_keys() -> list[str]:
    """Every dotted recipe key (``train.learning_rate``), from the recipe's models."""
    keys = []
    for name, info in Recipe.model_fields.items():
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            keys += [f"{name}.{key}" for key in section.model_fields]
        else:
            keys.append(name)
    return keys


@dataclass
class TuneResult:
    folder: Path
    trials: list[dict]  # the rows of results.json, best first
    best: dict | None
    best_recipe: Path | None


class _GridSampler(optuna.samplers.GridSampler):
    # The stock after_trial calls study.stop() once the grid is covered, which raises outside
    # study.optimize(); our loop already stops after the grid's size.
    def after_trial(self, study, trial, state, values) -> None:
        pass


def tune(
    recipe: Recipe,
    space: list[Param],
    workdir: Path,
    *,
    trials: int | None = None,
    sampler: str = "tpe",
    seed: int = 0,
    prune: bool = True,
    study_name: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = lambda line: print(line, flush=True),
) -> TuneResult:
    """Train trials of ``recipe`` until the study holds ``trials`` finished ones, then write the results.

    The study and its trials live in ``<workdir>/<study_name>/`` (default name: ``<recipe name>-tune``);
    a rerun continues it, and refuses to if the search space or the fixed settings changed. Prints one
    line per finished trial through ``echo``, then the results table. Raises LmforgeError for a bad
    space, or when every trial failed.
    """
    if sampler not in SAMPLERS:
        raise LmforgeError(f"unknown sampler `{sampler}`; use one of {', '.join(SAMPLERS)}")
    study_name = study_name or f"{recipe.name}-tune"
    if not STUDY_NAME.match(study_name):
        raise LmforgeError(f"study name `{study_name}` must be letters, digits, `_`, `.` or `-` (it names a folder)")
    base_raw = recipe.model_dump(mode="json")
    _check_values(base_raw, space, recipe.name)
    target = _target_trials(space, sampler, trials)
    folder = Path(workdir) / study_name
    folder.mkdir(parents=True, exist_ok=True)
    shared = _shared_stages(space)
    if len(shared) < 3:
        _say("note: data or tokenizer settings are searched, so each trial builds its own data, tokenizer and tokens; "
             "validation loss is per token, so compare trials with different tokenizers or splits with care")

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Optuna's INFO lines would repeat ours
    try:
        study = _open_study(folder, study_name, space, base_raw, prune, recipe.train.eval_interval)
        done = _count_finished(study)
        # A fresh sampler seeded like the last run would propose the same first points again.
        study.sampler = _make_sampler(sampler, space, seed if sampler == "grid" else seed + len(study.trials), target)
        _say(f"tune: study `{study_name}` has {done} of {target} trials finished; running {max(target - done, 0)} more "
             f"({sampler} sampler, pruning {'on' if prune else 'off'}) in {folder}")
        base = RunLayout(folder / "base")
        if done < target and shared:
            base.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(base.recipe, recipe_to_yaml(recipe))
            for stage in shared:
                _say(pipeline.RUNNERS[stage](recipe, base, progress=progress))
        for _ in range(target - done):
            echo(_run_trial(study, space, base_raw, folder, base, shared))
        rows = _rows(study, space)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return _write_results(folder, study_name, recipe, base_raw, space, rows, echo)


def _open_study(folder: Path, name: str, space: list[Param], base_raw: dict, prune: bool, eval_interval: int) -> optuna.Study:
    # The first validation comes before the loss curves separate, so it never prunes.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=eval_interval + 1) if prune else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{(folder / 'study.db').resolve()}", direction="minimize",
                                pruner=pruner, load_if_exists=True)
    recorded = {"space": {param.key: param.describe() for param in space}, "recipe": base_raw}
    if "space" not in study.user_attrs:
        for key, value in recorded.items():
            study.set_user_attr(key, value)
        return study
    for key, what in (("space", "a different search space"), ("recipe", "different fixed settings")):
        changes = _differences(study.user_attrs[key], recorded[key])
        if changes:
            raise LmforgeError(f"study `{name}` in {folder} was run with {what} ({changes}); "
                               f"give --study-name NEW for a new search, or delete {folder}")
    return study


def _make_sampler(name: str, space: list[Param], seed: int, target: int) -> optuna.samplers.BaseSampler:
    if name == "grid":
        return _GridSampler({param.key: param.grid_values() for param in space}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Optuna's default of 10 random trials first would make a short TPE search purely random.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, target // 4)))


def _target_trials(space: list[Param], sampler: str, trials: int | None) -> int:
    if trials is not None and trials < 1:
        raise LmforgeError(f"--trials must be at least 1 (got {trials})")
    if sampler != "grid":
        return DEFAULT_TRIALS if trials is None else trials
    for param in space:
        if param.grid_values() is None:
            raise LmforgeError(f"--sampler grid needs choice or int parameters, and `{param.key}` is {param.kind}; "
                               f"list its values with choice:A,B,... or use --sampler tpe or random")
    size = math.prod(len(param.grid_values()) for param in space)
    if trials is not None and trials > size:
        _say(f"note: the grid has {size} points; running {size} trials, not {trials}")
    return size if trials is None else min(trials, size)


def _shared_stages(space: list[Param]) -> list[str]:
    """The prepared stages every trial can share: those before the first stage whose section is searched."""
    searched = {param.key.split(".")[0] for param in space}
    shared = []
    for stage in ("data", "tokenizer", "tokens"):  # tokens has no section: it is shared when both before it are
        if stage in searched:
            break
        shared.append(stage)
    return shared


def _check_values(base_raw: dict, space: list[Param], recipe_name: str) -> None:
    for param in space:
        for value in param.probe_values():
            try:
                _trial_recipe(base_raw, {param.key: value}, f"`{recipe_name}` with {param.key}={value!r}")
            except LmforgeError as exc:
                # Only a problem with the field itself is fatal: a clash between fields (d_model and
                # n_heads) may be resolved by another searched field, so it only fails those trials.
                if f"`{param.key}`" in str(exc):
                    raise


def _trial_recipe(base_raw: dict, params: dict, source: str) -> Recipe:
    return validate_recipe(apply_overrides(copy.deepcopy(base_raw), params), source)


def _count_finished(study: optuna.Study) -> int:
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    return sum(1 for trial in finished if not trial.user_attrs.get("interrupted"))


def _run_trial(study: optuna.Study, space: list[Param], base_raw: dict, folder: Path, base: RunLayout, shared: list[str]) -> str:
    """Ask for a trial, train it, tell the study how it ended; returns the line to print."""
    trial = study.ask()
    started = time.perf_counter()
    params = {param.key: param.suggest(trial) for param in space}
    value, state = None, TrialState.COMPLETE
    try:
        value = _train(trial, params, base_raw, folder, base, shared)
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except (LmforgeError, torch.OutOfMemoryError) as exc:
        trial.set_user_attr("error", " ".join(str(exc).split()))
        state = TrialState.FAIL
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            # Not counted as finished: the next run retries the same values.
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(params)
        else:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            study.tell(trial, state=TrialState.FAIL)
        raise
    seconds = time.perf_counter() - started
    trial.set_user_attr("seconds", round(seconds, 1))
    frozen = study.tell(trial, value, state=state)
    if state == TrialState.COMPLETE:
        outcome = f"val loss {value:.4f}"
    elif state == TrialState.PRUNED:
        outcome = f"pruned at step {frozen.last_step}"
    else:
        outcome = f"failed: {frozen.user_attrs['error']}"
    return f"trial {trial.number}  {_format_params(params)}  {outcome}  ({seconds:.1f} s)"


def _train(trial: optuna.Trial, params: dict, base_raw: dict, folder: Path, base: RunLayout, shared: list[str]) -> float:
    recipe = _trial_recipe(base_raw, params, f"for trial {trial.number}")
    layout = RunLayout(folder / f"trial_{trial.number:04d}")
    fresh_folder(layout.root)  # a trial number is new to this study, so anything there is stale
    atomic_write_text(layout.recipe, recipe_to_yaml(recipe))
    for stage in shared:
        _link(getattr(base, stage), getattr(layout, stage))
    for stage in ("data", "tokenizer", "tokens"):
        pipeline.RUNNERS[stage](recipe, layout, progress=False)

    def on_eval(step: int, val_loss: float) -> None:
        trial.report(val_loss, step)
        # The validation at the last step is the trial's result: pruning there would only discard it.
        if step != recipe.train.max_steps and trial.should_prune():
            raise optuna.TrialPruned(f"validation loss {val_loss:.4f} at step {step}")

    result = pretrain(recipe, layout, progress=False, fresh=True, on_eval=on_eval)
    if result.interrupted:
        raise KeyboardInterrupt
    if result.val_loss is None or not math.isfinite(result.val_loss):
        raise LmforgeError(f"trial {trial.number} ended with validation loss {result.val_loss}")
    return result.val_loss


def _link(source: Path, link: Path) -> None:
    try:
        link.symlink_to(os.path.relpath(source, link.parent), target_is_directory=True)
    except OSError:  # a filesystem without symlinks: copy instead
        shutil.copytree(source, link)


def _rows(study: optuna.Study, space: list[Param]) -> list[dict]:
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed", TrialState.RUNNING: "running"}
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in names:  # queued for the next run
            continue
        state = "interrupted" if trial.user_attrs.get("interrupted") else names[trial.state]
        rows.append({
            "trial": trial.number,
            "state": state,
            "val_loss": trial.value if state in ("complete", "pruned") else None,
            "pruned_at_step": trial.last_step if state == "pruned" else None,
            "seconds": trial.user_attrs.get("seconds"),
            "params": {param.key: trial.params.get(param.key) for param in space},
            "run": f"trial_{trial.number:04d}",
            "error": trial.user_attrs.get("error"),
        })
    rows.sort(key=lambda row: (STATE_ORDER[row["state"]], math.inf if row["val_loss"] is None else row["val_loss"], row["trial"]))
    return rows


def results_table(rows: list[dict], keys: list[str]) -> str:
    """The trials as a Markdown table, best first."""
    with_notes = any(row["error"] for row in rows)
    header = ["trial", "state", "val loss", "seconds", *keys, *(["note"] if with_notes else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        state = f"pruned at step {row['pruned_at_step']}" if row["state"] == "pruned" else row["state"]
        cells = [str(row["trial"]), state, "" if row["val_loss"] is None else f"{row['val_loss']:.4f}",
                 "" if row["seconds"] is None else f"{row['seconds']:.1f}", *(_show(row["params"][key]) for key in keys)]
        if with_notes:
            cells.append(row["error"] or "")
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def _write_results(folder: Path, name: str, recipe: Recipe, base_raw: dict, space: list[Param], rows: list[dict],
                   echo: Callable[[str], None]) -> TuneResult:
    keys = [param.key for param in space]
    best = rows[0] if rows and rows[0]["state"] == "complete" else None
    best_path = folder / "best.yaml"
    table = results_table(rows, keys)
    summary = "no trial has completed yet"
    if best is not None:
        best_recipe = _trial_recipe(base_raw, best["params"], f"of trial {best['trial']}")
        atomic_write_text(best_path, f"# Best trial of study `{name}`: trial {best['trial']}, validation loss {best['val_loss']:.4f}\n"
                                     f"# searched: {_format_params(best['params'])}\n" + recipe_to_yaml(best_recipe))
        summary = f"best: trial {best['trial']}, validation loss {best['val_loss']:.4f} -> {best_path.name}"
    searched = ", ".join(f"`{param.key}` {param.describe()}" for param in space)
    atomic_write_text(folder / "results.md", f"# Hyperparameter search `{name}`\n\nRecipe `{recipe.name}`; objective: final validation "
                                             f"loss (nats per token, lower is better). Searched: {searched}.\n\n{summary}\n\n{table}\n")
    atomic_write_json(folder / "results.json", {
        "study": name, "recipe": recipe.name, "objective": "val_loss", "space": {param.key: param.describe() for param in space},
        "best": best, "best_recipe": best_path.name if best else None, "trials": rows,
    })
    echo("\n" + table + "\n")
    if best is None:
        failures = [row for row in rows if row["state"] == "failed"]
        if failures and len(failures) == len(rows):
            raise LmforgeError(f"every trial of study `{name}` failed (trial {failures[0]['trial']}: {failures[0]['error']}); "
                               f"results in {folder / 'results.md'}")
    else:
        echo(f"best: trial {best['trial']}, validation loss {best['val_loss']:.4f}; recipe -> {best_path}")
    echo(f"results -> {folder / 'results.md'}")
    return TuneResult(folder, rows, best, best_path if best else None)


def _choices(key: str, items: list, definition: str) -> tuple:
    where = f"search parameter `{key}={definition}`"
    values = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            raise LmforgeError(f"{where}: empty choice")
        value = _choice_value(item.strip()) if isinstance(item, str) else item
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise LmforgeError(f"{where}: a choice must be a number, text, true/false or null (got {value!r})")
        if (type(value), value) in {(type(seen), seen) for seen in values}:
            raise LmforgeError(f"{where}: {_show(value, exact=True)} is listed twice")
        values.append(value)
    if not values:
        raise LmforgeError(f"{where}: list at least one choice")
    return tuple(values)


def _choice_value(text: str) -> Any:
    value = parse_value(text)
    if isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as text; a learning rate of "1e-4" should be a number.
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _number(text: str, bad: Callable[[str], LmforgeError]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise bad(f"`{text}` is not a number") from None
    if not math.isfinite(value):
        raise bad(f"`{text}` is not a finite number")
    return value


def _integer(text: str, bad: Callable[[str], LmforgeError]) -> int:
    try:
        return int(text)
    except ValueError:
        raise bad(f"`{text}` is not an integer") from None


def _show(value: Any, exact: bool = False) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return repr(value) if exact else f"{value:.4g}"
    return str(value)


def _format_params(params: dict) -> str:
    return " ".join(f"{key}={_show(value)}" for key, value in params.items())


def _flatten(raw: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _differences(old: Any, new: Any) -> str:
    old_flat = _flatten(old) if isinstance(old, dict) else {"": old}
    new_flat = _flatten(new) if isinstance(new, dict) else {"": new}
    changed = [key for key in sorted(set(old_flat) | set(new_flat)) if old_flat.get(key, "(unset)") != new_flat.get(key, "(unset)")]
    return ", ".join(f"{key}: {old_flat.get(key, '(unset)')!r} -> {new_flat.get(key, '(unset)')!r}" for key in changed[:3])


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
