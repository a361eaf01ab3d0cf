"""Peak memory and decode speed of one checkpoint under four placements, each in a fresh process (interleaved
repeats, median): all weights resident; `device_map="auto"` under a memory limit (Accelerate offloads whole decoder
layers); `expert_offload_device_map` with every expert group on disk; and the same with the memory limit, which keeps
the first expert groups resident. Shape (issue #17): hidden 1024, 8 sparse layers, 16 text + 16 image experts of
width 512, top-2, 256 image + 64 text tokens. Memory: the process's peak resident set (`VmHWM`, which counts the
pages of the memory-mapped checkpoint that loading touched) and, after decoding, its anonymous resident memory
(`RssAnon`: the weights it holds itself) beside the mapped file pages (`RssFile`, reclaimable page cache); decode time = time(generate N + 1 tokens) - time(generate 1 token).
Prints a markdown table and writes benchmarks/results/expert_offload.json.

    OMP_NUM_THREADS=2 python benchmarks/bench_expert_offload.py --work_dir /tmp/offload_bench
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from hf_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMForConditionalGeneration


ARMS = ("resident", "layer offload (auto)", "experts on disk", "experts on disk, limit")

CHILD = r"""
import json, sys, time
import torch
from transformers import AutoConfig
from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, expert_offload_device_map
torch.set_num_threads({threads})
folder, arm, limit, new_tokens = {folder!r}, {arm!r}, {limit}, {new_tokens}
config = AutoConfig.from_pretrained(folder)
kwargs = {{"offload_folder": folder + "/offload-" + arm.replace(" ", "_").replace(",", "")}}
if arm == "layer offload (auto)":
    kwargs.update(device_map="auto", max_memory={{"cpu": limit}})
elif arm == "experts on disk":
    kwargs.update(device_map=expert_offload_device_map(config, "cpu", "disk"))
elif arm == "experts on disk, limit":
    kwargs.update(device_map=expert_offload_device_map(config, "cpu", "disk", max_memory={{"cpu": limit}}))
else:
    kwargs = {{}}
start = time.perf_counter()
model = SparseMoEVLMForConditionalGeneration.from_pretrained(folder, **kwargs).eval()
load = time.perf_counter() - start
generator = torch.Generator().manual_seed(0)
n_image = config.image_seq_length
ids = torch.cat([torch.tensor([1]), torch.full((n_image,), config.image_token_id),
                 torch.randint(3, min(1000, config.image_token_id), (64,), generator=generator)])[None]
inputs = {{"input_ids": ids, "pixel_values": torch.randn(1, 3, config.image_size, config.image_size,
                                                        generator=generator)}}
def generate(n):
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start
generate(1)
one, many = generate(1), generate(new_tokens + 1)
placed = getattr(model, "hf_device_map", None) or {{}}
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print("RESULT " + json.dumps({{"load_s": load, "prefill_s": one, "decode_s": many - one,
                             "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024,
                             "anon_rss_mb": int(status["RssAnon"].split()[0]) / 1024,
                             "file_rss_mb": int(status["RssFile"].split()[0]) / 1024,
                             "on_disk": sum(1 for d in placed.values() if d == "disk"), "modules": len(placed)}}))
"""


def build_checkpoint(folder: Path) -> None:
    if (folder / "config.json").is_file():
        return
    text = {"vocab_size": 1024, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 8,
            "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 1024,
            "moe_intermediate_size": 512, "num_experts": 16, "num_image_experts": 16, "num_experts_per_tok": 2,
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 256, "patch_size": 16}
    torch.manual_seed(0)
    config = SparseMoEVLMConfig(vision_config=vision, text_config=text, image_token_id=1023, image_size=256)
    SparseMoEVLMForConditionalGeneration(config).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="Where the ~2 GB checkpoint is written (kept for reruns).")
    parser.add_argument("--limit", default="800MB", help="max_memory for the CPU in the limited arms.")
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "expert_offload.json"))
    args = parser.parse_args()

    folder = Path(args.work_dir) / "checkpoint"
    build_checkpoint(folder)
    runs = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm in ARMS:  # interleaved, each in a fresh process
            code = CHILD.format(threads=args.threads, folder=str(folder), arm=arm, limit=repr(args.limit),
                                new_tokens=args.new_tokens)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.split("RESULT ", 1)[1])
            runs[arm].append(result)
            print(arm, result, flush=True)

    summary = {arm: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for arm, results in runs.items()}
    base = summary["resident"]
    print(f"\ncheckpoint {sum(p.stat().st_size for p in folder.glob('*.safetensors')) / 1e9:.2f} GB; "
          f"{args.threads} torch thread(s); {args.new_tokens} decode tokens; limit {args.limit}; median of "
          f"{args.repeats} fresh processes\n")
    print("| placement | modules on disk | peak RSS | process memory after decoding (anonymous) | vs resident | "
          "mapped file pages | decode tok/s | vs resident | prefill |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arm, row in summary.items():
        speed = args.new_tokens / row["decode_s"]
        print(f"| {arm} | {row['on_disk']:.0f} of {row['modules']:.0f} | {row['peak_rss_mb']:.0f} MB | "
              f"{row['anon_rss_mb']:.0f} MB | {row['anon_rss_mb'] / base['anon_rss_mb']:.0%} | "
              f"{row['file_rss_mb']:.0f} MB | {speed:.2f} | {base['decode_s'] / row['decode_s']:.2f}x | "
              f"{row['prefill_s']:.2f} s |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"runs": runs, "summary": summary, "args": vars(args),
                                             "torch": torch.__version__, "machine": platform.machine()}, indent=2))


if __name__ == "__main__":
    main()
