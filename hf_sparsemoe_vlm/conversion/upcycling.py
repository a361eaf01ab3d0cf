# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Sparse upcycling: turn the dense MLPs of a Llama-family decoder (Llama, Mistral, Qwen2) into expert groups, and
build SparseMoE-VLM models from LLaVA checkpoints or from a vision encoder + a causal LM. The scripts in
`conversion/` are command-line front ends to these functions (with what they share in `scripts.py`).

Every routed expert of an upcycled layer starts as a copy of the dense MLP. With noise off the converted model
computes exactly what the dense model computed: top-k and top-p routing weights are renormalised to sum to one,
ReLU routers start with zero weights and a bias of `1 / num_experts` (gates summing to one), and shared experts
take a share of the MLP's output projection that the routed experts give up.
"""

import torch
from transformers import PreTrainedConfig

from ..configuration_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMTextConfig
from ..modeling_sparsemoe_vlm import ROUTER_CLASSES, SparseMoEVLMForConditionalGeneration


SUPPORTED_TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Decoder config fields carried over unchanged from a dense Llama-family config.
_COPIED_TEXT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
                       "initializer_range", "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
                       "rope_parameters", "attention_dropout")


def parse_layer_selection(selection: str | list[int], num_layers: int) -> list[int]:
    """Layers to make sparse: `"all"`, `"every_other"` (1, 3, 5, ...), `"every_other_even"` (0, 2, 4, ...:
    MoE-LLaVA's `sparse` mode) or a comma-separated list / list of indices (negative indices count from the end)."""
    if isinstance(selection, str):
        name = selection.strip().lower()
        if name == "all":
            return list(range(num_layers))
        if name == "every_other":
            return list(range(1, num_layers, 2))
        if name == "every_other_even":
            return list(range(0, num_layers, 2))
        try:
            selection = [int(part) for part in name.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"Layer selection {selection!r} is not 'all', 'every_other', 'every_other_even' or a "
                             f"comma-separated list of layer indices.") from None
    layers = sorted({index % num_layers if -num_layers <= index < num_layers else index for index in selection})
    bad = [index for index in layers if not 0 <= index < num_layers]
    if bad or not layers:
        raise ValueError(f"Layer selection {selection} is empty or out of range for a decoder with {num_layers} "
                         f"layers (valid indices: 0..{num_layers - 1}).")
    return layers


def sparse_text_config_from_dense(
    dense_config: PreTrainedConfig,
    sparse_layers: str | list[int] = "every_other",
    num_experts: int = 4,
    num_image_experts: int = 4,
    num_shared_experts: int = 0,
    num_experts_per_tok: int = 2,
    router_type: str = "topk",
    **router_settings,
) -> SparseMoEVLMTextConfig:
    """The sparse decoder config for a dense Llama / Mistral / Qwen2 text config: every architectural setting is
    copied, the selected layers become sparse with experts as wide as the dense MLP."""
    model_type = getattr(dense_config, "model_type", None)
    if model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ValueError(f"Cannot upcycle a {model_type!r} language model: supported decoders are "
                         f"{SUPPORTED_TEXT_MODEL_TYPES} (Llama-family attention and SwiGLU MLPs).")
    if router_type not in ROUTER_CLASSES:
        raise ValueError(f"Unknown router_type {router_type!r}; available: {sorted(ROUTER_CLASSES)}.")
    router_class = ROUTER_CLASSES[router_type]
    if router_settings.get("norm_topk_prob") is False and router_class.normalises_weights:
        raise ValueError("Upcycling needs `norm_topk_prob=True`: with copied experts, only routing weights that sum "
                         "to one keep the dense model's outputs.")
    fields = {name: getattr(dense_config, name) for name in _COPIED_TEXT_FIELDS if hasattr(dense_config, name)}
    if model_type == "qwen2":
        attention_bias = True  # Qwen2 has q/k/v biases; o_proj gets a zero bias (LlamaAttention biases all four)
    else:
        attention_bias = bool(getattr(dense_config, "attention_bias", False))
    layers = parse_layer_selection(sparse_layers, dense_config.num_hidden_layers)
    return SparseMoEVLMTextConfig(
        **fields,
        intermediate_size=dense_config.intermediate_size,
        moe_intermediate_size=dense_config.intermediate_size,
        attention_bias=attention_bias,
        mlp_bias=bool(getattr(dense_config, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(dense_config, "tie_word_embeddings", False)),
        mlp_layer_types=["sparse" if i in layers else "dense" for i in range(dense_config.num_hidden_layers)],
        num_experts=num_experts,
        num_image_experts=num_image_experts,
        num_shared_experts=num_shared_experts,
        num_experts_per_tok=num_experts_per_tok,
        router_type=router_type,
        router_bias=router_class.upcycling_needs_bias or router_settings.pop("router_bias", False),
        **router_settings,
    )


def _perturbed_copies(weight: torch.Tensor, copies: int, noise_std: float, generator: torch.Generator | None):
    """`copies` stacked copies of `weight`; with `noise_std > 0` each gets Gaussian noise scaled by the weight's own
    standard deviation (breaks the symmetry between experts)."""
    stacked = weight.unsqueeze(0).repeat(copies, *([1] * weight.ndim)).clone()
    if noise_std > 0:
        noise = torch.randn(stacked.shape, generator=generator, dtype=torch.float32)
        stacked += (noise * noise_std * weight.float().std()).to(stacked.dtype)
    return stacked


def upcycle_decoder_state_dict(
    dense_state: dict[str, torch.Tensor],
    text_config: SparseMoEVLMTextConfig,
    noise_std: float = 0.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Map a dense Llama-family decoder's weights (keys of its base model: `embed_tokens.weight`,
    `layers.<i>.self_attn.q_proj.weight`, `layers.<i>.mlp.gate_proj.weight`, `norm.weight`, ...) to the keys of
    a `SparseMoEVLMTextModel` built from `text_config`. Dense layers are copied; sparse layers get their expert
    groups from the MLP. Raises `KeyError` naming any weight the dense state lacks and `ValueError` on shape
    mismatches; every input weight must be used."""
    generator = torch.Generator().manual_seed(seed)
    remaining = dict(dense_state)

    def take(key: str) -> torch.Tensor:
        if key not in remaining:
            raise KeyError(f"The dense checkpoint has no weight {key!r} (expected a Llama-family decoder with "
                           f"{text_config.num_hidden_layers} layers).")
        return remaining.pop(key)

    state = {"embed_tokens.weight": take("embed_tokens.weight"), "norm.weight": take("norm.weight")}
    share_routed = 1.0 / (1 + text_config.num_shared_experts)  # the routed mixture is one "expert" among equals
    for i in range(text_config.num_hidden_layers):
        prefix = f"layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            state[prefix + name] = take(prefix + name)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"{prefix}self_attn.{proj}"
            weight = take(key + ".weight")
            state[key + ".weight"] = weight
            if text_config.attention_bias:
                bias = remaining.pop(key + ".bias", None)
                state[key + ".bias"] = bias if bias is not None else weight.new_zeros(weight.shape[0])
        gate, up, down = (take(f"{prefix}mlp.{proj}.weight") for proj in ("gate_proj", "up_proj", "down_proj"))
        if text_config.mlp_bias:
            raise ValueError("Upcycling MLPs with biases is not supported (the fused experts have no bias).")
        if text_config.mlp_layer_types[i] == "dense":
            state.update({f"{prefix}mlp.gate_proj.weight": gate, f"{prefix}mlp.up_proj.weight": up,
                          f"{prefix}mlp.down_proj.weight": down})
            continue
        if gate.shape[0] != text_config.moe_intermediate_size:
            raise ValueError(f"Layer {i}: the dense MLP is {gate.shape[0]} wide but `moe_intermediate_size` is "
                             f"{text_config.moe_intermediate_size}; upcycled experts copy the MLP and must match.")
        for group, num_experts in text_config.expert_groups.items():
            group_prefix = f"{prefix}mlp.{group}_moe."
            state[group_prefix + "experts.gate_up_proj"] = _perturbed_copies(torch.cat([gate, up], 0), num_experts,
                                                                            noise_std, generator)
            state[group_prefix + "experts.down_proj"] = _perturbed_copies(down * share_routed, num_experts,
                                                                         noise_std, generator)
            router_class = ROUTER_CLASSES[text_config.router_type]
            for name, tensor in router_class.upcycled_state(text_config, num_experts, gate.dtype, generator).items():
                state[f"{group_prefix}router.{name}"] = tensor
        if text_config.num_shared_experts:
            copies = text_config.num_shared_experts
            state[f"{prefix}mlp.shared_experts.gate_proj.weight"] = torch.cat([gate] * copies, 0)
            state[f"{prefix}mlp.shared_experts.up_proj.weight"] = torch.cat([up] * copies, 0)
            # Each shared copy gets the same share as the routed mixture: together they sum to the dense MLP.
            state[f"{prefix}mlp.shared_experts.down_proj.weight"] = torch.cat([down * share_routed] * copies, 1)
    leftover = sorted(k for k in remaining if not k.startswith("rotary_emb."))
    if leftover:
        raise ValueError(f"Weights of the dense decoder were not used by the conversion: {leftover[:8]}"
                         + (" ..." if len(leftover) > 8 else "") + "; is this a Llama-family decoder?")
    return state


def upcycle_llava(
    llava_model,
    sparse_layers: str | list[int] = "every_other",
    num_experts: int = 4,
    num_image_experts: int = 4,
    num_shared_experts: int = 0,
    num_experts_per_tok: int = 2,
    router_type: str = "topk",
    noise_std: float = 0.0,
    seed: int = 0,
    **router_settings,
) -> SparseMoEVLMForConditionalGeneration:
    """A `SparseMoEVLMForConditionalGeneration` from a Transformers `LlavaForConditionalGeneration`: vision tower,
    projector, embeddings, attention, norms and LM head copied; the MLPs of `sparse_layers` upcycled."""
    llava_config = llava_model.config
    if getattr(llava_config, "model_type", None) != "llava":
        raise ValueError(f"Expected a LlavaForConditionalGeneration, got model_type "
                         f"{getattr(llava_config, 'model_type', None)!r}.")
    if not isinstance(llava_config.vision_feature_layer, int):
        raise ValueError(f"LLaVA checkpoints that concatenate several vision layers "
                         f"(vision_feature_layer={llava_config.vision_feature_layer}) are not supported; the "
                         f"projector input would not match one layer's features.")
    text_config = sparse_text_config_from_dense(
        llava_config.text_config, sparse_layers, num_experts, num_image_experts, num_shared_experts,
        num_experts_per_tok, router_type, **router_settings)
    vision_config = llava_config.vision_config
    config = SparseMoEVLMConfig(
        vision_config=vision_config.to_dict(), text_config=text_config, image_token_id=llava_config.image_token_id,
        image_size=vision_config.image_size, projector_hidden_act=llava_config.projector_hidden_act,
        vision_feature_layer=llava_config.vision_feature_layer,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        multimodal_projector_bias=llava_config.multimodal_projector_bias,
        tie_word_embeddings=bool(getattr(llava_config, "tie_word_embeddings", False) or text_config.tie_word_embeddings),
    )
    source = llava_model.state_dict()
    decoder_prefix = "model.language_model."
    decoder = upcycle_decoder_state_dict(
        {k[len(decoder_prefix):]: v for k, v in source.items() if k.startswith(decoder_prefix)}, text_config,
        noise_std=noise_std, seed=seed)
    state = {decoder_prefix + k: v for k, v in decoder.items()}
    for key, value in source.items():
        # SigLIP's attention-pooling head is never used for image features; the converted tower has none.
        if key.startswith(("model.vision_tower.", "model.multi_modal_projector.")) and \
                not key.startswith("model.vision_tower.head."):
            state[key] = value
    state["lm_head.weight"] = source["lm_head.weight"]
    model = SparseMoEVLMForConditionalGeneration(config)
    # strict: every weight of the new model comes from the checkpoint, and every checkpoint weight is used.
    model.load_state_dict({**state, **_laplace_defaults(config)}, strict=True)
    return model.eval()


def _laplace_defaults(config: SparseMoEVLMConfig) -> dict[str, torch.Tensor]:
    """The ReLU routers' Laplace coefficient buffers at their configured start value."""
    text_config = config.text_config
    if not ROUTER_CLASSES[text_config.router_type].has_laplace_scale:
        return {}
    value = torch.tensor(1.0 / text_config.router_laplace_b)
    return {f"model.language_model.layers.{i}.mlp.{group}_moe.router.laplace_inv_scale": value.clone()
            for i in text_config.sparse_layer_indices for group in text_config.expert_groups}


def add_upcycling_arguments(parser) -> None:
    """Command-line options shared by the upcycling scripts (`conversion/upcycle_llava.py`, `conversion/compose.py`)."""
    group = parser.add_argument_group("upcycling")
    group.add_argument("--sparse_layers", default="every_other",
                       help="Layers whose MLP becomes experts: all, every_other (1, 3, ...), every_other_even "
                            "(0, 2, ...) or a comma-separated list of indices. Default: every_other.")
    group.add_argument("--num_experts", type=int, default=4, help="Text experts per sparse layer (default 4).")
    group.add_argument("--num_image_experts", type=int, default=4,
                       help="Image experts per sparse layer; 0 = one pool for all tokens (default 4).")
    group.add_argument("--num_shared_experts", type=int, default=0, help="Always-on shared experts (default 0).")
    group.add_argument("--num_experts_per_tok", type=int, default=2, help="Top-k of the topk router (default 2).")
    group.add_argument("--router_type", choices=tuple(ROUTER_CLASSES), default="topk")
    group.add_argument("--router_top_p", type=float, default=0.5, help="Mass threshold of the top_p router.")
    group.add_argument("--noise_std", type=float, default=0.0,
                       help="Relative Gaussian noise on each expert copy (0 = exact copies, the converted model then "
                            "reproduces the dense one).")
    group.add_argument("--seed", type=int, default=0, help="Seed of router initialisation and noise.")


def upcycling_options(args) -> dict:
    """The keyword arguments of `upcycle_llava` / `sparse_text_config_from_dense` from parsed arguments."""
    return {name: getattr(args, name) for name in ("sparse_layers", "num_experts", "num_image_experts",
                                                   "num_shared_experts", "num_experts_per_tok", "router_type",
                                                   "router_top_p")}


__all__ = [
    "SUPPORTED_TEXT_MODEL_TYPES",
    "add_upcycling_arguments",
    "parse_layer_selection",
    "sparse_text_config_from_dense",
    "upcycle_decoder_state_dict",
    "upcycle_llava",
    "upcycling_options",
]
