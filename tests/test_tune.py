"""`lmforge tune` on the tiny recipe with short trials: searches, the best recipe, pruning, resuming, mistakes."""

import json
import shutil

import pytest

from lmforge.cli import main
from lmforge.config import load_recipe
from lmforge.tuning.tune import parse_space

# Short trials with a validation every 3 steps: enough points for the pruner, a few seconds each.
SHORT = ["--train.max_steps", "12", "--train.eval_interval", "3", "--train.eval_batches", "1", "--train.checkpoint_interval", "100"]
LEARNING_RATES = "train.learning_rate=choice:3e-3,1e-2,1e-6"  # 1e-6 barely moves the weights in 12 steps


@pytest.fixture
def workdir(prepared_workdir, tmp_path):
    """A workdir whose tune folder already holds the tiny recipe's prepared stages, as a first run leaves them."""
    for stage in ("data", "tokenizer", "tokens"):
        shutil.copytree(prepared_workdir / "tiny" / stage, tmp_path / "tiny-tune" / "base" / stage)
    return tmp_path


def tune(capsys, workdir, *args):
    code = main(["tune", "tiny", *SHORT, "--workdir", str(workdir), "--quiet", *args])
    out, err = capsys.readouterr()
    return code, out, err


def results(workdir):
    return json.loads((workdir / "tiny-tune" / "results.json").read_text())


def trial_lines(out):
    return [line for line in out.splitlines() if line.startswith("trial ")]


def test_search_resumes_and_writes_the_best_recipe(capsys, workdir):
    code, out, err = tune(capsys, workdir, "--param", LEARNING_RATES, "--sampler", "tpe", "--seed", "0", "--trials", "2", "--no-prune")
    assert code == 0, err
    assert len(trial_lines(out)) == 2
    first_checkpoints = sorted((workdir / "tiny-tune" / "trial_0000" / "checkpoints").glob("step_*"))
    first_mtime = first_checkpoints[-1].stat().st_mtime_ns

    code, out, err = tune(capsys, workdir, "--param", LEARNING_RATES, "--sampler", "tpe", "--seed", "0", "--trials", "3", "--no-prune")
    assert code == 0, err
    assert "has 2 of 3 trials finished; running 1 more" in err
    assert [line.split()[1] for line in trial_lines(out)] == ["2"]
    assert first_checkpoints[-1].stat().st_mtime_ns == first_mtime, "a finished trial was trained again"

    report = results(workdir)
    assert sorted(row["trial"] for row in report["trials"]) == [0, 1, 2]
    assert all(row["state"] == "complete" for row in report["trials"])
    rates = [row["params"]["train.learning_rate"] for row in report["trials"]]
    assert 1e-6 in rates, "pick a seed whose search tries the hopeless learning rate"
    best = report["best"]
    assert best["val_loss"] == min(row["val_loss"] for row in report["trials"]) == report["trials"][0]["val_loss"]
    assert best["params"]["train.learning_rate"] != 1e-6

    best_path = workdir / "tiny-tune" / "best.yaml"
    recipe = load_recipe(best_path)
    assert recipe.train.learning_rate == best["params"]["train.learning_rate"]
    assert recipe.train.max_steps == 12, "the fixed settings belong to the best recipe too"
    assert main(["recipe", str(best_path)]) == 0
    assert f"best: trial {best['trial']}" in (workdir / "tiny-tune" / "results.md").read_text()

    # The same study with other fixed settings would mix incomparable trials.
    capsys.readouterr()
    assert main(["tune", "tiny", *SHORT, "--train.max_steps", "30", "--workdir", str(workdir), "--param", LEARNING_RATES]) == 2
    assert "different fixed settings (train.max_steps: 12 -> 30)" in capsys.readouterr().err


def test_grid_tries_every_point_and_prunes_a_hopeless_trial(capsys, workdir):
    # This seed orders the grid so that 1e-6 comes last, after the two trials the pruner compares against.
    code, out, err = tune(capsys, workdir, "--param", LEARNING_RATES, "--sampler", "grid", "--seed", "3")
    assert code == 0, err
    rows = {row["params"]["train.learning_rate"]: row for row in results(workdir)["trials"]}
    assert sorted(rows) == [1e-6, 3e-3, 1e-2]
    assert rows[1e-6]["state"] == "pruned" and rows[1e-6]["pruned_at_step"] < 12
    assert rows[3e-3]["state"] == rows[1e-2]["state"] == "complete"
    assert f"pruned at step {rows[1e-6]['pruned_at_step']}" in out


def test_a_trial_with_an_impossible_shape_fails_and_the_search_goes_on(capsys, workdir):
    code, out, err = tune(capsys, workdir, "--param", "model.n_heads=choice:3,4", "--sampler", "grid", "--train.max_steps", "3")
    assert code == 0, err
    rows = {row["params"]["model.n_heads"]: row for row in results(workdir)["trials"]}
    assert len(rows) == 2 and len(trial_lines(out)) == 2
    assert rows[3]["state"] == "failed" and "divisible by n_heads" in rows[3]["error"]
    assert rows[4]["state"] == "complete"
    assert load_recipe(workdir / "tiny-tune" / "best.yaml").model.n_heads == 4


@pytest.mark.parametrize("args, message", [
    (["--param", "train.learning_rate"], "expected KEY=DIST"),
    (["--param", "train.learning_rate=logunif:1e-4:1e-2"], "unknown distribution `logunif`"),
    (["--param", "train.learning_rate=loguniform:1e-2:1e-4"], "LOW must be below HIGH"),
    (["--param", "train.learning_rat=loguniform:1e-4:1e-2"], "unknown key `train.learning_rat`; did you mean `train.learning_rate`?"),
    (["--param", "model.n_layers=uniform:1:4"], "valid integer"),
    (["--param", "train.learning_rate=loguniform:1e-4:1e-2", "--sampler", "grid"], "--sampler grid needs choice or int"),
    (["--param", "train.learning_rate=loguniform:1e-4:1e-2", "--train.learning_rate", "0.1"], "both fixed"),
    ([], "nothing to search"),
])
def test_mistakes_are_one_line_errors(capsys, tmp_path, args, message):
    assert main(["tune", "tiny", "--workdir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "tiny-tune").exists()


def test_space_file_and_params_define_the_same_distributions(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("train:\n  learning_rate: loguniform:1e-4:1e-2\n  schedule: [cosine, wsd]\nmodel.n_layers: int:2:6:2\n")
    from_file = {param.key: param for param in parse_space([], space)}
    from_flags = {param.key: param for param in parse_space(
        ["train.learning_rate=loguniform:1e-4:1e-2", "train.schedule=choice:cosine,wsd", "model.n_layers=int:2:6:2"])}
    assert from_file == from_flags
    assert from_file["model.n_layers"].grid_values() == [2, 4, 6]
    assert from_file["train.learning_rate"].describe() == "loguniform:0.0001:0.01"


def test_tune_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--help"])
    assert exit_info.value.code == 0 and "loguniform:LOW:HIGH" in capsys.readouterr().out
