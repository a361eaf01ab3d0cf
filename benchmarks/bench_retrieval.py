"""Image-text retrieval with a trained model on the synthetic set's held-out captions: recall@1/5/10 and mean rank
in both directions beside the chance level, for the text-prior weight alpha in {0, 0.5, 1}; and the time per
(image, caption) pair with and without reusing each image's computation (its KV cache) across captions, as a ratio
in one run (interleaved repeats on a subset of the images, median).
Identical captions (the same shapes and colours) are one candidate text, right for every image that has it; ties in
score count against the query. Prints markdown tables and writes benchmarks/results/retrieval.json.

    OMP_NUM_THREADS=2 python benchmarks/bench_retrieval.py --model_dir runs/sparsemoe-vlm-tiny
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, SparseMoEVLMProcessor
from hf_sparsemoe_vlm.app.cli import DataArguments, load_data
from hf_sparsemoe_vlm.app.retrieval import retrieval_metrics, score_image_texts, text_prior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--timing_images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "retrieval.json"))
    args = parser.parse_args()

    model = SparseMoEVLMForConditionalGeneration.from_pretrained(args.model_dir).eval()
    processor = SparseMoEVLMProcessor.from_pretrained(args.model_dir)
    dataset, origins = load_data(DataArguments(num_train_examples=0, num_validation_examples=0,
                                               num_test_examples=args.images), seed=0)
    rows = dataset["test"]
    images, captions = rows["image"], rows["caption"]
    texts = sorted(set(captions))
    print(f"{len(images)} images, {len(texts)} distinct captions ({origins['test']})", flush=True)

    started = time.perf_counter()
    scores = score_image_texts(model, processor, images, texts, progress=True)
    prior = text_prior(model, processor, texts)
    scoring_seconds = time.perf_counter() - started
    results = {}
    for alpha in args.alphas:
        results[alpha] = retrieval_metrics(scores - alpha * prior[None, :], captions, texts)

    subset = images[: args.timing_images]
    timings = {True: [], False: []}
    for _ in range(args.repeats):
        for reuse in (True, False):
            start = time.perf_counter()
            score_image_texts(model, processor, subset, texts, reuse_image_computation=reuse)
            timings[reuse].append((time.perf_counter() - start) / (len(subset) * len(texts)))
    per_pair = {reuse: statistics.median(values) for reuse, values in timings.items()}

    print(f"\n{args.model_dir}; torch threads {torch.get_num_threads()}; all {len(images)} x {len(texts)} pairs scored "
          f"(with reuse) + the text prior in {scoring_seconds:.0f} s\n")
    print("| alpha | direction | R@1 | R@5 | R@10 | mean rank | chance R@1 / R@5 / R@10 / mean rank |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for alpha, metrics in results.items():
        for direction in ("image_to_text", "text_to_image"):
            m = {k.removeprefix(direction + "_"): v for k, v in metrics.items() if k.startswith(direction)}
            print(f"| {alpha} | {direction.replace('_', ' ')} ({m['queries']} queries) | {m['recall@1']:.1%} | "
                  f"{m['recall@5']:.1%} | {m['recall@10']:.1%} | {m['mean_rank']:.1f} | {m['recall@1_chance']:.1%} / "
                  f"{m['recall@5_chance']:.1%} / {m['recall@10_chance']:.1%} / {m['mean_rank_chance']:.1f} |")
    print(f"\n| time per (image, caption) pair | reuse image computation | every pair whole | ratio |\n"
          f"| --- | --- | --- | --- |\n| {args.timing_images} images x {len(texts)} captions, median of "
          f"{args.repeats} | {1e3 * per_pair[True]:.2f} ms | {1e3 * per_pair[False]:.2f} ms | "
          f"{per_pair[False] / per_pair[True]:.1f}x |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({
        "model_dir": args.model_dir, "images": len(images), "texts": len(texts),
        "metrics": {str(alpha): metrics for alpha, metrics in results.items()},
        "seconds_per_pair": {"reuse": per_pair[True], "whole_pairs": per_pair[False]},
        "scoring_seconds": scoring_seconds, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
