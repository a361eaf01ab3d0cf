"""The contract that serving engines' Transformers backends rely on, checked on tiny models without the engines
(vLLM and SGLang need CUDA and cannot be installed here).

What the engines do with a Transformers model, from their source and documentation (vLLM
`docs/models/supported_models.md`, "Writing custom models"; `vllm/model_executor/models/transformers/{base,moe,
multimodal}.py`; `vllm/config/model.py` `get_num_experts`; SGLang `python/sglang/srt/models/transformers/{moe,
multimodal}.py`):

- load the checkpoint's *base* model with `AutoModel.from_config(config, trust_remote_code=...)` (custom models need
  `auto_map.AutoModel` in `config.json`), after setting `config.get_text_config()._attn_implementation = "vllm"`, and
  check `is_backend_compatible()` (`_supports_attention_backend`);
- register their attention function in `ALL_ATTENTION_FUNCTIONS` (no mask function: they mask themselves) and call
  the base model as `model(input_ids=..., inputs_embeds=..., use_cache=False, position_ids=(1, T),
  attention_instances={layer_idx: ...}, return_dict=False)[0]`: the extra keyword must reach the attention function,
  which looks its KV cache up by `module.layer_idx`. vLLM always feeds multimodal models `inputs_embeds` (image
  features merged at the image tokens, `input_ids=None`) and forwards no kwarg but `token_type_ids`; SGLang feeds
  `input_ids` + `pixel_values` (+ `mm_token_type_ids` when `forward` names it);
- replace every child module named `experts` whose parameters are all 3D (or that is an `nn.ModuleList`) by a fused
  MoE kernel called positionally as `experts(hidden_states, topk_ids, topk_weights)`, built with
  `num_experts` (vLLM: first of `num_experts`, `moe_num_experts`, `n_routed_experts`, `num_local_experts` on the
  text config; SGLang: `num_local_experts`, `num_experts`, `n_routed_experts`), `num_experts_per_tok`,
  `moe_intermediate_size`, `norm_topk_prob`, SiLU (vLLM's default activation; SGLang reads `hidden_act`), and load
  `gate_up_proj` as `[w1 (gate); w3 (up)]`, `down_proj` as `w2`;
- take image features from `get_image_features(pixel_values).pooler_output` and split them per image with the
  processor's `_get_num_multimodal_tokens(image_sizes=...)`;
- shard `nn.Linear` layers by `base_model_tp_plan` (`re.match` on `model.<name>`, "colwise" / "rowwise", anything
  unmatched replicated) and split layers across pipeline stages by `base_model_pp_plan` (nested names resolved with
  `attrgetter`, exactly one `nn.ModuleList`).

One point the architecture cannot meet (expert groups of different sizes) is marked `xfail(strict=True)` with the
reason; vLLM's missing modality mask is asserted as the clear error the model gives.
"""

import copy
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from operator import attrgetter

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from hf_sparsemoe_vlm import (
    SparseMoEVLMForConditionalGeneration,
    SparseMoEVLMModel,
    SparseMoEVLMTextConfig,
    SparseMoEVLMTextModel,
)

from tiny_models import BLOCK_PACKAGE, make_inputs, make_model, make_processor_and_model


RECORDING = "recording_sdpa"  # an attention function plus the sdpa mask, as a user-registered backend has
ENGINE_LIKE = "engine_like_attention"  # an attention function without a mask function, as vLLM / SGLang register


class AttentionRecorder:
    """Wraps sdpa and records each call: the attention module, the keyword arguments and the mask it got."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls.append({"module": module, "kwargs": dict(kwargs), "mask": attention_mask, "q_len": query.shape[2]})
        kwargs.pop("attention_instances", None)  # the engine's KV-cache handles; plain sdpa has no use for them
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def modules(self) -> set[int]:
        return {id(call["module"]) for call in self.calls}


RECORDER = AttentionRecorder()
ENGINE_RECORDER = AttentionRecorder()
AttentionInterface.register(RECORDING, RECORDER)
AttentionMaskInterface.register(RECORDING, sdpa_mask)
AttentionInterface.register(ENGINE_LIKE, ENGINE_RECORDER)


@pytest.fixture
def recorder():
    RECORDER.calls.clear()
    yield RECORDER
    RECORDER.calls.clear()


@pytest.fixture
def engine_recorder():
    ENGINE_RECORDER.calls.clear()
    yield ENGINE_RECORDER
    ENGINE_RECORDER.calls.clear()


def decoder_attention_modules(base_model: SparseMoEVLMModel) -> list[nn.Module]:
    return [layer.self_attn for layer in base_model.language_model.layers]


def vision_attention_modules(base_model: SparseMoEVLMModel) -> list[nn.Module]:
    return [m for m in base_model.vision_tower.modules() if type(m).__name__.endswith("Attention")]


# --- attention ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_class", [SparseMoEVLMForConditionalGeneration, SparseMoEVLMModel, SparseMoEVLMTextModel]
)
def test_model_classes_declare_attention_backend_support(model_class):
    assert model_class._supports_attention_backend is True
    assert model_class.is_backend_compatible()  # what vLLM's registry checks before using the backend
    assert model_class._can_set_attn_implementation()


def test_every_attention_module_goes_through_a_registered_function_after_from_pretrained(tmp_path, recorder):
    model = make_model()
    model.save_pretrained(tmp_path)
    reference = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    recorded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation=RECORDING).eval()
    for config in (recorded.config, recorded.config.text_config, recorded.config.vision_config):
        assert config._attn_implementation == RECORDING
    inputs = make_inputs(recorded.config, left_pad=[0, 3])

    with torch.no_grad():
        logits = recorded(**inputs).logits
        expected = reference(**inputs).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    decoder, vision = decoder_attention_modules(recorded.model), vision_attention_modules(recorded.model)
    assert vision, "the SigLIP tower has attention layers"
    assert {id(m) for m in decoder + vision} <= recorder.modules()
    # Left padding reaches the function as a mask (the sdpa mask function was registered with it).
    assert all(call["mask"] is not None for call in recorder.calls if call["module"] in decoder)

    recorder.calls.clear()
    generated = recorded.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected_ids = reference.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected_ids)
    for module in decoder:  # prefill plus one call per further token, all through the registered function
        q_lens = [call["q_len"] for call in recorder.calls if call["module"] is module]
        assert q_lens == [inputs["input_ids"].shape[1], 1, 1, 1]


def test_set_attn_implementation_switches_every_attention_module_at_runtime(recorder):
    model = make_model()
    inputs = make_inputs(model.config)
    with torch.no_grad():
        expected = model(**inputs).logits
        model.set_attn_implementation(RECORDING)
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
        modules = decoder_attention_modules(model.model) + vision_attention_modules(model.model)
        assert {id(m) for m in modules} <= recorder.modules()
        recorder.calls.clear()
        model.set_attn_implementation("sdpa")
        model(**inputs)
    assert recorder.calls == []


def test_extra_forward_kwargs_reach_the_attention_function(recorder):
    model = make_model()
    model.set_attn_implementation(RECORDING)
    inputs = make_inputs(model.config)
    handle = object()
    with torch.no_grad():
        model(**inputs, attention_instances=handle)
        model.model(**inputs, attention_instances=handle)  # the base model is what the engines call
    decoder = decoder_attention_modules(model.model)
    decoder_calls = [call for call in recorder.calls if call["module"] in decoder]
    assert len(decoder_calls) == 2 * len(decoder)
    assert all(call["kwargs"].get("attention_instances") is handle for call in decoder_calls)


def test_decoder_attention_modules_carry_their_layer_index():
    model = make_model(num_hidden_layers=3, mlp_layer_types=["sparse", "dense", "sparse"])
    assert [m.layer_idx for m in decoder_attention_modules(model.model)] == [0, 1, 2]


def _engine_backbone(model: SparseMoEVLMForConditionalGeneration) -> SparseMoEVLMModel:
    """The base model as vLLM builds it: `AutoModel.from_config` of the checkpoint config with the engine's attention
    set on the text config only, then the checkpoint weights."""
    config = copy.deepcopy(model.config)
    config.get_text_config()._attn_implementation = ENGINE_LIKE
    backbone = AutoModel.from_config(config)
    assert type(backbone) is SparseMoEVLMModel
    backbone.load_state_dict(model.model.state_dict())
    return backbone.eval()


def _engine_call(backbone, input_ids=None, inputs_embeds=None, **kwargs):
    """One sequence, no batch padding, no mask and no cache, as vLLM's `Base.forward` calls the backbone."""
    length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    instances = {m.layer_idx: f"kv-cache-{m.layer_idx}" for m in decoder_attention_modules(backbone)}
    output = backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False,
                      position_ids=torch.arange(length)[None], attention_instances=instances, return_dict=False,
                      **kwargs)
    assert isinstance(output, tuple)
    return output[0], instances


def _merge_like_vllm(backbone: SparseMoEVLMModel, input_ids, pixel_values, image_token_id):
    """vLLM's `embed_input_ids`: text embeddings, then the image features written at the image-token positions."""
    features = backbone.get_image_features(pixel_values).pooler_output
    embeds = backbone.get_input_embeddings()(input_ids).clone()
    embeds[input_ids == image_token_id] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    return embeds


def test_engine_style_text_call_uses_the_engine_attention_by_layer_index(engine_recorder):
    model = make_model()
    backbone = _engine_backbone(model)
    assert backbone.config.vision_config._attn_implementation == "sdpa"  # the engines leave the tower alone
    inputs = make_inputs(model.config, batch_size=1, with_image=False)
    with torch.no_grad():
        hidden, instances = _engine_call(backbone, input_ids=inputs["input_ids"])
        expected = model.model(**inputs).last_hidden_state
    torch.testing.assert_close(hidden, expected)
    decoder = decoder_attention_modules(backbone)
    assert [call["module"] for call in engine_recorder.calls] == decoder
    for call in engine_recorder.calls:
        assert call["kwargs"]["attention_instances"] is instances
        layer_idx = call["module"].layer_idx
        assert call["kwargs"]["attention_instances"][layer_idx] == f"kv-cache-{layer_idx}"
        assert call["mask"] is None  # no mask function registered: the engine masks on its own


def test_engine_style_multimodal_call_with_a_single_expert_pool(engine_recorder):
    model = make_model(num_image_experts=0)
    backbone = _engine_backbone(model)
    inputs = make_inputs(model.config, batch_size=1)
    with torch.no_grad():
        embeds = _merge_like_vllm(backbone, inputs["input_ids"], inputs["pixel_values"], model.config.image_token_id)
        hidden, _ = _engine_call(backbone, inputs_embeds=embeds)
        expected = model.model(**inputs).last_hidden_state
    torch.testing.assert_close(hidden, expected)


def test_engine_style_multimodal_call_with_image_experts_is_refused_not_misrouted(engine_recorder):
    """vLLM feeds multimodal models merged `inputs_embeds` with `input_ids=None` and drops every kwarg but
    `token_type_ids`: the modality mask never arrives, and merged image features cannot be told from text, so a
    model with image experts refuses the call (naming the fix) instead of routing image tokens to text experts."""
    model = make_model()
    assert model.config.text_config.num_image_experts > 0
    backbone = _engine_backbone(model)
    inputs = make_inputs(model.config, batch_size=1)
    with torch.no_grad():
        embeds = _merge_like_vllm(backbone, inputs["input_ids"], inputs["pixel_values"], model.config.image_token_id)
        with pytest.raises(ValueError, match="needs `mm_token_type_ids`.*vLLM.*num_image_experts=0"):
            _engine_call(backbone, inputs_embeds=embeds)


def test_sglang_style_multimodal_call_routes_image_tokens_by_input_ids(engine_recorder):
    model = make_model()
    backbone = _engine_backbone(model)
    # SGLang passes the modality mask under this name only when `forward` declares it.
    assert "mm_token_type_ids" in inspect.signature(backbone.forward).parameters
    inputs = make_inputs(model.config, batch_size=1)
    with torch.no_grad():
        hidden, _ = _engine_call(backbone, input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
        expected = model.model(**inputs).last_hidden_state
    torch.testing.assert_close(hidden, expected)


def test_base_model_builds_on_the_meta_device():
    config = make_model().config
    config.get_text_config()._attn_implementation = ENGINE_LIKE
    with torch.device("meta"):
        backbone = AutoModel.from_config(config)
    assert all(p.device.type == "meta" for p in backbone.parameters())


@pytest.mark.slow
def test_saved_checkpoint_names_the_base_model_for_automodel(tmp_path):
    make_model().save_pretrained(tmp_path / "ckpt")
    auto_map = json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]
    assert auto_map.get("AutoModel") == "modeling_sparsemoe_vlm.SparseMoEVLMModel"
    # What vLLM does, in a process where the package cannot be imported (remote code only).
    script = BLOCK_PACKAGE + textwrap.dedent(f"""
        from transformers import AutoConfig, AutoModel
        config = AutoConfig.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        config.get_text_config()._attn_implementation = "sdpa"
        model = AutoModel.from_config(config, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        print("BACKBONE", type(model).__name__, model.is_backend_compatible())
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BACKBONE SparseMoEVLMModel True" in result.stdout


# --- experts ----------------------------------------------------------------------------------------------------


def engine_experts_modules(root: nn.Module, prefix: str = "model") -> dict[str, tuple[nn.Module, nn.Module]]:
    """`{qualified name: (parent, experts)}` of the modules vLLM's MoE mixin replaces: children named `experts` that
    are an `nn.ModuleList` or whose parameters are all 3D (it does not look inside them)."""
    found = {}
    for name, child in root.named_children():
        qualified = f"{prefix}.{name}"
        params = list(child.parameters())
        if name == "experts" and (isinstance(child, nn.ModuleList) or (params and all(p.ndim == 3 for p in params))):
            found[qualified] = (root, child)
        else:
            found.update(engine_experts_modules(child, qualified))
    return found


def vllm_num_experts(text_config) -> int:
    """vLLM `ModelConfig.get_num_experts`: the first of these attributes the text config has."""
    for name in ("num_experts", "moe_num_experts", "n_routed_experts", "num_local_experts"):
        if getattr(text_config, name, None) is not None:
            return getattr(text_config, name)
    return 0


def sglang_num_experts(text_config) -> int:
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(text_config, name, None) is not None:
            return getattr(text_config, name)
    return 0


def fused_moe_reference(experts: nn.Module, hidden, top_k_index, top_k_weights):
    """What a fused MoE kernel computes from the loaded weights: w13 = gate_up_proj split into w1 (gate, first half)
    and w3 (up, second half), w2 = down_proj; out = sum_k weight_k * w2 @ (silu(w1 @ x) * (w3 @ x))."""
    intermediate = experts.down_proj.shape[-1]
    w1, w3, w2 = experts.gate_up_proj[:, :intermediate], experts.gate_up_proj[:, intermediate:], experts.down_proj
    out = torch.zeros_like(hidden)
    for token in range(hidden.shape[0]):
        for slot in range(top_k_index.shape[1]):
            e = int(top_k_index[token, slot])
            x = hidden[token]
            out[token] += top_k_weights[token, slot] * (w2[e] @ (F.silu(w1[e] @ x) * (w3[e] @ x)))
    return out


def test_engines_find_every_expert_group_by_name():
    model = make_model(num_hidden_layers=3, mlp_layer_types=["sparse", "dense", "sparse"], num_shared_experts=1)
    text_config = model.config.text_config
    found = engine_experts_modules(model.model)
    assert sorted(found) == sorted(
        f"model.language_model.layers.{i}.mlp.{group}_moe.experts" for i in (0, 2) for group in ("text", "image")
    )
    for _, experts in found.values():
        shapes = {name: tuple(p.shape) for name, p in experts.named_parameters()}
        num = experts.gate_up_proj.shape[0]
        assert shapes == {
            "gate_up_proj": (num, 2 * text_config.moe_intermediate_size, text_config.hidden_size),
            "down_proj": (num, text_config.hidden_size, text_config.moe_intermediate_size),
        }  # no bias: the engines build the fused kernel with has_bias=False


def test_experts_forward_takes_hidden_states_top_k_index_and_top_k_weights():
    for _, experts in engine_experts_modules(make_model().model).values():
        assert list(inspect.signature(experts.forward).parameters) == ["hidden_states", "top_k_index", "top_k_weights"]


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_calling_an_experts_module_equals_the_fused_moe_math(implementation):
    model = make_model()
    model.set_experts_implementation(implementation)
    experts = model.model.language_model.layers[0].mlp.text_moe.experts
    generator = torch.Generator().manual_seed(0)
    tokens, top_k = 7, model.config.text_config.num_experts_per_tok
    hidden = torch.randn(tokens, model.config.text_config.hidden_size, generator=generator)
    top_k_index = torch.stack([torch.randperm(experts.gate_up_proj.shape[0], generator=generator)[:top_k]
                               for _ in range(tokens)])
    top_k_weights = torch.rand(tokens, top_k, generator=generator).softmax(-1)
    with torch.no_grad():
        output = experts(hidden, top_k_index, top_k_weights)
        expected = fused_moe_reference(experts, hidden, top_k_index, top_k_weights)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4)


class EngineFusedMoE(nn.Module):
    """Stand-in for the engines' replacement module: vLLM's `TransformersFusedMoE.forward(hidden_states, topk_ids,
    topk_weights, **kwargs)` (it drops kwargs, so the block must pass the three positionally)."""

    def __init__(self, original: nn.Module, top_k: int, num_experts: int):
        super().__init__()
        self.original, self.top_k, self.num_experts = original, top_k, num_experts
        self.calls = []

    def forward(self, hidden_states, topk_ids, topk_weights, **kwargs):
        self.calls.append((tuple(hidden_states.shape), tuple(topk_ids.shape), topk_ids.dtype, topk_weights.dtype,
                           sorted(kwargs)))
        assert not kwargs, "the experts must be called positionally"
        assert topk_ids.shape == (hidden_states.shape[0], self.top_k)
        assert 0 <= int(topk_ids.min()) and int(topk_ids.max()) < self.num_experts
        return fused_moe_reference(self.original, hidden_states, topk_ids, topk_weights)


def test_sparse_block_works_with_the_experts_replaced_by_an_engine_kernel():
    model = make_model(num_shared_experts=1)
    text_config = model.config.text_config
    inputs = make_inputs(model.config, batch_size=1)
    with torch.no_grad():
        expected = model(**inputs).logits
        replacements = []
        for parent, experts in engine_experts_modules(model.model).values():
            parent.experts = EngineFusedMoE(experts, text_config.num_experts_per_tok, experts.gate_up_proj.shape[0])
            replacements.append(parent.experts)
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    n_image = model.config.image_seq_length
    n_text = inputs["input_ids"].shape[1] - n_image
    for replacement in replacements:
        assert len(replacement.calls) == 1
        hidden_shape, ids_shape, ids_dtype, weights_dtype, kwargs = replacement.calls[0]
        assert hidden_shape[0] in (n_text, n_image) and ids_shape == (hidden_shape[0], 2)
        assert not ids_dtype.is_floating_point and weights_dtype.is_floating_point and kwargs == []


def test_config_keys_the_engines_read(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    text_config = config.get_text_config()
    assert isinstance(text_config, SparseMoEVLMTextConfig)
    assert config != text_config  # how vLLM tells a multimodal model (Transformers[MultiModal][MoE]ForCausalLM)
    # Expert count, top-k, expert width, renormalisation, activation, as the engines look them up.
    assert vllm_num_experts(text_config) == sglang_num_experts(text_config) == text_config.num_experts > 0
    assert text_config.num_experts_per_tok == 2
    experts = model.model.language_model.layers[0].mlp.text_moe.experts
    assert text_config.moe_intermediate_size == experts.down_proj.shape[-1]
    assert isinstance(text_config.norm_topk_prob, bool)
    assert text_config.hidden_act == "silu"  # vLLM runs "silu" for every architecture but gpt-oss / grok-1
    assert not any(name in config.architectures[0].lower() for name in ("gptoss", "grok1"))
    assert text_config.head_dim * text_config.num_attention_heads > 0  # KV-cache sizing: head_dim is set


@pytest.mark.parametrize("num_image_experts", [
    0,  # one pool for every token
    4,  # as many image experts as text experts (the training presets)
    pytest.param(2, marks=pytest.mark.xfail(strict=True, reason=(
        "the engines build every `experts` module with the config's single expert count (vLLM get_num_experts -> "
        "`num_experts`; SGLang raises 'Unexpected packed expert weight shape'); an image group of another size "
        "cannot be loaded: serve checkpoints with num_image_experts in (0, num_experts)"
    ))),
])
def test_every_experts_module_has_the_expert_count_the_engines_build(num_image_experts):
    model = make_model(num_experts=4, num_image_experts=num_image_experts)
    expected = vllm_num_experts(model.config.get_text_config())
    assert {experts.gate_up_proj.shape[0] for _, experts in engine_experts_modules(model.model).values()} == {expected}


# --- multimodal inputs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("owner", ["model", "base_model"])
def test_get_image_features_returns_the_projected_features_as_pooler_output(owner):
    model = make_model()
    inputs = make_inputs(model.config)
    target = model if owner == "model" else model.model
    with torch.no_grad():
        features = target.get_image_features(inputs["pixel_values"])
        merged = model(**inputs).image_hidden_states
    assert isinstance(features, dict) and not isinstance(features, tuple)  # vLLM reads `.pooler_output` of a dict
    pooled = features.pooler_output
    assert pooled.shape == (2, model.config.image_seq_length, model.config.text_config.hidden_size)
    torch.testing.assert_close(pooled, merged)


def test_processor_gives_the_image_token_counts_the_engines_split_features_by():
    processor, model = make_processor_and_model()
    length = model.config.image_seq_length
    sizes = [(30, 40), (500, 300), (10_000, 10_000)]  # vLLM asks for 10000 x 10000 to size its buffers
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes)
    assert counts["num_image_tokens"] == [length] * 3
    assert counts["num_image_patches"] == [1] * 3
    assert "num_image_tokens" not in processor._get_num_multimodal_tokens()

    # vLLM's placeholder ranges: positions of mm_token_type_ids == 1, split by num_image_tokens, all image tokens.
    images = [PIL.Image.new("RGB", (w, h), (255, 0, 0)) for h, w in sizes[:2]]
    prompt = f"{processor.image_token} what is left of {processor.image_token}?"
    encoded = processor(text=prompt, images=images, return_mm_token_type_ids=True, return_tensors="pt")
    positions = torch.where(encoded["mm_token_type_ids"] == 1)[1]
    chunks = torch.split(positions, processor._get_num_multimodal_tokens(image_sizes=sizes[:2])["num_image_tokens"])
    assert len(chunks) == 2
    for chunk in chunks:
        assert int(chunk[-1] - chunk[0]) + 1 == len(chunk) == length
        assert bool((encoded["input_ids"][0, chunk] == processor.image_token_id).all())

    # ... and the features split per image the way vLLM does (uniform expansion of num_image_patches).
    with torch.no_grad():
        pooled = model.model.get_image_features(encoded["pixel_values"]).pooler_output
    flat = pooled.reshape(-1, pooled.shape[-1])
    patches = counts["num_image_patches"][:2]
    per_patch = flat.shape[0] // sum(patches)
    split = torch.split(flat, [p * per_patch for p in patches])
    assert [tuple(s.shape) for s in split] == [(length, flat.shape[-1])] * 2
    torch.testing.assert_close(split[1], pooled[1])


# --- parallelism plans ------------------------------------------------------------------------------------------


def _plan_pattern_resolves(pattern: str, names: set[str]) -> bool:
    regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+") + r"$")
    return any(regex.match(name) for name in names)


def test_tensor_parallel_plan_names_real_modules_and_styles_the_engines_support():
    model = make_model(num_hidden_layers=2, mlp_layer_types=["dense", "sparse"], num_shared_experts=1)
    backbone = model.model
    assert backbone.supports_tp_plan
    plan = backbone.tp_plan
    names = {name for name, _ in backbone.named_modules()} | {name for name, _ in backbone.named_parameters()}
    for pattern in plan:
        assert _plan_pattern_resolves(pattern, names), pattern

    # vLLM: every nn.Linear takes the style of the first plan pattern that `re.match`es "model.<name>", else it is
    # replicated; its linear replacement supports only "colwise" and "rowwise".
    prefixed = {f"model.{pattern}": style for pattern, style in plan.items()}
    styles = {}
    for name, module in backbone.named_modules(prefix="model"):
        if isinstance(module, nn.Linear):
            pattern = next((p for p in prefixed if re.match(p, name)), None)
            styles[name] = prefixed.get(pattern, "replicate")
    decoder = {name: style for name, style in styles.items() if ".language_model." in name}
    assert decoder and set(decoder.values()) == {"colwise", "rowwise"}
    for name, style in decoder.items():
        expected = "rowwise" if name.endswith(("o_proj", "down_proj")) else "colwise"
        assert style == expected, name
    assert any(".shared_experts." in name for name in decoder) and any(".mlp.gate_proj" in name for name in decoder)
    others = {style for name, style in styles.items() if ".language_model." not in name}
    assert others == {"replicate"}  # vision tower and projector stay whole


class PPMissingLayer(nn.Module):
    """vLLM's placeholder for a layer that lives on another pipeline stage: returns its first input."""

    def forward(self, *args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()))


def test_pipeline_parallel_plan_splits_the_decoder_into_stages():
    model = make_model(num_hidden_layers=4, mlp_layer_types=["sparse"] * 4, num_image_experts=0)
    backbone = model.model
    assert backbone.supports_pp_plan
    plan = list(backbone.pp_plan)
    lists = [name for name in plan if isinstance(attrgetter(name)(backbone), nn.ModuleList)]
    assert lists == ["language_model.layers"]
    index = plan.index(lists[0])
    assert len(attrgetter(lists[0])(backbone)) == model.config.text_config.num_hidden_layers
    assert plan[:index] == ["language_model.embed_tokens"] and plan[index + 1:] == ["language_model.norm"]

    def stage(layers: range, first: bool, last: bool) -> SparseMoEVLMModel:
        part = copy.deepcopy(backbone)
        stack = attrgetter(lists[0])(part)
        for i in range(len(stack)):
            if i not in layers:
                stack[i] = PPMissingLayer()
        if not first:
            part.language_model.embed_tokens = PPMissingLayer()
        if not last:
            part.language_model.norm = PPMissingLayer()
        return part

    inputs = make_inputs(model.config, batch_size=1, with_image=False)
    positions = torch.arange(inputs["input_ids"].shape[1])[None]
    with torch.no_grad():
        expected = backbone(**inputs).last_hidden_state
        hidden = stage(range(0, 2), True, False)(input_ids=inputs["input_ids"], position_ids=positions,
                                                   use_cache=False, return_dict=False)[0]
        output = stage(range(2, 4), False, True)(inputs_embeds=hidden, position_ids=positions, use_cache=False,
                                                  return_dict=False)[0]
    torch.testing.assert_close(output, expected)
