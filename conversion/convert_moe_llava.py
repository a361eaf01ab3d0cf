#!/usr/bin/env python
# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
#
# Key names, shapes and semantics were read from these public sources (references only, no code copied):
#   PKU-YuanGroup/MoE-LLaVA (commit 6cb5f66):
#     moellava/model/language_model/llava_llama_moe.py    MoELLaVALlamaConfig (the `moe` dict of config.json),
#         initialize_moe_modules (moe_mode -> moe_layers_idx, `layers[i].mlp = deepspeed MoE(expert=layers[i].mlp)`)
#     moellava/model/language_model/llava_mistral_moe.py, llava_qwen1_5_moe.py, llava_qwen_moe.py,
#         llava_phi_moe.py, llava_stablelm_moe.py, llava_minicpm_moe.py    model types of the other backbones
#     moellava/model/language_model/qwen/modeling_qwen.py, configuration_qwen.py    QWen c_attn / c_proj,
#         QWenMLP `c_proj(w1(x) * silu(w2(x)))`, kv_channels, rotary_pct, seq_length, use_logn_attn, use_dynamic_ntk
#     moellava/model/language_model/{stablelm,phi,minicpm}/modeling_*.py    why those decoders are rejected
#     moellava/model/llava_arch.py                   LlavaMetaModel: `image_tower`, `mm_projector`
#     moellava/model/multimodal_encoder/clip_encoder.py    CLIPVisionTower.image_tower (CLIPVisionModel),
#         feature_select (mm_vision_select_layer, mm_vision_select_feature 'patch' | 'cls_patch')
#     moellava/model/multimodal_projector/builder.py    build_projector.image_spatial_proj, `mlp2x_gelu`
#     moellava/constants.py                          IMAGE_TOKEN_INDEX = -200 (no vocabulary token)
#     moellava/train/train.py, moellava/model/builder.py    defaults; MoE checkpoints are `torch.save(state_dict)`
#     moellava/conversation.py                       conv_vicuna_v1 / conv_phi prompt format (USER / ASSISTANT)
#   microsoft/DeepSpeed (v0.9.5, MoE-LLaVA's pin, and master):
#     deepspeed/moe/layer.py        MoE.deepspeed_moe = MOELayer(TopKGate, Experts); use_residual -> .mlp, .coefficient
#     deepspeed/moe/experts.py      Experts.deepspeed_experts (ModuleList of copies of the dense MLP)
#     deepspeed/moe/sharded_moe.py  TopKGate.wg = Linear(model_dim, num_experts, bias=False); top1gating (weight =
#                                   softmax prob), top2gating (weights renormalised over the 2 chosen experts)
"""Convert a MoE-LLaVA checkpoint (PKU-YuanGroup/MoE-LLaVA, DeepSpeed-MoE experts) into a SparseMoE-VLM folder.

The input folder is what MoE-LLaVA's training writes (or a Hub download of it): `config.json` (model_type
`moe_llava_<backbone>`, with the `moe` dict), the weights (`pytorch_model*.bin` or `*.safetensors`, sharded or not)
and the tokenizer files.

What is mapped (MoE-LLaVA key -> SparseMoE-VLM key; `<p>` is `model.` for Llama/Mistral/Qwen1.5, `transformer.` for
Qwen):

  <p>image_tower.image_tower.vision_model.*          -> model.vision_tower.*                  (CLIP, as is)
  <p>mm_projector.image_spatial_proj.{0,2}.*         -> model.multi_modal_projector.linear_{1,2}.*  (mlp2x_gelu)
  model.embed_tokens / transformer.wte               -> model.language_model.embed_tokens     (+ <image> row)
  ...layers.<i>.{input,post_attention}_layernorm     -> model.language_model.layers.<i>.{...}   (Qwen: ln_1 / ln_2)
  ...layers.<i>.self_attn.{q,k,v,o}_proj             -> ...self_attn.{q,k,v,o}_proj  (Qwen: c_attn split in 3, c_proj)
  ...layers.<i>.mlp.{gate,up,down}_proj              -> ...mlp.{gate,up,down}_proj   (dense layers; Qwen: w2, w1, c_proj)
  ...mlp.deepspeed_moe.gate.wg.weight (E, H)         -> ...mlp.text_moe.router.weight
  ...mlp.deepspeed_moe.experts.deepspeed_experts.<e>.{gate,up}_proj.weight
                                                     -> ...mlp.text_moe.experts.gate_up_proj (E, 2I, H)
  ...mlp.deepspeed_moe.experts.deepspeed_experts.<e>.down_proj.weight
                                                     -> ...mlp.text_moe.experts.down_proj (E, H, I)
  model.norm / transformer.ln_f, lm_head             -> model.language_model.norm, lm_head    (+ <image> row)

The mapping above is data (`moe_llava_weight_mapping`: Transformers `WeightRenaming` / `WeightConverter` rules, the
last of them the expert-fusing rules the model registers for per-expert checkpoints); Transformers' loading applies
it, and the same rules run backwards over the model's parameters name every tensor the checkpoint must hold, at its
shape. Every source tensor must be used (non-persistent buffers such as `rotary_emb.inv_freq` and CLIP
`position_ids`, which some old checkpoints carry, are recomputed and dropped); anything else is an error raised
before loading. Only the config translation is code.

Supported backbones (decoders a Llama-family decoder reproduces exactly: RMSNorm, SwiGLU MLP, full rotary,
separate or splittable q/k/v projections): `moe_llava_llama`, `moe_llava_mistral`, `moe_llava_qwen1_5` (Qwen2) and
`moe_llava_qwen` (Qwen-1: fused c_attn split into q/k/v with bias, o_proj bias zero, gate = w2, up = w1).
Rejected before anything is written: `moe_llava_stablelm` (LayerNorm, partial rotary), `moe_llava_phi` (Phi-2:
LayerNorm, GELU MLP, parallel attention/MLP block, partial rotary), `moe_llava_minicpm` (muP scalings), dense
`llava_*` checkpoints, Residual-MoE (`use_residual`), LoRA checkpoints, projectors other than `mlp2x_gelu`, video
towers and non-CLIP image towers.

The converted model uses one expert pool for all tokens (`num_image_experts=0`), top-k routing with MoE-LLaVA's
`top_k_experts`; with k >= 2 the chosen experts' weights are renormalised to sum to one (DeepSpeed's top2gating),
with k = 1 the weight is the softmax probability (top1gating).
"""

import argparse
import copy
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import (
    Chunk,
    WeightConverter,
    WeightRenaming,
    WeightTransform,
    convert_and_load_state_dict_in_model,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.initialization import no_init_weights
from transformers.modeling_utils import LoadStateDictConfig

from hf_sparsemoe_vlm import (
    SparseMoEVLMConfig,
    SparseMoEVLMForConditionalGeneration,
    SparseMoEVLMImageProcessor,
    SparseMoEVLMProcessor,
)
from hf_sparsemoe_vlm.conversion.scripts import (
    OUTPUT_DTYPES,
    check_output_dir,
    conversion_parser,
    finish_conversion,
    parameter_summary,
    run_conversion_script,
)
from hf_sparsemoe_vlm.conversion.upcycling import sparse_text_config_from_dense
from hf_sparsemoe_vlm.processing_sparsemoe_vlm import CHAT_TEMPLATE, IMAGE_TOKEN


DEFAULT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# model_type -> our backbone name. MoE-LLaVA's model classes -> model_type, for configs that lack model_type.
SUPPORTED_MODEL_TYPES = {
    "moe_llava_llama": "llama",
    "moe_llava_mistral": "mistral",
    "moe_llava_qwen1_5": "qwen1_5",
    "moe_llava_qwen": "qwen",
}
REJECTED_MODEL_TYPES = {
    "moe_llava_stablelm": "StableLM decoders use LayerNorm (with bias) instead of RMSNorm and rotary embeddings on "
                          "only part of each head (rope_pct 0.25)",
    "moe_llava_phi": "Phi-2 decoders use LayerNorm, a GELU MLP (fc1/fc2) instead of SwiGLU, attention and MLP in "
                     "parallel off one norm, partial rotary embeddings and biased projections / LM head",
    "moe_llava_minicpm": "MiniCPM decoders scale embeddings (scale_emb), residual branches "
                         "(scale_depth / sqrt(num_layers)) and logits (dim_model_base), which a Llama decoder has "
                         "no place for",
}
_ARCHITECTURE_TO_MODEL_TYPE = {
    f"{prefix}MoELLaVA{name}ForCausalLM": f"moe_llava_{suffix}"
    for prefix in ("", "Eval")
    for name, suffix in (("Llama", "llama"), ("Mistral", "mistral"), ("Qwen1_5", "qwen1_5"), ("QWen", "qwen"),
                         ("Stablelm", "stablelm"), ("Phi", "phi"), ("MiniCPM", "minicpm"))
}
BACKBONE_TITLES = {"llama": "Llama", "mistral": "Mistral", "qwen1_5": "Qwen1.5 (Qwen2)", "qwen": "Qwen(-1)"}

# Non-persistent buffers that old checkpoints may carry; recomputed by the model, so dropped.
_DROPPABLE_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


class ConversionError(ValueError):
    """The input cannot be converted (unsupported architecture, inconsistent shapes, unused weights, ...)."""


@dataclass
class ConversionResult:
    model: object
    processor: object
    summary: str
    # target key of the converted model -> the MoE-LLaVA keys it was built from (in order)
    key_map: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    output_dir: Path | None = None


# --------------------------------------------------------------------------------------------------------------
# Reading the input folder


def read_moe_llava_config(input_dir: Path) -> dict:
    path = input_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{input_dir} has no config.json; pass a MoE-LLaVA checkpoint folder.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error


def detect_backbone(config: dict) -> tuple[str, str]:
    """(model_type, backbone) of a MoE-LLaVA config; raises `ConversionError` naming unsupported backbones."""
    model_type = config.get("model_type")
    if model_type is None:
        for architecture in config.get("architectures") or []:
            model_type = _ARCHITECTURE_TO_MODEL_TYPE.get(architecture)
            if model_type:
                break
    if model_type in REJECTED_MODEL_TYPES:
        raise ConversionError(f"Unsupported MoE-LLaVA backbone {model_type!r}: {REJECTED_MODEL_TYPES[model_type]}. "
                              f"Only Llama-family decoders convert exactly; supported: "
                              f"{sorted(SUPPORTED_MODEL_TYPES)}. Nothing was written.")
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = ""
        if isinstance(model_type, str) and model_type.startswith("llava"):
            hint = (" This looks like a dense (non-MoE) LLaVA checkpoint: use conversion/upcycle_llava.py on a "
                    "Transformers LLaVA checkpoint instead.")
        raise ConversionError(f"Unsupported model_type {model_type!r} (architectures "
                              f"{config.get('architectures')}): expected one of {sorted(SUPPORTED_MODEL_TYPES)}."
                              f"{hint} Nothing was written.")
    return model_type, SUPPORTED_MODEL_TYPES[model_type]


def moe_settings(config: dict) -> dict:
    """The `moe` dict of a MoE-LLaVA config, validated, with `moe_layers_idx` resolved and `num_experts` an int."""
    moe = config.get("moe")
    if not isinstance(moe, dict) or not moe.get("moe_enable", False):
        raise ConversionError("config.json has no enabled `moe` section (moe.moe_enable): this is not a MoE-LLaVA "
                              "MoE checkpoint (stage-1/2 LLaVA checkpoints are dense).")
    lora = config.get("lora")
    if isinstance(lora, dict) and lora.get("lora_enable", False):
        raise ConversionError("This is a MoE-LLaVA LoRA checkpoint (config.lora.lora_enable); merge the adapters "
                              "first (MoE-LLaVA's scripts/merge_moe_lora_weights.py).")
    if moe.get("use_residual", False):
        raise ConversionError("Residual-MoE checkpoints (moe.use_residual=True) mix the experts with a dense MLP "
                              "through a learned, input-dependent softmax coefficient, which SparseMoE-VLM's shared "
                              "experts cannot represent.")
    num_layers = int(config.get("num_hidden_layers") or 0)
    if num_layers <= 0:
        raise ConversionError("config.json has no positive num_hidden_layers.")
    layers = moe.get("moe_layers_idx")
    mode = moe.get("moe_mode", "sparse")
    if layers is None:  # the resolution MoE-LLaVA's initialize_moe_modules applies
        resolved = {"first_half": list(range(0, num_layers // 2)),
                    "second_half": list(range(num_layers // 2, num_layers)),
                    "sparse": list(range(num_layers))[::2],
                    "dense": list(range(num_layers))}
        if mode not in resolved:
            raise ConversionError(f"Unknown moe.moe_mode {mode!r} and no moe.moe_layers_idx.")
        layers = resolved[mode]
    layers = [int(i) for i in layers]
    if not layers or sorted(set(layers)) != sorted(layers) or not all(0 <= i < num_layers for i in layers):
        raise ConversionError(f"moe.moe_layers_idx {layers} is empty, has duplicates or is outside 0.."
                              f"{num_layers - 1}.")
    experts = moe.get("num_experts")
    if isinstance(experts, int):
        experts = [experts] * len(layers)
    if not isinstance(experts, list) or not experts:
        raise ConversionError(f"moe.num_experts must be an int or a list, got {experts!r}.")
    if len(experts) == 1:
        experts = experts * len(layers)
    if len(experts) != len(layers):
        raise ConversionError(f"moe.num_experts has {len(experts)} entries for {len(layers)} MoE layers.")
    if len(set(experts)) != 1:
        raise ConversionError(f"MoE layers with different expert counts ({dict(zip(layers, experts, strict=True))}) "
                              "are not supported: SparseMoE-VLM uses one expert count for every sparse layer.")
    top_k = int(moe.get("top_k_experts", 2))
    if not 1 <= top_k <= experts[0]:
        raise ConversionError(f"moe.top_k_experts={top_k} is not in [1, num_experts={experts[0]}].")
    return {"layers": sorted(layers), "mode": mode, "num_experts": experts[0], "top_k": top_k,
            "ep_size": int(moe.get("ep_size", 1)),
            "capacity_factor": moe.get("capacity_factor"), "eval_capacity_factor": moe.get("eval_capacity_factor"),
            "min_capacity": moe.get("min_capacity"), "router_aux_loss_coef": float(moe.get("router_aux_loss_coef",
                                                                                             0.01))}


def check_multimodal_settings(config: dict) -> dict:
    """Vision / projector settings of a MoE-LLaVA config, validated."""
    tower = config.get("mm_image_tower", config.get("image_tower"))
    if not tower:
        raise ConversionError("config.json names no image tower (mm_image_tower): not a vision-language checkpoint.")
    if config.get("mm_video_tower"):
        raise ConversionError(f"Video towers (mm_video_tower={config['mm_video_tower']!r}) are not supported; "
                              "SparseMoE-VLM takes images only.")
    if not str(tower).startswith(("openai", "laion")) and "clip" not in str(tower).lower():
        raise ConversionError(f"Image tower {tower!r} is not a CLIP tower; only CLIP towers (openai/..., laion/...) "
                              "are supported (SigLIP and LanguageBind towers are not).")
    projector = config.get("image_projector_type", config.get("mm_projector_type", "linear"))
    if projector != "mlp2x_gelu":
        raise ConversionError(f"Projector type {projector!r} is not supported: SparseMoE-VLM's projector is a "
                              "two-layer GELU MLP (MoE-LLaVA's 'mlp2x_gelu').")
    if config.get("mm_use_im_start_end", False):
        raise ConversionError("mm_use_im_start_end=True checkpoints wrap images in <im_start>/<im_end> tokens, "
                              "which SparseMoE-VLM's processor does not insert.")
    select = config.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if select not in strategies:
        raise ConversionError(f"mm_vision_select_feature={select!r} is not 'patch' or 'cls_patch'.")
    return {"tower": str(tower), "feature_layer": int(config.get("mm_vision_select_layer", -1)),
            "select_strategy": strategies[select], "mm_hidden_size": config.get("mm_hidden_size"),
            "aspect_ratio": config.get("image_aspect_ratio")}


def load_weights(input_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint (safetensors preferred over .bin; sharded or not)."""
    files = sorted(input_dir.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in input_dir.glob("pytorch_model*.bin"))
    if not files:
        extra = ""
        if (input_dir / "mm_projector.bin").is_file():
            extra = " (only mm_projector.bin: a stage-1 projector checkpoint, not a full model)"
        if (input_dir / "adapter_model.bin").is_file() or (input_dir / "adapter_model.safetensors").is_file():
            extra = " (LoRA adapters: merge them first with MoE-LLaVA's scripts/merge_moe_lora_weights.py)"
        raise ConversionError(f"No weights (*.safetensors or pytorch_model*.bin) in {input_dir}{extra}.")
    index_name = "model.safetensors.index.json" if files[0].suffix == ".safetensors" else "pytorch_model.bin.index.json"
    index_path = input_dir / index_name
    if index_path.is_file():
        listed = set(json.loads(index_path.read_text()).get("weight_map", {}).values())
        missing = sorted(name for name in listed if not (input_dir / name).is_file())
        if missing:
            raise ConversionError(f"{index_name} lists shards that are missing: {missing}.")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                part = load_file(path)
            else:
                part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # truncated download, not a weight file, pickled code (weights_only refuses it)
            raise ConversionError(f"Could not read the weight file {path}: {type(error).__name__}: {error}. "
                                  "Re-download it.") from error
        duplicated = sorted(set(part) & set(state))
        if duplicated:
            raise ConversionError(f"Tensor(s) {duplicated[:4]} appear in more than one weight file ({path.name}).")
        state.update(part)
    lora = sorted(k for k in state if "lora_" in k)
    if lora:
        raise ConversionError(f"LoRA tensors found ({lora[:3]} ...): merge the adapters first (MoE-LLaVA's "
                              "scripts/merge_moe_lora_weights.py).")
    if any(k.startswith("base_model.model.") for k in state):
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------------------------
# Configs


def _clean(config: dict) -> dict:
    drop = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "moe", "lora"}
    if config.get("rope_scaling") is None:
        drop.add("rope_scaling")  # old configs write null; newer Transformers warn about the deprecated field
    return {k: v for k, v in config.items() if k not in drop and not k.startswith(("mm_", "image_", "video_"))}


def dense_text_config(config: dict, backbone: str, notes: list[str]):
    """A Transformers Llama / Mistral / Qwen2 config describing the MoE-LLaVA decoder (without its experts)."""
    if backbone == "qwen":
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        if int(config.get("kv_channels", hidden // heads)) * heads != hidden:
            raise ConversionError(f"Qwen config with kv_channels*num_attention_heads != hidden_size ({hidden}) "
                                  "cannot be split into q/k/v projections of a Llama decoder.")
        if float(config.get("rotary_pct", 1.0)) != 1.0:
            raise ConversionError(f"Qwen config with rotary_pct={config['rotary_pct']} (partial rotary) is not "
                                  "supported; the decoder applies rotary embeddings to whole heads.")
        if not config.get("no_bias", True):
            raise ConversionError("Qwen config with no_bias=False (biased MLPs) is not supported: experts have no "
                                  "biases.")
        context = int(config.get("seq_length") or config.get("max_position_embeddings", 2048))
        context = min(context, int(config.get("max_position_embeddings", context)))
        if config.get("use_dynamic_ntk", True) or config.get("use_logn_attn", True):
            notes.append(f"Qwen's dynamic NTK / logn attention only act past seq_length; the context is limited to "
                         f"{context} tokens, where outputs match.")
        return Qwen2Config(
            vocab_size=int(config["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]) // 2, num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context,
            rms_norm_eps=float(config.get("layer_norm_epsilon", 1e-6)),
            rope_theta=float(config.get("rotary_emb_base", 10000.0)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            initializer_range=float(config.get("initializer_range", 0.02)),
            bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"), use_sliding_window=False,
        )
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen1_5": Qwen2Config}[backbone]
    dense = config_class(**_clean(config))
    if getattr(dense, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={dense.hidden_act!r}: only SwiGLU (silu) MLPs are supported.")
    if getattr(dense, "mlp_bias", False):
        raise ConversionError("mlp_bias=True is not supported: the fused experts have no biases.")
    window = getattr(dense, "sliding_window", None)
    if backbone == "qwen1_5" and not getattr(dense, "use_sliding_window", False):
        window = None
    if window is not None and window < dense.max_position_embeddings:
        notes.append(f"{backbone} sliding-window attention ({window}) equals full attention up to {window} tokens; "
                     f"the context is limited to {window}.")
        dense.max_position_embeddings = int(window)
    return dense


def _clip_heads(width: int) -> int | None:
    return {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}.get(width, width // 64 if width % 64 == 0 else None)


def vision_config_from(tower_state: dict[str, torch.Tensor], settings: dict, vision_tower_dir: Path | None):
    """The CLIPVisionConfig of the image tower: from `--vision_tower` when given, else inferred from the tensor
    shapes (openai CLIP conventions); checked against the tensors either way."""
    if vision_tower_dir is not None:
        loaded = AutoConfig.from_pretrained(vision_tower_dir)
        if loaded.model_type == "clip":
            loaded = loaded.vision_config
        if loaded.model_type != "clip_vision_model":
            raise ConversionError(f"--vision_tower {vision_tower_dir} holds a {loaded.model_type!r} model, not CLIP.")
        vision_config = CLIPVisionConfig(**{k: v for k, v in loaded.to_dict().items()
                                            if k not in ("model_type", "transformers_version")})
    else:
        vision_config = None
    if not tower_state:
        if vision_config is None:
            raise ConversionError("The checkpoint has no image-tower weights (MoE-LLaVA loads them from "
                                  f"{settings['tower']!r} at run time): pass --vision_tower with a local copy of "
                                  "that CLIP model.")
        return vision_config
    try:
        width = tower_state["embeddings.class_embedding"].shape[0]
        patch = tower_state["embeddings.patch_embedding.weight"].shape[-1]
        positions = tower_state["embeddings.position_embedding.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[2]) for k in tower_state if k.startswith("encoder.layers."))
        intermediate = tower_state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as error:
        raise ConversionError(f"The image-tower weights are not a CLIP vision model's (missing {error}).") from None
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ConversionError(f"CLIP position embeddings have {positions} rows, not 1 + a square number of patches.")
    inferred = {"hidden_size": width, "patch_size": patch, "image_size": grid * patch, "num_hidden_layers": layers,
                "intermediate_size": intermediate}
    if vision_config is None:
        heads = _clip_heads(width)
        if heads is None:
            raise ConversionError(f"Cannot infer the attention heads of a {width}-wide CLIP tower: pass --vision_tower "
                                  "with its config.json.")
        act = "gelu" if settings["tower"].startswith("laion") else "quick_gelu"
        return CLIPVisionConfig(num_attention_heads=heads, hidden_act=act, layer_norm_eps=1e-5, **inferred)
    wrong = {k: (getattr(vision_config, k), v) for k, v in inferred.items() if getattr(vision_config, k) != v}
    if wrong:
        raise ConversionError(f"--vision_tower config disagrees with the checkpoint's tower tensors "
                              f"(config, tensors): {wrong}.")
    return vision_config


# --------------------------------------------------------------------------------------------------------------
# Weights: the mapping is data; Transformers' loading applies it


def moe_llava_weight_mapping(backbone: str, tower_prefix: str) -> list[WeightTransform]:
    """MoE-LLaVA key names -> SparseMoE-VLM key names, as Transformers conversion rules. Loading applies every
    renaming that matches, in order, then at most one converter: Qwen-1's fused `c_attn` split into q/k/v, or the rules
    the model registers for one-tensor-per-expert checkpoints, which fuse DeepSpeed's experts. `expected_checkpoint`
    runs the same rules backwards."""
    root = "transformer." if backbone == "qwen" else "model."
    lm = "model.language_model."
    rules: list[WeightTransform] = [
        WeightRenaming(f"^{root}image_tower.image_tower.vision_model.", tower_prefix),
        # mlp2x_gelu = Sequential(Linear, GELU, Linear)
        WeightRenaming(f"^{root}mm_projector.image_spatial_proj.0.", "model.multi_modal_projector.linear_1."),
        WeightRenaming(f"^{root}mm_projector.image_spatial_proj.2.", "model.multi_modal_projector.linear_2."),
        # DeepSpeed's MoE layer: deepspeed_moe = MOELayer(gate=TopKGate(wg), experts=Experts(deepspeed_experts))
        WeightRenaming("mlp.deepspeed_moe.gate.wg.", "mlp.text_moe.router."),
        WeightRenaming("mlp.deepspeed_moe.experts.deepspeed_experts.", "mlp.text_moe.experts."),
    ]
    if backbone == "qwen":
        rules += [WeightRenaming("^transformer.wte.", f"{lm}embed_tokens."),
                  WeightRenaming("^transformer.ln_f.", f"{lm}norm."),
                  WeightRenaming("^transformer.h.", f"{lm}layers.")]
        decoder_rules = [
            WeightRenaming(".ln_1.", ".input_layernorm."),
            WeightRenaming(".ln_2.", ".post_attention_layernorm."),
            WeightRenaming(".attn.c_proj.", ".self_attn.o_proj."),
            # QWenMLP computes c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
            WeightRenaming(".w2.weight", ".gate_proj.weight"),
            WeightRenaming(".w1.weight", ".up_proj.weight"),
            WeightRenaming(".c_proj.weight", ".down_proj.weight"),
            *(WeightConverter(f"attn.c_attn.{kind}", [f"self_attn.{name}_proj.{kind}" for name in "qkv"],
                              operations=[Chunk(dim=0)]) for kind in ("weight", "bias")),
        ]
        for rule in decoder_rules:  # the CLIP tower has q/k/v projections of its own: leave them alone
            rule.scope_prefix, rule.base_model_prefix = "language_model", "model"
        rules += decoder_rules
    else:
        rules += [WeightRenaming(f"^model.{name}.", f"{lm}{name}.") for name in ("embed_tokens", "norm", "layers")]
    return rules + get_checkpoint_conversion_mapping("sparsemoe_vlm")


def expected_checkpoint(model_config: SparseMoEVLMConfig, mapping: list[WeightTransform]) -> dict[str, tuple]:
    """The MoE-LLaVA tensors (name -> shape) a model with `model_config` is built from: the mapping run backwards over
    the model's parameters on the meta device, as `save_pretrained(save_original_format=True)` runs it."""
    with torch.device("meta"):
        meta = SparseMoEVLMForConditionalGeneration._from_config(model_config)
    meta._weight_conversions = copy.deepcopy(mapping)
    return {key: tuple(value.shape) for key, value in revert_weight_conversion(meta, meta.state_dict()).items()}


def check_checkpoint_tensors(state: dict[str, torch.Tensor], expected: dict[str, tuple], optional: set[str],
                             backbone: str, moe: dict) -> None:
    """Every tensor of `state` must be one `expected` names, at its shape; every expected one but `optional` must be
    there. Raises `ConversionError` naming the first problems by their MoE-LLaVA names."""
    root = "transformer.h." if backbone == "qwen" else "model.layers."
    experts_at = re.compile(re.escape(root) + r"(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.")
    found: dict[int, set[int]] = {}
    for key in state:
        if (match := experts_at.match(key)) or re.match(re.escape(root) + r"\d+\.mlp\.deepspeed_moe\.", key):
            layer = int(key[len(root):].split(".")[0])
            if layer not in moe["layers"]:
                raise ConversionError(f"Layer {layer} has DeepSpeed-MoE tensors but is not in moe_layers_idx "
                                      f"{moe['layers']}.")
            if match:
                found.setdefault(layer, set()).add(int(match.group(2)))
    for layer, experts in sorted(found.items()):
        if sorted(experts) != list(range(moe["num_experts"])):
            extra = (f" (ep_size={moe['ep_size']}: a checkpoint saved on one expert-parallel rank holds only its "
                     "local experts)") if moe["ep_size"] > 1 else ""
            raise ConversionError(f"Layer {layer} has experts {sorted(experts)} but moe.num_experts is "
                                  f"{moe['num_experts']}{extra}.")
    unused = sorted(set(state) - set(expected))
    biases = [key for key in unused if experts_at.match(key) and key.endswith(".bias")]
    if biases:
        raise ConversionError(f"Expert biases ({biases[0]}) are not supported: the fused experts have none.")
    if unused:
        raise ConversionError(f"{len(unused)} tensor(s) of the checkpoint are not used by the conversion: "
                              f"{unused[:8]}" + (" ..." if len(unused) > 8 else "") + ". Is this a MoE-LLaVA "
                              f"{BACKBONE_TITLES[backbone]} checkpoint?")
    wrong = [f"{key} has shape {tuple(state[key].shape)}, expected {expected[key]}"
             for key in sorted(state) if tuple(state[key].shape) != expected[key]]
    if wrong:
        raise ConversionError("; ".join(wrong[:4]) + ".")
    missing = sorted(set(expected) - set(state) - optional)
    if missing:
        raise ConversionError(f"The checkpoint has no tensor {missing[0]!r}" + (
            f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "") + ".")


def source_key_map(keys, mapping: list[WeightTransform]) -> dict[str, list[str]]:
    """Target key -> the checkpoint keys it is built from (in order), by the renaming loading applies."""
    mapping = copy.deepcopy(mapping)  # matching marks the rules as used
    renamings = [rule for rule in mapping if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in mapping if isinstance(rule, WeightConverter)]
    key_map: dict[str, list[str]] = {}
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters)
        converter = next((rule for rule in converters if pattern in rule.source_patterns), None)
        targets = [target] if converter is None else \
            [target.replace(converter.target_patterns[0], name) for name in converter.target_patterns]
        for name in targets:
            key_map.setdefault(name, []).append(key)
    return key_map


def load_checkpoint_tensors(model: SparseMoEVLMForConditionalGeneration, state: dict[str, torch.Tensor],
                            mapping: list[WeightTransform]) -> set[str]:
    """Load `state` into `model` through `mapping` with Transformers' own loading (what `from_pretrained` runs);
    returns the model keys the checkpoint did not provide."""
    info, _ = convert_and_load_state_dict_in_model(
        model, state, LoadStateDictConfig(weight_mapping=copy.deepcopy(mapping), dtype=model.dtype))
    # Loading remembers the rules it used so that saving writes the original format back; this model saves as itself.
    del model._weight_conversions
    problems = [*(f"unexpected {key}" for key in sorted(info.unexpected_keys)),
                *(f"{key} loaded as {tuple(got)} but the model has {tuple(want)}" for key, got, want in
                  sorted(info.mismatched_keys)),
                *(f"{key}: {error}" for key, error in info.conversion_errors.items()), *info.error_msgs]
    if problems:  # the checks before loading should make this unreachable
        raise ConversionError(f"Loading the mapped tensors failed: {problems[:4]}.")
    return set(info.missing_keys)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer, processor


def moe_llava_chat_template(image_token: str) -> str:
    """MoE-LLaVA's USER/ASSISTANT prompt format (conv_vicuna_v1 / conv_phi: `SYSTEM USER: <image>\\nQ ASSISTANT:
    A<eos>USER: ...`), with the image placeholder in front of its text and assistant turns marked for training."""
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for item in content -%}"
        "{%- if item['type'] == 'image' -%}{{ '" + image_token + "\n' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}{{ render(messages[0]['content']) ~ ' ' }}"
        "{%- else -%}{{ '" + DEFAULT_SYSTEM.replace("'", "\\'") + " ' }}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' ~ render(message['content']) ~ ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}"
        "{% generation %}{{ render(message['content']) ~ eos_token }}{% endgeneration %}"
        "{%- elif message['role'] != 'system' or not loop.first -%}"
        "{{ raise_exception('Unknown chat role ' ~ message['role'] ~ ': use system (first), user or assistant.') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def add_image_token(tokenizer, image_token: str, model: SparseMoEVLMForConditionalGeneration, notes: list[str]
                    ) -> tuple[int, str]:
    """Give the tokenizer a real image token (MoE-LLaVA splices images at the id -200, which no vocabulary has) and
    the model's embeddings / LM head a row for it near the mean embedding. Returns (id, how)."""
    embed = model.get_input_embeddings().weight
    rows = embed.shape[0]
    if image_token in tokenizer.get_vocab():
        token_id = tokenizer.convert_tokens_to_ids(image_token)
        if token_id >= rows:
            raise ConversionError(f"The tokenizer's {image_token!r} has id {token_id}, outside the {rows}-row "
                                  "embedding matrix.")
        return token_id, f"{image_token} (existing token) id {token_id}"
    if len(tokenizer) > rows:
        raise ConversionError(f"The tokenizer has {len(tokenizer)} tokens but the embedding matrix only {rows} rows: "
                              "is it the checkpoint's tokenizer?")
    try:
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    except Exception as error:  # e.g. tiktoken-based tokenizers that cannot add tokens
        raise ConversionError(f"Cannot add {image_token!r} to the tokenizer ({error}); pass --image_token with one "
                              "of its existing special tokens (e.g. <|extra_1|> for Qwen).") from error
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if len(tokenizer(image_token, add_special_tokens=False)["input_ids"]) != 1:
        raise ConversionError(f"{image_token!r} does not encode to a single token after adding it.")
    if token_id >= rows:
        with torch.random.fork_rng(devices=[]):  # mean resizing samples near the mean: the same rows every run
            torch.manual_seed(0)
            model.resize_token_embeddings(token_id + 1, mean_resizing=True)
        return token_id, (f"{image_token} added, id {token_id}; embeddings {rows} -> {token_id + 1} rows "
                          "(resize_token_embeddings, mean_resizing)")
    # Padded vocabulary: the row exists but no token reached it; start it at the mean of the rows before it.
    with torch.no_grad():
        for matrix in {id(m): m for m in (embed, model.get_output_embeddings().weight)}.values():
            matrix[token_id] = matrix[:token_id].float().mean(0).to(matrix.dtype)
    notes.append(f"{image_token} took the unused embedding row {token_id} of the padded vocabulary.")
    return token_id, f"{image_token} added, id {token_id} (spare row of the padded {rows}-row vocabulary, " \
                     "mean-initialised)"


def _image_mean_std(vision_tower_dir: Path | None) -> tuple[list[float], list[float]]:
    if vision_tower_dir is not None and (vision_tower_dir / "preprocessor_config.json").is_file():
        values = json.loads((vision_tower_dir / "preprocessor_config.json").read_text())
        return list(values.get("image_mean", OPENAI_CLIP_MEAN)), list(values.get("image_std", OPENAI_CLIP_STD))
    return list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)


def _base_model_id(input_dir: Path) -> str | None:
    """`Org/Name` when the input is a Hub cache snapshot (`.../models--Org--Name/snapshots/<sha>`). The config's
    `_name_or_path` is not used: MoE-LLaVA writes its local training path there."""
    match = re.search(r"models--([^/]+)--([^/]+)/snapshots/", input_dir.resolve().as_posix() + "/")
    return f"{match.group(1)}/{match.group(2)}" if match else None


# --------------------------------------------------------------------------------------------------------------


def convert(
    input_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    per_expert_layout: bool = False,
    vision_tower: str | Path | None = None,
    tokenizer: str | Path | None = None,
    image_token: str = IMAGE_TOKEN,
    dtype: str = "auto",
    chat_template: str = "moe-llava",
    base_model: str | None = None,
    model_id: str | None = None,
    trust_remote_code: bool = False,
    quiet: bool = False,
) -> ConversionResult:
    """Convert the MoE-LLaVA checkpoint in `input_dir`; write it to `output_dir` when given (nothing is written
    unless every check passes). Raises `ConversionError` (a `ValueError`) for inputs that cannot be converted."""
    started = time.time()
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ConversionError(f"Input folder {input_dir} does not exist.")
    if output_dir is not None:
        try:
            check_output_dir(output_dir, overwrite, sources={"--input": input_dir, "--vision_tower": vision_tower})
        except ValueError as error:
            raise ConversionError(str(error)) from None
    if chat_template not in ("moe-llava", "package"):
        raise ConversionError(f"--chat_template must be 'moe-llava' or 'package', got {chat_template!r}.")
    vision_tower = Path(vision_tower) if vision_tower is not None else None
    notes: list[str] = []

    # 1. Config checks (before reading any weights).
    config = read_moe_llava_config(input_dir)
    model_type, backbone = detect_backbone(config)
    moe = moe_settings(config)
    vision_settings = check_multimodal_settings(config)
    dense = dense_text_config(config, backbone, notes)
    if moe["top_k"] == 2:
        notes.append("DeepSpeed's top2gating samples the 2nd expert with Gumbel noise even at inference; the "
                     "converted router takes the 2 most probable experts (the deterministic mode).")
    notes.append(f"DeepSpeed capacity limits (capacity_factor {moe['capacity_factor']}, eval_capacity_factor "
                 f"{moe['eval_capacity_factor']}, min_capacity {moe['min_capacity']}) drop overflowing tokens; the "
                 "converted model never drops tokens.")
    if vision_settings["aspect_ratio"] == "pad":
        notes.append("MoE-LLaVA pads images to a square (image_aspect_ratio='pad') before CLIP preprocessing; the "
                     "image processor here resizes, so pad non-square images yourself for identical inputs.")

    # 2. Weights, the vision config they imply, the tokenizer.
    state = {k: v for k, v in load_weights(input_dir).items() if not _DROPPABLE_BUFFERS.search(k)}
    root = "transformer." if backbone == "qwen" else "model."
    tower_in = f"{root}image_tower.image_tower.vision_model."
    tower_state = {k[len(tower_in):]: v for k, v in state.items() if k.startswith(tower_in)}
    vision_config = vision_config_from(tower_state, vision_settings, vision_tower)
    num_states = vision_config.num_hidden_layers + 1
    if not -num_states <= vision_settings["feature_layer"] < num_states:
        raise ConversionError(f"mm_vision_select_layer={vision_settings['feature_layer']} is out of range for a "
                              f"{vision_config.num_hidden_layers}-layer tower.")
    embed_key = f"{root}wte.weight" if backbone == "qwen" else f"{root}embed_tokens.weight"
    if embed_key not in state:
        raise ConversionError(f"The checkpoint has no {embed_key}: not a MoE-LLaVA {BACKBONE_TITLES[backbone]} "
                              "checkpoint.")
    torch_dtype = state[embed_key].dtype if dtype == "auto" else OUTPUT_DTYPES[dtype]
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else input_dir
    try:
        # config=: the decoder's own config picks the tokenizer class when tokenizer_config.json names none (the
        # folder's config.json has a model_type Transformers does not know).
        tok = AutoTokenizer.from_pretrained(tokenizer_dir, config=dense, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ConversionError(f"Cannot load a tokenizer from {tokenizer_dir} ({type(error).__name__}: {error}); "
                              "pass --tokenizer (and --trust_remote_code for tokenizers that ship code).") from error
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(dense, name, None) is None and getattr(tok, name, None) is not None:
            setattr(dense, name, getattr(tok, name))

    # 3. The model config (the one part of the conversion that is code), checked against the tensors.
    text_config = sparse_text_config_from_dense(
        dense, sparse_layers=moe["layers"], num_experts=moe["num_experts"], num_image_experts=0,
        num_shared_experts=0, num_experts_per_tok=moe["top_k"], router_type="topk",
        router_aux_loss_coef=moe["router_aux_loss_coef"], router_z_loss_coef=0.0,
    )
    # DeepSpeed top1gating weighs the expert by its softmax probability; top2gating renormalises over the two.
    text_config.norm_topk_prob = moe["top_k"] > 1
    model_config = SparseMoEVLMConfig(
        # the image token id is set once the tokenizer and the embeddings have it (step 5)
        vision_config=vision_config.to_dict(), text_config=text_config, image_token_id=0,
        image_size=vision_config.image_size, projector_hidden_act="gelu",
        vision_feature_layer=vision_settings["feature_layer"],
        vision_feature_select_strategy=vision_settings["select_strategy"], multimodal_projector_bias=True,
        tie_word_embeddings=bool(dense.tie_word_embeddings),
    )
    with torch.device("meta"):  # the target layout of the tower in this Transformers version
        tower_keys = AutoModel.from_config(vision_config).state_dict()
    tower_prefix = "model.vision_tower." + ("vision_model." if any(k.startswith("vision_model.") for k in tower_keys)
                                            else "")
    mapping = moe_llava_weight_mapping(backbone, tower_prefix)
    expected = expected_checkpoint(model_config, mapping)
    # Absent tensors the model can do without: a Qwen o_proj bias (zero), a tower from --vision_tower, a tied head.
    optional = {k for k in expected if re.search(r"\.(attn\.c_proj|self_attn\.o_proj|self_attn\.[qkv]_proj)\.bias$", k)
                and (backbone.startswith("qwen") or getattr(dense, "attention_bias", False))}
    if not tower_state:
        optional |= {k for k in expected if k.startswith(tower_in)}
    if model_config.tie_word_embeddings:
        head = state.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, state[embed_key]):
            raise ConversionError("tie_word_embeddings=True but lm_head.weight differs from the input embeddings.")
        expected.pop("lm_head.weight", None)
    check_checkpoint_tensors(state, expected, optional, backbone, moe)
    cast = {v.dtype for k, v in state.items() if v.is_floating_point() and k.endswith("gate.wg.weight")}
    if torch.float32 in cast and torch_dtype != torch.float32:
        notes.append(f"DeepSpeed keeps the gates (wg) in float32; the routers are stored in "
                     f"{str(torch_dtype).removeprefix('torch.')} here.")

    # 4. The model, loaded by Transformers through the mapping.
    with no_init_weights():
        model = SparseMoEVLMForConditionalGeneration._from_config(model_config, dtype=torch_dtype)
    num_source_tensors = len(state)
    key_map = source_key_map(state, mapping)
    not_loaded = load_checkpoint_tensors(model, state, mapping)
    del state
    if model_config.tie_word_embeddings:
        model.tie_weights()
        not_loaded.discard("lm_head.weight")
    with torch.no_grad():
        # The decoder's absent attention biases (Qwen's o_proj) are zero, as in a projection without one.
        for key in sorted(k for k in not_loaded if k.startswith("model.language_model.") and k.endswith("_proj.bias")):
            model.get_parameter(key).zero_()
            not_loaded.discard(key)
    if not tower_state:  # weights from --vision_tower
        tower_model = CLIPVisionModel.from_pretrained(vision_tower, config=vision_config, dtype=torch_dtype)
        model.model.vision_tower.load_state_dict(tower_model.state_dict())
        for key in tower_model.state_dict():
            key_map["model.vision_tower." + key] = [f"{vision_tower}:{key}"]
            not_loaded.discard("model.vision_tower." + key)
        notes.append(f"Image-tower weights taken from {vision_tower} (the checkpoint has none).")
        del tower_model
    if not_loaded:
        raise ConversionError(f"The checkpoint leaves {sorted(not_loaded)[:6]} unset.")

    # 5. The image token, the processor.
    image_token_id, token_how = add_image_token(tok, image_token, model, notes)
    model.config.image_token_id = image_token_id
    model.eval()
    mean, std = _image_mean_std(vision_tower)
    image_processor = SparseMoEVLMImageProcessor(size={"height": model_config.image_size,
                                                       "width": model_config.image_size},
                                                 image_mean=mean, image_std=std)
    processor = SparseMoEVLMProcessor(
        image_processor=image_processor, tokenizer=tok,
        chat_template=moe_llava_chat_template(image_token) if chat_template == "moe-llava" else CHAT_TEMPLATE,
        image_token=image_token, image_seq_length=model_config.image_seq_length,
        max_position_embeddings=text_config.max_position_embeddings,
    )
    if processor.image_token_id != image_token_id:
        raise ConversionError(f"Processor image token id {processor.image_token_id} != {image_token_id}.")

    # 6. Writing and the summary.
    base_model = base_model or _base_model_id(input_dir)
    k = moe["top_k"]
    rows = [
        ("source", f"{input_dir} ({num_source_tensors} tensors, all mapped)"
         + (f"; base model {base_model}" if base_model else "")),
        ("backbone", f"{BACKBONE_TITLES[backbone]} ({model_type})"),
        ("experts", f"{moe['num_experts']} per MoE layer, top-{k} "
                    f"({'renormalised over the chosen experts' if k > 1 else 'softmax probability'})"),
        ("MoE layers", f"{moe['layers']} (moe_mode {moe['mode']})"),
        ("vision tower", f"CLIP {vision_settings['tower']}, {vision_config.num_hidden_layers} layers, "
                         f"{model_config.image_size}px, feature layer {vision_settings['feature_layer']}, "
                         f"{model_config.image_seq_length} image tokens"),
        ("image token", token_how),
    ]
    result = ConversionResult(model=model, processor=processor, summary="", key_map=key_map, notes=notes)
    title = "MoE-LLaVA -> SparseMoE-VLM"
    if output_dir is None:
        result.summary = parameter_summary(model, title, [*rows, ("dtype", str(torch_dtype).removeprefix("torch."))],
                                           notes)
        return result
    output = argparse.Namespace(output=output_dir, overwrite=overwrite, max_shard_size=max_shard_size,
                                per_expert_layout=per_expert_layout, model_id=model_id, base_model=base_model)
    conversion_info = {
        "base_model": base_model, "method": "moe-llava import", "source": str(input_dir),
        "moe_llava_model_type": model_type, "backbone": backbone, "moe": moe,
        "vision_tower": vision_settings["tower"], "image_token": image_token, "image_token_id": image_token_id,
        "notes": notes,
    }
    result.summary = finish_conversion(
        model, processor, output, title=title, rows=rows, conversion="converted from MoE-LLaVA (DeepSpeed-MoE) weights",
        conversion_info=conversion_info, started=started, notes=notes, quiet=quiet)
    result.output_dir = Path(output_dir).resolve()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = conversion_parser(
        "convert_moe_llava.py",
        "Convert a MoE-LLaVA checkpoint (PKU-YuanGroup/MoE-LLaVA: DeepSpeed-MoE experts, moe_llava_llama / _mistral "
        "/ _qwen1_5 / _qwen backbones, CLIP tower, mlp2x_gelu projector) into a SparseMoE-VLM folder with its "
        "processor. Every expert is mapped to one pool of top-k routed experts (num_image_experts=0). MoE-LLaVA marks "
        "images with the id -200, which no vocabulary has: the converted tokenizer gets a real image token "
        "(--image_token, added as a special token) and the embedding matrix and LM head get a row for it near the "
        "mean embedding (resize_token_embeddings with mean_resizing); config.image_token_id is set to it. StableLM, "
        "Phi-2 and MiniCPM backbones are rejected (not Llama-family decoders). Nothing is written unless every check "
        "passes; the written folder is re-loaded and verified before it is moved into place.",
        dtype_help="dtype of the written weights (auto: the checkpoint's embedding dtype).")
    parser.add_argument("--input", required=True, help="MoE-LLaVA checkpoint folder (config.json, weights, tokenizer).")
    parser.add_argument("--vision_tower", default=None,
                        help="Local folder of the CLIP model named by mm_image_tower (e.g. a download of "
                             "openai/clip-vit-large-patch14-336): its config.json describes the tower, its weights are "
                             "used when the checkpoint has none, its preprocessor_config.json gives the image "
                             "mean/std. Without it the tower config is inferred from the tensors (openai CLIP conventions).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: --input).")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow tokenizers that ship their own code (Qwen's tiktoken tokenizer).")
    parser.add_argument("--image_token", default=IMAGE_TOKEN,
                        help="Image placeholder token: added to the tokenizer (one new embedding row) unless it "
                             "already exists; for tokenizers that cannot add tokens pass an existing special token.")
    parser.add_argument("--chat_template", default="moe-llava", choices=("moe-llava", "package"),
                        help="Processor chat template: MoE-LLaVA's 'SYSTEM USER: <image>\\n... ASSISTANT:' format, "
                             "or this package's <|user|> template.")

    def run(args) -> None:
        convert(args.input, args.output, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                per_expert_layout=args.per_expert_layout, vision_tower=args.vision_tower, tokenizer=args.tokenizer,
                image_token=args.image_token, dtype=args.dtype, chat_template=args.chat_template,
                base_model=args.base_model, model_id=args.model_id, trust_remote_code=args.trust_remote_code)

    return run_conversion_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
