"""Size a model and its training tokens for a budget, and estimate how long training takes.

Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", the Chinchilla paper) found
that for a compute budget of C = 6·N·D FLOPs (N parameters, D training tokens) the loss is lowest at
about 20 tokens per parameter, and fitted L(N, D) = E + A/N^α + B/D^β to their runs. ``make_plan``
turns a budget (compute, hours on a device, a corpus, or a model size) into N and D, maps N to a
shape of lmforge's decoder, tabulates other sizes at the same compute, and estimates wall time from
throughput measured on this machine's CPU or assumed for a named GPU.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, astuple, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from lmforge.artifacts import atomic_write_text
from lmforge.config import ModelConfig, Recipe, TrainConfig, load_recipe, recipe_to_yaml, validate_recipe
from lmforge.errors import LmforgeError
from lmforge.models.decoder import Block, Decoder, DecoderConfig
from lmforge.training.device import autocast, resolve_precision
from lmforge.training.optim import build_optimizer

TOKENS_PER_PARAMETER = 20
BASES = ("flops", "hours", "tokens", "params")


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta: nats per token on the data and tokenizer it was fitted to."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, parameters: float, tokens: float) -> float:
        return self.E + self.A / parameters**self.alpha + self.B / tokens**self.beta

    def optimum(self, compute: float) -> tuple[float, float]:
        """(N, D) with the lowest predicted loss for C = 6·N·D (Hoffmann et al. 2022, equation 4)."""
        scale = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        parameters = scale * (compute / 6) ** (self.beta / (self.alpha + self.beta))
        return parameters, compute / (6 * parameters)


HOFFMANN_2022 = LossLaw("Hoffmann et al. 2022, approach 3", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
# Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt") refitted approach 3 to the paper's
# own data points, which the published fit does not match; the refit's optimum lies near the ~20
# tokens/parameter of the paper's other two approaches.
BESIROGLU_2024 = LossLaw("Besiroglu et al. 2024 refit", E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)

# Dense (not 2:4 sparse) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets.
GPU_PEAK_BF16_FLOPS = {
    "h100": 989e12,  # H100 SXM; the PCIe card is 756e12
    "a100": 312e12,  # A100 SXM and PCIe alike
    "l4": 121e12,  # the datasheet's 242e12 is with sparsity
    "rtx4090": 165e12,  # Ada whitepaper, FP32 accumulation; its 330e12 is with sparsity
}
# Tuned large-scale training reaches 40-50% of peak (PaLM: 46%); lmforge's single-GPU loop may reach less.
DEFAULT_GPU_MFU = 0.4

# d_model near 64 x n_layers (GPT-2 small is 768 x 12); Kaplan et al. 2020 found loss nearly flat over
# aspect ratios from about 20 to 200, so the count matters and the exact ratio little.
WIDTH_PER_LAYER = 64
SHAPE_TOLERANCE = 0.05
MAX_LAYERS = 512
# Other sizes tabulated at the same compute: 1/8 to 8 times the proposed parameter count.
SIZE_FACTORS = [8 ** (step / 4) for step in range(-4, 5)]

# A step of at most this many FLOPs takes about a second on an idle 2-core CPU; a bigger planned model
# is timed through a smaller proxy whose FLOP/s it is assumed to reach.
MAX_MEASURED_STEP_FLOPS = 5e10
TIMED_STEPS = 3
MEASURE_SECONDS = 2.5


def parse_amount(text: str, option: str) -> float:
    """A positive number written as ``1e17``, ``2.5T``, ``10M``, ``1.5B``, ``300k`` or ``1_000``."""
    cleaned = str(text).strip().replace("_", "").replace(",", "")
    multiplier = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(cleaned[-1:].lower())
    if multiplier:
        cleaned = cleaned[:-1]
    try:
        value = float(cleaned) * (multiplier or 1)
    except ValueError:
        raise LmforgeError(f"{option} expects a number such as 1e17, 10M or 1.5B, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise LmforgeError(f"{option} must be a positive number, got {text!r}")
    return value


def parse_whole(text: str, option: str) -> int:
    value = parse_amount(text, option)
    if value != int(value):
        raise LmforgeError(f"{option} must be a whole number, got {text!r}")
    return int(value)


def chinchilla_optimum(compute: float) -> tuple[float, float]:
    """(N, D) for C = 6·N·D at 20 tokens per parameter, i.e. N = sqrt(C / 120)."""
    parameters = math.sqrt(compute / (6 * TOKENS_PER_PARAMETER))
    return parameters, TOKENS_PER_PARAMETER * parameters


@lru_cache(maxsize=4096)
def _block_parameters(config_fields: tuple) -> int:
    # Built on the meta device (shapes without memory), so the count follows the model's code.
    with torch.device("meta"):
        block = Block(DecoderConfig(*config_fields), 0)
    return sum(parameter.numel() for parameter in block.parameters())


def parameter_count(config: DecoderConfig) -> int:
    """``Decoder(config).num_parameters()`` (embeddings included, tied weights once) without building it."""
    embeddings = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    final_norm = config.d_model
    return config.n_layers * _block_parameters(astuple(replace(config, n_layers=1))) + embeddings + final_norm


def training_flops_per_token(config: DecoderConfig) -> float:
    """``Decoder(config).flops_per_token()``: 6 per matmul parameter (the head, not the lookup) plus attention."""
    lookup = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    return 6 * (parameter_count(config) - lookup) + 12 * config.n_layers * config.d_model * config.context_length


def planned_model(template: ModelConfig, n_layers: int, d_model: int) -> ModelConfig:
    """``template`` (context, tied embeddings, query heads per key/value head, architecture options) at this
    depth and width."""
    # Narrow models get 32-wide heads so that they still have several.
    n_heads = d_model // (32 if d_model < 256 else 64)
    group = template.n_heads // (template.n_kv_heads or template.n_heads)
    values = template.model_dump()
    values.update(n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads // group if n_heads % group == 0 else None,
                  ffn_hidden=None)
    return ModelConfig.model_validate(values)


def _widths() -> list[int]:
    return [*range(64, 1024, 64), *range(1024, 4096, 128), *range(4096, 16384 + 1, 256)]


def decoder_shape(parameters: float, template: ModelConfig, vocab_size: int) -> DecoderConfig:
    """The decoder shape for about ``parameters`` parameters.

    Among shapes within 5% of the target, the one with d_model nearest 64 x n_layers; when none is that
    close (a target below the smallest model this vocabulary allows), the closest count.
    """
    candidates = []
    for d_model in _widths():
        one_layer = DecoderConfig.from_recipe(planned_model(template, 1, d_model), vocab_size)
        outside_blocks = parameter_count(replace(one_layer, n_layers=0))
        per_layer = parameter_count(one_layer) - outside_blocks
        layers = (parameters - outside_blocks) / per_layer
        for n_layers in {math.floor(layers), math.ceil(layers)}:
            candidates.append(replace(one_layer, n_layers=min(max(n_layers, 1), MAX_LAYERS)))
        if outside_blocks > parameters:
            break  # wider models only have bigger embeddings

    def miss(config: DecoderConfig) -> float:
        return abs(math.log(parameter_count(config) / parameters))

    def aspect(config: DecoderConfig) -> float:
        return abs(math.log(config.d_model / (WIDTH_PER_LAYER * config.n_layers)))

    close = [config for config in candidates if miss(config) <= math.log1p(SHAPE_TOLERANCE)]
    return min(close, key=aspect) if close else min(candidates, key=miss)


@dataclass
class Measurement:
    """Real training steps of lmforge's decoder on this machine's CPU."""

    config: DecoderConfig
    batch_size: int
    precision: str
    steps: int
    seconds_per_step: float  # the median of the timed steps
    includes_warmup: bool = False  # the first step alone used the time allowed, so it is the measurement

    @property
    def tokens_per_second(self) -> float:
        return self.batch_size * self.config.context_length / self.seconds_per_step

    @property
    def flops_per_second(self) -> float:
        return self.tokens_per_second * training_flops_per_token(self.config)

    def to_dict(self) -> dict:
        return {"model": shape_dict(self.config), "batch_size": self.batch_size, "precision": self.precision, "steps": self.steps,
                "seconds_per_step": self.seconds_per_step, "includes_warmup": self.includes_warmup,
                "tokens_per_second": self.tokens_per_second,
                "flops_per_second": self.flops_per_second}


def measure_cpu_training(config: DecoderConfig, train: TrainConfig, max_seconds: float = MEASURE_SECONDS) -> Measurement:
    """Time forward + backward + optimizer steps of ``Decoder(config)`` on random tokens, as pretraining runs them.

    One untimed step first (it allocates the optimizer's state), then up to three timed steps while
    less than ``max_seconds`` has passed since the start; the median counts. When the first step alone
    takes longer than that (a busy or slow machine), it is the measurement, allocation and all.
    """
    device = torch.device("cpu")
    dtype = resolve_precision(train.precision, device)
    model = Decoder(config)
    model.train()
    optimizer = build_optimizer(model, train, device)
    generator = torch.Generator().manual_seed(0)
    window = torch.randint(config.vocab_size, (train.batch_size, config.context_length + 1), generator=generator)
    inputs, targets = window[:, :-1], window[:, 1:]

    def step() -> None:
        with autocast(device, dtype):
            loss = model.loss(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    began = time.perf_counter()
    step()
    first = time.perf_counter() - began
    seconds: list[float] = []
    while len(seconds) < TIMED_STEPS and time.perf_counter() - began < max_seconds:
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    precision = str(dtype or "fp32").removeprefix("torch.")
    if not seconds:
        return Measurement(config, train.batch_size, precision, 1, first, includes_warmup=True)
    return Measurement(config, train.batch_size, precision, len(seconds), statistics.median(seconds))


def measurable(config: DecoderConfig, template: ModelConfig, batch_size: int) -> DecoderConfig:
    """``config`` if one training step of it is quick to time, else the largest halving of it that is."""
    target = parameter_count(config)
    while training_flops_per_token(config) * batch_size * config.context_length > MAX_MEASURED_STEP_FLOPS:
        target /= 2
        smaller = decoder_shape(target, template, config.vocab_size)
        if smaller == config:
            break  # already the smallest shape; time it anyway, max_seconds bounds the cost
        config = smaller
    return config


@dataclass
class Throughput:
    """FLOP/s (as the decoder counts them) that training reaches on a device, and where the number comes from."""

    device: str
    flops_per_second: float
    description: str
    assumed: bool
    measurement: Measurement | None = None

    def to_dict(self) -> dict:
        return {"device": self.device, "flops_per_second": self.flops_per_second, "description": self.description,
                "assumed": self.assumed, "measured": self.measurement.to_dict() if self.measurement else None}


def gpu_throughput(name: str, mfu: float) -> Throughput:
    peak = GPU_PEAK_BF16_FLOPS[name]
    description = (f"{name}: datasheet dense bf16 peak {peak / 1e12:,.0f} TFLOP/s x assumed MFU {mfu:g} "
                   f"= {human_rate(peak * mfu)} (assumed, not measured)")
    return Throughput(name, peak * mfu, description, assumed=True)


def cpu_throughput(measurement: Measurement) -> Throughput:
    m = measurement
    description = (f"measured on this CPU: {describe_shape(m.config)}, batch {m.batch_size} x {m.config.context_length} tokens, "
                   f"{m.precision}: {m.tokens_per_second:,.0f} tokens/s = {human_rate(m.flops_per_second)} "
                   f"({_timing(m)})")
    return Throughput("cpu", m.flops_per_second, description, assumed=False, measurement=m)


def _timing(m: Measurement) -> str:
    if m.includes_warmup:
        return f"one {m.seconds_per_step:.3g} s step, warm-up included"
    return f"median of {m.steps} step{'s' if m.steps > 1 else ''}, {m.seconds_per_step:.3g} s each"


def compute_for_time(available_flops: float, shape) -> float:
    """The compute C = 6·N·D whose 20-tokens-per-parameter run uses ``available_flops`` as the decoder counts them.

    The decoder's count adds attention to 6·N (a sizeable share for small models with long contexts),
    so C is a little under the FLOPs available; a few fixed-point rounds settle it.
    """
    compute = available_flops
    for _ in range(4):
        config = shape(chinchilla_optimum(compute)[0])
        compute = available_flops * 6 * parameter_count(config) / training_flops_per_token(config)
    return compute


@dataclass
class Row:
    """One model size at the plan's compute."""

    config: DecoderConfig
    parameters: int
    tokens: float
    loss: float
    loss_refit: float
    wall_seconds: float
    passes: float | None
    proposed: bool = False
    lowest_loss: bool = False

    def to_dict(self) -> dict:
        return {"parameters": self.parameters, "tokens": round(self.tokens), "tokens_per_parameter": self.tokens / self.parameters,
                "loss": self.loss, "loss_refit": self.loss_refit, "wall_seconds": self.wall_seconds, "passes": self.passes,
                "proposed": self.proposed, "lowest_loss": self.lowest_loss, "model": shape_dict(self.config)}


@dataclass
class Plan:
    """The proposed run, other sizes at its compute, and the notes that qualify them."""

    basis: str  # which budget was given: flops, hours, tokens or params
    budget: float
    compute: float  # 6·N·D of the proposed run
    model: ModelConfig  # the recipe's model section for the proposed shape
    config: DecoderConfig
    parameters: int
    tokens: int
    throughput: Throughput
    corpus_tokens: int | None
    rows: list[Row]
    notes: list[str]

    @property
    def wall_seconds(self) -> float:
        return self.tokens * training_flops_per_token(self.config) / self.throughput.flops_per_second

    def to_dict(self) -> dict:
        return {
            "budget": {"basis": self.basis, "value": self.budget},
            "compute_flops": self.compute,
            "parameters": self.parameters,
            "tokens": self.tokens,
            "tokens_per_parameter": self.tokens / self.parameters,
            "model": shape_dict(self.config),
            "predicted_loss": HOFFMANN_2022.loss(self.parameters, self.tokens),
            "predicted_loss_refit": BESIROGLU_2024.loss(self.parameters, self.tokens),
            "wall_seconds": self.wall_seconds,
            "throughput": self.throughput.to_dict(),
            "corpus_tokens": self.corpus_tokens,
            "table": [row.to_dict() for row in self.rows],
            "loss_laws": {"loss": asdict(HOFFMANN_2022), "loss_refit": asdict(BESIROGLU_2024)},
            "notes": self.notes,
        }


def make_plan(basis: str, budget: float, base: Recipe, vocab_size: int, device: str = "cpu", mfu: float | None = None,
              corpus_tokens: int | None = None) -> Plan:
    """Plan a run for ``budget`` given as ``basis``: flops (C), hours (on ``device``), tokens (a corpus) or params (N).

    ``base`` supplies the context length, embedding tying, architecture options and, for measuring
    the CPU, the batch size, precision and optimizer; ``device`` is ``cpu`` (this machine, measured) or a
    key of ``GPU_PEAK_BF16_FLOPS`` (datasheet peak x ``mfu``).
    """
    template = base.model

    def shape(parameters: float) -> DecoderConfig:
        return decoder_shape(parameters, template, vocab_size)

    measurements: dict[tuple, Measurement] = {}

    def rate_for(config: DecoderConfig) -> Throughput:
        if device != "cpu":
            return gpu_throughput(device, DEFAULT_GPU_MFU if mfu is None else mfu)
        timed = measurable(config, template, base.train.batch_size)
        if astuple(timed) not in measurements:
            measurements[astuple(timed)] = measure_cpu_training(timed, base.train)
        return cpu_throughput(measurements[astuple(timed)])

    throughput = None
    if basis == "hours":
        # On the CPU the rate depends on the shape and the shape on the rate: size the model at the rate of
        # the base recipe's model, time the sized model, size again at that rate (usually the same shape or
        # a neighbour), and fill the hours with tokens.
        first = rate_for(DecoderConfig.from_recipe(template, vocab_size))
        config = shape(chinchilla_optimum(compute_for_time(budget * 3600 * first.flops_per_second, shape))[0])
        throughput = rate_for(config)
        config = shape(chinchilla_optimum(compute_for_time(budget * 3600 * throughput.flops_per_second, shape))[0])
        tokens = budget * 3600 * throughput.flops_per_second / training_flops_per_token(config)
        compute = 6 * parameter_count(config) * tokens
    elif basis == "flops":
        compute = budget
        config = shape(chinchilla_optimum(compute)[0])
        tokens = compute / (6 * parameter_count(config))
    elif basis == "params":
        config = shape(budget)
        tokens = float(TOKENS_PER_PARAMETER * parameter_count(config))
        compute = 6 * parameter_count(config) * tokens
    elif basis == "tokens":
        config = shape(budget / TOKENS_PER_PARAMETER)
        tokens = float(budget)
        compute = 6 * parameter_count(config) * tokens
    else:
        raise ValueError(f"unknown budget basis {basis!r}")
    throughput = throughput or rate_for(config)
    parameters = parameter_count(config)

    rows, seen = [], set()
    for factor in SIZE_FACTORS:
        row_config = config if factor == 1 else shape(parameters * factor)
        if astuple(row_config) in seen:
            continue
        seen.add(astuple(row_config))
        row_parameters = parameter_count(row_config)
        row_tokens = compute / (6 * row_parameters)
        rows.append(Row(row_config, row_parameters, row_tokens, HOFFMANN_2022.loss(row_parameters, row_tokens),
                        BESIROGLU_2024.loss(row_parameters, row_tokens),
                        row_tokens * training_flops_per_token(row_config) / throughput.flops_per_second,
                        row_tokens / corpus_tokens if corpus_tokens else None, proposed=row_config == config))
    min(rows, key=lambda row: row.loss).lowest_loss = True

    plan = Plan(basis, budget, compute, planned_model(template, config.n_layers, config.d_model), config, parameters,
                round(tokens), throughput, corpus_tokens, rows, [])
    plan.notes = _notes(plan)
    return plan


def _notes(plan: Plan) -> list[str]:
    notes = []
    target = {"params": plan.budget, "tokens": plan.budget / TOKENS_PER_PARAMETER}.get(plan.basis)
    if target and abs(plan.parameters / target - 1) > SHAPE_TOLERANCE:
        floor = f" (the {plan.config.vocab_size:,}-token embedding sets a floor)" if plan.parameters > target else ""
        notes.append(f"the closest shape has {human_count(plan.parameters)} parameters, {plan.parameters / target - 1:+.0%} from "
                     f"the {human_count(target)} asked for{floor}")
    measurement = plan.throughput.measurement
    if measurement and measurement.config != plan.config:
        step_flops = training_flops_per_token(plan.config) * measurement.batch_size * plan.config.context_length
        why = (", as the planned model is too big to time quickly; bigger matrices usually run faster, so the estimate errs long"
               if step_flops > MAX_MEASURED_STEP_FLOPS else "")
        notes.append(f"the wall time assumes the FLOP/s measured for {describe_shape(measurement.config)}{why}")
    if measurement and len(plan.rows) > 1:
        notes.append("the other sizes' wall times assume the same FLOP/s as the timed model")
    if plan.corpus_tokens:
        if plan.basis == "tokens":
            notes.append(f"a model bigger than {human_count(plan.parameters)} would want more than the corpus's "
                         f"{human_count(plan.corpus_tokens)} tokens at {TOKENS_PER_PARAMETER} per parameter, so the data would repeat")
        if any(row.passes and row.passes > 1 for row in plan.rows):
            notes.append("passes > 1 repeat the corpus; Muennighoff et al. 2023 found up to about 4 passes nearly as good as fresh data")
    fit_parameters, fit_tokens = HOFFMANN_2022.optimum(plan.compute)
    refit_parameters, refit_tokens = BESIROGLU_2024.optimum(plan.compute)
    notes.append(f"at this compute the loss fit alone is lowest at {human_count(fit_parameters)} parameters x "
                 f"{human_count(fit_tokens)} tokens ({fit_tokens / fit_parameters:.0f}/parameter); the refit at "
                 f"{human_count(refit_parameters)} x {human_count(refit_tokens)} ({refit_tokens / refit_parameters:.0f}/parameter)")
    notes.append("loss: nats/token from L = E + A/N^a + B/D^b fitted by Hoffmann et al. 2022 (approach 3) on their data and "
                 "tokenizer, refit by Besiroglu et al. 2024; for comparing choices, not a prediction of lmforge's loss")
    return notes


def shape_dict(config: DecoderConfig) -> dict:
    return {"parameters": parameter_count(config), "n_layers": config.n_layers, "d_model": config.d_model,
            "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "ffn_hidden": config.ffn_hidden,
            "context_length": config.context_length, "vocab_size": config.vocab_size, "tie_embeddings": config.tie_embeddings}


def describe_shape(config: DecoderConfig) -> str:
    return f"{layers(config.n_layers)} x d_model {config.d_model} ({human_count(parameter_count(config))} parameters)"


def layers(count: int) -> str:
    return f"{count} layer{'s' if count != 1 else ''}"


def human_flops(flops: float) -> str:
    return f"{flops:.3g}".replace("e+", "e")


def human_count(value: float) -> str:
    value = float(f"{value:.3g}")  # round first, so 999.7M reads 1B
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def human_rate(flops_per_second: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if flops_per_second >= scale:
            return f"{flops_per_second / scale:.3g} {unit}"
    return f"{flops_per_second / 1e6:.3g} MFLOP/s"


def human_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    days = seconds / 86400
    if days < 730:
        return f"{days:.0f} days"
    years = days / 365.25
    return f"{years:,.0f} years" if years < 1e6 else f"{years:.1e} years"


def _ratio(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _where(throughput: Throughput) -> str:
    return "this CPU" if throughput.device == "cpu" else f"one {throughput.device}"


def format_plan(plan: Plan) -> str:
    """The plan as aligned text for a terminal."""
    config = plan.config
    budget = {
        "flops": f"a compute budget of {human_flops(plan.budget)} FLOPs",
        "hours": f"{plan.budget:g} hour{'s' if plan.budget != 1 else ''} on {_where(plan.throughput)}",
        "tokens": f"a corpus of {human_count(plan.budget)} tokens",
        "params": f"a {human_count(plan.budget)}-parameter model",
    }[plan.basis]
    heads = f"{config.n_heads} heads of {config.head_dim}"
    if config.n_kv_heads != config.n_heads:
        heads += f" ({config.n_kv_heads} key/value)"
    tokens = f"{human_count(plan.tokens)}: {plan.tokens / plan.parameters:.1f} per parameter"
    if plan.corpus_tokens:
        passes = plan.tokens / plan.corpus_tokens
        tokens += f", {passes:.2g} pass{'es' if passes != 1 else ''} over the corpus"
    summary = [
        ("model", f"{human_count(plan.parameters)} parameters ({plan.parameters:,}): {layers(config.n_layers)}, d_model {config.d_model}, "
                  f"{heads}, context {config.context_length}, vocabulary {config.vocab_size:,}"
                  f"{', tied embeddings' if config.tie_embeddings else ''}"),
        ("tokens", tokens),
        ("compute", f"{human_flops(plan.compute)} FLOPs (6 x parameters x tokens)"),
        ("loss", f"{HOFFMANN_2022.loss(plan.parameters, plan.tokens):.3f} predicted, "
                 f"{BESIROGLU_2024.loss(plan.parameters, plan.tokens):.3f} by the refit (see notes)"),
        ("wall time", f"{human_duration(plan.wall_seconds)} on {_where(plan.throughput)}"),
        ("throughput", plan.throughput.description),
    ]
    lines = [f"Plan for {budget}, at Chinchilla's {TOKENS_PER_PARAMETER} tokens per parameter", ""]
    lines += [f"  {label:<11} {text}" for label, text in summary]

    headers = ["parameters", "tokens", "tokens/param", "loss", "loss (refit)", "wall time"]
    if plan.corpus_tokens:
        headers.append("passes")
    table = []
    for row in plan.rows:
        cells = [human_count(row.parameters), human_count(row.tokens), _ratio(row.tokens / row.parameters), f"{row.loss:.3f}",
                 f"{row.loss_refit:.3f}", human_duration(row.wall_seconds)]
        if plan.corpus_tokens:
            cells.append(f"{row.passes:.2g}")
        marks = [mark for mark, on in (("proposed", row.proposed), ("lowest predicted loss", row.lowest_loss)) if on]
        table.append((cells, f"  <- {', '.join(marks)}" if marks else ""))
    widths = [max(len(header), *(len(cells[i]) for cells, _ in table)) for i, header in enumerate(headers)]
    lines += ["", f"Model sizes for the same {human_flops(plan.compute)} FLOPs:"]
    lines += ["  " + "  ".join(header.rjust(width) for header, width in zip(headers, widths))]
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(cells, widths)) + mark for cells, mark in table]
    lines += ["", "Notes:"] + [f"  - {note}" for note in plan.notes]
    return "\n".join(lines)


def planned_recipe(plan: Plan, base: Recipe, name: str | None = None) -> Recipe:
    """``base`` with the planned model and a token budget as the only bound on training."""
    raw = base.model_dump(mode="json")
    raw["name"] = name or f"{base.name}-{human_count(plan.parameters)}"
    raw["model"] = plan.model.model_dump(mode="json")
    raw["train"].update(max_tokens=plan.tokens, max_steps=None, max_minutes=None)
    return validate_recipe(raw, "(planned)")


def write_recipe(plan: Plan, base: Recipe, path: Path, name: str | None = None) -> Recipe:
    recipe = planned_recipe(plan, base, name)
    header = (f"# Planned by `lmforge plan`: {human_count(plan.parameters)} parameters x {human_count(plan.tokens)} tokens "
              f"= {human_flops(plan.compute)} FLOPs,\n# about {human_duration(plan.wall_seconds)} on {_where(plan.throughput)}. "
              f"Train it with `lmforge run {Path(path).name}`.\n")
    atomic_write_text(Path(path), header + recipe_to_yaml(recipe))
    return recipe


def plan_command(args) -> int:
    """`lmforge plan`: check the options, plan, print the plan and write the recipe if asked."""
    given = [basis for basis in BASES if getattr(args, basis) is not None]
    if args.run is not None and "tokens" in given:
        raise LmforgeError("--run and --tokens both give the corpus size; drop one")
    if not given and args.run is None:
        raise LmforgeError("give a budget: one of --flops, --hours, --tokens (or --run RUNDIR) or --params")
    if len(given) > 1:
        raise LmforgeError(f"give one budget, not several: got {' and '.join('--' + basis for basis in given)}")
    if given:
        basis = given[0]
        budget = parse_amount(getattr(args, basis), f"--{basis}")
    device = args.device.lower()
    if device != "cpu" and device not in GPU_PEAK_BF16_FLOPS:
        raise LmforgeError(f"unknown --device `{args.device}`: cpu (this machine, measured) or one of {', '.join(GPU_PEAK_BF16_FLOPS)}")
    mfu = None
    if args.mfu is not None:
        if device == "cpu":
            raise LmforgeError("--mfu is for a named GPU; on cpu the throughput is measured")
        mfu = parse_amount(args.mfu, "--mfu")
        if mfu > 1:
            raise LmforgeError(f"--mfu is a fraction of the peak, at most 1, got {args.mfu!r}")
    if args.name is not None and args.write is None:
        raise LmforgeError("--name names the written recipe; add --write FILE.yaml")
    if args.write is not None and Path(args.write).suffix not in (".yaml", ".yml"):
        raise LmforgeError(f"--write needs a .yaml file name, got {str(args.write)!r}")

    overrides = {}
    if args.vocab_size is not None:
        overrides["tokenizer.vocab_size"] = parse_whole(args.vocab_size, "--vocab-size")
    if args.context_length is not None:
        overrides["model.context_length"] = parse_whole(args.context_length, "--context-length")
    corpus_tokens, vocab_size, base_spec = None, None, "default"
    if args.run is not None:
        from lmforge.tokenizer.shards import read_token_meta

        meta = read_token_meta(Path(args.run) / "tokens")
        corpus_tokens, vocab_size = int(meta["splits"]["train"]["tokens"]), int(meta["vocab_size"])
        if (Path(args.run) / "recipe.yaml").exists():
            base_spec = Path(args.run) / "recipe.yaml"
    base = load_recipe(base_spec, overrides)
    if args.name is not None:  # before the measurement, which takes seconds
        validate_recipe({**base.model_dump(mode="json"), "name": args.name}, "--name")
    vocab_size = overrides.get("tokenizer.vocab_size") or vocab_size or base.tokenizer.vocab_size

    if not given:
        basis, budget = "tokens", corpus_tokens
    if basis == "tokens":
        corpus_tokens = int(budget)
    plan = make_plan(basis, budget, base, vocab_size, device=device, mfu=mfu, corpus_tokens=corpus_tokens)

    written = write_recipe(plan, base, args.write, args.name) if args.write is not None else None
    if args.json:
        print(json.dumps({**plan.to_dict(), "recipe": str(args.write) if written else None}, indent=2))
    else:
        print(format_plan(plan))
        if written:
            print(f"\nwrote {args.write} (recipe `{written.name}`); train it with: lmforge run {args.write}")
    return 0
