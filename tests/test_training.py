import json
import math
import types

import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import TrainerState

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration
from hf_sparsemoe_vlm.app.cli import main, parse_train_args
from hf_sparsemoe_vlm.app.training import (
    ROUTING_STATISTICS,
    VLMDataCollator,
    apply_training_stage,
    plot_expert_load,
    preset_config,
    routing_health,
)

from tiny_models import make_processor_and_model


ROWS = [
    {"image": PIL.Image.new("RGB", (20, 20), (255, 0, 0)), "question": "What colour?", "answer": "red"},
    {"image": PIL.Image.new("RGB", (20, 20), (0, 0, 255)), "question": "How many shapes are there?",
     "answer": "one blue square"},
]


def test_collator_labels_only_the_answers():
    processor, model = make_processor_and_model()
    batch = VLMDataCollator(processor)(ROWS)
    tokenizer = processor.tokenizer
    for row, ids, labels, mask in zip(ROWS, batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        learned = ids[labels != -100]
        assert tokenizer.decode(learned) == row["answer"] + "<|end|>"
        assert (labels[mask == 0] == -100).all()  # padding
        assert (labels[ids == processor.image_token_id] == -100).all()  # image tokens
    # Position ids count real tokens only, like generate() with left padding.
    first_real = batch["attention_mask"][0].argmax()
    assert batch["position_ids"][0, first_real] == 0
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.aux_loss is not None


def _transformers_labels(collator, rows):
    """Labels from Transformers' own `{% generation %}` assistant mask, the reference the collator's fast path must
    reproduce (rows in the collator's fixed order)."""
    batch = collator.processor.apply_chat_template(
        [collator.conversation(row) for row in rows],
        tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True})
    return batch["input_ids"].masked_fill(~batch["assistant_masks"].bool(), -100)


def test_collator_labels_equal_transformers_assistant_mask():
    processor, _ = make_processor_and_model()
    image = ROWS[0]["image"]
    conversation = {"image": image, "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "And the shape?\n"}]},
        {"role": "assistant", "content": [{"type": "text", "text": " a square,\nsmall"}]},
    ]}
    empty_answer = {**ROWS[1], "answer": ""}
    for order, rows in (("image_first", ROWS), ("question_first", ROWS), ("image_first", [conversation, *ROWS]),
                        ("question_first", [empty_answer, conversation])):
        collator = VLMDataCollator(processor, prompt_order=order)
        conversations = [collator.conversation(row) for row in rows]
        ids = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                            processor_kwargs={"padding": True})["input_ids"]
        assert collator._assistant_turns(ids, conversations) is not None  # the fast path is the one taken
        labels = collator(rows)["labels"]
        assert torch.equal(labels, _transformers_labels(collator, rows)), order
        assert (labels != -100).sum() > len(rows)


def test_collator_falls_back_when_text_spells_a_special_token():
    processor, _ = make_processor_and_model()
    rows = [{**ROWS[0], "question": "Say <|end|> then <|assistant|>\n now"}, ROWS[1]]
    collator = VLMDataCollator(processor)
    conversations = [collator.conversation(row) for row in rows]
    ids = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                        processor_kwargs={"padding": True})["input_ids"]
    assert collator._assistant_turns(ids, conversations) is None
    assert torch.equal(collator(rows)["labels"], _transformers_labels(collator, rows))


def test_generation_prompts_end_with_the_assistant_turn():
    processor, _ = make_processor_and_model()
    prompts = VLMDataCollator(processor).prompts(ROWS)
    text = processor.tokenizer.decode(prompts["input_ids"][0][prompts["attention_mask"][0].bool()])
    assert text.endswith("What colour?<|end|>\n<|assistant|>\n")
    assert "red" not in text


@pytest.mark.parametrize("stage,trains,frozen", [
    ("projector", ["multi_modal_projector.linear_1.weight"], ["text_moe.router.weight", "embed_tokens.weight"]),
    ("moe", ["text_moe.router.weight", "image_moe.experts.gate_up_proj"], ["self_attn.q_proj.weight",
                                                                           "multi_modal_projector.linear_1.weight"]),
    ("dense", ["self_attn.q_proj.weight", "embed_tokens.weight"], ["text_moe.experts.down_proj"]),
    ("full", ["self_attn.q_proj.weight", "text_moe.router.weight", "vision_tower"], []),
])
def test_training_stages_choose_what_trains(stage, trains, frozen):
    _, model = make_processor_and_model()
    counts = apply_training_stage(model, stage)
    assert 0 < counts["trainable"] <= counts["total"]
    params = dict(model.named_parameters())
    for fragment in trains:
        assert any(p.requires_grad for n, p in params.items() if fragment in n), fragment
    for fragment in frozen:
        assert not any(p.requires_grad for n, p in params.items() if fragment in n), fragment


def test_freezing_the_vision_tower_and_bad_stage():
    _, model = make_processor_and_model()
    apply_training_stage(model, "full", freeze_vision_tower=True)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)
    with pytest.raises(ValueError, match="Unknown training stage 'experts'"):
        apply_training_stage(model, "experts")


def test_routing_health_figures():
    stats = {"text/tokens_per_expert": torch.tensor([[5.0, 5.0, 5.0, 5.0], [20.0, 0.0, 0.0, 0.0]]),
             "text/expert_load": torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0]]),
             "text/experts_per_token": torch.tensor(1.5)}
    health = routing_health(stats)
    assert health["routing/text/dead_experts"] == 3
    assert health["routing/text/experts_per_token"] == 1.5
    assert health["routing/text/load_entropy"] == pytest.approx(0.5, abs=1e-4)  # mean of 1 (uniform) and 0
    assert health["routing/text/max_expert_load"] == 1.0


def test_expert_load_plot_is_a_png(tmp_path):
    path = plot_expert_load({"text": torch.tensor([[3, 1, 0, 4]]), "image": torch.tensor([[2, 2]])},
                            tmp_path / "load.png", ["layer 1"])
    image = PIL.Image.open(path).convert("RGB")
    assert image.format is None and PIL.Image.open(path).format == "PNG"
    assert image.width >= 640 and image.height >= 200  # readable on a model page
    # One shared colour scale: the busiest cell (text expert 3, 50%) is the darkest, an idle one (expert 2) is white.
    from hf_sparsemoe_vlm.app.training import _load_colour

    pixels = set(image.getdata())
    assert _load_colour(1.0) in pixels and _load_colour(0.0) in pixels  # the colour bar's two ends
    cell, label_width, top, margin = 64, 86, 84, 16
    busiest = image.getpixel((margin + label_width + 3 * cell + 4, top + 30 + 4))
    idle = image.getpixel((margin + label_width + 2 * cell + 4, top + 30 + 4))
    assert busiest == _load_colour(1.0) and idle == _load_colour(0.0)
    with pytest.raises(ValueError, match="No expert load"):
        plot_expert_load({}, tmp_path / "none.png")


def test_presets():
    config = preset_config("tiny", router_type="relu")
    assert config.text_config.router_type == "relu" and config.image_seq_length > 0
    resnet = preset_config("tiny-resnet")
    assert resnet.vision_config.model_type == "resnet" and resnet.image_seq_length == 36  # 6x6 map at 48 px
    assert resnet.image_position_embeddings and not config.image_position_embeddings
    assert resnet.text_config.to_dict() == preset_config("tiny").text_config.to_dict()  # same decoder
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        preset_config("huge")


def test_config_overrides_set_the_preset_decoder_and_are_refused_with_a_checkpoint(tmp_path):
    from datasets import Dataset

    from hf_sparsemoe_vlm.app.cli import _build_model_and_processor

    rows = Dataset.from_dict({"question": ["What colour is the square?"] * 4, "answer": ["red"] * 4})
    model_args, _, _ = parse_train_args(["--config_overrides", "num_attention_heads=8,num_key_value_heads=8,"
                                         "head_dim=32,router_aux_loss_coef=0.02"])
    model, _ = _build_model_and_processor(model_args, rows)
    text = model.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (8, 8, 32)
    assert text.router_aux_loss_coef == 0.02 and isinstance(text.router_aux_loss_coef, float)
    attention = model.model.language_model.layers[0].self_attn
    assert attention.q_proj.out_features == attention.k_proj.out_features == 8 * 32  # full multi-head attention
    assert text.hidden_size == 128 and text.num_hidden_layers == 4  # the rest is the preset's
    default, _ = _build_model_and_processor(parse_train_args([])[0], rows)
    assert default.config.text_config.num_key_value_heads == 2 and default.config.text_config.head_dim == 32
    model_args.dense_baseline = True  # the dense baseline gets the same attention
    dense, _ = _build_model_and_processor(model_args, rows)
    assert dense.config.text_config.num_key_value_heads == 8
    assert set(dense.config.text_config.mlp_layer_types) == {"dense"}
    for overrides, message in (("num_key_value_heads=3", "must divide `num_attention_heads`"),
                               ("num_kv_heads=4", "num_kv_heads isn't in the original config.*e.g. num_key_value"),
                               ("num_key_value_heads", "--config_overrides 'num_key_value_heads'.*key=value"),
                               ("num_key_value_heads=four", "invalid literal for int"),
                               ("mlp_layer_types=dense", "only update int, float, bool or string")):
        with pytest.raises(ValueError, match=message):
            _build_model_and_processor(parse_train_args(["--config_overrides", overrides])[0], rows)
    processor, base = make_processor_and_model()
    base.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="--config_overrides shapes a preset model.*Leave it out"):
        main(["train", "--model_name_or_path", str(tmp_path / "base"), "--config_overrides", "num_key_value_heads=4",
              "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # refused before anything is written
    for overrides in ("num_kv_heads=4", "num_key_value_heads=3"):  # checked before any data is made
        with pytest.raises(ValueError, match="num_kv_heads isn't in|must divide"):
            main(["train", "--config_overrides", overrides, "--output_dir", str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()


def test_train_arguments_have_main_job_defaults():
    model_args, data_args, training_args = parse_train_args([])
    assert model_args.preset == "tiny-resnet" and data_args.dataset == "synthetic" and data_args.image_size == 48
    assert data_args.prompt_order == "random" and training_args.learning_rate == 1e-3
    assert model_args.vision_pretraining_steps is None and model_args.freeze_vision_tower is None  # resolved by run
    assert training_args.per_device_train_batch_size == 32 and training_args.remove_unused_columns is False


@pytest.mark.slow
def test_short_training_run_end_to_end(tmp_path, capsys):
    output = tmp_path / "run"
    code = main(["train", "--output_dir", str(output), "--max_steps", "6", "--num_train_examples", "64",
                 "--num_validation_examples", "8", "--num_test_examples", "10", "--logging_steps", "2",
                 "--save_steps", "3", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
                 "--max_new_tokens", "4", "--router_type", "top_p", "--vision_pretraining_steps", "2",
                 "--use_cpu", "true"])
    assert code == 0
    metrics = json.loads((output / "all_results.json").read_text())
    assert 0.0 <= metrics["test_exact_match"] <= 1.0 and "validation_loss" in metrics
    assert "validation_exact_match" in metrics
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "expert_load.png"):
        assert (output / name).exists(), name
    assert (output / "checkpoint-6").is_dir()
    printed = capsys.readouterr().out
    assert "Test questions:" in printed and "Q: " in printed and "A: " in printed
    # The run documents itself: a model card whose metadata and numbers come from this run and model.
    card = ModelCard.load(output / "README.md")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["exact_match"] == round(metrics["test_exact_match"], 4)
    assert card.data.model_name == "run" and card.data.pipeline_tag == "image-text-to-text"
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(output)
    assert f"| total | {sum(p.numel() for p in model.parameters()):,} |" in card.text
    assert "| steps | 6 |" in card.text and "| batch size per device | 8 |" in card.text
    assert "top-p (p = " in card.text and "(expert_load.png)" in card.text
    # The files the card is made from are Transformers' own: the Trainer's state, whose log history carries the
    # routing statistics of the card's routing table, its arguments and its results; nothing under the old names.
    state = TrainerState.load_from_json(str(output / "trainer_state.json"))
    routing = [entry for entry in state.log_history if "routing/text/load_entropy" in entry]
    assert state.global_step == 6 and [entry["step"] for entry in routing] == [2, 4, 6]
    for group in ("text", "image"):
        row = [routing[-1][f"routing/{group}/{statistic}"] for statistic in ROUTING_STATISTICS]
        assert f"| {group} | {' | '.join(map(str, row))} |" in card.text
    arguments = json.loads((output / "training_args.json").read_text())
    assert arguments["max_steps"] == 6 and arguments["logging_steps"] == 2
    run_args = json.loads((output / "run_args.json").read_text())
    assert run_args["world_size"] == 1 and run_args["expert_load_steps"] == [1, 6]
    assert set(run_args) == {"model", "data", "world_size", "expert_load_steps"}
    assert "| processes | 1 |" in card.text and "| precision | fp32 |" in card.text
    assert not {"metrics.json", "log_history.json"} & {path.name for path in output.iterdir()}


@pytest.mark.slow
def test_lora_fine_tuning_trains_adapters_only_and_saves_a_merged_model(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    processor, base = make_processor_and_model()
    base.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    output = tmp_path / "lora"
    main(["train", "--model_name_or_path", str(tmp_path / "base"), "--output_dir", str(output), "--max_steps", "4",
          "--num_train_examples", "32", "--num_validation_examples", "0", "--num_test_examples", "4",
          "--image_size", "32", "--per_device_train_batch_size", "8", "--max_new_tokens", "2", "--lora_r", "4",
          "--learning_rate", "1e-2", "--save_strategy", "no", "--use_cpu", "true"])
    merged = SparseMoEVLMForConditionalGeneration.from_pretrained(output)
    before, after = dict(base.named_parameters()), dict(merged.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # Only LoRA targets move: decoder attention projections and fused expert tensors.
    assert changed and all(("self_attn" in n and "language_model" in n) or "experts." in n for n in changed)
    assert any("experts.gate_up_proj" in n for n in changed) and any("q_proj" in n for n in changed)
    # The adapter reloads with PEFT on the base model and gives the merged model's logits.
    inputs = processor(text=["<image>What colour is it?"], images=[PIL.Image.new("RGB", (32, 32), "red")],
                       return_tensors="pt")
    adapted = PeftModel.from_pretrained(SparseMoEVLMForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                        output / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(**inputs).logits, merged.eval()(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_lora_rejects_bad_targets_and_stage_combinations(tmp_path):
    pytest.importorskip("peft")
    from hf_sparsemoe_vlm.app.training import apply_lora

    _, model = make_processor_and_model()
    with pytest.raises(ValueError, match="Unknown or empty LoRA targets"):
        apply_lora(model, targets=("mlp",))
    _, dense = make_processor_and_model(mlp_layer_types=["dense", "dense"])
    with pytest.raises(ValueError, match="needs a model with sparse layers"):
        apply_lora(dense, targets=("experts",))
    with pytest.raises(ValueError, match="leave --training_stage at full"):
        main(["train", "--output_dir", str(tmp_path / "x"), "--lora_r", "4", "--training_stage", "moe",
              "--num_train_examples", "8", "--num_validation_examples", "0", "--num_test_examples", "2",
              "--max_steps", "1", "--use_cpu", "true"])


def _tensorboard_scalars(log_dir) -> dict[str, list[float]]:
    """Scalars of every TFRecord event file under `log_dir` (record = length, crc, event proto, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[float]] = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


@pytest.mark.slow
def test_standard_trainer_flags_bf16_accumulation_checkpointing_eval_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    pytest.importorskip("tensorboardX")
    import tensorboardX.event_file_writer
    # tensorboardX names event files by the second: pin the clock so that the writer opened for the final
    # evaluation always starts in the same second as the training one (short runs do that by chance).
    monkeypatch.setattr(tensorboardX.event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.7e9))
    output = tmp_path / "run"
    main(["train", "--output_dir", str(output), "--max_steps", "4", "--num_train_examples", "64",
          "--num_validation_examples", "8", "--num_test_examples", "4", "--per_device_train_batch_size", "4",
          "--gradient_accumulation_steps", "2", "--activation_checkpointing", "true", "--bf16", "true",
          "--eval_strategy", "steps", "--eval_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
          "--report_to", "tensorboard", "--max_new_tokens", "2", "--vision_pretraining_steps", "0",
          "--use_cpu", "true"])
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    # Evaluations at steps 2 and 4, then the final one the script runs after training.
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [2, 4, 4]
    assert sum("eval_exact_match" in entry for entry in history) == 3
    scalars = _tensorboard_scalars(output / "runs")  # Trainer's default TensorBoard folder
    # Trainer's TensorBoard callback receives the routing health next to the loss.
    assert len(scalars["train/loss"]) == 4
    assert scalars["train/loss"] == pytest.approx(losses, rel=1e-6)
    assert len(scalars["train/routing/text/load_entropy"]) == 4 and "eval/exact_match" in scalars
    assert json.loads((output / "training_args.json").read_text())["bf16"] is True


def test_collator_can_put_the_image_after_the_question():
    processor, _ = make_processor_and_model()
    before = VLMDataCollator(processor)(ROWS[:1])
    after = VLMDataCollator(processor, prompt_order="question_first")(ROWS[:1])
    tokenizer = processor.tokenizer
    question_ids = tokenizer(ROWS[0]["question"], add_special_tokens=False)["input_ids"]

    def first_index(ids, sub):
        ids = ids.tolist()
        return next(i for i in range(len(ids)) if ids[i:i + len(sub)] == sub)

    image_at = {name: int((batch["input_ids"][0] == processor.image_token_id).nonzero()[0])
                for name, batch in (("before", before), ("after", after))}
    assert image_at["before"] < first_index(before["input_ids"][0], question_ids)
    assert image_at["after"] > first_index(after["input_ids"][0], question_ids)
    # Same tokens, same learned answer; only the order in the user turn changes.
    assert sorted(before["input_ids"][0].tolist()) == sorted(after["input_ids"][0].tolist())
    assert tokenizer.decode(after["input_ids"][0][after["labels"][0] != -100]) == ROWS[0]["answer"] + "<|end|>"
    prompt = VLMDataCollator(processor, prompt_order="question_first").prompts(ROWS[:1])["input_ids"][0]
    assert int((prompt == processor.image_token_id).nonzero()[0]) > first_index(prompt, question_ids)


@pytest.mark.parametrize("flag,message", [
    ("--num_single_shape_first", "--num_single_shape_first is a curriculum of the synthetic data"),
    ("--vision_pretraining_steps", "per-patch labels, which only the synthetic set provides; set it to 0 with"),
])
def test_synthetic_only_options_need_the_synthetic_data(tmp_path, flag, message):
    data = tmp_path / "data.jsonl"
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    data.write_text(json.dumps({"image": "a.png", "question": "q?", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=message):
        main(["train", "--dataset", str(data), flag, "10", "--output_dir", str(tmp_path / "o"),
              "--max_steps", "1", "--use_cpu", "true"])


@pytest.mark.parametrize("flags, message", [
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1, got 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0"),
    (["--num_train_examples", "0"], "--num_train_examples must be >= 1 to train on the synthetic set"),
    (["--num_test_examples", "-1"], "--num_test_examples must be >= 0, got -1"),
    (["--image_size", "0"], "--image_size must be >= 20"),
    (["--image_size", "16"], "--image_size must be >= 20"),  # used to hang placing shapes
])
def test_bad_training_flags_are_refused_before_anything_runs(flags, message, tmp_path):
    from hf_sparsemoe_vlm.app.cli import main

    with pytest.raises(ValueError, match=message):
        main(["train", "--output_dir", str(tmp_path / "run"), *flags])
    assert not (tmp_path / "run").exists()
