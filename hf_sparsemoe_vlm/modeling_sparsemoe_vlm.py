# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""SparseMoE-VLM: vision tower -> projector -> image features merged at the image tokens -> Llama-family decoder
whose sparse layers route image tokens and text tokens to their own expert groups."""

import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, batched_mm_experts_forward
from transformers.masking_utils import create_causal_mask, create_masks_for_generate
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MoeModelOutputWithPast,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.auto import AutoModel
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import maybe_autocast, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMTextConfig


logger = logging.get_logger(__name__)

# Checkpoints with one tensor per expert (`<group>_moe.experts.<e>.{gate,up,down}_proj.weight`, the layout of
# Mixtral-style tools) are fused into the (E, 2I, H) / (E, H, I) parameters at load time, as Transformers does for
# its own MoE models; `save_pretrained(save_original_format=True)` writes that per-expert layout back.
register_checkpoint_conversion_mapping(
    "sparsemoe_vlm",
    [
        WeightConverter(
            source_patterns=["_moe.experts.*.gate_proj.weight", "_moe.experts.*.up_proj.weight"],
            target_patterns="_moe.experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns=["_moe.experts.*.down_proj.weight"],
            target_patterns="_moe.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ],
    overwrite=True,  # the modeling file is imported again as remote code next to the installed package
)


@dataclass
class SparseMoEVLMRouting:
    """What the router of one expert group of one sparse layer decided (returned with `output_routing=True`).

    Attributes:
        layer_idx: index of the decoder layer.
        group: `"text"` or `"image"` (the text group serves every token when there is no image group).
        router_logits: `(tokens_in_group, experts_in_group)` float32 router logits.
        top_k_weights: `(tokens_in_group, slots)` weight of each expert a token uses, as given to the experts kernel.
        top_k_index: `(tokens_in_group, slots)` the experts a token uses; a slot a token leaves unused (dynamic
            routers) holds the sentinel index `experts_in_group` and weight 0.
        token_index: `(tokens_in_group,)` positions of the group's tokens in the flattened `(batch * seq_len)` input.
        token_mask: `(tokens_in_group,)` booleans, `None` when every row is the group's: the shape-static dispatch
            used under `torch.compile` routes every token through both groups and marks here which are this group's
            (the others use no expert).
    """

    layer_idx: int
    group: str
    router_logits: torch.Tensor
    top_k_weights: torch.Tensor
    top_k_index: torch.Tensor
    token_index: torch.Tensor
    token_mask: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.router_logits.shape[-1]

    @property
    def expert_mask(self) -> torch.Tensor:
        """`(tokens_in_group, experts_in_group)` booleans: which experts each token uses."""
        used = F.one_hot(self.top_k_index, num_classes=self.num_experts + 1)[..., : self.num_experts]
        return used.sum(dim=-2) > 0

    def counted_tokens(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`(tokens_in_group,)` booleans: the group's own tokens that are not padding (`attention_mask`: the flattened
        `(batch * seq_len)` mask of this forward's tokens, None when there is no padding)."""
        device = self.router_logits.device
        counted = torch.ones(self.token_index.shape[0], dtype=torch.bool, device=device)
        if attention_mask is not None:
            counted = attention_mask.to(device)[self.token_index.to(device)].bool()
        if self.token_mask is not None:
            counted = counted & self.token_mask.to(device)
        return counted

    @property
    def routing_weights(self) -> torch.Tensor:
        """`(tokens_in_group, experts_in_group)` weight of each expert for each token, zero where it is off."""
        dense = self.top_k_weights.new_zeros(self.top_k_weights.shape[0], self.num_experts + 1)
        return dense.scatter_add(-1, self.top_k_index, self.top_k_weights)[:, : self.num_experts]


@dataclass
class SparseMoEVLMTextModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    router_logits (`tuple[torch.FloatTensor]`, *optional*):
        One `(batch_size * sequence_length, experts)` float32 tensor per sparse layer, as in Transformers' MoE models:
        each token's row holds the logits of its own group's router (columns past a smaller group's experts are
        `-inf`). Returned with `output_router_logits=True`.
    routing (`tuple[SparseMoEVLMRouting]`, *optional*):
        One routing record per (sparse layer, expert group), in forward order; returned with `output_routing=True`.
    """

    routing: tuple[SparseMoEVLMRouting, ...] | None = None


@dataclass
class SparseMoEVLMModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    r"""
    router_logits (`tuple[torch.FloatTensor]`, *optional*):
        One `(batch_size * sequence_length, experts)` float32 tensor per sparse layer (see
        `SparseMoEVLMTextModelOutputWithPast`); returned with `output_router_logits=True`.
    routing (`tuple[SparseMoEVLMRouting]`, *optional*):
        One routing record per (sparse layer, expert group), in forward order; returned with `output_routing=True`.
    image_hidden_states (`torch.FloatTensor` of shape `(num_images, image_seq_length, hidden_size)`, *optional*):
        Projected image features that replaced the image tokens.
    """

    router_logits: tuple[torch.FloatTensor, ...] | None = None
    routing: tuple[SparseMoEVLMRouting, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class SparseMoEVLMCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    aux_loss (`torch.FloatTensor`, *optional*):
        Load-balancing loss, averaged over sparse layers and modality groups (1.0 for perfectly balanced routing).
    z_loss (`torch.FloatTensor`, *optional*):
        Router z-loss (mean squared log-sum-exp of the router logits).
    l1_loss (`torch.FloatTensor`, *optional*):
        L1 / Laplace-prior penalty on the ReLU gates (relu routing only), already scaled by `1 / b`.
    router_logits (`tuple[torch.FloatTensor]`, *optional*):
        One `(batch_size * sequence_length, experts)` float32 tensor per sparse layer, returned with
        `output_router_logits=True` (see `SparseMoEVLMTextModelOutputWithPast`).
    routing (`tuple[SparseMoEVLMRouting]`, *optional*):
        One routing record per (sparse layer, expert group), returned with `output_routing=True`.
    routing_stats (`dict[str, torch.Tensor]`, *optional*):
        Detached routing statistics for logging, per group `g`: `g/expert_load` (sparse layers x experts, share of
        the group's token-expert assignments), `g/tokens_per_expert` (same shape, counts) and
        `g/experts_per_token` (average number of active experts per token).
    image_hidden_states (`torch.FloatTensor`, *optional*):
        Projected image features that replaced the image tokens.
    """

    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    l1_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    routing: tuple[SparseMoEVLMRouting, ...] | None = None
    routing_stats: dict[str, torch.Tensor] | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class SparseMoEVLMImageFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    pooler_output (`torch.FloatTensor` of shape `(num_images, image_seq_length, hidden_size)`):
        The projected image features that replace the image tokens.
    vision_tokens (`torch.FloatTensor` of shape `(num_images, image_seq_length, vision_feature_size)`):
        The vision tower's features those come from, before the projector: one row per grid cell, row by row.
    """

    vision_tokens: torch.FloatTensor | None = None


class SparseMoEVLMMLP(nn.Module):
    """SwiGLU MLP, named like Llama's so dense checkpoints map onto dense layers and shared experts."""

    def __init__(self, config: SparseMoEVLMTextConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def _experts_swiglu(expert_inputs, gate_up_proj, down_proj, rows_per_expert, act_fn):
    """Each expert's SwiGLU MLP on its rows of `expert_inputs` (grouped by expert, `rows_per_expert` each; at least
    one row in all): the outputs and the gate/up projections, each concatenated in row order."""
    gate_up_outputs, outputs = [], []
    for expert_idx, expert_input in enumerate(expert_inputs.split(rows_per_expert)):
        if expert_input.shape[0] == 0:
            continue
        gate_up_outputs.append(F.linear(expert_input, gate_up_proj[expert_idx]))
        gate, up = gate_up_outputs[-1].chunk(2, dim=-1)
        outputs.append(F.linear(act_fn(gate) * up, down_proj[expert_idx]))
    return torch.cat(outputs), torch.cat(gate_up_outputs)


class _ExpertsSwiGLU(torch.autograd.Function):
    """Every expert's SwiGLU MLP on its rows (`expert_inputs` grouped by expert, `rows_per_expert` each), with a
    backward that writes each expert's weight gradient straight into one gradient of the fused tensor. Autograd
    through per-expert slices would build that gradient from per-expert pieces: a zero-filled (E, 2I, H) tensor
    per expert hit when indexing, or one more full copy (a stack) when unbinding."""

    @staticmethod
    def forward(ctx, expert_inputs, gate_up_proj, down_proj, rows_per_expert, act_fn):
        outputs, gate_up_outputs = _experts_swiglu(expert_inputs, gate_up_proj, down_proj, rows_per_expert, act_fn)
        ctx.save_for_backward(expert_inputs, gate_up_proj, down_proj, gate_up_outputs)
        ctx.rows_per_expert, ctx.act_fn = rows_per_expert, act_fn
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_outputs):
        expert_inputs, gate_up_proj, down_proj, gate_up_outputs = ctx.saved_tensors
        rows = ctx.rows_per_expert
        need_input, need_gate_up, need_down = ctx.needs_input_grad[:3]
        grad_inputs = torch.empty_like(expert_inputs) if need_input else None
        grad_gate_up = torch.empty_like(gate_up_proj) if need_gate_up else None
        grad_down = torch.empty_like(down_proj) if need_down else None
        splits = zip(expert_inputs.split(rows), gate_up_outputs.split(rows), grad_outputs.split(rows),
                     grad_inputs.split(rows) if need_input else [None] * len(rows), strict=True)
        for expert_idx, (expert_input, gate_up_output, grad_output, grad_input) in enumerate(splits):
            if expert_input.shape[0] == 0:  # an expert no row used: zero gradient
                for grad in (grad_gate_up, grad_down):
                    if grad is not None:
                        grad[expert_idx].zero_()
                continue
            gate, up = gate_up_output.chunk(2, dim=-1)
            with torch.enable_grad():
                gate = gate.detach().requires_grad_()
                activated = ctx.act_fn(gate)
            grad_hidden = grad_output @ down_proj[expert_idx]
            if need_down:
                torch.mm(grad_output.T, activated.detach() * up, out=grad_down[expert_idx])
            (grad_gate,) = torch.autograd.grad(activated, gate, grad_hidden * up)
            grad_gate_up_output = torch.cat([grad_gate, grad_hidden * activated.detach()], dim=-1)
            if need_gate_up:
                torch.mm(grad_gate_up_output.T, expert_input, out=grad_gate_up[expert_idx])
            if need_input:
                torch.mm(grad_gate_up_output, gate_up_proj[expert_idx], out=grad_input)
        return grad_inputs, grad_gate_up, grad_down, None, None


def eager_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The per-expert loop: one pair of matmuls per expert hit, on that expert's rows only.

    The (token, slot) pairs are grouped by expert with one sort and counted with one host sync (instead of a mask
    and a sync per expert); index `num_experts` is the "no expert" sentinel (see SparseMoEVLMExpertGroup), sorted
    last and never run. It indexes one expert's weights at a time, so it also runs experts quantised by torchao (a
    tensor subclass the grouped and batched kernels cannot take)."""
    num_top_k = top_k_index.shape[-1]
    if hidden_states.shape[0] == 1 and not torch.is_grad_enabled():
        # One token (a decoding step at batch size 1): its experts one after the other, with no grouping or scatter,
        # which would cost more than the two matmuls per expert at this size. Summed in expert order, as below.
        output = None
        for expert_idx, slot in sorted((expert, slot) for slot, expert in enumerate(top_k_index[0].tolist())):
            if expert_idx >= self.num_experts:
                continue
            gate, up = F.linear(hidden_states, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx]) * top_k_weights[:, slot, None]
            output = expert_out if output is None else output + expert_out
        return torch.zeros_like(hidden_states) if output is None else output.to(hidden_states.dtype)
    sorted_experts, order = top_k_index.reshape(-1).sort(stable=True)
    rows_per_expert = torch.bincount(sorted_experts, minlength=self.num_experts + 1)[: self.num_experts].tolist()
    num_pairs = sum(rows_per_expert)
    if num_pairs == 0:
        return torch.zeros_like(hidden_states)
    order = order[:num_pairs]
    token_idx = order // num_top_k
    expert_inputs = hidden_states[token_idx]
    weights = (self.gate_up_proj, self.down_proj)
    trainable = any(weight.requires_grad for weight in weights)
    if torch.is_grad_enabled() and trainable and all(_is_plain_tensor(weight) for weight in weights):
        expert_outputs = _ExpertsSwiGLU.apply(expert_inputs, *weights, rows_per_expert, self.act_fn)
    else:
        expert_outputs, _ = _experts_swiglu(expert_inputs, *weights, rows_per_expert, self.act_fn)
    weighted = expert_outputs * top_k_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden_states).index_add(0, token_idx, weighted.to(hidden_states.dtype))


def _is_plain_tensor(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter) and type(tensor.data) is torch.Tensor


def _unless_quantized(kernel):
    """`kernel`, except for experts whose weights a quantisation library replaced with a tensor subclass (e.g.
    torchao's `Int8Tensor`): Transformers' grouped and batched kernels transpose, gather and `bmm` the whole 3D
    tensor, which those subclasses do not implement; the per-expert loop reads one expert at a time and runs them."""

    def run(self, hidden_states, top_k_index, top_k_weights):
        if _is_plain_tensor(self.gate_up_proj) and _is_plain_tensor(self.down_proj):
            return kernel(self, hidden_states, top_k_index, top_k_weights)
        logger.warning_once(
            f"The experts kernel `{self.config._experts_implementation}` cannot run quantised expert tensors "
            f"({type(self.gate_up_proj.data).__name__}); the per-expert loop (`eager`) runs them instead, reading "
            "only the experts each step uses."
        )
        return eager_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    return run


# Our experts' kernels: Transformers' registered ones, each falling back to the per-expert loop for quantised weights.
EXPERTS_FUNCTIONS = ExpertsInterface()
for _name in ("grouped_mm", "batched_mm"):
    EXPERTS_FUNCTIONS[_name] = _unless_quantized(ALL_EXPERTS_FUNCTIONS[_name])


@use_experts_implementation(experts_interface=EXPERTS_FUNCTIONS)
class SparseMoEVLMExperts(nn.Module):
    """One expert group's SwiGLU experts, stored fused as 3D tensors so that Transformers' experts kernels
    (`eager`, `batched_mm`, `grouped_mm`) can run them."""

    def __init__(self, config: SparseMoEVLMTextConfig, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if torch.compiler.is_compiling() and not self.training:
            # The loop runs the experts hit, a data-dependent set that torch.compile cannot capture in one graph;
            # Transformers' batched kernel has static shapes (it gathers each token's expert weights).
            return batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        return eager_experts_forward(self, hidden_states, top_k_index, top_k_weights)


class SparseMoEVLMRouter(nn.Module):
    """Linear router of one expert group; one subclass per routing scheme decides which experts each token uses.

    `forward` returns the float32 `router_logits` (what the losses need) and `(top_k_weights, top_k_index)` with
    `max_active_experts` slots per token (what the experts kernel needs). Dynamic routers give the slots a token
    leaves unused the sentinel index `num_experts` and weight 0, the convention of Transformers' expert-parallel
    kernels. The class attributes and class methods answer what other modules ask about a scheme.
    """

    router_type: str
    # Whether the number of experts depends on the token (the active parameter count is then an average).
    dynamic: bool = True
    # Whether the router carries the coefficient `1 / b` of a Laplace prior (an L1 penalty) on its gates.
    has_laplace_scale: bool = False
    # Whether a token's weights are renormalised to sum to one (`norm_topk_prob`); upcycled copies of one MLP then
    # reproduce it.
    normalises_weights: bool = True
    # Whether `upcycled_state` needs the router bias (`router_bias=True`).
    upcycling_needs_bias: bool = False

    def __init__(self, config: SparseMoEVLMTextConfig, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.max_active_experts = self.experts_per_token_bound(config, num_experts)
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if config.router_bias else None

    @classmethod
    def experts_per_token_bound(cls, config: SparseMoEVLMTextConfig, num_experts: int) -> int:
        """The most experts of a group of `num_experts` that one token can use."""
        raise NotImplementedError

    @classmethod
    def describe(cls, config: SparseMoEVLMTextConfig) -> str:
        """The routing scheme in a few words (model cards)."""
        raise NotImplementedError

    @classmethod
    def upcycled_state(
        cls, config: SparseMoEVLMTextConfig, num_experts: int, dtype: torch.dtype, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """Initial router tensors (`weight`, and `bias` when the config has one) for a group of experts that are
        all copies of one dense MLP: a random router, as sparse upcycling starts from."""
        state = {"weight": torch.empty(num_experts, config.hidden_size, dtype=dtype).normal_(
            0.0, config.initializer_range, generator=generator)}
        if config.router_bias:
            state["bias"] = torch.zeros(num_experts, dtype=dtype)
        return state

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(tokens, num_experts)` logits -> `top_k_weights`, `top_k_index`, each `(tokens, max_active_experts)`."""
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        # Routing decisions in float32 whatever the model dtype or autocast (bf16 logits tie and flip experts).
        with maybe_autocast(device_type=hidden_states.device.type, enabled=False):
            bias = self.bias.float() if self.bias is not None else None
            router_logits = F.linear(hidden_states.float(), self.weight.float(), bias)
            top_k_weights, top_k_index = self.route(router_logits)
        return router_logits, top_k_weights, top_k_index


class SparseMoEVLMTopKRouter(SparseMoEVLMRouter):
    """Softmax over the group's experts; each token uses its `num_experts_per_tok` most probable experts, their
    weights renormalised to sum to one when `norm_topk_prob` (Mixtral's router)."""

    router_type = "topk"
    dynamic = False

    def __init__(self, config: SparseMoEVLMTextConfig, num_experts: int):
        super().__init__(config, num_experts)
        self.norm_topk_prob = config.norm_topk_prob

    @classmethod
    def experts_per_token_bound(cls, config: SparseMoEVLMTextConfig, num_experts: int) -> int:
        return config.num_experts_per_tok

    @classmethod
    def describe(cls, config: SparseMoEVLMTextConfig) -> str:
        return f"top-k softmax, k = {config.num_experts_per_tok}"

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_k_weights, top_k_index = router_logits.softmax(dim=-1).topk(self.max_active_experts, dim=-1)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return top_k_weights, top_k_index


class SparseMoEVLMTopPRouter(SparseMoEVLMRouter):
    """Dynamic routing: each token uses the fewest most probable experts whose probability mass reaches
    `router_top_p` (at least one, at most `router_max_experts_per_tok`)."""

    router_type = "top_p"

    def __init__(self, config: SparseMoEVLMTextConfig, num_experts: int):
        super().__init__(config, num_experts)
        self.top_p = config.router_top_p
        self.norm_topk_prob = config.norm_topk_prob

    @classmethod
    def experts_per_token_bound(cls, config: SparseMoEVLMTextConfig, num_experts: int) -> int:
        return min(config.router_max_experts_per_tok or num_experts, num_experts)

    @classmethod
    def describe(cls, config: SparseMoEVLMTextConfig) -> str:
        bound = config.router_max_experts_per_tok or max(config.expert_groups.values())
        return f"top-p (p = {config.router_top_p}, at most {bound} experts per token)"

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sorted_probs, order = router_logits.softmax(dim=-1).topk(self.max_active_experts, dim=-1)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < self.top_p  # the mass before an expert is short of p
        top_k_weights = sorted_probs * keep
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return top_k_weights, order.masked_fill(~keep, self.num_experts)


class SparseMoEVLMReLURouter(SparseMoEVLMRouter):
    """Adaptive mask: gates are `relu(router logits)`, and an expert whose gate is zero is off for that token. An L1
    penalty on the gates, the negative log-likelihood of a Laplace prior with scale `b`, drives the sparsity; its
    coefficient `laplace_inv_scale = 1 / b` can be adapted toward a target number of active experts per token,
    once per optimizer step (`observe` during training forwards, then `adapt_laplace_scale`)."""

    router_type = "relu"
    has_laplace_scale = True
    normalises_weights = False
    upcycling_needs_bias = True

    def __init__(self, config: SparseMoEVLMTextConfig, num_experts: int):
        super().__init__(config, num_experts)
        self.laplace_inv_scale = nn.Buffer(torch.tensor(1.0 / config.router_laplace_b))
        self.target_active_experts = config.router_target_active_experts
        self.adapt_rate = config.router_laplace_adapt_rate
        # Active (token, expert) pairs and tokens seen since the last adaptation: plain attributes, not buffers,
        # so that DDP's buffer broadcast does not overwrite each process's own counts.
        self.observed: torch.Tensor | None = None
        self.forwards_observed = 0

    @classmethod
    def experts_per_token_bound(cls, config: SparseMoEVLMTextConfig, num_experts: int) -> int:
        return num_experts

    @classmethod
    def describe(cls, config: SparseMoEVLMTextConfig) -> str:
        return (f"ReLU with L1 (Laplace prior, b = {config.router_laplace_b}); target "
                f"{config.router_target_active_experts} active experts per token")

    @classmethod
    def upcycled_state(
        cls, config: SparseMoEVLMTextConfig, num_experts: int, dtype: torch.dtype, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        # Zero weights and a bias of 1/E: every copied expert is open with gates summing to one, so the upcycled layer
        # starts equal to the dense MLP, and the L1 penalty then switches experts off.
        return {"weight": torch.zeros(num_experts, config.hidden_size, dtype=dtype),
                "bias": torch.full((num_experts,), 1.0 / num_experts, dtype=dtype)}

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = F.relu(router_logits)
        experts = torch.arange(self.num_experts, device=gates.device).expand_as(gates)
        return gates, experts.masked_fill(gates == 0, self.num_experts)

    @torch.no_grad()
    def observe(self, routing: SparseMoEVLMRouting, token_mask: torch.Tensor | None) -> None:
        """Count the active experts of this forward's real tokens (`token_mask`: flattened attention mask)."""
        used = routing.top_k_index < self.num_experts
        real = routing.counted_tokens(token_mask).to(used.device)
        counts = torch.stack([used[real].sum(), real.sum()]).float()
        self.observed = counts if self.observed is None else self.observed + counts.to(self.observed.device)
        self.forwards_observed += 1
        if self.forwards_observed == 256:
            logger.warning_once(
                "The ReLU routers' Laplace coefficients have not been adapted for 256 training forwards although "
                "`router_target_active_experts` is set: add `hf_sparsemoe_vlm.app.training.LaplaceScaleCallback()` "
                "to the Trainer's callbacks, or call `model.adapt_laplace_scales()` after each optimizer step."
            )

    @torch.no_grad()
    def adapt_laplace_scale(self) -> None:
        """Multiply `1 / b` by `router_laplace_adapt_rate` when the tokens observed since the last call used more
        experts than the target on average, divide it otherwise; then start counting afresh."""
        observed, self.observed, self.forwards_observed = self.observed, None, 0
        if self.target_active_experts is None or observed is None or observed[1] == 0:
            return
        active = observed[0] / observed[1]
        factor = self.adapt_rate if active > self.target_active_experts else 1.0 / self.adapt_rate
        self.laplace_inv_scale.mul_(factor)


ROUTER_CLASSES: dict[str, type[SparseMoEVLMRouter]] = {
    router.router_type: router for router in (SparseMoEVLMTopKRouter, SparseMoEVLMTopPRouter, SparseMoEVLMReLURouter)
}


class SparseMoEVLMExpertGroup(nn.Module):
    """The router and the experts of one modality group in one sparse layer."""

    def __init__(self, config: SparseMoEVLMTextConfig, num_experts: int, layer_idx: int, group: str):
        super().__init__()
        self.layer_idx = layer_idx
        self.group = group
        self.router = ROUTER_CLASSES[config.router_type](config, num_experts)
        self.experts = SparseMoEVLMExperts(config, num_experts)
        # Unused (token, expert) slots hold the sentinel index `num_experts`, the convention of Transformers'
        # expert-parallel kernels: told that sentinels may occur (`_is_expert_parallel`), grouped_mm skips those rows
        # and batched_mm zeroes them. `forward` tells them per call (see there).
        self.experts._is_expert_parallel = True

    def forward(
        self, hidden_states: torch.Tensor, token_index: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SparseMoEVLMRouting]:
        router_logits, top_k_weights, top_k_index = self.router(hidden_states)
        # The sentinel is the group's global expert count: under expert parallelism `experts.num_experts` is the
        # local count, a valid global index of the next rank's experts.
        sentinel = self.router.num_experts
        if token_mask is not None:  # shape-static dispatch: tokens of the other modality use no expert
            top_k_weights = top_k_weights * token_mask[:, None]
            top_k_index = top_k_index.masked_fill(~token_mask[:, None], sentinel)
        compact_pairs = (self.router.dynamic and token_mask is None and not torch.compiler.is_compiling()
                         and self.experts.config._experts_implementation != "eager")
        # Masking sentinel rows costs the kernels three passes over the (pairs, 2 x width) activations, forward and
        # backward (about a sixth of a top-2 layer's training step on CPU), so they are told to only when a sentinel
        # can reach them: a slot left unused (shape-static dispatch, or a dynamic router's slots not compacted below)
        # or, under expert parallelism, another rank's expert (the experts then hold fewer than the group's).
        self.experts._is_expert_parallel = (
            self.experts.num_experts < sentinel or token_mask is not None or (self.router.dynamic and not compact_pairs)
        )
        if compact_pairs:
            # A variable number of experts per token: run only the used (token, expert) pairs, as a top-1 batch, so
            # that no kernel sorts or gathers the unused slots; then sum each token's pairs. (The eager loop skips
            # the unused slots itself.)
            token_idx, slot = (top_k_index < sentinel).nonzero(as_tuple=True)
            pair_output = self.experts(hidden_states[token_idx], top_k_index[token_idx, slot, None],
                                       top_k_weights[token_idx, slot, None].to(hidden_states.dtype))
            output = torch.zeros_like(hidden_states).index_add(0, token_idx, pair_output)
        else:
            output = self.experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype))
        routing = SparseMoEVLMRouting(
            self.layer_idx, self.group, router_logits, top_k_weights, top_k_index, token_index, token_mask
        )
        return output, routing


class SparseMoEVLMSparseMoeBlock(nn.Module):
    """Modality-aware sparse MLP: image tokens go to the image expert group, text tokens to the text expert group
    (one shared pool when `num_image_experts == 0`); optional shared experts see every token.

    Returns the output and the layer's router logits, one `(batch * seq_len, experts)` row per token from its own
    group's router (as Ernie 4.5 VL's modality-isolated block does), padded with `-inf` past a smaller group."""

    def __init__(self, config: SparseMoEVLMTextConfig, layer_idx: int):
        super().__init__()
        self.text_moe = SparseMoEVLMExpertGroup(config, config.num_experts, layer_idx, "text")
        self.image_moe = (
            SparseMoEVLMExpertGroup(config, config.num_image_experts, layer_idx, "image")
            if config.num_image_experts > 0
            else None
        )
        self.shared_experts = (
            SparseMoEVLMMLP(config, config.num_shared_experts * config.moe_intermediate_size)
            if config.num_shared_experts > 0
            else None
        )
        self.num_router_columns = max(config.expert_groups.values())

    def _pad_logits(self, logits: torch.Tensor) -> torch.Tensor:
        missing = self.num_router_columns - logits.shape[-1]
        return F.pad(logits, (0, missing), value=float("-inf")) if missing else logits

    def forward(
        self, hidden_states: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)
        all_tokens = torch.arange(flat.shape[0], device=flat.device)
        if self.image_moe is None or mm_token_type_ids is None:
            output, routing = self.text_moe(flat, all_tokens)
            router_logits = self._pad_logits(routing.router_logits)
        else:
            is_image = mm_token_type_ids.reshape(-1).to(flat.device) == 1
            if torch.compiler.is_compiling() and not self.training:
                # Splitting the tokens by modality gives data-dependent shapes; under torch.compile (e.g. decoding
                # with a static cache) both groups see every token, the other modality's with no expert.
                text_output, text_routing = self.text_moe(flat, all_tokens, ~is_image)
                image_output, image_routing = self.image_moe(flat, all_tokens, is_image)
                output = text_output + image_output
                router_logits = torch.where(is_image[:, None], self._pad_logits(image_routing.router_logits),
                                            self._pad_logits(text_routing.router_logits))
            else:
                # The two token sets partition the rows, so every row of `output` is written.
                output = torch.empty_like(flat)
                router_logits = flat.new_full((flat.shape[0], self.num_router_columns), float("-inf"),
                                              dtype=torch.float32)
                for group, token_index in ((self.text_moe, all_tokens[~is_image]),
                                           (self.image_moe, all_tokens[is_image])):
                    if token_index.numel() > 0:
                        group_output, routing = group(flat[token_index], token_index)
                        output.index_copy_(0, token_index, group_output.to(output.device))
                        router_logits[token_index, : routing.num_experts] = routing.router_logits.to(flat.device)
        if self.shared_experts is not None:
            output = output + self.shared_experts(flat).to(output.device)
        return output.reshape(batch_size, seq_len, hidden_dim), router_logits


class SparseMoEVLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: SparseMoEVLMTextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.is_sparse = config.mlp_layer_types[layer_idx] == "sparse"
        self.mlp = (
            SparseMoEVLMSparseMoeBlock(config, layer_idx)
            if self.is_sparse
            else SparseMoEVLMMLP(config, config.intermediate_size)
        )
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if self.is_sparse:
            hidden_states, _ = self.mlp(hidden_states, mm_token_type_ids)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class SparseMoEVLMPreTrainedModel(PreTrainedModel):
    config: SparseMoEVLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["SparseMoEVLMDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Under torch.compile the sparse layers switch to a shape-static dispatch (see SparseMoEVLMSparseMoeBlock).
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(SparseMoEVLMSparseMoeBlock, index=1),
        "routing": OutputRecorder(SparseMoEVLMExpertGroup, index=1),
        "hidden_states": SparseMoEVLMDecoderLayer,
        "attentions": LlamaAttention,
    }

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, writing the fused expert tensors by default (the layout the model
        computes with). `save_original_format=True` writes one tensor per expert and projection instead
        (`..._moe.experts.<e>.gate_proj.weight`, ...), for tools that need unfused experts; both layouts load.

        Remote-code checkpoints also map `AutoModel` to the backbone: serving engines (vLLM's Transformers backend)
        build it with `AutoModel.from_config(config, trust_remote_code=True)`."""
        if getattr(self, "_auto_class", None) is not None and isinstance(self.config, SparseMoEVLMConfig):
            backbone = f"{SparseMoEVLMModel.__module__.rsplit('.', 1)[-1]}.{SparseMoEVLMModel.__name__}"
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": backbone}
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with two things it cannot know about fused expert tensors.

        - `quantization_config=TorchAoConfig(quant_type)` quantises the experts' 3D tensors with the same
          `quant_type` as the linear layers (Transformers' torchao loading quantises `nn.Linear` weights only, and
          experts are most of the weights). A `quant_type` that cannot take 3D tensors is refused before loading; an
          `FqnToConfig` is taken as given (name the experts there to choose their scheme).
        - A `device_map` that names the fused tensors (`...experts.gate_up_proj`) instead of their module is
          refused: Accelerate places modules, and those tensors would stay on the meta device.
        - Expert tensors offloaded to disk for a CPU forward are memory-mapped (`map_disk_offloaded_experts`)
          instead of read whole at every step.
        """
        _check_expert_device_map(kwargs.get("device_map"))
        expert_quant_type = _expert_quant_type(kwargs.get("quantization_config"))
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # `output_loading_info=True` adds the info
        if expert_quant_type is not None:
            quantize_expert_tensors(model, expert_quant_type)
        map_disk_offloaded_experts(model)
        return loaded

    @classmethod
    def is_custom_code(cls) -> bool:
        # For custom code, Transformers skips initialising any module whose own parameters all loaded, guarding
        # against `_init_weights` that write tensors in place. Ours (and the vision towers') only use
        # `transformers.initialization`, which already skips loaded tensors; the guard would skip modules with no
        # parameters of their own that initialise their children (CLIPAttention sets q/k/v), so a vision tower
        # missing from a checkpoint would get another init than `Model(config)` gives it.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        config = self.config.get_text_config()
        std = config.initializer_range
        if isinstance(module, SparseMoEVLMExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, SparseMoEVLMMultiModalProjector) and module.position_embedding is not None:
            init.copy_(module.position_embedding, grid_position_init(*module.position_embedding.shape, std=std))
        elif isinstance(module, SparseMoEVLMRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            if module.has_laplace_scale:
                init.constant_(module.laplace_inv_scale, 1.0 / config.router_laplace_b)


# The fused expert tensors of every group, as torchao's `FqnToConfig` names parameters.
EXPERT_TENSORS_FQN = r"re:.*\.experts\.(gate_up_proj|down_proj)"


def _check_expert_device_map(device_map) -> None:
    if not isinstance(device_map, dict):
        return
    named = [key for key in device_map if re.fullmatch(EXPERT_TENSORS_FQN[3:], key)]
    if named:
        raise ValueError(
            f"`device_map` names fused expert tensors ({named[0]!r}), but Accelerate places modules: those tensors "
            f"would stay on the meta device. Name their module instead ({named[0].rsplit('.', 1)[0]!r}), or build "
            "the map with `hf_sparsemoe_vlm.expert_offload_device_map(...)`."
        )


def _expert_quant_type(quantization_config):
    """The torchao scheme to apply to the expert tensors after loading, or None. Checked on a small 3D tensor first,
    so that a scheme torchao cannot apply to fused experts fails before the checkpoint is read."""
    if getattr(quantization_config, "quant_method", None) != "torchao":
        return None
    from torchao.quantization import FqnToConfig, quantize_

    quant_type = quantization_config.quant_type
    if isinstance(quant_type, FqnToConfig) or isinstance(quant_type, (str, dict)):
        return None
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.randn(2, 256, 256), requires_grad=False)
    try:
        quantize_(experts, FqnToConfig({"gate_up_proj": quant_type}), filter_fn=None)
        if _is_plain_tensor(experts.gate_up_proj):
            raise TypeError("the tensor was left unquantised")
        F.linear(torch.randn(1, 256), experts.gate_up_proj[0])
    except Exception as error:
        raise ValueError(
            f"torchao cannot apply {type(quant_type).__name__} to the fused expert tensors (3D, one matrix per "
            f"expert): {type(error).__name__}: {error}. Int8WeightOnlyConfig() works for them. To keep another "
            "scheme for the linear layers, name the experts yourself: TorchAoConfig(FqnToConfig({"
            f"{EXPERT_TENSORS_FQN!r}: Int8WeightOnlyConfig(), ...}})) (or None there, to leave them in full "
            "precision)."
        ) from error
    return quant_type


def quantize_expert_tensors(model: nn.Module, quant_type) -> None:
    """Quantise every expert group's fused tensors in place with torchao's `quant_type` (e.g.
    `Int8WeightOnlyConfig()`), keeping those already quantised; `from_pretrained` calls it for a `TorchAoConfig`."""
    from torchao.quantization import FqnToConfig, quantize_

    for name, module in model.named_modules():
        if not isinstance(module, SparseMoEVLMExperts) or not _is_plain_tensor(module.gate_up_proj):
            continue
        if module.gate_up_proj.device.type == "meta":
            raise ValueError(
                f"{name} is offloaded (its tensors are on the meta device), and torchao cannot quantise offloaded "
                "tensors. Quantised experts are a quarter of the size: load them resident (no 'cpu'/'disk' entries "
                "for expert groups in `device_map`), or offload them without quantisation."
            )
        quantize_(module, FqnToConfig({"gate_up_proj": quant_type, "down_proj": quant_type}), filter_fn=None)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _safetensors_layout(path: str) -> dict:
    """Each tensor's dtype, shape and byte offset in a safetensors file (from its JSON header)."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
    return {name: (entry["dtype"], entry["shape"], 8 + header_size + entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}


def map_disk_offloaded_experts(model: nn.Module) -> int:
    """Memory-map the expert tensors that Accelerate offloaded to disk for a CPU forward; returns how many groups.

    Accelerate's disk offload reads a module's whole tensors before each forward: all E experts of a group to use the
    few a token is routed to. Mapped instead (read-only pages of the checkpoint or offload file, copy-on-write), the
    experts kernels touch only the rows of the experts a step uses, the OS pages those in on first use and keeps
    the frequently used ones cached (a hot/cold split managed by the page cache), and nothing is copied into the
    process's own memory. Tensors that need a dtype conversion, or whose forward runs on another device, are left to
    Accelerate."""
    mapped, files = 0, {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if (not isinstance(module, SparseMoEVLMExperts) or not getattr(hook, "offload", False)
                or hook.weights_map is None or torch.device(hook.execution_device).type != "cpu"):
            continue
        prefix, loader = getattr(hook.weights_map, "prefix", ""), getattr(hook.weights_map, "dataset", None)
        tensors = {}
        for name in ("gate_up_proj", "down_proj"):
            info = getattr(loader, "index", {}).get(prefix + name)
            if info is None:
                break  # kept in memory by Accelerate
            if info.get("safetensors_file"):
                path = info["safetensors_file"]
                if path not in files:
                    files[path] = _safetensors_layout(path)
                dtype_name, shape, offset = files[path][info.get("weight_name", prefix + name)]
                dtype = _SAFETENSORS_DTYPES.get(dtype_name)
            else:  # Accelerate's own offload file: raw bytes
                path = os.path.join(loader.save_folder, f"{prefix + name}.dat")
                dtype, shape, offset = getattr(torch, info["dtype"], None), info["shape"], 0
            converted = dtype is not None and info.get("dtype") not in (None, str(dtype).removeprefix("torch."))
            if dtype is None or converted or offset % dtype.itemsize:
                break  # converted on every read, or not aligned for a view
            numel = math.prod(shape)
            storage = torch.from_file(path, shared=False, size=(offset // dtype.itemsize) + numel, dtype=dtype)
            tensors[name] = storage[offset // dtype.itemsize:].view(shape)
        else:
            for name, tensor in tensors.items():
                module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
            hook.offload = False  # the mapped tensors stay in place between forwards
            mapped += 1
    return mapped


def _type_name(value) -> str:
    module = type(value).__module__
    return type(value).__name__ if module == "builtins" else f"{module.split('.')[0]}.{type(value).__name__}"


def _check_token_inputs(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
) -> None:
    """Raise a `TypeError` / `ValueError` naming the argument for token inputs PyTorch would fail on deep inside the
    decoder, or, for a short attention mask, silently pad. Shapes only: no device sync."""
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"`input_ids` must be a torch.Tensor, got {_type_name(input_ids)}: call the processor "
                            'with `return_tensors="pt"` (or wrap the ids with `torch.as_tensor`).')
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"`input_ids` must be a tensor of integer token ids (torch.long), got {input_ids.dtype}.")
        name, shape, dims = "input_ids", tuple(input_ids.shape), "(batch_size, sequence_length)"
    else:
        if not isinstance(inputs_embeds, torch.Tensor):
            raise TypeError(f"`inputs_embeds` must be a torch.Tensor, got {_type_name(inputs_embeds)}.")
        name, shape, dims = "inputs_embeds", tuple(inputs_embeds.shape), "(batch_size, sequence_length, hidden_size)"
    if len(shape) != dims.count(",") + 1:
        raise ValueError(f"`{name}` must have shape {dims}, got {shape}: add the batch dimension (`{name}[None]`) "
                         "for a single sequence.")
    if 0 in shape[:2]:
        raise ValueError(f"`{name}` is empty (shape {shape}): pass at least one sequence of at least one token.")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:  # 4D masks are the caller's own
        batch_size, seq_len = shape[:2]
        if attention_mask.shape[0] != batch_size:
            raise ValueError(f"`attention_mask` has {attention_mask.shape[0]} row(s) but the input has {batch_size}: "
                             "give one mask row per sequence.")
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask.shape[1] < past + seq_len:
            needed = f"{past + seq_len} ({past} cached + {seq_len} new)" if past else str(seq_len)
            raise ValueError(
                f"`attention_mask` covers {attention_mask.shape[1]} positions but the input needs {needed}: the mask "
                "covers the cached tokens and the new ones (the processor's mask, one more 1 per generated token)."
            )


def _check_mm_token_type_ids(mm_token_type_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> None:
    if mm_token_type_ids is not None and tuple(mm_token_type_ids.shape) != tuple(inputs_embeds.shape[:2]):
        raise ValueError(
            f"`mm_token_type_ids` has shape {tuple(mm_token_type_ids.shape)} but the input is "
            f"{tuple(inputs_embeds.shape[:2])} (batch, sequence length): give one entry per token."
        )


class SparseMoEVLMTextModel(SparseMoEVLMPreTrainedModel):
    """The sparse decoder, without the LM head."""

    config: SparseMoEVLMTextConfig
    base_model_prefix = "model"

    def __init__(self, config: SparseMoEVLMTextConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [SparseMoEVLMDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SparseMoEVLMTextModelOutputWithPast:
        r"""
        mm_token_type_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for image tokens (routed to the image experts), 0 for text tokens.
        prefix_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            With `config.prefix_attention`: 1 for the prompt tokens of this forward, which attend to each other in
            both directions (and to every cached token); 0 for tokens that attend causally.
        output_router_logits (`bool`, *optional*):
            Return each sparse layer's router logits (`router_logits`).
        output_routing (`bool`, *optional*):
            Return the routing records of every (sparse layer, expert group) (`routing`).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if not torch.compiler.is_compiling():
            _check_token_inputs(input_ids, inputs_embeds, attention_mask, cache)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        _check_mm_token_type_ids(mm_token_type_ids, inputs_embeds)
        if mm_token_type_ids is not None and not torch.compiler.is_compiling() and not mm_token_type_ids.any():
            # Text only (every decoding step after the prompt): the sparse layers route all tokens to the text
            # experts without splitting them by modality, one check here instead of a split in every layer.
            mm_token_type_ids = None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        block_sequence_ids = None
        if prefix_mask is not None:
            past_tokens = cache.get_seq_length() if cache is not None else 0
            block_sequence_ids = _prefix_blocks(self.config, prefix_mask, inputs_embeds, past_tokens)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            block_sequence_ids=block_sequence_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                mm_token_type_ids=mm_token_type_ids,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return SparseMoEVLMTextModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


def _prefix_blocks(config: SparseMoEVLMTextConfig, prefix_mask: torch.Tensor, inputs_embeds: torch.Tensor,
                   past_tokens: int = 0) -> torch.Tensor:
    """`create_causal_mask`'s `block_sequence_ids` for a prefix-LM: block 0 (bidirectional) for the prompt, -1
    (causal) for the rest. They are indexed by absolute position, so `past_tokens` cached tokens come first (-1:
    every new token sees them anyway)."""
    if not config.prefix_attention:
        raise ValueError("`prefix_mask` was given but this model attends causally (`text_config.prefix_attention` is "
                         "False): drop `prefix_mask`, or build the model with `prefix_attention=True` and train it so.")
    if tuple(prefix_mask.shape) != tuple(inputs_embeds.shape[:2]):
        raise ValueError(f"`prefix_mask` has shape {tuple(prefix_mask.shape)} but the input is "
                         f"{tuple(inputs_embeds.shape[:2])} (batch, sequence length): one entry per token.")
    if "flash" in (config._attn_implementation or ""):
        raise ValueError(f"`prefix_attention` needs an attention mask that `{config._attn_implementation}` cannot "
                         "take: load the model with attn_implementation='sdpa' (or 'eager', 'flex_attention').")
    blocks = torch.where(prefix_mask.to(inputs_embeds.device).bool(), 0, -1)
    return F.pad(blocks, (past_tokens, 0), value=-1) if past_tokens else blocks


def _generation_prefix(attention_mask: torch.Tensor | None, cache: Cache | None, inputs: torch.Tensor) -> torch.Tensor:
    """`generate`'s prefill: every real token of `inputs` (`(batch, length, ...)`) is prompt. The 2D attention mask
    starts with the cached tokens (and may be longer than the input), so the input's columns are the ones after."""
    batch, length = inputs.shape[:2]
    if attention_mask is None or attention_mask.ndim != 2:
        return torch.ones(batch, length, dtype=torch.long, device=inputs.device)
    past = cache.get_seq_length() if cache is not None else 0
    return attention_mask[:, past:past + length].long()


def prompt_prefix_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int | None = None
                       ) -> torch.Tensor:
    """1 at every token before the row's first supervised label (the prompt), 0 from there on and at padding. Labels
    equal to `image_token_id` are not supervised (the model never learns to predict image placeholders)."""
    supervised = labels != -100
    if image_token_id is not None:
        supervised &= labels != image_token_id
    prefix = supervised.long().cumsum(-1) == 0
    if attention_mask is not None and attention_mask.ndim == 2:
        prefix &= attention_mask[:, -labels.shape[1]:].bool()
    return prefix.long()


def grid_position_init(num_tokens: int, hidden_size: int, std: float) -> torch.Tensor:
    """Initial image position embeddings: N(0, std), with a square grid's row and column coordinates (in [-1, 1])
    written into the first two channels, so that the decoder can compare where objects are from the first step
    rather than discover the layout first. Non-square token counts keep the plain random init."""
    table = torch.randn(num_tokens, hidden_size) * std
    side = math.isqrt(num_tokens)
    if side > 1 and side * side == num_tokens:
        coordinates = torch.linspace(-1.0, 1.0, side)
        table[:, 0] = coordinates.repeat_interleave(side)  # row of each token (row-major order)
        table[:, 1] = coordinates.repeat(side)  # column
    return table


class SparseMoEVLMMultiModalProjector(nn.Module):
    def __init__(self, config: SparseMoEVLMConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_feature_size, hidden_size, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=config.multimodal_projector_bias)
        self.position_embedding = (
            nn.Parameter(torch.empty(config.image_seq_length, hidden_size)) if config.image_position_embeddings
            else None
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        projected = self.linear_2(self.act(self.linear_1(image_features)))
        if self.position_embedding is not None:
            projected = projected + self.position_embedding.to(projected.dtype)
        return projected


class SparseMoEVLMModel(SparseMoEVLMPreTrainedModel):
    """Vision tower + projector + sparse decoder, without the LM head."""

    def __init__(self, config: SparseMoEVLMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = SparseMoEVLMMultiModalProjector(config)
        self.language_model = SparseMoEVLMTextModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed_tokens = value

    def train(self, mode: bool = True) -> "SparseMoEVLMModel":
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.vision_tower.parameters()):
            # A frozen tower stays in eval mode: BatchNorm keeps its running statistics (so features do not depend
            # on the batch, or on the process under DDP) and dropout stays off, as for a pretrained encoder.
            self.vision_tower.eval()
        return self

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> SparseMoEVLMImageFeaturesOutput:
        """Run the vision tower and the projector. `pooler_output` holds the projected features,
        `(num_images, image_seq_length, hidden_size)`; `vision_tokens` the tower features they come from."""
        self.check_pixel_values(pixel_values)
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        tower_dtype = next(self.vision_tower.parameters()).dtype
        # Ask only for the hidden state the features come from (towers that capture outputs keep just that one, as
        # Llava's `select_hidden_states` does); every hidden state only when the caller asks for them.
        image_outputs = self.vision_tower(
            pixel_values.to(tower_dtype),
            output_hidden_states=True if output_hidden_states else [self.config.vision_feature_layer],
            return_dict=True,
            **kwargs,
        )
        features = image_outputs.hidden_states[self.config.vision_feature_layer]
        if features.ndim == 4:  # convolutional feature map (N, C, H, W): one token per pixel
            features = features.flatten(2).transpose(1, 2)
        elif self.config.vision_feature_select_strategy == "default":
            # Keep the patch tokens only: drop the class (and register) tokens in front of them.
            features = features[:, features.shape[1] - self.config.image_seq_length :]
        return SparseMoEVLMImageFeaturesOutput(
            last_hidden_state=image_outputs.last_hidden_state,
            pooler_output=self.multi_modal_projector(features),
            hidden_states=image_outputs.hidden_states if output_hidden_states else None,
            attentions=getattr(image_outputs, "attentions", None),
            vision_tokens=features,
        )

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raise a `TypeError` / `ValueError` naming the fix for pixel values the vision tower cannot take, or would
        turn into NaN logits (non-finite values) or wrong features (raw integer pixels) without an error."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"`pixel_values` must be a torch.Tensor, got {_type_name(pixel_values)}: call the "
                            'processor with `return_tensors="pt"` (or wrap the array with `torch.as_tensor`).')
        if not pixel_values.is_floating_point():
            raise TypeError(f"`pixel_values` must be a floating-point tensor of normalised pixels, got "
                            f"{pixel_values.dtype}: raw images go through the processor, which rescales and "
                            "normalises them.")
        if pixel_values.ndim != 4:
            raise ValueError(f"`pixel_values` must have shape (num_images, channels, height, width), got "
                             f"{tuple(pixel_values.shape)}.")
        channels = getattr(self.config.vision_config, "num_channels", None)
        if isinstance(channels, int) and pixel_values.shape[1] != channels:
            raise ValueError(f"`pixel_values` has {pixel_values.shape[1]} channels but the vision tower takes "
                             f"{channels} (`vision_config.num_channels`): use the processor with "
                             "`do_convert_rgb=True`.")
        size = self.config.image_size
        height, width = pixel_values.shape[-2:]
        if (height, width) != (size, size):
            raise ValueError(
                f"`pixel_values` are {height}x{width} images but the model takes {size}x{size} (`config.image_size`): "
                "preprocess images with the model's processor (`SparseMoEVLMImageProcessor.from_model_config(config)`"
                "), which resizes them."
            )
        # One device sync, on the forwards that carry images only (prefill, training); skipped under torch.compile.
        if not torch.compiler.is_compiling() and not torch.isfinite(pixel_values).all():
            bad = (~torch.isfinite(pixel_values)).flatten(1).any(-1).nonzero().flatten().tolist()
            raise ValueError(
                f"`pixel_values` has NaN or infinite values (image(s) {bad[:8]}{'...' if len(bad) > 8 else ''}): they "
                "would give NaN logits. Check how the images were loaded and normalised (a zero in `image_std` "
                "divides by zero); the processor refuses non-finite images."
            )

    def check_no_image_tokens(self, input_ids: torch.Tensor) -> None:
        """Raise a `ValueError` when `input_ids` has image tokens but no image comes with them: the placeholders
        would run through the decoder as plain token embeddings."""
        n_image_tokens = int((input_ids == self.config.image_token_id).sum())
        if n_image_tokens:
            raise ValueError(
                f"`input_ids` has {n_image_tokens} image tokens (id {self.config.image_token_id}) but no "
                "`pixel_values`: pass the images' `pixel_values` (the processor returns them with the text), or drop "
                "the image placeholders from a text-only prompt."
            )

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Boolean `(batch, seq_len)` mask of the image token positions; checks there is one per image feature and
        that each image's tokens are consecutive in one row."""
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            special_image_mask = (inputs_embeds == image_embedding).all(-1)
        else:
            special_image_mask = input_ids == self.config.image_token_id
        # Features are scattered in row-major order: a run of image tokens whose end is not a whole number of images
        # into its row would take one image's features across two runs (or rows).
        seq_length = image_features.shape[1]
        run_ends = special_image_mask & ~F.pad(special_image_mask[:, 1:], (0, 1), value=False)
        cut = run_ends & (special_image_mask.cumsum(-1) % seq_length != 0)
        n_image_tokens, n_cut = torch.stack([special_image_mask.sum(), cut.sum()]).tolist()
        n_image_features = image_features.shape[0] * seq_length
        if n_image_tokens != n_image_features:
            raise ValueError(
                f"Image features and image tokens do not match: the text has {n_image_tokens} image tokens but "
                f"{image_features.shape[0]} image(s) give {n_image_features} features ({seq_length} "
                f"per image). Each image needs exactly {self.config.image_seq_length} image tokens "
                f"(id {self.config.image_token_id}); use the processor to expand image placeholders."
            )
        if n_cut:
            row, end = cut.nonzero()[0].tolist()
            is_image = special_image_mask[row, : end + 1].tolist()
            start = end
            while start > 0 and is_image[start - 1]:
                start -= 1
            raise ValueError(
                f"Image tokens split an image: row {row} has a run of {end - start + 1} image tokens (positions "
                f"{start}-{end}), not a multiple of the {seq_length} per image. Each image needs {seq_length} "
                f"consecutive image tokens (id {self.config.image_token_id}) in one row; use the processor to expand "
                "image placeholders."
            )
        return special_image_mask

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SparseMoEVLMModelOutputWithPast:
        r"""
        mm_token_type_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for image tokens, 0 for text tokens. Derived from `input_ids` when not given.
        prefix_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            With `text_config.prefix_attention`: 1 for prompt tokens (attended bidirectionally), 0 for the rest.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if not torch.compiler.is_compiling():
            self.config.check_special_tokens()
            _check_token_inputs(input_ids, inputs_embeds, attention_mask, cache)
            if pixel_values is None and input_ids is not None and cache is None:
                # Only without a cache: decoding steps after the prefill with the images have none, and `generate`
                # checks its prefill itself (`prepare_inputs_for_generation`).
                self.check_no_image_tokens(input_ids)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if mm_token_type_ids is None and input_ids is not None:
            mm_token_type_ids = (input_ids == self.config.image_token_id).long()
        if mm_token_type_ids is None and pixel_values is None and self.config.text_config.num_image_experts > 0:
            # Embeddings with image features already merged cannot be told apart from text embeddings; guessing
            # "all text" would route image tokens to the text experts.
            raise ValueError(
                "`inputs_embeds` without `input_ids` or `pixel_values` needs `mm_token_type_ids` (1 at image "
                "positions, 0 at text positions; the processor returns it) so that image tokens reach the image "
                "experts. For text-only embeddings pass `mm_token_type_ids=torch.zeros(inputs_embeds.shape[:2])`. "
                "(vLLM's Transformers backend passes neither: serve checkpoints with `num_image_experts=0` there.)"
            )
        _check_mm_token_type_ids(mm_token_type_ids, inputs_embeds)

        image_outputs = None
        image_features = None
        if pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values)
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)
            if mm_token_type_ids is None:
                mm_token_type_ids = image_mask.long()

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mm_token_type_ids=mm_token_type_ids,
            prefix_mask=prefix_mask,
            **kwargs,
        )
        return SparseMoEVLMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            routing=outputs.routing,
            image_outputs=image_outputs,
            image_hidden_states=image_features,
        )


def router_losses(
    routings: tuple[SparseMoEVLMRouting, ...],
    token_mask: torch.Tensor | None,
    laplace_inv_scales: dict[tuple[int, str], torch.Tensor],
    num_sparse_layers: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Load-balancing, z- and L1/Laplace losses (averaged over routing records) and detached routing statistics.

    `token_mask` is the flattened `(batch * seq_len)` attention mask of the tokens of this forward: padding
    positions (0) are excluded. The balance loss of a group with `E` experts is
    `E * sum_e f_e * P_e` (Switch Transformer), with `f_e` the share of the group's active token-expert assignments
    that went to expert `e` and `P_e` its mean softmax probability: 1.0 when routing is uniform.
    """
    device = routings[0].router_logits.device
    balance, z, l1 = [], [], []
    load: dict[str, list[torch.Tensor]] = {}
    experts_per_token: dict[str, list[torch.Tensor]] = {}
    for routing in routings:
        logits = routing.router_logits
        group_mask = routing.counted_tokens(token_mask).float()
        n_tokens = group_mask.sum()
        active = routing.expert_mask.float() * group_mask[:, None]
        num_experts = routing.num_experts
        load.setdefault(routing.group, []).append(active.sum(0).detach())
        experts_per_token.setdefault(routing.group, []).append((active.sum() / n_tokens.clamp(min=1)).detach())
        if n_tokens == 0:
            continue
        probs = logits.softmax(dim=-1)
        share = active.sum(0) / active.sum().clamp(min=1)
        mean_prob = (probs * group_mask[:, None]).sum(0) / n_tokens
        balance.append((num_experts * (share * mean_prob).sum()).to(device))
        z.append(((torch.logsumexp(logits, dim=-1) ** 2 * group_mask).sum() / n_tokens).to(device))
        scale = laplace_inv_scales.get((routing.layer_idx, routing.group))
        if scale is not None:
            l1.append((scale.to(device) * (routing.top_k_weights.sum(-1) * group_mask).sum() / n_tokens).to(device))
    zero = torch.zeros((), device=device)
    aux_loss = torch.stack(balance).mean() if balance else zero
    z_loss = torch.stack(z).mean() if z else zero
    l1_loss = (torch.stack(l1).mean() if l1 else zero) if laplace_inv_scales else None
    stats: dict[str, torch.Tensor] = {}
    for group, counts in load.items():
        counts = torch.stack([c.to(device) for c in counts])
        if counts.shape[0] != num_sparse_layers:  # a group absent from some layers' batch (e.g. no image tokens)
            continue
        stats[f"{group}/tokens_per_expert"] = counts
        stats[f"{group}/expert_load"] = counts / counts.sum(-1, keepdim=True).clamp(min=1)
        stats[f"{group}/experts_per_token"] = torch.stack([e.to(device) for e in experts_per_token[group]]).mean()
    return aux_loss, z_loss, l1_loss, stats


class SparseMoEVLMForConditionalGeneration(SparseMoEVLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # The aux losses are added per micro-batch: let Trainer divide the loss by the accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, config: SparseMoEVLMConfig):
        super().__init__(config)
        self.model = SparseMoEVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        # The image placeholder is an input-only token.
        self.generation_config.suppress_tokens = [config.image_token_id]

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> SparseMoEVLMImageFeaturesOutput:
        return self.model.get_image_features(pixel_values, **kwargs)

    def routers(self) -> dict[tuple[int, str], SparseMoEVLMRouter]:
        """Every router, keyed by (sparse layer index, group)."""
        return {(group.layer_idx, group.group): group.router for layer in self.model.language_model.layers
                if layer.is_sparse for group in (layer.mlp.text_moe, layer.mlp.image_moe) if group is not None}

    def adapt_laplace_scales(self) -> None:
        """Adapt each ReLU router's L1 coefficient toward `router_target_active_experts` from the training forwards
        since the last call: call it once per optimizer step (`LaplaceScaleCallback` does under `Trainer`). Under
        `torch.distributed` the counts are summed over processes first, so every process applies the same factor."""
        routers = [router for router in self.routers().values() if router.has_laplace_scale]
        if not routers or self.config.text_config.router_target_active_experts is None:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = routers[0].laplace_inv_scale.device
            counts = torch.stack([r.observed.to(device) if r.observed is not None else torch.zeros(2, device=device)
                                  for r in routers])
            torch.distributed.all_reduce(counts)
            for router, observed in zip(routers, counts, strict=True):
                router.observed = observed
        for router in routers:
            router.adapt_laplace_scale()

    def create_masks_for_generate(
        self, config: SparseMoEVLMConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
        cache: Cache | None, position_ids: torch.Tensor | None, is_first_iteration: bool | None = False, **kwargs
    ):
        """The 4D mask `generate` builds ahead of the forward for compileable (static) caches: with
        `prefix_attention`, the prefill's prompt attends bidirectionally there too."""
        block_sequence_ids = None
        if config.text_config.prefix_attention and is_first_iteration:
            prefix = _generation_prefix(attention_mask, cache, inputs_embeds)
            block_sequence_ids = torch.where(prefix.bool(), 0, -1)
        return create_masks_for_generate(
            config=config.get_text_config(), inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
            position_ids=position_ids, block_sequence_ids=block_sequence_ids,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        *args,
        mm_token_type_ids: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        if mm_token_type_ids is not None and mm_token_type_ids.shape[-1] < input_ids.shape[-1]:
            # Assisted decoding appends candidate tokens without extending the modality mask (it only extends
            # `token_type_ids`); generated tokens are always text (the image token is suppressed).
            missing = input_ids.shape[-1] - mm_token_type_ids.shape[-1]
            mm_token_type_ids = torch.cat([mm_token_type_ids, mm_token_type_ids.new_zeros(input_ids.shape[0], missing)], -1)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, mm_token_type_ids=mm_token_type_ids, is_first_iteration=is_first_iteration, **kwargs
        )
        if self.config.text_config.prefix_attention:
            # The prompt (the prefill) is the prefix; each later step's new token attends causally to everything.
            if is_first_iteration and model_inputs.get("prefix_mask") is None:
                inputs = model_inputs.get("input_ids")
                if inputs is None:
                    inputs = model_inputs["inputs_embeds"]
                model_inputs["prefix_mask"] = _generation_prefix(kwargs.get("attention_mask"),
                                                                 model_inputs.get("cache"), inputs)
            elif not is_first_iteration:
                model_inputs.pop("prefix_mask", None)
        input_ids = model_inputs.get("input_ids")
        if is_first_iteration and model_inputs.get("pixel_values") is None and input_ids is not None:
            # The prefill of the prompt. An assistant model's prefill is not a first iteration: Transformers drops its
            # pixel values on purpose (the main model checks the drafts).
            self.model.check_no_image_tokens(input_ids)
        return model_inputs

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_routing: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SparseMoEVLMCausalLMOutputWithPast:
        r"""
        mm_token_type_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for image tokens (routed to the image experts), 0 for text tokens. Derived from `input_ids` if absent.
        prefix_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            With `text_config.prefix_attention`: 1 for prompt tokens, which attend to each other bidirectionally, 0 for
            causal tokens. Derived from `labels` when training (the tokens before each row's first label) and set
            by `generate` for the prompt; without either, the forward is causal.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (-100 is ignored). When given, the router losses are added to `loss`.
        output_router_logits (`bool`, *optional*):
            Return each sparse layer's router logits (`router_logits`) and the router losses.
        output_routing (`bool`, *optional*):
            Return the routing records of every (sparse layer, expert group) (`routing`) and the router losses.

        Example:

        ```python
        >>> import torch
        >>> from hf_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMForConditionalGeneration
        >>> config = SparseMoEVLMConfig(
        ...     vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
        ...                    "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        ...     text_config={"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...                  "moe_intermediate_size": 32},
        ...     image_token_id=127,
        ... )
        >>> model = SparseMoEVLMForConditionalGeneration(config).eval()
        >>> input_ids = torch.tensor([[1] + [127] * config.image_seq_length + [5, 6]])
        >>> out = model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 32, 32), labels=input_ids)
        >>> out.logits.shape
        torch.Size([1, 19, 128])
        ```"""
        text_config = self.config.text_config
        if output_router_logits is None:
            output_router_logits = text_config.output_router_logits
        # Routing is always recorded when training (labels given): the router losses need it.
        record_routing = bool(output_router_logits) or bool(output_routing) or labels is not None

        tokens = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and isinstance(tokens, torch.Tensor) and labels.shape != tokens.shape[:2]:
            raise ValueError(f"`labels` has shape {tuple(labels.shape)} but the input is {tuple(tokens.shape[:2])} "
                             "(batch, sequence length): give one label per token (-100 where none).")
        if labels is not None:
            # Image placeholders are input-only (never generated): collators that copy `input_ids` into `labels`,
            # as TRL's vision collator does, must not train the model to predict them.
            labels = labels.masked_fill(labels == self.config.image_token_id, -100)
        if text_config.prefix_attention and prefix_mask is None and labels is not None:
            # The prompt attends bidirectionally as in `generate`'s prefill; supervised tokens and what follows
            # them stay causal, so no label can see its own future.
            prefix_mask = prompt_prefix_mask(labels, attention_mask)

        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mm_token_type_ids=mm_token_type_ids,
            prefix_mask=prefix_mask,
            use_cache=use_cache,
            output_router_logits=bool(output_router_logits),
            output_routing=record_routing,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=text_config.vocab_size, **kwargs)

        aux_loss = z_loss = l1_loss = routing_stats = None
        if record_routing and outputs.routing:
            routers = self.routers()
            inv_scales = {key: r.laplace_inv_scale for key, r in routers.items() if r.has_laplace_scale}
            token_mask = None
            if attention_mask is not None and attention_mask.ndim == 2:
                # With a cache the mask also covers past tokens: keep the positions of this forward.
                token_mask = attention_mask[:, -outputs.last_hidden_state.shape[1] :].reshape(-1)
            aux_loss, z_loss, l1_loss, routing_stats = router_losses(
                outputs.routing, token_mask, inv_scales, len(text_config.sparse_layer_indices)
            )
            if labels is not None:
                router_loss = text_config.router_aux_loss_coef * aux_loss + text_config.router_z_loss_coef * z_loss
                if l1_loss is not None:
                    router_loss = router_loss + text_config.router_l1_loss_coef * l1_loss
                loss = loss + router_loss.to(loss.device)
                if self.training and inv_scales and text_config.router_target_active_experts is not None:
                    # Counted here, adapted once per optimizer step by `adapt_laplace_scales`.
                    for routing in outputs.routing:
                        routers[(routing.layer_idx, routing.group)].observe(routing, token_mask)

        return SparseMoEVLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            aux_loss=aux_loss,
            z_loss=z_loss,
            l1_loss=l1_loss,
            router_logits=outputs.router_logits,
            routing=outputs.routing if output_routing else None,
            routing_stats=routing_stats,
            image_hidden_states=outputs.image_hidden_states,
        )


__all__ = [
    "ROUTER_CLASSES",
    "SparseMoEVLMCausalLMOutputWithPast",
    "SparseMoEVLMForConditionalGeneration",
    "SparseMoEVLMImageFeaturesOutput",
    "SparseMoEVLMModel",
    "SparseMoEVLMModelOutputWithPast",
    "SparseMoEVLMPreTrainedModel",
    "SparseMoEVLMReLURouter",
    "SparseMoEVLMRouter",
    "SparseMoEVLMRouting",
    "SparseMoEVLMTextModel",
    "SparseMoEVLMTextModelOutputWithPast",
    "SparseMoEVLMTopKRouter",
    "SparseMoEVLMTopPRouter",
    "router_losses",
]
