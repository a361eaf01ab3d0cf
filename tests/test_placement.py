"""`expert_offload_device_map`: expert groups on CPU / disk, everything else on the main device."""

import pytest
import torch
from accelerate.utils import compute_module_sizes

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, expert_offload_device_map

from tiny_models import PAD_TOKEN_ID, make_inputs, make_model


GROUPS = [f"model.language_model.layers.{i}.mlp.{g}_moe" for i in range(2) for g in ("text", "image")]


def test_the_map_puts_exactly_the_expert_groups_on_the_expert_device():
    model = make_model(num_shared_experts=1)
    device_map = expert_offload_device_map(model.config, "cpu", "disk")
    assert sorted(name for name, device in device_map.items() if device == "disk") == sorted(GROUPS)
    # every parameter and buffer is covered by exactly one entry
    for name in [*dict(model.named_parameters()), *dict(model.named_buffers())]:
        assert sum(name.startswith(prefix + ".") for prefix in device_map) == 1, name
    assert device_map["model.language_model.layers.0.mlp.shared_experts"] == "cpu"
    assert device_map["model.language_model.layers.0.self_attn"] == "cpu" and device_map["lm_head"] == "cpu"
    assert expert_offload_device_map(model, "cpu", "disk") == device_map  # a model works as well as its config


@pytest.mark.slow
def test_experts_on_disk_give_the_same_logits_and_generation(tmp_path):
    model = make_model(num_shared_experts=1)
    inputs = make_inputs(model.config)
    with torch.no_grad():
        expected = model(**inputs).logits
    greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    model.save_pretrained(tmp_path / "ckpt")
    offloaded = SparseMoEVLMForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", device_map=expert_offload_device_map(model.config, "cpu", "disk"),
        offload_folder=tmp_path / "offload")
    assert offloaded.model.language_model.layers[1].mlp.text_moe.experts.gate_up_proj.device.type == "meta"
    assert offloaded.model.language_model.layers[1].self_attn.q_proj.weight.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**inputs).logits, expected, rtol=0, atol=0)
    assert torch.equal(offloaded.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID),
                       greedy)


def test_a_memory_budget_keeps_the_first_expert_groups_resident():
    model = make_model()
    sizes = compute_module_sizes(model)
    everything_else = sizes[""] - sum(sizes[g] for g in GROUPS)
    budget = everything_else + sizes[GROUPS[0]] + sizes[GROUPS[1]] + 10
    device_map = expert_offload_device_map(model.config, "cpu", "disk", max_memory={"cpu": budget})
    assert [device_map[g] for g in GROUPS] == ["cpu", "cpu", "disk", "disk"]
    with pytest.raises(ValueError, match=r"Everything but the experts takes .* MiB, more than max_memory gives 'cpu'"):
        expert_offload_device_map(model.config, "cpu", "disk", max_memory={"cpu": "1KB"})
    with pytest.raises(ValueError, match="but not the main device 0"):
        expert_offload_device_map(model.config, 0, "cpu", max_memory={"cpu": "1GB"})


def test_bad_arguments_name_the_fix():
    model = make_model()
    with pytest.raises(ValueError, match="main_device='disk' would stream attention"):
        expert_offload_device_map(model.config, "disk", "cpu")
    with pytest.raises(TypeError, match="takes a SparseMoEVLMConfig or a SparseMoEVLMForConditionalGeneration"):
        expert_offload_device_map({"model_type": "sparsemoe_vlm"})
