"""Image-text retrieval scoring (`hf_sparsemoe_vlm.app.retrieval`) and its metrics."""

import copy
import json

import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from hf_sparsemoe_vlm.app.retrieval import retrieval_metrics, score_image_texts
from hf_sparsemoe_vlm.app.training import VLMDataCollator

from tiny_models import load_conversion_script, make_processor_and_model


PROMPT = "Describe the image."
IMAGES = [PIL.Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
TEXTS = ["a red circle", "a blue square on the left of a red circle", "two green triangles", "a square"]


@pytest.fixture(scope="module")
def processor_and_model():
    return make_processor_and_model(seed=4)


def training_score(model, processor, image, text, with_image: bool = True) -> float:
    """The mean log-probability training assigns to `text` as the answer (the collator's labels), from a full
    forward pass of the whole conversation."""
    collator = VLMDataCollator(processor, prompt_order="image_first")
    if with_image:
        batch = collator([{"image": image, "question": PROMPT, "answer": text}])
    else:
        messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]},
                    {"role": "assistant", "content": [{"type": "text", "text": text}]}]
        batch = processor.apply_chat_template([messages], tokenize=True, return_dict=True, return_tensors="pt",
                                              return_assistant_tokens_mask=True)
        batch["labels"] = batch["input_ids"].masked_fill(~batch.pop("assistant_masks").bool(), -100)
    labels = batch.pop("labels")
    with torch.no_grad():
        # with the labels, as training runs it (a prefix-attention model takes its prompt from them)
        logits = model(**{k: v for k, v in batch.items() if k != "position_ids"}, labels=labels).logits
    return -F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100).item()


@pytest.mark.parametrize("prefix_attention", [False, True])
def test_scores_are_the_training_likelihood_and_reuse_changes_nothing(prefix_attention, processor_and_model):
    processor, model = processor_and_model
    if prefix_attention:  # the same weights, the prompt attended bidirectionally
        model = copy.deepcopy(model)
        model.config.text_config.prefix_attention = True
    scores = score_image_texts(model, processor, IMAGES, TEXTS, prompt=PROMPT, batch_size=3)
    assert scores.shape == (3, 4)
    for i, image in enumerate(IMAGES):
        for t, text in enumerate(TEXTS):
            assert scores[i, t].item() == pytest.approx(training_score(model, processor, image, text), abs=1e-5)
    whole_pairs = score_image_texts(model, processor, IMAGES, TEXTS, prompt=PROMPT, batch_size=2,
                                    reuse_image_computation=False)
    torch.testing.assert_close(whole_pairs, scores, atol=1e-5, rtol=0)
    if prefix_attention:  # and the prefix did change what the causal model scores
        causal = score_image_texts(processor_and_model[1], processor, IMAGES, TEXTS, prompt=PROMPT, batch_size=3)
        assert (causal - scores).abs().max() > 1e-4


def test_scores_follow_the_checkpoints_own_chat_template(processor_and_model):
    """A converted MoE-LLaVA checkpoint's template (`... ASSISTANT: answer</s>`, generation prompt `ASSISTANT:`
    without the space): the answer tokens are what its template marks, whatever its generation prompt looks like."""
    converter = load_conversion_script("convert_moe_llava")
    processor, model = processor_and_model
    processor = copy.deepcopy(processor)
    processor.chat_template = converter.moe_llava_chat_template(processor.image_token)
    scores = score_image_texts(model, processor, IMAGES[:1], TEXTS[:2], prompt=PROMPT)
    for t, text in enumerate(TEXTS[:2]):
        assert scores[0, t].item() == pytest.approx(training_score(model, processor, IMAGES[0], text), abs=1e-5)


def test_alpha_divides_out_the_text_prior(processor_and_model):
    processor, model = processor_and_model
    plain = score_image_texts(model, processor, IMAGES, TEXTS, prompt=PROMPT)
    half = score_image_texts(model, processor, IMAGES, TEXTS, prompt=PROMPT, alpha=0.5)
    full = score_image_texts(model, processor, IMAGES, TEXTS, prompt=PROMPT, alpha=1.0)
    prior = torch.tensor([training_score(model, processor, None, text, with_image=False) for text in TEXTS])
    torch.testing.assert_close(full, plain - prior[None, :], atol=1e-5, rtol=0)
    torch.testing.assert_close(half, plain - 0.5 * prior[None, :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("images, texts, kwargs, message", [
    ([], TEXTS, {}, "at least one image and one candidate text; got 0 image"),
    (IMAGES, [], {}, "got 3 image\\(s\\) and 0 text"),
    (IMAGES, ["a red circle", "  "], {}, "Candidate text 1 is '  '"),
    (IMAGES, TEXTS, {"alpha": 2.0}, "alpha .* must be in \\[0, 1\\]"),
    (IMAGES, ["a red circle", "circle " * 300], {}, "Candidate text 1 .* needs \\d+ positions .* context is 256"),
])
def test_bad_candidates_are_refused_by_name(images, texts, kwargs, message, processor_and_model):
    processor, model = processor_and_model
    with pytest.raises(ValueError, match=message):
        score_image_texts(model, processor, images, texts, **kwargs)


def test_metrics_count_identical_captions_as_right_and_ties_against_the_query():
    captions = ["red circle", "blue square", "red circle"]  # images 0 and 2 share a caption
    texts = ["red circle", "blue square", "green triangle"]
    scores = torch.tensor([[0.9, 0.1, 0.0],    # image 0: its caption first            -> rank 1
                           [0.5, 0.5, 0.2],    # image 1: tied with a wrong text         -> rank 2
                           [0.1, 0.3, 0.2]])   # image 2: below two wrong texts          -> rank 3
    metrics = retrieval_metrics(scores, captions, texts, ks=(1, 2))
    assert metrics["image_to_text_recall@1"] == pytest.approx(1 / 3)
    assert metrics["image_to_text_recall@2"] == pytest.approx(2 / 3)
    assert metrics["image_to_text_mean_rank"] == pytest.approx(2.0)
    # text -> image: "red circle" has two right images (its best is image 0 at 0.9: rank 1); "blue square" ranks
    # image 1 (0.5) below image 2? no: column 1 is 0.1, 0.5, 0.3 -> rank 1; "green triangle" is nobody's caption.
    assert metrics["text_to_image_queries"] == 2
    assert metrics["text_to_image_recall@1"] == 1.0 and metrics["text_to_image_mean_rank"] == 1.0
    # chance: image->text one right of three (1/3 at k=1); text->image "red circle" has 2 of 3 right (2/3), "blue
    # square" 1 of 3 (1/3)
    assert metrics["image_to_text_recall@1_chance"] == pytest.approx(1 / 3)
    assert metrics["text_to_image_recall@1_chance"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert metrics["image_to_text_mean_rank_chance"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="Images \\[1\\] have no candidate text equal to their caption"):
        retrieval_metrics(scores, captions, ["red circle", "x", "y"])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, processor_and_model):
    processor, model = processor_and_model
    folder = tmp_path_factory.mktemp("retrieval") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_evaluate_task_retrieval_writes_the_figures_and_the_card(saved_model):
    from hf_sparsemoe_vlm.app.cli import main

    assert main(["evaluate", str(saved_model), "--task", "retrieval", "--num_test_examples", "12",
                 "--retrieval_alpha", "0.5", "--update_card", "true", "--model_id", "org/tiny"]) == 0
    metrics = json.loads((saved_model / "eval_test_retrieval_results.json").read_text())
    assert metrics["test_retrieval_images"] == 12 and metrics["test_image_to_text_queries"] == 12
    assert metrics["test_retrieval_alpha"] == 0.5 and metrics["test_retrieval_prompt"] == "Describe the image."
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert 0.0 <= metrics[f"test_{direction}_recall@{k}"] <= 1.0
            assert 0.0 < metrics[f"test_{direction}_recall@{k}_chance"] <= 1.0
        assert metrics[f"test_{direction}_mean_rank"] >= 1.0
    results = json.loads((saved_model / "all_results.json").read_text())
    assert results["test_image_to_text_recall@1"] == metrics["test_image_to_text_recall@1"]
    card = (saved_model / "README.md").read_text()
    assert "Image-to-text retrieval recall@1" in card and "--task retrieval" in card


def test_evaluate_task_retrieval_names_a_missing_caption_column(saved_model, tmp_path):
    from hf_sparsemoe_vlm.app.cli import main

    PIL.Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
    rows = "".join(json.dumps({"image": "red.png", "text": f"a red square {i}"}) + "\n" for i in range(4))
    (tmp_path / "rows.jsonl").write_text(rows)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['caption'\].*--image_column / --caption_column"):
        main(["evaluate", str(saved_model), "--task", "retrieval", "--dataset", str(tmp_path / "rows.jsonl")])
    # named, it works: an image and a caption per row are all retrieval needs (no question / answer columns)
    assert main(["evaluate", str(saved_model), "--task", "retrieval", "--dataset", str(tmp_path / "rows.jsonl"),
                 "--caption_column", "text", "--split", "train", "--metrics_file", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["train_retrieval_texts"] >= 1
    with pytest.raises(SystemExit, match="--task 'ranking': expected one of"):
        main(["evaluate", str(saved_model), "--task", "ranking"])
