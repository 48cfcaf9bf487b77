"""The recipe: one YAML file, validated here, that describes a whole build.

Every field has a default and a description; the description is what `lmforge recipe --reference`
prints and what README's recipe reference is generated from. Each stage receives only its own section.
"""

from __future__ import annotations

import difflib
import importlib.resources
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmforge.errors import LmforgeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Section):
    """One entry of `data.sources` written as a mapping, for settings that differ between sources."""

    path: str = Field(description="A file, a folder (read recursively), a `datasets` folder saved with save_to_disk, or `stdlib`.")
    weight: float = Field(1.0, ge=0.0, le=100.0, description="Mixing weight: 0.5 keeps about half of this source's training "
                          "documents (chosen by hash), 2.0 writes each twice, 2.5 writes each twice and half of them a third time.")
    include: list[str] = Field(default_factory=list, description="Glob patterns (on the path inside the folder); only matching files are read.")
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of files to leave out.")
    text_field: str | None = Field(None, description="JSON field, CSV/TSV column or Parquet/Arrow column with the text; default `data.text_field`.")


class ExtractionConfig(Section):
    """Turning markup into plain text."""

    html: Literal["trafilatura", "selectolax", "builtin"] = Field(
        "selectolax", description="HTML main-text extractor (BENCHMARKS.md, `HTML extraction`, compares them on real pages)."
    )
    strip_markup: bool = Field(True, description="Lightly strip Markdown and reStructuredText markup (headings, emphasis, link targets, directives).")


class NormalizeConfig(Section):
    """Repair and normalisation of each document's text."""

    enabled: bool = Field(True, description="Run this step.")
    fix_mojibake: bool = Field(True, description="Repair mojibake and broken escapes with ftfy.")
    unicode_form: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normal form.")
    lowercase: bool = Field(False, description="Lowercase all text.")
    emoji_to_text: bool = Field(False, description="Write emoji as their names (`:smiling_face:`).")


class LanguageConfig(Section):
    """Language identification with py3langid's packaged model."""

    enabled: bool = Field(True, description="Run this step.")
    keep: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep; empty keeps every language (the label is still recorded).")
    min_score: float = Field(0.5, ge=0.0, le=1.0, description="Documents whose best language scores below this are rejected as `language_uncertain`.")


class QualityConfig(Section):
    """Gopher-style document rules, repetition rules and C4-style line filters (reasons `quality_*`)."""

    enabled: bool = Field(True, description="Run this step.")
    min_words: int = Field(50, ge=0, description="Fewest words in a document.")
    max_words: int = Field(100_000, ge=1, description="Most words in a document.")
    min_mean_word_length: float = Field(3.0, ge=0, description="Smallest mean word length (characters).")
    max_mean_word_length: float = Field(10.0, ge=0, description="Largest mean word length (characters).")
    max_symbol_word_ratio: float = Field(0.1, ge=0, description="Most `#` and `...` per word.")
    max_ellipsis_line_fraction: float = Field(0.3, ge=0, le=1, description="Most lines ending in an ellipsis.")
    max_bullet_line_fraction: float = Field(0.9, ge=0, le=1, description="Most lines starting with a bullet.")
    min_alpha_word_fraction: float = Field(0.8, ge=0, le=1, description="Fewest words holding at least one letter.")
    min_stop_words: int = Field(2, ge=0, description="Fewest English stop words (`the`, `be`, `to`, `of`, `and`, `that`, `have`, `with`); only for documents labelled English or unlabelled.")
    max_duplicate_line_fraction: float = Field(0.3, ge=0, le=1, description="Most lines that repeat an earlier line (by count).")
    max_duplicate_paragraph_fraction: float = Field(0.3, ge=0, le=1, description="Most paragraphs that repeat an earlier paragraph (by count).")
    max_top_ngram_fraction: list[float] = Field(default_factory=lambda: [0.20, 0.18, 0.16],
                                                description="For n = 2, 3, 4: most characters covered by the commonest n-gram.")
    max_duplicate_ngram_fraction: list[float] = Field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
                                                      description="For n = 5..10: most characters in n-grams that occur more than once.")
    c4_boilerplate_lines: bool = Field(True, description="C4-style: drop lines asking to enable JavaScript and cookie, privacy-policy "
                                       "and terms-of-use notices; a document with `lorem ipsum` is rejected.")
    c4_terminal_punctuation: bool = Field(False, description="C4-style: also drop lines that do not end in terminal punctuation "
                                          "(off by default: it removes code and lists).")


class ToxicityConfig(Section):
    """A word-list filter for unwanted content."""

    enabled: bool = Field(False, description="Run this step.")
    packaged_list: bool = Field(True, description="Use lmforge's packaged English list of profanity and slurs.")
    word_lists: list[str] = Field(default_factory=list, description="Your own word lists: text files, one word or phrase per line, `#` comments.")
    max_fraction: float = Field(0.005, ge=0, le=1, description="Documents where listed words are more than this fraction of all words are rejected as `toxic`.")
    max_hits: int | None = Field(None, ge=0, description="Also reject a document with more than this many listed words; null: no count limit.")


PII_KINDS = ("email", "phone", "ip", "credit_card", "iban", "secret")


class PiiConfig(Section):
    """Scrubbing personal data: each match becomes a typed placeholder like `<EMAIL>`."""

    enabled: bool = Field(True, description="Run this step.")
    kinds: list[Literal["email", "phone", "ip", "credit_card", "iban", "secret"]] = Field(
        default_factory=lambda: list(PII_KINDS), description="What to scrub: email, phone, ip (IPv4 and IPv6), credit_card (Luhn-checked), iban (checksum-checked), secret (API keys and tokens)."
    )


class DedupConfig(Section):
    """Exact and near-duplicate removal across the whole corpus; each cluster keeps exactly one document."""

    exact: bool = Field(True, description="Drop documents whose normalised text (case, whitespace and punctuation folded) was seen before.")
    near: bool = Field(True, description="Drop near-duplicates found with MinHash LSH.")
    shingle_words: int = Field(5, ge=1, le=32, description="Words per shingle.")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations; must equal bands x rows.")
    bands: int = Field(16, ge=1, description="LSH bands.")
    rows: int = Field(8, ge=1, description="Rows per LSH band.")
    threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity above which two documents in a shared bucket are duplicates.")
    seed: int = Field(0, description="Seed of the MinHash permutations.")

    @model_validator(mode="after")
    def _check_bands(self) -> "DedupConfig":
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"bands x rows ({self.bands} x {self.rows}) must equal num_perm ({self.num_perm})")
        return self


class DecontaminationConfig(Section):
    """Dropping training documents that share long n-grams with evaluation text."""

    enabled: bool = Field(False, description="Run this step.")
    eval_files: list[str] = Field(default_factory=list, description="Files with evaluation text (.txt, .jsonl with `eval_field`, or any source format).")
    eval_field: str = Field("text", description="Field or column holding the text in structured evaluation files.")
    ngram: int = Field(13, ge=4, le=64, description="Words per n-gram; a training document sharing any such n-gram with evaluation text is dropped.")


class DataConfig(Section):
    """Where documents come from, how they are cleaned, filtered, deduplicated, split and mixed."""

    sources: list[str | SourceConfig] = Field(
        default_factory=lambda: ["stdlib"],
        description="Files or folders to read (.txt, .md, .rst, .html/.htm, .jsonl/.json, .csv/.tsv, .parquet, optionally .gz/.zst), "
        "`datasets` folders saved with save_to_disk, or `stdlib`, the Python standard library's own documentation. "
        "An entry is a path or a mapping (see `data.sources[]`).",
    )
    text_field: str = Field("text", description="Field or column holding the text in .jsonl/.json/.csv/.tsv/.parquet and `datasets` records.")
    min_chars: int = Field(64, ge=0, description="Documents shorter than this (after cleaning) are rejected as too short.")
    max_doc_chars: int = Field(
        20_000, ge=256, description="Long files are cut into documents at blank lines, each at most this many characters."
    )
    max_line_bytes: int = Field(16 << 20, ge=1024, description="A JSONL/CSV line longer than this is rejected (`line_too_long`) without being held in memory.")
    max_file_bytes: int = Field(64 << 20, ge=1024, description="HTML, JSON and Parquet files are read whole; larger ones are skipped (`file_too_large`).")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of documents held out for validation, chosen by hash.")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of documents held out as a test split, chosen by hash.")
    stratify_by_source: bool = Field(False, description="Hash each source separately, so every source is split in the same proportions.")
    shard_docs: int = Field(10_000, ge=1, description="Documents per output shard.")
    shard_mb: float = Field(16.0, gt=0, description="Input files are grouped into work shards of about this many megabytes; each shard is one task.")
    workers: int | None = Field(None, ge=1, description="Worker processes; default: every core.")
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    toxicity: ToxicityConfig = Field(default_factory=ToxicityConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)

    @model_validator(mode="after")
    def _check_splits(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1 (got {self.val_fraction} + {self.test_fraction})")
        return self


class TokenizerConfig(Section):
    """The byte-level BPE tokenizer."""

    vocab_size: int = Field(4096, ge=300, le=1 << 20, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often to be merged.")


class ModelConfig(Section):
    """Shape of the decoder-only transformer (Llama architecture)."""

    n_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    d_model: int = Field(256, ge=8, description="Width of the residual stream.")
    n_heads: int = Field(4, ge=1, description="Attention heads (query heads).")
    n_kv_heads: int | None = Field(None, ge=1, description="Key/value heads for grouped-query attention; default: n_heads.")
    ffn_hidden: int | None = Field(
        None, ge=1, description="MLP hidden width; default: 8/3 * d_model (swiglu) or 4 * d_model (relu2), rounded up to a multiple of 64."
    )
    context_length: int = Field(256, ge=8, description="Maximum sequence length in tokens.")
    tie_embeddings: bool = Field(True, description="Share the input embedding with the output head.")
    rope_theta: float = Field(10_000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    init_std: float = Field(0.02, gt=0, description="Standard deviation of the normal weight initialisation.")
    qk_norm: bool = Field(False, description="RMS-normalise each head's queries and keys (not exportable to Llama; Qwen3 has it).")
    mlp: Literal["swiglu", "relu2"] = Field(
        "swiglu", description="swiglu: Llama's gated MLP; relu2: squared-ReLU two-matrix MLP (not exportable to Llama)."
    )

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head size d_model/n_heads ({self.d_model // self.n_heads}) must be even for rotary embeddings")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({kv})")
        return self


class TrainConfig(Section):
    """The pretraining loop. Training stops at whichever bound (steps, tokens, minutes) comes first."""

    max_steps: int | None = Field(2000, ge=1, description="Stop after this many optimizer steps.")
    max_tokens: int | None = Field(None, ge=1, description="Stop after this many training tokens.")
    max_minutes: float | None = Field(None, gt=0, description="Stop after this much training wall-clock time (evaluation excluded).")
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch, in total over all processes (each of N ranks takes 1/N).")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="cosine: warmup then cosine decay; wsd: warmup, stable, then linear decay; constant: warmup then flat."
    )
    warmup_steps: int = Field(50, ge=0, description="Linear warmup length in optimizer steps.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="For wsd: fraction of training spent decaying.")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw; or muon: orthogonalised momentum for the blocks' matrices, AdamW for embeddings, head and norms."
    )
    muon_learning_rate: float = Field(0.02, gt=0, description="For muon: peak learning rate of the orthogonalised updates.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled (AdamW) weight decay.")
    decay_norms_and_embeddings: bool = Field(
        False, description="Also apply weight decay to norm gains and embeddings (by default only matrices decay)."
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this value (null: no clipping).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the hardware runs it fast (CUDA with bf16, CPUs with AVX-512 bf16), else fp32."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    compile: bool = Field(False, description="Compile the model with torch.compile (falls back to eager if unavailable).")
    threads: int | None = Field(None, ge=1, description="CPU threads for PyTorch (default: PyTorch's choice).")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Under torchrun: ddp replicates the model on each rank; fsdp shards parameters, gradients and "
        "optimizer state (FSDP2); auto: ddp. Ignored on one process."
    )
    activation_checkpointing: bool = Field(False, description="Recompute each block's activations in backward: less memory, ~1/3 more compute.")
    loss_chunk_tokens: int | None = Field(
        None, ge=1, description="Compute the output layer and loss this many tokens at a time, recomputed in backward, so the "
        "full tokens x vocabulary logits never exist at once (for large vocabularies; null: all at once)."
    )
    seed: int = Field(1337, description="Seed for initialisation and data order.")
    eval_interval: int = Field(200, ge=1, description="Validate every this many steps.")
    eval_batches: int = Field(10, ge=1, description="Micro-batches used for each periodic validation.")
    checkpoint_interval: int = Field(500, ge=1, description="Save a checkpoint every this many steps (and at the end).")
    checkpoint_minutes: float | None = Field(
        5.0, gt=0, description="Also save a checkpoint when this much time has passed since the last one."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest this many checkpoints (the best one is kept as well).")
    keep_best_checkpoint: bool = Field(True, description="Save a checkpoint whenever validation loss improves and never prune it.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop when validation loss has not improved for this many evaluations (null: never stop early)."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="An improvement smaller than this does not count for early stopping.")
    max_bad_steps: int = Field(5, ge=1, description="Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped).")
    spike_sigma: float = Field(6.0, gt=0, description="Log a loss or gradient-norm spike when it exceeds the recent mean by this many standard deviations.")
    spike_window: int = Field(128, ge=8, description="Steps of history behind the spike statistics.")
    skip_spikes: bool = Field(False, description="Skip the update of a spiking step instead of only logging it.")
    log_sample_ids: bool = Field(False, description="Record the ids of the training windows each step consumes in metrics.jsonl (for audits).")
    log_interval: int = Field(10, ge=1, description="Write a metrics line every this many steps.")

    @model_validator(mode="after")
    def _check_bounds(self) -> "TrainConfig":
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise ValueError("set at least one of max_steps, max_tokens or max_minutes")
        return self


TASK_FORMATS = ("arc", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "mc", "generation", "classification")


class EvalTask(Section):
    """One task file scored by `lmforge eval` (a benchmark, generation or classification set)."""

    format: Literal[TASK_FORMATS] = Field(  # type: ignore[valid-type]
        description="Layout of the file: a multiple-choice benchmark (arc, hellaswag, mmlu, truthfulqa_mc1/mc2, or mc = "
        '{"context","choices","label"}), generation ({"prompt","reference(s)"}) or classification ({"text","label"}).'
    )
    path: Path = Field(description="Local file, relative to the recipe: JSONL (benchmarks also JSON or Parquet); nothing is downloaded.")
    name: str | None = Field(None, description="Name in the report (default: format and file name).")
    num_fewshot: int = Field(0, ge=0, description="Solved examples placed before each multiple-choice question.")
    fewshot_path: Path | None = Field(None, description="File the few-shot examples come from (default: the task file, never the item itself).")
    limit: int | None = Field(None, ge=1, description="Score only the first N items.")
    max_new_tokens: int = Field(64, ge=1, description="Generation tasks: most tokens per answer (greedy, to the end of the line; "
                                "at most half the context).")
    template: str = Field("{text}\nLabel:", description="Classification tasks: the prompt; each label is scored as its continuation.")
    options: list[str] | None = Field(None, description="Classification tasks: the labels (default: every label found in the file).")

    @property
    def display_name(self) -> str:
        return self.name or f"{self.format}:{Path(self.path).name}"


class EvalConfig(Section):
    """Evaluation after pretraining."""

    max_batches: int | None = Field(None, ge=1, description="Limit validation to this many batches (default: the whole split).")
    batch_size: int = Field(16, ge=1, description="Sequences per evaluation batch.")
    stride: int | None = Field(
        None, ge=1, description="Sliding-window stride in tokens: each window scores this many new tokens with the rest of the "
        "context before them (default: half the context; the context length gives disjoint windows)."
    )
    bootstrap_samples: int = Field(1000, ge=0, description="Document-level bootstrap resamples for confidence intervals (0: none).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    builtin_task: bool = Field(True, description="Score the built-in multiple-choice task made from the run's documents "
                               "(held-out ones first; the report says if training ones were needed).")
    builtin_task_items: int = Field(200, ge=4, description="Questions in the built-in task.")
    tasks: list[EvalTask] = Field(default_factory=list, description="Benchmark, generation and classification files to score.")
    prompts: list[str] = Field(
        default_factory=lambda: ["The json module", "def ", "Return the"],
        description="Fixed prompts sampled into the report.",
    )
    max_new_tokens: int = Field(60, ge=1, description="Tokens generated per sample.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature for the report's samples.")
    top_k: int | None = Field(50, ge=1, description="Top-k for the report's samples.")
    seed: int = Field(0, description="Sampling seed for the report's samples and the bootstrap.")


LORA_TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinetuneConfig(Section):
    """Chat fine-tuning (SFT) of the pretrained model on conversations: `lmforge finetune sft`, and a stage of `lmforge run` when enabled."""

    enabled: bool = Field(False, description="Run SFT as the last stage of `lmforge run` (`lmforge finetune sft` runs it either way).")
    dataset: str = Field(
        "stdlib", description="Conversations: `stdlib` (built in: a question about each standard-library function and class, answered "
        'by its docstring\'s first sentence) or a JSONL file of {"messages": [{"role", "content"}, ...]} lines, relative to the recipe.'
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Fraction of conversations held out (by a hash) for validation loss and the answer scores.")
    eval_questions: int = Field(100, ge=0, description="Held-out questions answered (greedy) and scored with ROUGE-L and exact match before and after SFT.")
    max_new_tokens: int = Field(64, ge=1, description="Most tokens per scored answer (it also ends with the answer's end token or the context).")
    max_steps: int | None = Field(300, ge=1, description="Stop after this many optimizer steps.")
    max_minutes: float | None = Field(None, gt=0, description="Stop after this much training wall-clock time (validation and scoring excluded).")
    batch_size: int = Field(16, ge=1, description="Rows (of context-length tokens, packed with conversations) per optimizer step.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate (warmup, then cosine decay to train.min_lr_ratio of it).")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup length in optimizer steps.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay of the trained matrices.")
    eval_interval: int = Field(100, ge=1, description="Validate on the held-out conversations every this many steps.")
    lora_rank: int = Field(0, ge=0, description="Rank of LoRA adapters (0: full fine-tuning, every weight not frozen trains).")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: the update is (lora_alpha / lora_rank) B A.")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        description="Projections that get adapters, in every block not frozen (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).",
    )
    freeze_layers: int = Field(0, ge=0, description="Freeze the token embedding and the first this many blocks (with LoRA: no adapters there).")
    merge_adapter: bool = Field(True, description="With LoRA: checkpoints hold the merged weights; false: the pretrained weights plus "
                                "adapter.safetensors, added at load.")
    pack: bool = Field(True, description="Pack several short conversations into each row (false: one per row, padded).")

    @model_validator(mode="after")
    def _check_bounds(self) -> "FinetuneConfig":
        if self.max_steps is None and self.max_minutes is None:
            raise ValueError("set at least one of max_steps or max_minutes")
        unknown = [name for name in self.lora_targets if name not in LORA_TARGETABLE]
        if unknown or not self.lora_targets:
            raise ValueError(f"lora_targets must name some of {', '.join(LORA_TARGETABLE)} (got {self.lora_targets})")
        return self


class Recipe(Section):
    """A whole build: a name and one section per stage."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name; artifacts go to <workdir>/<name>/.")
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)


PACKAGED_RECIPES = ("default", "tiny", "gpt2-small")


# The tags pydantic puts in an error's location for the branches of a `str | Model` list entry.
UNION_TAGS = {"str", "SourceConfig"}


def _model_in(annotation) -> type[BaseModel] | None:
    """The model a field holds, directly or as the entries of a list (``list[str | SourceConfig]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _known_keys(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    for key in path:
        if key.isdigit():  # a list index
            continue
        field = model.model_fields.get(key)
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(model.model_fields)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    messages = []
    errors = exc.errors()
    for error in errors:
        # An entry that may be a string or a mapping (data.sources) fails both ways; report the way it was written.
        if error["type"] == "string_type" and isinstance(error.get("input"), dict):
            continue
        loc = tuple(str(part) for part in error["loc"] if part not in UNION_TAGS)
        where = ".".join(loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            known = _known_keys(Recipe, loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"; did you mean `{'.'.join(loc[:-1] + (close[0],))}`?" if close else f"; known keys: {', '.join(known)}"
            messages.append(f"unknown key `{where}`{hint}")
        else:
            got = error.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            messages.append(f"`{where}`: {error['msg']}{got_text}")
    return f"invalid recipe {source}: " + "; ".join(messages)


def parse_value(text: str) -> Any:
    """Parse a command-line override value the way YAML would (numbers, booleans, null, lists)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (``train.max_steps``) in a raw recipe dict."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LmforgeError(f"cannot set `{dotted}`: `{part}` is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_raw_recipe(spec: str | Path | None) -> tuple[dict, str]:
    """Read a recipe given as a path or a packaged name; returns (raw dict, description of source)."""
    if spec is None:
        spec = "default"
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise LmforgeError(f"recipe file not found: {path}")
        text, source = path.read_text(encoding="utf-8"), str(path)
    elif str(spec) in PACKAGED_RECIPES:
        text = importlib.resources.files("lmforge.recipes").joinpath(f"{spec}.yaml").read_text(encoding="utf-8")
        source = f"(packaged recipe `{spec}`)"
    else:
        raise LmforgeError(f"no recipe file `{spec}` and no packaged recipe by that name (packaged: {', '.join(PACKAGED_RECIPES)})")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise LmforgeError(f"recipe {source} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise LmforgeError(f"recipe {source} must be a mapping of sections, got {type(raw).__name__}")
    return raw, source


def load_recipe(spec: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load, override and validate a recipe. Relative paths (data sources, evaluation and word-list files, task files)
    resolve against the recipe's folder."""
    raw, source = load_raw_recipe(spec)
    if spec is not None and Path(spec).exists():
        base = Path(spec).resolve().parent

        def resolved(path):
            if not isinstance(path, str) or path == "stdlib" or path.startswith("stdlib:") or Path(path).is_absolute():
                return path
            return str(base / path)

        data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        if isinstance(data.get("sources"), list):
            data["sources"] = [{**entry, "path": resolved(entry.get("path"))} if isinstance(entry, dict) else resolved(entry)
                               for entry in data["sources"]]
        for section, key in (("decontamination", "eval_files"), ("toxicity", "word_lists")):
            files = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
            if isinstance(files, list):
                data[section][key] = [resolved(path) for path in files]
        finetune = raw.get("finetune")
        dataset = finetune.get("dataset") if isinstance(finetune, dict) else None
        if isinstance(dataset, str) and dataset != "stdlib" and not Path(dataset).is_absolute():
            finetune["dataset"] = str(base / dataset)
        tasks = raw.get("eval", {}).get("tasks") if isinstance(raw.get("eval"), dict) else None
        for task in tasks if isinstance(tasks, list) else []:
            for key in ("path", "fewshot_path"):
                if isinstance(task, dict) and isinstance(task.get(key), str) and not Path(task[key]).is_absolute():
                    task[key] = str(base / task[key])
    apply_overrides(raw, overrides or {})
    return validate_recipe(raw, source)


def validate_recipe(raw: dict, source: str = "") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise LmforgeError(_format_validation_error(exc, source)) from None


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_reference() -> str:
    """Markdown reference of every recipe field, generated from the models above."""
    lines = ["| key | default | description |", "| --- | --- | --- |"]
    lines.append(f"| `name` | `default` | {Recipe.model_fields['name'].description} |")

    def row(key: str, default: str, description: str | None) -> None:
        lines.append(f"| `{key}` | `{default}` | {description} |".replace("`None`", "`null`"))

    def section_rows(prefix: str, section: type[BaseModel]) -> None:
        for key, sub in section.model_fields.items():
            if isinstance(sub.annotation, type) and issubclass(sub.annotation, Section):  # a nested section
                section_rows(f"{prefix}.{key}", sub.annotation)
                continue
            row(f"{prefix}.{key}", repr(sub.get_default(call_default_factory=True)), sub.description)
            entry_model = {"eval.tasks": EvalTask, "data.sources": SourceConfig}.get(f"{prefix}.{key}")
            for entry_key, entry_field in (entry_model.model_fields.items() if entry_model else ()):  # a list's entries
                entry_default = "required" if entry_field.is_required() else repr(entry_field.get_default(call_default_factory=True))
                row(f"{prefix}.{key}[].{entry_key}", entry_default, entry_field.description)

    for section_name, field in Recipe.model_fields.items():
        if section_name != "name":
            section_rows(section_name, field.annotation)
    return "\n".join(lines)
