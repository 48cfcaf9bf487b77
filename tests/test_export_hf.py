"""Export to Hugging Face: a real tiny checkpoint must load in plain transformers and behave identically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.config import DataConfig, TokenizerConfig, TrainConfig
from lmforge.data.stage import build_corpus
from lmforge.errors import LmforgeError
from lmforge.inference.generate import SamplingParams, generate
from lmforge.interop.hf import export_hf
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tokenizer import Tokenizer, encode_corpus, load_tokens, train_tokenizer
from lmforge.training.batches import TrainBatches
from lmforge.training.checkpoint import load_model, save_checkpoint
from lmforge.training.optim import build_optimizer

transformers = pytest.importorskip("transformers")

CONTEXT = 64
TRAIN_STEPS = 40
BATCH_SIZE = 8
# Tied embeddings with grouped-query attention; untied with a single key/value head and a non-default
# RoPE base, so a theta that did not reach transformers would show up as a logits mismatch; and the
# squared-ReLU MLP.
VARIANTS = {
    "tied-gqa": dict(tie_embeddings=True, n_kv_heads=2),
    "untied-mqa-theta": dict(tie_embeddings=False, n_kv_heads=1, rope_theta=500_000.0),
    # Squared ReLU goes out as Llama's gated MLP with a relu gate equal to up (the default recipe's MLP).
    "untied-relu2": dict(tie_embeddings=False, n_kv_heads=4, mlp="relu2"),
}
TEXTS = ["The json module", "def f(x):\n    return x  # ok", "Grüße aus Köln, 中文字符 and emoji 😀👍🏽", "  spaces\tand\ttabs  "]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matmuls this small gain nothing from threads, and OpenMP workers that must wait for cores
    shared with other processes made a training step ~50x slower (1 s instead of 20 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Data, tokenizer and tokens stages on the pydoc topics, as the pipeline builds them."""
    root = tmp_path_factory.mktemp("run")
    build_corpus(DataConfig(sources=["stdlib:topics"], max_doc_chars=4000, val_fraction=0.1), root / "data", progress=False)
    train_tokenizer(TokenizerConfig(vocab_size=512), root / "data", root / "tokenizer", progress=False)
    encode_corpus(root / "data", root / "tokenizer", root / "tokens", progress=False)
    return root


@pytest.fixture(scope="module")
def tokenizer(run_dir) -> Tokenizer:
    return Tokenizer.load(run_dir / "tokenizer")


def train_checkpoint(run_dir: Path, name: str, tokenizer: Tokenizer, **shape) -> Path:
    """Real AdamW steps on real tokens; returns the run's checkpoints/ folder.

    Enough steps that the weights are far from their initialisation: a wrong RoPE base in the export
    then moves logits by ~0.1, not by 1e-4 as it does at step 6.
    """
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=tokenizer.vocab_size, n_layers=2, d_model=64, n_heads=4, ffn_hidden=128,
                           context_length=CONTEXT, **shape)
    model = Decoder(config)
    optimizer = build_optimizer(model, TrainConfig(learning_rate=3e-3), torch.device("cpu"))
    batches = TrainBatches(load_tokens(run_dir / "tokens", "train"), CONTEXT, seed=0)
    for step in range(TRAIN_STEPS):
        inputs, targets = batches.batch(step * BATCH_SIZE, BATCH_SIZE)
        model.loss(inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    root = run_dir / name / "checkpoints"
    state = {"step": TRAIN_STEPS, "tokens_seen": TRAIN_STEPS * BATCH_SIZE * CONTEXT, "samples_seen": TRAIN_STEPS * BATCH_SIZE}
    save_checkpoint(root, TRAIN_STEPS, model, optimizer, state, run_dir / "tokenizer", keep=2)
    return root


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, run_dir, tokenizer):
    """(our model, transformers model, export folder) for one variant."""
    checkpoints = train_checkpoint(run_dir, request.param, tokenizer, **VARIANTS[request.param])
    out = export_hf(checkpoints.parent, run_dir / request.param / "export" / "hf")
    ours = load_model(checkpoints / f"step_{TRAIN_STEPS:08d}").eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    return ours, theirs, out


def real_windows(run_dir: Path, length: int, count: int) -> torch.Tensor:
    tokens = torch.from_numpy(load_tokens(run_dir / "tokens", "val")[: length * count].astype("int64"))
    return tokens.view(count, length)


@pytest.mark.parametrize("length", [CONTEXT, CONTEXT - 3, 5])
def test_transformers_logits_equal_ours(exported, run_dir, length):
    ours, theirs, _ = exported
    input_ids = real_windows(run_dir, length, count=4)
    with torch.no_grad():
        difference = (ours(input_ids) - theirs(input_ids).logits).abs().max().item()
    assert difference < 1e-4


def test_config_is_plain_llama(exported):
    ours, theirs, out = exported
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert theirs.config.rope_parameters == {"rope_type": "default", "rope_theta": ours.config.rope_theta}
    assert theirs.config.num_key_value_heads == ours.config.n_kv_heads
    assert theirs.dtype == torch.float32
    tied = theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    assert tied == ours.config.tie_embeddings
    # A squared-ReLU model goes out with its up matrices duplicated as gates: one extra matrix per layer.
    duplicated_gates = ours.config.n_layers * ours.config.ffn_hidden * ours.config.d_model if ours.config.mlp == "relu2" else 0
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_parameters() + duplicated_gates
    assert config["hidden_act"] == ("silu" if ours.config.mlp == "swiglu" else "relu")


def test_transformers_tokenizer_gives_our_ids(exported, tokenizer):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported[2])
    for text in TEXTS:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
        assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (0, 1, 2)
    assert hf_tokenizer.model_max_length == CONTEXT


def test_greedy_generation_matches_ours(exported, tokenizer):
    ours, theirs, _ = exported
    for prompt in TEXTS[:2]:
        ours_text = "".join(generate(ours, tokenizer, prompt, SamplingParams(max_new_tokens=10, temperature=0)))
        prompt_ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(prompt)]])
        output = theirs.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=10, do_sample=False)
        new_ids = output[0, prompt_ids.shape[1]:].tolist()
        if tokenizer.eos_id in new_ids:  # ours stops before EOS and never yields it
            new_ids = new_ids[: new_ids.index(tokenizer.eos_id)]
        assert ours_text == tokenizer.decode(new_ids)


def test_export_folder_has_the_files_and_a_model_card(exported):
    out = exported[2]
    names = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md"} <= names
    card = (out / "README.md").read_text()
    assert f"{TRAIN_STEPS} optimizer steps" in card
    assert f"{TRAIN_STEPS * BATCH_SIZE * CONTEXT:,} tokens" in card
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1


def test_export_again_replaces_the_previous_export(run_dir, exported):
    out = exported[2]
    (out / "stale.txt").write_text("from an earlier export")
    assert export_hf(run_dir / out.parent.parent.name, out) == out
    assert not (out / "stale.txt").exists()
    assert not list(out.parent.glob(".hf.*")), "no staging folder is left behind"


def test_corrupted_checkpoint_is_refused_naming_the_file(run_dir, exported, tmp_path):
    source = run_dir / exported[2].parent.parent.name / "checkpoints" / f"step_{TRAIN_STEPS:08d}"
    copy = Path(shutil.copytree(source, tmp_path / "step_corrupt"))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match="model.safetensors") as error:
        export_hf(copy, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_user_mistakes_are_one_line_errors(run_dir, exported, tmp_path):
    run = run_dir / exported[2].parent.parent.name
    with pytest.raises(LmforgeError, match="no such run or checkpoint"):
        export_hf(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(LmforgeError, match="is a file"):
        export_hf(run, tmp_path / "a_file")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(LmforgeError, match="not an lmforge export"):
        export_hf(run, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
