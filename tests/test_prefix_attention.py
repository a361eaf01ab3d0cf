"""`prefix_attention`: the prompt attends bidirectionally (prefix-LM), answers causally, in training (prefix from
the labels), in `generate` (prefix = the prompt) and with an explicit `prefix_mask`."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError

from tiny_models import make_inputs, make_model


def prefix_model(**overrides):
    return make_model(seed=7, prefix_attention=True, **overrides)


def test_the_default_is_causal_and_a_prefix_mask_on_a_causal_model_is_refused():
    model = make_model(seed=7)
    assert model.config.text_config.prefix_attention is False
    inputs = make_inputs(model.config, batch_size=1)
    with pytest.raises(ValueError, match="this model attends causally"):
        model(**inputs, prefix_mask=inputs["attention_mask"])


def test_prompt_tokens_see_later_prompt_tokens_only_inside_the_prefix():
    model = prefix_model()
    inputs = make_inputs(model.config, batch_size=1, text_len=6)
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][0, -1] = (changed["input_ids"][0, -1] + 1 - 3) % 117 + 3  # another text token, last place
    with torch.no_grad():
        causal, causal_changed = model(**inputs).logits, model(**changed).logits
        prefix, prefix_changed = (model(**x, prefix_mask=x["attention_mask"]).logits for x in (inputs, changed))
    # causal: the earlier positions cannot see the last token; prefix: the image tokens (and all others) do
    torch.testing.assert_close(causal[:, :-1], causal_changed[:, :-1])
    assert (prefix[:, 1:-1] - prefix_changed[:, 1:-1]).abs().amax() > 1e-4
    # a prefix that ends before the changed token leaves everything before it untouched
    short_prefix = inputs["attention_mask"].clone()
    short_prefix[0, -3:] = 0
    with torch.no_grad():
        short, short_changed = (model(**x, prefix_mask=short_prefix).logits for x in (inputs, changed))
    torch.testing.assert_close(short[:, :-1], short_changed[:, :-1])


def test_training_takes_the_prefix_from_the_labels_so_no_label_sees_its_future():
    model = prefix_model()
    inputs = make_inputs(model.config, batch_size=2, text_len=8, left_pad=[0, 2])
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]  # the last three tokens are the answer
    with torch.no_grad():
        trained = model(**inputs, labels=labels)
        explicit_prefix = inputs["attention_mask"].clone()
        explicit_prefix[:, -3:] = 0
        explicit = model(**inputs, prefix_mask=explicit_prefix)
        torch.testing.assert_close(trained.logits, explicit.logits)
        # changing the last answer token moves no logit before it: the answer is causal
        changed = inputs["input_ids"].clone()
        changed[:, -1] = (changed[:, -1] + 1 - 3) % 117 + 3
        moved = model(**{**inputs, "input_ids": changed}, labels=labels).logits
    torch.testing.assert_close(moved[:, :-1], trained.logits[:, :-1])


def test_generate_uses_the_prompt_as_prefix_and_matches_a_full_forward_over_prompt_and_answer():
    model = prefix_model()
    inputs = make_inputs(model.config, batch_size=2, text_len=5, left_pad=[0, 3])
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        sequences = generated.sequences
        full_mask = torch.cat([inputs["attention_mask"], torch.ones(2, 4, dtype=torch.long)], dim=1)
        prefix_mask = full_mask.clone()
        prefix_mask[:, prompt_length:] = 0
        full = model(input_ids=sequences, attention_mask=full_mask, pixel_values=inputs["pixel_values"],
                     prefix_mask=prefix_mask).logits
    for step, step_logits in enumerate(generated.logits):
        torch.testing.assert_close(step_logits, full[:, prompt_length - 1 + step], atol=1e-4, rtol=1e-4)
    # each row of the batch gives what it gives alone (left padding does not join the prefix)
    single = {k: v[1:, 3:] if k != "pixel_values" else v[1:] for k, v in inputs.items()}
    with torch.no_grad():
        alone = model.generate(**single, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(alone[0, -4:], sequences[1, -4:])


def test_a_prefix_model_differs_from_its_causal_twin_only_where_the_prompt_looks_ahead():
    model = prefix_model()
    causal = make_model(seed=7)
    causal.load_state_dict(model.state_dict())
    inputs = make_inputs(model.config, batch_size=1, text_len=4)
    with torch.no_grad():
        # a one-token prompt has nothing to look ahead to
        first = {k: v[:, :1] for k, v in inputs.items() if k != "pixel_values"}
        torch.testing.assert_close(model(**first, prefix_mask=first["attention_mask"]).logits, causal(**first).logits)
        # the last prompt position sees the same tokens either way, but through states that looked ahead
        assert (model(**inputs, prefix_mask=inputs["attention_mask"]).logits[:, -1]
                - causal(**inputs).logits[:, -1]).abs().amax() > 1e-4


@pytest.mark.parametrize("bad, message", [
    (lambda m: torch.ones(1, 3, dtype=torch.long), "`prefix_mask` has shape"),
])
def test_a_prefix_mask_of_the_wrong_shape_is_refused(bad, message):
    model = prefix_model()
    inputs = make_inputs(model.config, batch_size=1)
    with pytest.raises(ValueError, match=message):
        model(**inputs, prefix_mask=bad(model))


def test_the_config_field_is_validated_and_saved(tmp_path):
    model = prefix_model()
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.config.text_config.prefix_attention is True
    with pytest.raises(StrictDataclassFieldValidationError, match="prefix_attention"):
        make_model(prefix_attention="yes")


def test_a_static_cache_builds_the_same_prefix_mask_as_the_dynamic_one():
    model = prefix_model()
    inputs = make_inputs(model.config, batch_size=2, left_pad=[0, 2])
    settings = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        dynamic = model.generate(**inputs, **settings)
        static = model.generate(**inputs, **settings, cache_implementation="static")
        causal = make_model(seed=7)
        causal.load_state_dict(model.state_dict())
        causal_static = causal.generate(**inputs, **settings, cache_implementation="static")
    assert torch.equal(dynamic.sequences, static.sequences)
    for dynamic_logits, static_logits in zip(dynamic.logits, static.logits, strict=True):
        torch.testing.assert_close(static_logits, dynamic_logits, atol=1e-5, rtol=1e-5)
    assert (static.logits[0] - causal_static.logits[0]).abs().amax() > 1e-4  # the static mask is not plain causal


def test_a_prefix_after_cached_tokens_lines_up_with_their_positions():
    """A chunk with `prefix_mask` after a cached chunk (chunked prefill, or a prompt after a cached system part):
    the same as one forward whose first part is causal and whose second part is the prefix."""
    model = prefix_model()
    inputs = make_inputs(model.config, batch_size=1, text_len=8)
    ids, length = inputs["input_ids"], inputs["input_ids"].shape[1]
    split = length - 5
    whole_prefix = torch.zeros_like(ids)
    whole_prefix[:, split:] = 1
    with torch.no_grad():
        whole = model(**inputs, prefix_mask=whole_prefix).logits
        first = model(input_ids=ids[:, :split], attention_mask=inputs["attention_mask"][:, :split],
                      pixel_values=inputs["pixel_values"], use_cache=True)
        second = model(input_ids=ids[:, split:], attention_mask=inputs["attention_mask"], cache=first.cache,
                       prefix_mask=torch.ones_like(ids[:, split:])).logits
    torch.testing.assert_close(first.logits, whole[:, :split], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, whole[:, split:], atol=1e-5, rtol=1e-5)
