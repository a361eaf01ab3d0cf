import json

import pytest
from transformers import AutoConfig, CLIPVisionConfig

from hf_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMTextConfig

from tiny_models import IMAGE_TOKEN_ID, VISION_CONFIGS, make_config


def test_default_config_is_siglip_with_two_expert_groups():
    config = SparseMoEVLMConfig()
    assert config.vision_config.model_type == "siglip_vision_model"
    assert isinstance(config.text_config, SparseMoEVLMTextConfig)
    assert config.text_config.expert_groups == {"text": 4, "image": 4}
    assert config.image_seq_length == (224 // 16) ** 2
    assert config.text_config.mlp_layer_types == ["sparse"] * config.text_config.num_hidden_layers


@pytest.mark.parametrize("vision,expected_width", [("siglip", 32), ("clip", 32), ("dinov2", 32), ("convnext", 32),
                                                   ("resnet", 32)])
def test_vision_towers_resolve_through_autoconfig(vision, expected_width):
    config = make_config(vision)
    assert config.vision_config.model_type == VISION_CONFIGS[vision]["model_type"]
    assert config.vision_feature_size == expected_width
    assert config.image_seq_length == 16


def test_full_strategy_keeps_class_token_of_clip_but_siglip_has_none():
    clip = SparseMoEVLMConfig(vision_config=VISION_CONFIGS["clip"], vision_feature_select_strategy="full")
    siglip = SparseMoEVLMConfig(vision_config=VISION_CONFIGS["siglip"], vision_feature_select_strategy="full")
    assert clip.image_seq_length == 17
    assert siglip.image_seq_length == 16


def test_vision_config_object_is_accepted():
    config = SparseMoEVLMConfig(vision_config=CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=48))
    assert config.image_seq_length == 16 and config.vision_feature_size == 48


def test_round_trip_through_json_and_autoconfig(tmp_path):
    config = make_config("convnext", router_type="top_p", router_top_p=0.6, num_shared_experts=1,
                         mlp_layer_types=["dense", "sparse"])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "sparsemoe_vlm"
    assert saved["text_config"]["model_type"] == "sparsemoe_vlm_text"
    assert saved["auto_map"]["AutoConfig"] == "configuration_sparsemoe_vlm.SparseMoEVLMConfig"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SparseMoEVLMConfig)
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}
    assert loaded.text_config.sparse_layer_indices == [1]


def test_text_config_alone_resolves_through_autoconfig():
    config = AutoConfig.for_model("sparsemoe_vlm_text", num_experts=8, num_image_experts=0)
    assert config.expert_groups == {"text": 8}


INVALID_TEXT_SETTINGS = [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 3, "num_image_experts": 2}, "num_experts_per_tok"),
    ({"num_experts": -1}, "num_experts"),
    ({"num_image_experts": -2}, "num_image_experts"),
    ({"num_shared_experts": -1}, "num_shared_experts"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ({"hidden_size": -32}, "hidden_size"),
    ({"router_type": "expert_choice"}, "router_type"),
    ({"router_type": "top_p", "router_top_p": 0.0}, "router_top_p"),
    ({"router_type": "top_p", "router_top_p": 1.5}, "router_top_p"),
    ({"router_type": "top_p", "router_max_experts_per_tok": 3}, "router_max_experts_per_tok"),
    ({"router_type": "relu", "router_laplace_b": 0.0}, "router_laplace_b"),
    ({"router_target_active_experts": -1.0}, "router_target_active_experts"),
    ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef"),
    ({"mlp_layer_types": ["sparse"]}, "mlp_layer_types"),
    ({"mlp_layer_types": ["sparse", "moe"]}, "mlp_layer_types"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
]


@pytest.mark.parametrize("overrides,field", INVALID_TEXT_SETTINGS)
def test_invalid_text_settings_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        make_config(**overrides)


def test_top_k_bound_does_not_apply_to_dynamic_routers():
    config = make_config(router_type="relu", num_experts_per_tok=8)
    assert config.text_config.router_type == "relu"


def test_vision_tower_without_features_is_rejected():
    with pytest.raises(ValueError, match="`vision_config`.*cannot produce image features"):
        SparseMoEVLMConfig(vision_config={"model_type": "llama", "hidden_size": 32})


def test_inconsistent_image_seq_length_is_rejected():
    with pytest.raises(ValueError, match="`image_seq_length`"):
        SparseMoEVLMConfig(vision_config=VISION_CONFIGS["siglip"], image_seq_length=99)


def test_image_token_outside_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="`image_token_id`"):
        SparseMoEVLMConfig(vision_config=VISION_CONFIGS["siglip"], text_config={"vocab_size": 100},
                           image_token_id=IMAGE_TOKEN_ID)


def test_unknown_feature_strategy_and_bad_layer_are_rejected():
    with pytest.raises(ValueError, match="`vision_feature_select_strategy`"):
        SparseMoEVLMConfig(vision_config=VISION_CONFIGS["siglip"], vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match="`vision_feature_layer`"):
        SparseMoEVLMConfig(vision_config=VISION_CONFIGS["convnext"], vision_feature_layer=5)


def test_transformer_tower_feature_layer_must_exist():
    layers = VISION_CONFIGS["siglip"]["num_hidden_layers"]
    # hidden_states = (embeddings, layer_1, ..., layer_n): 0 (the patch embeddings) and -(n + 1) are valid.
    assert SparseMoEVLMConfig(vision_config=VISION_CONFIGS["siglip"], vision_feature_layer=0).vision_feature_layer == 0
    SparseMoEVLMConfig(vision_config=VISION_CONFIGS["siglip"], vision_feature_layer=-(layers + 1))
    with pytest.raises(ValueError, match=rf"`vision_feature_layer` \({layers + 1}\) is out of range .* {layers + 1} hidden"):
        SparseMoEVLMConfig(vision_config=VISION_CONFIGS["siglip"], vision_feature_layer=layers + 1)
    with pytest.raises(ValueError, match="`vision_config.num_hidden_layers` must be at least 1"):
        SparseMoEVLMConfig(vision_config={**VISION_CONFIGS["siglip"], "num_hidden_layers": 0})


def test_transformer_tower_patch_embeddings_can_be_the_image_features():
    import torch

    from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration

    config = SparseMoEVLMConfig(vision_config=VISION_CONFIGS["siglip"], vision_feature_layer=0,
                                text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                                             "moe_intermediate_size": 32, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "num_key_value_heads": 1},
                                image_token_id=5)
    model = SparseMoEVLMForConditionalGeneration(config).eval()
    pixels = torch.randn(1, 3, config.image_size, config.image_size)
    features = model.get_image_features(pixels).pooler_output
    assert features.shape == (1, config.image_seq_length, 32)
