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
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_weights_into

from lmforge.artifacts import atomic_write_json, file_sha256, read_json
from lmforge.errors import LmforgeError
from lmforge.models.decoder import Decoder, DecoderConfig

CHECKPOINT_FORMAT = 1
COMMIT_MARKER = "manifest.json"
LATEST_POINTER = "latest.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"state.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(
    root: Path,
    step: int,
    model: Decoder,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict,
    tokenizer_dir: Path,
    keep: int,
) -> Path:
    """Write and commit ``root/step_N``; then prune to the newest ``keep`` committed checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    staging = root / f".{checkpoint_name(step)}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    save_model(model, str(staging / "model.safetensors"))
    atomic_write_json(staging / "config.json", {"format_version": CHECKPOINT_FORMAT, "architecture": "decoder", "model": model.config.to_dict()})
    shutil.copytree(tokenizer_dir, staging / "tokenizer")
    if optimizer is not None:
        tensors, param_groups = _optimizer_tensors(optimizer)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(staging / "optimizer.safetensors"))
        trainer_state = {**trainer_state, "optimizer_param_groups": param_groups}
    state = {**trainer_state, "step": step, "torch_rng_state": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    atomic_write_json(staging / "trainer_state.json", state)
    _fsync_tree(staging)
    files = {str(p.relative_to(staging)): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    atomic_write_json(staging / COMMIT_MARKER, {"format_version": CHECKPOINT_FORMAT, "stage": "checkpoint", "step": step, "files": files,
                                                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if final.exists():  # re-saving a step: move the old copy aside so a crash here never leaves neither
        replaced = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, replaced)
        os.replace(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staging, final)
    atomic_write_json(root / LATEST_POINTER, {"step": step, "path": final.name})
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    committed = list_checkpoints(root)
    for old in committed[:-keep]:
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
    if manifest.get("format_version") != CHECKPOINT_FORMAT:
        raise LmforgeError(f"checkpoint {folder} has format {manifest.get('format_version')}, this lmforge reads {CHECKPOINT_FORMAT}")
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


def read_model_config(folder: Path) -> DecoderConfig:
    config = read_json(Path(folder) / "config.json", what="model config")
    if config.get("architecture") != "decoder":
        raise LmforgeError(f"{folder}/config.json describes a `{config.get('architecture')}` model; expected `decoder`")
    try:
        return DecoderConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LmforgeError(f"{folder}/config.json is not a valid model config: {exc}") from None


def load_model(folder: Path, device: str | torch.device = "cpu") -> Decoder:
    """Build the model a checkpoint describes and load its weights (the checkpoint is verified first)."""
    folder = Path(folder)
    verify_checkpoint(folder)
    model = Decoder(read_model_config(folder))
    missing, unexpected = load_weights_into(model, str(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise LmforgeError(f"{folder}/model.safetensors does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device)


def load_training_state(folder: Path, model: Decoder, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG from a verified checkpoint; return the trainer state."""
    folder = Path(folder)
    verify_checkpoint(folder)
    saved = read_model_config(folder)
    if saved != model.config:
        differences = {k: (v, getattr(model.config, k)) for k, v in saved.to_dict().items() if getattr(model.config, k) != v}
        detail = ", ".join(f"{k}: checkpoint {a} vs recipe {b}" for k, (a, b) in differences.items())
        raise LmforgeError(f"checkpoint {folder} was trained with a different model config ({detail}); use a new run name or --fresh")
    device = next(model.parameters()).device
    load_weights_into(model, str(folder / "model.safetensors"), strict=True, device=str(device))
    state = read_json(folder / "trainer_state.json", what="trainer state")
    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    _restore_optimizer(optimizer, tensors, state.pop("optimizer_param_groups"))
    rng = base64.b64decode(state.pop("torch_rng_state"))
    torch.set_rng_state(torch.frombuffer(bytearray(rng), dtype=torch.uint8))
    return state
