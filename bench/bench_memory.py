"""Activation checkpointing and chunked loss: memory held for the backward pass against step time.

    python bench/bench_memory.py [--recipes default,gpt2-small] [--steps 3]

For each recipe's model shape and batch, plain, with `train.activation_checkpointing`, and with
`train.loss_chunk_tokens` (the output layer and loss computed 256 tokens at a time), it reports
the bytes of tensors autograd keeps for the backward pass (counted exactly through saved-tensor
hooks, the memory activation checkpointing exists to save) and the median training-step time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.config import load_recipe
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.training.optim import build_optimizer


SETTINGS = {"plain": (False, None), "activation checkpointing": (True, None), "chunked loss (256 tokens)": (False, 256)}


def saved_bytes_and_step_seconds(recipe_name: str, checkpointing: bool, loss_chunk: int | None, steps: int,
                                 batch_size: int | None) -> tuple[int, float]:
    recipe = load_recipe(recipe_name)
    config = DecoderConfig.from_recipe(recipe.model, recipe.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = Decoder(config).train()
    model.activation_checkpointing = checkpointing
    model.loss_chunk_tokens = loss_chunk
    optimizer = build_optimizer(model, recipe.train, torch.device("cpu"))
    batch = batch_size or recipe.train.batch_size
    ids = torch.randint(0, config.vocab_size, (batch, config.context_length + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    seen: dict[int, int] = {}

    def keep(tensor):
        # Count each storage once: views of one tensor share it.
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(inputs, targets=targets)
    saved = sum(seen.values())
    if checkpointing:
        # Checkpointed blocks keep their input alive outside autograd's saved tensors; count it too.
        saved += config.n_layers * inputs.numel() * config.d_model * 4
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model(inputs, targets=targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return saved, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="default,gpt2-small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipes' batch (gpt2-small's 32 is slow on a CPU)")
    args = parser.parse_args()
    print("| recipe | batch | setting | saved for backward | step time | memory | time |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name in args.recipes.split(","):
        batch = args.batch_size or (2 if name == "gpt2-small" else None)
        shown_batch = batch or load_recipe(name).train.batch_size
        baseline = None
        for setting, (checkpointing, loss_chunk) in SETTINGS.items():
            saved, seconds = saved_bytes_and_step_seconds(name, checkpointing, loss_chunk, args.steps, batch)
            baseline = baseline or (saved, seconds)
            print(f"| {name} | {shown_batch} | {setting} | {saved / 2**20:,.1f} MiB | {seconds * 1000:,.0f} ms | "
                  f"{saved / baseline[0]:.2f}x | {seconds / baseline[1]:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
