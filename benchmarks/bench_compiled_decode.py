"""Decode speed with a static cache, eager vs `torch.compile` (inductor), side by side in one run, next to
Transformers' Mixtral at the same decoder shapes (its own eager and compiled decode). Greedy decoding of a prompt
with an image; decode time = time(generate N + 1 tokens) - time(generate 1 token), median over interleaved repeats.
Prints a markdown table and writes benchmarks/results/compiled_decode.json.

    OMP_NUM_THREADS=2 python benchmarks/bench_compiled_decode.py [--new-tokens 32 --repeats 3]
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import CompileConfig, MixtralConfig, MixtralForCausalLM

from hf_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMForConditionalGeneration


def build_models(args) -> dict[str, torch.nn.Module]:
    text = {"vocab_size": 1024, "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
            "num_hidden_layers": args.layers, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
            "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 64, "patch_size": 16}
    models = {}
    for router_type in args.router_types:
        torch.manual_seed(0)
        config = SparseMoEVLMConfig(
            vision_config=vision, image_token_id=1023, image_size=64,
            text_config={**text, "moe_intermediate_size": args.expert_width, "num_experts": args.experts,
                         "num_image_experts": args.experts, "num_experts_per_tok": args.top_k,
                         "router_type": router_type})
        models[f"sparsemoe-vlm {router_type}"] = SparseMoEVLMForConditionalGeneration(config).eval()
    torch.manual_seed(0)
    mixtral = MixtralConfig(**text, num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    mixtral.intermediate_size = args.expert_width
    models["Mixtral (Transformers)"] = MixtralForCausalLM(mixtral).eval()
    return models


def prompt(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, 1000, (24,), generator=generator)
    if isinstance(model, SparseMoEVLMForConditionalGeneration):
        n_image = model.config.image_seq_length
        input_ids = torch.cat([torch.tensor([1]), torch.full((n_image,), 1023), text])[None]
        return {"input_ids": input_ids, "mm_token_type_ids": (input_ids == 1023).long(),
                "pixel_values": torch.randn(1, 3, 64, 64, generator=generator)}
    return {"input_ids": torch.cat([torch.tensor([1]), text])[None]}


def generate_seconds(model, inputs, new_tokens: int, compile_config) -> tuple[float, torch.Tensor]:
    extra = {"compile_config": compile_config} if compile_config is not None else {"disable_compile": True}
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         cache_implementation="static", pad_token_id=0, **extra)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-width", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--router-types", default="topk,top_p")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "compiled_decode.json"))
    args = parser.parse_args()
    args.router_types = args.router_types.split(",")

    compile_config = CompileConfig(fullgraph=True, backend="inductor", mode="default")
    compile_config._compile_all_devices = True  # generate compiles only on accelerators unless told otherwise
    arms = {}
    for name, model in build_models(args).items():
        inputs = prompt(model)
        for mode, config in (("eager", None), ("compiled", compile_config)):
            start = time.perf_counter()
            _, reference = generate_seconds(model, inputs, args.new_tokens + 1, config)  # warm-up (compiles)
            arms[(name, mode)] = {"model": model, "inputs": inputs, "config": config, "tokens": reference,
                                  "warmup_s": time.perf_counter() - start, "decode_s": []}
    for _ in range(args.repeats):  # interleaved: every arm once per round
        for arm in arms.values():
            short, _ = generate_seconds(arm["model"], arm["inputs"], 1, arm["config"])
            long, _ = generate_seconds(arm["model"], arm["inputs"], args.new_tokens + 1, arm["config"])
            arm["decode_s"].append(long - short)

    rows = []
    for (name, mode), arm in arms.items():
        eager = arms[(name, "eager")]
        decode = statistics.median(arm["decode_s"])
        rows.append({
            "model": name, "mode": mode,
            "decode_tokens_per_s": args.new_tokens / decode,
            "spread_tokens_per_s": [args.new_tokens / max(arm["decode_s"]), args.new_tokens / min(arm["decode_s"])],
            "speedup_vs_eager": statistics.median(eager["decode_s"]) / decode,
            "first_call_s": arm["warmup_s"],
            "same_tokens_as_eager": bool(torch.equal(arm["tokens"], eager["tokens"])),
        })
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"hidden {args.hidden}, {args.layers} layers, {args.experts} experts (x2 groups for SparseMoE-VLM) of width "
          f"{args.expert_width}, top-{args.top_k}, batch 1, {args.new_tokens} new tokens, static cache, fp32\n")
    print("| model | mode | decode tokens/s (min-max) | compiled / eager | first call (s) | same tokens as eager |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        low, high = row["spread_tokens_per_s"]
        print(f"| {row['model']} | {row['mode']} | {row['decode_tokens_per_s']:.1f} ({low:.1f}-{high:.1f}) | "
              f"{row['speedup_vs_eager']:.2f}x | {row['first_call_s']:.1f} | {row['same_tokens_as_eager']} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"args": vars(args), "threads": torch.get_num_threads(),
                                             "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
