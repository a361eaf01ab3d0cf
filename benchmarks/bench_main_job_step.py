"""What one training step of the main job costs for each decoder variant, side by side on this machine.

    python benchmarks/bench_main_job_step.py --threads 2 \
        --variants default h8x32=num_attention_heads=8,num_key_value_heads=8,head_dim=32 \
                   h8x16=num_attention_heads=8,num_key_value_heads=8,head_dim=16 \
        --dense_variants dense --output benchmarks/results/main_job_step.json

Each variant is a model built as `sparsemoe-vlm train` builds it (the preset, `--config_overrides`, `--dense_baseline`
for the dense ones), vision tower frozen as after stage 0, trained with AdamW on the same main-job batches (batch 32).
All models live in one process and take turns: `--rounds` rounds of `--steps` steps each, so machine drift and noisy
neighbours hit every variant alike. The table gives the median and the spread of a step and the ratio of medians to
the first variant; the JSON adds every round, the thread count, the CPU and the load average before and after. Whole
runs take longer than steps x step time (data, stage 0, evaluation); the ratio is what carries across machines.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_variant(text: str, dense: bool) -> dict:
    name, _, overrides = text.partition("=")
    if not name:
        raise ValueError(f"Variant {text!r}: expected NAME or NAME=key=value,key=value.")
    return {"name": name, "overrides": overrides, "dense": dense}


def build(variant: dict, num_batches: int, batch_size: int):
    """Model, optimizer and `num_batches` training batches of the main job for one variant."""
    from hf_sparsemoe_vlm.app import cli
    from hf_sparsemoe_vlm.app.training import VLMDataCollator, apply_training_stage, assign_prompt_orders

    argv = ["--num_train_examples", str(num_batches * batch_size), "--num_test_examples", "1",
            "--num_validation_examples", "0", "--per_device_train_batch_size", str(batch_size)]
    if variant["overrides"]:
        argv += ["--config_overrides", variant["overrides"]]
    if variant["dense"]:
        argv += ["--dense_baseline", "true"]
    model_args, data_args, training_args = cli.parse_train_args(argv)
    cli.resolve_prompt_order(data_args)
    dataset, _ = cli.load_data(data_args, seed=0)
    torch.manual_seed(0)
    model, processor = cli._build_model_and_processor(model_args, dataset["train"], None)
    apply_training_stage(model, "full", freeze_vision_tower=True)  # frozen after stage 0, as in `train`
    model.train()
    collator = VLMDataCollator(processor, prompt_order=data_args.prompt_order, seed=0)
    rows = assign_prompt_orders(dataset["train"], seed=0)
    batches = [collator([rows[i] for i in range(start, start + batch_size)])
               for start in range(0, num_batches * batch_size, batch_size)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=training_args.learning_rate)
    return model, optimizer, batches


def train_step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["default"],
                        help="NAME or NAME=key=value,... (the decoder settings of `train --config_overrides`).")
    parser.add_argument("--dense_variants", nargs="*", default=["dense"],
                        help="The same, built as `train --dense_baseline true`.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="Steps per variant and round.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if min(args.threads, args.rounds, args.steps, args.batches, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--threads, --rounds, --steps, --batches and --batch_size must be >= 1, --warmup >= 0.")
    variants = ([parse_variant(v, dense=False) for v in args.variants]
                + [parse_variant(v, dense=True) for v in args.dense_variants])
    if len({v["name"] for v in variants}) != len(variants):
        parser.error("Variant names must differ.")
    threads_before = torch.get_num_threads()  # restored at the end: `main` is also called in-process (tests)
    torch.set_num_threads(args.threads)
    try:
        return _measure(args, variants, argv)
    finally:
        torch.set_num_threads(threads_before)


def _measure(args, variants: list[dict], argv: list[str] | None) -> dict:
    built = {v["name"]: build(v, args.batches, args.batch_size) for v in variants}
    for model, optimizer, batches in built.values():
        for step in range(args.warmup):
            train_step(model, optimizer, batches[step % len(batches)])
    load_before = os.getloadavg()[0]
    rounds: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (model, optimizer, batches) in built.items():
            started = time.perf_counter()
            for step in range(args.steps):
                train_step(model, optimizer, batches[step % len(batches)])
            rounds[name].append(1000 * (time.perf_counter() - started) / args.steps)
    load_after = os.getloadavg()[0]

    first = statistics.median(rounds[variants[0]["name"]])
    results = {}
    print(f"\nthreads {args.threads}, CPU {torch.backends.cpu.get_cpu_capability()}, load average "
          f"{load_before:.2f} -> {load_after:.2f}; {args.rounds} rounds x {args.steps} steps, batch {args.batch_size}")
    print("| variant | decoder settings | parameters | ms per step (median) | quartiles | ratio to "
          f"{variants[0]['name']} |\n| --- | --- | --- | --- | --- | --- |")
    for variant in variants:
        times = rounds[variant["name"]]
        median = statistics.median(times)
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [median, median, median]
        model = built[variant["name"]][0]
        results[variant["name"]] = {**variant, "parameters": model.num_parameters(), "ms_per_step": times,
                                    "median_ms": median, "ratio": median / first}
        settings = variant["overrides"] or "preset"
        settings += " (dense baseline)" if variant["dense"] else ""
        print(f"| {variant['name']} | {settings} | {model.num_parameters():,} | {median:.1f} | "
              f"{quartiles[0]:.1f}-{quartiles[2]:.1f} | {median / first:.2f} |")
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_after,
              "rounds": args.rounds, "steps_per_round": args.steps, "batch_size": args.batch_size,
              "variants": results}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
