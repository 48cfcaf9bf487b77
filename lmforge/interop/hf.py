"""Export a checkpoint as a Hugging Face ``LlamaForCausalLM`` folder that loads with no custom code.

Our parameter names are Llama's and our RoPE uses Llama's half-split layout, so the weights are saved
as they are. What this module adds is the Llama ``config.json``, a ``generation_config.json``, the
tokenizer files and a model card. ``transformers`` is never imported here: the folder is plain files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from lmforge.artifacts import MANIFEST_NAME, atomic_write_json, atomic_write_text, fingerprint, read_json, write_manifest
from lmforge.errors import LmforgeError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tokenizer.bpe import Tokenizer
from lmforge.training.checkpoint import COMMIT_MARKER, load_model, resolve_checkpoint

STAGE = "export"


def hf_config_dict(config: DecoderConfig, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                   dtype: str = "float32") -> dict:
    """The ``config.json`` of a ``LlamaForCausalLM`` with exactly this shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        # transformers >= 5 reads rope_parameters; 4.x and other Llama readers (vLLM, llama.cpp's converter)
        # read the flat rope_theta with a null rope_scaling. Both say plain RoPE with our base.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        # A squared-ReLU MLP is Llama's gated MLP with act relu and gate = up: relu(u) * u == relu(u)^2.
        "hidden_act": "silu" if config.mlp == "swiglu" else "relu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
        # dtype is the transformers 5 key, torch_dtype the 4.x one; with dtype="auto" both load as stored.
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def export_hf(checkpoint_or_run: Path, out_dir: Path) -> Path:
    """Write a verified checkpoint (or a run's latest) to ``out_dir`` for ``transformers``; return ``out_dir``.

    The folder is built next to ``out_dir`` and renamed into place, replacing an earlier export there.
    """
    out_dir = Path(out_dir)
    _check_destination(out_dir)
    checkpoint = resolve_checkpoint(checkpoint_or_run)
    model = load_model(checkpoint)
    if model.config.qk_norm:
        raise LmforgeError(f"checkpoint {checkpoint} uses model.qk_norm, which LlamaForCausalLM does not have; "
                           "export supports models trained without it")
    tokenizer = Tokenizer.load(checkpoint / "tokenizer")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LmforgeError(f"checkpoint {checkpoint} has a tokenizer of {tokenizer.vocab_size} tokens but a model of only "
                           f"{model.config.vocab_size}")
    trainer_state = read_json(checkpoint / "trainer_state.json", what="trainer state")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_export(staging, checkpoint, model, tokenizer, trainer_state)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():  # move the old export aside first, so a crash never leaves neither
        replaced = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, replaced)
        os.replace(staging, out_dir)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
    return out_dir


def _check_destination(out_dir: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier export: replacing deletes it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LmforgeError(f"export destination {out_dir} is a file; give a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        try:
            is_export = read_json(out_dir / MANIFEST_NAME, what="export manifest").get("stage") == STAGE
        except (LmforgeError, AttributeError):
            is_export = False
        if not is_export:
            raise LmforgeError(f"export destination {out_dir} is a non-empty folder that is not an lmforge export; "
                               "give a new or empty folder")


def _write_export(folder: Path, checkpoint: Path, model: Decoder, tokenizer: Tokenizer, trainer_state: dict) -> None:
    config = model.config
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if config.tie_embeddings:
        # transformers ties lm_head to embed_tokens when loading; safetensors cannot store a shared tensor twice.
        del weights["lm_head.weight"]
    if config.mlp == "relu2":
        for name in [n for n in weights if n.endswith("mlp.up_proj.weight")]:
            weights[name.replace("up_proj", "gate_proj")] = weights[name].clone()
    dtype = str(weights["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    atomic_write_json(folder / "config.json", hf_config_dict(config, **ids, dtype=dtype))
    # No max_length: transformers warns on every generate(max_new_tokens=...) when both are set.
    atomic_write_json(folder / "generation_config.json", ids)
    tokenizer.save(folder, model_max_length=config.context_length)
    atomic_write_text(folder / "README.md", _model_card(checkpoint, model, tokenizer, trainer_state))

    checkpoint_manifest = read_json(checkpoint / COMMIT_MARKER, what="checkpoint manifest")
    stats = {"source": str(checkpoint), "step": trainer_state.get("step"), "tokens_seen": trainer_state.get("tokens_seen"),
             "parameters": model.num_parameters()}
    write_manifest(folder, STAGE, {"format": "hf"}, {"checkpoint": fingerprint(checkpoint_manifest["files"])}, stats)
    # Atomic writes and safetensors create files only their owner can read; an export is made to be shared.
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _model_card(checkpoint: Path, model: Decoder, tokenizer: Tokenizer, trainer_state: dict) -> str:
    config = model.config
    tokens_seen = trainer_state.get("tokens_seen")
    trained = f"{trainer_state.get('step')} optimizer steps" + (f", {tokens_seen:,} tokens" if tokens_seen is not None else "")
    heads = f"{config.n_heads} query heads, {config.n_kv_heads} key/value heads of size {config.head_dim}"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [lmforge, llama]
---

# lmforge model ({checkpoint.name})

A decoder-only language model trained from scratch with lmforge, exported as a plain `LlamaForCausalLM`.

| | |
| --- | --- |
| architecture | Llama: RMSNorm, rotary positions (theta {config.rope_theta:g}), grouped-query attention, SwiGLU MLP |
| parameters | {model.num_parameters():,} ({model.num_parameters(include_embeddings=False):,} without embeddings) |
| layers / width | {config.n_layers} / {config.d_model}, MLP hidden {config.ffn_hidden} |
| attention | {heads} |
| context length | {config.context_length} tokens |
| vocabulary | {tokenizer.vocab_size} byte-level BPE tokens (model rows: {config.vocab_size}); embeddings {"tied" if config.tie_embeddings else "untied"} |
| training | {trained} |

## Loading

The model was trained on documents that start with `<|bos|>`, and the tokenizer adds no special
tokens by itself, so put BOS in front of a prompt:

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode("The json module")])
out = model.generate(ids, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=50)
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
```
"""
