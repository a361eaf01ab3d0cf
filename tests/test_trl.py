"""TRL's SFTTrainer on SparseMoE-VLM with its processor: the vision-language collator, assistant-only and
completion-only labels, the router losses in the loss, training and generation afterwards."""

import math

import PIL.Image
import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import has_generation_markers
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from hf_sparsemoe_vlm.app.trl_integration import IgnoreImageTokenLabels, SparseMoEVLMSFTTrainer

from tiny_models import make_processor_and_model


COLOURS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
# Answers of different lengths, so that batches are padded.
ANSWERS = ["red", "a green triangle above a blue square", "blue", "two yellow stars"]
QUESTION = "what colour is the circle?"


def _image(colour: str) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (40, 32), COLOURS[colour])
    image.paste((255, 255, 255), (8, 8, 20, 20))  # a white patch, so images are not uniform
    return image


def conversation_dataset() -> Dataset:
    """Conversational image-text rows: `messages` (image placeholder in the user turn) and `images`."""
    rows = []
    for colour, answer in zip(COLOURS, ANSWERS, strict=True):
        rows.append({
            "images": [_image(colour)],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        })
    return Dataset.from_list(rows)


def prompt_completion_dataset() -> Dataset:
    rows = []
    for colour, answer in zip(COLOURS, ANSWERS, strict=True):
        rows.append({
            "images": [_image(colour)],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        })
    return Dataset.from_list(rows)


def sft_config(tmp_path, **overrides) -> SFTConfig:
    # fp32 on CPU (SFTConfig defaults to bf16), no checkpoints, a log line per step.
    kwargs = {"output_dir": str(tmp_path), "max_steps": 3, "per_device_train_batch_size": 2, "report_to": [],
              "use_cpu": True, "bf16": False, "save_strategy": "no", "logging_steps": 1, "seed": 0,
              "learning_rate": 1e-3, "dataloader_num_workers": 0}
    return SFTConfig(**{**kwargs, **overrides})


def collate(trainer, dataset: Dataset) -> dict[str, torch.Tensor]:
    return trainer.data_collator([dict(row) for row in dataset.select(range(2))])


def labelled_text(processor, batch, row: int) -> str:
    labels = batch["labels"][row]
    return processor.tokenizer.decode(labels[labels != -100])


def test_sft_trainer_routes_image_data_to_the_vision_collator_with_assistant_only_labels(tmp_path):
    processor, model = make_processor_and_model()
    # Our chat template wraps assistant turns (end token included) in {% generation %}: TRL uses it as is.
    assert has_generation_markers(processor.chat_template)
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path, assistant_only_loss=True),
                         train_dataset=conversation_dataset(), processing_class=processor)
    assert isinstance(trainer.data_collator, DataCollatorForVisionLanguageModeling)
    assert trainer.chat_template is None  # no replacement training template was needed

    batch = collate(trainer, conversation_dataset())
    image_token_id = model.config.image_token_id
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert (batch["input_ids"] == image_token_id).sum(-1).tolist() == [model.config.image_seq_length] * 2
    torch.testing.assert_close(batch["mm_token_type_ids"], (batch["input_ids"] == image_token_id).long())
    assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][1].all()  # row 0 padded on the right
    # Only the assistant's answer and its end token are labels: not the prompt, image tokens or padding.
    end = processor.tokenizer.eos_token
    assert [labelled_text(processor, batch, row) for row in (0, 1)] == [f"{ANSWERS[0]}{end}", f"{ANSWERS[1]}{end}"]
    kept = batch["labels"] != -100
    assert torch.equal(batch["labels"][kept], batch["input_ids"][kept])
    assert not kept[batch["input_ids"] == image_token_id].any()
    assert not kept[batch["attention_mask"] == 0].any()


def test_prompt_completion_image_data_trains_on_the_completion_only(tmp_path):
    processor, model = make_processor_and_model()
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=prompt_completion_dataset(),
                         processing_class=processor)
    assert trainer.completion_only_loss
    batch = collate(trainer, prompt_completion_dataset())
    image_token_id = model.config.image_token_id
    assert (batch["input_ids"] == image_token_id).sum(-1).tolist() == [model.config.image_seq_length] * 2
    torch.testing.assert_close(batch["mm_token_type_ids"], (batch["input_ids"] == image_token_id).long())
    end = processor.tokenizer.eos_token
    for row in (0, 1):  # TRL's completion is the rendered chat minus the prompt: the answer, `<|end|>` and "\n"
        assert labelled_text(processor, batch, row) == f"{ANSWERS[row]}{end}\n"
    assert (batch["labels"][batch["input_ids"] == image_token_id] == -100).all()


def test_image_tokens_are_not_labels_in_language_modeling_batches(tmp_path):
    """Without assistant-only loss TRL labels every token, image placeholders included; our trainer masks those."""
    processor, model = make_processor_and_model()
    image_token_id = model.config.image_token_id
    stock = SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=conversation_dataset(),
                       processing_class=processor)
    assert (collate(stock, conversation_dataset())["labels"] == image_token_id).any()  # what TRL does itself

    trainer = SparseMoEVLMSFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=conversation_dataset(),
                                     processing_class=processor)
    assert isinstance(trainer.data_collator, IgnoreImageTokenLabels)
    batch = collate(trainer, conversation_dataset())
    is_image = batch["input_ids"] == image_token_id
    assert (batch["labels"][is_image] == -100).all()
    text = ~is_image & (batch["attention_mask"] == 1)
    assert torch.equal(batch["labels"][text], batch["input_ids"][text])  # the rest of the chat is learned


def test_stock_sft_trainer_with_the_router_aux_loss(tmp_path):
    """Stock `SFTTrainer` trains with its own aux loss: TRL's fused LM head runs the backbone and computes Mixtral's
    load-balancing loss from `router_logits`, one (batch * seq_len, experts) tensor per sparse layer."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    processor, model = make_processor_and_model()
    text_config = model.config.text_config
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path, max_steps=1, assistant_only_loss=True,
                                                      learning_rate=0.0, train_sampling_strategy="sequential"),
                         train_dataset=conversation_dataset(), processing_class=processor)
    assert trainer.aux_loss_enabled  # TRL switches it on: the text config declares `router_aux_loss_coef`
    batch = collate(trainer, conversation_dataset())  # the first two rows, the first batch of the run
    model.train()
    with torch.no_grad():
        backbone = model.model(**{k: v for k, v in batch.items() if k != "labels"}, output_router_logits=True)
        expected = load_balancing_loss_func(backbone.router_logits, text_config.num_experts,
                                            text_config.num_experts_per_tok, batch["attention_mask"])
    assert len(backbone.router_logits) == len(text_config.sparse_layer_indices)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert trainer.state.global_step == 1 and math.isfinite(logged["loss"])
    assert logged["aux_loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_stock_sft_trainer_trains_without_router_losses(tmp_path):
    """The stock trainer runs when its aux loss is off, but then no router loss is in the loss at all."""
    processor, model = make_processor_and_model()
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path, max_steps=1, assistant_only_loss=True,
                                                      router_aux_loss_coef=0.0),
                         train_dataset=conversation_dataset(), processing_class=processor)
    trainer.train()
    assert trainer.state.global_step == 1
    assert model.config.text_config.router_aux_loss_coef == 0.0  # TRL writes its value into the model config
    assert "aux_loss" not in trainer.state.log_history[0]


def test_sparsemoe_sft_trainer_trains_with_the_router_losses_and_still_generates(tmp_path):
    processor, model = make_processor_and_model()
    text_config = model.config.text_config
    dataset = conversation_dataset()
    trainer = SparseMoEVLMSFTTrainer(
        model=model, args=sft_config(tmp_path, assistant_only_loss=True, router_aux_loss_coef=0.5),
        train_dataset=dataset, processing_class=processor,
    )
    assert isinstance(trainer.data_collator.collator, DataCollatorForVisionLanguageModeling)
    assert text_config.router_aux_loss_coef == 0.5  # SFTConfig's coefficient is the one the forward uses
    assert text_config.output_router_logits is False  # kept as configured (TRL had switched it on)

    # The loss of one batch is the model's cross-entropy + the weighted router losses.
    batch = collate(trainer, dataset)
    model.train()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    cross_entropy = torch.nn.functional.cross_entropy(
        outputs.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )
    assert outputs.aux_loss > 0 and outputs.z_loss > 0
    torch.testing.assert_close(
        loss, cross_entropy + 0.5 * outputs.aux_loss + text_config.router_z_loss_coef * outputs.z_loss
    )
    assert loss - cross_entropy > 0.5 * 0.9  # the balance loss is about 1 (1.0 = uniform routing)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = trainer.train()
    assert trainer.state.global_step == 3
    assert math.isfinite(result.training_loss)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert math.isfinite(entry["loss"]) and entry["aux_loss"] > 0 and entry["z_loss"] > 0
        assert {"entropy", "mean_token_accuracy", "num_tokens"} <= set(entry)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    for part in ("text_moe.router", "text_moe.experts", "image_moe.router", "image_moe.experts",
                 "multi_modal_projector", "lm_head"):
        assert any(part in name for name in changed), part

    metrics = trainer.evaluate(dataset)
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_aux_loss"] > 0

    model.eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": _image("red")},
                                             {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new_tokens) <= 4
    assert model.config.image_token_id not in new_tokens.tolist()


def test_gradient_accumulation_keeps_the_router_losses_at_their_weight(tmp_path):
    """Logged loss with 2 accumulated micro-batches = the mean of their losses (CE + router terms each)."""
    processor, model = make_processor_and_model(router_type="relu", router_target_active_experts=None)
    dataset = conversation_dataset()
    args = sft_config(tmp_path, max_steps=1, gradient_accumulation_steps=2, learning_rate=0.0,
                      assistant_only_loss=True, router_aux_loss_coef=0.5, train_sampling_strategy="sequential")
    trainer = SparseMoEVLMSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    model.train()
    with torch.no_grad():
        micro = [trainer.compute_loss(model, trainer.data_collator([dict(row) for row in dataset.select(rows)]))
                 for rows in ([0, 1], [2, 3])]
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["loss"] == pytest.approx(sum(micro).item() / 2, rel=1e-4)
    assert logged["l1_loss"] > 0  # ReLU routers add their L1 term


def test_sparsemoe_sft_trainer_loads_model_and_processor_from_a_saved_folder(tmp_path):
    processor, model = make_processor_and_model()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    trainer = SparseMoEVLMSFTTrainer(model=str(tmp_path / "model"),
                                     args=sft_config(tmp_path / "out", max_steps=1, assistant_only_loss=True),
                                     train_dataset=conversation_dataset())
    assert type(trainer.model) is type(model) and type(trainer.processing_class) is type(processor)
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.state.log_history[0]["aux_loss"] > 0
