"""Multiple-choice scoring: lmforge's scorer against lm-eval's Hugging Face backend, on the same model.

    python bench/bench_eval.py RUN [--items 200] [--batch-size 16] [--repeats 3]

RUN is a trained run (e.g. runs/default after `lmforge run`). Its checkpoint is exported to a
transformers folder, and the run's built-in task (`eval/stdlib-cloze.jsonl`, made by `lmforge eval`)
is scored twice in this process: by lmforge (`score_continuations` on our Decoder) and by lm-eval's
`HFLM.loglikelihood` on the exported `LlamaForCausalLM` with our tokenizer through `transformers`.
Both get the same (context, continuation) requests with a BOS first. The table gives requests/s
(best of --repeats, after one untimed warm-up each), the ratio, and how far apart the two
implementations' log-likelihoods and accuracies are: an independent check of the scorer.

Needs `pip install 'lmforge[eval]' accelerate` (lm-eval's HF backend imports accelerate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a trained run folder with eval/stdlib-cloze.jsonl")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lm_eval.models.huggingface import HFLM

    from lmforge.evaluation.benchmarks import read_items
    from lmforge.evaluation.loglikelihood import score_continuations
    from lmforge.evaluation.report import load_for_inference
    from lmforge.interop.hf import export_hf

    items = read_items(args.run / "eval" / "stdlib-cloze.jsonl", "mc")[: args.items]
    requests = [(item.context, continuation) for item in items for continuation in item.continuations]
    model, tokenizer, _ = load_for_inference(args.run, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        export_hf(args.run, Path(folder) / "hf")
        peer = HFLM(pretrained=str(Path(folder) / "hf"), device="cpu", dtype="float32", batch_size=args.batch_size, add_bos_token=True)
        wrapped = [SimpleNamespace(args=request) for request in requests]

        def ours():
            return [score.logprob for score in score_continuations(model, tokenizer, requests, args.batch_size)]

        def theirs():
            return [logprob for logprob, _ in peer.loglikelihood(wrapped, disable_tqdm=True)]

        timings, outputs = {}, {}
        for name, run in (("lmforge", ours), ("lm-eval HFLM (transformers)", theirs)):
            outputs[name] = run()  # warm-up, and the values compared below
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - started)
            timings[name] = best

    ours_lp, theirs_lp = (np.asarray(outputs[name]) for name in timings)
    per_item = [len(item.choices) for item in items]

    def accuracy(logprobs: np.ndarray) -> float:
        picks, start = [], 0
        for item, count in zip(items, per_item):
            picks.append(int(np.argmax(logprobs[start : start + count])) == item.gold)
            start += count
        return float(np.mean(picks))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"task: {args.run / 'eval' / 'stdlib-cloze.jsonl'}, {len(items)} items, {len(requests)} requests, batch {args.batch_size}\n")
    print("| scorer | seconds (best of %d) | requests/s | acc |" % args.repeats)
    print("| --- | --- | --- | --- |")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.2f} | {len(requests) / seconds:,.0f} | {accuracy(np.asarray(outputs[name])):.3f} |")
    ratio = timings["lm-eval HFLM (transformers)"] / timings["lmforge"]
    print(f"\nlmforge / lm-eval speed: {ratio:.2f}x")
    print(f"log-likelihood difference: max {np.abs(ours_lp - theirs_lp).max():.2e}, mean {np.abs(ours_lp - theirs_lp).mean():.2e} nats")
    print(json.dumps({"ratio": ratio, "max_abs_diff": float(np.abs(ours_lp - theirs_lp).max())}))


if __name__ == "__main__":
    main()
