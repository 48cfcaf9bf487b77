"""`lmforge plan`: the Chinchilla arithmetic, shapes that the decoder really has, the written recipe,
wall time, the CPU measurement and the user's mistakes."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.config import ModelConfig, TrainConfig, load_recipe
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.planning.plan import (
    BESIROGLU_2024,
    HOFFMANN_2022,
    chinchilla_optimum,
    decoder_shape,
    make_plan,
    measure_cpu_training,
    parameter_count,
    parse_amount,
    training_flops_per_token,
)
from lmforge.tokenizer.shards import read_token_meta


def test_chinchilla_rule_at_the_gopher_budget():
    # The paper's own example: 5.76e23 FLOPs -> about 70B parameters on 1.4T tokens.
    parameters, tokens = chinchilla_optimum(5.76e23)
    assert parameters == pytest.approx(69.3e9, rel=0.01)
    assert tokens == pytest.approx(1.386e12, rel=0.01)
    assert 6 * parameters * tokens == pytest.approx(5.76e23)


def test_loss_law_matches_a_hand_calculation():
    # 1.69 + 406.4 / 4867.8 + 410.7 / 2517.2 for Chinchilla itself (70B parameters, 1.4T tokens).
    assert HOFFMANN_2022.loss(70e9, 1.4e12) == pytest.approx(1.69 + 0.08349 + 0.16316, abs=1e-4)
    assert BESIROGLU_2024.loss(70e9, 1.4e12) == pytest.approx(1.9767, abs=1e-4)


@pytest.mark.parametrize("law", [HOFFMANN_2022, BESIROGLU_2024])
def test_closed_form_optimum_is_the_lowest_loss_at_its_compute(law):
    compute = 1e20
    parameters, tokens = law.optimum(compute)
    assert 6 * parameters * tokens == pytest.approx(compute)
    best = law.loss(parameters, tokens)
    for factor in (0.8, 1.25):
        assert law.loss(parameters * factor, tokens / factor) > best


@pytest.mark.parametrize("target", [3e5, 3e6, 3e7, 7e9])
def test_shape_has_about_the_target_parameters_and_exactly_the_decoders_count(target):
    config = decoder_shape(target, ModelConfig(), 4096)
    assert abs(parameter_count(config) / target - 1) < 0.15
    assert 1 <= config.d_model / config.n_layers <= 256
    # Small models are built for real; big ones on the meta device (the same modules without memory).
    device = "cpu" if target <= 3e7 else "meta"
    with torch.device(device):
        model = Decoder(config)
    assert parameter_count(config) == model.num_parameters()
    assert training_flops_per_token(config) == model.flops_per_token()


def test_shape_keeps_the_templates_architecture_and_counts_exactly():
    template = ModelConfig(tie_embeddings=False, n_heads=4, n_kv_heads=2, context_length=512, mlp="relu2", qk_norm=True)
    config = decoder_shape(5e6, template, 1000)
    assert not config.tie_embeddings and config.context_length == 512 and config.mlp == "relu2" and config.qk_norm
    assert config.n_heads == 2 * config.n_kv_heads
    model = Decoder(config)
    assert parameter_count(config) == model.num_parameters()
    assert training_flops_per_token(config) == model.flops_per_token()


def test_plan_for_compute_tabulates_sizes_at_that_compute():
    plan = make_plan("flops", 5.76e23, load_recipe("default", {"model.context_length": 2048}), 32000, device="h100")
    assert plan.parameters == pytest.approx(70e9, rel=0.05)
    assert plan.tokens / plan.parameters == pytest.approx(20, rel=0.05)
    assert len(plan.rows) == 9 and sum(row.proposed for row in plan.rows) == 1 and sum(row.lowest_loss for row in plan.rows) == 1
    sizes = [row.parameters for row in plan.rows]
    assert sizes == sorted(sizes) and sizes[-1] / sizes[0] == pytest.approx(64, rel=0.2)
    for row in plan.rows:
        assert 6 * row.parameters * row.tokens == pytest.approx(plan.compute)
    lowest = min(plan.rows, key=lambda row: row.loss)
    assert lowest.lowest_loss


def test_hours_on_a_gpu_fill_the_hours():
    plan = make_plan("hours", 2, load_recipe("default"), 4096, device="a100", mfu=0.5)
    assert plan.throughput.flops_per_second == 0.5 * 312e12 and plan.throughput.assumed
    assert plan.wall_seconds == pytest.approx(2 * 3600, rel=1e-6)
    assert plan.tokens / plan.parameters == pytest.approx(20, rel=0.15)


def test_cpu_measurement_times_real_training_steps():
    config = DecoderConfig(vocab_size=300, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, ffn_hidden=64, context_length=16)
    measurement = measure_cpu_training(config, TrainConfig(batch_size=2), max_seconds=1.0)
    assert 1 <= measurement.steps <= 3
    assert measurement.tokens_per_second > 0
    assert measurement.flops_per_second == pytest.approx(measurement.tokens_per_second * training_flops_per_token(config))
    # With no time to spare, the first step is the measurement rather than nothing.
    hurried = measure_cpu_training(config, TrainConfig(batch_size=2), max_seconds=0.0)
    assert hurried.steps == 1 and hurried.includes_warmup and hurried.tokens_per_second > 0


def test_write_produces_a_recipe_with_the_planned_shape_and_tokens(tmp_path, capsys):
    path = tmp_path / "planned.yaml"
    assert main(["plan", "--params", "3M", "--device", "h100", "--write", str(path), "--name", "planned", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    recipe = load_recipe(path)
    assert recipe.name == "planned"
    config = DecoderConfig.from_recipe(recipe.model, recipe.tokenizer.vocab_size)
    assert Decoder(config).num_parameters() == plan["parameters"]
    assert {key: getattr(config, key) for key in plan["model"] if key != "parameters"} == {
        key: value for key, value in plan["model"].items() if key != "parameters"}
    assert recipe.train.max_tokens == plan["tokens"] == 20 * plan["parameters"]
    assert recipe.train.max_steps is None and recipe.train.max_minutes is None
    assert main(["recipe", str(path)]) == 0
    assert "max_tokens: " + str(plan["tokens"]) in capsys.readouterr().out


def test_run_folder_gives_the_corpus_and_vocabulary(prepared_workdir, capsys):
    run = prepared_workdir / "tiny"
    meta = read_token_meta(run / "tokens")
    assert main(["plan", "--run", str(run), "--device", "l4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["budget"]["basis"] == "tokens"
    assert plan["corpus_tokens"] == plan["tokens"] == meta["splits"]["train"]["tokens"]
    assert plan["model"]["vocab_size"] == meta["vocab_size"]
    assert plan["model"]["context_length"] == load_recipe("tiny").model.context_length  # the run's recipe is the base


def test_text_output_marks_the_proposed_and_the_lowest_loss_rows(capsys):
    assert main(["plan", "--flops", "1e19", "--device", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert "<- proposed" in out and "lowest predicted loss" in out and "assumed" in out
    assert "not a prediction of lmforge's loss" in out


@pytest.mark.parametrize("text, value", [("1e17", 1e17), ("10M", 1e7), ("1.5B", 1.5e9), ("300k", 3e5), ("2.5T", 2.5e12), ("1_000", 1e3)])
def test_numbers_take_exponents_and_suffixes(text, value):
    assert parse_amount(text, "--flops") == value


@pytest.mark.parametrize("args, fragment", [
    ([], "give a budget"),
    (["--flops", "1e17", "--params", "10M"], "give one budget"),
    (["--flops", "lots"], "--flops expects a number"),
    (["--params", "0"], "--params must be a positive number"),
    (["--flops=-1e17"], "--flops must be a positive number"),
    (["--hours", "nan"], "--hours must be a positive number"),
    (["--hours", "1", "--device", "tpu"], "unknown --device"),
    (["--hours", "1", "--mfu", "0.5"], "--mfu is for a named GPU"),
    (["--params", "10M", "--device", "h100", "--mfu", "2"], "at most 1"),
    (["--params", "10M", "--vocab-size", "1.5"], "whole number"),
    (["--params", "10M", "--write", "plan.txt"], ".yaml"),
])
def test_budget_mistakes_are_one_line_errors(args, fragment, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert fragment in err


def test_missing_run_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["plan", "--run", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "lmforge tokens" in err
