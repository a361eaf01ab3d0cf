#!/usr/bin/env python
# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Make a SparseMoE-VLM checkpoint smaller by removing the experts its routers use least.

Routing statistics come from calibration data (any dataset `sparsemoe-vlm train` reads; by default rows of the
embedded synthetic set): per sparse layer and expert group, the tokens each expert served, its routing mass and the
similarity of the experts' router logits. Every group then keeps its `--keep` most used experts (a fraction of the
group, or a count per group: `text=2,image=1`), and the others are
  - pruned (`--method prune`): dropped with their router rows;
  - merged (`--method merge`): folded into the kept expert whose router logits are most similar, the weights
    averaged by the tokens each expert served (MC-SMoE's usage-weighted merging), after lining up the dropped
    expert's hidden units with the kept expert's (a permutation and sign flips that leave its function unchanged).
Optionally (`--distill_steps N`) the compressed model is then fine-tuned for N steps towards the original's
next-token distributions on the calibration batches, which recovers most of what the removal cost.
The result is a normal checkpoint with fewer experts per group (the config says how many), its processor and a model
card naming the base model, the method, the calibration data and the experts kept. Like every conversion script it
checks its inputs first, writes to a hidden staging folder, re-loads and checks the written model, then moves it
into place. With top-k routing (renormalised weights) or ReLU routing, pruning experts the calibration tokens never
used leaves the outputs on those tokens unchanged (before any distillation); the summary reports the calibration rows that used no removed
expert and the largest logit change on them.

Example:
    python conversion/compress_experts.py --input runs/sparsemoe-vlm-tiny --output runs/tiny-half \\
        --method merge --keep 0.5 --calibration_rows 512
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, SparseMoEVLMProcessor
from hf_sparsemoe_vlm.app.cli import DataArguments, load_data
from hf_sparsemoe_vlm.app.training import VLMDataCollator
from hf_sparsemoe_vlm.conversion import scripts
from hf_sparsemoe_vlm.conversion.compression import (
    COMPRESSION_METHODS,
    collect_expert_usage,
    compress_experts,
    distill_compressed_model,
    experts_to_keep,
    model_inputs,
    usage_summary,
)


def keep_argument(value: str) -> float | dict[str, int]:
    """`--keep`: a fraction in (0, 1] of every group (`0.5`), or counts per group (`text=2,image=1`)."""
    try:
        if "=" not in value:
            return float(value)
        counts = {}
        for part in value.split(","):
            group, count = part.split("=")
            counts[group.strip()] = int(count)
        return counts
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a fraction (0.5) or per-group counts (text=2,image=1)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = scripts.conversion_parser("compress_experts.py", __doc__, dtype_help=(
        "dtype of the written weights (auto: the input checkpoint's)."))
    parser.add_argument("--input", required=True, help="A SparseMoE-VLM folder (model + processor).")
    parser.add_argument("--method", choices=COMPRESSION_METHODS, required=True)
    parser.add_argument("--keep", type=keep_argument, required=True,
                        help="Experts each group keeps: a fraction of the group (0.5) or counts (text=2,image=1).")
    parser.add_argument("--num_experts_per_tok", type=int, default=None,
                        help="A new top-k for top-k routers (default: unchanged); needed to keep fewer experts than "
                             "each token uses.")
    group = parser.add_argument_group("calibration data")
    group.add_argument("--calibration_data", default="synthetic",
                       help="Any --dataset of `sparsemoe-vlm train`: synthetic (default), a save_to_disk folder, an "
                            "imagefolder with metadata.jsonl, or a .json/.jsonl file.")
    group.add_argument("--calibration_rows", type=int, default=512, help="Training rows routed (default 512).")
    group.add_argument("--batch_size", type=int, default=32)
    group.add_argument("--seed", type=int, default=0, help="Seed of the synthetic rows / of the row sample.")
    group = parser.add_argument_group("distillation after compression")
    group.add_argument("--distill_steps", type=int, default=0,
                       help="AdamW steps fitting the compressed model's next-token distribution to the original's on "
                            "the calibration batches (KL divergence; no labels needed). Default 0: none.")
    group.add_argument("--distill_learning_rate", type=float, default=1e-4)
    return parser


def calibration_rows(args: argparse.Namespace):
    """`--calibration_rows` rows of the calibration data's training split, and where they come from."""
    if args.calibration_rows <= 0:
        raise ValueError(f"--calibration_rows must be positive, got {args.calibration_rows}.")
    data_args = DataArguments(dataset=args.calibration_data, num_train_examples=args.calibration_rows,
                              num_validation_examples=0, num_test_examples=0, synthetic_seed=args.seed)
    dataset, origins = load_data(data_args, seed=args.seed)
    rows = dataset["train"]
    if len(rows) == 0:
        raise ValueError(f"The calibration data {args.calibration_data} has no training rows.")
    rows = rows.shuffle(seed=args.seed).select(range(min(args.calibration_rows, len(rows))))
    return rows, f"{len(rows)} rows of {args.calibration_data} ({origins['train']})"


def batches(collator: VLMDataCollator, rows, batch_size: int):
    for start in tqdm(range(0, len(rows), batch_size), desc="calibration", unit="batch"):
        yield collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])


def convert(args: argparse.Namespace) -> Path:
    """Collect routing statistics, compress, check and write the folder `args` describe; returns it."""
    started = time.time()
    input_dir = Path(args.input)
    output_dir = scripts.check_output_dir(args.output, args.overwrite, sources={"--input": input_dir})
    if args.distill_steps < 0 or args.distill_learning_rate <= 0:  # before any data or weights are read
        raise ValueError(f"--distill_steps must be >= 0 and --distill_learning_rate positive, got "
                         f"{args.distill_steps} and {args.distill_learning_rate}.")
    if not (input_dir / "config.json").is_file():
        raise ValueError(f"{input_dir} has no config.json; pass a SparseMoE-VLM folder (a `sparsemoe-vlm train` "
                         "output or a converted checkpoint).")
    rows, calibration = calibration_rows(args)
    model = scripts.load_source("the model", input_dir, lambda: SparseMoEVLMForConditionalGeneration.from_pretrained(
        input_dir)).eval()
    processor = scripts.load_source("the processor", input_dir, lambda: SparseMoEVLMProcessor.from_pretrained(
        input_dir))
    collator = VLMDataCollator(processor, seed=args.seed)
    calibration_batches = list(batches(collator, rows, args.batch_size))
    usage = collect_expert_usage(model, calibration_batches)
    kept = experts_to_keep(usage, args.keep)
    compressed = compress_experts(model, usage, args.keep, args.method, args.num_experts_per_tok)
    distillation = None
    if args.distill_steps:
        losses = distill_compressed_model(compressed, model, calibration_batches, args.distill_steps,
                                          args.distill_learning_rate, seed=args.seed)
        distillation = (f"{args.distill_steps} steps at learning rate {args.distill_learning_rate:g}, KL to the "
                        f"original {losses[0]:.4f} -> {losses[-1]:.4f}")
    dtype = scripts.output_dtype(args.dtype, model.config)
    compressed.to(dtype)
    check_batch = collator([rows[i] for i in range(min(args.batch_size, len(rows)))])

    def verify(reloaded) -> dict[str, str]:  # runs on the written checkpoint, before it is moved into place
        return compare_on_calibration(model, reloaded.float(), check_batch, kept)

    before, after = model.num_parameters(), compressed.num_parameters()
    text_config = compressed.config.text_config
    kept_text = ", ".join(f"{group} {count} of {model.config.text_config.expert_groups[group]}"
                          for group, count in text_config.expert_groups.items())
    conversion = (f"expert {'pruning' if args.method == 'prune' else 'merging'} of `{args.base_model or input_dir}` "
                  f"from routing statistics on {calibration}: {kept_text} experts kept per sparse layer"
                  + (f", then distilled from the original on the same data ({distillation})" if distillation else ""))
    summary = usage_summary(usage, kept)
    scripts.finish_conversion(
        compressed, processor, args, title=f"Compressed {input_dir} -> {output_dir} ({args.method})",
        rows=[("experts kept per group", kept_text),
              ("parameters", f"{before:,} -> {after:,} ({after / before:.1%})"),
              ("calibration", calibration),
              *([("distillation", distillation)] if distillation else []),
              ("routing mass kept", ", ".join(f"{name} {entry['kept_mass_share']:.1%}"
                                              for name, entry in summary.items()))],
        conversion=conversion, verify=verify, started=started,
        conversion_info={"base_model": args.base_model or str(input_dir), "method": args.method,
                         "keep": args.keep, "calibration_data": calibration, "experts": summary,
                         "distillation": distillation,
                         "dtype": str(dtype).removeprefix("torch.")})
    return output_dir


@torch.no_grad()
def compare_on_calibration(model, compressed, batch: dict[str, torch.Tensor], kept) -> dict[str, str]:
    """Logits of the compressed model against the original on one calibration batch: over every real token, and
    over the rows none of whose tokens used an expert that was removed (attention mixes a row's tokens, so a row is
    unchanged only when all of it is)."""
    inputs = model_inputs(model, batch)
    original = model(**inputs, output_routing=True)
    seq_len = inputs["input_ids"].shape[1]
    changed = (compressed(**inputs).logits - original.logits).abs().amax(-1)
    real = inputs["attention_mask"].bool()
    untouched = torch.ones(real.shape[0], dtype=torch.bool)
    for record in original.routing:
        removed = torch.ones(record.num_experts, dtype=torch.bool)
        removed[kept[(record.layer_idx, record.group)]] = False
        uses_removed = record.expert_mask[:, removed].any(-1) & record.counted_tokens(real.reshape(-1))
        untouched[record.token_index[uses_removed] // seq_len] = False
    result = {"max abs logit change (calibration batch)": f"{changed[real].max().item():.3g}",
              "calibration rows that used no removed expert": f"{int(untouched.sum())} of {real.shape[0]}"}
    if untouched.any():
        result["max abs logit change on those rows"] = f"{changed[untouched][real[untouched]].max().item():.3g}"
    return result


def main(argv: list[str] | None = None) -> int:
    return scripts.run_conversion_script(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
