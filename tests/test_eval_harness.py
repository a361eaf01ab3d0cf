"""The interface that lmms-eval's generic Transformers chat model calls, exercised on a tiny saved checkpoint, so that
it stays tested where lmms-eval itself cannot be installed (it needs torchvision, whose PyPI wheel pulls a CUDA torch
or fails to load next to the CPU one).

What lmms-eval 0.7.3 `--model huggingface` (`lmms_eval/models/chat/huggingface.py`, class `Huggingface`) does:

- load: `AutoConfig.from_pretrained(pretrained, trust_remote_code=...)`, then the model class — meant to be
  `AutoModelForImageTextToText` for a VLM, but its test `config.model_type in Auto*._model_mapping.keys()` compares a
  string with config classes, so with transformers 5 it always falls back to `AutoModel` (the base model, without
  `generate`; in-library LLaVA included) — `.from_pretrained(pretrained, trust_remote_code=...,
  torch_dtype="bfloat16", device_map=...)`, `AutoProcessor.from_pretrained(pretrained)` and
  `AutoTokenizer.from_pretrained(pretrained)`;
- per batch: each request's messages (`ChatMessages.to_hf_messages()`: `{"type": "image", "image": <PIL>}` and
  `{"type": "text", "text": ...}` items) through `processor.apply_chat_template(messages, tokenize=False,
  add_generation_prompt=True)`; the images of the whole batch flattened into one list;
  `processor(text=texts, padding=True, return_tensors="pt", images=images, videos=[], audios=[])`;
  `model.generate(**inputs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
  do_sample=False, temperature=None, top_p=None, num_beams=1, max_new_tokens=..., use_cache=True)`; each row cut at
  `len(input_ids[row])` and decoded with `processor.batch_decode(..., skip_special_tokens=True,
  clean_up_tokenization_spaces=False)`.

The tests below load with `AutoModelForImageTextToText` (what the harness means to use) and call the rest exactly as
it does.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import PIL.Image
import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, SparseMoEVLMProcessor

from tiny_models import make_processor_and_model


MAX_NEW_TOKENS = 6
RED = PIL.Image.new("RGB", (40, 30), (255, 0, 0))
BLUE = PIL.Image.new("RGB", (20, 50), (0, 0, 255))
# Requests as the harness hands them over: image before or after the question, one or two images.
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image", "image": RED}, {"type": "text", "text": "what colour is it?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "how many squares?"}, {"type": "image", "image": BLUE}]}],
    [{"role": "user", "content": [{"type": "image", "image": RED}, {"type": "text", "text": "left of"},
                                  {"type": "image", "image": BLUE}]}],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model and its processor saved together, as a training run or `push` leaves them."""
    folder = tmp_path_factory.mktemp("eval-harness") / "checkpoint"
    processor, model = make_processor_and_model()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def harness_load(folder, dtype: str = "bfloat16"):
    """The harness's loading calls, with the model class it intends for a VLM."""
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, torch_dtype=dtype, device_map="cpu").eval()
    return config, model, AutoProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def harness_generate(model, processor, tokenizer, conversations, **processor_kwargs):
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    images = [item["image"] for c in conversations for message in c for item in message["content"]
              if item["type"] == "image"]
    inputs = processor(text=texts, padding=True, return_tensors="pt", images=images, **processor_kwargs).to("cpu")
    output = model.generate(
        **inputs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False,
        temperature=None, top_p=None, num_beams=1, max_new_tokens=MAX_NEW_TOKENS, use_cache=True,
    )
    trimmed = [out_ids[len(in_ids):] for in_ids, out_ids in zip(inputs.input_ids, output, strict=True)]
    answers = processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return inputs, output, trimmed, answers


def test_checkpoint_loads_through_the_classes_the_harness_uses(checkpoint):
    config, model, processor, tokenizer = harness_load(checkpoint)
    assert config.model_type == "sparsemoe_vlm"
    assert type(model) is SparseMoEVLMForConditionalGeneration and model.dtype == torch.bfloat16
    assert isinstance(processor, SparseMoEVLMProcessor)
    assert processor.tokenizer.padding_side == "left"  # the harness pads through the processor
    text_config = model.config.text_config
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (text_config.eos_token_id, text_config.pad_token_id)
    assert processor.chat_template is not None


def test_batched_chat_prompts_with_images_generate_and_decode(checkpoint):
    _, model, processor, tokenizer = harness_load(checkpoint)  # bfloat16, as the harness loads
    inputs, output, trimmed, answers = harness_generate(model, processor, tokenizer, CONVERSATIONS)

    assert set(inputs) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values"}
    assert inputs["pixel_values"].shape[0] == 4  # every image of the batch, in order
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(-1)
    assert image_tokens.tolist() == [model.config.image_seq_length * n for n in (1, 1, 2)]
    assert bool((inputs["attention_mask"][:, -1] == 1).all())  # left padding: every prompt ends at the last column
    assert int(inputs["attention_mask"].sum(-1).min()) < inputs["input_ids"].shape[1]

    prompt_length = inputs["input_ids"].shape[1]
    assert output.shape == (3, prompt_length + MAX_NEW_TOKENS)  # no eos in this random model's greedy answers
    assert torch.equal(output[:, :prompt_length], inputs["input_ids"])
    assert all(len(ids) == MAX_NEW_TOKENS for ids in trimmed)
    assert model.config.image_token_id not in output[:, prompt_length:]  # the image token is never generated
    assert answers == [tokenizer.decode(ids, skip_special_tokens=True) for ids in trimmed]
    assert all("<image>" not in answer for answer in answers)


def test_batched_answers_equal_one_request_at_a_time(checkpoint):
    _, model, processor, tokenizer = harness_load(checkpoint, dtype="float32")
    _, _, batched, _ = harness_generate(model, processor, tokenizer, CONVERSATIONS)
    for conversation, row in zip(CONVERSATIONS, batched, strict=True):
        _, _, single, _ = harness_generate(model, processor, tokenizer, [conversation])
        assert torch.equal(single[0], row)


def test_harness_processor_call_with_empty_video_and_audio_lists(checkpoint):
    _, model, processor, tokenizer = harness_load(checkpoint, dtype="float32")
    *_, answers = harness_generate(model, processor, tokenizer, CONVERSATIONS[:1], videos=[], audios=[])
    *_, expected = harness_generate(model, processor, tokenizer, CONVERSATIONS[:1])
    assert answers == expected


def test_harness_text_only_request(checkpoint):
    _, model, processor, tokenizer = harness_load(checkpoint, dtype="float32")
    conversation = [[{"role": "user", "content": [{"type": "text", "text": "how many squares?"}]}]]
    texts = [processor.apply_chat_template(conversation[0], tokenize=False, add_generation_prompt=True)]
    expected = model.generate(**processor(text=texts, return_tensors="pt"), do_sample=False,
                              max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
    _, output, _, _ = harness_generate(model, processor, tokenizer, conversation)
    assert torch.equal(output, expected)


LMMS_EVAL_RUN = """
import json, sys
import PIL.Image
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model

red = PIL.Image.new("RGB", (40, 30), (255, 0, 0))
docs = [
    [{"role": "user", "content": [{"type": "image", "url": red}, {"type": "text", "text": "what colour is it?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "how many squares?"}]}],
]
lm = get_model("huggingface")(pretrained=sys.argv[1], device="cpu", device_map="cpu", trust_remote_code=True)
lm.task_dict = {"toy": {"test": docs}}
requests = [
    Instance("generate_until", (f"doc {i}", lambda doc: doc, {"max_new_tokens": 4}, i, "toy", "test"), idx=0,
             metadata={"task": "toy", "doc_id": i, "repeats": 1})
    for i in range(len(docs))
]
print("ANSWERS", json.dumps([result.text for result in lm.generate_until(requests)]))
"""


@pytest.mark.slow
def test_lmms_eval_huggingface_class_runs_on_the_checkpoint(checkpoint, tmp_path):
    pytest.importorskip("lmms_eval")
    # lmms-eval picks `AutoModel` for every checkpoint (see the module docstring): evaluate a copy whose auto_map
    # sends AutoModel to the generation class, as the README says.
    copy = tmp_path / "for-lmms-eval"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "modeling_sparsemoe_vlm.SparseMoEVLMForConditionalGeneration"
    (copy / "config.json").write_text(json.dumps(config, indent=2))

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LMMS_EVAL_RUN), str(copy)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    answers = json.loads(result.stdout.split("ANSWERS", 1)[1])
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
