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
    experts = offloaded.model.language_model.layers[1].mlp.text_moe.experts
    # Memory-mapped from the checkpoint rather than read whole by Accelerate before every forward.
    assert not experts._hf_hook.offload
    for tensor in (experts.gate_up_proj, experts.down_proj):
        assert mapped_file(tensor.data_ptr()) == str((tmp_path / "ckpt" / "model.safetensors").resolve())
    for kernel in ("eager", "grouped_mm", "batched_mm"):
        offloaded.set_experts_implementation(kernel)
        with torch.no_grad():
            torch.testing.assert_close(offloaded(**inputs).logits, expected, rtol=0, atol=1e-6)
    offloaded.set_experts_implementation("eager")
    assert torch.equal(offloaded.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID),
                       greedy)
    assert torch.equal(experts.gate_up_proj, model.model.language_model.layers[1].mlp.text_moe.experts.gate_up_proj)


def mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (from /proc/self/maps), or None for anonymous memory."""
    for line in open("/proc/self/maps").read().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.mark.slow
def test_experts_converted_at_load_stay_with_accelerates_offload(tmp_path):
    # bf16 from an fp32 checkpoint: the file's bytes are not the tensors, so nothing is mapped.
    model = make_model()
    inputs = make_inputs(model.config)
    model.save_pretrained(tmp_path / "ckpt")
    offloaded = SparseMoEVLMForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", device_map=expert_offload_device_map(model.config, "cpu", "disk"),
        offload_folder=tmp_path / "offload", dtype=torch.bfloat16)
    experts = offloaded.model.language_model.layers[1].mlp.text_moe.experts
    assert experts._hf_hook.offload and experts.gate_up_proj.device.type == "meta"
    resident = SparseMoEVLMForConditionalGeneration.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**inputs).logits, resident(**inputs).logits, rtol=0, atol=0)


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
