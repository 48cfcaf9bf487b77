"""Human side-by-side judging: which of two models' answers to the same prompt is better?

``lmforge judge A B [C ...] --prompts FILE`` generates every model's answer to every prompt once
(``answers.jsonl``, completed by ``manifest.json``), then shows a person every pair of models on every
prompt, anonymised as "Answer 1" and "Answer 2" in a seeded random order and placement. Each vote is
appended to ``votes.jsonl`` and flushed at once, so stopping at any moment loses nothing and the same
command resumes. ``report.json`` and ``report.md`` hold pairwise win rates with Wilson intervals and,
for three models or more, Bradley-Terry ratings on the Elo scale with bootstrap intervals.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from statistics import NormalDist
from typing import TextIO

import numpy as np

from lmforge.artifacts import atomic_write_json, atomic_write_text, fingerprint, is_up_to_date, read_json, write_manifest
from lmforge.errors import LmforgeError
from lmforge.evaluation.files import read_jsonl_objects, read_text_file, string_field

STAGE = "judge"
ANSWERS, VOTES, REPORT_JSON, REPORT_MD, MANIFEST = "answers.jsonl", "votes.jsonl", "report.json", "report.md", "manifest.json"
Z_95 = NormalDist().inv_cdf(0.975)  # 1.95996...
ELO_SCALE, ELO_MEAN = 400.0, 1000.0


def _say(message: str) -> None:
    print(f"judge: {message}", file=sys.stderr, flush=True)


# Inputs: the models and the prompts.

@dataclass(frozen=True)
class Contender:
    """One model being judged: the path the user gave, the checkpoint it resolves to, its report name."""

    name: str
    path: Path
    checkpoint: Path
    fingerprint: str  # of the checkpoint's file hashes: answers are reused only for the same weights

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "checkpoint": str(self.checkpoint)}


def checkpoint_label(checkpoint: Path) -> str:
    """``<run>-step<N>`` for ``<run>/checkpoints/step_0000000N``."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.parent.name
    try:
        step = int(read_json(checkpoint / "trainer_state.json", what="trainer state")["step"])
    except (LmforgeError, KeyError, TypeError, ValueError):
        digits = re.sub(r"\D", "", checkpoint.name)
        step = int(digits) if digits else checkpoint.name
    return f"{run or 'model'}-step{step}"


def unique_names(labels: list[str]) -> list[str]:
    """Number labels that repeat (runs of the same name in two work folders): tiny-step30-1, tiny-step30-2."""
    seen, names = {}, []
    for label in labels:
        if labels.count(label) == 1:
            names.append(label)
            continue
        seen[label] = seen.get(label, 0) + 1
        names.append(f"{label}-{seen[label]}")
    return names


def resolve_contenders(paths: list[Path]) -> list[Contender]:
    """Check the model paths (at least two, all different) and name them; loads no weights."""
    from lmforge.training.checkpoint import resolve_checkpoint, verify_checkpoint

    paths = [Path(path) for path in paths]
    if len(paths) < 2:
        raise LmforgeError(f"judge needs at least two models (run or checkpoint folders), got {len(paths)}")
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.resolve() in seen:
            raise LmforgeError(f"{path} is given twice (as {seen[path.resolve()]} too); the models to judge must be different paths")
        seen[path.resolve()] = path
    checkpoints = [resolve_checkpoint(path) for path in paths]
    by_checkpoint: dict[Path, Path] = {}
    for path, checkpoint in zip(paths, checkpoints):
        if checkpoint.resolve() in by_checkpoint:
            raise LmforgeError(f"{path} and {by_checkpoint[checkpoint.resolve()]} are the same checkpoint ({checkpoint}); "
                               "judging a model against itself shows identical answers")
        by_checkpoint[checkpoint.resolve()] = path
    names = unique_names([checkpoint_label(checkpoint) for checkpoint in checkpoints])
    return [Contender(name, path, checkpoint, fingerprint(verify_checkpoint(checkpoint)["files"]))
            for name, path, checkpoint in zip(names, paths, checkpoints)]


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per line) or, for a ``.jsonl`` file, from ``{"prompt": ...}`` lines.

    Blank lines are skipped; a bad line is an error naming ``file:line``.
    """
    path = Path(path)
    if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        return [string_field(record, "prompt", f"{path}:{number}") for number, record in read_jsonl_objects(path, "prompts")]
    prompts = [line for line in read_text_file(path, "prompts").splitlines() if line.strip()]
    if not prompts:
        raise LmforgeError(f"{path} holds no prompts")
    return prompts


def default_out_dir(names: list[str]) -> Path:
    """``./judgements/<a>-vs-<b>[-vs-<c>...]``: a judgement belongs to no single run, so it lives beside them."""
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", "-vs-".join(names))
    if len(folder) > 100:  # many models: keep two names readable and a hash to keep the folder unique
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{names[0]}-vs-{names[1]}-and-{len(names) - 2}-more-{digest}")
    return Path("judgements") / folder


# Answers: generated once per (models, prompts, settings), reused on rerun.

def prepare_answers(out_dir: Path, contenders: list[Contender], prompts: list[str], settings: dict,
                    device: str = "auto") -> dict[tuple[str, int], str]:
    """Every model's answer to every prompt, keyed by (model name, prompt index).

    ``settings`` holds max_new_tokens, temperature, top_k and seed. Saved answers are reused when the
    models' weights, the prompts and the settings are the ones they were made with; otherwise they are
    made again, and votes cast on the old answers are moved aside to ``votes.before-<time>.jsonl``.
    """
    out_dir = Path(out_dir)
    config = {**settings, "models": [c.name for c in contenders]}
    inputs = {"prompts": fingerprint(prompts), **{f"model:{c.name}": c.fingerprint for c in contenders}}
    answers_path = out_dir / ANSWERS
    if answers_path.exists() and is_up_to_date(out_dir, STAGE, config, inputs):
        answers = _read_answers(answers_path)
        if all((c.name, index) in answers for c in contenders for index in range(len(prompts))):
            _say(f"reusing the saved answers ({len(contenders)} models x {len(prompts)} prompts)")
            return answers
    if answers_path.exists():
        _say(f"the saved answers do not match ({_what_changed(out_dir, config, inputs)}); generating new ones")
    votes_path = out_dir / VOTES
    if votes_path.exists() and votes_path.stat().st_size:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        archived, copies = votes_path.with_name(f"votes.before-{stamp}.jsonl"), 1
        while archived.exists():  # never overwrite an earlier set of votes
            copies += 1
            archived = votes_path.with_name(f"votes.before-{stamp}-{copies}.jsonl")
        votes_path.rename(archived)
        _say(f"earlier votes were cast on other answers: moved to {archived.name}")
    (out_dir / MANIFEST).unlink(missing_ok=True)

    started = time.perf_counter()
    answers = _generate_answers(contenders, prompts, settings, device)
    lines = [json.dumps({"model": c.name, "prompt_index": index, "prompt": prompt, "answer": answers[c.name, index]},
                        ensure_ascii=False) for c in contenders for index, prompt in enumerate(prompts)]
    atomic_write_text(answers_path, "\n".join(lines) + "\n")
    write_manifest(out_dir, STAGE, config, inputs, {"models": [c.as_dict() for c in contenders], "prompts": len(prompts),
                                                    "seconds": round(time.perf_counter() - started, 2)})
    return answers


def _generate_answers(contenders: list[Contender], prompts: list[str], settings: dict, device: str) -> dict[tuple[str, int], str]:
    from lmforge.evaluation.report import load_for_inference
    from lmforge.inference.generate import SamplingParams, generate

    answers = {}
    for number, contender in enumerate(contenders, start=1):
        # Progress names no model: the person about to vote is watching this terminal.
        _say(f"generating answers: model {number} of {len(contenders)}, {len(prompts)} prompts")
        model, tokenizer, _ = load_for_inference(contender.checkpoint, device)
        for index, prompt in enumerate(prompts):
            # Every model samples prompt i with the same seed, so no model gets luckier random numbers.
            params = SamplingParams(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                                    top_k=settings["top_k"], seed=settings["seed"] + index)
            try:
                answers[contender.name, index] = "".join(generate(model, tokenizer, prompt, params))
            except LmforgeError as exc:
                raise LmforgeError(f"prompt {index + 1} ({prompt[:40]!r}): {exc}") from None
        del model
    return answers


def _read_answers(path: Path) -> dict[tuple[str, int], str]:
    answers = {}
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                answers[record["model"], int(record["prompt_index"])] = str(record["answer"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}  # unreadable: treated as missing, so the answers are made again
    return answers


def _what_changed(out_dir: Path, config: dict, inputs: dict) -> str:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        old_config, old_inputs = manifest["config"], manifest["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return "they are incomplete"
    changed = [key for key in ("max_new_tokens", "temperature", "top_k", "seed") if old_config.get(key) != config.get(key)]
    if old_inputs.get("prompts") != inputs["prompts"]:
        changed.append("prompts")
    if old_config.get("models") != config["models"] or any(old_inputs.get(k) != v for k, v in inputs.items() if k.startswith("model:")):
        changed.append("models")
    return "changed: " + ", ".join(changed) if changed else "they are incomplete"


# Pairs and votes.

@dataclass(frozen=True)
class Pair:
    """One comparison: the answers of ``left`` ("Answer 1") and ``right`` ("Answer 2") to one prompt."""

    id: int
    prompt_index: int
    left: str
    right: str

    @property
    def key(self) -> tuple[int, frozenset]:
        return self.prompt_index, frozenset((self.left, self.right))


def schedule_pairs(names: list[str], prompt_count: int, seed: int) -> list[Pair]:
    """Every pair of models on every prompt, in a seeded random order with a seeded random placement."""
    rng = random.Random(seed)
    comparisons = [(index, a, b) for index in range(prompt_count) for a, b in itertools.combinations(names, 2)]
    rng.shuffle(comparisons)
    pairs = []
    for number, (index, a, b) in enumerate(comparisons):
        left, right = (a, b) if rng.random() < 0.5 else (b, a)
        pairs.append(Pair(number, index, left, right))
    return pairs


def vote_key(vote: dict) -> tuple[int, frozenset]:
    return vote["prompt_index"], frozenset((vote["left"], vote["right"]))


def read_votes(path: Path) -> list[dict]:
    """The votes of ``votes.jsonl``; a bad line is an error naming ``file:line``.

    A last line cut short (the process was killed while writing it) is dropped with a warning.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    votes = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            vote = json.loads(line)
            valid = (isinstance(vote, dict) and isinstance(vote.get("prompt_index"), int) and isinstance(vote.get("left"), str)
                     and isinstance(vote.get("right"), str) and vote["left"] != vote["right"]
                     and vote.get("winner") in (vote["left"], vote["right"], "tie"))
        except json.JSONDecodeError:
            valid = False
        if not valid:
            if number == len(lines):  # no newline after it: a write interrupted part-way
                _say(f"ignoring an incomplete last line in {path}")
                break
            raise LmforgeError(f"{path}:{number}: not a vote (expected {{\"prompt_index\", \"left\", \"right\", \"winner\"}})")
        votes.append(vote)
    return votes


def _end_last_line(path: Path) -> None:
    """Make the next vote start on a line of its own: end a complete last line, cut an unfinished one."""
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        complete = isinstance(json.loads(data[start:]), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        complete = False
    with open(path, "r+b") as handle:
        if complete:
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n")
        else:
            handle.truncate(start)


def append_vote(path: Path, vote: dict) -> None:
    """Append one vote and push it to disk before returning: Ctrl-C or a crash right after loses nothing."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(vote, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


CHOICES = {"1": 1, "2": 2, "tie": "tie", "skip": "skip"}


def _plain_text(value) -> str:
    """A JSON string or whole number as text; anything else (true, 1.5, lists) as text that matches nothing."""
    return value if isinstance(value, str) else str(value) if isinstance(value, int) and not isinstance(value, bool) else "\0"


class JudgingSession:
    """The pairs still to judge and the votes file, shared by the terminal and the browser (thread-safe).

    Skipped pairs are left unvoted: this session moves on, the next one offers them again.
    """

    def __init__(self, out_dir: Path, names: list[str], prompts: list[str], answers: dict[tuple[str, int], str], seed: int):
        self.out_dir, self.names, self.prompts, self.answers = Path(out_dir), list(names), list(prompts), answers
        self.votes_path = self.out_dir / VOTES
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _end_last_line(self.votes_path)
        voted = {vote_key(vote) for vote in read_votes(self.votes_path)}
        self.schedule = schedule_pairs(self.names, len(self.prompts), seed)
        self._pending = {pair.id: pair for pair in self.schedule if pair.key not in voted}
        self._skipped: set[int] = set()
        self.voted_now = 0
        self._lock = threading.Lock()

    def next_pair(self) -> Pair | None:
        with self._lock:
            return next((pair for pair in self._pending.values() if pair.id not in self._skipped), None)

    def show(self, pair: Pair) -> dict:
        """What a voter may see of a pair: no model names, answers made safe for a terminal."""
        return {"pair_id": str(pair.id), "prompt": sanitize(self.prompts[pair.prompt_index]),
                "answer_1": sanitize(self.answers[pair.left, pair.prompt_index]),
                "answer_2": sanitize(self.answers[pair.right, pair.prompt_index])}

    def progress(self) -> dict:
        with self._lock:
            total, pending = len(self.schedule), len(self._pending)
            return {"judged": total - pending, "total": total, "skipped": len(self._skipped),
                    "remaining": pending - len(self._skipped)}

    def vote(self, pair_id, choice) -> dict | None:
        """Record ``choice`` (1, 2, "tie" or "skip") for a pending pair; return the vote written (None for a skip).

        Raises ValueError with a message for the voter on an unknown choice or pair.
        """
        normalised = CHOICES.get(_plain_text(choice).strip().lower())
        if normalised is None:
            raise ValueError(f"unknown choice {choice!r}: expected 1, 2, \"tie\" or \"skip\"")
        number = int(_plain_text(pair_id)) if _plain_text(pair_id).isdigit() else None
        with self._lock:
            pair = self._pending.get(number)
            if pair is None:
                raise ValueError(f"pair {pair_id!r} is unknown or already judged")
            if normalised == "skip":
                self._skipped.add(number)
                return None
            winner = {1: pair.left, 2: pair.right, "tie": "tie"}[normalised]
            vote = {"prompt_index": pair.prompt_index, "left": pair.left, "right": pair.right, "winner": winner,
                    "voted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            append_vote(self.votes_path, vote)
            del self._pending[number]
            self._skipped.discard(number)
            self.voted_now += 1
            return vote


# Statistics: pure functions of the votes.

def wilson_interval(successes: float, trials: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a success fraction; (0, 1) when there are no trials.

    Chosen over a bootstrap because pairwise counts are small: a 5-0 record bootstraps to 5-0 every
    time (an interval of width zero), and the normal approximation leaves [0, 1] near the edges, while
    Wilson's closed form stays inside [0, 1], is deterministic and behaves well from a handful of votes.
    Ties enter as half a success; a tie varies less than a coin flip, so this errs on the wide side.
    """
    if trials <= 0:
        return 0.0, 1.0
    fraction = successes / trials
    if not 0 <= fraction <= 1:
        raise ValueError(f"successes ({successes}) must lie between 0 and trials ({trials})")
    shrink = 1 + z * z / trials
    centre = (fraction + z * z / (2 * trials)) / shrink
    half_width = z * math.sqrt(fraction * (1 - fraction) / trials + z * z / (4 * trials * trials)) / shrink
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def pairwise_table(votes: list[dict], names: list[str]) -> list[dict]:
    """For each pair of models (a before b in ``names``): a's wins, losses and ties against b, a's win rate
    with ties as half a win, and its 95% Wilson interval (None/[0, 1] when the pair has no votes)."""
    rows = []
    for a, b in itertools.combinations(names, 2):
        between = [vote for vote in votes if {vote["left"], vote["right"]} == {a, b}]
        wins = sum(vote["winner"] == a for vote in between)
        losses = sum(vote["winner"] == b for vote in between)
        ties = len(between) - wins - losses
        score = wins + ties / 2
        rows.append({"a": a, "b": b, "a_wins": wins, "b_wins": losses, "ties": ties, "votes": len(between),
                     "a_win_rate": score / len(between) if between else None,
                     "a_win_rate_interval": list(wilson_interval(score, len(between)))})
    return rows


def _vote_matrices(votes: list[dict], names: list[str]) -> np.ndarray:
    """(V, k, k): vote v's contribution to wins[i, j], the times model i beat model j (a tie: half each way)."""
    index = {name: i for i, name in enumerate(names)}
    matrices = np.zeros((len(votes), len(names), len(names)))
    for v, vote in enumerate(votes):
        left, right = index[vote["left"]], index[vote["right"]]
        if vote["winner"] == "tie":
            matrices[v, left, right] = matrices[v, right, left] = 0.5
        elif vote["winner"] == vote["left"]:
            matrices[v, left, right] = 1.0
        else:
            matrices[v, right, left] = 1.0
    return matrices


def _strongly_connected(wins: np.ndarray) -> np.ndarray:
    """(B,) whether, for every split of the models in two groups, each group beat the other at least once:
    the condition for the Bradley-Terry maximum-likelihood ratings to exist (be finite)."""
    k = wins.shape[-1]
    reach = (wins > 0) | np.eye(k, dtype=bool)
    for _ in range(max(1, math.ceil(math.log2(k)))):
        reach = (reach.astype(np.int64) @ reach.astype(np.int64)) > 0
    return reach.all(axis=(-2, -1))


def _fit_bradley_terry(wins: np.ndarray, tolerance: float = 1e-10, max_iterations: int = 100_000) -> np.ndarray:
    """Elo-scale ratings (B, k) maximising the Bradley-Terry likelihood of each (B, k, k) wins matrix.

    Uses the minorise-maximise update (Hunter 2004), which never decreases the likelihood. Where the
    maximum is at infinity (some group of models never beat, or never lost to, the rest) or is not
    unique (models never compared), one virtual tie between every two models is added first: a weak
    prior that keeps the ratings finite and pulls them together.
    """
    k = wins.shape[-1]
    wins = wins + (~_strongly_connected(wins))[:, None, None] * 0.5 * (1 - np.eye(k))
    games = wins + wins.swapaxes(-2, -1)
    total_wins = wins.sum(axis=-1)
    log_strength = np.zeros(wins.shape[:-1])
    for _ in range(max_iterations):
        strength = np.exp(log_strength)
        expected_per_strength = (games / (strength[..., :, None] + strength[..., None, :])).sum(axis=-1)
        updated = np.log(total_wins / expected_per_strength)
        updated -= updated.mean(axis=-1, keepdims=True)  # fix the scale's free offset: geometric mean 1
        converged = np.abs(updated - log_strength).max() < tolerance
        log_strength = updated
        if converged:
            break
    return ELO_MEAN + ELO_SCALE * log_strength / math.log(10)


def bradley_terry_ratings(votes: list[dict], names: list[str]) -> dict[str, float]:
    """Bradley-Terry ratings by maximum likelihood, ties as half a win each way, on the Elo scale:
    a difference of 400 means 10:1 odds of winning, and the ratings average 1000."""
    ratings = _fit_bradley_terry(_vote_matrices(votes, names).sum(axis=0)[None])[0]
    return {name: float(rating) for name, rating in zip(names, ratings)}


def ratings_need_prior(votes: list[dict], names: list[str]) -> bool:
    """True when the plain maximum-likelihood ratings would be infinite, so the weak prior is used."""
    return not bool(_strongly_connected(_vote_matrices(votes, names).sum(axis=0)[None])[0])


def bootstrap_rating_intervals(votes: list[dict], names: list[str], samples: int = 1000, seed: int = 0) -> dict[str, tuple]:
    """95% percentile intervals of each rating over ``samples`` resamplings of the votes (with replacement);
    (None, None) without votes."""
    if not votes or samples < 1:
        return {name: (None, None) for name in names}
    matrices = _vote_matrices(votes, names)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(votes), np.full(len(votes), 1 / len(votes)), size=samples)  # (samples, V)
    ratings = _fit_bradley_terry(np.einsum("bv,vij->bij", counts, matrices))
    low, high = np.percentile(ratings, [2.5, 97.5], axis=0)
    return {name: (float(lo), float(hi)) for name, lo, hi in zip(names, low, high)}


# The report.

def build_report(votes: list[dict], models: list[dict], prompt_count: int | None, bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """The judging report: models, vote counts, the pairwise table and (three models or more) ratings.

    ``models`` are ``{"name", ...}`` dicts in the order given; votes naming other models are ignored.
    """
    names = [model["name"] for model in models]
    votes = [vote for vote in votes if vote["left"] in names and vote["right"] in names]
    pair_count = len(names) * (len(names) - 1) // 2
    report = {"models": models, "prompts": prompt_count, "pairs_total": None if prompt_count is None else prompt_count * pair_count,
              "votes": len(votes), "ties": sum(vote["winner"] == "tie" for vote in votes),
              "pairwise": pairwise_table(votes, names),
              "pairwise_method": "win rate of a over b, ties counted as half a win; 95% Wilson score interval",
              "ratings": None, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if len(names) > 2 and votes:
        point = bradley_terry_ratings(votes, names)
        intervals = bootstrap_rating_intervals(votes, names, bootstrap_samples, seed)
        games = {name: sum(name in (vote["left"], vote["right"]) for vote in votes) for name in names}
        report["ratings"] = sorted(({"name": name, "rating": point[name], "interval": list(intervals[name]), "votes": games[name]}
                                    for name in names), key=lambda row: -row["rating"])
        report["ratings_method"] = (f"Bradley-Terry maximum likelihood, ties as half a win each way, Elo scale (400*log10 odds, "
                                    f"mean 1000); 95% percentile bootstrap over {bootstrap_samples} resamplings of the votes (seed {seed})")
        report["ratings_prior"] = ratings_need_prior(votes, names)
    return report


def _rate(row: dict) -> str:
    if row["a_win_rate"] is None:
        return "-"
    low, high = row["a_win_rate_interval"]
    return f"{row['a_win_rate']:.0%} [{low:.0%}, {high:.0%}]"


def _rating(row: dict) -> str:
    low, high = row["interval"]
    interval = f" [{low:.0f}, {high:.0f}]" if low is not None else ""
    return f"{row['rating']:.0f}{interval}"


def _code(text: str | None) -> str:
    return f"`{text}`" if text else "-"


def render_markdown(report: dict) -> str:
    lines = ["# Side-by-side judgement", "",
             f"{report['votes']} votes ({report['ties']} ties)" + (f" of {report['pairs_total']} pairs "
             f"({report['prompts']} prompts x every pair of models)." if report["pairs_total"] is not None else "."), "",
             "## Models", "", "| name | path | checkpoint |", "| --- | --- | --- |"]
    lines += [f"| {model['name']} | {_code(model.get('path'))} | {_code(model.get('checkpoint'))} |" for model in report["models"]]
    lines += ["", "## Pairwise", "", f"{report['pairwise_method']}.", "",
              "| a | b | a's win rate [95% interval] | a wins | b wins | ties | votes |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {row['a']} | {row['b']} | {_rate(row)} | {row['a_wins']} | {row['b_wins']} | {row['ties']} | {row['votes']} |"
              for row in report["pairwise"]]
    if report["ratings"] is not None:
        lines += ["", "## Ratings", "", f"{report['ratings_method']}.", ""]
        if report["ratings_prior"]:
            lines += ["Some models have not both beaten and lost to the others (or were not compared), so the plain "
                      "maximum-likelihood ratings are infinite or undefined: one virtual tie between every two models was "
                      "added, pulling the ratings together.", ""]
        lines += ["| model | rating [95% interval] | votes |", "| --- | --- | --- |"]
        lines += [f"| {row['name']} | {_rating(row)} | {row['votes']} |" for row in report["ratings"]]
    return "\n".join(lines) + "\n"


def format_summary(report: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"{report['votes']} votes ({report['ties']} ties)" + (f" of {report['pairs_total']} pairs" if report["pairs_total"] else ""),
             "win rate of a over b (ties count half) [95% Wilson interval]:"]
    lines += [f"  {row['a']} vs {row['b']}: {_rate(row)}  (wins {row['a_wins']}, losses {row['b_wins']}, ties {row['ties']})"
              for row in report["pairwise"]]
    if report["ratings"] is not None:
        prior = " (with a weak prior)" if report["ratings_prior"] else ""
        lines.append(f"Bradley-Terry ratings, Elo scale [95% bootstrap interval]{prior}:")
        lines += [f"  {row['name']:<24} {_rating(row)}" for row in report["ratings"]]
    return "\n".join(lines)


def write_report(out_dir: Path, report: dict) -> None:
    atomic_write_json(Path(out_dir) / REPORT_JSON, report)
    atomic_write_text(Path(out_dir) / REPORT_MD, render_markdown(report))


def session_report(session: JudgingSession, models: list[dict], bootstrap_samples: int, seed: int) -> dict:
    return build_report(read_votes(session.votes_path), models, len(session.prompts), bootstrap_samples, seed)


# The terminal.

# CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \, or to the line's end), two-byte ESC sequences, 8-bit CSI.
_ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]?|\x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)?|\x1b[ -~]?|\x9b[0-?]*[ -/]*[@-~]?")
# Other C0/C1 controls (keeping newline and tab) and the Unicode marks that reorder text on screen.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def sanitize(text: str) -> str:
    """Model text made inert for a terminal: escape sequences and control characters become U+FFFD."""
    return _CONTROL.sub("\ufffd", _ESCAPE_SEQUENCE.sub("\ufffd", text))


TERMINAL_KEYS = {"1": "1", "2": "2", "t": "tie", "tie": "tie", "s": "skip", "skip": "skip"}
RULE = "=" * 72


def judge_in_terminal(session: JudgingSession, stdin: TextIO, stdout: TextIO) -> str:
    """Ask for votes until every pair is judged or skipped, the voter quits, input ends or Ctrl-C.

    Returns why it stopped: "done", "quit", "eof" or "interrupted". Votes are on disk as they are cast.
    """
    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    try:
        while (pair := session.next_pair()) is not None:
            shown, progress = session.show(pair), session.progress()
            say(f"\n{RULE}\nPair {progress['judged'] + progress['skipped'] + 1} of {progress['total']}"
                f"  ({progress['judged']} judged, {progress['skipped']} skipped)\n{RULE}")
            say(f"Prompt:\n{shown['prompt']}")
            for number in (1, 2):
                say(f"{f' Answer {number} ':-^72}\n{shown[f'answer_{number}'] or '(empty answer)'}")
            say("-" * 72)
            while True:
                say("Which answer is better? 1 / 2 / t(ie) / s(kip) / q(uit): ", end="")
                line = stdin.readline()
                if not line:
                    say("\nend of input: stopping")
                    return "eof"
                answer = line.strip().lower()
                if answer in ("q", "quit"):
                    return "quit"
                if answer in TERMINAL_KEYS:
                    session.vote(pair.id, TERMINAL_KEYS[answer])
                    break
                say(f"please type 1, 2, t, s or q (got {sanitize(line.strip())!r})")
    except KeyboardInterrupt:
        say("\ninterrupted: stopping")
        return "interrupted"
    progress = session.progress()
    say(f"\nAll {progress['total']} pairs judged." if not progress["skipped"]
        else f"\nEvery pair judged or skipped ({progress['skipped']} skipped: the next session offers them again).")
    return "done"


# The browser.

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmforge judge</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 78rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f4; border: 1px solid #ddd; border-radius: 6px;
      padding: .75rem; margin: 0; min-height: 3rem; font-size: .95rem; }
.answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin: 1rem 0; }
button { font-size: 1rem; padding: .5rem 1.1rem; margin: 0 .5rem .5rem 0; cursor: pointer; }
#error { color: #b00020; }
#progress { color: #555; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: .3rem .7rem; text-align: left; }
</style>
</head>
<body>
<h1>Which answer is better?</h1>
<p id="progress">loading...</p>
<section id="judging" hidden>
  <h2>Prompt</h2>
  <pre id="prompt"></pre>
  <div class="answers">
    <div><h2>Answer 1</h2><pre id="answer-1"></pre></div>
    <div><h2>Answer 2</h2><pre id="answer-2"></pre></div>
  </div>
  <p>
    <button data-choice="1">Answer 1 is better [1]</button>
    <button data-choice="tie">Tie [t]</button>
    <button data-choice="2">Answer 2 is better [2]</button>
    <button data-choice="skip">Skip [s]</button>
  </p>
</section>
<section id="results" hidden></section>
<p id="error" role="alert"></p>
<script>
"use strict";
// Model text only ever goes through textContent, never into HTML.
let pairId = null;
const byId = (id) => document.getElementById(id);
const element = (tag, text) => { const node = document.createElement(tag); node.textContent = text; return node; };
const showError = (error) => { byId("error").textContent = String(error.message || error); };

async function call(path, body) {
  const options = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function showProgress(progress) {
  byId("progress").textContent = `${progress.judged} of ${progress.total} pairs judged` +
    (progress.skipped ? `, ${progress.skipped} skipped` : "");
}

async function loadNext() {
  const data = await call("/api/next");
  showProgress(data.progress);
  if (data.done) {
    pairId = null;
    byId("judging").hidden = true;
    return showResults();
  }
  pairId = data.pair_id;
  byId("prompt").textContent = data.prompt;
  byId("answer-1").textContent = data.answer_1;
  byId("answer-2").textContent = data.answer_2;
  byId("judging").hidden = false;
}

async function vote(choice) {
  if (pairId === null) return;
  const id = pairId;
  pairId = null;  // one vote per pair, even on a double click
  byId("error").textContent = "";
  try { await call("/api/vote", {pair_id: id, choice: choice}); } catch (error) { showError(error); }
  loadNext().catch(showError);
}

function table(headers, rows) {
  const node = document.createElement("table");
  const head = node.createTHead().insertRow();
  headers.forEach((text) => head.appendChild(element("th", text)));
  const body = node.createTBody();
  rows.forEach((cells) => { const row = body.insertRow(); cells.forEach((text) => row.appendChild(element("td", text))); });
  return node;
}

const percent = (x) => `${Math.round(100 * x)}%`;

async function showResults() {
  const report = await call("/api/results");
  const box = byId("results");
  box.replaceChildren(element("h2", "Results"), element("p", `${report.votes} votes, ${report.ties} ties.`),
    element("h3", "Pairwise: win rate of a over b, ties count half [95% Wilson interval]"),
    table(["a", "b", "a's win rate", "a wins", "b wins", "ties"], report.pairwise.map((row) => [row.a, row.b,
      row.a_win_rate === null ? "-" : `${percent(row.a_win_rate)} [${percent(row.a_win_rate_interval[0])}, ` +
      `${percent(row.a_win_rate_interval[1])}]`, row.a_wins, row.b_wins, row.ties])));
  if (report.ratings) {
    box.append(element("h3", "Bradley-Terry ratings, Elo scale [95% bootstrap interval]"),
      table(["model", "rating", "interval", "votes"], report.ratings.map((row) => [row.name, Math.round(row.rating),
        row.interval[0] === null ? "-" : `${Math.round(row.interval[0])} to ${Math.round(row.interval[1])}`, row.votes])));
  }
  box.hidden = false;
}

document.querySelectorAll("button[data-choice]").forEach((button) =>
  button.addEventListener("click", () => vote(button.dataset.choice)));
document.addEventListener("keydown", (event) => {
  const choice = {"1": "1", "2": "2", "t": "tie", "s": "skip"}[event.key];
  if (choice && !event.ctrlKey && !event.metaKey && !event.altKey) vote(choice);
});
loadNext().catch(showError);
</script>
</body>
</html>
"""

MAX_BODY_BYTES = 4096


def make_judge_server(session: JudgingSession, models: list[dict], port: int = 0, bootstrap_samples: int = 1000, seed: int = 0,
                      on_done=None) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 for judging in a browser; call ``serve_forever()`` on it.

    GET / is the page, GET /api/next the next pair (no model names), POST /api/vote a vote, and
    GET /api/results the report, once no pair is left. ``on_done`` is called after the last vote.
    """

    class Handler(BaseHTTPRequestHandler):
        server_version = "lmforge-judge"

        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            pass  # a line per request would bury the URL and the report

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

        def _host_allowed(self) -> bool:
            # Only pages served from this address may talk to it (no DNS-rebinding site can vote).
            port = self.server.server_address[1]
            if self.headers.get("Host", "") not in (f"127.0.0.1:{port}", f"localhost:{port}"):
                self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
                return False
            return True

        def do_GET(self):  # noqa: N802 - http.server's naming
            if not self._host_allowed():
                return
            path = self.path.split("?", 1)[0]
            if path == "/":
                self._send(HTTPStatus.OK, PAGE.encode("utf-8"), "text/html; charset=utf-8")
            elif path == "/api/next":
                pair = session.next_pair()
                body = {"done": pair is None, "progress": session.progress()}
                self._json(HTTPStatus.OK, body if pair is None else {**body, **session.show(pair)})
            elif path == "/api/results":
                if session.next_pair() is not None:
                    self._json(HTTPStatus.CONFLICT, {"error": "results are shown once every pair is judged or skipped"})
                else:
                    self._json(HTTPStatus.OK, session_report(session, models, bootstrap_samples, seed))
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

        def do_POST(self):  # noqa: N802
            if not self._host_allowed():
                return
            if self.path.split("?", 1)[0] != "/api/vote":
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {self.path}"})
            # Requiring JSON also stops plain cross-site form posts, which cannot set this content type.
            if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "send the vote as application/json"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "missing Content-Length"})
            if not 0 < length <= MAX_BODY_BYTES:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": f"the body must be 1 to {MAX_BODY_BYTES} bytes"})
            try:
                body = json.loads(self.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # deep nesting is a bad body too
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "the body is not valid JSON"})
            if not isinstance(body, dict) or "pair_id" not in body or "choice" not in body:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "expected {\"pair_id\": ..., \"choice\": 1, 2, \"tie\" or \"skip\"}"})
            try:
                session.vote(body["pair_id"], body["choice"])
            except ValueError as exc:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            progress = session.progress()
            self._json(HTTPStatus.OK, {"ok": True, "progress": progress})
            if progress["remaining"] == 0 and on_done is not None:
                on_done()

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def judge_in_browser(session: JudgingSession, models: list[dict], port: int, bootstrap_samples: int, seed: int, stdout: TextIO) -> None:
    """Serve the judging page until Ctrl-C."""
    told = threading.Event()

    def on_done() -> None:
        if not told.is_set():
            told.set()
            print("judge: every pair is judged or skipped; the page shows the results. Ctrl-C to stop.", file=stdout, flush=True)

    try:
        server = make_judge_server(session, models, port, bootstrap_samples, seed, on_done)
    except OSError as exc:
        raise LmforgeError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    progress = session.progress()
    print(f"judge: open http://127.0.0.1:{server.server_address[1]}/ in a browser to vote "
          f"({progress['judged']} of {progress['total']} pairs judged). Ctrl-C to stop.", file=stdout, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\njudge: stopping", file=stdout, flush=True)
    finally:
        server.server_close()


# The command.

DESCRIPTION = """Judge models side by side: for every prompt and every pair of models, pick the better answer.

Each MODEL is a run folder (its latest checkpoint is used) or a checkpoint folder; give two or more
different ones. Every model answers every prompt once; the answers are then shown in pairs as
"Answer 1" and "Answer 2" in a random order and placement (both drawn with --seed), never naming
the models. Each vote is saved at once: stop at any time (q, Ctrl-C or end of input) and run the
same command again to continue where you left off.

Models are named <run>-step<N> in the files and reports (numbered when two names would match).
The output folder (default: ./judgements/<model-a>-vs-<model-b>[-vs-...], e.g.
./judgements/tiny-step20-vs-tiny-step30) holds:
  answers.jsonl  every model's answer to every prompt; reused when the models, prompts and sampling
                 settings are unchanged (manifest.json records them), made again otherwise (votes on
                 the old answers are then moved to votes.before-<time>.jsonl)
  votes.jsonl    one line per vote: prompt_index, left and right (the models shown as Answer 1 and
                 Answer 2), winner (a model name or "tie")
  report.json, report.md
                 per pair of models: win rate with ties as half a win, 95% Wilson interval, wins,
                 losses, ties; with three models or more, Bradley-Terry ratings on the Elo scale
                 (mean 1000) with 95% bootstrap intervals"""

EXAMPLES = """examples:
  lmforge judge runs/tiny/checkpoints/step_00000020 runs/tiny/checkpoints/step_00000030 --prompts prompts.txt
  lmforge judge runs/a runs/b runs/c --prompts prompts.jsonl --ui browser --port 8765
  lmforge judge --report-only --out judgements/tiny-step20-vs-tiny-step30"""


def add_judge_parser(subparsers) -> argparse.ArgumentParser:
    """Declare ``lmforge judge`` on the CLI's subparsers; ``run_judge`` runs it."""
    parser = subparsers.add_parser("judge", help="judge models side by side, blind, in the terminal or a browser; win rates and ratings",
                                   description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path, metavar="MODEL",
                        help="run folder or checkpoint folder; two or more (with --report-only and --out, none needed)")
    parser.add_argument("--prompts", type=Path, metavar="FILE",
                        help="prompts: a text file with one prompt per line, or a .jsonl file of {\"prompt\": \"...\"} lines "
                             "(blank lines skipped)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: ./judgements/<model-a>-vs-<model-b>[-vs-...])")
    parser.add_argument("--ui", choices=["terminal", "browser"], default="terminal",
                        help="terminal (default): answer 1, 2, t(ie), s(kip) or q(uit) at a prompt; browser: serve a "
                             "self-contained page on 127.0.0.1 (no internet needed), print its URL, show the results when "
                             "every pair is judged; Ctrl-C stops it")
    parser.add_argument("--port", type=int, default=0, metavar="N", help="port for --ui browser (default 0: any free port)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="length limit of each answer in tokens (default 128)")
    parser.add_argument("--temperature", type=float, default=0.7, metavar="T", help="sampling temperature, 0 is greedy (default 0.7)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample only among the K most likely tokens (default: all)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seeds the sampling (prompt i uses S+i for every model), the order and placement of the pairs, "
                             "and the bootstrap (default 0)")
    parser.add_argument("--bootstrap-samples", type=int, default=1000, metavar="N",
                        help="resamplings for the rating intervals (default 1000)")
    parser.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda or cuda:N, for generating the answers")
    parser.add_argument("--report-only", action="store_true", help="only recompute report.json and report.md from votes.jsonl")
    return parser


def run_judge(args: argparse.Namespace) -> int:
    """Run ``lmforge judge`` from parsed arguments: answers, votes in the chosen UI, then the report."""
    if args.bootstrap_samples < 1:
        raise LmforgeError(f"--bootstrap-samples must be at least 1 (got {args.bootstrap_samples})")
    if args.report_only:
        return _report_only(args)
    if len(args.models) < 2:
        raise LmforgeError(f"judge needs at least two models (run or checkpoint folders), got {len(args.models)}")
    if args.prompts is None:
        raise LmforgeError("give the prompts with --prompts FILE (one prompt per line, or a .jsonl file of {\"prompt\": ...})")
    if not 0 <= args.port <= 65535:
        raise LmforgeError(f"--port must be 0 to 65535 (got {args.port})")
    from lmforge.inference.generate import SamplingParams

    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed}
    SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k).validate()
    prompts = read_prompts(args.prompts)
    contenders = resolve_contenders(args.models)
    models = [contender.as_dict() for contender in contenders]
    out_dir = args.out or default_out_dir([contender.name for contender in contenders])
    answers = prepare_answers(out_dir, contenders, prompts, settings, args.device)
    session = JudgingSession(out_dir, [contender.name for contender in contenders], prompts, answers, args.seed)

    if args.ui == "terminal":
        judge_in_terminal(session, sys.stdin, sys.stdout)
    else:
        judge_in_browser(session, models, args.port, args.bootstrap_samples, args.seed, sys.stdout)
    report = session_report(session, models, args.bootstrap_samples, args.seed)
    write_report(out_dir, report)
    print(f"\nResults ({session.voted_now} votes this session)\n{format_summary(report)}\nreport: {Path(out_dir) / REPORT_MD}")
    return 0


def _report_only(args: argparse.Namespace) -> int:
    if args.out is not None:
        out_dir = args.out
    elif len(args.models) >= 2:
        out_dir = default_out_dir([contender.name for contender in resolve_contenders(args.models)])
    else:
        raise LmforgeError("--report-only needs the output folder: give --out DIR or the models that name it")
    if not (out_dir / VOTES).exists():
        raise LmforgeError(f"no votes to report on: {out_dir / VOTES} does not exist")
    votes = read_votes(out_dir / VOTES)
    seed, prompt_count = args.seed, None
    try:
        manifest = read_json(out_dir / MANIFEST, what="judge manifest")
        models, prompt_count, seed = manifest["stats"]["models"], manifest["stats"]["prompts"], manifest["config"]["seed"]
    except (LmforgeError, KeyError, TypeError):
        # No record of the models: take them from the votes, in the order they first appear.
        models = [{"name": name} for name in dict.fromkeys(name for vote in votes for name in (vote["left"], vote["right"]))]
    report = build_report(votes, models, prompt_count, args.bootstrap_samples, seed)
    write_report(out_dir, report)
    print(f"{format_summary(report)}\nreport: {out_dir / REPORT_MD}")
    return 0
