import math

import pytest
import torch
import torch.nn.functional as F

from hf_sparsemoe_vlm import SparseMoEVLMRouting

from tiny_models import IMAGE_TOKEN_ID, VISION_CONFIGS, make_inputs, make_model


ROUTER_TYPES = ["topk", "top_p", "relu"]


def _sharpen_routers(model, scale: float = 40.0, seed: int = 1):
    """Large random router weights: peaked, token-dependent routing distributions."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * scale / param.shape[1] ** 0.5)


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
@pytest.mark.parametrize("with_image", [True, False])
def test_forward_shapes_and_finite_losses(router_type, with_image):
    model = make_model(router_type=router_type, num_shared_experts=1)
    inputs = make_inputs(model.config, with_image=with_image)
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape == (*inputs["input_ids"].shape, 128)
    for value in (out.loss, out.aux_loss, out.z_loss):
        assert torch.isfinite(value)
    assert (out.l1_loss is not None) == (router_type == "relu")
    assert (out.image_hidden_states is not None) == with_image
    assert ("image/experts_per_token" in out.routing_stats) == with_image
    assert out.routing_stats["text/tokens_per_expert"].shape == (2, 4)


@pytest.mark.parametrize("vision", list(VISION_CONFIGS))
def test_every_vision_tower_feeds_the_decoder(vision):
    model = make_model(vision)
    inputs = make_inputs(model.config)
    out = model(**inputs)
    assert out.image_hidden_states.shape == (2, model.config.image_seq_length, 32)
    # The projected features are what the decoder sees at the image positions.
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    image_mask = inputs["input_ids"] == IMAGE_TOKEN_ID
    embeds[image_mask] = out.image_hidden_states.reshape(-1, 32)
    same = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                 mm_token_type_ids=image_mask.long())
    torch.testing.assert_close(same.logits, out.logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_left_padding_does_not_change_the_real_tokens(router_type):
    model = make_model(router_type=router_type)
    batch = make_inputs(model.config, batch_size=2, left_pad=[3, 0], seed=3)
    out = model(**batch)
    for row in range(2):
        real = batch["attention_mask"][row].bool()
        single = model(input_ids=batch["input_ids"][row:row + 1, real],
                       pixel_values=batch["pixel_values"][row:row + 1])
        torch.testing.assert_close(out.logits[row, real], single.logits[0], rtol=0, atol=2e-5)


def test_image_tokens_are_routed_only_to_image_experts():
    model = make_model(num_shared_experts=1)
    inputs = make_inputs(model.config)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = args[0].shape[0]
        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules() if name.endswith(("text_moe.experts", "image_moe.experts",
                                                                     "shared_experts"))
    ]
    out = model(**inputs, output_routing=True)
    for hook in hooks:
        hook.remove()
    n_tokens = inputs["input_ids"].numel()
    n_image = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    flat_is_image = (inputs["input_ids"] == IMAGE_TOKEN_ID).reshape(-1)
    assert len(out.routing) == 4  # 2 sparse layers x 2 groups
    for routing in out.routing:
        assert isinstance(routing, SparseMoEVLMRouting)
        expected = flat_is_image.nonzero()[:, 0] if routing.group == "image" else (~flat_is_image).nonzero()[:, 0]
        assert torch.equal(routing.token_index, expected)
        assert routing.router_logits.shape == (len(expected), 2 if routing.group == "image" else 4)
    # top-k=2: each image token is two (token, expert) rows of the image experts, and never reaches text experts.
    for layer in range(2):
        assert seen[f"model.language_model.layers.{layer}.mlp.image_moe.experts"] == n_image
        assert seen[f"model.language_model.layers.{layer}.mlp.text_moe.experts"] == n_tokens - n_image
        assert seen[f"model.language_model.layers.{layer}.mlp.shared_experts"] == n_tokens


def test_router_logits_are_one_tensor_per_sparse_layer_as_in_transformers_moe_models():
    """`router_logits`: (batch * seq_len, experts) float tensors, each token's row from its own group's router; the
    image group has 2 experts and the text group 4, so image rows end in -inf (experts that do not exist for them)."""
    model = make_model(mlp_layer_types=["dense", "sparse"])
    inputs = make_inputs(model.config)
    out = model(**inputs, output_router_logits=True, output_routing=True)
    assert len(out.router_logits) == 1 and len(out.routing) == 2
    logits = out.router_logits[0]
    assert logits.shape == (inputs["input_ids"].numel(), 4) and logits.dtype == torch.float32
    for routing in out.routing:
        rows = logits[routing.token_index]
        torch.testing.assert_close(rows[:, : routing.num_experts], routing.router_logits, rtol=0, atol=0)
        assert torch.isneginf(rows[:, routing.num_experts:]).all()
    assert model(**inputs).router_logits is None  # only when asked (or `config.text_config.output_router_logits`)
    assert model(**inputs, output_router_logits=True).routing is None


def test_routing_is_decided_in_float32_under_bf16_autocast():
    model = make_model()
    inputs = make_inputs(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, output_router_logits=True, output_routing=True)
    assert out.logits.dtype == torch.bfloat16  # the rest runs in bf16
    assert all(logits.dtype == torch.float32 for logits in out.router_logits)
    assert all(r.router_logits.dtype == r.top_k_weights.dtype == torch.float32 for r in out.routing)


def test_single_pool_serves_every_token_when_there_is_no_image_group():
    model = make_model(num_image_experts=0)
    inputs = make_inputs(model.config)
    out = model(**inputs, output_routing=True)
    assert [r.group for r in out.routing] == ["text", "text"]
    assert all(r.token_index.numel() == inputs["input_ids"].numel() for r in out.routing)
    assert model.model.language_model.layers[0].mlp.image_moe is None


def test_changing_image_experts_leaves_text_only_prompts_untouched():
    model = make_model()
    inputs = make_inputs(model.config, with_image=False)
    before = model(**inputs).logits
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.mlp.image_moe.experts.down_proj.mul_(10)
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)
    image_inputs = make_inputs(model.config)
    assert not torch.allclose(model(**image_inputs).logits, make_model()(**image_inputs).logits)


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_gradients_reach_routers_and_experts_of_both_groups(router_type):
    model = make_model(router_type=router_type, num_shared_experts=1).train()
    inputs = make_inputs(model.config)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for layer in range(2):
        prefix = f"model.language_model.layers.{layer}.mlp"
        for group in ("text_moe", "image_moe"):
            for param in ("router.weight", "experts.gate_up_proj", "experts.down_proj"):
                grad = model.get_parameter(f"{prefix}.{group}.{param}").grad
                assert grad is not None and grad.abs().sum() > 0, f"{prefix}.{group}.{param}"
        assert model.get_parameter(f"{prefix}.shared_experts.up_proj.weight").grad.abs().sum() > 0
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert next(model.model.vision_tower.parameters()).grad is not None


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_each_router_loss_is_differentiable(router_type):
    model = make_model(router_type=router_type)
    inputs = make_inputs(model.config)
    out = model(**inputs, output_router_logits=True)
    assert out.loss is None  # no labels: nothing added, losses only reported
    losses = [out.aux_loss, out.z_loss] + ([out.l1_loss] if router_type == "relu" else [])
    for loss in losses:
        model.zero_grad()
        loss.backward(retain_graph=True)
        router = model.model.language_model.layers[0].mlp.image_moe.router.weight
        assert router.grad is not None and router.grad.abs().sum() > 0


def test_loss_is_cross_entropy_plus_weighted_router_losses():
    model = make_model(router_type="relu", router_l1_loss_coef=0.05)
    inputs = make_inputs(model.config)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    # Image placeholders are never targets.
    labels = labels.masked_fill(labels == IMAGE_TOKEN_ID, -100)
    shift_logits, shift_labels = out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    expected = ce + 0.01 * out.aux_loss + 0.001 * out.z_loss + 0.05 * out.l1_loss
    torch.testing.assert_close(out.loss, expected)


def test_balance_loss_is_one_for_uniform_routing_and_z_loss_matches_definition():
    model = make_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.zero_()  # uniform probabilities: every expert equally likely
    inputs = make_inputs(model.config, with_image=False, batch_size=1, text_len=40)
    out = model(**inputs, output_router_logits=True)
    # Uniform P_e = 1/E; the balance term is then E * sum_e f_e / E = 1 whatever the tie-breaking.
    torch.testing.assert_close(out.aux_loss, torch.tensor(1.0))
    torch.testing.assert_close(out.z_loss, torch.log(torch.tensor(4.0)) ** 2)


def test_padding_is_excluded_from_router_losses():
    model = make_model()
    inputs = make_inputs(model.config, batch_size=2, left_pad=[4, 0])
    padded = model(**inputs, output_router_logits=True)
    ones = model(**{**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])},
                 output_router_logits=True)
    # 2 sparse layers x top-2 assignments per real text token
    assert padded.routing_stats["text/tokens_per_expert"].sum() == 2 * 2 * int(
        (inputs["attention_mask"].bool() & (inputs["input_ids"] != IMAGE_TOKEN_ID)).sum()
    )
    assert not torch.isclose(padded.aux_loss, ones.aux_loss)


def test_top_p_takes_the_fewest_experts_reaching_the_mass():
    model = make_model(router_type="top_p", router_top_p=0.6, num_experts=8, num_image_experts=8,
                       router_max_experts_per_tok=6)
    _sharpen_routers(model, scale=3.0)
    inputs = make_inputs(model.config, text_len=30)
    out = model(**inputs, output_routing=True)
    counts = []
    for routing in out.routing:
        probs = routing.router_logits.softmax(-1)
        sorted_probs, _ = probs.sort(-1, descending=True)
        needed = (sorted_probs.cumsum(-1) < 0.6).sum(-1) + 1  # fewest experts whose mass reaches 0.6
        active = (routing.routing_weights > 0).sum(-1)
        assert torch.equal(active, needed.clamp(max=6))
        torch.testing.assert_close(routing.routing_weights.sum(-1), torch.ones(len(active)))
        counts.append(active)
    counts = torch.cat(counts)
    assert counts.min() < counts.max(), "the number of experts should vary per token"
    per_token = torch.cat([(r.routing_weights > 0).sum(-1).float() for r in out.routing if r.group == "text"])
    torch.testing.assert_close(out.routing_stats["text/experts_per_token"], per_token.mean())


def test_relu_router_switches_experts_off_per_token():
    model = make_model(router_type="relu", num_experts=8, num_image_experts=8)
    _sharpen_routers(model, scale=3.0)
    inputs = make_inputs(model.config, text_len=30)
    out = model(**inputs, output_routing=True)
    active = []
    for routing in out.routing:
        torch.testing.assert_close(routing.routing_weights, F.relu(routing.router_logits))
        active.append((routing.routing_weights > 0).sum(-1))
    active = torch.cat(active)
    assert active.min() < active.max()
    # L1 = (1/b) * mean over tokens of the summed gates, averaged over routing records.
    expected = torch.stack([r.routing_weights.sum(-1).mean() for r in out.routing]).mean()
    torch.testing.assert_close(out.l1_loss, expected)


def test_relu_token_with_every_gate_off_gets_no_expert_output():
    model = make_model(router_type="relu")
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.mlp.text_moe.router.weight.fill_(0.0)  # relu(0) = 0: every text expert off
    group = model.model.language_model.layers[0].mlp.text_moe
    hidden = torch.randn(5, 32)
    output, routing = group(hidden, torch.arange(5))
    assert torch.count_nonzero(routing.routing_weights) == 0
    torch.testing.assert_close(output, torch.zeros_like(output), rtol=0, atol=0)


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_router_bias_is_added_to_the_logits(router_type):
    model = make_model(router_type=router_type, router_bias=True)
    group = model.model.language_model.layers[0].mlp.text_moe
    assert group.router.bias is not None and torch.count_nonzero(group.router.bias) == 0  # zero-initialised
    hidden = torch.randn(5, 32)
    with torch.no_grad():
        group.router.weight.zero_()
        group.router.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 5.0]))
    _, routing = group(hidden, torch.arange(5))
    torch.testing.assert_close(routing.router_logits, torch.tensor([[0.1, 0.2, 0.3, 5.0]]).expand(5, 4))
    assert (routing.routing_weights.argmax(-1) == 3).all()
    assert "router.bias" not in "".join(n for n, _ in make_model(router_type=router_type).named_parameters())


@pytest.mark.parametrize("target,grows", [(1.0, True), (8.0, False)])
def test_laplace_coefficient_adapts_toward_target_active_experts(target, grows):
    model = make_model(router_type="relu", router_target_active_experts=target, router_laplace_adapt_rate=1.5,
                       router_laplace_b=2.0).train()
    router = model.model.language_model.layers[0].mlp.text_moe.router
    assert router.laplace_inv_scale.item() == pytest.approx(0.5)
    inputs = make_inputs(model.config)
    model(**inputs, labels=inputs["input_ids"])
    assert router.laplace_inv_scale.item() == pytest.approx(0.5)  # a forward only counts; the step adapts
    model.adapt_laplace_scales()
    # At init about half of the 4 experts are active: above a target of 1, below a target of 8.
    assert router.laplace_inv_scale.item() == pytest.approx(0.75 if grows else 0.5 / 1.5)
    model.adapt_laplace_scales()  # nothing observed since the last step: unchanged
    assert router.laplace_inv_scale.item() == pytest.approx(0.75 if grows else 0.5 / 1.5)
    model.eval()
    model(**inputs, labels=inputs["input_ids"])
    assert router.observed is None  # an eval forward with labels leaves the model as it was
    model.adapt_laplace_scales()
    assert router.laplace_inv_scale.item() == pytest.approx(0.75 if grows else 0.5 / 1.5)  # frozen in eval
    assert "model.language_model.layers.0.mlp.text_moe.router.laplace_inv_scale" in model.state_dict()


def test_laplace_adaptation_counts_the_same_over_micro_batches_as_over_one_batch():
    """Two micro-batches of 2 then one step == one batch of 4 then one step: the counts are pooled over tokens."""
    model = make_model(router_type="relu", router_target_active_experts=1.7, num_experts=8, num_image_experts=8)
    _sharpen_routers(model, scale=3.0)
    model.train()
    inputs = make_inputs(model.config, batch_size=4, left_pad=[0, 2, 1, 3])
    labels = inputs["input_ids"]
    routers = list(model.routers().values())
    model(**inputs, labels=labels)
    whole = [r.observed.clone() for r in routers]
    for r in routers:
        r.observed = None
    for rows in (slice(0, 2), slice(2, 4)):
        model(**{k: v[rows] for k, v in inputs.items()}, labels=labels[rows])
    for router, expected in zip(routers, whole, strict=True):
        torch.testing.assert_close(router.observed, expected, rtol=0, atol=0)  # (active pairs, real tokens)
    assert whole[0][1] == inputs["attention_mask"].sum() - (inputs["input_ids"] == IMAGE_TOKEN_ID).sum()


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_experts_implementations_give_the_same_logits(router_type):
    model = make_model(router_type=router_type, num_shared_experts=1)
    _sharpen_routers(model, scale=2.0)
    inputs = make_inputs(model.config)
    logits = {}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(implementation)
        assert model.config.text_config._experts_implementation == implementation
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits
    torch.testing.assert_close(logits["batched_mm"], logits["eager"], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits["grouped_mm"], logits["eager"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_experts_implementations_give_the_same_gradients(router_type):
    # The eager loop has a backward of its own (each expert's weight gradient written into the fused gradient):
    # it must agree with autograd through Transformers' grouped and batched kernels, for every parameter.
    model = make_model(router_type=router_type, num_shared_experts=1, num_experts=6, router_bias=True)
    _sharpen_routers(model, scale=2.0)
    with torch.no_grad():  # text expert 5 of layer 0 is never routed to
        model.model.language_model.layers[0].mlp.text_moe.router.bias[5] = -1e4
    model.train()
    model.config.text_config.router_jitter_noise = 0.0
    inputs = make_inputs(model.config)
    inputs["labels"] = inputs["input_ids"]
    grads = {}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        model(**inputs).loss.backward()
        grads[implementation] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    experts = "model.language_model.layers.0.mlp.text_moe.experts.gate_up_proj"
    assert experts in grads["eager"]
    # An expert no token used gets an exactly zero gradient; the others do not.
    assert torch.equal(grads["eager"][experts].flatten(1).abs().sum(-1) == 0, torch.arange(6) == 5)
    for implementation in ("batched_mm", "grouped_mm"):
        assert grads[implementation].keys() == grads["eager"].keys()
        for name, grad in grads["eager"].items():
            torch.testing.assert_close(grads[implementation][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_kernels_mask_sentinel_rows_only_when_a_sentinel_can_reach_them(router_type, monkeypatch):
    # Masking costs the grouped / batched kernels three passes over the activations: a top-k router fills every
    # slot and dynamic routers' used pairs are compacted before the kernel, so neither asks for it; the shape-static
    # dispatch (under torch.compile) gives the other modality's tokens the sentinel, so it does.
    from hf_sparsemoe_vlm.modeling_sparsemoe_vlm import SparseMoEVLMExpertGroup

    model = make_model(router_type=router_type, num_shared_experts=1)
    _sharpen_routers(model, scale=2.0)
    groups = [module for module in model.modules() if isinstance(module, SparseMoEVLMExpertGroup)]
    inputs = make_inputs(model.config)
    logits = {}
    for implementation in ("batched_mm", "grouped_mm"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits
        assert not any(group.experts._is_expert_parallel for group in groups)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for implementation in ("batched_mm", "grouped_mm"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            static = model(**inputs).logits
        assert all(group.experts._is_expert_parallel for group in groups)
        torch.testing.assert_close(static, logits[implementation], rtol=0, atol=1e-5)


def test_eager_experts_backward_with_frozen_expert_tensors_reaches_inputs_and_routers():
    model = make_model(num_shared_experts=1)
    model.train()
    model.config.text_config.router_jitter_noise = 0.0
    inputs = make_inputs(model.config)
    inputs["labels"] = inputs["input_ids"]
    model(**inputs).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "model.language_model.layers.0.mlp.text_moe.experts.down_proj" in expected
    model.zero_grad(set_to_none=True)
    for name, param in model.named_parameters():
        param.requires_grad_(".experts.down_proj" not in name)  # gate_up trains, down is frozen
    model(**inputs).loss.backward()
    for name, param in model.named_parameters():
        if ".experts.down_proj" in name:
            assert param.grad is None
        elif name in expected:
            torch.testing.assert_close(param.grad, expected[name], rtol=0, atol=0, msg=name)


def test_hidden_states_and_eager_attentions_are_returned():
    model = make_model(mlp_layer_types=["dense", "sparse"])
    model.set_attn_implementation("eager")
    inputs = make_inputs(model.config)
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    seq_len = inputs["input_ids"].shape[1]
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, seq_len, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, seq_len, seq_len)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, seq_len))


def test_sdpa_and_eager_attention_agree():
    model = make_model()
    inputs = make_inputs(model.config, left_pad=[2, 0])
    sdpa = model(**inputs).logits
    model.set_attn_implementation("eager")
    eager = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(eager[mask], sdpa[mask], rtol=0, atol=1e-5)


def test_dense_layers_have_a_plain_mlp_and_no_router():
    model = make_model(mlp_layer_types=["dense", "sparse"])
    inputs = make_inputs(model.config)
    out = model(**inputs, output_routing=True)
    assert {r.layer_idx for r in out.routing} == {1}
    assert not hasattr(model.model.language_model.layers[0].mlp, "text_moe")
    assert out.routing_stats["text/tokens_per_expert"].shape == (1, 4)


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = make_inputs(make_model().config)
    grads = []
    for checkpointing in (False, True):
        model = make_model(router_type="top_p").train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.language_model.layers[0].gradient_checkpointing
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_mismatched_image_tokens_raise_with_both_counts():
    model = make_model()
    inputs = make_inputs(model.config, batch_size=2)
    inputs["pixel_values"] = inputs["pixel_values"][:1]
    with pytest.raises(ValueError, match="32 image tokens but 1 image"):
        model(**inputs)


def test_wrong_pixel_values_rank_raises():
    model = make_model()
    inputs = make_inputs(model.config)
    with pytest.raises(ValueError, match="pixel_values"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][0]})


def test_tied_word_embeddings():
    model = make_model(tie_word_embeddings=True)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_routing_stats_during_cached_decoding_count_the_new_tokens_only():
    model = make_model()
    inputs = make_inputs(model.config, left_pad=[3, 0])
    prefill = model(**inputs, use_cache=True)
    next_tokens = prefill.logits[:, -1].argmax(-1, keepdim=True)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
    step = model(input_ids=next_tokens, attention_mask=attention_mask, cache=prefill.cache,
                 output_router_logits=True)
    # Two new text tokens, top-2, two sparse layers; the left padding of the prompt plays no part.
    assert step.routing_stats["text/tokens_per_expert"].sum() == 2 * 2 * 2
    torch.testing.assert_close(step.routing_stats["text/experts_per_token"], torch.tensor(2.0))
    assert torch.isfinite(step.aux_loss)


def test_image_position_embeddings_are_added_to_each_image_token():
    from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration

    from tiny_models import make_config

    config = make_config("resnet")
    config.image_position_embeddings = True
    torch.manual_seed(0)
    model = SparseMoEVLMForConditionalGeneration(config).eval()
    projector = model.model.multi_modal_projector
    assert projector.position_embedding.shape == (config.image_seq_length, config.text_config.hidden_size)
    # Initialised like the other weights (std 0.02), with the token's grid row and column in channels 0 and 1.
    side = math.isqrt(config.image_seq_length)
    assert side > 1 and side * side == config.image_seq_length
    grid = torch.linspace(-1, 1, side)
    torch.testing.assert_close(projector.position_embedding[:, 0], grid.repeat_interleave(side))
    torch.testing.assert_close(projector.position_embedding[:, 1], grid.repeat(side))
    assert 0 < projector.position_embedding[:, 2:].std() < 0.05
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with_positions = model.model.get_image_features(pixel_values).pooler_output
        offset = torch.arange(config.image_seq_length, dtype=torch.float)[:, None].expand_as(projector.position_embedding)
        projector.position_embedding.add_(offset)
        shifted = model.model.get_image_features(pixel_values).pooler_output
    torch.testing.assert_close(shifted - with_positions, offset.expand(2, -1, -1))
    assert make_model("resnet").model.multi_modal_projector.position_embedding is None


def test_a_frozen_vision_tower_stays_in_eval_mode_while_the_rest_trains():
    from hf_sparsemoe_vlm.app.training import apply_training_stage

    model = make_model("resnet")  # BatchNorm in the tower
    images = torch.randn(3, 3, 32, 32)
    model.train()
    assert model.model.vision_tower.training  # a trainable tower trains (batch statistics)
    alone = model.model.get_image_features(images[:1]).pooler_output
    assert not torch.allclose(alone, model.model.get_image_features(images).pooler_output[:1])
    apply_training_stage(model, "full", freeze_vision_tower=True)
    model.train()
    assert model.training and model.model.language_model.training and not model.model.vision_tower.training
    running_mean = model.model.vision_tower.embedder.embedder.normalization.running_mean.clone()
    # Running statistics, not the batch's: an image gets the same features whatever it is batched with.
    alone = model.model.get_image_features(images[:1]).pooler_output
    torch.testing.assert_close(alone, model.model.get_image_features(images).pooler_output[:1])
    torch.testing.assert_close(model.model.vision_tower.embedder.embedder.normalization.running_mean, running_mean)
    apply_training_stage(model, "full")
    model.train()
    assert model.model.vision_tower.training
