"""Expert pruning vs merging on a trained model, side by side in one run: for each share of experts kept and each
method, the parameters, the checkpoint bytes, held-out exact match and caption BLEU (both prompt orders, the main
job's test split) and greedy decode tokens/s as a ratio to the uncompressed model (interleaved repeats, median).
Routing statistics come from calibration rows of the training split (not the test rows scored); the `+ distill`
variants are then fine-tuned towards the uncompressed model's next-token distributions on the same rows.
Prints a markdown table and writes benchmarks/results/expert_compression.json.

    OMP_NUM_THREADS=2 python benchmarks/bench_expert_compression.py --model_dir runs/sparsemoe-vlm-tiny
"""

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, SparseMoEVLMProcessor
from hf_sparsemoe_vlm.app.cli import DataArguments, load_data
from hf_sparsemoe_vlm.app.training import VLMDataCollator, evaluate_answers
from hf_sparsemoe_vlm.conversion.compression import collect_expert_usage, compress_experts, distill_compressed_model


def checkpoint_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def decode_seconds(model, inputs, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--calibration_rows", type=int, default=512)
    parser.add_argument("--test_rows", type=int, default=300)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--distill_steps", type=int, default=300,
                        help="Also every variant distilled from the uncompressed model for this many steps on the "
                             "calibration batches (0: none).")
    parser.add_argument("--distill_learning_rate", type=float, default=1e-4)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "expert_compression.json"))
    args = parser.parse_args()

    model = SparseMoEVLMForConditionalGeneration.from_pretrained(args.model_dir).eval()
    processor = SparseMoEVLMProcessor.from_pretrained(args.model_dir)
    data_args = DataArguments(num_train_examples=args.calibration_rows, num_validation_examples=0,
                              num_test_examples=args.test_rows)
    dataset, _ = load_data(data_args, seed=0)
    collator = VLMDataCollator(processor, seed=0)
    calibration = [collator([dataset["train"][i] for i in range(s, min(s + 32, len(dataset["train"])))])
                   for s in range(0, len(dataset["train"]), 32)]
    usage = collect_expert_usage(model, calibration)
    top_k = model.config.text_config.num_experts_per_tok
    smallest_group = min(model.config.text_config.expert_groups.values())

    variants = {"uncompressed": model}
    for keep in args.keep:
        kept = max(1, round(keep * smallest_group))
        for method in ("prune", "merge"):
            variants[f"{method} {keep:.0%}"] = compress_experts(
                model, usage, keep, method, num_experts_per_tok=min(top_k, kept))
            if args.distill_steps:
                distilled = copy.deepcopy(variants[f"{method} {keep:.0%}"])
                losses = distill_compressed_model(distilled, model, calibration, args.distill_steps,
                                                  args.distill_learning_rate)
                print(f"{method} {keep:.0%} distilled: KL {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
                variants[f"{method} {keep:.0%} + distill"] = distilled

    decode_inputs = collator.prompts([dataset["test"][i] for i in range(4)], image_first=True)
    for variant in variants.values():  # warm-up
        decode_seconds(variant, decode_inputs, 2)
    timings = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so load drifts hit every variant alike
        for name, variant in variants.items():
            timings[name].append(decode_seconds(variant, decode_inputs, args.new_tokens))

    rows = []
    base_seconds = statistics.median(timings["uncompressed"])
    for name, variant in variants.items():
        metrics, _ = evaluate_answers(variant, collator, dataset["test"], batch_size=64, max_new_tokens=24)
        seconds = statistics.median(timings[name])
        rows.append({
            "variant": name, "experts": dict(variant.config.text_config.expert_groups),
            "top_k": variant.config.text_config.num_experts_per_tok,
            "parameters": variant.num_parameters(), "checkpoint_bytes": checkpoint_bytes(variant),
            "exact_match": metrics["test_exact_match"], "caption_bleu": metrics.get("test_caption_bleu"),
            "decode_tokens_per_s": 4 * args.new_tokens / seconds, "decode_speed_ratio": base_seconds / seconds})
        print(f"{name}: {rows[-1]}", flush=True)

    base = rows[0]
    print(f"\n{args.model_dir}, calibration {args.calibration_rows} training rows, {args.test_rows} test rows x 2 "
          f"prompt orders, torch threads {torch.get_num_threads()}\n")
    print("| variant | experts (text / image) | top-k | parameters | checkpoint | exact match | caption BLEU | "
          "decode tok/s (ratio) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        experts = " / ".join(str(n) for n in row["experts"].values())
        print(f"| {row['variant']} | {experts} | {row['top_k']} | {row['parameters']:,} "
              f"({row['parameters'] / base['parameters']:.0%}) | {row['checkpoint_bytes'] / 1e6:.2f} MB | "
              f"{row['exact_match']:.1%} ({100 * (row['exact_match'] - base['exact_match']):+.1f}) | "
              f"{row['caption_bleu']:.3f} | {row['decode_tokens_per_s']:.0f} ({row['decode_speed_ratio']:.2f}x) |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"model_dir": args.model_dir, "rows": rows, "args": vars(args),
                                             "threads": torch.get_num_threads(), "torch": torch.__version__,
                                             "machine": platform.machine()}, indent=2))


if __name__ == "__main__":
    main()
