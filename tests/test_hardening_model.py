"""Issue #18, model level: every bad input to the config, the model and the processor gives a clear error (a
`ValueError` or `TypeError` naming the field or argument and the fix), never a silent wrong result or a raw
traceback from deep inside PyTorch, the tokenizer or the HTTP client."""

import json
import re

import huggingface_hub.constants
import PIL.Image
import pytest
import torch
from transformers import AutoConfig, DynamicCache

from hf_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMForConditionalGeneration, SparseMoEVLMImageProcessor

from tiny_models import (
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VISION_CONFIGS,
    make_config,
    make_inputs,
    make_model,
    make_processor_and_model,
)


TINY_TEXT = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "moe_intermediate_size": 32, "num_experts": 2,
             "num_image_experts": 2, "num_experts_per_tok": 1, "pad_token_id": PAD_TOKEN_ID}
RED = PIL.Image.new("RGB", (20, 20), (255, 0, 0))


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def processor():
    return make_processor_and_model()[0]


# --- Config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,value", [("eos_token_id", IMAGE_TOKEN_ID), ("eos_token_id", [2, IMAGE_TOKEN_ID]),
                                        ("pad_token_id", IMAGE_TOKEN_ID), ("bos_token_id", IMAGE_TOKEN_ID)])
def test_image_token_id_equal_to_a_special_token_is_refused(tmp_path, name, value):
    """As the EOS token, generation never stops (the image token is suppressed) and no EOS is learnt (image-token
    labels are ignored); as the pad or BOS token, those positions count as image tokens. Building such a config in
    code is allowed (conversion scripts hold a placeholder id until the embeddings have the image token's row);
    loading, saving and running it is not."""
    match = rf"`image_token_id` \({IMAGE_TOKEN_ID}\) is also `text_config.{name}`.*token of its own"
    config = make_config(**{name: value})
    with pytest.raises(ValueError, match=match):
        config.save_pretrained(tmp_path / "saved")
    make_config().save_pretrained(tmp_path / "edited")
    saved = json.loads((tmp_path / "edited" / "config.json").read_text())
    saved["text_config"][name] = value
    (tmp_path / "edited" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=match):
        AutoConfig.from_pretrained(tmp_path / "edited")
    model = SparseMoEVLMForConditionalGeneration(config).eval()
    inputs = make_inputs(config)
    with pytest.raises(ValueError, match=match):
        model(**inputs)
    with pytest.raises(ValueError, match=match):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=PAD_TOKEN_ID)


def test_unknown_decoder_activation_is_refused():
    with pytest.raises(ValueError, match="`hidden_act` 'swish2' is not an activation of transformers.*'silu'"):
        make_config(hidden_act="swish2")


def test_unknown_projector_activation_is_refused():
    with pytest.raises(ValueError, match="`projector_hidden_act` 'nope' is not an activation of transformers"):
        SparseMoEVLMConfig(vision_config=VISION_CONFIGS["siglip"], text_config=TINY_TEXT, projector_hidden_act="nope")


@pytest.mark.parametrize("pad_token_id", [128, 1000, -1])
def test_pad_token_id_outside_the_vocabulary_is_refused(pad_token_id):
    # nn.Embedding takes a negative padding_idx as counted from the end: -1 would silently freeze the last row.
    with pytest.raises(ValueError, match=rf"`pad_token_id` \({pad_token_id}\) must be None or in \[0, 128\)"):
        make_config(pad_token_id=pad_token_id)


def test_zero_patch_size_is_refused():
    with pytest.raises(ValueError, match="`vision_config.patch_size` must be a positive integer, got 0"):
        SparseMoEVLMConfig(vision_config={**VISION_CONFIGS["siglip"], "patch_size": 0}, text_config=TINY_TEXT)


@pytest.mark.parametrize("where", ["vision_config", "config"])
def test_image_smaller_than_one_patch_is_refused(where):
    vision = {**VISION_CONFIGS["dinov2"], "image_size": 4} if where == "vision_config" else VISION_CONFIGS["dinov2"]
    image_size = 4 if where == "config" else None
    with pytest.raises(ValueError, match=r"`image_size` \(4\) is smaller than `vision_config.patch_size` \(8\)"):
        SparseMoEVLMConfig(vision_config=vision, text_config=TINY_TEXT, image_size=image_size)


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_image_size_other_than_the_towers_is_refused_for_fixed_position_embeddings(vision):
    """SigLIP / CLIP / ViT towers have position embeddings for their own image size only (the forward would fail
    with a size mismatch deep inside the tower)."""
    with pytest.raises(ValueError, match=r"`image_size` \(64\) differs from `vision_config.image_size` \(32\)"):
        SparseMoEVLMConfig(vision_config=VISION_CONFIGS[vision], text_config=TINY_TEXT, image_size=64)


def test_towers_that_interpolate_take_another_image_size():
    config = SparseMoEVLMConfig(vision_config=VISION_CONFIGS["dinov2"], text_config=TINY_TEXT, image_size=64,
                                image_token_id=IMAGE_TOKEN_ID)
    assert config.image_seq_length == (64 // 8) ** 2
    model = SparseMoEVLMForConditionalGeneration(config).eval()
    features = model.get_image_features(torch.randn(1, 3, 64, 64)).pooler_output
    assert features.shape == (1, config.image_seq_length, 32)


@pytest.mark.parametrize("model_type", ["swin", "vit_mae", "regnet", "mobilevit", "deit", "levit", "beit"])
def test_towers_whose_token_count_is_unknown_are_refused(model_type):
    with pytest.raises(ValueError, match=rf"`vision_config` model_type '{model_type}' is not supported.*"
                                         r"siglip_vision_model.*resnet"):
        SparseMoEVLMConfig(vision_config={"model_type": model_type}, text_config=TINY_TEXT)


SUPPORTED_TOWERS = {
    **VISION_CONFIGS,
    "vit": {"model_type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 8},
    "dinov2_with_registers": {"model_type": "dinov2_with_registers", "hidden_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "mlp_ratio": 2, "image_size": IMAGE_SIZE, "patch_size": 8,
                              "num_register_tokens": 4},
    "convnextv2": {"model_type": "convnextv2", "hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2,
                   "image_size": IMAGE_SIZE},
}


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("vision", list(SUPPORTED_TOWERS))
def test_every_supported_tower_gives_the_token_count_the_config_predicts(vision, strategy):
    if strategy == "full" and "hidden_sizes" in SUPPORTED_TOWERS[vision]:
        pytest.skip("convolutional towers have no class token")
    config = SparseMoEVLMConfig(vision_config=dict(SUPPORTED_TOWERS[vision]), text_config=TINY_TEXT,
                                image_size=IMAGE_SIZE, image_token_id=IMAGE_TOKEN_ID,
                                vision_feature_select_strategy=strategy)
    torch.manual_seed(0)
    model = SparseMoEVLMForConditionalGeneration(config).eval()
    features = model.get_image_features(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert features.vision_tokens.shape == (2, config.image_seq_length, config.vision_feature_size)


def _saved_config_without(tmp_path, key):
    make_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved[key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    return saved


@pytest.mark.parametrize("key", ["text_config", "vision_config"])
def test_config_file_without_a_sub_config_is_refused(tmp_path, key):
    """Not the default decoder (24 layers, ~9 GB to allocate before the weights fail to load) in its place."""
    saved = _saved_config_without(tmp_path, key)
    match = rf"has no `{key}`.*save_pretrained"
    with pytest.raises(ValueError, match=match):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        SparseMoEVLMConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        SparseMoEVLMConfig.from_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match=match):
        SparseMoEVLMConfig.from_dict(saved)


def test_configs_built_in_code_still_default_their_sub_configs(tmp_path):
    assert SparseMoEVLMConfig().text_config.num_hidden_layers == 24
    config = SparseMoEVLMConfig(vision_config=VISION_CONFIGS["clip"])
    assert config.text_config.vocab_size == 32064
    # A sub-config given as a loading kwarg completes the file.
    saved = _saved_config_without(tmp_path, "text_config")
    loaded = SparseMoEVLMConfig.from_dict(saved, text_config=TINY_TEXT)
    assert loaded.text_config.num_hidden_layers == 1


# --- Model forward -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixel_values_raise(model, bad):
    inputs = make_inputs(model.config)
    inputs["pixel_values"][1, 0, 3, 4] = bad
    with pytest.raises(ValueError, match=r"`pixel_values` has NaN or infinite values \(image\(s\) \[1\]\)"):
        model(**inputs)
    with pytest.raises(ValueError, match="`pixel_values` has NaN or infinite values"):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=PAD_TOKEN_ID)


def test_finiteness_check_is_skipped_while_compiling(model, monkeypatch):
    """Data-dependent checks would break `torch.compile(fullgraph=True)`; they run in eager mode only."""
    inputs = make_inputs(model.config)
    inputs["pixel_values"][0, 0, 0, 0] = float("nan")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.isnan(model(**inputs).logits).any()


def test_image_tokens_without_pixel_values_raise(model):
    inputs = make_inputs(model.config)
    with pytest.raises(ValueError, match=r"`input_ids` has 32 image tokens \(id 127\) but no `pixel_values`"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="no `pixel_values`"):
        model(input_ids=inputs["input_ids"], labels=inputs["input_ids"])
    with pytest.raises(ValueError, match="no `pixel_values`"):
        model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=2,
                       do_sample=False, pad_token_id=PAD_TOKEN_ID)


def test_cached_steps_need_no_pixel_values(model):
    """Decoding steps after a prefill with the image have no pixel values, which is right."""
    inputs = make_inputs(model.config, batch_size=1)
    cache = DynamicCache(config=model.config.text_config)
    model(**inputs, cache=cache, use_cache=True)
    mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    model(input_ids=torch.tensor([[5]]), attention_mask=mask, cache=cache, use_cache=True)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_one_images_tokens_split_across_rows_raise(model):
    """Row 0 with 20 image tokens and row 1 with 12 match the 32 features of two images in total, but the second
    image's features would be scattered over both rows."""
    n = model.config.image_seq_length
    input_ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * (n + 4) + [5] * 6,
                              [1] + [IMAGE_TOKEN_ID] * (n - 4) + [5] * 14])
    with pytest.raises(ValueError, match=rf"row 0 has a run of {n + 4} image tokens.*{n} consecutive image tokens"):
        model(input_ids=input_ids, pixel_values=torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))


def test_one_images_tokens_split_inside_a_row_raise(model):
    half = [IMAGE_TOKEN_ID] * (model.config.image_seq_length // 2)
    input_ids = torch.tensor([[1, *half, 5, 6, *half, 7]])
    with pytest.raises(ValueError, match="row 0 has a run of 8 image tokens"):
        model(input_ids=input_ids, pixel_values=torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))


def test_back_to_back_images_in_one_row_are_accepted(model):
    n = model.config.image_seq_length
    input_ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * (2 * n) + [5]])
    out = model(input_ids=input_ids, pixel_values=torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert out.image_hidden_states.shape[0] == 2


def test_attention_mask_shorter_than_the_input_raises(model):
    inputs = make_inputs(model.config)
    length = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"`attention_mask` covers {length - 3} positions but .* {length}"):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:, :-3]})


def test_attention_mask_shorter_than_cache_plus_input_raises(model):
    inputs = make_inputs(model.config, batch_size=1)
    cache = DynamicCache(config=model.config.text_config)
    model(**inputs, cache=cache, use_cache=True)
    length = inputs["input_ids"].shape[1]
    match = rf"covers {length} positions but the input needs {length + 1} \({length} cached \+ 1 new\)"
    with pytest.raises(ValueError, match=match):
        model(input_ids=torch.tensor([[5]]), attention_mask=inputs["attention_mask"], cache=cache, use_cache=True)


def test_attention_mask_of_another_batch_size_raises(model):
    inputs = make_inputs(model.config)
    with pytest.raises(ValueError, match=r"`attention_mask` has 1 row\(s\) but the input has 2"):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:1]})


def test_wrong_image_size_raises_naming_both_sizes(model):
    inputs = make_inputs(model.config)
    with pytest.raises(ValueError, match=r"`pixel_values` are 64x48 images but the model takes 32x32 "
                                         r"\(`config.image_size`\).*processor"):
        model(**{**inputs, "pixel_values": torch.randn(2, 3, 64, 48)})


def test_wrong_channel_count_raises(model):
    inputs = make_inputs(model.config)
    with pytest.raises(ValueError, match=r"`pixel_values` has 4 channels but the vision tower takes 3"):
        model(**{**inputs, "pixel_values": torch.randn(2, 4, IMAGE_SIZE, IMAGE_SIZE)})


def test_numpy_pixel_values_raise_type_error(model):
    inputs = make_inputs(model.config)
    with pytest.raises(TypeError, match=r"`pixel_values` must be a torch.Tensor, got numpy.ndarray.*"
                                        r"return_tensors=\"pt\""):
        model(**{**inputs, "pixel_values": inputs["pixel_values"].numpy()})


def test_integer_pixel_values_raise_type_error(model):
    """Raw 0-255 pixels would be cast to float and fed unnormalised: a silent wrong result."""
    inputs = make_inputs(model.config)
    with pytest.raises(TypeError, match="`pixel_values` must be a floating-point tensor.*got torch.uint8"):
        model(**{**inputs, "pixel_values": torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)})


@pytest.mark.parametrize("convert", ["numpy", "list", "float"])
def test_input_ids_that_are_not_an_integer_tensor_raise_type_error(model, convert):
    input_ids = make_inputs(model.config, with_image=False)["input_ids"]
    bad = {"numpy": input_ids.numpy(), "list": input_ids.tolist(), "float": input_ids.float()}[convert]
    with pytest.raises(TypeError, match="`input_ids` must be"):
        model(input_ids=bad)


def test_unbatched_input_ids_raise(model):
    with pytest.raises(ValueError, match=r"`input_ids` must have shape \(batch_size, sequence_length\), got \(6,\)"):
        model(input_ids=torch.tensor([1, 5, 6, 7, 8, 9]))


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_or_sequence_raises(model, shape):
    with pytest.raises(ValueError, match=re.escape(f"`input_ids` is empty (shape {shape})")):
        model(input_ids=torch.ones(shape, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape(f"`inputs_embeds` is empty (shape {(*shape, 32)})")):
        model(inputs_embeds=torch.ones(*shape, 32), mm_token_type_ids=torch.zeros(shape, dtype=torch.long))


def test_labels_of_another_shape_raise(model):
    inputs = make_inputs(model.config)
    length = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"`labels` has shape \(2, 5\) but the input is \(2, {length}\)"):
        model(**inputs, labels=inputs["input_ids"][:, :5])


def test_wrong_mm_token_type_ids_shape_raises(model):
    """The multimodal model already checked this; the text model alone did not (an IndexError in the MoE block)."""
    inputs = make_inputs(model.config)
    with pytest.raises(ValueError, match=r"`mm_token_type_ids` has shape \(2, 3\)"):
        model(**inputs, mm_token_type_ids=torch.zeros(2, 3, dtype=torch.long))
    text_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, 7)
    with pytest.raises(ValueError, match=r"`mm_token_type_ids` has shape \(2, 3\)"):
        model.model.language_model(input_ids=text_ids, mm_token_type_ids=torch.zeros(2, 3, dtype=torch.long))


# --- Processor -----------------------------------------------------------------------------------------------


def test_empty_text_batch_raises(processor):
    with pytest.raises(ValueError, match="`text` is an empty list"):
        processor(text=[])
    with pytest.raises(ValueError, match="`text` is an empty list"):
        processor(text=[], images=[])


@pytest.mark.parametrize("conversation", [[], [[]], [[{"role": "user", "content": "hi"}], []]])
def test_empty_conversation_raises(processor, conversation):
    with pytest.raises(ValueError, match="has no message"):
        processor.apply_chat_template(conversation)
    with pytest.raises(ValueError, match="has no message"):
        processor.apply_chat_template(conversation, tokenize=True, return_dict=True)


@pytest.mark.parametrize("text", ["hi \ud800 there", ["fine", "x\udfff"]])
def test_lone_surrogates_raise(processor, text):
    index = 0 if isinstance(text, str) else 1
    with pytest.raises(ValueError, match=rf"`text`\[{index}\] has a lone surrogate '\\ud[89a-f]"):
        processor(text=text)


def test_lone_surrogates_in_a_chat_message_raise(processor):
    with pytest.raises(ValueError, match="lone surrogate"):
        processor.apply_chat_template([{"role": "user", "content": "a\ud800"}], tokenize=True)


URL = "http://127.0.0.1:9/cat.png"  # the discard port: refused at once were it ever tried


def test_image_urls_are_refused_offline(processor):
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # tests/conftest.py
    match = r"Cannot fetch image 'http.*offline mode \(HF_HUB_OFFLINE=1\).*PIL image or a local file path"
    with pytest.raises(ValueError, match=match):
        processor(text="<image> what?", images=URL)
    with pytest.raises(ValueError, match=match):
        processor(text="<image> what?", images=[URL.replace("http", "https")])
    with pytest.raises(ValueError, match=match):
        processor.image_processor(URL)
    chat = [{"role": "user", "content": [{"type": "image", "url": URL}, {"type": "text", "text": "what?"}]}]
    with pytest.raises(ValueError, match=match):
        processor.apply_chat_template(chat, tokenize=True, return_dict=True)


def test_image_urls_are_fetched_online(monkeypatch):
    import hf_sparsemoe_vlm.image_processing_sparsemoe_vlm as image_processing

    fetched = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(image_processing, "load_image", lambda url: fetched.append(url) or RED)
    out = SparseMoEVLMImageProcessor(size={"height": 8, "width": 8})(URL, return_tensors="pt")
    assert fetched == [URL] and out["pixel_values"].shape == (1, 3, 8, 8)
