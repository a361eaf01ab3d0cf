import os
import subprocess
import sys
import textwrap
from threading import Thread

import PIL.Image
import pytest
import torch
from transformers import TextIteratorStreamer, pipeline

from tiny_models import BLOCK_PACKAGE, make_processor_and_model


RED = PIL.Image.new("RGB", (40, 30), (255, 0, 0))
BLUE = PIL.Image.new("RGB", (20, 20), (0, 0, 255))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    processor, model = make_processor_and_model(router_type="top_p", num_shared_experts=1)
    folder = tmp_path_factory.mktemp("tiny-sparsemoe-vlm")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, processor, model


def _new_text(processor, model, inputs, max_new_tokens):
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chat_mode(saved, tmp_path):
    folder, processor, model = saved
    RED.save(tmp_path / "red.png")
    messages = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "red.png")},
                                             {"type": "text", "text": "What colour is it?"}]}]
    pipe = pipeline("image-text-to-text", model=str(folder))
    result = pipe(text=messages, max_new_tokens=6)
    reply = result[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert reply["content"] == _new_text(processor, model, inputs, 6)[0]


def test_plain_text_and_images_mode_batched(saved):
    folder, processor, model = saved
    pipe = pipeline("image-text-to-text", model=str(folder))
    texts = ["<image> what colour?", "<image> how many squares are there?"]
    results = pipe(images=[RED, BLUE], text=texts, max_new_tokens=5, batch_size=2, return_full_text=False)
    inputs = processor(images=[RED, BLUE], text=texts, padding=True, return_tensors="pt")
    assert [r["input_text"] for r in results] == texts
    assert [r["generated_text"] for r in results] == _new_text(processor, model, inputs, 5)


def test_text_only_mode(saved):
    folder, processor, model = saved
    pipe = pipeline("image-text-to-text", model=str(folder))
    result = pipe(text="a red circle", max_new_tokens=3, return_full_text=False)
    inputs = processor(text="a red circle", return_tensors="pt")
    assert result[0]["generated_text"] == _new_text(processor, model, inputs, 3)[0]


def test_streaming_with_text_iterator_streamer(saved):
    _, processor, model = saved
    inputs = processor(images=RED, text="<image> describe it", return_tensors="pt")
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=model.generate, kwargs={**inputs, "streamer": streamer, "max_new_tokens": 8,
                                                    "min_new_tokens": 8, "do_sample": False})
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) >= 1
    assert "".join(pieces) == _new_text(processor, model, inputs, 8)[0]


@pytest.mark.slow
def test_pipeline_with_remote_code_where_the_package_is_not_importable(saved, tmp_path):
    folder, processor, model = saved
    inputs = processor(images=RED, text="<image> colour?", return_tensors="pt")
    expected = _new_text(processor, model, inputs, 4)[0]
    RED.save(tmp_path / "red.png")
    script = BLOCK_PACKAGE + textwrap.dedent(f"""
        from transformers import pipeline
        pipe = pipeline("image-text-to-text", model={str(folder)!r}, trust_remote_code=True)
        for obj in (pipe.model, pipe.processor, pipe.processor.image_processor):
            assert type(obj).__module__.startswith("transformers_modules"), type(obj).__module__
        out = pipe(images={str(tmp_path / "red.png")!r}, text="<image> colour?", max_new_tokens=4,
                   return_full_text=False)
        print("GENERATED=" + repr(out[0]["generated_text"]))
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"GENERATED={expected!r}" in result.stdout
    assert torch.__version__  # same interpreter and torch build in the child


def test_chat_mode_batched(saved):
    folder, processor, model = saved
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": RED}, {"type": "text", "text": "Colour?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": BLUE}, {"type": "text", "text": "How many?"}]}],
    ]
    pipe = pipeline("image-text-to-text", model=str(folder))
    results = pipe(text=chats, max_new_tokens=4, batch_size=2)
    replies = [result[0]["generated_text"][-1]["content"] for result in results]
    expected = []
    for chat in chats:
        inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        expected.append(_new_text(processor, model, inputs, 4)[0])
    assert replies == expected
