import math

import pytest
import torch

from lmforge.config import TrainConfig
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.training.optim import build_optimizer, learning_rate, orthogonalize, set_learning_rate


def test_warmup_then_cosine_to_the_floor():
    config = TrainConfig(learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert learning_rate(config, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(config, 9, 0.09) == pytest.approx(1.0)
    assert learning_rate(config, 50, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(config, 100, 1.0) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly():
    config = TrainConfig(learning_rate=2.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(config, 10, 0.5) == 2.0
    assert learning_rate(config, 10, 0.8) == 2.0
    assert learning_rate(config, 10, 0.9) == pytest.approx(1.0)
    assert learning_rate(config, 10, 1.0) == pytest.approx(0.0)


def test_only_block_matrices_decay_by_default():
    model = Decoder(DecoderConfig(vocab_size=50, n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, ffn_hidden=32, context_length=8,
                                  tie_embeddings=False))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "model.layers.0.mlp.down_proj.weight" in decayed
    assert not decayed & {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"}
    groups = build_optimizer(model, TrainConfig(weight_decay=0.1, decay_norms_and_embeddings=True), torch.device("cpu")).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_newton_schulz_makes_singular_values_near_one():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 96)]:
        matrix = torch.randn(shape) * torch.linspace(0.5, 2.0, shape[1])  # columns of different scales
        singular = torch.linalg.svdvals(orthogonalize(matrix))
        # The quintic iteration is tuned for speed: singular values land in about [0.7, 1.2], not exactly 1.
        assert singular.min() > 0.5 and singular.max() < 1.3, singular


def test_muon_trains_matrices_with_orthogonal_updates_and_the_rest_with_adamw():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, ffn_hidden=64, context_length=16))
    config = TrainConfig(optimizer="muon", learning_rate=3e-3, muon_learning_rate=0.02)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    muon_group, adam_group = optimizer.param_groups
    assert muon_group["use_muon"] and not adam_group["use_muon"]
    set_learning_rate(optimizer, 1e-3)
    assert muon_group["lr"] == pytest.approx(1e-3 * 0.02 / 3e-3) and adam_group["lr"] == pytest.approx(1e-3)
    set_learning_rate(optimizer, 3e-3)
    # A repeated pattern is learnable: the loss must fall well below its starting value (~ln 64).
    ids = torch.arange(16).repeat(4, 2)[:, :17] % 64
    inputs, targets = ids[:, :-1], ids[:, 1:]
    first = None
    for _ in range(40):
        loss = model.loss(inputs, targets)
        first = first or loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.3 * first
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradient_accumulation_equals_the_larger_batch(prepared_run):
    """Two micro-batches of 4 accumulate to the same update as one batch of 8 over the same samples."""
    from lmforge import pipeline
    from lmforge.config import load_recipe
    from lmforge.training.metrics import MetricsLog
    from lmforge.training.pretrain import pretrain

    losses = {}
    for name, batch, accumulation in (("whole", 8, 1), ("accumulated", 4, 2)):
        recipe = load_recipe("tiny", {"name": "tiny", "train.max_steps": 6, "train.batch_size": batch,
                                      "train.grad_accum_steps": accumulation, "train.log_interval": 1, "train.precision": "fp32"})
        layout = pipeline.layout_for(recipe, prepared_run)
        pretrain(recipe, layout, progress=False, fresh=True)
        losses[name] = [r["loss"] for r in MetricsLog(layout.logs / "metrics.jsonl").records() if "loss" in r]
    assert len(losses["whole"]) == 6
    assert losses["whole"] == pytest.approx(losses["accumulated"], rel=1e-4)
    assert not math.isclose(losses["whole"][0], losses["whole"][-1])
