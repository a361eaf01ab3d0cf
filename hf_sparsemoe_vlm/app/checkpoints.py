# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Checkpoints of `sparsemoe-vlm train`: which one `--resume_from_checkpoint last` picks, whether one was completely
written, which run wrote it, and the routing counts kept in it for the expert-load plot."""

import json
import re
import struct
import uuid
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


# Written in the output folder when a run starts (not when it resumes) and into each of its checkpoints: which run a
# checkpoint belongs to.
RUN_FILE = "sparsemoe_run.json"
# Per checkpoint: the routing counts (tokens per expert, per group and sparse layer) of the steps up to it.
EXPERT_LOAD_FILE = "expert_load.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
# Written with torch.save (zip archives) by the Trainer next to the weights.
TORCH_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoints(folder: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of `folder`, highest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (match := _CHECKPOINT.match(path.name))]
    return [path for _, path in sorted(found, reverse=True)]


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (its header names where the last tensor ends), or None."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            if header_size > size - 8:
                raise ValueError
            header = json.loads(file.read(header_size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} is truncated or corrupt (unreadable header, {size:,} bytes)"
    if 8 + header_size + end != size:
        return f"{path.name} is truncated or corrupt ({size:,} bytes, its header describes {8 + header_size + end:,})"
    return None


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a complete checkpoint to resume from (naming the file), or None. The Trainer writes the
    weights, then the optimizer, scheduler and RNG states, and `trainer_state.json` last: a checkpoint killed while
    being written lacks that file or has a truncated one."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    state = folder / TRAINER_STATE_FILE
    if not state.is_file():
        return f"{TRAINER_STATE_FILE} is missing (the checkpoint was not completely written)"
    try:
        json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE_FILE} is truncated or corrupt"
    weights = sorted(folder.glob("*.safetensors"))
    index = next(folder.glob("*.safetensors.index.json"), None)
    if index is not None:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is truncated or corrupt"
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            return f"{missing[0]} is missing ({index.name} lists it)"
    if not any(path.name != EXPERT_LOAD_FILE for path in weights) and not (folder / "pytorch_model.bin").is_file():
        return "it holds no model weights (model.safetensors is missing)"
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            return problem
    for name in TORCH_STATE_FILES:
        path = folder / name
        if path.is_file():
            try:
                with zipfile.ZipFile(path):  # torch.save writes a zip archive; its directory is at the very end
                    pass
            except (zipfile.BadZipFile, OSError):
                return f"{name} is truncated or corrupt ({path.stat().st_size:,} bytes)"
    return None


def read_run_id(folder: str | Path) -> str | None:
    """The id of the run recorded in `folder` (an output folder or a checkpoint), or None."""
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_run_file(folder: str | Path, run_id: str | None = None) -> str:
    """Record a run (a new id unless `run_id`) in `folder`; returns the id."""
    run_id = run_id or uuid.uuid4().hex
    path = Path(folder) / RUN_FILE
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({"run_id": run_id}))
    temporary.replace(path)
    return run_id


def find_last_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The checkpoint `--resume_from_checkpoint last` resumes: the highest-step checkpoint of `output_dir` that is
    complete and belongs to the run recorded in the folder (when one is). Returns it (None if there is none) and a
    line per checkpoint passed over, saying why."""
    run_id = read_run_id(output_dir)
    skipped = []
    for path in checkpoints(output_dir):
        if run_id is not None and read_run_id(path) != run_id:
            skipped.append(f"{path.name}: written by another run than the one last started in {output_dir}")
            continue
        problem = checkpoint_problem(path)
        if problem:
            skipped.append(f"{path.name}: incomplete, {problem}")
            continue
        return path, skipped
    return None, skipped


def save_expert_load(folder: str | Path, expert_load: dict[str, torch.Tensor]) -> None:
    """Keep the routing counts (tokens per expert) in a checkpoint folder."""
    if expert_load:
        save_file({group: counts.contiguous() for group, counts in expert_load.items()},
                  str(Path(folder) / EXPERT_LOAD_FILE))


def load_expert_load(folder: str | Path) -> dict[str, torch.Tensor] | None:
    """The routing counts kept in a checkpoint, or None when it has none (written before they were kept)."""
    path = Path(folder) / EXPERT_LOAD_FILE
    return dict(load_file(str(path))) if path.is_file() else None
