"""The GPU code path, exercised on CPU: the same trainer picks device and precision at run time."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge import pipeline
from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.training.device import resolve_device, resolve_precision
from lmforge.training.pretrain import pretrain


def test_packaged_gpt2_small_recipe_is_the_124m_1024_context_class():
    recipe = load_recipe("gpt2-small")
    with torch.device("meta"):  # shapes only: no memory for 124M parameters
        model = Decoder(DecoderConfig.from_recipe(recipe.model, recipe.tokenizer.vocab_size))
    assert 120e6 < model.num_parameters() < 128e6
    assert recipe.model.context_length == 1024 and recipe.train.precision == "auto" and recipe.train.compile


def test_device_and_precision_are_chosen_at_run_time():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(LmforgeError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_precision("fp32", torch.device("cpu")) is None


def _train(workdir, **overrides):
    recipe = load_recipe("tiny", {"train.max_steps": 4, "train.eval_interval": 4, "train.threads": 1,
                                  **{f"train.{k}": v for k, v in overrides.items()}})
    result = pretrain(recipe, pipeline.layout_for(recipe, workdir), progress=False)
    return result, json.loads((workdir / "tiny" / "checkpoints" / "manifest.json").read_text())["stats"]


def test_gpu_switches_train_on_cpu(prepared_run):
    # The switches a GPU run uses (bf16 autocast, activation checkpointing, accumulation) go through the same loop here.
    result, stats = _train(prepared_run, precision="bf16", activation_checkpointing=True, grad_accum_steps=2)
    assert result.step == 4 and stats["precision"] == "torch.bfloat16" and result.val_loss < 7.0


@pytest.mark.slow  # the first compilation takes 30-90 s on a 2-core CPU
def test_compiled_training_matches_eager(prepared_run, tmp_path):
    import shutil

    eager_dir = tmp_path / "eager"
    shutil.copytree(prepared_run, eager_dir)
    compiled, _ = _train(prepared_run, compile=True)
    eager, _ = _train(eager_dir)
    assert compiled.val_loss == pytest.approx(eager.val_loss, abs=1e-3)
