"""Generation speed: lmforge's inference engine against transformers' ``generate``, on the same model.

    python bench/bench_inference.py RUN [--new-tokens 100] [--prompt-tokens 16] [--repeats 5] [--threads 2]
                                        [--clock wall|process] [--random-weights] [--compile]

RUN is a trained run (e.g. runs/default after `lmforge run`; the default recipe's shape: 4 layers,
d_model 192, context 128, vocabulary 4096). Its checkpoint is exported with ``lmforge export``'s code
and loaded as a ``LlamaForCausalLM``; ``--random-weights`` re-initialises ours first (speed does not
depend on the weights). Both sides get the same prompts (``--prompt-tokens`` tokens each, BOS first)
and generate exactly ``--new-tokens`` tokens: transformers with ``min_new_tokens = max_new_tokens``,
ours with ``SamplingParams(ignore_eos=True)`` (EOS counts as an ordinary token).

Measured: 1 stream (one request; transformers batch 1) and 8 concurrent streams (8 requests submitted
together to a started engine with 8 slots; transformers one batch of 8), greedy and sampled
(temperature 0.8, top-k 50). Tokens/s is generated tokens over wall time from submit to the last
token, the median of ``--repeats`` runs after one untimed warm-up. Our side goes through the whole
serving path: submit, the engine's background thread, results back to the caller (``handle.wait()``,
which like ``generate`` returns when the request is done); it is measured with
the fused decode step (the default) and with ``fast_decode=False`` (``Decoder.forward`` with per-row
positions), to show what the fused step adds. Timings on a shared machine are noisy: the load
average is printed with the table. ``--clock process --threads 1`` measures CPU seconds instead
(all threads of this process; nothing spins with one thread), which other jobs on the machine barely
change. ``--compile`` adds a column: the engine with ``compile=True`` (the one-stream step compiled by
inductor; at 8 streams it runs the same eager step as the first column), and its ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a trained run folder (or checkpoint folder)")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--random-weights", action="store_true", help="re-initialise the weights (seed 0) before exporting")
    parser.add_argument("--compile", action="store_true", help="also measure Engine(compile=True)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="process: CPU seconds of this process instead of wall time (with --threads 1, robust to other load)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    import transformers

    from lmforge.evaluation.report import load_for_inference
    from lmforge.inference.engine import Engine
    from lmforge.inference.generate import SamplingParams
    from lmforge.interop.hf import export_hf
    from lmforge.training.checkpoint import save_checkpoint

    model, tokenizer, checkpoint = load_for_inference(args.run, device="cpu")
    texts = ["The json module", "Return the", "class ", "def ", "Changed in version", "This function", "import ", "The default"]
    prompts = []
    for i in range(args.streams):
        ids = [tokenizer.bos_id, *tokenizer.encode(" ".join([texts[i % len(texts)]] * args.prompt_tokens))]
        prompts.append(ids[: args.prompt_tokens])

    with tempfile.TemporaryDirectory() as folder:
        if args.random_weights:
            torch.manual_seed(0)
            model.reset_parameters()
            checkpoint = save_checkpoint(Path(folder) / "checkpoints", 0, model, None, {"step": 0}, checkpoint / "tokenizer", keep=1)
        export_hf(checkpoint, Path(folder) / "hf")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(folder) / "hf", dtype=torch.float32).eval()

    modes = {"greedy": dict(temperature=0.0), "sampled (T 0.8, top-k 50)": dict(temperature=0.8, top_k=50)}
    engines = {fast: Engine(model, tokenizer, max_batch_size=args.streams, max_queue=4 * args.streams, fast_decode=fast).start()
               for fast in (True, False)}
    if args.compile:
        engines["compiled"] = Engine(model, tokenizer, max_batch_size=args.streams, max_queue=4 * args.streams, compile=True).start()

    def ours(batch: list[list[int]], sampling: dict, fast: bool | str = True) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, **sampling)
        handles = [engines[fast].submit(ids, params) for ids in batch]
        return [handle.wait().token_ids for handle in handles]

    def hf(batch: list[list[int]], sampling: dict) -> list[list[int]]:
        ids = torch.tensor(batch)
        options = dict(do_sample=True, temperature=sampling["temperature"], top_k=sampling["top_k"], top_p=1.0) \
            if sampling["temperature"] else dict(do_sample=False)
        with torch.inference_mode():
            out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_id, **options)
        return out[:, ids.shape[1] :].tolist()

    clock = time.perf_counter if args.clock == "wall" else time.process_time

    def tokens_per_second(run, batch, sampling) -> float:
        run(batch, sampling)  # warm-up
        rates = []
        for _ in range(args.repeats):
            started = clock()
            produced = sum(len(ids) for ids in run(batch, sampling))
            rates.append(produced / (clock() - started))
            assert produced == len(batch) * args.new_tokens, produced
        return statistics.median(rates)

    # The same model on both sides: greedy tokens agree up to the first EOS (transformers suppresses EOS
    # to honour min_new_tokens, ours generates it as an ordinary token).
    mine, reference = ours(prompts[:1], modes["greedy"])[0], hf(prompts[:1], modes["greedy"])[0]
    agree = mine[: mine.index(tokenizer.eos_id)] == reference[: len(mine[: mine.index(tokenizer.eos_id)])] \
        if tokenizer.eos_id in mine else mine == reference

    load_before = os.getloadavg()[0]
    rows = []
    for mode, sampling in modes.items():
        for streams in (1, args.streams):
            batch = prompts[:streams]
            rates = (tokens_per_second(ours, batch, sampling),
                     tokens_per_second(lambda b, s: ours(b, s, fast=False), batch, sampling),
                     tokens_per_second(hf, batch, sampling))
            compiled = tokens_per_second(lambda b, s: ours(b, s, fast="compiled"), batch, sampling) if args.compile else None
            rows.append((mode, streams, *rates, compiled))
    for engine in engines.values():
        engine.stop()

    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, {cpu}; "
          f"model {model.config.n_layers} layers x d_model {model.config.d_model}, vocab {model.config.vocab_size}, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, median of {args.repeats}, {args.clock} clock; "
          f"greedy tokens equal transformers': {'yes' if agree else 'NO'}; "
          f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    extra = " engine, compile=True | ratio, compiled |" if args.compile else ""
    print("| decoding | streams | lmforge engine (tokens/s) | engine, Decoder.forward path | transformers generate | ratio |" + extra)
    print("| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if args.compile else ""))
    for mode, streams, fast_rate, model_rate, hf_rate, compiled in rows:
        extra = f" {compiled:,.0f} | {compiled / hf_rate:.1f}x |" if compiled is not None else ""
        print(f"| {mode} | {streams} | {fast_rate:,.0f} | {model_rate:,.0f} | {hf_rate:,.0f} | {fast_rate / hf_rate:.1f}x |" + extra)


if __name__ == "__main__":
    main()
