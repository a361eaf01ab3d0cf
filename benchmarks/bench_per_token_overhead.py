"""Per-token overhead of SparseMoE-VLM's sparse decoder (issue #19), side by side in one process: our language model
(`SparseMoEVLMTextModel`, fed `inputs_embeds` + `mm_token_type_ids`, so no vision tower) with each experts kernel,
a dense Llama with the same active parameters per token (intermediate = top_k x expert width + shared width),
Transformers' Mixtral at equal shapes (one pool of `--experts` experts, same kernel), and Transformers'
Ernie-4.5-VL-MoE language model at equal shapes (modality-isolated text / vision experts, fed the same image/text
split through its `moe_mm_token_type_ids`).

Measurements, each a loop over repeats in which every arm runs once, in rotating order (round-robin, not one arm
after the other), so that a change in the machine's load hits all arms alike:
  decode   batch 1, time per token of `--decode_steps` forwards of one new (text) token with a `DynamicCache` holding
           the prompt (image + text tokens; a copy of it per run); model forward step by step, not `generate()`;
           ours and Ernie get the new token's type (0) as `generate()` would pass it;
  prefill  the prompt (image + text tokens, fresh cache) at each of `--prefill_image_tokens`;
  train    forward + backward of a `--train_batch` x (image + text) batch, loss = mean square of the last hidden states;
           `--train_grads fresh`: gradients freed after each step (Trainer's `model.zero_grad()`), so each backward
           allocates them anew, for every expert of a fused (E, ., .) tensor; `kept`: allocated once and zeroed in
           place inside the timed step (`zero_grad(set_to_none=False)`); `both` (default) measures each;
  routing  one sparse block (`SparseMoEVLMSparseMoeBlock`) at `--routing_tokens` tokens for every router type:
           block time vs time inside the experts modules (forward pre/post hooks), routing + dispatch fraction =
           1 - experts / block (work inside a kernel, e.g. grouped_mm's sort and gathers, counts as experts
           time); also the block's expert matmuls alone on rows already grouped by expert (same routing, plain
           per-expert `F.linear`s), and 1 - matmuls / block, which counts every kernel's own dispatch as overhead.
           Mixtral's and Ernie's blocks (top-k) alongside for reference; image tokens in the prompt's proportion.
Times are process CPU time (`time.process_time`, default `--clock cpu`: robust to other jobs at 1 thread; with more
threads it sums them) or wall time (`--clock wall`); medians with min-max over the repeats. Ratios are ratios of
medians, with the min-max of the per-repeat paired ratios in brackets. Weights are random N(0, 0.02) (norms 1,
biases 0), drawn per parameter name, so arms whose tensors share a name and shape (attention, Ernie's experts and
routers) get identical weights. Prints markdown tables and writes benchmarks/results/per_token_overhead[_tiny].json.

    OMP_NUM_THREADS=1 python benchmarks/bench_per_token_overhead.py                  # issue #19's shape, ~6 min
    OMP_NUM_THREADS=1 python benchmarks/bench_per_token_overhead.py --preset tiny    # hidden 256, 4 layers, 8+8 x 256

Kernels are switched on the same model between arms (`model.set_experts_implementation`, then every experts
module's `config._experts_implementation` is checked). `batched_mm` runs in decode only (it copies one weight matrix
per (token, expert) pair). `--baseline_checkout DIR` adds our model from another checkout of this repository
(`git worktree add /tmp/base <commit>`), loaded with the same weights (state_dict), next to ours in every
measurement, and a "ours / baseline checkout" ratio. `--measurements`, `--skip` and `--repeats` trim a run.
"""

import argparse
import contextlib
import copy
import gc
import inspect
import json
import os
import platform
import statistics
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import load_checkout  # benchmarks/_common.py (the script's folder is on sys.path)
from torch import nn
from transformers import LlamaConfig, LlamaModel, MixtralConfig, MixtralModel
from transformers.cache_utils import DynamicCache
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from hf_sparsemoe_vlm import configuration_sparsemoe_vlm, modeling_sparsemoe_vlm


PRESETS = {
    # Issue #19's shape: 491M parameters, 82% of them experts.
    "issue": {"hidden": 1024, "layers": 8, "heads": 16, "experts": 16, "image_experts": 16, "expert_width": 512},
    "tiny": {"hidden": 256, "layers": 4, "heads": 4, "experts": 8, "image_experts": 8, "expert_width": 256},
}
MEASUREMENTS = ("decode", "prefill", "train", "routing")
FAMILIES = ("ours", "baseline", "dense", "mixtral", "ernie")
LABELS = {"ours": "SparseMoE-VLM", "baseline": "SparseMoE-VLM, baseline checkout", "dense": "Llama, dense same-active",
          "mixtral": "Mixtral (Transformers)", "ernie": "Ernie-4.5-VL-MoE (Transformers)"}
VOCAB = 256  # inputs are embeddings: the embedding table is never used


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="issue",
                        help="Model shape; the shape flags below override single fields.")
    for name in PRESETS["issue"]:
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--shared_experts", type=int, default=0)
    parser.add_argument("--image_tokens", type=int, default=256, help="Image tokens of the decode / train prompt.")
    parser.add_argument("--text_tokens", type=int, default=64, help="Text tokens of every prompt.")
    parser.add_argument("--prefill_image_tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--decode_steps", type=int, default=16)
    parser.add_argument("--train_batch", type=int, default=2)
    parser.add_argument("--routing_tokens", type=int, default=2560)
    parser.add_argument("--kernels", nargs="+", default=["eager", "grouped_mm"],
                        help="Experts kernels of every measurement.")
    parser.add_argument("--decode_kernels", nargs="*", default=["batched_mm"],
                        help="Extra experts kernels timed in decode only.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats of decode, prefill and routing.")
    parser.add_argument("--train_repeats", type=int, default=3)
    parser.add_argument("--train_grads", choices=("fresh", "kept", "both"), default="both",
                        help="Gradients between train steps: freed (fresh buffers every step) or kept and zeroed.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds before the timed repeats.")
    parser.add_argument("--measurements", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS))
    parser.add_argument("--skip", nargs="*", choices=("dense", "mixtral", "ernie"), default=[],
                        help="Comparison models to leave out.")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: time.process_time (process CPU time); wall: time.perf_counter.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as started).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None,
                        help="Default: benchmarks/results/per_token_overhead.json (_tiny.json with --preset tiny).")
    parser.add_argument("--baseline_checkout", type=Path, default=None,
                        help="Another checkout of this repository whose model is timed next to this one.")
    args = parser.parse_args()
    if args.output is None:
        suffix = "" if args.preset == "issue" else f"_{args.preset}"
        args.output = Path(__file__).parent / "results" / f"per_token_overhead{suffix}.json"
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Models


def canonical_name(name: str) -> str:
    """Parameter names that mean the same tensor across the models (Ernie's `vision_moe` and `gate`)."""
    return name.replace("vision_moe", "image_moe").replace(".gate.weight", ".router.weight")


def fill_weights(module: nn.Module, seed: int) -> None:
    """N(0, 0.02) for matrices, drawn from a generator seeded by the parameter's (canonical) name, so that equal names
    and shapes get equal tensors in every model; 1 for norms, 0 for biases."""
    generator = torch.Generator()
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                generator.manual_seed(seed + zlib.crc32(canonical_name(name).encode()))
                param.normal_(0.0, 0.02, generator=generator)


def build(model_class, config, seed: int) -> nn.Module:
    try:
        from transformers.initialization import no_init_weights
        skip_init = no_init_weights()
    except ImportError:
        skip_init = contextlib.nullcontext()
    with skip_init:
        model = model_class(config)
    fill_weights(model, seed)
    return model.eval()


def experts_modules(module: nn.Module) -> list[nn.Module]:
    """The fused experts modules (Transformers' experts-kernel interface: `gate_up_proj` / `down_proj` 3D tensors)."""
    return [m for m in module.modules()
            if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) and m.gate_up_proj.ndim == 3]


def set_kernel(module: nn.Module, kernel: str) -> None:
    """Switch the experts kernel of a model or block, and check that every experts module now runs it."""
    setter = getattr(module, "set_experts_implementation", None)
    if setter is not None:
        setter(kernel)
    for experts in experts_modules(module):
        if experts.config._experts_implementation != kernel:
            experts.config._experts_implementation = kernel
        assert experts.config._experts_implementation == kernel, (type(experts).__name__, kernel)


@dataclass
class Model:
    family: str
    module: nn.Module
    types_kw: str | None  # the keyword of the image/text token types, if the model has modality experts
    kernels: tuple[str, ...]
    note: str = ""
    cache_kw: str = field(init=False)

    def __post_init__(self):
        parameters = inspect.signature(self.module.forward).parameters
        self.cache_kw = "cache" if "cache" in parameters else "past_key_values"

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.module.config)

    def __call__(self, embeds: torch.Tensor, types: torch.Tensor, cache=None):
        kwargs = {"inputs_embeds": embeds, "use_cache": cache is not None}
        if self.types_kw is not None:
            kwargs[self.types_kw] = types
        if cache is not None:
            kwargs[self.cache_kw] = cache
        return self.module(**kwargs)


def mrope_section(head_dim: int) -> list[int]:
    """Ernie's 3D rotary split (height, width, time) of head_dim / 2 frequencies, in its default 22:22:20 ratio."""
    half = head_dim // 2
    time_dim = max(2, round(half * 20 / 64 / 2) * 2)
    return [(half - time_dim) // 2, half - time_dim - (half - time_dim) // 2, time_dim]


def text_config_kwargs(args) -> dict:
    return {"vocab_size": VOCAB, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": args.heads,
            "max_position_embeddings": 4096}


def our_config(configuration, args, **overrides):
    kwargs = {**text_config_kwargs(args), "head_dim": args.hidden // args.heads,
              "intermediate_size": args.top_k * args.expert_width, "num_experts": args.experts,
              "num_image_experts": args.image_experts, "num_shared_experts": args.shared_experts,
              "moe_intermediate_size": args.expert_width, "num_experts_per_tok": args.top_k,
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    return configuration.SparseMoEVLMTextConfig(**kwargs)


def ernie_config(args):
    """Ernie-4.5-VL-MoE's text config at our shape, or the reason it cannot be built."""
    try:
        from transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe import Ernie4_5_VLMoeTextConfig
    except ImportError as error:
        return None, f"transformers has no Ernie-4.5-VL-MoE ({error})"
    if args.image_experts != args.experts:
        return None, (f"Ernie-4.5-VL-MoE has as many vision experts as text experts; {args.experts} text + "
                      f"{args.image_experts} image experts cannot be matched")
    head_dim = args.hidden // args.heads
    config = Ernie4_5_VLMoeTextConfig(
        **text_config_kwargs(args), intermediate_size=args.top_k * args.expert_width, use_bias=False,
        moe_intermediate_size=[args.expert_width, args.expert_width], moe_k=args.top_k, moe_num_experts=args.experts,
        moe_num_shared_experts=args.shared_experts, mlp_layer_types=["sparse"] * args.layers,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(head_dim)})
    return config, ""


def mixtral_config(args):
    return MixtralConfig(**text_config_kwargs(args), head_dim=args.hidden // args.heads,
                         intermediate_size=args.expert_width, num_local_experts=args.experts,
                         num_experts_per_tok=args.top_k, sliding_window=None)


def build_models(args, baseline_modules) -> tuple[dict[str, Model], list[str]]:
    notes = []
    models = {}
    kernels = tuple(args.kernels) + tuple(k for k in args.decode_kernels if k not in args.kernels)
    ours = build(modeling_sparsemoe_vlm.SparseMoEVLMTextModel, our_config(configuration_sparsemoe_vlm, args),
                 args.seed)
    models["ours"] = Model("ours", ours, "mm_token_type_ids", kernels)
    if baseline_modules is not None:
        modeling, configuration = baseline_modules
        baseline = build(modeling.SparseMoEVLMTextModel, our_config(configuration, args), args.seed)
        try:
            baseline.load_state_dict(ours.state_dict())
            note = "same state_dict as ours"
        except RuntimeError as error:  # other parameter names: the name-seeded fill still matches equal names
            note = f"state_dict did not load ({str(error).splitlines()[0]}); name-seeded random weights"
        models["baseline"] = Model("baseline", baseline, "mm_token_type_ids", kernels, note)
        notes.append(f"baseline checkout {args.baseline_checkout}: {note}")
    if "dense" not in args.skip:
        width = (args.top_k + args.shared_experts) * args.expert_width
        config = LlamaConfig(**text_config_kwargs(args), head_dim=args.hidden // args.heads, intermediate_size=width)
        models["dense"] = Model("dense", build(LlamaModel, config, args.seed), None, (),
                                f"LlamaModel, intermediate_size {width} (= active expert width per token)")
    if "mixtral" not in args.skip:
        note = f"MixtralModel, one pool of {args.experts} experts of width {args.expert_width}, top-{args.top_k}"
        if args.shared_experts:
            note += f"; no shared experts (ours has {args.shared_experts})"
        models["mixtral"] = Model("mixtral", build(MixtralModel, mixtral_config(args), args.seed), None, kernels, note)
    if "ernie" not in args.skip:
        config, reason = ernie_config(args)
        if config is None:
            notes.append(f"Ernie-4.5-VL-MoE skipped: {reason}.")
        else:
            from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeTextModel
            models["ernie"] = Model(
                "ernie", build(Ernie4_5_VLMoeTextModel, config, args.seed), "moe_mm_token_type_ids", kernels,
                f"Ernie4_5_VLMoeTextModel from its config (no download): {args.experts} text + {args.experts} vision "
                f"experts of width {args.expert_width}, top-{args.top_k}, {args.shared_experts} shared, every layer "
                f"sparse, default rope with mrope_section {config.rope_parameters['mrope_section']} (positions "
                "1D, as text); image tokens routed by `moe_mm_token_type_ids`; experts and routers equal ours")
    for model in models.values():
        if model.note and model.family != "baseline":
            notes.append(f"{LABELS[model.family]}: {model.note}")
    return models, notes


# ---------------------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Arm:
    model: Model
    kernel: str | None

    @property
    def key(self) -> str:
        return f"{self.model.family}/{self.kernel or '-'}"

    def activate(self) -> None:
        if self.kernel is not None:
            set_kernel(self.model.module, self.kernel)


def interleaved(arms: list[Arm], run, repeats: int, warmup: int, clock, prepare=None, finish=None):
    """Time `run(arm, state)` for every arm once per round, rotating the order each round; `prepare(arm)` (its result
    is `state`) and `finish(arm, state)` are not timed. Returns {arm key: [seconds per timed round]}."""
    times = {arm.key: [] for arm in arms}
    for round_index in range(warmup + repeats):
        shift = round_index % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            arm.activate()
            state = prepare(arm) if prepare is not None else None
            start = clock()
            run(arm, state)
            elapsed = clock() - start
            if finish is not None:
                finish(arm, state)
            if round_index >= warmup:
                times[arm.key].append(elapsed)
    return times


def model_arms(models: dict[str, Model], kernels) -> list[Arm]:
    arms = []
    for model in models.values():
        if not model.kernels:
            arms.append(Arm(model, None))
        else:
            arms.extend(Arm(model, kernel) for kernel in kernels if kernel in model.kernels)
    return arms


def prompt(args, image_tokens: int, batch: int = 1, seed: int = 1):
    """Embeddings and token types of `batch` prompts: `image_tokens` image tokens after one text token, then text."""
    generator = torch.Generator().manual_seed(seed)
    length = image_tokens + args.text_tokens
    embeds = torch.randn(batch, length, args.hidden, generator=generator)
    types = torch.zeros(batch, length, dtype=torch.long)
    types[:, 1: 1 + image_tokens] = 1
    return embeds, types


def measure_decode(args, models, clock):
    embeds, types = prompt(args, args.image_tokens)
    new_embeds = torch.randn(1, args.decode_steps, args.hidden, generator=torch.Generator().manual_seed(2))
    new_types = torch.zeros(1, 1, dtype=torch.long)
    caches = {}
    with torch.no_grad():
        for family, model in models.items():  # the prompt's cache, once per model (kernel-independent)
            caches[family] = model.new_cache()
            model(embeds, types, caches[family])

        def run(arm, cache):
            for step in range(args.decode_steps):
                arm.model(new_embeds[:, step: step + 1], new_types, cache)

        kernels = list(args.kernels) + [k for k in args.decode_kernels if k not in args.kernels]
        times = interleaved(model_arms(models, kernels), run, args.repeats, args.warmup, clock,
                            prepare=lambda arm: copy.deepcopy(caches[arm.model.family]))
    return {key: [t / args.decode_steps for t in values] for key, values in times.items()}


def measure_prefill(args, models, clock, image_tokens: int):
    embeds, types = prompt(args, image_tokens)
    with torch.no_grad():
        return interleaved(model_arms(models, args.kernels), lambda arm, cache: arm.model(embeds, types, cache),
                           args.repeats, args.warmup, clock, prepare=lambda arm: arm.model.new_cache())


def measure_train(args, models, clock, keep_grads: bool = False):
    embeds, types = prompt(args, args.image_tokens, batch=args.train_batch)

    def run(arm, _):
        hidden = arm.model(embeds, types).last_hidden_state
        hidden.float().pow(2).mean().backward()
        if keep_grads:  # an optimizer's zero_grad(set_to_none=False): part of the step
            arm.model.module.zero_grad(set_to_none=False)

    for model in models.values():
        model.module.train()
    try:
        return interleaved(model_arms(models, args.kernels), run, args.train_repeats, args.warmup, clock,
                           finish=None if keep_grads else lambda arm, _: arm.model.module.zero_grad(set_to_none=True))
    finally:
        for model in models.values():
            model.module.zero_grad(set_to_none=True)
            model.module.eval()


class ExpertsTimer:
    """Accumulates the time spent inside a block's experts modules (forward pre/post hooks)."""

    def __init__(self, block: nn.Module, clock):
        self.clock, self.seconds, self.calls, self._start = clock, 0.0, 0, None
        for experts in experts_modules(block):
            experts.register_forward_pre_hook(self._pre)
            experts.register_forward_hook(self._post)

    def _pre(self, module, inputs):
        self._start = self.clock()

    def _post(self, module, inputs, output):
        self.seconds += self.clock() - self._start
        self.calls += 1


@dataclass
class Block:
    family: str
    router: str
    module: nn.Module
    types_kw: str | None
    timer: ExpertsTimer | None = None
    rows: list | None = None  # [(experts module, rows per expert)] of this input's routing; None if unknown
    tokens: int = 0

    def __call__(self, x, types):
        return self.module(x, types) if self.types_kw is not None else self.module(x)

    @property
    def experts_per_token(self) -> float | None:
        if self.rows is None:
            return None
        return sum(sum(counts) for _, counts in self.rows) / self.tokens

    def route(self, x: torch.Tensor, types: torch.Tensor) -> None:
        """Rows per expert of each experts module for this input, from the block's routers (public attributes of
        ours, Mixtral's and Ernie's blocks); left None if the block is laid out otherwise."""
        flat, is_image = x.reshape(-1, x.shape[-1]), types.reshape(-1) == 1
        self.tokens = flat.shape[0]
        module = self.module
        try:
            if self.family == "mixtral":
                groups = [(module.gate, module.experts, flat)]
            elif self.family == "ernie":
                groups = [(module.text_moe.gate, module.text_moe.experts, flat[~is_image]),
                          (module.vision_moe.gate, module.vision_moe.experts, flat[is_image])]
            else:
                groups = [(group.router, group.experts, tokens) for group, tokens in
                          ((module.text_moe, flat[~is_image]), (module.image_moe, flat[is_image])) if group is not None]
            rows = []
            for router, experts, tokens in groups:
                if tokens.numel():
                    index = router(tokens)[2]
                    index = index[index < experts.num_experts]
                    rows.append((experts, torch.bincount(index, minlength=experts.num_experts).tolist()))
            self.rows = rows
        except (AttributeError, TypeError, ValueError, IndexError):
            self.rows = None

    def matmuls(self):
        """The block's expert matmuls alone (per expert: gate_up, activation, down) on rows already grouped by
        expert, for this input's routing: the work no kernel can avoid."""
        work = []
        for experts, counts in self.rows:
            for expert, count in enumerate(counts):
                if count:
                    rows = torch.randn(count, experts.gate_up_proj.shape[-1])
                    work.append((rows, experts.gate_up_proj[expert], experts.down_proj[expert], experts.act_fn))

        def run():
            for rows, gate_up_proj, down_proj, act_fn in work:
                gate, up = torch.nn.functional.linear(rows, gate_up_proj).chunk(2, dim=-1)
                torch.nn.functional.linear(act_fn(gate) * up, down_proj)

        return run


def routing_image_tokens(args) -> int:
    """The routing block's image tokens: the prompt's share of `--routing_tokens`."""
    return round(args.routing_tokens * args.image_tokens / (args.image_tokens + args.text_tokens))


def measure_routing(args, clock, baseline_modules, notes):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, args.routing_tokens, args.hidden, generator=generator)
    types = torch.zeros(1, args.routing_tokens, dtype=torch.long)
    types[:, : routing_image_tokens(args)] = 1
    blocks = []
    for router in ("topk", "top_p", "relu"):
        sources = [("ours", (modeling_sparsemoe_vlm, configuration_sparsemoe_vlm))]
        if baseline_modules is not None:
            sources.append(("baseline", baseline_modules))
        for family, (modeling, configuration) in sources:
            config = our_config(configuration, args, router_type=router, num_hidden_layers=1)
            module = build(lambda c, m=modeling: m.SparseMoEVLMSparseMoeBlock(c, layer_idx=0), config, args.seed)
            blocks.append(Block(family, router, module, "types"))
    if "mixtral" not in args.skip:
        blocks.append(Block("mixtral", "topk", build(MixtralSparseMoeBlock, mixtral_config(args), args.seed), None))
    if "ernie" not in args.skip:
        config, _ = ernie_config(args)
        if config is not None:
            from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeMoeBlock
            blocks.append(Block("ernie", "topk", build(Ernie4_5_VLMoeMoeBlock, config, args.seed), "types"))
    with torch.no_grad():
        for block in blocks:
            block.timer = ExpertsTimer(block.module, clock)
            block.route(x, types)
    # (block, kernel) arms, plus one matmuls-only arm (kernel None) per block whose routing is known; the baseline
    # checkout's block has ours' weights and routing, so it shares ours' matmuls-only arm.
    arms = [(block, kernel) for block in blocks for kernel in args.kernels]
    arms += [(block, None) for block in blocks if block.rows is not None and block.family != "baseline"]
    matmuls = {id(block): block.matmuls() for block, kernel in arms if kernel is None}
    times = {(id(block), kernel): {"block": [], "experts": [], "calls": 0} for block, kernel in arms}
    with torch.no_grad():
        for round_index in range(args.warmup + args.repeats):
            shift = round_index % len(arms)
            for block, kernel in arms[shift:] + arms[:shift]:
                if kernel is not None:
                    set_kernel(block.module, kernel)
                block.timer.seconds, block.timer.calls = 0.0, 0
                start = clock()
                if kernel is None:
                    matmuls[id(block)]()
                else:
                    block(x, types)
                elapsed = clock() - start
                if round_index >= args.warmup:
                    row = times[(id(block), kernel)]
                    row["block"].append(elapsed)
                    row["experts"].append(block.timer.seconds)
                    row["calls"] = block.timer.calls
    results = []
    for block, kernel in arms:
        if kernel is None:
            continue
        row = times[(id(block), kernel)]
        if row["calls"] == 0:
            notes.append(f"routing: {block.family} {block.router} {kernel}: no experts module was called (the "
                         "fraction counts the whole block)")
        twin = block if block.family != "baseline" else next(
            (b for b in blocks if b.family == "ours" and b.router == block.router), None)
        matmul_s = times[(id(twin), None)]["block"] if twin is not None and (id(twin), None) in times else None
        results.append({
            "family": block.family, "router": block.router, "kernel": kernel,
            "experts_per_token": block.experts_per_token, "experts_calls": row["calls"],
            "block_s": row["block"], "experts_s": row["experts"], "matmuls_only_s": matmul_s,
            "fraction": [1 - e / b for e, b in zip(row["experts"], row["block"], strict=True)],
            "non_matmul_fraction": (None if matmul_s is None else
                                    [1 - m / b for m, b in zip(matmul_s, row["block"], strict=True)])})
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Report


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return (f"{statistics.median(values) * scale:.{digits}f} [{min(values) * scale:.{digits}f}–"
            f"{max(values) * scale:.{digits}f}]")


def percent_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0%} [{min(values):.0%}–{max(values):.0%}]"


def ratio(ours: list[float], other: list[float]) -> str:
    paired = [a / b for a, b in zip(ours, other, strict=True)]
    return f"{statistics.median(ours) / statistics.median(other):.2f}x [{min(paired):.2f}–{max(paired):.2f}]"


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    load_start = os.getloadavg()
    started = time.perf_counter()
    baseline_modules = load_checkout(args.baseline_checkout) if args.baseline_checkout else None
    models, notes = build_models(args, baseline_modules)
    ours = models["ours"].module
    experts_share = sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts_modules(ours))
    ours_parameters = count_parameters(ours)
    experts_share /= ours_parameters
    del ours

    measurements = {}  # name -> {arm key: [seconds]}
    loads = {}  # name -> 1-minute load average when the measurement ended
    gc.collect()
    if "decode" in args.measurements:
        measurements["decode, per token"] = measure_decode(args, models, clock)
        loads["decode, per token"] = os.getloadavg()[0]
    if "prefill" in args.measurements:
        for image_tokens in args.prefill_image_tokens:
            name = f"prefill, {image_tokens} image + {args.text_tokens} text tokens"
            measurements[name] = measure_prefill(args, models, clock, image_tokens)
            loads[name] = os.getloadavg()[0]
    if "train" in args.measurements:
        for grads in ("fresh", "kept") if args.train_grads == "both" else (args.train_grads,):
            gc.collect()
            name = f"train step, {args.train_batch} x {args.image_tokens + args.text_tokens} tokens, {grads} grads"
            measurements[name] = measure_train(args, models, clock, keep_grads=grads == "kept")
            loads[name] = os.getloadavg()[0]
    routing = []
    if "routing" in args.measurements:
        del models  # the routing blocks are small, but free the big models first
        gc.collect()
        routing = measure_routing(args, clock, baseline_modules, notes)
        loads["routing"] = os.getloadavg()[0]
    load_end = os.getloadavg()

    threads = torch.get_num_threads()
    clock_note = ("process CPU time (time.process_time)" if args.clock == "cpu" else "wall time (time.perf_counter)")
    if args.clock == "cpu" and threads > 1:
        clock_note += f", summed over {threads} threads"
    header = [
        f"preset {args.preset}: hidden {args.hidden}, {args.layers} sparse layers, {args.heads} heads, "
        f"{args.experts} text + {args.image_experts} image experts of width {args.expert_width}, top-{args.top_k}, "
        f"{args.shared_experts} shared; ours {ours_parameters / 1e6:.0f}M parameters ({experts_share:.0%} "
        f"experts), fp32, attention sdpa",
        f"prompt {args.image_tokens} image + {args.text_tokens} text tokens; decode {args.decode_steps} steps; "
        f"train batch {args.train_batch}; routing {args.routing_tokens} tokens; {args.repeats} repeats "
        f"({args.train_repeats} for train) after {args.warmup} warm-up round(s), interleaved",
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, {threads} torch "
        f"thread(s), {os.cpu_count()} CPUs ({platform.machine()}); clock: {clock_note}",
        f"load average (1/5/15 min) at start {'/'.join(f'{v:.2f}' for v in load_start)}, at end "
        f"{'/'.join(f'{v:.2f}' for v in load_end)}; {time.perf_counter() - started:.0f} s wall in all",
        "1-minute load average after each measurement: " + ", ".join(f"{k} {v:.2f}" for k, v in loads.items()),
    ]
    print("\n".join(header))
    for note in notes:
        print(f"note: {note}")

    parameters = {}
    if measurements:
        arm_keys = list(dict.fromkeys(key for times in measurements.values() for key in times))
        names = list(measurements)
        print("\nTimes in ms, median [min–max] over the repeats:\n")
        print("| model | experts kernel | " + " | ".join(names) + " |")
        print("| --- " * (2 + len(names)) + "|")
        for key in arm_keys:
            family, kernel = key.split("/")
            cells = [spread(measurements[n][key], 1e3) if key in measurements[n] else "—" for n in names]
            print(f"| {LABELS[family]} | {kernel} | " + " | ".join(cells) + " |")
        others = [f for f in ("dense", "mixtral", "ernie", "baseline") if any(k.startswith(f + "/") for k in arm_keys)]
        print("\nRatios of medians, ours / other [min–max of the per-repeat paired ratios]; Mixtral, Ernie and the "
              "baseline checkout with the same experts kernel:\n")
        print("| measurement | experts kernel | " + " | ".join(f"ours / {LABELS[f]}" for f in others) + " |")
        print("| --- " * (2 + len(others)) + "|")
        ratios = {}
        for name, times in measurements.items():
            for key in times:
                family, kernel = key.split("/")
                if family != "ours":
                    continue
                cells = []
                for other in others:
                    other_key = f"{other}/-" if other == "dense" else f"{other}/{kernel}"
                    cells.append(ratio(times[key], times[other_key]) if other_key in times else "—")
                    if other_key in times:
                        ratios[f"{name} | {kernel} | ours / {other}"] = (
                            statistics.median(times[key]) / statistics.median(times[other_key]))
                print(f"| {name} | {kernel} | " + " | ".join(cells) + " |")
        parameters = {"ratios": ratios}
    if routing:
        print(f"\nRouting + dispatch share of one sparse block at {args.routing_tokens} tokens "
              f"({routing_image_tokens(args)} image tokens): 1 - (time inside the experts modules) / (block time), "
              "median [min–max]:\n")
        print("| block | router | experts kernel | experts / token | block (ms) | inside experts modules (ms) | "
              "routing + dispatch: 1 - experts / block | expert matmuls alone (ms) | 1 - matmuls / block |")
        print("| --- " * 9 + "|")
        for row in routing:
            per_token = f"{row['experts_per_token']:.2f}" if row["experts_per_token"] is not None else "?"
            matmuls = ("—", "—") if row["matmuls_only_s"] is None else (
                spread(row["matmuls_only_s"], 1e3, 1), percent_spread(row["non_matmul_fraction"]))
            print(f"| {LABELS[row['family']]} | {row['router']} | {row['kernel']} | {per_token} | "
                  f"{spread(row['block_s'], 1e3, 1)} | {spread(row['experts_s'], 1e3, 1)} | "
                  f"{percent_spread(row['fraction'])} | {matmuls[0]} | {matmuls[1]} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "setup": header, "notes": notes, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch_threads": threads, "clock": args.clock, "load_average_start": load_start, "load_average_end": load_end,
        "load_average_1min_after": loads,
        "seconds": measurements, "routing": routing, **parameters}, indent=2))


if __name__ == "__main__":
    main()
