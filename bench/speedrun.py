"""The CPU speedrun: validation bits per byte after a fixed wall-clock training budget, per recipe variant.

    python bench/speedrun.py [--minutes 2.5] [--variants baseline,qk_norm,...] [--recipe default] [--workdir runs/speedrun]

Every variant trains the same recipe (by default the packaged `default`: the stdlib documentation
corpus) for the same training time on this machine, then is scored on the whole validation split in
bits per byte, which compares fairly across tokenizers. A variant is a set of recipe overrides; the
table reports each against the baseline measured in the same run. Run it on an otherwise idle
machine: a budget in minutes turns any competing load into fewer steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

from lmforge import pipeline
from lmforge.config import load_recipe
from lmforge.evaluation.intrinsic import total_nats
from lmforge.tokenizer.shards import load_tokens, read_token_meta
from lmforge.training.checkpoint import load_model, resolve_checkpoint
from lmforge.training.pretrain import pretrain

# Each variant changes one thing against the default recipe. Batch x context stays at 1,024 tokens
# per step where the variant is not about batch size, so only the named choice differs.
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "qk_norm": {"model.qk_norm": True},
    "untied_head": {"model.tie_embeddings": False},
    "relu2_mlp": {"model.mlp": "relu2"},
    "muon": {"train.optimizer": "muon"},
    "wsd_schedule": {"train.schedule": "wsd"},
    "warmup_100": {"train.warmup_steps": 100},
    "context_128_batch_8": {"model.context_length": 128, "train.batch_size": 8},
    "batch_8": {"train.batch_size": 8},
    "vocab_2048": {"tokenizer.vocab_size": 2048},
    "vocab_8192": {"tokenizer.vocab_size": 8192},
    "compile": {"train.compile": True},
}
TOKENIZER_KEYS = ("tokenizer.", "data.")


def bits_per_byte(run: Path, batch_size: int = 16) -> float:
    model = load_model(resolve_checkpoint(run)).eval()
    tokens = load_tokens(run / "tokens", "val")
    meta = read_token_meta(run / "tokens")
    nats, _ = total_nats(model, tokens, batch_size, meta["bos_id"])
    return nats / math.log(2) / meta["splits"]["val"]["bytes"]


def prepare(recipe, workdir: Path, name: str) -> Path:
    """The data, tokenizer and tokens stages for ``recipe``, built once per distinct tokenizer setting."""
    layout = pipeline.layout_for(recipe.model_copy(update={"name": name}), workdir)
    built = [p for p in workdir.glob("stages-*/data") if (p / "manifest.json").exists()]
    if built and not layout.data.exists():
        shutil.copytree(built[0], layout.data)  # the data stage skips itself when its settings match
    for stage in ("data", "tokenizer", "tokens"):
        print(pipeline.RUNNERS[stage](recipe, layout, progress=False), file=sys.stderr)
    return layout.root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.5, help="training minutes per variant (default 2.5)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="define an extra variant, e.g. combo:model.qk_norm=true,train.optimizer=muon")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--workdir", type=Path, default=Path("runs/speedrun"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from lmforge.config import parse_value

    variants = dict(VARIANTS)
    for definition in args.set:
        name, _, assignments = definition.partition(":")
        variants[name] = {k: parse_value(v) for k, _, v in (a.partition("=") for a in assignments.split(","))}
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] + [d.partition(":")[0] for d in args.set]
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")

    results = []
    for name in chosen:
        overrides = {**variants[name], "train.max_minutes": args.minutes, "train.max_steps": None, "train.checkpoint_minutes": None}
        recipe = load_recipe(args.recipe, overrides)
        stage_key = json.dumps({k: v for k, v in variants[name].items() if k.startswith(TOKENIZER_KEYS)}, sort_keys=True)
        base = prepare(load_recipe(args.recipe, {k: v for k, v in variants[name].items() if k.startswith(TOKENIZER_KEYS)}),
                       args.workdir, "stages-" + hashlib.sha256(stage_key.encode()).hexdigest()[:8])
        run = args.workdir / name
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        for stage in ("data", "tokenizer", "tokens"):
            shutil.copytree(base / stage, run / stage)
        layout = pipeline.layout_for(recipe.model_copy(update={"name": name}), args.workdir)
        started = time.perf_counter()
        result = pretrain(recipe, layout, progress=False)
        bpb = bits_per_byte(run)
        row = {"variant": name, "overrides": variants[name], "steps": result.step, "tokens": result.tokens_seen,
               "val_bits_per_byte": bpb, "wall_seconds": time.perf_counter() - started}
        results.append(row)
        print(f"{name}: {result.step} steps, {result.tokens_seen:,} tokens, {bpb:.4f} bits/byte", file=sys.stderr, flush=True)

    baseline = next((r["val_bits_per_byte"] for r in results if r["variant"] == "baseline"), None)
    print(f"\n{args.minutes:g} training minutes per variant, recipe `{args.recipe}`, scored on the whole validation split\n")
    print("| variant | overrides | steps | tokens | val bits/byte | vs baseline |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in results:
        delta = f"{row['val_bits_per_byte'] - baseline:+.4f}" if baseline is not None else ""
        overrides = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "(recipe as shipped)"
        print(f"| {row['variant']} | {overrides} | {row['steps']:,} | {row['tokens']:,} | {row['val_bits_per_byte']:.4f} | {delta} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
