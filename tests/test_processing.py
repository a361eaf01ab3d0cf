import PIL.Image
import pytest
import torch
from transformers import AutoProcessor, BertTokenizer
from transformers.processing_utils import MultiModalData

from hf_sparsemoe_vlm import SparseMoEVLMProcessor, build_processor, build_tokenizer

from tiny_models import CORPUS, make_config, make_processor_and_model


RED = PIL.Image.new("RGB", (40, 30), (255, 0, 0))
BLUE = PIL.Image.new("RGB", (20, 20), (0, 0, 255))


@pytest.fixture(scope="module")
def processor():
    return build_processor(make_config(vocab_size=320), CORPUS)


def test_built_tokenizer_has_the_special_tokens_and_round_trips_any_text():
    tokenizer = build_tokenizer(CORPUS, vocab_size=320)
    for token in ("<pad>", "<s>", "<|end|>", "<image>", "<|user|>", "<|assistant|>", "<|system|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<|end|>" and tokenizer.bos_token == "<s>"
    text = "Zebra ünïcödé 123 — never seen!"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) <= 320
    with pytest.raises(ValueError, match="`vocab_size`"):
        build_tokenizer(CORPUS, vocab_size=100)


def test_build_processor_syncs_the_config_ids():
    config = make_config(vocab_size=320)
    processor = build_processor(config, CORPUS)
    assert config.image_token_id == processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert config.text_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|end|>")
    assert config.text_config.pad_token_id == processor.tokenizer.pad_token_id
    assert processor.image_seq_length == config.image_seq_length
    assert processor.image_processor.size == {"height": 32, "width": 32}


def test_placeholders_expand_to_image_tokens_with_left_padding(processor):
    out = processor(images=[[RED, BLUE], [BLUE]], text=["<image> and <image> differ?", "short <image>"],
                    padding=True, return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values"}
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    image_tokens = out["input_ids"] == processor.image_token_id
    assert image_tokens.sum(-1).tolist() == [32, 16]
    assert torch.equal(out["mm_token_type_ids"].bool(), image_tokens)
    assert out["attention_mask"][1, 0] == 0 and out["attention_mask"][1, -1] == 1  # left padding
    assert (out["input_ids"][1][out["attention_mask"][1] == 0] == processor.tokenizer.pad_token_id).all()


def test_text_only_prompts(processor):
    out = processor(text=["hello there", "a red circle"], padding=True, return_tensors="pt")
    assert "pixel_values" not in out and out["mm_token_type_ids"].sum() == 0


def test_chat_template_with_images_and_assistant_mask(processor):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "image": RED}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "Shape?"}]},
        {"role": "assistant", "content": "circle"},
    ]
    rendered = processor.apply_chat_template(messages)
    assert rendered == ("<s><|system|>\nAnswer briefly.<|end|>\n<|user|>\n<image>What colour?<|end|>\n"
                        "<|assistant|>\nred<|end|>\n<|user|>\nShape?<|end|>\n<|assistant|>\ncircle<|end|>\n")
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                        return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    assert ids[0] == processor.tokenizer.bos_token_id and (ids == processor.tokenizer.bos_token_id).sum() == 1
    assert (ids == processor.image_token_id).sum() == 16 and out["pixel_values"].shape == (1, 3, 32, 32)
    answer_tokens = processor.tokenizer.convert_ids_to_tokens(ids[mask].tolist())
    assert processor.tokenizer.convert_tokens_to_string(answer_tokens) == "red<|end|>circle<|end|>"
    assert not mask[ids == processor.image_token_id].any()


def test_generation_prompt(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True).endswith("<|end|>\n<|assistant|>\n")
    with pytest.raises(Exception, match="Unknown chat role robot"):
        processor.apply_chat_template([{"role": "robot", "content": "hi"}])


def test_decoding_skips_image_and_special_tokens(processor):
    out = processor(images=RED, text="<image> a red circle", return_tensors="pt")
    assert processor.batch_decode(out["input_ids"], skip_special_tokens=True) == [" a red circle"]
    assert processor.post_process_image_text_to_text(out["input_ids"]) == [" a red circle"]


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is SparseMoEVLMProcessor
    assert loaded.image_seq_length == processor.image_seq_length
    assert loaded.max_position_embeddings == processor.max_position_embeddings
    assert loaded.chat_template == processor.chat_template
    kwargs = {"images": [RED, BLUE], "text": ["<image> one", "two <image>"], "padding": True, "return_tensors": "pt"}
    expected, actual = processor(**kwargs), loaded(**kwargs)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_any_transformers_tokenizer_works(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square", "?", "what"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    assert "<image>" not in tokenizer.get_vocab()
    config = make_config()
    config.image_token_id = len(vocab)  # where the processor will add <image>
    processor = SparseMoEVLMProcessor.from_model_config(config, tokenizer)
    assert processor.image_token_id == len(vocab) == tokenizer.convert_tokens_to_ids("<image>")
    out = processor(images=RED, text="what <image> red circle ?", return_tensors="pt")
    assert (out["input_ids"] == processor.image_token_id).sum() == 16
    assert out["mm_token_type_ids"].sum() == 16
    assert processor.batch_decode(out["input_ids"], skip_special_tokens=True) == ["what red circle?"]


def test_mismatched_tokenizer_and_config_are_rejected(processor):
    config = make_config(vocab_size=320)  # image_token_id 127 is not the tokenizer's
    with pytest.raises(ValueError, match="image_token_id"):
        SparseMoEVLMProcessor.from_model_config(config, processor.tokenizer)


def test_placeholder_and_image_counts_must_match(processor):
    with pytest.raises(ValueError, match="Found total 2 <image> tokens and 1 images"):
        processor(images=[RED], text=["<image> <image> two?"])
    with pytest.raises(ValueError, match="Found total 1 <image> tokens and 2 images"):
        processor(images=[RED, BLUE], text=["<image> one?"])
    with pytest.raises(ValueError, match="Found 1 <image> tokens in the text but no images"):
        processor(text=["<image> where is it?"])


def test_prompt_longer_than_the_context_is_rejected():
    config = make_config(vocab_size=320, max_position_embeddings=40)
    processor = build_processor(config, CORPUS)
    processor(images=[RED, BLUE], text=["<image><image>"])  # 1 + 32 tokens fit
    with pytest.raises(ValueError, match=r"Prompt of 49 tokens .* context of 40 positions"):
        processor(images=[RED, BLUE, RED], text=["<image><image><image>"])


@pytest.mark.parametrize("text", [42, ["ok", 3], {"text": "hi"}])
def test_wrong_text_type_raises_type_error(processor, text):
    with pytest.raises(TypeError, match="`text` must be a string or a list of strings"):
        processor(text=text)


@pytest.mark.parametrize("images", [3.5, {"image": RED}, [RED, 7]])
def test_wrong_images_type_raises_type_error(processor, images):
    with pytest.raises(TypeError, match="PIL"):
        processor(images=images, text="<image>" if not isinstance(images, list) else ["<image>", "<image>"])


def test_processor_output_drives_the_model():
    processor, model = make_processor_and_model()
    out = processor(images=[[RED], [BLUE, RED]], text=["<image> colour?", "<image> vs <image>"], padding=True,
                    return_tensors="pt")
    logits = model(**out).logits
    assert logits.shape[:2] == out["input_ids"].shape
    generated = model.generate(**out, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (2, out["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("image_seq_length", [None, 9])
def test_num_multimodal_tokens_match_what_the_processor_inserts(processor, image_seq_length):
    if image_seq_length is not None:  # a processor whose count differs from the config's 16
        processor = SparseMoEVLMProcessor(processor.image_processor, processor.tokenizer,
                                          image_seq_length=image_seq_length)
    sizes = [(30, 40), (32, 32), (1, 1), (2, 300), (500, 3), (48, 64)]  # (height, width)
    data = processor._get_num_multimodal_tokens(image_sizes=sizes)
    assert type(data) is MultiModalData
    assert data.num_image_patches == [1] * len(sizes)
    assert "num_video_tokens" not in data and "num_audio_tokens" not in data
    images = [PIL.Image.new("RGB", (width, height), (255, 0, 0)) for height, width in sizes]
    inserted = [int((processor(text="what is this? <image>", images=image, return_tensors="pt")["input_ids"]
                     == processor.image_token_id).sum()) for image in images]
    assert data.num_image_tokens == inserted == [image_seq_length or 16] * len(sizes)
    batch = processor(text="<image>" * len(images), images=[images], return_tensors="pt")
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == sum(data["num_image_tokens"])
    assert processor._get_num_multimodal_tokens() == MultiModalData()


def test_empty_modality_lists_mean_none_and_other_modalities_are_refused(processor):
    """Evaluation harnesses (lmms-eval) pass `videos=[]`, `audios=[]` and, for text-only requests, `images=[]`."""
    texts = ["<image> what colour?", "how many squares?"]
    expected = processor(text=texts[1:], return_tensors="pt")
    for images in ([], [[]]):
        got = processor(text=texts[1:], images=images, videos=[], audios=[], return_tensors="pt")
        assert "pixel_values" not in got and torch.equal(got["input_ids"], expected["input_ids"])
    with_image = processor(text=texts[:1], images=[RED], videos=[], audio=[], return_tensors="pt")
    assert with_image["pixel_values"].shape[0] == 1
    with pytest.raises(ValueError, match="takes images and text only; got `videos`"):
        processor(text=texts[:1], images=[RED], videos=[[RED, BLUE]])
