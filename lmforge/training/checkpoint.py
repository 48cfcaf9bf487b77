"""Checkpoints: self-contained folders, written atomically, verified before they are trusted.

A checkpoint ``checkpoints/step_00001000/`` holds the weights (safetensors), the model config, a copy
of the tokenizer, the optimizer state (safetensors) and the trainer state (JSON) - never pickle. Its
``manifest.json`` lists the SHA-256 of every other file and is written last: it is the commit marker.
The folder is built under a temporary name and renamed into place, older checkpoints are pruned only
after the new one is committed, and ``latest.json`` points at the newest.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.artifacts import atomic_write_json, file_sha256, read_json
from lmforge.errors import LmforgeError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.training.distributed import Ranks

CHECKPOINT_FORMAT = 2  # 2: optimizer state keyed by parameter name (1: by index)
READABLE_FORMATS = (1, 2)  # weights of format 1 still load for eval and export
COMMIT_MARKER = "manifest.json"
LATEST_POINTER = "latest.json"
BEST_POINTER = "best.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _gather_state(model: Decoder, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Full (unsharded) model and optimizer state, keyed by parameter name, on rank 0's CPU.

    torch.distributed.checkpoint's state-dict API gives the same names and full tensors whether the
    model is plain, DDP-replicated or FSDP2-sharded, so a checkpoint resumes on any number of ranks.
    Every rank must call this (it gathers shards); ranks other than 0 get empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, optimizer, options=options)


def _optimizer_tensors(optimizer_state: dict) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, per_param in optimizer_state["state"].items():
        for key, value in per_param.items():
            tensors[f"state.{name}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).contiguous()
    return tensors


def _optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[str, dict] = {}
    for flat, value in tensors.items():
        name, key = flat.removeprefix("state.").rsplit(".", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": param_groups}


def _first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def save_checkpoint(
    root: Path,
    step: int,
    model: Decoder,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict,
    tokenizer_dir: Path,
    keep: int,
    ranks: Ranks | None = None,
    export=None,
) -> Path:
    """Write and commit ``root/step_N``; then prune to the newest ``keep`` committed checkpoints.

    ``export(weights) -> (weights, extra files)``, when given, turns the model's full state dict into
    what ``model.safetensors`` holds (e.g. a LoRA-wrapped model's merged weights) plus files
    ({name: bytes}) stored and hashed with the checkpoint (e.g. the adapter).
    Collective under torchrun: every rank calls it, rank 0 writes. A failure (disk full, a non-finite
    tensor) removes the partial folder and raises on every rank; the previous checkpoints stay intact.
    """
    ranks = ranks or Ranks()
    root = Path(root)
    final = root / checkpoint_name(step)
    weights, optimizer_state = _gather_state(model, optimizer)
    problem = None
    if ranks.is_main:
        try:
            weights, extra_files = export(weights) if export is not None else (weights, {})
            _write_checkpoint(root, final, step, model.config, weights, optimizer_state, trainer_state, tokenizer_dir, keep, extra_files)
        except LmforgeError as exc:
            problem = str(exc)
        except OSError as exc:
            previous = list_checkpoints(root)
            kept = f"; the previous checkpoint {previous[-1].name} is intact" if previous else ""
            problem = f"could not save checkpoint {final.name}: {exc.strerror or exc}{kept}"
    problem = ranks.broadcast(problem)
    if problem:
        raise LmforgeError(problem)
    return final


def _write_checkpoint(root, final, step, model_config, weights, optimizer_state, trainer_state, tokenizer_dir, keep, extra_files) -> None:
    if model_config.tie_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}  # stored once, as the embedding
    optimizer_tensors = _optimizer_tensors(optimizer_state) if optimizer_state is not None else {}
    bad = _first_non_finite(weights) or _first_non_finite(optimizer_tensors)
    if bad:
        raise LmforgeError(f"refusing to save checkpoint {final.name}: `{bad}` holds NaN or Inf")
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, str(staging / "model.safetensors"))
        atomic_write_json(staging / "config.json", {"format_version": CHECKPOINT_FORMAT, "architecture": "decoder", "model": model_config.to_dict()})
        shutil.copytree(tokenizer_dir, staging / "tokenizer")
        state = {**trainer_state, "step": step}
        if optimizer_state is not None:
            save_file(optimizer_tensors, str(staging / "optimizer.safetensors"))
            state["optimizer_param_groups"] = optimizer_state["param_groups"]
        state["torch_rng_state"] = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        atomic_write_json(staging / "trainer_state.json", state)
        for name, data in extra_files.items():
            (staging / name).write_bytes(data)
        _fsync_tree(staging)
        files = {str(p.relative_to(staging)): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        atomic_write_json(staging / COMMIT_MARKER, {"format_version": CHECKPOINT_FORMAT, "stage": "checkpoint", "step": step, "files": files,
                                                     "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # never leave a half-written folder behind
        raise
    if final.exists():  # re-saving a step: move the old copy aside so a crash here never leaves neither
        replaced = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, replaced)
        os.replace(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staging, final)
    atomic_write_json(root / LATEST_POINTER, {"step": step, "path": final.name})
    _prune(root, keep)


def mark_best(root: Path, checkpoint: Path, val_loss: float) -> None:
    """Point ``best.json`` at ``checkpoint``; pruning never removes the folder it names."""
    atomic_write_json(Path(root) / BEST_POINTER, {"path": Path(checkpoint).name, "val_loss": val_loss})


def best_checkpoint(root: Path) -> Path | None:
    pointer = Path(root) / BEST_POINTER
    if not pointer.exists():
        return None
    path = Path(root) / read_json(pointer, what="best-checkpoint pointer").get("path", "")
    return path if path.is_dir() else None


def _prune(root: Path, keep: int) -> None:
    committed = list_checkpoints(root)
    best = best_checkpoint(root)
    for old in committed[:-keep]:
        if best is None or old.name != best.name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".step_*.tmp-*"), *root.glob(".step_*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint folders (commit marker present), oldest first. Not yet verified."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / COMMIT_MARKER).exists())


# Folders this process has hashed, with the (size, mtime) of each file then: finding a checkpoint and
# loading it both verify, and re-hashing unchanged files would read every weight twice.
_verified: dict[Path, tuple[dict, tuple]] = {}


def _file_stamps(folder: Path, manifest: dict) -> tuple:
    stamps = []
    for relative in sorted(manifest["files"]) + [COMMIT_MARKER]:
        stat = (folder / relative).stat()
        stamps.append((relative, stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def verify_checkpoint(folder: Path) -> dict:
    """Check the commit marker and every file's hash; return the manifest or raise naming the bad file."""
    folder = Path(folder)
    cached = _verified.get(folder.resolve())
    if cached is not None:
        manifest, stamps = cached
        try:
            if _file_stamps(folder, manifest) == stamps:
                return manifest
        except OSError:
            pass  # a file vanished: the full check below names it
    marker = folder / COMMIT_MARKER
    if not marker.exists():
        raise LmforgeError(f"checkpoint {folder} is incomplete: no {COMMIT_MARKER} (it was interrupted while being written)")
    manifest = read_json(marker, what="checkpoint manifest")
    if manifest.get("stage") != "checkpoint" or "files" not in manifest:
        raise LmforgeError(f"{marker} is not a checkpoint manifest")
    if manifest.get("format_version") not in READABLE_FORMATS:
        raise LmforgeError(f"checkpoint {folder} has format {manifest.get('format_version')}, this lmforge reads {READABLE_FORMATS}")
    for relative, expected in manifest["files"].items():
        path = folder / relative
        if not path.is_file():
            raise LmforgeError(f"checkpoint file missing: {path}")
        if file_sha256(path) != expected:
            raise LmforgeError(f"checkpoint file corrupted (SHA-256 mismatch): {path}")
    _verified[folder.resolve()] = (manifest, _file_stamps(folder, manifest))
    return manifest


def latest_valid_checkpoint(root: Path, warn=True) -> Path | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported and passed over."""
    for candidate in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(candidate)
            return candidate
        except LmforgeError as exc:
            if warn:
                print(f"warning: skipping {exc}", file=sys.stderr)
    return None


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint folder, a run's checkpoints/ folder or a run folder; return a verified checkpoint."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"no such run or checkpoint: {path}")
    if (path / COMMIT_MARKER).exists() and (path / "model.safetensors").exists():
        verify_checkpoint(path)
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir() and any(root.glob("step_*")):
            pointer = root / LATEST_POINTER
            if pointer.exists():
                candidate = root / read_json(pointer, what="latest-checkpoint pointer").get("path", "")
                if candidate.is_dir():
                    verify_checkpoint(candidate)
                    return candidate
            found = latest_valid_checkpoint(root)
            if found is not None:
                return found
            raise LmforgeError(f"no valid checkpoint in {root}")
    raise LmforgeError(f"{path} holds no checkpoint (train one with `lmforge pretrain` or `lmforge run`)")


FINETUNED_DIR = "sft"  # RUN/sft/checkpoints/ holds the chat fine-tuned model (lmforge finetune sft)


def resolve_chat_checkpoint(path: Path) -> tuple[Path, bool]:
    """(checkpoint, is_finetuned) for serving and chat: a run's fine-tuned assistant when it has one.

    A checkpoint folder is taken as given; a run folder gives RUN/sft/checkpoints' latest valid
    checkpoint, else the pretrained one (a base model, which continues text rather than answers).
    """
    path = Path(path)
    finetuned_root = path / FINETUNED_DIR / "checkpoints"
    if finetuned_root.is_dir():
        found = latest_valid_checkpoint(finetuned_root)
        if found is not None:
            return found, True
    checkpoint = resolve_checkpoint(path)
    return checkpoint, is_finetuned_checkpoint(checkpoint)


def is_finetuned_checkpoint(checkpoint: Path) -> bool:
    """Whether a checkpoint folder is one of a run's chat fine-tuned ones (RUN/sft/checkpoints/step_N)."""
    return Path(checkpoint).parent.parent.name == FINETUNED_DIR


def read_model_config(folder: Path) -> DecoderConfig:
    config = read_json(Path(folder) / "config.json", what="model config")
    if config.get("architecture") != "decoder":
        raise LmforgeError(f"{folder}/config.json describes a `{config.get('architecture')}` model; expected `decoder`")
    try:
        return DecoderConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LmforgeError(f"{folder}/config.json is not a valid model config: {exc}") from None


def _read_weights(folder: Path, config: DecoderConfig) -> dict[str, torch.Tensor]:
    """The weights file as a full state dict: a tied embedding is stored once, under either name."""
    weights = load_file(str(folder / "model.safetensors"))
    if config.tie_embeddings:
        shared = weights.get("model.embed_tokens.weight", weights.get("lm_head.weight"))
        if shared is not None:
            weights["model.embed_tokens.weight"] = weights["lm_head.weight"] = shared
    return weights


def load_model(folder: Path, device: str | torch.device = "cpu") -> Decoder:
    """Build the model a checkpoint describes and load its weights (the checkpoint is verified first).

    A fine-tuned checkpoint whose LoRA adapter was kept apart (``adapter.safetensors``) gets it added
    to its weights here, so every user of the model sees the fine-tuned one.
    """
    from lmforge.finetune.lora import apply_saved_adapter

    folder = Path(folder)
    verify_checkpoint(folder)
    model = Decoder(read_model_config(folder))
    weights = _read_weights(folder, model.config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise LmforgeError(f"{folder}/model.safetensors does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    apply_saved_adapter(model, folder)
    return model.to(device)


def load_training_state(folder: Path | None, model: Decoder, optimizer: torch.optim.Optimizer, ranks: Ranks | None = None,
                        weights_of=None) -> dict:
    """Restore weights, optimizer and RNG from a checkpoint; return the trainer state.

    ``weights_of(folder)``, when given, supplies the model's full state dict instead of the checkpoint's
    ``model.safetensors`` (e.g. base weights plus a LoRA adapter stored beside them).
    Collective under torchrun: rank 0 verifies and reads ``folder`` (other ranks may pass None) and
    the full state is broadcast and resharded onto however many ranks this run has.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    ranks = ranks or Ranks()
    weights, optimizer_state, state, problem = {}, {}, None, None
    if ranks.is_main:
        try:
            weights, optimizer_state, state = _read_training_state(Path(folder), model, weights_of)
        except LmforgeError as exc:
            problem = str(exc)
    problem, state = ranks.broadcast((problem, state))
    if problem:
        raise LmforgeError(problem)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=ranks.distributed, strict=True)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state, options=options)
    rng = base64.b64decode(state.pop("torch_rng_state"))
    torch.set_rng_state(torch.frombuffer(bytearray(rng), dtype=torch.uint8))
    return state


def _read_training_state(folder: Path, model: Decoder, weights_of=None) -> tuple[dict, dict, dict]:
    manifest = verify_checkpoint(folder)
    if manifest.get("format_version") != CHECKPOINT_FORMAT:
        raise LmforgeError(f"checkpoint {folder} was written by an older lmforge (format {manifest.get('format_version')}); "
                           "it can be evaluated and exported but not resumed: train with --fresh")
    saved = read_model_config(folder)
    if saved != model.config:
        differences = {k: (v, getattr(model.config, k)) for k, v in saved.to_dict().items() if getattr(model.config, k) != v}
        detail = ", ".join(f"{k}: checkpoint {a} vs recipe {b}" for k, (a, b) in differences.items())
        raise LmforgeError(f"checkpoint {folder} was trained with a different model config ({detail}); use a new run name or --fresh")
    weights = _read_weights(folder, saved) if weights_of is None else weights_of(folder)
    state = read_json(folder / "trainer_state.json", what="trainer state")
    optimizer_state = _optimizer_state(load_file(str(folder / "optimizer.safetensors")), state.pop("optimizer_param_groups"))
    return weights, optimizer_state, state
