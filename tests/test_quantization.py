"""Quantised experts (torchao through `TorchAoConfig`, bitsandbytes for the linear layers) on tiny models: every
experts kernel runs them, the checkpoint round-trips through safetensors and the Hub, and schemes or device maps the
model cannot honour are refused before anything loads."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration

from tiny_models import make_inputs, make_model, make_processor_and_model


torchao = pytest.importorskip("torchao")
from torchao.quantization import FqnToConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig  # noqa: E402
from transformers import TorchAoConfig  # noqa: E402


KERNELS = ("eager", "grouped_mm", "batched_mm")


def expert_tensor_types(model) -> set[str]:
    return {type(param.data).__name__ for name, param in model.named_parameters() if ".experts." in name}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny fp32 model (text and image expert groups, a shared expert) saved to disk, with its inputs and logits."""
    folder = tmp_path_factory.mktemp("fp32")
    model = make_model(num_shared_experts=1)
    model.save_pretrained(folder)
    inputs = make_inputs(model.config)
    return {"folder": folder, "inputs": inputs, "logits": logits(model, inputs)}


@pytest.fixture(scope="module")
def quantized(saved, tmp_path_factory):
    """The model loaded with int8 weight-only torchao quantisation, then saved (a pre-quantised checkpoint)."""
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(
        saved["folder"], quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    folder = tmp_path_factory.mktemp("int8")
    model.save_pretrained(folder)
    return {"model": model, "folder": folder, "logits": logits(model, saved["inputs"])}


def test_torchao_config_quantises_the_expert_tensors_as_well_as_the_linear_layers(saved, quantized):
    model = quantized["model"]
    assert expert_tensor_types(model) == {"Int8Tensor"}
    layer = model.model.language_model.layers[0]
    assert type(layer.self_attn.q_proj.weight.data).__name__ == "Int8Tensor"
    assert type(layer.mlp.shared_experts.up_proj.weight.data).__name__ == "Int8Tensor"
    # Routers stay in full precision: their logits decide which experts run.
    assert type(layer.mlp.text_moe.router.weight.data) is torch.Tensor
    # int8 per-row weights: close to the fp32 model, not equal to it.
    difference = (quantized["logits"] - saved["logits"]).abs()
    assert 0 < difference.max() < 0.05 and difference.mean() < 5e-3


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_experts_kernel_runs_the_quantised_experts_with_the_same_logits(saved, quantized, kernel):
    model = quantized["model"]
    model.set_experts_implementation(kernel)
    try:
        torch.testing.assert_close(logits(model, saved["inputs"]), quantized["logits"], rtol=0, atol=1e-5)
    finally:
        model.set_experts_implementation("eager")


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_quantised_checkpoint_reloads_from_safetensors_with_every_kernel(saved, quantized, kernel):
    folder = quantized["folder"]
    with safe_open(folder / "model.safetensors", framework="pt") as checkpoint:
        keys = set(checkpoint.keys())
    # The fused int8 tensors are stored flattened (data + per-row scales), not as fp32.
    assert any(key.endswith("text_moe.experts._gate_up_proj_qdata") for key in keys), sorted(keys)[:8]
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    reloaded = SparseMoEVLMForConditionalGeneration.from_pretrained(folder, experts_implementation=kernel)
    assert expert_tensor_types(reloaded) == {"Int8Tensor"}
    torch.testing.assert_close(logits(reloaded, saved["inputs"]), quantized["logits"], rtol=0, atol=1e-5)


def test_the_quantised_checkpoint_is_about_a_quarter_of_the_fp32_expert_bytes(saved, quantized):
    def expert_bytes(folder):
        with safe_open(folder / "model.safetensors", framework="pt") as checkpoint:
            return sum(checkpoint.get_tensor(key).nbytes for key in checkpoint.keys() if ".experts." in key)

    ratio = expert_bytes(quantized["folder"]) / expert_bytes(saved["folder"])
    # int8 data is 1/4 of fp32; the per-row scales (and zero points) add 2 floats per row of 32 (hidden 32 here).
    assert 0.25 < ratio < 0.5, ratio


def test_generate_with_quantised_experts(saved, quantized):
    out = quantized["model"].generate(**saved["inputs"], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, saved["inputs"]["input_ids"].shape[1] + 4)


def test_an_fqn_config_naming_the_experts_is_taken_as_given(saved):
    # Experts left in full precision (None) while the linear layers are quantised.
    config = TorchAoConfig(FqnToConfig({r"re:.*\.experts\.(gate_up_proj|down_proj)": None,
                                        r"re:.*language_model.*_proj\.weight": Int8WeightOnlyConfig()}))
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(saved["folder"], quantization_config=config)
    assert expert_tensor_types(model) == {"Tensor"}
    assert type(model.model.language_model.layers[0].self_attn.q_proj.weight.data).__name__ == "Int8Tensor"


def test_a_scheme_torchao_cannot_apply_to_fused_experts_is_refused_before_loading(saved, tmp_path):
    # Int4 weight-only needs a GPU kernel package here; the error says so and names the scheme that works.
    with pytest.raises(ValueError, match=r"cannot apply Int4WeightOnlyConfig to the fused expert tensors.*"
                                         r"Int8WeightOnlyConfig\(\) works for them.*FqnToConfig"):
        SparseMoEVLMForConditionalGeneration.from_pretrained(
            tmp_path / "not-read", quantization_config=TorchAoConfig(Int4WeightOnlyConfig()))


def test_a_device_map_naming_fused_expert_tensors_is_refused(saved):
    name = "model.language_model.layers.0.mlp.text_moe.experts.gate_up_proj"
    with pytest.raises(ValueError, match=r"names fused expert tensors.*Name their module instead "
                                         r"\('model\.language_model\.layers\.0\.mlp\.text_moe\.experts'\)"):
        SparseMoEVLMForConditionalGeneration.from_pretrained(saved["folder"], device_map={"": "cpu", name: "cpu"})


def test_quantising_offloaded_experts_is_refused_with_the_fix(saved):
    from hf_sparsemoe_vlm.modeling_sparsemoe_vlm import quantize_expert_tensors

    with torch.device("meta"):
        model = make_model()
    with pytest.raises(ValueError, match=r"is offloaded.*load them resident"):
        quantize_expert_tensors(model, Int8WeightOnlyConfig())


def test_quantised_training_step_reaches_the_unquantised_parameters(saved, quantized):
    # int8 weight-only tensors are frozen; the eager loop must not try to unbind them for autograd.
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(quantized["folder"])
    model.train()
    for param in model.parameters():
        param.requires_grad_(type(param.data) is torch.Tensor and param.is_floating_point())
    inputs = dict(saved["inputs"], labels=saved["inputs"]["input_ids"])
    model(**inputs).loss.backward()
    router = model.model.language_model.layers[0].mlp.text_moe.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


@pytest.mark.slow
def test_push_of_a_quantised_checkpoint_loads_back_from_the_hub(hub_server, tmp_path):
    from test_hub import run_client

    processor, model = make_processor_and_model()
    folder = tmp_path / "fp32"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    run_client(hub_server, tmp_path / "hf_home", f"""
        import torch
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig
        from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, SparseMoEVLMProcessor
        from hf_sparsemoe_vlm.app.cli import main

        model = SparseMoEVLMForConditionalGeneration.from_pretrained(
            {str(folder)!r}, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
        model.save_pretrained("int8")
        SparseMoEVLMProcessor.from_pretrained({str(folder)!r}).save_pretrained("int8")
        assert main(["push", "int8", "org/int8-experts"]) == 0
        hub = SparseMoEVLMForConditionalGeneration.from_pretrained("org/int8-experts")
        assert {{type(p.data).__name__ for n, p in hub.named_parameters() if ".experts." in n}} == {{"Int8Tensor"}}
        ids = torch.tensor([[1, 5, 6, 7]])
        with torch.no_grad():
            torch.testing.assert_close(hub(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    """)


def test_bitsandbytes_8bit_quantises_the_linear_layers_and_leaves_the_experts_in_full_precision(saved):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' casting notices on CPU
        model = SparseMoEVLMForConditionalGeneration.from_pretrained(
            saved["folder"], quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        result = logits(model, saved["inputs"])
    layer = model.model.language_model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == "Linear8bitLt"
    assert expert_tensor_types(model) == {"Tensor"}  # bitsandbytes replaces nn.Linear modules only
    assert (result - saved["logits"]).abs().max() < 0.05
