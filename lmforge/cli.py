"""The `lmforge` command. Thin: parse arguments, call a stage, print where its artifact is."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path

from lmforge.config import load_recipe, parse_value, recipe_reference, recipe_to_yaml
from lmforge.errors import LmforgeError

EPILOG = """Any recipe field can be overridden with --SECTION.KEY VALUE, e.g. --train.max_steps 200 --model.n_layers 6.
Run `lmforge recipe --reference` to list every field."""


DATA_EPILOG = """Run on a cluster: every task processes its share of the work shards into RUN/data/work/ (a shared file
system), then one merge job deduplicates across all of them and writes the folder. With Slurm:
  sbatch --array=0-15 --wrap 'lmforge data my.yaml --workdir /shared/runs --task $SLURM_ARRAY_TASK_ID --tasks 16'
  sbatch --dependency=afterok:<array job id> --wrap 'lmforge data my.yaml --workdir /shared/runs --merge'
A killed run resumes at its first unfinished shard. `lmforge data inspect RUN` shows what each step removed
(`lmforge data inspect --help`).
""" + EPILOG

INSPECT_PROG = "lmforge data inspect"


def split_overrides(argv: list[str]) -> tuple[list[str], dict, str | None]:
    """Take ``--section.key value`` / ``--section.key=value`` out of argv, before argparse can mistake a
    value for a positional argument. Returns (remaining argv, overrides, error message or None)."""
    remaining, overrides, index = [], {}, 0
    while index < len(argv):
        arg = argv[index]
        name = arg.split("=", 1)[0]
        if not (arg.startswith("--") and "." in name and len(name) > 3):
            remaining.append(arg)
            index += 1
            continue
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if index + 1 >= len(argv):
                return remaining, overrides, f"{arg} needs a value"
            value, index = argv[index + 1], index + 1
        overrides[key] = parse_value(value)
        index += 1
    return remaining, overrides, None


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", default=None, help="recipe YAML file or packaged recipe name (default: `default`)")
    parser.add_argument("--workdir", default="runs", type=Path, help="where runs go: artifacts under WORKDIR/<name>/ (default: ./runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Build your own language model: data -> tokenizer -> tokens -> pretrain -> eval -> sft, then chat, serve, generate and export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run every stage of a recipe, skipping finished ones", epilog=EPILOG,
                         description="Run data, tokenizer, tokens, pretrain, eval and (with finetune.enabled) sft; finished stages are skipped and "
                                     "an interrupted pretrain resumes.")
    _add_recipe_arguments(run)
    run.add_argument("--fresh", action="store_true", help="rebuild every stage and train from scratch")

    stage_help = {
        "data": "read, clean, filter (language, quality, word list, evaluation overlap), scrub PII, deduplicate, split and mix documents",
        "tokenizer": "train the byte-level BPE tokenizer on the train split",
        "tokens": "encode the splits into train.bin / val.bin",
        "pretrain": "train the model (resumes from the latest checkpoint)",
    }
    for name, text in stage_help.items():
        stage = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", epilog=EPILOG)
        _add_recipe_arguments(stage)
        stage.add_argument("--force" if name != "pretrain" else "--fresh", dest="force", action="store_true",
                           help="rebuild even if up to date" if name != "pretrain" else "discard checkpoints and train from scratch")
        if name == "data":
            stage.epilog = DATA_EPILOG
            stage.formatter_class = argparse.RawDescriptionHelpFormatter
            stage.add_argument("--task", type=int, default=None, metavar="I",
                               help="process only work shards I, I+N, I+2N, ... (0-based; with --tasks N), e.g. as one task of a Slurm array")
            stage.add_argument("--tasks", type=int, default=None, metavar="N", help="how many tasks share the shards (with --task)")
            stage.add_argument("--merge", action="store_true",
                               help="after all --task jobs finished: global dedup, split, mix, and write the data folder")
            stage.add_argument("--keep-work", action="store_true", help="keep the work shards (DATA/work/) after the merge")

    evaluate = sub.add_parser(
        "eval", help="score a run: held-out perplexity and bits per byte with intervals, tasks, benchmarks, samples; report",
        description="Evaluate a run's latest checkpoint (or --checkpoint, or --all-checkpoints) and write RUN/eval/report.{json,md}:\n"
                    "held-out loss, perplexity, bits per byte and per character (sliding windows, bootstrap intervals), the built-in\n"
                    "multiple-choice task, the recipe's eval.tasks, samples, curves and a table over evaluated checkpoints.\n"
                    "With --text or --task, only those are scored and added to the existing report.",
        epilog="Task formats: arc, hellaswag, mmlu, truthfulqa_mc1, truthfulqa_mc2 (the published JSONL/Parquet layouts),\n"
               'mc ({"context","choices","label"}), generation ({"prompt","reference" or "references"}: BLEU, chrF, ROUGE, EM, F1),\n'
               'classification ({"text","label"}: each label scored as a continuation; accuracy, P/R/F1, confusion matrix).\n'
               "Example: lmforge eval runs/default --task arc=ARC-Easy-Test.jsonl --fewshot 5 --limit 200",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("run", type=Path, help="run folder (e.g. runs/default) or checkpoint folder")
    evaluate.add_argument("--text", type=Path, action="append", default=[], metavar="FILE",
                          help="also score this UTF-8 file (.jsonl: one document per line's \"text\"; else one text, "
                               "bootstrapped by paragraph) and add it to the report under its name (repeatable)")
    evaluate.add_argument("--task", action="append", default=[], metavar="FORMAT=FILE",
                          help="score this local task file and add it to the report (repeatable); see the formats below")
    evaluate.add_argument("--fewshot", type=int, default=0, metavar="K", help="solved examples before each --task question (default 0)")
    evaluate.add_argument("--fewshot-file", type=Path, default=None, metavar="FILE", help="take --task few-shot examples from this file")
    evaluate.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N items of each --task")
    evaluate.add_argument("--stride", type=int, default=None, metavar="TOKENS",
                          help="sliding-window stride (default: the recipe's eval.stride, else half the context)")
    which = evaluate.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, default=None, metavar="DIR", help="evaluate this checkpoint (a folder, or a name in RUN/checkpoints/ such as step_00000500) instead of the latest")
    which.add_argument("--all-checkpoints", action="store_true",
                       help="evaluate every kept checkpoint, oldest first, filling the report's table over checkpoints")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    from lmforge.evaluation.judge import add_judge_parser

    add_judge_parser(sub)
    from lmforge.finetune.cli import add_finetune_parser

    add_finetune_parser(sub)
    from lmforge.inference.chat import add_chat_parser

    add_chat_parser(sub)
    from lmforge.serving.cli import add_serve_parser

    add_serve_parser(sub)

    generate = sub.add_parser("generate", help="sample text from a trained model, streamed to the terminal",
                              description="Continue a prompt with a trained model.")
    generate.add_argument("run", type=Path, help="run folder or checkpoint folder")
    generate.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    generate.add_argument("--max-new-tokens", type=int, default=100)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy and deterministic")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--repetition-penalty", type=float, default=1.0)
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    generate.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    generate.add_argument("--device", default="auto")

    export = sub.add_parser("export", help="export a trained model to another format",
                            description="Export a checkpoint. `hf`: a folder transformers loads with no custom code.")
    export.add_argument("format", choices=["hf"], help="hf: Hugging Face transformers (LlamaForCausalLM)")
    export.add_argument("run", type=Path, help="run folder or checkpoint folder")
    export.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/export/hf)")

    logs = sub.add_parser("logs", help="summarise a run's training metrics and draw its curves",
                          description="Summarise RUN/logs/metrics.jsonl (also while training) and write "
                                      "RUN/logs/loss_curve.png and RUN/logs/training.png.")
    logs.add_argument("run", type=Path, help="run folder (e.g. runs/default)")
    logs.add_argument("--json", action="store_true", help="print the summary as JSON")

    tune = sub.add_parser("tune", help="search recipe hyperparameters with Optuna (TPE, random or grid), pruning bad trials",
                          description="Train short trials of a recipe with searched values, then write a results table and\n"
                                      "the best recipe to WORKDIR/<name>-tune/. The same command again continues the search.",
                          epilog="DIST is uniform:LOW:HIGH, loguniform:LOW:HIGH, int:LOW:HIGH[:STEP] or choice:A,B,...\n"
                                 "Recipe overrides (--train.max_steps 200) are fixed for every trial.",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_arguments(tune)
    tune.add_argument("--param", action="append", default=[], metavar="KEY=DIST",
                      help="search this recipe key, e.g. train.learning_rate=loguniform:1e-4:1e-2 (repeatable)")
    tune.add_argument("--space", type=Path, default=None, metavar="FILE", help="YAML mapping of KEY: DIST (--param wins)")
    tune.add_argument("--trials", type=int, default=None, help="finished trials wanted, counting earlier runs (default: the grid's size, else 20)")
    tune.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe", help="tpe (Bayesian, default), random or grid")
    tune.add_argument("--seed", type=int, default=0, help="sampler seed")
    tune.add_argument("--no-prune", action="store_true", help="train every trial to the end (default: median pruning on validation loss)")
    tune.add_argument("--study-name", default=None, help="the study and its folder under WORKDIR (default: <recipe name>-tune)")

    plan = sub.add_parser("plan", help="size a model and its training tokens for a budget (Chinchilla) and estimate wall time",
                          description="Propose parameters and training tokens at 20 tokens per parameter for one budget, show other "
                                      "sizes at the same compute with their predicted loss, and estimate wall time.",
                          epilog="Numbers take 1e17, 2.5T, 1.5B, 10M or 300k.")
    plan.add_argument("--flops", metavar="C", help="compute budget in FLOPs, e.g. 1e17")
    plan.add_argument("--hours", metavar="H", help="training hours on --device")
    plan.add_argument("--tokens", metavar="D", help="corpus size in tokens")
    plan.add_argument("--params", metavar="N", help="model size in parameters, e.g. 10M")
    plan.add_argument("--run", type=Path, metavar="RUNDIR", help="a run with token shards: its train tokens are the corpus "
                      "(the budget, unless another is given), its vocabulary and recipe the base")
    plan.add_argument("--device", default="cpu", help="cpu (this machine; measured, the default) or h100, a100, l4, rtx4090 "
                      "(datasheet peak x --mfu)")
    plan.add_argument("--mfu", metavar="FRACTION", help="assumed fraction of a GPU's peak reached (default 0.4)")
    plan.add_argument("--vocab-size", metavar="V", help="vocabulary size (default: the run's, else the default recipe's)")
    plan.add_argument("--context-length", metavar="T", help="context length (default: the base recipe's)")
    plan.add_argument("--write", type=Path, metavar="FILE.yaml", help="write the planned recipe here")
    plan.add_argument("--name", help="name of the written recipe (default: base name and size)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    recipe = sub.add_parser("recipe", help="print a resolved recipe, or the reference of every field")
    recipe.add_argument("recipe", nargs="?", default=None, help="recipe file or packaged name (default: `default`)")
    recipe.add_argument("--reference", action="store_true", help="print every recipe field with its default and meaning")
    return parser


def _data_task(args, recipe, layout, progress: bool) -> str:
    from lmforge.data.stage import build_corpus

    if args.merge and (args.task is not None or args.tasks is not None):
        raise LmforgeError("--merge runs alone, after every --task job has finished")
    if args.merge:
        report = build_corpus(recipe.data, layout.data, progress=progress, merge_only=True, keep_work=args.keep_work)
        if report.get("up_to_date"):
            return f"data: up to date in {layout.data}"
        return f"data: merged; {report['kept']:,} documents kept ({report['train_documents']} train / {report['val_documents']} val) -> {layout.data}"
    if args.task is None or args.tasks is None:
        raise LmforgeError("--task I and --tasks N go together (0 <= I < N)")
    if args.tasks < 1:
        raise LmforgeError(f"--tasks must be at least 1 (got {args.tasks})")
    if not 0 <= args.task < args.tasks:
        raise LmforgeError(f"--task must be in 0..{args.tasks - 1} for --tasks {args.tasks} (got {args.task})")
    summary = build_corpus(recipe.data, layout.data, progress=progress, task=(args.task, args.tasks))
    if summary.get("up_to_date"):
        return f"data: up to date in {layout.data}; task {args.task} has nothing to do"
    return (f"data: task {args.task} of {args.tasks} finished its {summary['shards']} of {summary['shards_total']} work shards "
            f"({summary['processed_now']} processed now) in {summary['work']}; run `lmforge data --merge` when every task is done")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["data", "inspect"]:  # a command of its own under `data`, whose other argument is a recipe
        from lmforge.data.inspect import inspect_main

        return _reported(lambda: inspect_main(argv[2:], INSPECT_PROG))
    parser = build_parser()
    argv, overrides, problem = split_overrides(argv)
    if problem:
        parser.error(problem)
    args = parser.parse_args(argv)
    if int(os.environ.get("RANK", "0")) > 0:
        sys.stdout = open(os.devnull, "w")  # under torchrun, rank 0 reports; errors still reach stderr
    return _reported(lambda: _dispatch(args, overrides, parser))


def _reported(command) -> int:
    """Run a command; a user's mistake is one line on stderr and exit status 2, never a traceback."""
    try:
        return command()
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lmforge generate ... | head` or `lmforge data inspect RUN | head`
        return 0


def _dispatch(args, overrides: dict, parser: argparse.ArgumentParser) -> int:
    from lmforge import pipeline

    stage_commands = ("data", "tokenizer", "tokens", "pretrain")  # the stages whose command takes a recipe
    if overrides and args.command not in ("run", "recipe", "tune", "finetune", *stage_commands):
        parser.error(f"`lmforge {args.command}` takes no recipe overrides (got --{next(iter(overrides))})")

    if args.command == "recipe":
        print(recipe_reference() if args.reference else recipe_to_yaml(load_recipe(args.recipe, overrides)), end="\n")
        return 0
    if args.command in ("run", *stage_commands):
        recipe = load_recipe(args.recipe, overrides)
        layout = pipeline.layout_for(recipe, args.workdir)
        progress = not args.quiet
        if args.command == "run":
            pipeline.run_all(recipe, layout, progress=progress, fresh=args.fresh)
            _print_artifacts(layout)
        elif args.command == "data" and (args.task is not None or args.tasks is not None or args.merge):
            print(_data_task(args, recipe, layout, progress))
        else:
            print(pipeline.RUNNERS[args.command](recipe, layout, progress=progress, force=args.force))
        return 0
    if args.command == "eval":
        return _eval(args)
    if args.command == "finetune":
        from lmforge.finetune.cli import run_finetune

        return run_finetune(args, overrides)
    if args.command == "generate":
        return _generate(args)
    if args.command == "judge":
        from lmforge.evaluation.judge import run_judge

        return run_judge(args)
    if args.command == "chat":
        from lmforge.inference.chat import run_chat

        return run_chat(args)
    if args.command == "serve":
        from lmforge.serving.cli import run_serve

        return run_serve(args)
    if args.command == "tune":
        from lmforge.tuning.tune import parse_space, tune

        space = parse_space(args.param, args.space, fixed=overrides)
        tune(load_recipe(args.recipe, overrides), space, args.workdir, trials=args.trials, sampler=args.sampler, seed=args.seed,
             prune=not args.no_prune, study_name=args.study_name, progress=not args.quiet)
        return 0
    if args.command == "export":
        from lmforge.interop.hf import export_hf

        out = args.out or Path(args.run) / "export" / "hf"
        print(f"exported to {export_hf(args.run, out)}")
        return 0
    if args.command == "logs":
        from lmforge.training.logs import format_summary, summarize_run

        print(format_summary(summarize_run(args.run), as_json=args.json))
        return 0
    if args.command == "plan":
        from lmforge.planning.plan import plan_command

        return plan_command(args)
    raise AssertionError(args.command)


def _print_artifacts(layout) -> None:
    print(f"\nDone. Artifacts of `{layout.root.name}`:")
    for label, path in [("recipe", layout.recipe), ("documents", layout.data), ("tokenizer", layout.tokenizer),
                        ("token shards", layout.tokens), ("checkpoints", layout.checkpoints), ("metrics and loss curve", layout.logs),
                        ("evaluation report", layout.eval / "report.md")]:
        print(f"  {label:<24} {path}")
    assistant_report = layout.root / "sft" / "report.md"
    if assistant_report.exists():
        print(f"  {'chat assistant (SFT)':<24} {assistant_report}")
        print(f"\nTry: lmforge chat {layout.root}    (or: lmforge serve {layout.root} --no-auth, then open http://127.0.0.1:8000/)")
    else:
        print(f"\nTry: lmforge generate {layout.root} --prompt \"The json module\" --max-new-tokens 80")


def _eval(args) -> int:
    from lmforge.config import EvalConfig
    from lmforge.evaluation.report import evaluate_run, run_folder_of
    from lmforge.training.checkpoint import list_checkpoints

    # A run folder carries its resolved recipe; a bare checkpoint folder gets the default eval settings.
    recipe_path = run_folder_of(args.run) / "recipe.yaml"
    config = load_recipe(recipe_path).eval if recipe_path.exists() else EvalConfig()
    if args.stride is not None:
        config = config.model_copy(update={"stride": _checked(args.stride, "--stride", 1)})
    tasks = [_task_from_argument(spec, args) for spec in args.task]
    checkpoints = [args.checkpoint]
    if args.checkpoint is not None and not args.checkpoint.exists():
        by_name = run_folder_of(args.run) / "checkpoints" / args.checkpoint.name
        if not by_name.exists():
            raise LmforgeError(f"no checkpoint {args.checkpoint} (nor {by_name})")
        checkpoints = [by_name]  # a name such as step_00000500
    if args.all_checkpoints and (args.text or args.task):
        raise LmforgeError("--all-checkpoints fills the table over checkpoints with full evaluations; "
                           "score --text/--task files on one checkpoint at a time (--checkpoint)")
    if args.all_checkpoints:
        checkpoints = list_checkpoints(run_folder_of(args.run) / "checkpoints")
        if not checkpoints:
            raise LmforgeError(f"{args.run} has no checkpoints/ to evaluate")
    for index, checkpoint in enumerate(checkpoints):
        last = index == len(checkpoints) - 1
        if len(checkpoints) > 1:
            print(f"checkpoint {checkpoint.name} ({index + 1} of {len(checkpoints)})", file=sys.stderr)
        # Earlier checkpoints of --all-checkpoints fill the history; samples are drawn for the last one only.
        report = evaluate_run(args.run, config, texts=args.text, tasks=tasks, progress=not args.quiet, device=args.device,
                              checkpoint=checkpoint, samples=last)
    from lmforge.evaluation.report import summary_lines

    print("\n".join(summary_lines(report)))
    print(f"report: {run_folder_of(args.run) / 'eval' / 'report.md'}")
    return 0


def _checked(value: int, flag: str, minimum: int) -> int:
    if value < minimum:
        raise LmforgeError(f"{flag} must be at least {minimum} (got {value})")
    return value


def _task_from_argument(spec: str, args):
    from pydantic import ValidationError

    from lmforge.config import TASK_FORMATS, EvalTask

    task_format, separator, path = spec.partition("=")
    if not separator or not path:
        raise LmforgeError(f"--task takes FORMAT=FILE, e.g. arc=ARC-Easy-Test.jsonl (got {spec!r})")
    if task_format not in TASK_FORMATS:
        close = difflib.get_close_matches(task_format, TASK_FORMATS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise LmforgeError(f"unknown task format {task_format!r}{hint} (formats: {', '.join(TASK_FORMATS)})")
    try:
        return EvalTask(format=task_format, path=Path(path), num_fewshot=_checked(args.fewshot, "--fewshot", 0),
                        fewshot_path=args.fewshot_file, limit=_checked(args.limit, "--limit", 1) if args.limit is not None else None)
    except ValidationError as exc:
        raise LmforgeError(f"--task {spec}: {exc.errors()[0]['msg']}") from None


def _generate(args) -> int:
    from lmforge.evaluation.report import load_for_inference
    from lmforge.inference.generate import SamplingParams, generate

    model, tokenizer, _ = load_for_inference(args.run, args.device)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)
    sys.stdout.write(args.prompt)
    for piece in generate(model, tokenizer, args.prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
