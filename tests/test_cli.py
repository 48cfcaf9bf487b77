"""What a user meets at the command line: help, overrides, and one-line errors for their mistakes."""

import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import split_overrides

REPO = Path(__file__).resolve().parents[1]


def lmforge(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], result.stderr


def test_overrides_are_taken_out_before_positional_arguments():
    rest, overrides, problem = split_overrides(["run", "--train.max_steps", "200", "my.yaml", "--model.tie_embeddings=false",
                                                "--data.sources", "[a, b]", "--workdir", "x"])
    assert problem is None and rest == ["run", "my.yaml", "--workdir", "x"]
    assert overrides == {"train.max_steps": 200, "model.tie_embeddings": False, "data.sources": ["a", "b"]}


@pytest.mark.parametrize("command", ["run", "data", "tokenizer", "tokens", "pretrain", "eval", "generate", "export", "recipe",
                                     "logs", "plan", "tune", "judge", "serve", "chat", "finetune"])
def test_every_command_has_help(command):
    result = lmforge(command, "--help")
    assert result.returncode == 0 and "usage: lmforge" in result.stdout


def test_unknown_recipe_key_suggests_the_right_one(tmp_path):
    assert_one_line_error(lmforge("data", "tiny", "--train.max_step", "5", "--workdir", str(tmp_path)),
                          "unknown key `train.max_step`", "did you mean `train.max_steps`")


def test_unknown_key_in_a_recipe_file(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: mine\ndata:\n  source: [docs/]\n")
    assert_one_line_error(lmforge("data", str(recipe), "--workdir", str(tmp_path)), "data.source", "data.sources")


def test_wrong_type_is_reported_with_the_value(tmp_path):
    assert_one_line_error(lmforge("run", "tiny", "--model.n_layers", "many", "--workdir", str(tmp_path)),
                          "model.n_layers", "'many'")


def test_inconsistent_model_shape(tmp_path):
    assert_one_line_error(lmforge("run", "tiny", "--model.d_model", "100", "--model.n_heads", "3", "--workdir", str(tmp_path)),
                          "divisible by n_heads")


def test_missing_recipe_file_and_missing_data_path(tmp_path):
    assert_one_line_error(lmforge("run", str(tmp_path / "nope.yaml")), "recipe file not found")
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: mine\ndata:\n  sources: [no_such_folder/]\n")
    assert_one_line_error(lmforge("run", str(recipe), "--workdir", str(tmp_path)), "data source not found", "no_such_folder")


def test_invalid_yaml(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: [unclosed\n")
    assert_one_line_error(lmforge("run", str(recipe), "--workdir", str(tmp_path)), "not valid YAML")


def test_empty_corpus_after_filtering(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("short\n")
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: mine\ndata:\n  sources: [docs/]\n")
    assert_one_line_error(lmforge("run", str(recipe), "--workdir", str(tmp_path / "runs")), "no documents left")


def test_generate_and_eval_on_a_missing_run(tmp_path):
    assert_one_line_error(lmforge("generate", str(tmp_path / "nothing")), "no such run or checkpoint")
    assert_one_line_error(lmforge("eval", str(tmp_path)), "holds no checkpoint")


def test_recipe_command_prints_resolved_recipe():
    result = lmforge("recipe", "tiny", "--train.max_steps", "7")
    assert result.returncode == 0 and "max_steps: 7" in result.stdout and "name: tiny" in result.stdout


def test_user_recipe_with_relative_sources_runs_end_to_end(tmp_path):
    """The README's worked example: a two-line recipe over a folder of the user's own documents."""
    import pydoc_data.topics

    docs = tmp_path / "project" / "my_docs"
    docs.mkdir(parents=True)
    for index, (name, text) in enumerate(sorted(pydoc_data.topics.topics.items())[:40]):
        (docs / f"{name}.md").write_text(text)
    recipe = tmp_path / "project" / "mydocs.yaml"
    recipe.write_text("name: mydocs\ndata:\n  sources: [my_docs/]\n")
    small = ["--tokenizer.vocab_size", "400", "--model.n_layers", "1", "--model.d_model", "32", "--model.context_length", "32",
             "--train.max_steps", "6", "--train.eval_interval", "3", "--eval.max_batches", "2", "--eval.max_new_tokens", "4"]
    result = lmforge("run", str(recipe), *small, "--workdir", str(tmp_path / "runs"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "evaluation report" in result.stdout
    run = tmp_path / "runs" / "mydocs"
    assert (run / "eval" / "report.json").exists() and (run / "logs" / "loss_curve.png").exists()
    generated = lmforge("generate", str(run), "--prompt", "The ", "--max-new-tokens", "5", "--temperature", "0")
    assert generated.returncode == 0 and generated.stdout.startswith("The ")
    again = lmforge("run", str(recipe), *small, "--workdir", str(tmp_path / "runs"), "--quiet")
    assert again.stderr.count("up to date") == 5
