"""Expert pruning and merging from routing statistics (`hf_sparsemoe_vlm.conversion.compression`) and its script
`conversion/compress_experts.py`."""

import json

import PIL.Image
import pytest
import torch
from transformers import pipeline

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, SparseMoEVLMProcessor, expert_offload_device_map
from hf_sparsemoe_vlm.conversion.compression import (
    align_expert_units,
    collect_expert_usage,
    compress_experts,
    distill_compressed_model,
    experts_to_keep,
    model_inputs,
    usage_summary,
)

from tiny_models import load_conversion_script, make_inputs, make_model, make_processor_and_model


GROUP = "model.language_model.layers.{layer}.mlp.{group}_moe."


compress_script = load_conversion_script("compress_experts")


def calibration(model, batches: int = 2):
    return [make_inputs(model.config, batch_size=3, text_len=8, seed=seed, left_pad=[0, 2, 1])
            for seed in range(batches)]


def block_last_expert(model, router_type: str) -> None:
    """Make the last expert of every group unreachable: a large negative router bias (top-k), or zero weights and a
    negative bias, so its ReLU gate is always 0."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for group in (layer.mlp.text_moe, layer.mlp.image_moe):
                if router_type == "relu":
                    group.router.weight[-1] = 0.0
                    group.router.bias[-1] = -1.0
                else:
                    group.router.bias[-1] = -1e4


def test_usage_counts_every_real_token_of_each_group_once_per_expert_used():
    model = make_model()  # top-2 routing, text 4 experts, image 2
    batches = calibration(model)
    usage = collect_expert_usage(model, batches)
    config = model.config
    assert sorted(usage) == [(i, g) for i in config.text_config.sparse_layer_indices for g in ("image", "text")]
    image_tokens = sum(int((b["input_ids"] == config.image_token_id).sum()) for b in batches)
    text_tokens = sum(int(b["attention_mask"].sum()) for b in batches) - image_tokens
    for (_, group), entry in usage.items():
        assert entry.tokens == (image_tokens if group == "image" else text_tokens)
        assert int(entry.counts.sum()) == 2 * entry.tokens  # top-2: every token uses exactly two experts
        # renormalised top-k weights sum to one per token
        torch.testing.assert_close(float(entry.mass.sum()), float(entry.tokens), rtol=1e-6, atol=1e-4)
        assert torch.allclose(entry.logit_similarity.diagonal(), torch.ones(entry.num_experts, dtype=torch.float64))


@pytest.mark.parametrize("router_type", ["topk", "relu"])
def test_pruning_experts_never_routed_to_leaves_the_outputs_unchanged(router_type):
    overrides = {"router_bias": True, "router_type": router_type, "num_experts_per_tok": 2, "num_image_experts": 3}
    model = make_model(seed=3, **overrides)
    block_last_expert(model, router_type)
    batches = calibration(model)
    usage = collect_expert_usage(model, batches)
    assert all(int(entry.counts[-1]) == 0 for entry in usage.values())
    pruned = compress_experts(model, usage, {"text": 3, "image": 2}, "prune")
    assert pruned.config.text_config.num_experts == 3 and pruned.config.text_config.num_image_experts == 2
    assert pruned.model.language_model.layers[0].mlp.text_moe.experts.gate_up_proj.shape[0] == 3
    with torch.no_grad():
        for batch in batches:
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(pruned(**batch).logits[real], model(**batch).logits[real], atol=1e-5, rtol=0)
        # The check can fail: pruning an expert that tokens do use changes the outputs.
        used = compress_experts(model, usage, {"text": 2, "image": 2}, "prune")
        real = batches[0]["attention_mask"].bool()
        assert (used(**batches[0]).logits[real] - model(**batches[0]).logits[real]).abs().max() > 1e-3


def test_the_most_used_experts_are_kept_ties_broken_by_routing_mass():
    model = make_model()
    usage = collect_expert_usage(model, calibration(model))
    entry = usage[(0, "text")]
    entry.counts[:] = torch.tensor([5, 9, 5, 1])
    entry.mass[:] = torch.tensor([2.0, 4.0, 3.0, 0.5])
    assert experts_to_keep(usage, 0.5)[(0, "text")] == [1, 2]  # 9 tokens; then 5 tokens with the larger mass
    assert experts_to_keep(usage, 0.75)[(0, "text")] == [0, 1, 2]
    assert experts_to_keep(usage, {"text": 1, "image": 2})[(0, "text")] == [1]
    assert experts_to_keep(usage, 0.1)[(0, "image")] == [int(usage[(0, "image")].ranking()[0])]  # at least one
    summary = usage_summary(usage, experts_to_keep(usage, 0.5))
    assert summary["layer0.text"]["kept"] == [1, 2] and summary["layer0.text"]["kept_mass_share"] == round(7 / 9.5, 4)


@pytest.mark.parametrize("keep, message", [
    (0.0, r"--keep as a fraction must be in \(0, 1\]"),
    (1.5, r"--keep as a fraction must be in \(0, 1\]"),
    ({"text": 2}, r"names no count for the 'image' expert group"),
    ({"text": 5, "image": 1}, r"Cannot keep 5 of the 4 text experts"),
    ({"text": 1, "image": 1}, r"fewer than the 2 each token uses \(num_experts_per_tok\): keep more, or lower"),
])
def test_bad_keep_values_are_refused_with_the_fix(keep, message):
    model = make_model()
    usage = collect_expert_usage(model, calibration(model, batches=1))
    with pytest.raises(ValueError, match=message):
        compress_experts(model, usage, keep, "prune")


def test_statistics_of_another_model_are_refused():
    model = make_model()
    usage = collect_expert_usage(model, calibration(model, batches=1))
    other = make_model(num_hidden_layers=3)
    with pytest.raises(ValueError, match="collect them on this model"):
        compress_experts(other, usage, 0.5, "prune")
    with pytest.raises(ValueError, match="Unknown compression method 'average'"):
        compress_experts(model, usage, 0.5, "average")


def test_keeping_fewer_experts_than_the_top_k_takes_a_new_top_k():
    model = make_model()
    batches = calibration(model, batches=1)
    usage = collect_expert_usage(model, batches)
    single = compress_experts(model, usage, {"text": 1, "image": 1}, "prune", num_experts_per_tok=1)
    assert single.config.text_config.num_experts_per_tok == 1 and single.config.text_config.num_experts == 1
    with torch.no_grad():
        assert torch.isfinite(single(**batches[0]).logits).all()


def test_merging_averages_each_dropped_expert_into_its_most_similar_kept_expert_by_use():
    model = make_model(seed=1, num_image_experts=4)
    usage = collect_expert_usage(model, calibration(model))
    entry = usage[(1, "text")]
    kept = experts_to_keep(usage, 0.5)[(1, "text")]
    similarity = entry.logit_similarity
    targets = {d: max(kept, key=lambda k: float(similarity[d, k])) for d in range(4) if d not in kept}
    merged = compress_experts(model, usage, 0.5, "merge")
    pruned = compress_experts(model, usage, 0.5, "prune")
    prefix = GROUP.format(layer=1, group="text")
    source, result = model.state_dict(), merged.state_dict()
    served = entry.counts.double()
    gate_up, down = source[prefix + "experts.gate_up_proj"], source[prefix + "experts.down_proj"]
    for position, expert in enumerate(kept):
        members = [expert] + [d for d, t in targets.items() if t == expert]
        # each dropped member's units are first lined up with the kept expert's
        aligned = [(gate_up[m], down[m]) if m == expert else align_expert_units(gate_up[m], down[m], gate_up[expert],
                                                                                down[expert]) for m in members]
        for index, name in enumerate(("experts.gate_up_proj", "experts.down_proj")):
            expected = sum(served[m] * a[index].double() for m, a in zip(members, aligned, strict=True)) / served[members].sum()
            torch.testing.assert_close(result[prefix + name][position].double(), expected, atol=1e-6, rtol=1e-6)
        # the router row is the kept expert's own, as in pruning
        assert torch.equal(result[prefix + "router.weight"][position], source[prefix + "router.weight"][expert])
    assert torch.equal(result[prefix + "router.weight"], pruned.state_dict()[prefix + "router.weight"])


def swiglu(gate_up: torch.Tensor, down: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    gate, up = (inputs @ gate_up.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ down.T


def test_aligning_units_recovers_a_reordered_sign_flipped_copy_and_keeps_every_expert_s_function():
    generator = torch.Generator().manual_seed(0)
    hidden, width = 16, 24
    gate_up, down = torch.randn(2 * width, hidden, generator=generator), torch.randn(hidden, width, generator=generator)
    order = torch.randperm(width, generator=generator)
    signs = torch.where(torch.rand(width, generator=generator) < 0.5, -1.0, 1.0)
    # the same expert with its units shuffled and half of them written with up row and down column negated
    copy_gate_up = torch.cat([gate_up[:width][order], gate_up[width:][order] * signs[:, None]])
    copy_down = down[:, order] * signs
    inputs = torch.randn(5, hidden, generator=generator)
    torch.testing.assert_close(swiglu(copy_gate_up, copy_down, inputs), swiglu(gate_up, down, inputs))
    aligned_gate_up, aligned_down = align_expert_units(copy_gate_up, copy_down, gate_up, down)
    assert torch.equal(aligned_gate_up, gate_up) and torch.equal(aligned_down, down)
    # an unrelated expert is only reordered and sign-flipped: the function it computes is its own
    other_gate_up, other_down = torch.randn_like(gate_up), torch.randn_like(down)
    moved_gate_up, moved_down = align_expert_units(other_gate_up, other_down, gate_up, down)
    assert not torch.equal(moved_gate_up, other_gate_up)
    torch.testing.assert_close(swiglu(moved_gate_up, moved_down, inputs), swiglu(other_gate_up, other_down, inputs))


def test_merging_a_reordered_duplicate_into_its_original_gives_the_original_back():
    model = make_model(seed=4, num_image_experts=4)
    usage = collect_expert_usage(model, calibration(model))
    prefix = GROUP.format(layer=1, group="text")
    state = model.state_dict()  # shares storage with the parameters
    gate_up, down = state[prefix + "experts.gate_up_proj"], state[prefix + "experts.down_proj"]
    width = down.shape[-1]
    order = torch.randperm(width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for duplicate, original in ((1, 0), (3, 2)):
            gate_up[duplicate] = torch.cat([gate_up[original][:width][order], -gate_up[original][width:][order]])
            down[duplicate] = -down[original][:, order]
    # experts 0 and 2 are used most and kept; 1 routes like 0 and 3 like 2, so each duplicate merges into its original
    entry = usage[(1, "text")]
    entry.counts = torch.tensor([10, 5, 10, 5])
    entry.logit_products = torch.tensor([[1.0, 0.9, 0.1, 0.0], [0.9, 1.0, 0.0, 0.1],
                                         [0.1, 0.0, 1.0, 0.9], [0.0, 0.1, 0.9, 1.0]], dtype=torch.float64)
    merged = compress_experts(model, usage, {"text": 2, "image": 4}, "merge").state_dict()
    for position, original in enumerate((0, 2)):
        torch.testing.assert_close(merged[prefix + "experts.gate_up_proj"][position], gate_up[original])
        torch.testing.assert_close(merged[prefix + "experts.down_proj"][position], down[original])
    # without the alignment the average of the two would be a different expert
    assert not torch.allclose((gate_up[0] * 10 + gate_up[1] * 5) / 15, gate_up[0], atol=1e-3)


def test_merging_an_expert_nothing_used_is_pruning_it():
    model = make_model(seed=3, router_bias=True, num_image_experts=3)
    block_last_expert(model, "topk")
    usage = collect_expert_usage(model, calibration(model))
    merged = compress_experts(model, usage, {"text": 3, "image": 2}, "merge").state_dict()
    pruned = compress_experts(model, usage, {"text": 3, "image": 2}, "prune").state_dict()
    for key in pruned:
        assert torch.equal(merged[key], pruned[key]), key


def kl_to(teacher, student, batches) -> float:
    with torch.no_grad():
        total = 0.0
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            target = torch.log_softmax(teacher(**inputs).logits, -1)
            predicted = torch.log_softmax(student(**inputs).logits, -1)
            divergence = torch.nn.functional.kl_div(predicted, target, log_target=True, reduction="none").sum(-1)
            total += float(divergence[inputs["attention_mask"].bool()].mean())
        return total / len(batches)


def test_distillation_brings_a_merged_model_closer_to_the_original_and_leaves_the_original_alone():
    model = make_model(seed=5, num_image_experts=4)
    with torch.no_grad():  # sharper next-token distributions than a random model's, so merging visibly moves them
        model.lm_head.weight.mul_(30.0)
    batches = calibration(model, batches=3)
    merged = compress_experts(model, collect_expert_usage(model, batches), 0.5, "merge")
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = kl_to(model, merged, batches)
    losses = distill_compressed_model(merged, model, batches, steps=30, learning_rate=1e-4)
    after = kl_to(model, merged, batches)
    assert len(losses) == 30 and before > 0
    assert after < 0.6 * before, (before, after)
    assert not merged.training and all(torch.equal(v, model.state_dict()[k]) for k, v in original_state.items())
    # no steps: nothing changes
    state = {k: v.clone() for k, v in merged.state_dict().items()}
    assert distill_compressed_model(merged, model, batches, steps=0) == []
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "must be >= 0"), ({"steps": 2, "learning_rate": 0.0}, "learning rate must be positive"),
    ({"steps": 2, "batches": []}, "at least one calibration batch")])
def test_distillation_refuses_bad_settings(kwargs, message):
    model = make_model(seed=5)
    kwargs = {"batches": calibration(model, batches=1), **kwargs}
    with pytest.raises(ValueError, match=message):
        distill_compressed_model(model, model, **kwargs)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    processor, model = make_processor_and_model(seed=2, num_image_experts=4)
    folder = tmp_path_factory.mktemp("compress") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_script_writes_a_smaller_checkpoint_that_loads_and_says_how_it_was_made(saved_model, tmp_path, capsys):
    output = tmp_path / "half"
    assert compress_script.main(["--input", str(saved_model), "--output", str(output), "--method", "merge",
                                 "--keep", "0.5", "--calibration_rows", "24", "--batch_size", "8",
                                 "--base_model", "org/tiny-sparsemoe"]) == 0
    printed = capsys.readouterr().out
    for row in ("experts kept per group", "text 2 of 4, image 2 of 4", "calibration", "24 rows of synthetic",
                "routing mass kept", "max abs logit change (calibration batch)", "written checkpoint"):
        assert row in printed, row
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(output)
    original = SparseMoEVLMForConditionalGeneration.from_pretrained(saved_model)
    assert model.config.text_config.num_experts == 2 and model.config.text_config.num_image_experts == 2
    assert model.num_parameters() < original.num_parameters()
    processor = SparseMoEVLMProcessor.from_pretrained(output)
    inputs = processor(images=[torch.zeros(3, 32, 32)], text=[f"{processor.image_token} a red circle"],
                       return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2
    info = json.loads((output / "conversion.json").read_text())
    assert info["method"] == "merge" and info["keep"] == 0.5 and info["base_model"] == "org/tiny-sparsemoe"
    assert info["experts"]["layer0.text"]["kept"] == sorted(info["experts"]["layer0.text"]["kept"])
    assert len(info["experts"]["layer0.image"]["kept"]) == 2 and "24 rows of synthetic" in info["calibration_data"]
    card = (output / "README.md").read_text()
    assert "org/tiny-sparsemoe" in card and "expert merging" in card and "text 2 of 4, image 2 of 4" in card
    assert info["distillation"] is None and "distilled" not in card


def test_script_distils_after_merging_and_says_so(saved_model, tmp_path, capsys):
    output = tmp_path / "half-distilled"
    assert compress_script.main(["--input", str(saved_model), "--output", str(output), "--method", "merge",
                                 "--keep", "0.5", "--calibration_rows", "16", "--batch_size", "8",
                                 "--distill_steps", "4", "--distill_learning_rate", "2e-4",
                                 "--base_model", "org/tiny-sparsemoe"]) == 0
    assert "distillation" in capsys.readouterr().out
    info = json.loads((output / "conversion.json").read_text())
    assert info["distillation"].startswith("4 steps at learning rate 0.0002, KL to the original")
    assert "then distilled from the original" in (output / "README.md").read_text()
    # a normal checkpoint: the pipeline and an expert-offload device map load it and agree with a plain load
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(output).eval()
    processor = SparseMoEVLMProcessor.from_pretrained(output)
    image, prompt = PIL.Image.new("RGB", (32, 32), (200, 30, 30)), f"{processor.image_token} what colour is it?"
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    expected = processor.batch_decode(model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:],
                                      skip_special_tokens=True)[0]
    pipe = pipeline("image-text-to-text", model=str(output))
    assert pipe(images=[image], text=[prompt], max_new_tokens=3, return_full_text=False)[0]["generated_text"] \
        == expected
    device_map = expert_offload_device_map(model.config, "cpu", "disk")
    offloaded = SparseMoEVLMForConditionalGeneration.from_pretrained(output, device_map=device_map,
                                                                     offload_folder=str(tmp_path / "offload"))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("argv, message", [
    (["--keep", "0.5", "--method", "prune", "--calibration_rows", "0"], "--calibration_rows must be positive"),
    (["--keep", "text=9,image=2", "--method", "prune"], "Cannot keep 9 of the 4 text experts"),
    (["--keep", "0.5", "--method", "prune", "--calibration_data", "missing.jsonl"], "missing.jsonl"),
    (["--keep", "0.5", "--method", "merge", "--distill_steps", "-2"], "--distill_steps must be >= 0"),
])
def test_script_bad_input_exits_1_and_writes_nothing(argv, message, saved_model, tmp_path, capsys):
    before = {p: p.read_bytes() for p in saved_model.iterdir()}
    output = tmp_path / "out"
    assert compress_script.main(["--input", str(saved_model), "--output", str(output), "--calibration_rows", "8",
                                 *argv]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and message in error, error
    assert not output.exists() and {p: p.read_bytes() for p in saved_model.iterdir()} == before


def test_script_refuses_a_keep_it_cannot_read(saved_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compress_script.main(["--input", str(saved_model), "--output", str(tmp_path / "o"), "--method", "prune",
                              "--keep", "half"])
    assert exit_info.value.code == 2 and "is not a fraction (0.5) or per-group counts" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [
    {"num_image_experts": 0},  # one pool for every token, as converted MoE-LLaVA checkpoints have
    {"router_type": "top_p", "router_max_experts_per_tok": 3, "num_image_experts": 4},  # the bound follows the group
    {"router_type": "relu", "router_bias": True, "num_shared_experts": 1},  # upcycled-style ReLU with shared experts
])
def test_every_kind_of_checkpoint_compresses_and_runs(overrides):
    model = make_model(seed=5, **overrides)
    batches = calibration(model, batches=1)
    usage = collect_expert_usage(model, batches)
    assert {group for _, group in usage} == set(model.config.text_config.expert_groups)
    for method in ("prune", "merge"):
        smaller = compress_experts(model, usage, 0.5, method)
        groups = smaller.config.text_config.expert_groups
        assert groups == {g: n // 2 for g, n in model.config.text_config.expert_groups.items()}
        bound = smaller.config.text_config.router_max_experts_per_tok
        assert bound is None or bound <= min(groups.values())
        with torch.no_grad():
            assert torch.isfinite(smaller(**batches[0]).logits).all()


def test_a_prefix_attention_model_is_calibrated_and_distilled_attending_as_in_training():
    model = make_model(seed=6, prefix_attention=True)
    causal = make_model(seed=6)
    causal.load_state_dict(model.state_dict())
    batch = calibration(model, batches=1)[0]
    batch["labels"] = batch["input_ids"].masked_fill(torch.arange(batch["input_ids"].shape[1]) < 24, -100)
    inputs = model_inputs(model, batch)
    assert "labels" not in inputs and "prefix_mask" not in model_inputs(causal, batch)
    assert torch.equal(inputs["prefix_mask"], (batch["attention_mask"].bool()
                                               & (torch.arange(batch["input_ids"].shape[1]) < 24)).long())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, model(**batch).logits)
        # labels copied from input_ids (TRL's collator): image placeholders are not supervised, so the prompt reaches
        # past the image tokens here as in the model's own training forward
        unlabelled = (batch["attention_mask"] == 0) | (batch["input_ids"] == model.config.text_config.bos_token_id)
        copied = {**batch, "labels": batch["input_ids"].masked_fill(unlabelled, -100)}
        copied_inputs = model_inputs(model, copied)
        image_tokens = batch["input_ids"] == model.config.image_token_id
        assert copied_inputs["prefix_mask"][image_tokens].all()
        torch.testing.assert_close(model(**copied_inputs).logits, model(**copied).logits)
    prefix_usage, causal_usage = (collect_expert_usage(m, [batch]) for m in (model, causal))
    assert any(not torch.allclose(prefix_usage[key].logit_products, causal_usage[key].logit_products)
               for key in prefix_usage)
