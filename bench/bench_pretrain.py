"""Pretraining throughput of lmforge's Decoder against transformers' LlamaForCausalLM, on this machine.

    python bench/bench_pretrain.py [--steps N] [--quick] [--no-compile] [--tokens TOKENS_DIR]

Prints the machine, its measured matmul peak (fp32 and bf16) and a table of training tokens/s and
model FLOPs utilisation (MFU) for the packaged default recipe's model shape. Both models start from the
same weights, use the same optimizer (lmforge's build_optimizer), see the same batches and run the same
loop (forward, loss, backward, clip, step). Variants run in alternating chunks so a burst of load from
other processes hits all of them, and warmup steps are not timed. Step times are medians: on a shared
machine the mean is dominated by the slowest steps, which say more about the neighbours than the code.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import TrainConfig, load_recipe
from lmforge.interop.hf import hf_config_dict
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tokenizer.bpe import SPECIAL_TOKENS
from lmforge.tokenizer.shards import load_tokens, read_token_meta
from lmforge.training.batches import TrainBatches
from lmforge.training.device import cpu_has_fast_bf16
from lmforge.training.optim import build_optimizer
from lmforge.training.pretrain import CPU_COMPILE_MODE

VOCAB_SIZE = 4096  # with random token ids; a --tokens folder brings its own
CHUNK_STEPS = 5  # steps a variant runs before the next one takes its turn


# nn.Linear multiplies by a transposed weight, and on CPUs without native bf16 that layout takes a
# different, much faster bf16 kernel than a plain product of contiguous matrices, so both are measured.
MATMUL_LAYOUTS = ("a @ b", "a @ b.T")


def matmul_gflops(dtype: torch.dtype, sizes: list[int], repeats: int, max_call_seconds: float = 1.0) -> dict[tuple[int, str], float]:
    """Best-of-``repeats`` GFLOP/s of (n, n) products per (size, layout); stops growing n once a call is slow."""
    results = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        slowest_first_call = 0.0
        for layout, right in zip(MATMUL_LAYOUTS, (b, b.t())):
            started = time.perf_counter()
            a @ right  # the first call pays for allocation and kernel selection
            first = time.perf_counter() - started
            slowest_first_call = max(slowest_first_call, first)
            best = math.inf
            for _ in range(repeats if first < max_call_seconds else 1):
                started = time.perf_counter()
                a @ right
                best = min(best, time.perf_counter() - started)
            results[n, layout] = 2 * n**3 / best / 1e9
        if slowest_first_call >= max_call_seconds:
            break
    return results


@dataclass
class Variant:
    name: str
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast_dtype: torch.dtype | None = None
    max_steps: int = 0
    samples_seen: int = 0
    step_seconds: list[float] = field(default_factory=list)
    warmup_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # every step's, warmup included
    error: str | None = None

    def train_step(self, batches: TrainBatches, batch_size: int, grad_clip: float | None) -> float:
        inputs, targets = batches.batch(self.samples_seen, batch_size)
        self.samples_seen += batch_size
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.loss_fn(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        return time.perf_counter() - started


def build_variants(config: DecoderConfig, train_config: TrainConfig, compile_variant: bool) -> list[Variant]:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device("cpu")
    torch.manual_seed(0)
    reference = Decoder(config)

    def lmforge_copy() -> Decoder:
        model = Decoder(config)
        model.load_state_dict(reference.state_dict())
        return model.train()

    variants = []
    model = lmforge_copy()
    variants.append(Variant("lmforge fp32", model.loss, model, build_optimizer(model, train_config, device)))

    ids = {"bos_token_id": SPECIAL_TOKENS.index("<|bos|>"), "eos_token_id": SPECIAL_TOKENS.index("<|eos|>"),
           "pad_token_id": SPECIAL_TOKENS.index("<|pad|>")}
    hf_model = LlamaForCausalLM(LlamaConfig.from_dict(hf_config_dict(config, **ids), attn_implementation="sdpa"))
    # Parameter names are identical by design, so the state dict copies across as it is.
    hf_model.load_state_dict(reference.state_dict())
    hf_model.train()

    def hf_loss(inputs, targets):
        # The same cross-entropy as Decoder.loss on the model's logits, so only the models differ.
        # use_cache=False as in any training loop: a KV cache is for generation.
        logits = hf_model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    variants.append(Variant("transformers fp32", hf_loss, hf_model, build_optimizer(hf_model, train_config, device)))

    model = lmforge_copy()
    variants.append(Variant("lmforge bf16 autocast", model.loss, model, build_optimizer(model, train_config, device),
                            autocast_dtype=torch.bfloat16))
    if compile_variant:
        model = lmforge_copy()
        variants.append(Variant("lmforge fp32 torch.compile", torch.compile(model.loss), model,
                                build_optimizer(model, train_config, device)))
        model = lmforge_copy()
        variants.append(Variant(f"lmforge fp32 torch.compile {CPU_COMPILE_MODE}", torch.compile(model.loss, mode=CPU_COMPILE_MODE), model,
                                build_optimizer(model, train_config, device)))
        # The peer compiled too, so the table also shows what compilation alone buys either model.
        hf_compiled = LlamaForCausalLM(LlamaConfig.from_dict(hf_config_dict(config, **ids), attn_implementation="sdpa"))
        hf_compiled.load_state_dict(reference.state_dict())
        hf_compiled.train()
        compiled_forward = torch.compile(hf_compiled, mode=CPU_COMPILE_MODE)

        def hf_compiled_loss(inputs, targets):
            logits = compiled_forward(input_ids=inputs, use_cache=False).logits
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

        variants.append(Variant(f"transformers fp32 torch.compile {CPU_COMPILE_MODE}", hf_compiled_loss, hf_compiled,
                                build_optimizer(hf_compiled, train_config, device)))
    return variants


def run_interleaved(variants: list[Variant], batches: TrainBatches, batch_size: int, grad_clip: float | None, warmup: int,
                    steps: int, max_seconds: float) -> None:
    """Warm each variant up, cap its steps to fit ``max_seconds``, then time all of them in alternating chunks."""
    for variant in variants:
        started = time.perf_counter()
        try:
            for _ in range(max(warmup, 1)):  # at least one, which also times a step for the cap below
                last = variant.train_step(batches, batch_size, grad_clip)
        except Exception as exc:  # torch.compile support varies by platform and toolchain
            variant.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            continue
        variant.warmup_seconds = time.perf_counter() - started
        variant.max_steps = max(2, min(steps, int(max_seconds / max(last, 1e-6))))
    active = [v for v in variants if v.error is None]
    while any(len(v.step_seconds) < v.max_steps for v in active):
        for variant in active:
            for _ in range(min(CHUNK_STEPS, variant.max_steps - len(variant.step_seconds))):
                variant.step_seconds.append(variant.train_step(batches, batch_size, grad_clip))


def machine_busy_seconds() -> float:
    """CPU seconds spent by every process on the machine so far (from /proc/stat; 0 where unavailable)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def machine_description() -> dict[str, str]:
    model_name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": model_name,
        "logical cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "native bf16 (AVX-512 BF16 / AMX)": "yes" if cpu_has_fast_bf16() else "no",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant (default 40; fewer if slow)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    parser.add_argument("--quick", action="store_true", help="10 steps, 1 warmup step, smaller matmuls, no torch.compile")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variant")
    parser.add_argument("--max-seconds", type=float, default=45.0, help="timed seconds per variant at most (caps --steps)")
    parser.add_argument("--recipe", default="default", help="recipe whose model and train sections set the shape")
    parser.add_argument("--tokens", type=Path, default=None, help="a tokens stage folder to train on (default: random ids)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.compile, args.max_seconds = 10, 1, False, 15.0

    recipe = load_recipe(args.recipe)
    if args.tokens is not None:
        vocab_size, tokens = read_token_meta(args.tokens)["vocab_size"], load_tokens(args.tokens, "train")
    else:
        vocab_size = VOCAB_SIZE
        tokens = np.random.default_rng(0).integers(len(SPECIAL_TOKENS), vocab_size, size=2_000_000, dtype=np.uint16)
    model_section = recipe.model
    if model_section.mlp != "swiglu" or model_section.qk_norm:
        # LlamaForCausalLM has only the SwiGLU MLP and no QK-norm: compare the same function, same FLOPs.
        print(f"note: recipe `{args.recipe}` uses mlp={model_section.mlp}, qk_norm={model_section.qk_norm}; both models are "
              "built with Llama's SwiGLU MLP and no QK-norm so that they compute the same function")
        model_section = model_section.model_copy(update={"mlp": "swiglu", "qk_norm": False, "ffn_hidden": None})
    config = DecoderConfig.from_recipe(model_section, vocab_size=vocab_size)
    train_config = recipe.train
    batch_size = train_config.batch_size
    batches = TrainBatches(tokens, config.context_length, seed=0)

    print("## Machine\n")
    for key, value in machine_description().items():
        print(f"- {key}: {value}")

    sizes, repeats = ([256, 512, 1024], 3) if args.quick else ([256, 512, 1024, 2048], 10)
    fp32 = matmul_gflops(torch.float32, sizes, repeats)
    bf16 = matmul_gflops(torch.bfloat16, sizes, repeats)
    fp32_peak, bf16_peak = max(fp32.values()), max(bf16.values())
    print("\n## Matmul peak (best of several n x n products, GFLOP/s)\n")
    print("| n | " + " | ".join(f"{dtype} {layout}" for dtype in ("fp32", "bf16") for layout in MATMUL_LAYOUTS) + " |")
    print("| ---: " * (1 + 2 * len(MATMUL_LAYOUTS)) + "|")
    for n in sizes:
        cells = [f"{table[n, layout]:,.1f}" if (n, layout) in table else "skipped (slow)"
                 for table in (fp32, bf16) for layout in MATMUL_LAYOUTS]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\npeak: fp32 {fp32_peak:,.1f} GFLOP/s, bf16 {bf16_peak:,.1f} GFLOP/s (bf16/fp32 = {bf16_peak / fp32_peak:.3f})")

    variants = build_variants(config, train_config, args.compile)
    reference_model = variants[0].model
    tokens_per_step = batch_size * config.context_length
    flops_per_token = reference_model.flops_per_token(config.context_length)
    print(f"\n## Pretraining step, recipe `{args.recipe}` model section\n")
    print(f"- shape: {config}")
    print(f"- parameters: {reference_model.num_parameters():,}; batch {batch_size} x {config.context_length} = "
          f"{tokens_per_step} tokens/step; {flops_per_token / 1e6:,.1f} MFLOP/token (Decoder.flops_per_token)")
    print(f"- optimizer: lmforge build_optimizer (AdamW lr {train_config.learning_rate}, weight decay "
          f"{train_config.weight_decay}), grad clip {train_config.grad_clip}; data: "
          f"{'tokens from ' + str(args.tokens) if args.tokens else 'random token ids'}")

    started, busy_before, own_before = time.perf_counter(), machine_busy_seconds(), time.process_time()
    run_interleaved(variants, batches, batch_size, train_config.grad_clip, args.warmup, args.steps, args.max_seconds)
    baseline = next(v for v in variants if v.name == "transformers fp32")
    baseline_rate = tokens_per_step / statistics.median(baseline.step_seconds) if baseline.step_seconds else math.nan
    # Losses are compared at a step every variant reached: equal weights and batches should give close values.
    common_step = min(len(v.losses) for v in variants if v.error is None)
    print(f"\n| variant | timed steps | median step ms | tokens/s | MFU vs fp32 peak | MFU vs bf16 peak | "
          f"vs transformers fp32 | loss at step {common_step} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant in variants:
        if variant.error:
            print(f"| {variant.name} | failed: {variant.error} | | | | | | |")
            continue
        step = statistics.median(variant.step_seconds)
        rate = tokens_per_step / step
        achieved = rate * flops_per_token / 1e9
        print(f"| {variant.name} | {len(variant.step_seconds)} | {1000 * step:,.1f} | {rate:,.0f} | "
              f"{100 * achieved / fp32_peak:.1f}% | {100 * achieved / bf16_peak:.1f}% | {rate / baseline_rate:.2f}x | "
              f"{variant.losses[common_step - 1]:.4f} |")
    warmups = ", ".join(f"{v.name} {v.warmup_seconds:.1f} s" for v in variants if v.error is None)
    print(f"\nuntimed warmup ({args.warmup} steps each, compilation included): {warmups}")
    wall = time.perf_counter() - started
    # Threads waiting for cores another process holds slow every step, so say how busy the neighbours were.
    others = (machine_busy_seconds() - busy_before - (time.process_time() - own_before)) / (wall * os.cpu_count())
    print(f"\ntraining section: {wall:.0f} s; other processes used {max(others, 0):.0%} of the CPUs meanwhile"
          + (" - the numbers above are slowed by them, rerun on a quiet machine" if others > 0.1 else ""))


if __name__ == "__main__":
    main()
