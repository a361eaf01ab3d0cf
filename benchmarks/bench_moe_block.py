"""Sparse MLP block speed, side by side in one run: Transformers' Mixtral block (the in-library baseline) and
SparseMoE-VLM's block with each router and experts kernel, at the same shapes, plus a dense fp32 matmul as the
machine's peak. Prints a markdown table and writes the figures to benchmarks/results/moe_block.json.

    python benchmarks/bench_moe_block.py [--tokens 2048 --hidden 512 --intermediate 1024 --experts 8 --top-k 2]

`--baseline_checkout DIR` also times the block of another checkout of this repository (e.g. the commit before a
change to the hot path: `git worktree add /tmp/base <commit>`) on the same weights and inputs, in the same run,
and adds a "time vs baseline checkout" column.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from _common import load_checkout  # benchmarks/_common.py (the script's folder is on sys.path)
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from hf_sparsemoe_vlm import SparseMoEVLMTextConfig
from hf_sparsemoe_vlm.modeling_sparsemoe_vlm import SparseMoEVLMSparseMoeBlock


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def init_block(block: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return block.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "moe_block.json")
    parser.add_argument("--baseline_checkout", type=Path, default=None,
                        help="Another checkout of this repository whose block is timed next to this one.")
    args = parser.parse_args()
    baseline_modules = load_checkout(args.baseline_checkout) if args.baseline_checkout else None
    torch.manual_seed(0)
    tokens, hidden, inter, experts, top_k = args.tokens, args.hidden, args.intermediate, args.experts, args.top_k
    x = torch.randn(1, tokens, hidden)
    half_image = torch.zeros(1, tokens, dtype=torch.long)
    half_image[:, : tokens // 2] = 1

    n = tokens
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    matmul_s = timed(lambda: a @ b, args.repeats)
    peak_gflops = 2 * n**3 / matmul_s / 1e9
    # Work of a top-k block: per token and active expert, three (hidden x intermediate) matmuls.
    active_flops = 2 * 3 * tokens * top_k * hidden * inter

    rows = []

    def record(name: str, block: torch.nn.Module, implementation: str, call, flops=active_flops, note: str = ""):
        block.config._experts_implementation = implementation
        for module in block.modules():
            if hasattr(module, "config") and module is not block:
                module.config._experts_implementation = implementation
        with torch.no_grad():
            seconds = timed(call, args.repeats)
        rows.append({"block": name, "experts": implementation, "forward_s": seconds,
                     "gflops": flops / seconds / 1e9, "note": note})

    mixtral_config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                                   num_experts_per_tok=top_k, num_attention_heads=8, head_dim=hidden // 8)
    mixtral = init_block(MixtralSparseMoeBlock(mixtral_config), seed=1)
    mixtral.config = mixtral_config

    def ours(modules=None, **overrides) -> SparseMoEVLMSparseMoeBlock:
        config_class, block_class = SparseMoEVLMTextConfig, SparseMoEVLMSparseMoeBlock
        if modules is not None:
            config_class = modules[1].SparseMoEVLMTextConfig
            block_class = modules[0].SparseMoEVLMSparseMoeBlock
        config = config_class(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                              num_experts_per_tok=top_k, num_attention_heads=8, num_hidden_layers=1, **overrides)
        block = init_block(block_class(config, layer_idx=0), seed=1)
        block.config = config
        return block

    single_pool = ours(num_image_experts=0)
    modality = ours(num_image_experts=experts)
    top_p = ours(num_image_experts=0, router_type="top_p", router_top_p=0.25)
    relu = ours(num_image_experts=0, router_type="relu")

    baselines = {}
    if baseline_modules is not None:
        baselines = {"one pool, top-k": ours(baseline_modules, num_image_experts=0),
                     "text+image groups, top-k": ours(baseline_modules, num_image_experts=experts),
                     "one pool, top_p": ours(baseline_modules, num_image_experts=0, router_type="top_p",
                                             router_top_p=0.25),
                     "one pool, relu": ours(baseline_modules, num_image_experts=0, router_type="relu")}

    def record_ours(variant: str, block, implementation: str, inputs: tuple, **kwargs):
        record(f"SparseMoE-VLM, {variant}", block, implementation, lambda: block(*inputs), **kwargs)
        if variant in baselines:  # the other checkout's block, right after: same weights, inputs, kernel
            baseline = baselines[variant]
            record(f"baseline checkout, {variant}", baseline, implementation, lambda: baseline(*inputs), **kwargs)
            rows[-2]["vs_baseline_checkout"] = rows[-2]["forward_s"] / rows[-1]["forward_s"]

    for implementation in ("grouped_mm", "batched_mm", "eager"):
        if implementation == "batched_mm" and tokens * top_k * 2 * inter * hidden * 4 > 8 * 2**30:
            continue  # batched_mm copies one weight matrix per (token, expert): skip sizes that would not fit
        record("Mixtral (transformers)", mixtral, implementation, lambda: mixtral(x))
        record_ours("one pool, top-k", single_pool, implementation, (x,))
        record_ours("text+image groups, top-k", modality, implementation, (x, half_image),
                    note="half the tokens are image tokens")
    with torch.no_grad():
        for block, name in ((top_p, "top_p"), (relu, "relu")):
            group = block.text_moe
            _, _, top_k_index = group.router(x.reshape(-1, hidden))
            per_token = (top_k_index < group.router.num_experts).sum(-1).float().mean().item()
            flops = 2 * 3 * tokens * per_token * hidden * inter
            for implementation in ("grouped_mm", "eager"):
                record_ours(f"one pool, {name}", block, implementation, (x,), flops=flops,
                            note=f"{per_token:.2f} experts/token on average")

    baseline = {r["experts"]: r["forward_s"] for r in rows if r["block"].startswith("Mixtral")}
    for row in rows:
        row["vs_mixtral_same_kernel"] = row["forward_s"] / baseline.get(row["experts"], baseline["grouped_mm"])
        row["fraction_of_matmul_peak"] = row["gflops"] / peak_gflops

    header = (f"tokens={tokens} hidden={hidden} intermediate={inter} experts={experts} top_k={top_k} fp32, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; dense {n}^3 matmul: "
              f"{peak_gflops:.0f} GFLOP/s")
    print(header)
    versus = " time vs baseline checkout |" if baselines else ""
    print(f"| block | experts kernel | forward (s) | GFLOP/s | of matmul peak | time vs Mixtral, same kernel |{versus}"
          " note |")
    print("| --- " * (7 + bool(baselines)) + "|")
    for r in rows:
        ratio = (f" {r['vs_baseline_checkout']:.2f}x |" if "vs_baseline_checkout" in r else " |") if baselines else ""
        print(f"| {r['block']} | {r['experts']} | {r['forward_s']:.4f} | {r['gflops']:.1f} | "
              f"{r['fraction_of_matmul_peak']:.0%} | {r['vs_mixtral_same_kernel']:.2f}x |{ratio} {r['note']} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"setup": header, "machine": platform.processor() or platform.machine(),
                                       "matmul_gflops": peak_gflops, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
