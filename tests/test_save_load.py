import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, SparseMoEVLMModel

from tiny_models import BLOCK_PACKAGE, PAD_TOKEN_ID, make_inputs, make_model


@pytest.mark.parametrize("router_type", ["topk", "top_p", "relu"])
def test_save_and_load_reproduce_logits_exactly(tmp_path, router_type):
    model = make_model(router_type=router_type, num_shared_experts=1, mlp_layer_types=["dense", "sparse"])
    if router_type == "relu":
        model.model.language_model.layers[1].mlp.text_moe.router.laplace_inv_scale.fill_(3.5)  # adapted state
    inputs = make_inputs(model.config)
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert {"configuration_sparsemoe_vlm.py", "modeling_sparsemoe_vlm.py"} <= set(files)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded) is SparseMoEVLMForConditionalGeneration
    torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    if router_type == "relu":
        assert loaded.model.language_model.layers[1].mlp.text_moe.router.laplace_inv_scale.item() == 3.5
    assert loaded.generation_config.suppress_tokens == [model.config.image_token_id]


def test_auto_model_loads_the_base_model(tmp_path):
    make_model().save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is SparseMoEVLMModel


@pytest.mark.parametrize("implementation", ["grouped_mm", {"text_config": "batched_mm"}])
def test_experts_implementation_at_load_time(tmp_path, implementation):
    model = make_model(router_type="top_p")
    inputs = make_inputs(model.config)
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = SparseMoEVLMForConditionalGeneration.from_pretrained(tmp_path, experts_implementation=implementation)
    name = implementation if isinstance(implementation, str) else implementation["text_config"]
    assert loaded.config.text_config._experts_implementation == name
    torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_bf16_load_runs(tmp_path):
    make_model().save_pretrained(tmp_path)
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    inputs = make_inputs(model.config)
    out = model(**inputs)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


@pytest.mark.slow
def test_remote_code_checkpoint_loads_where_the_package_is_not_importable(tmp_path):
    model = make_model(router_type="relu", num_shared_experts=1)
    inputs = make_inputs(model.config)
    model.save_pretrained(tmp_path / "ckpt")
    torch.save({"inputs": inputs, "logits": model(**inputs).logits.detach(),
                "greedy": model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=PAD_TOKEN_ID)},
               tmp_path / "expected.pt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == (
        "modeling_sparsemoe_vlm.SparseMoEVLMForConditionalGeneration"
    )
    script = BLOCK_PACKAGE + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForImageTextToText
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        torch.testing.assert_close(model(**expected["inputs"]).logits, expected["logits"], rtol=0, atol=0)
        greedy = model.generate(**expected["inputs"], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(greedy, expected["greedy"])
        print("REMOTE_CODE_OK", type(model).__name__)
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_CODE_OK SparseMoEVLMForConditionalGeneration" in result.stdout


@pytest.mark.slow
def test_device_map_auto_with_cpu_and_disk_offload_gives_the_same_logits(tmp_path):
    model = make_model(num_shared_experts=1)
    inputs = make_inputs(model.config)
    expected = model(**inputs).logits
    greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    model.save_pretrained(tmp_path / "ckpt")
    offloaded = SparseMoEVLMForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", device_map="auto", max_memory={"cpu": "150KB"}, offload_folder=tmp_path / "offload"
    )
    placements = set(offloaded.hf_device_map.values())
    assert placements == {"cpu", "disk"}, offloaded.hf_device_map
    # Disk-offloaded weights stay on the meta device and are streamed from the safetensors file at each forward.
    assert offloaded.lm_head.weight.device.type == "meta"
    torch.testing.assert_close(offloaded(**inputs).logits, expected, rtol=0, atol=0)
    out = offloaded.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    assert torch.equal(out, greedy)


@pytest.mark.slow
def test_expert_groups_can_be_placed_on_different_devices(tmp_path):
    model = make_model(num_shared_experts=1)
    inputs = make_inputs(model.config)
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "ckpt")
    layer0 = "model.language_model.layers.0"
    device_map = {
        "model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model.embed_tokens": "cpu",
        f"{layer0}.self_attn": "cpu", f"{layer0}.input_layernorm": "cpu", f"{layer0}.post_attention_layernorm": "cpu",
        f"{layer0}.mlp.text_moe": "cpu", f"{layer0}.mlp.image_moe": "disk", f"{layer0}.mlp.shared_experts": "disk",
        "model.language_model.layers.1": "disk", "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu", "lm_head": "cpu",
    }
    placed = SparseMoEVLMForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert placed.hf_device_map[f"{layer0}.mlp.image_moe"] == "disk"
    # On disk for a CPU forward: memory-mapped from the checkpoint instead of loaded at every forward.
    image_experts = placed.model.language_model.layers[0].mlp.image_moe.experts
    assert image_experts.gate_up_proj.device.type == "cpu" and not image_experts._hf_hook.offload
    torch.testing.assert_close(placed(**inputs).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("per_expert", [False, True])
def test_sharded_fused_and_per_expert_layouts_reload_to_identical_logits(tmp_path, per_expert):
    model = make_model(num_shared_experts=1)
    inputs = make_inputs(model.config)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path, max_shard_size="40KB", save_original_format=per_expert)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / shard).is_file() for shard in shards)
    keys = set(index["weight_map"])
    fused = {k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    per_expert_keys = {k for k in keys if re.search(r"_moe\.experts\.\d+\.(gate|up|down)_proj\.weight$", k)}
    if per_expert:  # 2 layers x (4 text + 2 image experts) x 3 projections, no fused tensor left
        assert not fused and len(per_expert_keys) == 2 * 6 * 3
        assert "model.language_model.layers.1.mlp.image_moe.experts.1.up_proj.weight" in keys
    else:
        assert len(fused) == 2 * 2 * 2 and not per_expert_keys
    reloaded = SparseMoEVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    for name, param in model.state_dict().items():
        assert torch.equal(param, reloaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
