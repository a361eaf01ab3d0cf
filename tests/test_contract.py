"""The contract in-library Transformers VLMs keep with the tools around them: deprecated `past_key_values`, assisted
decoding, `inputs_embeds`, `get_image_features`, weight init on load, static caches and `torch.compile`."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CompileConfig, DynamicCache

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration

from tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, make_inputs, make_model


GEN = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD_TOKEN_ID, "eos_token_id": None}
ROUTER_TYPES = ["topk", "top_p", "relu"]


def _with_modality_mask(inputs: dict) -> dict:
    """What the processor returns: the inputs plus `mm_token_type_ids`."""
    return {**inputs, "mm_token_type_ids": (inputs["input_ids"] == IMAGE_TOKEN_ID).long()}


@pytest.mark.parametrize("level", ["causal_lm", "model", "text_model"])
def test_past_key_values_is_taken_as_the_cache(level):
    model = make_model(num_shared_experts=1)
    inputs = make_inputs(model.config, batch_size=1)
    input_ids, pixel_values = inputs["input_ids"], inputs["pixel_values"]
    if level == "text_model":
        module, args = model.model.language_model, {}
        input_ids = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, 7)  # the text model takes no image
    else:
        module, args = (model if level == "causal_lm" else model.model), {"pixel_values": pixel_values}

    def last(output):
        return output.logits[:, -1] if level == "causal_lm" else output.last_hidden_state[:, -1]

    full = last(module(input_ids=input_ids, **args))
    cache = DynamicCache(config=model.config.text_config)
    module(input_ids=input_ids[:, :-1], past_key_values=cache, use_cache=True, **args)
    assert cache.get_seq_length() == input_ids.shape[1] - 1
    step = module(input_ids=input_ids[:, -1:], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == input_ids.shape[1]
    torch.testing.assert_close(last(step), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("assistant", ["same_size", "smaller", "prompt_lookup"])
@pytest.mark.parametrize("modality_mask", [True, False])
def test_assisted_greedy_decoding_equals_greedy_decoding(assistant, modality_mask):
    model = make_model(num_shared_experts=1)
    inputs = make_inputs(model.config, batch_size=1, text_len=10)
    if modality_mask:
        inputs = _with_modality_mask(inputs)
    greedy = model.generate(**inputs, **GEN)
    if assistant == "prompt_lookup":
        assisted = model.generate(**inputs, prompt_lookup_num_tokens=3, **GEN)
    else:
        helper = make_model(seed=1) if assistant == "same_size" else make_model(seed=1, num_hidden_layers=1)
        assisted = model.generate(**inputs, assistant_model=helper, **GEN)
    assert torch.equal(assisted, greedy)


def test_merged_inputs_embeds_without_a_modality_mask_is_refused():
    model = make_model()
    inputs = make_inputs(model.config)
    expected = model(**inputs).logits
    image_mask = inputs["input_ids"] == IMAGE_TOKEN_ID
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    embeds = model.get_input_embeddings()(inputs["input_ids"]).masked_scatter(image_mask[..., None], features)
    with pytest.raises(ValueError, match="needs `mm_token_type_ids`.*image experts"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    given = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], mm_token_type_ids=image_mask.long())
    torch.testing.assert_close(given.logits, expected, rtol=0, atol=1e-5)
    # Unmerged embeddings with the pixels: the image positions are found from the image token's embedding.
    raw = model.get_input_embeddings()(inputs["input_ids"])
    unmerged = model(inputs_embeds=raw, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(unmerged.logits, expected, rtol=0, atol=1e-5)


def test_text_only_inputs_embeds_work_with_a_zero_modality_mask_or_without_image_experts():
    model = make_model()
    inputs = make_inputs(model.config, with_image=False)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    expected = model(**inputs).logits
    zeros = torch.zeros_like(inputs["input_ids"])
    torch.testing.assert_close(model(inputs_embeds=embeds, mm_token_type_ids=zeros,
                                     attention_mask=inputs["attention_mask"]).logits, expected, rtol=0, atol=1e-5)
    shared_pool = make_model(num_image_experts=0)
    torch.testing.assert_close(shared_pool(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits,
                               shared_pool(**inputs).logits, rtol=0, atol=1e-5)


def test_modality_mask_of_the_wrong_shape_is_refused():
    model = make_model()
    inputs = make_inputs(model.config)
    short = (inputs["input_ids"] == IMAGE_TOKEN_ID).long()[:, :-1]
    with pytest.raises(ValueError, match=r"`mm_token_type_ids` has shape \(2, 22\) but the input is \(2, 23\)"):
        model(**inputs, mm_token_type_ids=short)


@pytest.mark.parametrize("vision", ["siglip", "resnet"])
def test_get_image_features_returns_hidden_states_only_when_asked(vision):
    model = make_model(vision)
    pixel_values = make_inputs(model.config)["pixel_values"]
    tower_states = []  # what the tower computed (get_image_features drops it from its output afterwards)
    model.model.vision_tower.register_forward_hook(lambda module, args, output: tower_states.append(output.hidden_states))

    plain = model.get_image_features(pixel_values)
    assert plain.hidden_states is None
    assert plain.pooler_output.shape == (2, model.config.image_seq_length, 32)
    if vision == "siglip":  # a tower that captures outputs keeps only the selected layer
        kept = [state for state in tower_states[-1] if state is not None]
        assert len(kept) == 1

    everything = model.get_image_features(pixel_values, output_hidden_states=True)
    num_states = (model.config.vision_config.num_hidden_layers + 1 if vision == "siglip"
                  else len(model.config.vision_config.depths) + 1)
    assert len(everything.hidden_states) == num_states
    assert all(state is not None for state in everything.hidden_states)
    torch.testing.assert_close(everything.pooler_output, plain.pooler_output, rtol=0, atol=0)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_missing_vision_weights_get_the_same_init_as_a_model_built_from_its_config(tmp_path, vision):
    model = make_model(vision)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".vision_tower." not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = SparseMoEVLMForConditionalGeneration.from_pretrained(tmp_path)
    built = dict(model.named_parameters())
    checked = 0
    for name, param in loaded.named_parameters():
        reference = built[name]
        if ".vision_tower." not in name:
            assert torch.equal(param, reference), name  # loaded, untouched
        elif param.numel() >= 512 and reference.std() > 0:
            # The same distribution: CLIP scales its attention projections by width and depth (std 0.125 here,
            # not the generic 0.02).
            ratio = float(param.std() / reference.std())
            assert 0.8 < ratio < 1.25, (name, ratio)
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_static_cache_generation_equals_dynamic_cache_generation(router_type):
    model = make_model(router_type=router_type, num_shared_experts=1)
    inputs = _with_modality_mask(make_inputs(model.config, left_pad=[2, 0]))
    dynamic = model.generate(**inputs, **GEN)
    static = model.generate(**inputs, cache_implementation="static", **GEN)
    assert torch.equal(static, dynamic)


@pytest.mark.slow
@pytest.mark.parametrize(("router_type", "experts"),
                         [("topk", "eager"), ("topk", "batched_mm"), ("topk", "grouped_mm"), ("top_p", "eager"),
                          ("top_p", "grouped_mm"), ("relu", "eager")])
def test_decode_step_compiles_in_one_graph_and_generates_what_eager_generates(router_type, experts):
    model = make_model(router_type=router_type, num_shared_experts=1)
    model.set_experts_implementation({"text_config": experts})
    inputs = _with_modality_mask(make_inputs(model.config, left_pad=[2, 0]))
    eager = model.generate(**inputs, **GEN)
    # fullgraph: any graph break raises. The "eager" backend traces the graph without generating code (fast).
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # generate compiles only on accelerators unless told otherwise
    torch._dynamo.reset()
    compiled = model.generate(**inputs, cache_implementation="static", compile_config=compile_config, **GEN)
    assert hasattr(model, "_compiled_call")
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_shape_static_dispatch_computes_what_the_split_dispatch_computes(monkeypatch, router_type):
    """The dispatch used under torch.compile (both groups over every token, zero weights for the other
    modality) gives the same logits and router losses as splitting tokens by modality."""
    model = make_model(router_type=router_type, num_shared_experts=1)
    inputs = make_inputs(model.config, left_pad=[2, 0])
    split = model(**inputs, labels=inputs["input_ids"], output_routing=True, output_router_logits=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    static = model(**inputs, labels=inputs["input_ids"], output_routing=True, output_router_logits=True)
    assert all(record.token_mask is not None for record in static.routing)
    torch.testing.assert_close(static.logits, split.logits, rtol=0, atol=1e-5)
    for static_logits, split_logits in zip(static.router_logits, split.router_logits, strict=True):
        torch.testing.assert_close(static_logits, split_logits, rtol=0, atol=1e-5)
    for name in ("loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(static, name), getattr(split, name), rtol=1e-6, atol=1e-6)
    for key, value in split.routing_stats.items():
        torch.testing.assert_close(static.routing_stats[key], value, rtol=1e-6, atol=1e-6)


def test_image_placeholder_labels_are_ignored_by_the_loss():
    """Collators that copy `input_ids` into `labels` (TRL's vision collator) leave image tokens as labels."""
    model = make_model()
    inputs = make_inputs(model.config)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    masked = labels.masked_fill(labels == IMAGE_TOKEN_ID, -100)
    assert (labels == IMAGE_TOKEN_ID).sum() == 2 * model.config.image_seq_length
    assert torch.equal(model(**inputs, labels=labels).loss, model(**inputs, labels=masked).loss)
