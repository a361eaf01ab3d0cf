# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""What every conversion script (`conversion/*.py`) shares: the output options and the exit status, the output
dtype and the tolerance of the checks against the source, the folder checks, writing the converted folder (staged,
re-loaded, verified, then moved into place) and the summary printed at the end."""

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import PreTrainedConfig
from transformers.utils.hub import convert_file_size_to_int

from ..app.model_card import parameter_counts, write_model_card
from ..configuration_sparsemoe_vlm import SparseMoEVLMConfig
from ..modeling_sparsemoe_vlm import ROUTER_CLASSES, SparseMoEVLMForConditionalGeneration


OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def output_dtype(choice: str, source_config: PreTrainedConfig) -> torch.dtype:
    """`--dtype` resolved: `auto` is the dtype the source's config records (its text model's for a composite config
    that records none at the top), float32 where it records none."""
    if choice != "auto":
        return OUTPUT_DTYPES[choice]
    for config in (source_config, getattr(source_config, "text_config", None)):
        dtype = getattr(config, "dtype", None)
        dtype = OUTPUT_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
        if dtype in OUTPUT_DTYPES.values():
            return dtype
    return torch.float32


def logits_tolerance(dtype: torch.dtype, reference_logits: torch.Tensor) -> float:
    """Largest max-abs logit difference that still counts as "the converted model reproduces the source".

    float32: 1e-5. Half precision: the routing constants upcycling relies on (ReLU router bias `1 / E`, shared
    experts' share `1 / (1 + S)`) are not representable in bfloat16 / float16 for most `E` and `S`, so the written
    model reproduces the source up to one rounding step of those constants: 1e-5 plus the dtype's epsilon times
    the largest reference logit."""
    if dtype == torch.float32:
        return 1e-5
    return 1e-5 + torch.finfo(dtype).eps * max(1.0, reference_logits.abs().max().item())


@torch.no_grad()
def round_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Round `model`'s parameters to `dtype` in place, keeping them float32: the reference a checkpoint written in
    `dtype` reproduces exactly. Buffers (rotary frequencies) stay as they are, as they do in a model loaded in
    `dtype`."""
    if dtype != torch.float32:
        for parameter in model.parameters():
            parameter.copy_(parameter.to(dtype))
    return model


def shard_size(value: str) -> int:
    """`--max_shard_size` in bytes: a byte count, or a size as `save_pretrained` reads it (`5GB`, `500MB`, `1GiB`),
    checked when the arguments are parsed rather than after the conversion."""
    try:
        size = int(value) if value.strip().isdigit() else convert_file_size_to_int(value.strip())
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a shard size; use a positive number of bytes or a whole "
                                         f"number with KB, MB, GB (or KiB, MiB, GiB), e.g. 5GB or 500MB")
    return size


def conversion_parser(prog: str, description: str, dtype_help: str) -> argparse.ArgumentParser:
    """The argument parser of a conversion script with the options every script has (`--output`, `--overwrite`,
    `--max_shard_size`, `--per_expert_layout`, `--dtype`, `--model_id`, `--base_model`); the script adds its inputs."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("output")
    group.add_argument("--output", required=True, help="Folder for the converted checkpoint (must be empty).")
    group.add_argument("--overwrite", action="store_true", help="Replace the contents of a non-empty --output.")
    group.add_argument("--max_shard_size", default="5GB", type=shard_size,
                       help="Largest safetensors shard: bytes, or a whole number with KB, MB, GB, KiB, MiB or GiB "
                            "(5GB, 500MB).")
    group.add_argument("--per_expert_layout", action="store_true",
                       help="Write one tensor per expert and projection (experts.<e>.gate_proj.weight, ...) instead "
                            "of the fused expert tensors; both layouts load with from_pretrained.")
    group.add_argument("--dtype", default="auto", choices=("auto", *OUTPUT_DTYPES), help=dtype_help)
    group.add_argument("--model_id", default=None, help="Hub id the model card's snippets use (default: folder name).")
    group.add_argument("--base_model", default=None,
                       help="Hub id of the source checkpoint, recorded as `base_model` in the model card.")
    return parser


def run_conversion_script(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object],
                          argv: list[str] | None = None) -> int:
    """The `main()` of every conversion script: parse `argv`, then `run(args)`; a conversion problem becomes
    `error: ...` on stderr and exit status 1 (nothing has been written by then)."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as error:  # e.g. a full disk mid-write
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def load_source(what: str, folder: str | Path, load: Callable[[], object]):
    """Return `load()`; any failure to read a source checkpoint (truncated or corrupt weights, weights that do not
    fit the folder's config.json, missing tokenizer files) becomes a `ValueError` naming the part and the folder,
    so the scripts report it as an error instead of a traceback."""
    try:
        return load()
    except Exception as error:
        raise ValueError(f"Could not load {what} from {folder}: {type(error).__name__}: {error}. Check that the "
                         f"folder holds a complete checkpoint (re-download or re-save it).") from error


def check_output_dir(output_dir: str | Path, overwrite: bool, sources: dict[str, str | Path | None] | None = None
                     ) -> Path:
    """Refuse (before any work) to write into a non-empty folder unless `overwrite`, into a file path, or over one
    of the `sources` (`{"--input": folder}`): `--overwrite` would otherwise replace the checkpoint being converted.
    Folders left by killed conversions into `output_dir` are cleaned up first."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"Output path {output_dir} is a file; pass a folder.")
    for option, source in (sources or {}).items():
        if source is None:
            continue
        source, output = Path(source).resolve(), output_dir.resolve()
        if output == source or output in source.parents or source in output.parents:
            raise ValueError(f"--output {output_dir} is or contains or lies inside {option} {source}: writing there "
                             f"would overwrite the checkpoint being converted; choose a separate folder.")
    _recover_interrupted_conversions(output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"Output folder {output_dir} is not empty; pass --overwrite to replace its contents or "
                         f"choose another folder.")
    return output_dir


def verification_inputs(config: SparseMoEVLMConfig, batch_size: int = 2, text_len: int = 8, seed: int = 0
                        ) -> dict[str, torch.Tensor]:
    """Deterministic prompts `<bos?> <image tokens> text` with random pixels, to compare converted and source
    models on (text ids avoid the image token)."""
    generator = torch.Generator().manual_seed(seed)
    text_config = config.text_config
    vocab = min(text_config.vocab_size, 32000)
    text = torch.randint(0, vocab, (batch_size, text_len), generator=generator)
    text[text == config.image_token_id] = (config.image_token_id + 1) % vocab
    image = torch.full((batch_size, config.image_seq_length), config.image_token_id)
    input_ids = torch.cat([image, text], dim=1)
    pixel_values = torch.rand(batch_size, 3, config.image_size, config.image_size, generator=generator) * 2 - 1
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}


def parameter_summary(model: SparseMoEVLMForConditionalGeneration, title: str, rows: Sequence[tuple[str, str]] = (),
                      notes: Sequence[str] = ()) -> str:
    """A plain-text table: total / active parameters, experts per group, converted layers, plus `rows`; `notes`
    listed under it."""
    counts = parameter_counts(model)
    text_config = model.config.text_config
    groups = ", ".join(f"{n} {g}" for g, n in text_config.expert_groups.items())
    table = [("total parameters", f"{counts['total']:,}"),
             ("active per text token (decoder)", f"{round(counts['active_per_text_token']):,}"),
             ("active per image token (decoder)", f"{round(counts['active_per_image_token']):,}"),
             ("sparse layers", f"{len(text_config.sparse_layer_indices)} of {text_config.num_hidden_layers}: "
                               f"{text_config.sparse_layer_indices}"),
             ("experts per sparse layer", f"{groups} routed, {text_config.num_shared_experts} shared"),
             ("router", ROUTER_CLASSES[text_config.router_type].describe(text_config)),
             *rows]
    width = max(len(name) for name, _ in table)
    lines = [title, "-" * len(title)] + [f"{name.ljust(width)}  {value}" for name, value in table]
    if notes:
        lines += ["notes:"] + [f"  - {note}" for note in notes]
    return "\n".join(lines)


def _recover_interrupted_conversions(output_dir: Path) -> None:
    """Clean up after conversions into `output_dir` that were killed (their process is gone): a hidden staging
    folder `.<name>.partial-<pid>` is deleted; a previous checkpoint `.<name>.old-<pid>` set aside by an `--overwrite`
    swap is put back when the kill left no `output_dir`, else deleted. A conversion still running into the same
    folder keeps its own."""
    # Matched by exact name, not by glob: a folder named `moe[4]` must not claim what a conversion into `moe4` left.
    left_behind = re.compile(rf"\.{re.escape(output_dir.name)}\.(old|partial)-(\d+)")
    folders = sorted(output_dir.parent.iterdir()) if output_dir.parent.is_dir() else []
    leftovers = [(match.group(1), match.group(2), folder) for folder in folders
                 if (match := left_behind.fullmatch(folder.name))]
    for kind, pid, folder in sorted(leftovers, key=lambda leftover: leftover[0] != "old"):  # set-aside ones first
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:  # another user's live process
            continue
        if kind == "old" and not output_dir.exists():
            print(f"Restoring {output_dir} from {folder}: an interrupted --overwrite (process {pid}) had set it aside.")
            os.replace(folder, output_dir)
        else:
            print(f"Removing {folder}, left by an interrupted conversion (process {pid} is gone).")
            shutil.rmtree(folder, ignore_errors=True)


def write_converted_checkpoint(
    model: SparseMoEVLMForConditionalGeneration,
    processor,
    output_dir: str | Path,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    per_expert_layout: bool = False,
    card_kwargs: dict | None = None,
    conversion_info: dict | None = None,
    verify: Callable[[SparseMoEVLMForConditionalGeneration], None] | None = None,
) -> Path:
    """Save `model` + `processor` + model card (+ `conversion.json`) so that a finished folder is always complete:
    everything is written to a hidden sibling folder, re-loaded from disk (in the model's dtype) and checked (the
    re-loaded weights must equal the in-memory ones bit for bit, a float32 model must give the same logits up to
    float rounding, and `verify(reloaded)` must pass), and only then moved into place.
    An interruption leaves at most the hidden `.<name>.partial-<pid>` folder (and, killed mid `--overwrite` swap,
    the previous checkpoint set aside as `.<name>.old-<pid>`), never a checkpoint that looks complete; the next
    conversion into the same folder cleans both up. A failed check raises and removes the staging folder."""
    output_dir = check_output_dir(output_dir, overwrite).resolve()
    staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size, save_original_format=per_expert_layout)
        processor.save_pretrained(staging)
        if conversion_info is not None:
            (staging / "conversion.json").write_text(json.dumps(conversion_info, indent=2, default=str))
        write_model_card(model, staging, run_dir=None, **(card_kwargs or {}))
        reloaded = SparseMoEVLMForConditionalGeneration.from_pretrained(staging, dtype=model.dtype).eval()
        written, converted = reloaded.state_dict(), model.state_dict()
        differing = sorted(k for k in converted.keys() | written.keys()
                           if k not in written or k not in converted or not torch.equal(written[k], converted[k]))
        if differing:
            raise RuntimeError(f"The written checkpoint does not hold the converted weights ({len(differing)} "
                               f"tensors differ or are missing, e.g. {differing[:3]}); nothing was written to "
                               f"{output_dir}.")
        if model.dtype == torch.float32:  # half-precision logits depend on kernel paths; the weights are checked
            inputs = verification_inputs(model.config)
            with torch.no_grad():
                expected, actual = model.eval()(**inputs).logits, reloaded(**inputs).logits
            # Memory-mapped weights can take other CPU kernel paths: allow float rounding, nothing more.
            if not torch.allclose(expected, actual, rtol=1e-5, atol=1e-5):
                raise RuntimeError(f"The written checkpoint does not reproduce the converted model (max abs logit "
                                   f"difference {(expected - actual).abs().max().item():.3g}); nothing was written "
                                   f"to {output_dir}.")
        if verify is not None:
            verify(reloaded)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output_dir.exists():  # --overwrite: swap the folders, then drop the old one
        old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
        os.replace(output_dir, old)
        os.replace(staging, output_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, output_dir)
    return output_dir


def finish_conversion(model: SparseMoEVLMForConditionalGeneration, processor, args: argparse.Namespace, *,
                      title: str, rows: Sequence[tuple[str, str]], conversion: str, conversion_info: dict,
                      started: float,
                      verify: Callable[[SparseMoEVLMForConditionalGeneration], dict[str, str]] | None = None,
                      notes: Sequence[str] = (), quiet: bool = False) -> str:
    """The tail of every conversion script: write the folder as the output options in `args` say
    (`write_converted_checkpoint`, with the model card and `conversion.json`; `verify(reloaded)` checks the written
    model against the source and returns its figures), then print the summary table (and return it) once the
    written checkpoint has passed its checks."""
    checks: dict[str, str] = {}

    def verify_and_record(reloaded: SparseMoEVLMForConditionalGeneration) -> None:
        checks.update(verify(reloaded))

    output_dir = write_converted_checkpoint(
        model, processor, args.output, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
        per_expert_layout=args.per_expert_layout, verify=verify_and_record if verify is not None else None,
        card_kwargs={"model_id": args.model_id or Path(args.output).resolve().name, "base_model": args.base_model,
                     "conversion": conversion},
        conversion_info=conversion_info)
    summary = parameter_summary(model, title, [
        *rows,
        *checks.items(),
        ("written checkpoint", f"{output_dir} (re-loaded: weights identical"
                               + (", logits within 1e-5)" if model.dtype == torch.float32 else ")")),
        ("dtype", str(model.dtype).removeprefix("torch.")),
        ("layout", "per-expert tensors" if args.per_expert_layout else "fused expert tensors"),
        ("time", f"{time.time() - started:.1f} s"),
    ], notes)
    if not quiet:
        print(summary)
    return summary


__all__ = [
    "OUTPUT_DTYPES",
    "check_output_dir",
    "conversion_parser",
    "finish_conversion",
    "load_source",
    "logits_tolerance",
    "output_dtype",
    "parameter_summary",
    "round_parameters",
    "run_conversion_script",
    "verification_inputs",
    "write_converted_checkpoint",
]
