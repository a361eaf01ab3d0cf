"""int8 weight-only experts (torchao, `TorchAoConfig(Int8WeightOnlyConfig())`) against fp32, side by side in one run:
checkpoint bytes of the expert tensors, peak and anonymous resident memory of a fresh process that loads the
checkpoint and decodes, prefill and decode tokens/s for each experts kernel, and the difference of the logits. Each
(precision, kernel) arm runs in a fresh process; arms are interleaved over the repeats and the median is reported.
Shape (issue #17): hidden 1024, 8 sparse layers, 16 text + 16 image experts of width 512, top-2, 256 image + 64
text tokens (the checkpoint of bench_expert_offload.py, random N(0, 0.02) weights).

`--model_dir` also scores a trained model (the main job's) in fp32 and quantised after training: held-out exact match
on its test split, both prompt orders.

    OMP_NUM_THREADS=1 python benchmarks/bench_quantized_experts.py --work_dir /tmp/offload_bench \
        --model_dir runs/sparsemoe-vlm-tiny
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from bench_expert_offload import build_checkpoint
from safetensors import safe_open


KERNELS = ("eager", "grouped_mm", "batched_mm")

CHILD = r"""
import json, time
import torch
from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration
torch.set_num_threads({threads})
folder, kernel, new_tokens = {folder!r}, {kernel!r}, {new_tokens}
start = time.perf_counter()
model = SparseMoEVLMForConditionalGeneration.from_pretrained(folder, experts_implementation=kernel).eval()
load = time.perf_counter() - start
config = model.config
generator = torch.Generator().manual_seed(0)
ids = torch.cat([torch.tensor([1]), torch.full((config.image_seq_length,), config.image_token_id),
                 torch.randint(3, min(1000, config.image_token_id), (64,), generator=generator)])[None]
pixel_values = torch.randn(1, 3, config.image_size, config.image_size, generator=generator)
def prefill_and_decode():
    start = time.perf_counter()
    out = model(input_ids=ids, pixel_values=pixel_values, use_cache=True)
    prefill = time.perf_counter() - start
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):  # greedy decoding steps, batch 1
        out = model(input_ids=token, cache=out.cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return prefill, time.perf_counter() - start
with torch.no_grad():
    prefill_and_decode()  # warm-up
    prefill, decode = prefill_and_decode()
    torch.save(model(input_ids=ids, pixel_values=pixel_values).logits[0], {logits_path!r})
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
megabytes = lambda key: int(status[key].split()[0]) / 1024
# VmHWM: this process's peak resident set since exec (ru_maxrss would carry the parent's over from the fork).
print("RESULT " + json.dumps({{"load_s": load, "prefill_s": prefill, "decode_s": decode,
                             "peak_rss_mb": megabytes("VmHWM"), "anon_rss_mb": megabytes("RssAnon"),
                             "file_rss_mb": megabytes("RssFile")}}))
"""


def expert_bytes(folder: Path) -> tuple[int, int]:
    """Bytes of the expert tensors and of all tensors in the folder's safetensors files."""
    experts = total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as checkpoint:
            for key in checkpoint.keys():
                nbytes = checkpoint.get_tensor(key).nbytes
                total += nbytes
                experts += nbytes if ".experts." in key else 0
    return experts, total


def quantize_checkpoint(source: Path, target: Path) -> None:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration

    if (target / "config.json").is_file():
        return
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(
        source, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    model.save_pretrained(target)


def score_trained_model(model_dir: str, test_rows: int) -> dict:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, SparseMoEVLMProcessor
    from hf_sparsemoe_vlm.app.cli import DataArguments, load_data
    from hf_sparsemoe_vlm.app.training import VLMDataCollator, evaluate_answers

    processor = SparseMoEVLMProcessor.from_pretrained(model_dir)
    dataset, _ = load_data(DataArguments(num_train_examples=1, num_validation_examples=0,
                                         num_test_examples=test_rows), seed=0)
    collator = VLMDataCollator(processor, seed=0)
    scores = {}
    for name, kwargs in (("fp32", {}), ("int8", {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig())})):
        model = SparseMoEVLMForConditionalGeneration.from_pretrained(model_dir, **kwargs).eval()
        metrics, _ = evaluate_answers(model, collator, dataset["test"], batch_size=64, max_new_tokens=24)
        scores[name] = {key: value for key, value in metrics.items() if isinstance(value, float)}
        print(name, scores[name], flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="Where the ~2 GB fp32 and int8 checkpoints are written.")
    parser.add_argument("--model_dir", help="A trained run folder to score in fp32 and int8 (exact match).")
    parser.add_argument("--test_rows", type=int, default=300)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "quantized_experts.json"))
    args = parser.parse_args()

    work = Path(args.work_dir)
    folders = {"fp32": work / "checkpoint", "int8": work / "checkpoint-int8"}
    build_checkpoint(folders["fp32"])
    quantize_checkpoint(folders["fp32"], folders["int8"])
    arms = [(precision, kernel) for precision in folders for kernel in KERNELS]
    runs = {arm: [] for arm in arms}
    load_before = os.getloadavg()
    for repeat in range(args.repeats):
        for precision, kernel in arms:  # interleaved, each in a fresh process
            code = CHILD.format(threads=args.threads, folder=str(folders[precision]), kernel=kernel,
                                new_tokens=args.new_tokens, logits_path=str(work / f"logits-{precision}-{kernel}.pt"))
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{precision}/{kernel} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.split("RESULT ", 1)[1])
            runs[(precision, kernel)].append(result)
            print(precision, kernel, repeat, result, flush=True)
    load_after = os.getloadavg()

    summary = {arm: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for arm, results in runs.items()}
    reference = torch.load(work / "logits-fp32-eager.pt")
    differences = {}
    for precision, kernel in arms:
        diff = (torch.load(work / f"logits-{precision}-{kernel}.pt") - reference).abs()
        differences[f"{precision}/{kernel}"] = {"max": diff.max().item(), "mean": diff.mean().item()}
    fp32_experts, fp32_total = expert_bytes(folders["fp32"])
    int8_experts, int8_total = expert_bytes(folders["int8"])

    print(f"\nexpert tensors in the checkpoint: fp32 {fp32_experts / 1e6:.0f} MB, int8 {int8_experts / 1e6:.0f} MB "
          f"({int8_experts / fp32_experts:.3f}x); whole checkpoint {fp32_total / 1e6:.0f} MB -> "
          f"{int8_total / 1e6:.0f} MB ({int8_total / fp32_total:.3f}x)")
    print(f"{args.threads} torch thread(s); {args.new_tokens} decode tokens; median of {args.repeats} fresh processes; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| weights | experts kernel | peak RSS | vs fp32 eager | RSS after decoding (anonymous + file) | decode tok/s | "
          "vs fp32, same kernel | prefill (320 tokens) | vs fp32, same kernel | logits vs fp32 eager (max / mean) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = summary[("fp32", "eager")]
    for precision, kernel in arms:
        row, fp32 = summary[(precision, kernel)], summary[("fp32", kernel)]
        diff = differences[f"{precision}/{kernel}"]
        print(f"| {precision} | {kernel} | {row['peak_rss_mb']:.0f} MB | {row['peak_rss_mb'] / base['peak_rss_mb']:.2f}x"
              f" | {row['anon_rss_mb']:.0f} + {row['file_rss_mb']:.0f} MB | {args.new_tokens / row['decode_s']:.2f} | "
              f"{fp32['decode_s'] / row['decode_s']:.2f}x | {row['prefill_s']:.2f} s | "
              f"{fp32['prefill_s'] / row['prefill_s']:.2f}x | {diff['max']:.2e} / {diff['mean']:.2e} |")

    scores = score_trained_model(args.model_dir, args.test_rows) if args.model_dir else None
    if scores:
        print(f"\n{args.model_dir}: held-out exact match fp32 {scores['fp32']['test_exact_match']:.1%}, int8 "
              f"{scores['int8']['test_exact_match']:.1%} "
              f"({100 * (scores['int8']['test_exact_match'] - scores['fp32']['test_exact_match']):+.1f} points)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({
        "runs": {f"{p}/{k}": r for (p, k), r in runs.items()}, "logits_difference": differences,
        "expert_bytes": {"fp32": fp32_experts, "int8": int8_experts}, "checkpoint_bytes": {"fp32": fp32_total,
                                                                                           "int8": int8_total},
        "trained_model_scores": scores, "load_average": [load_before, load_after], "args": vars(args),
        "torch": torch.__version__, "machine": platform.machine()}, indent=2))


if __name__ == "__main__":
    main()
