# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""SparseMoE-VLM configuration: a vision tower, a projector and a Llama-family decoder with sparse,
modality-aware Mixture-of-Experts layers."""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.modeling_rope_utils import RopeParameters
from transformers.models.auto.configuration_auto import AutoConfig


ROUTER_TYPES = ("topk", "top_p", "relu")
MLP_LAYER_TYPES = ("dense", "sparse")
VISION_FEATURE_SELECT_STRATEGIES = ("default", "full")

# Vision towers whose image token count `vision_tower_geometry` predicts (tested for each): others are refused rather
# than guessed (Swin merges patches, ViT-MAE drops them at random, DeiT has two class tokens, RegNet and MobileViT
# downsample differently).
SUPPORTED_VISION_TOWERS = ("siglip_vision_model", "clip_vision_model", "dinov2", "dinov2_with_registers", "vit",
                           "convnext", "convnextv2", "resnet")
# Vision towers whose sequence has no class token in front of the patch tokens.
_TOWERS_WITHOUT_CLS_TOKEN = ("siglip_vision_model",)
# Transformer towers whose position embeddings exist for `vision_config.image_size` only (no interpolation by default).
_TOWERS_WITH_FIXED_POSITIONS = ("siglip_vision_model", "clip_vision_model", "vit")
# Keys `to_dict` writes into every saved config: their presence means the arguments come from a file.
_SERIALISATION_MARKERS = ("transformers_version", "architectures", "auto_map")


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"`{field}` {message}")


def _check_activation(name: Any, field: str) -> None:
    # An unknown name would only fail when the model is built, with a bare KeyError from ACT2FN.
    _check(isinstance(name, str) and name in ACT2FN, field,
           f"{name!r} is not an activation of transformers (`transformers.activations.ACT2FN`); use one of "
           f"{sorted(ACT2FN)}.")


@strict
class SparseMoEVLMTextConfig(PreTrainedConfig):
    r"""
    Configuration of the sparse Mixture-of-Experts language decoder of SparseMoE-VLM.

    The decoder is a Llama-family transformer (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLPs) in
    which the layers marked `"sparse"` in `mlp_layer_types` replace the dense MLP by modality-aware experts:

    - `num_experts` text experts and `num_image_experts` image experts. Image tokens (`mm_token_type_ids == 1`) are
      routed among the image experts, text tokens among the text experts. With `num_image_experts=0` a single pool of
      `num_experts` experts serves every token.
    - `num_shared_experts` always-on experts (one SwiGLU MLP of width `num_shared_experts * moe_intermediate_size`)
      that see every token.

    Routing (`router_type`):

    - `"topk"`: softmax over the group's experts, the `num_experts_per_tok` most probable experts are used, their
      weights renormalised to sum to one when `norm_topk_prob`.
    - `"top_p"`: dynamic routing. Each token takes the fewest experts whose probability mass reaches `router_top_p`
      (at least one, at most `router_max_experts_per_tok`), so the number of experts varies per token.
    - `"relu"`: adaptive mask. Gates are `relu(router logits)`: an expert whose gate is zero is switched off for that
      token. Sparsity comes from an L1 penalty on the gates, i.e. the negative log-likelihood of a Laplace prior with
      scale `router_laplace_b` (coefficient `1 / b`). With `router_target_active_experts` set, the coefficient is
      adapted during training (multiplied or divided by `router_laplace_adapt_rate` once per optimizer step, see
      `SparseMoEVLMForConditionalGeneration.adapt_laplace_scales`) so that the average number of active experts per
      token moves toward the target.

    `router_bias` adds a learned bias to the router logits (zero-initialised). Upcycled ReLU routers use it: zero
    router weights with a bias of `1 / num_experts` open every copied expert with gates summing to one, so the
    upcycled layer starts equal to the dense MLP and the L1 penalty then switches experts off.

    `prefix_attention` makes the prompt a prefix that attends bidirectionally (PaliGemma's prefix-LM): every prompt
    token, image tokens included, sees the whole prompt, so image tokens can attend to a question that follows the
    image; answer tokens stay causal. The prompt is the input of `generate`'s prefill, the tokens before each row's
    first label when training, or an explicit `prefix_mask`; any other forward stays causal. Off by default
    (LLaVA-style checkpoints are trained causally).

    Auxiliary losses, each with its own coefficient and only added to the loss when labels are given: the
    load-balancing loss (`router_aux_loss_coef`, computed per modality group), the router z-loss
    (`router_z_loss_coef`) and the L1/Laplace term (`router_l1_loss_coef`, relu routing only).
    """

    model_type = "sparsemoe_vlm_text"
    base_config_key = "text_config"
    default_theta = 10000.0
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.text_moe.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.text_moe.experts.down_proj": "rowwise",
        "layers.*.mlp.text_moe.experts": "moe_tp_experts",
        "layers.*.mlp.image_moe.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.image_moe.experts.down_proj": "rowwise",
        "layers.*.mlp.image_moe.experts": "moe_tp_experts",
    }
    base_model_ep_plan = {
        "layers.*.mlp.text_moe.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.text_moe.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.text_moe.experts": "ep_dispatch_experts",
        "layers.*.mlp.image_moe.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.image_moe.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.image_moe.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32064
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    prefix_attention: bool = False
    mlp_bias: bool = False
    mlp_layer_types: list[str] | None = None
    num_experts: int = 4
    num_image_experts: int = 4
    num_shared_experts: int = 0
    moe_intermediate_size: int = 1408
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    router_type: str = "topk"
    router_top_p: float = 0.5
    router_max_experts_per_tok: int | None = None
    router_laplace_b: float = 1.0
    router_target_active_experts: float | None = None
    router_laplace_adapt_rate: float = 1.2
    router_jitter_noise: float = 0.0
    router_bias: bool = False
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    router_l1_loss_coef: float = 0.01
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self._check_fields()

    def _check_fields(self) -> None:
        """Raise a `ValueError` naming the offending field for every inconsistent setting."""
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "head_dim", "max_position_embeddings", "moe_intermediate_size"):
            _check(getattr(self, field) > 0, field, f"must be a positive integer, got {getattr(self, field)}.")
        _check(self.intermediate_size >= 0, "intermediate_size", f"must be >= 0, got {self.intermediate_size}.")
        _check_activation(self.hidden_act, "hidden_act")
        # nn.Embedding counts a negative `padding_idx` from the end: -1 would silently freeze the last token's row.
        _check(self.pad_token_id is None or 0 <= self.pad_token_id < self.vocab_size, "pad_token_id",
               f"({self.pad_token_id}) must be None or in [0, {self.vocab_size}) (`vocab_size`): set it to the "
               "tokenizer's pad token id, or None if it has none.")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
               f"({self.num_key_value_heads}) must divide `num_attention_heads` ({self.num_attention_heads}).")
        for field in ("num_image_experts", "num_shared_experts"):
            _check(getattr(self, field) >= 0, field, f"must be >= 0, got {getattr(self, field)}.")
        _check(self.num_experts > 0, "num_experts", f"must be a positive integer, got {self.num_experts}.")
        _check(self.router_type in ROUTER_TYPES, "router_type",
               f"must be one of {ROUTER_TYPES}, got {self.router_type!r}.")
        _check(self.num_experts_per_tok > 0, "num_experts_per_tok",
               f"must be a positive integer, got {self.num_experts_per_tok}.")
        if self.router_type == "topk":
            _check(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                   f"({self.num_experts_per_tok}) is larger than the text expert group (`num_experts`="
                   f"{self.num_experts}).")
            _check(self.num_image_experts == 0 or self.num_experts_per_tok <= self.num_image_experts,
                   "num_experts_per_tok", f"({self.num_experts_per_tok}) is larger than the image expert group "
                   f"(`num_image_experts`={self.num_image_experts}); lower it or set `num_image_experts=0` to share "
                   "the text experts.")
        _check(0.0 < self.router_top_p <= 1.0, "router_top_p", f"must be in (0, 1], got {self.router_top_p}.")
        if self.router_max_experts_per_tok is not None:
            smallest_group = min(n for n in (self.num_experts, self.num_image_experts) if n > 0)
            _check(0 < self.router_max_experts_per_tok <= smallest_group, "router_max_experts_per_tok",
                   f"must be in [1, {smallest_group}] (the smallest expert group), got "
                   f"{self.router_max_experts_per_tok}.")
        _check(self.router_laplace_b > 0, "router_laplace_b",
               f"(the Laplace prior scale) must be > 0, got {self.router_laplace_b}.")
        _check(self.router_laplace_adapt_rate >= 1.0, "router_laplace_adapt_rate",
               f"must be >= 1, got {self.router_laplace_adapt_rate}.")
        if self.router_target_active_experts is not None:
            _check(self.router_target_active_experts > 0, "router_target_active_experts",
                   f"must be > 0, got {self.router_target_active_experts}.")
        _check(self.router_jitter_noise >= 0, "router_jitter_noise", f"must be >= 0, got {self.router_jitter_noise}.")
        for field in ("router_aux_loss_coef", "router_z_loss_coef", "router_l1_loss_coef"):
            _check(getattr(self, field) >= 0, field, f"must be >= 0, got {getattr(self, field)}.")
        _check(len(self.mlp_layer_types) == self.num_hidden_layers, "mlp_layer_types",
               f"has {len(self.mlp_layer_types)} entries but `num_hidden_layers` is {self.num_hidden_layers}.")
        unknown = sorted({t for t in self.mlp_layer_types if t not in MLP_LAYER_TYPES})
        _check(not unknown, "mlp_layer_types", f"entries must be in {MLP_LAYER_TYPES}, got {unknown}.")
        if "dense" in self.mlp_layer_types:
            _check(self.intermediate_size > 0, "intermediate_size",
                   "must be positive when `mlp_layer_types` has dense layers.")

    @property
    def sparse_layer_indices(self) -> list[int]:
        return [i for i, layer_type in enumerate(self.mlp_layer_types) if layer_type == "sparse"]

    @property
    def expert_groups(self) -> dict[str, int]:
        """Routed expert groups of a sparse layer and their number of experts (`"text"` serves every token when
        there is no image group)."""
        groups = {"text": self.num_experts}
        if self.num_image_experts > 0:
            groups["image"] = self.num_image_experts
        return groups


def _check_supported_tower(model_type: str | None) -> None:
    if model_type not in SUPPORTED_VISION_TOWERS:
        raise ValueError(
            f"`vision_config` model_type {model_type!r} is not supported: SparseMoE-VLM cannot produce image features "
            "from it, as the number of image tokens it gives cannot be predicted from its config. Supported vision "
            f"towers: {', '.join(SUPPORTED_VISION_TOWERS)}."
        )


def vision_tower_geometry(vision_config: PreTrainedConfig, image_size: int, feature_layer: int,
                          select_strategy: str) -> tuple[int, int]:
    """Number of image tokens one image becomes, and their feature width, for a vision tower config.

    Transformer towers (SigLIP, CLIP, DINOv2, ViT) give `(image_size / patch_size)^2` patch tokens, after the class
    (and register) tokens are dropped under the `"default"` strategy. Convolutional towers (ConvNeXt, ResNet) give
    feature maps whose pixels become tokens. Raises `ValueError` for towers that cannot produce such features.
    """
    model_type = getattr(vision_config, "model_type", None)
    _check_supported_tower(model_type)
    hidden_sizes = getattr(vision_config, "hidden_sizes", None)
    if hidden_sizes:  # convolutional tower: hidden_states = (stem, stage_1, ..., stage_n)
        num_states = len(hidden_sizes) + 1
        _check(-num_states <= feature_layer < num_states, "vision_feature_layer",
               f"({feature_layer}) is out of range for a {model_type} tower with {num_states} hidden states.")
        layer = feature_layer % num_states
        stem_stride = getattr(vision_config, "patch_size", None) or 4
        first_stage_stride = 2 if getattr(vision_config, "downsample_in_first_stage", False) else 1
        stride = stem_stride if layer == 0 else stem_stride * first_stage_stride * 2 ** (layer - 1)
        width = (getattr(vision_config, "embedding_size", None) or hidden_sizes[0]) if layer == 0 else \
            hidden_sizes[layer - 1]
        side = -(-image_size // stride)  # ceil: strided convolutions pad odd sizes up
        return side * side, width

    patch_size = getattr(vision_config, "patch_size", None)
    hidden_size = getattr(vision_config, "hidden_size", None)
    if not (isinstance(patch_size, int) and isinstance(hidden_size, int)
            and isinstance(getattr(vision_config, "image_size", None), int)):
        raise ValueError(
            f"`vision_config` (model_type={model_type!r}) cannot produce image features: supported towers are "
            "vision transformers with `image_size`, `patch_size` and `hidden_size` (SigLIP, CLIP, DINOv2, ViT) or "
            "convolutional backbones with `hidden_sizes` (ConvNeXt, ResNet). Pass one of those vision configs."
        )
    _check(patch_size > 0, "vision_config.patch_size", f"must be a positive integer, got {patch_size}.")
    _check(image_size >= patch_size, "image_size",
           f"({image_size}) is smaller than `vision_config.patch_size` ({patch_size}): the tower would give no image "
           "token. Use images of at least one patch.")
    num_layers = getattr(vision_config, "num_hidden_layers", None)
    if isinstance(num_layers, int):  # hidden_states = (embeddings, layer_1, ..., layer_n)
        _check(num_layers >= 1, "vision_config.num_hidden_layers",
               f"must be at least 1 ({model_type} towers with no encoder layer return no hidden states).")
        _check(-(num_layers + 1) <= feature_layer <= num_layers, "vision_feature_layer",
               f"({feature_layer}) is out of range for a {model_type} tower with {num_layers + 1} hidden states.")
    num_patches = (image_size // patch_size) ** 2
    if select_strategy == "full" and model_type not in _TOWERS_WITHOUT_CLS_TOKEN:
        num_patches += 1 + (getattr(vision_config, "num_register_tokens", None) or 0)
    return num_patches, hidden_size


def _refuse_missing_sub_configs(sub_configs: dict[str, Any]) -> None:
    """A saved config always holds both sub-configs. Without one, the defaults would take its place (a 24-layer,
    2048-wide decoder: gigabytes allocated before the checkpoint's weights fail to load)."""
    for key, value in sub_configs.items():
        if value is None:
            raise ValueError(
                f"The SparseMoE-VLM config to load has no `{key}`: a config written by `save_pretrained` holds both "
                "`vision_config` and `text_config`. Add the missing sub-config to config.json (or pass it, e.g. "
                f"`from_pretrained(path, {key}=...)`); build `SparseMoEVLMConfig(...)` in code for the defaults."
            )


@strict
class SparseMoEVLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`SparseMoEVLMForConditionalGeneration`]: a vision tower (an in-library vision encoder from
    `SUPPORTED_VISION_TOWERS`; SigLIP by default), a two-layer MLP projector and a [`SparseMoEVLMTextConfig`] sparse
    decoder.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Vision tower config. SigLIP, CLIP, DINOv2 (with or without registers) and ViT towers give patch tokens;
            ConvNeXt (V1, V2) and ResNet give feature maps flattened to tokens. Other towers are refused: their
            number of image tokens cannot be predicted from their config.
        text_config (`dict` or `SparseMoEVLMTextConfig`, *optional*):
            Sparse decoder config.
        image_token_id (`int`, *optional*, defaults to 32000):
            Id of the placeholder token replaced by image features.
        image_size (`int`, *optional*):
            Square resolution fed to the vision tower. Defaults to `vision_config.image_size` (224 for towers that
            have none, e.g. ResNet); SigLIP, CLIP and ViT towers take only their own `vision_config.image_size`.
        image_seq_length (`int`, *optional*):
            Number of image tokens per image. Derived from the tower; a given value must match.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the projector MLP.
        vision_feature_layer (`int`, *optional*, defaults to -1):
            Hidden state of the vision tower used as image features.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the class/register tokens of transformer towers, `"full"` keeps them.
        multimodal_projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector linears have biases.
        image_position_embeddings (`bool`, *optional*, defaults to `False`):
            Add a learned embedding per image token position after the projector. Convolutional towers give
            features without absolute position and the decoder's 1D rotary positions hide the 2D layout; this
            gives every image token its place in the grid. For a square grid it starts from the token's row and
            column coordinates (in [-1, 1], channels 0 and 1), so positions can be compared from the first step.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the LM head shares the input embedding matrix.

    Example:

    ```python
    >>> from hf_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMForConditionalGeneration
    >>> config = SparseMoEVLMConfig(text_config={"router_type": "top_p", "num_image_experts": 2})
    >>> model = SparseMoEVLMForConditionalGeneration(config)
    ```"""

    model_type = "sparsemoe_vlm"
    # Trainer's evaluation keeps only the logits of the outputs.
    keys_to_ignore_at_inference = ["cache", "aux_loss", "z_loss", "l1_loss", "router_logits", "routing_stats",
                                   "image_hidden_states", "image_outputs", "hidden_states", "attentions"]
    attribute_map = {"image_token_index": "image_token_id"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=SparseMoEVLMTextConfig),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    image_size: int | None = None
    image_seq_length: int | None = None
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    multimodal_projector_bias: bool = True
    image_position_embeddings: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        from_file = any(marker in kwargs for marker in _SERIALISATION_MARKERS)
        if from_file:
            _refuse_missing_sub_configs({"vision_config": self.vision_config, "text_config": self.text_config})
        super().__post_init__(**kwargs)
        _check(isinstance(self.text_config, SparseMoEVLMTextConfig), "text_config",
               f"must be a SparseMoEVLMTextConfig (or its dict), got {type(self.text_config).__name__}.")
        if getattr(self.vision_config, "vision_use_head", False):
            # SigLIP's pooling head is never used (the decoder reads patch tokens); without it no parameter sits
            # idle under DDP, and disk offload does not trip on nn.MultiheadAttention's direct weight access.
            self.vision_config.vision_use_head = False
        _check(self.vision_feature_select_strategy in VISION_FEATURE_SELECT_STRATEGIES,
               "vision_feature_select_strategy",
               f"must be one of {VISION_FEATURE_SELECT_STRATEGIES}, got {self.vision_feature_select_strategy!r}.")
        _check_supported_tower(getattr(self.vision_config, "model_type", None))
        _check_activation(self.projector_hidden_act, "projector_hidden_act")
        tower_image_size = getattr(self.vision_config, "image_size", None)
        if self.image_size is None:
            self.image_size = tower_image_size or 224
        _check(self.image_size > 0, "image_size", f"must be a positive integer, got {self.image_size}.")
        if self.vision_config.model_type in _TOWERS_WITH_FIXED_POSITIONS:
            # The tower's forward would fail on a position embedding size mismatch deep inside the tower.
            _check(self.image_size == tower_image_size, "image_size",
                   f"({self.image_size}) differs from `vision_config.image_size` ({tower_image_size}): "
                   f"{self.vision_config.model_type} towers have position embeddings for that size only. Leave "
                   "`image_size` unset, or set both to the same value.")
        num_tokens, _ = vision_tower_geometry(self.vision_config, self.image_size, self.vision_feature_layer,
                                              self.vision_feature_select_strategy)
        if self.image_seq_length is None:
            self.image_seq_length = num_tokens
        _check(self.image_seq_length == num_tokens, "image_seq_length",
               f"({self.image_seq_length}) does not match the {num_tokens} tokens the vision tower gives for "
               f"{self.image_size}px images; leave it unset to derive it.")
        _check(0 <= self.image_token_id < self.text_config.vocab_size, "image_token_id",
               f"({self.image_token_id}) must be inside the vocabulary (`text_config.vocab_size`="
               f"{self.text_config.vocab_size}).")
        if from_file:
            self.check_special_tokens()
        # Like Llava: a checkpoint may carry the flag on its text config only.
        if not self.tie_word_embeddings and self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "SparseMoEVLMConfig":
        config_dict = dict(config_dict)
        for key in ("vision_config", "text_config"):  # a sub-config passed when loading completes the dict
            if config_dict.get(key) is None and kwargs.get(key) is not None:
                config_dict[key] = kwargs.pop(key)
        _refuse_missing_sub_configs({key: config_dict.get(key) for key in ("vision_config", "text_config")})
        return super().from_dict(config_dict, **kwargs)

    def check_special_tokens(self) -> None:
        """Raise a `ValueError` when `image_token_id` is also the decoder's EOS, pad or BOS token.

        Checked when a config is loaded from a file, saved, and on every forward of the model, not when one is built
        in code: conversion scripts build a config with a placeholder image token id and set the tokenizer's once the
        embeddings have its row (as `build_processor` does)."""
        text_config = self.text_config
        # As the EOS token, generation could never stop (the image token is suppressed) and no EOS would be learnt
        # (image-token labels are ignored); as the pad or BOS token, those positions would count as image tokens.
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(text_config, name, None)
            ids = value if isinstance(value, (list, tuple)) else [value]
            _check(self.image_token_id not in ids, "image_token_id",
                   f"({self.image_token_id}) is also `text_config.{name}` ({value}): the image placeholder needs a "
                   "token of its own (the processor's `<image>` token; `build_processor` sets it).")

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.check_special_tokens()
        return super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def _experts_implementation(self) -> str | None:
        return self._experts_implementation_internal

    @_experts_implementation.setter
    def _experts_implementation(self, value: str | dict | None) -> None:
        # A plain string names the decoder's experts kernel: the vision tower has no experts and would reject it.
        if isinstance(value, str):
            value = {"": value, "text_config": value}
        PreTrainedConfig._experts_implementation.fset(self, value)

    @property
    def vision_feature_size(self) -> int:
        return vision_tower_geometry(self.vision_config, self.image_size, self.vision_feature_layer,
                                     self.vision_feature_select_strategy)[1]


__all__ = ["SUPPORTED_VISION_TOWERS", "SparseMoEVLMConfig", "SparseMoEVLMTextConfig"]
