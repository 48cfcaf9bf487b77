"""Pretraining: next-token prediction on the run's token shards, through the shared training loop.

``pretrain`` reads a recipe, trains, validates, checkpoints and resumes (see ``training.loop`` for what
the loop does and how resuming stays exact); ``PretrainObjective`` is what pretraining plugs into it:
a freshly initialised decoder, windows of the train split, and sliding-window loss on the validation split.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.artifacts import RunLayout, read_manifest
from lmforge.config import Recipe
from lmforge.evaluation.intrinsic import total_nats
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tokenizer.shards import load_tokens, read_token_meta
from lmforge.training.batches import TrainBatches
from lmforge.training.checkpoint import load_training_state, save_checkpoint
from lmforge.training.distributed import Ranks, close_ranks, init_ranks
from lmforge.training.loop import CPU_COMPILE_MODE, TrainingLoop, TrainResult, budget_progress  # noqa: F401 (re-exported)

PretrainResult = TrainResult  # the name callers of pretrain() know


def pretrain(recipe: Recipe, layout: RunLayout, progress: bool = True, fresh: bool = False, on_eval=None) -> TrainResult:
    """Train ``recipe`` into ``layout.checkpoints``, resuming from the newest valid checkpoint.

    ``on_eval(step, val_loss)`` is called after every validation (e.g. to report to a hyperparameter
    search); an exception it raises stops training and propagates. Under ``torchrun`` every rank
    calls this and rank 0 alone writes files.
    """
    ranks, device_name = init_ranks(recipe.train.device)
    try:
        return TrainingLoop(PretrainObjective(recipe, layout), recipe.train, ranks, device_name, progress, on_eval).run(fresh)
    finally:
        close_ranks(ranks)


class PretrainObjective:
    """A new decoder of the recipe's shape, trained on shuffled windows of ``tokens/train.bin``."""

    stage = "pretrain"
    settings = "train"
    resume_key = "tokens_fingerprint"
    resume_mismatch = "different token shards"

    def __init__(self, recipe: Recipe, layout: RunLayout):
        self.recipe, self.layout = recipe, layout
        self.meta = read_token_meta(layout.tokens)
        self.model_config = DecoderConfig.from_recipe(recipe.model, self.meta["vocab_size"])
        self.section = {"model": recipe.model.model_dump(mode="json"), "train": recipe.train.model_dump(mode="json")}
        self.inputs = {"tokens": read_manifest(layout.tokens, "tokens")["fingerprint"]}
        self.resume_value = self.inputs["tokens"]
        self.checkpoints, self.logs = layout.checkpoints, layout.logs
        self.val_tokens = None

    def build_model(self, device: torch.device) -> Decoder:
        model = Decoder(self.model_config).to(device)
        self.title = f"{self.recipe.name}: {model.num_parameters():,} parameters"
        return model

    def batches(self, model: Decoder) -> TrainBatches:
        self.val_tokens = load_tokens(self.layout.tokens, "val")
        return TrainBatches(load_tokens(self.layout.tokens, "train"), model.config.context_length, self.recipe.train.seed)

    def validate(self, model: Decoder, batch_size: int, dtype) -> float:
        nats, count = total_nats(model, self.val_tokens, batch_size, self.meta["bos_id"], dtype, self.recipe.train.eval_batches)
        return nats / max(count, 1)

    def save(self, step: int, model: Decoder, optimizer, state: dict, ranks: Ranks) -> Path:
        return save_checkpoint(self.checkpoints, step, model, optimizer, state, self.layout.tokenizer, self.recipe.train.keep_checkpoints, ranks)

    def resume(self, folder: Path | None, model: Decoder, optimizer, ranks: Ranks) -> dict:
        return load_training_state(folder, model, optimizer, ranks)
