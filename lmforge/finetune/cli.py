"""``lmforge finetune sft``: declared on the CLI's subparsers here, so ``lmforge/cli.py`` only calls in."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.errors import LmforgeError

DESCRIPTION = """Fine-tune a run's pretrained model into an assistant on conversations (supervised fine-tuning).

The conversations are the recipe's finetune.dataset: `stdlib`, the built-in set (a question about
each standard-library function and class, answered by its docstring's first sentence), or a JSONL
file of {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} lines. They are
rendered with the chat template, the loss is taken on the assistant answers only, and short
conversations are packed into rows. A held-out share scores the model before and after: loss on
the assistant answers, and ROUGE-L / exact match of greedy answers to held-out questions.

Writes RUN/sft/: checkpoints/ (what `lmforge serve` and `lmforge chat` load), report.md and
report.json, answers.jsonl, data/ (the conversations used), logs/, and adapter/ with LoRA."""

EXAMPLES = """examples:
  lmforge finetune sft                                   # the default run, built-in questions
  lmforge finetune sft tiny --workdir /tmp/runs --finetune.max_steps 50
  lmforge finetune sft --data chats.jsonl                # your own conversations
  lmforge finetune sft --finetune.lora_rank 8 --finetune.merge_adapter false
  lmforge finetune sft --finetune.freeze_layers 2 --finetune.max_minutes 2

Any recipe field can be overridden with --SECTION.KEY VALUE; `lmforge recipe --reference` lists
the finetune.* fields (budget, learning rate, LoRA rank/alpha/targets, freezing, packing)."""


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Declare ``lmforge finetune sft`` on the CLI's subparsers; ``run_finetune`` runs it."""
    finetune = subparsers.add_parser("finetune", help="fine-tune a pretrained run: `finetune sft` makes a chat assistant",
                                     description="Fine-tune a run's pretrained model. Methods: sft (chat supervised fine-tuning).")
    methods = finetune.add_subparsers(dest="method", metavar="METHOD", required=True)
    sft = methods.add_parser("sft", help="supervised fine-tuning on conversations (full, frozen layers or LoRA)",
                             description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sft.add_argument("recipe", nargs="?", default=None, help="recipe YAML file or packaged recipe name (default: `default`)")
    sft.add_argument("--workdir", default="runs", type=Path, help="where runs go: the run is WORKDIR/<name>/ (default: ./runs)")
    sft.add_argument("--data", type=Path, default=None, metavar="FILE.jsonl",
                     help="train on this JSONL file of conversations instead of the recipe's finetune.dataset")
    sft.add_argument("--fresh", action="store_true", help="discard earlier SFT checkpoints and fine-tune from the pretrained model")
    sft.add_argument("--quiet", action="store_true", help="no progress bars")
    return finetune


def run_finetune(args: argparse.Namespace, overrides: dict) -> int:
    """Run ``lmforge finetune sft`` from parsed arguments and recipe overrides; prints the summary line."""
    from lmforge import pipeline
    from lmforge.config import load_recipe

    if args.data is not None:
        if not args.data.is_file():
            raise LmforgeError(f"--data: conversations file not found: {args.data}" if not args.data.exists()
                               else f"--data: {args.data} is a folder; expected a JSONL file")
        overrides = {**overrides, "finetune.dataset": str(args.data.resolve())}
    recipe = load_recipe(args.recipe, overrides)
    layout = pipeline.layout_for(recipe, args.workdir)
    print(pipeline.RUNNERS["sft"](recipe, layout, progress=not args.quiet, force=args.fresh, explicit=True))
    return 0
