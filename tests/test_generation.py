import pytest
import torch

from tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, make_inputs, make_model


GEN = {"max_new_tokens": 8, "pad_token_id": PAD_TOKEN_ID, "eos_token_id": None}


@pytest.mark.parametrize("router_type", ["topk", "top_p", "relu"])
def test_greedy_with_cache_equals_greedy_without_cache(router_type):
    model = make_model(router_type=router_type, num_shared_experts=1)
    inputs = make_inputs(model.config, left_pad=[2, 0])
    cached = model.generate(**inputs, do_sample=False, use_cache=True, **GEN)
    uncached = model.generate(**inputs, do_sample=False, use_cache=False, **GEN)
    assert cached.shape == (2, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generation_matches_one_prompt_at_a_time():
    model = make_model()
    inputs = make_inputs(model.config, left_pad=[3, 0], seed=5)
    batched = model.generate(**inputs, do_sample=False, **GEN)
    prompt_len = inputs["input_ids"].shape[1]
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        single = model.generate(input_ids=inputs["input_ids"][row:row + 1, real],
                                pixel_values=inputs["pixel_values"][row:row + 1], do_sample=False, **GEN)
        assert torch.equal(batched[row, prompt_len:], single[0, real.sum():])


def test_text_only_prompt_generates():
    model = make_model()
    inputs = make_inputs(model.config, with_image=False)
    out = model.generate(**inputs, do_sample=False, **GEN)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    model = make_model()
    inputs = make_inputs(model.config)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(**inputs, do_sample=True, temperature=1.5, top_k=50, **GEN))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(7)
    other = model.generate(**inputs, do_sample=True, temperature=1.5, top_k=50, **GEN)
    assert not torch.equal(other, runs[0])


def test_beam_search_returns_the_best_beams():
    model = make_model()
    inputs = make_inputs(model.config, left_pad=[1, 0])
    out = model.generate(**inputs, num_beams=3, num_return_sequences=2, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, **GEN)
    assert out.sequences.shape == (4, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(out.sequences[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])
    assert out.sequences_scores.shape == (4,)
    assert out.sequences_scores[0] >= out.sequences_scores[1]
    # One beam equals greedy search.
    greedy = model.generate(**inputs, do_sample=False, **GEN)
    single_beam = model.generate(**inputs, num_beams=1, do_sample=False, **GEN)
    assert torch.equal(greedy, single_beam)


def test_image_token_is_never_generated():
    model = make_model()
    assert model.generation_config.suppress_tokens == [IMAGE_TOKEN_ID]

    def favour_image_token(module, args, logits):
        return logits + 100.0 * (torch.arange(logits.shape[-1]) == IMAGE_TOKEN_ID)

    model.lm_head.register_forward_hook(favour_image_token)
    inputs = make_inputs(model.config)
    logits = model(**inputs).logits[:, -1]
    assert (logits.argmax(-1) == IMAGE_TOKEN_ID).all()
    out = model.generate(**inputs, do_sample=False, **GEN)
    assert not (out[:, inputs["input_ids"].shape[1]:] == IMAGE_TOKEN_ID).any()


def test_generation_stops_at_eos():
    model = make_model()
    inputs = make_inputs(model.config, batch_size=1)
    first = model.generate(**inputs, do_sample=False, **GEN)[0, inputs["input_ids"].shape[1]]
    out = model.generate(**inputs, do_sample=False, max_new_tokens=8, eos_token_id=int(first),
                         pad_token_id=PAD_TOKEN_ID)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 1
