"""Model cards: metadata validated with huggingface_hub, numbers checked against the model."""

import json

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from hf_sparsemoe_vlm.app.model_card import build_model_card, parameter_counts, read_run_args, write_model_card

from tiny_models import fake_run, make_model, to_old_layout


PER_EXPERT = 3 * 32 * 32  # gate, up and down projections of one expert (hidden 32, expert width 32)


def test_parameter_counts_top_k():
    model = make_model()  # 2 sparse layers, 4 text + 2 image experts, top-2
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["decoder"] == sum(p.numel() for p in model.model.language_model.parameters()) + \
        model.lm_head.weight.numel()
    assert counts["routed_experts"] == 2 * (4 + 2) * PER_EXPERT
    non_routed = counts["decoder"] - counts["routed_experts"]
    assert counts["active_per_text_token"] == non_routed + 2 * 2 * PER_EXPERT
    assert counts["active_per_image_token"] == non_routed + 2 * 2 * PER_EXPERT


@pytest.mark.parametrize("router_type,bound", [("top_p", (4, 2)), ("relu", (4, 2))])
def test_parameter_counts_dynamic_routers_bound_or_measured(router_type, bound):
    model = make_model(router_type=router_type)
    counts = parameter_counts(model)
    non_routed = counts["decoder"] - counts["routed_experts"]
    assert counts["active_per_text_token"] == non_routed + 2 * bound[0] * PER_EXPERT
    assert counts["active_per_image_token"] == non_routed + 2 * bound[1] * PER_EXPERT
    measured = parameter_counts(model, {"text": 1.5, "image": 1.25})
    assert measured["active_per_text_token"] == non_routed + 2 * 1.5 * PER_EXPERT
    assert measured["active_per_image_token"] == non_routed + 2 * 1.25 * PER_EXPERT


def test_one_expert_pool_serves_image_tokens():
    counts = parameter_counts(make_model(num_image_experts=0))
    assert counts["active_per_image_token"] == counts["active_per_text_token"]


def test_card_metadata_and_numbers_match_the_model_and_run(tmp_path):
    model = make_model()
    path = write_model_card(model, fake_run(tmp_path / "run"), model_id="org/tiny-shapes")
    assert path == tmp_path / "run" / "README.md"
    card = ModelCard.load(path)  # huggingface_hub parses the YAML and the model-index
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert data.license == "apache-2.0"
    assert {"moe", "vision-language"} <= set(data.tags)
    assert data.model_name == "org/tiny-shapes"
    results = {(r.task_type, r.metric_name): r for r in data.eval_results}
    assert results[("visual-question-answering", "Exact match (short answers)")].metric_value == 0.614
    assert results[("image-to-text", "Caption BLEU")].metric_value == 12.5
    assert results[("image-to-text", "Caption ROUGE-L")].metric_value == 0.71
    assert all(r.dataset_split == "test" and r.dataset_type == "hf_sparsemoe_vlm/synthetic_shapes"
               for r in data.eval_results)
    # Only test-split metrics go to the model-index; the round trip through the Hub's format is lossless.
    assert len(data.eval_results) == 3
    name, index = "org/tiny-shapes", eval_results_to_model_index("org/tiny-shapes", data.eval_results)
    assert model_index_to_eval_results(index) == (name, data.eval_results)

    text = card.text
    counts = parameter_counts(model)
    assert f"| total | {counts['total']:,} |" in text
    assert f"| decoder, active per text token | {counts['active_per_text_token']:,} |" in text
    assert "| experts per sparse layer | 4 text + 2 image routed, 0 shared; expert width 32 |" in text
    assert "| router | top-k softmax, k = 2 |" in text
    assert f"{model.config.image_seq_length} image tokens" in text
    assert "| steps | 3000 |" in text and "epochs" not in text  # max_steps wins over epochs, as in Trainer
    assert "| learning rate | 0.002 |" in text and "| wall time | 9.1 min |" in text
    assert "| exact_match | test | 0.6140 |" in text and "| loss | validation | 0.3700 |" in text
    assert "| image | 1.25 | 0.9 | 0.6 | 1.0 |" in text and "| text | 1.5 | 0.97 | 0.31 | 0.0 |" in text
    # Every row of the parameter table is the model's own count.
    for row, key in (("vision tower", "vision_tower"), ("projector", "projector"), ("decoder", "decoder"),
                     ("routed experts (all groups)", "routed_experts"),
                     ("decoder, active per image token", "active_per_image_token")):
        assert f"| {row} | {counts[key]:,} |" in text, row
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == counts["vision_tower"] + counts["projector"] + counts["decoder"]
    config, text_config = model.config, model.config.text_config
    assert (config.vision_config.model_type, config.vision_config.hidden_size,
            config.vision_config.num_hidden_layers) == ("siglip_vision_model", 32, 1)
    assert (f"| vision tower | siglip_vision_model (width 32, 1 layer), {config.image_size} px images -> "
            f"{config.image_seq_length} image tokens |") in text
    assert (f"| decoder | {text_config.num_hidden_layers} layers, hidden {text_config.hidden_size}, "
            f"{text_config.num_attention_heads} heads ({text_config.num_key_value_heads} KV), vocabulary "
            f"{text_config.vocab_size} |") in text
    assert f"| sparse layers | {', '.join(map(str, text_config.sparse_layer_indices))} |" in text
    assert data.datasets is None  # a synthetic run has no Hub dataset to name
    assert "![Share of tokens per expert, layer and modality](expert_load.png)" in text
    assert 'from_pretrained("org/tiny-shapes", trust_remote_code=True)' in text
    assert "\n\n\n" not in text


def test_a_run_folder_of_the_old_layout_gives_the_same_card(tmp_path):
    model = make_model(router_type="top_p")  # a dynamic router: the active counts come from the log history
    new = fake_run(tmp_path / "new")
    old = to_old_layout(fake_run(tmp_path / "old"))
    assert {path.name for path in old.iterdir()} == {"metrics.json", "run_args.json", "log_history.json",
                                                     "expert_load.png"}
    card = str(build_model_card(model, "org/m", new))
    assert card == str(build_model_card(model, "org/m", old))
    assert read_run_args(new) == read_run_args(old)  # what `evaluate` takes from a run: data settings and seed
    # Every part the files feed is there: results, settings (from training_args.json), routing (trainer_state.json).
    for row in ("| exact_match | test | 0.6140 |", "| loss | validation | 0.3700 |", "| steps | 3000 |",
                "| processes | 1 |", "| precision | fp32 |", "| weight decay | 0 |", "| wall time | 9.1 min |",
                "| text | 1.5 | 0.97 | 0.31 | 0.0 |", "(measured average)"):
        assert row in card, row
    # A folder with both prefers what Transformers wrote.
    (new / "metrics.json").write_text(json.dumps({"test_exact_match": 0.1}))
    (new / "log_history.json").write_text(json.dumps([]))
    assert str(build_model_card(model, "org/m", new)) == card


def test_card_of_a_converted_model_names_its_base_and_measured_dynamic_routing(tmp_path):
    model = make_model(router_type="relu")
    card = build_model_card(model, "org/upcycled", fake_run(tmp_path / "run"), base_model="llava-hf/llava-1.5-7b-hf",
                            conversion="sparse upcycling, every other layer")
    assert card.data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert "[`llava-hf/llava-1.5-7b-hf`](https://huggingface.co/llava-hf/llava-1.5-7b-hf) (sparse upcycling" in card.text
    measured = parameter_counts(model, {"text": 1.5, "image": 1.25})
    assert f"| decoder, active per text token (measured average) | {round(measured['active_per_text_token']):,} |" \
        in card.text
    assert "ReLU with L1 (Laplace prior" in card.text


def test_card_without_a_run_has_no_results_and_a_dense_model_says_so():
    card = build_model_card(make_model(mlp_layer_types=["dense", "dense"]), "org/dense")
    assert card.data.eval_results is None and card.data.model_name is None
    assert "## Evaluation" not in card.text and "## Training" not in card.text
    assert "| sparse layers | none (dense decoder) |" in card.text
    assert "dense (this checkpoint has no sparse layer)" in card.text


def test_card_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model_card(make_model(), run_dir=tmp_path / "missing")
    run = fake_run(tmp_path / "run")
    (run / "all_results.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"all_results.json is not valid JSON"):
        build_model_card(make_model(), run_dir=run)


def test_card_of_a_run_on_local_data_names_its_hub_dataset_and_never_the_local_path(tmp_path):
    run = fake_run(tmp_path / "run")
    run_args = json.loads((run / "run_args.json").read_text())
    private = "/home/alice/private-data/vqa_train.jsonl"
    run_args["data"] = {"dataset": private, "dataset_hub_id": "org/vqa-set, org/vqa-extra"}
    run_args["model"]["model_name_or_path"] = "/home/alice/checkpoints/upcycled-llava"
    (run / "run_args.json").write_text(json.dumps(run_args))
    path = write_model_card(make_model(), run, model_id="org/tuned")
    card = ModelCard.load(path)
    assert card.data.datasets == ["org/vqa-set", "org/vqa-extra"]
    assert {r.dataset_type for r in card.data.eval_results} == {"org/vqa-set"}
    raw = path.read_text()
    assert "/home/alice" not in raw
    assert "Fine-tuned with `sparsemoe-vlm train`" in raw and "starting from `upcycled-llava`" in raw

    run_args["data"] = {"dataset": private}  # no Hub id: no `datasets`, the data named by its file name only
    (run / "run_args.json").write_text(json.dumps(run_args))
    card = ModelCard.load(write_model_card(make_model(), run, model_id="org/tuned"))
    assert card.data.datasets is None
    assert {(r.dataset_type, r.dataset_name) for r in card.data.eval_results} == {("vqa_train.jsonl",
                                                                                   "vqa_train.jsonl")}
    assert "/home/alice" not in str(card) and "on `vqa_train.jsonl`" in card.text
    # An explicit `datasets=` (as `sparsemoe-vlm push --datasets` passes) wins.
    card = build_model_card(make_model(), "org/tuned", run, datasets=["org/other"])
    assert card.data.datasets == ["org/other"]


def test_dataset_ids_must_be_hub_ids_and_are_checked_before_any_work(tmp_path):
    from hf_sparsemoe_vlm.app.cli import main
    from hf_sparsemoe_vlm.app.model_card import hub_dataset_ids

    assert hub_dataset_ids(" org/a ,org/b,") == ["org/a", "org/b"] and hub_dataset_ids("") is None
    with pytest.raises(ValueError, match=r"--dataset_hub_id '/home/alice/data' is not a Hub dataset id"):
        main(["train", "--dataset_hub_id", "/home/alice/data", "--output_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit, match=r"Refusing to push: --datasets 'my data' is not a Hub dataset id"):
        main(["push", str(tmp_path / "no-folder"), "org/x", "--datasets", "org/ok,my data"])


def _run_with(folder, data=None, metrics=None):
    fake_run(folder)
    run_args = json.loads((folder / "run_args.json").read_text())
    run_args["data"].update(data or {})
    (folder / "run_args.json").write_text(json.dumps(run_args))
    if metrics is not None:
        (folder / "all_results.json").write_text(json.dumps(metrics))
    return folder


@pytest.mark.parametrize("order,question_first,advice", [
    ("random", False, "either order works (test exact match: image first 97.0%, question first 99.0%)."),
    ("question_first", True, "trained with the question before the image only; keep that order (test exact match "
                             "99.0%; asked with the image before the question: 97.0%)."),
    ("image_first", False, "trained with the image before the question only; keep that order (test exact match "
                           "97.0%; asked with the question before the image: 99.0%)."),
])
def test_card_prompt_order_advice_comes_from_how_the_run_trained(tmp_path, order, question_first, advice):
    metrics = {"test_exact_match": 0.98, "test_exact_match_image_first": 0.97, "test_exact_match_question_first": 0.99}
    card = build_model_card(make_model(), "org/m", _run_with(tmp_path, {"prompt_order": order}, metrics)).text
    assert "Prompt order: " in card and advice in card
    usage = card.split("## Usage")[1].split("With a pipeline")[0]
    text_first = usage.index('{"type": "text"') < usage.index('{"type": "image"')
    assert text_first == question_first
    assert ("keep that order" in usage) == (order != "random")


def test_card_of_a_run_from_before_prompt_orders_reads_its_old_flag(tmp_path):
    card = build_model_card(make_model(), "org/m", _run_with(tmp_path, {"image_after_question": True})).text
    assert "trained with the question before the image only; keep that order." in card


@pytest.mark.parametrize("types,question,answer", [
    ("count", "How many shapes are there?", "two"),
    ("position,caption", "Which is further left, the circle or the square?", "circle"),
    ("caption", "Describe the image.", "a red circle and a blue square"),
])
def test_card_example_asks_a_question_of_the_runs_own_types_about_an_image_it_draws(tmp_path, types, question,
                                                                                    answer):
    card = build_model_card(make_model(), "org/m", _run_with(tmp_path, {"question_types": types})).text
    usage = card.split("## Usage")[1].split("Larger than memory")[0]
    assert usage.count(question) == 2 and f"# expected: {answer}" in usage
    assert usage.count('Image.new("RGB", (') == 2 and "shapes.png" not in usage
    # The drawn scene matches the expected answer: a red circle left of a blue square.
    scope = {}
    exec(usage.split("```python\n")[1].split("from transformers")[0], scope)  # the image part of the snippet
    image = scope["image"]
    width = image.width
    red = [x for x in range(width) for y in range(width) if image.getpixel((x, y)) == (220, 40, 40)]
    blue = [x for x in range(width) for y in range(width) if image.getpixel((x, y)) == (40, 80, 220)]
    assert red and blue and max(red) < min(blue)


def test_card_of_a_run_without_captions_does_not_mention_caption_scores(tmp_path):
    metrics = {"test_exact_match": 0.5, "test_source": "3 rows (5%) carved from the training rows of d.jsonl"}
    card = build_model_card(make_model(), "org/m", _run_with(tmp_path, {"dataset": "/data/d.jsonl"}, metrics)).text
    assert "BLEU" not in card and "ROUGE" not in card and "caption" not in card.lower()
    assert "the test figures come from 3 rows (5%) carved from the training rows of d.jsonl" in card
    assert "What is in the image?" in card and "# expected" not in card


def test_card_says_how_the_decoder_attends():
    assert "| attention | causal |" in build_model_card(make_model(), "org/causal").text
    card = build_model_card(make_model(prefix_attention=True), "org/prefix").text
    assert "| attention | prefix-LM: the prompt (image and text) attends bidirectionally, answers causally |" in card
