# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Fine-tuning pieces used by `sparsemoe-vlm train`: model presets, the chat data collator, training stages,
a Trainer that logs routing health and evaluates by generation, and the expert-load plot."""

import itertools
import math
import os
import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, is_initialized
from accelerate.utils import DistributedDataParallelKwargs
from PIL import Image, ImageDraw, ImageFont
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..configuration_sparsemoe_vlm import SparseMoEVLMConfig
from ..processing_sparsemoe_vlm import (
    BUILT_TOKENIZER_SPECIAL_TOKENS,
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    SparseMoEVLMProcessor,
)
from .checkpoints import load_expert_load, save_expert_load, write_run_file
from .metrics import load_metric


PRESETS: dict[str, dict[str, Any]] = {
    # Trains from scratch on the synthetic shapes set in minutes on 2 CPU cores.
    "tiny": {
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 96, "intermediate_size": 192,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
        "image_size": 64,
        "text_config": {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "moe_intermediate_size": 128,
                        "num_experts": 4, "num_image_experts": 4, "num_shared_experts": 0, "num_experts_per_tok": 2,
                        "mlp_layer_types": ["dense", "sparse", "dense", "sparse"], "max_position_embeddings": 256,
                        "router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.001},
        "image_token_id": BUILT_TOKENIZER_SPECIAL_TOKENS.index(IMAGE_TOKEN),  # the id `build_tokenizer` gives it
    },
}
# The default of `sparsemoe-vlm train`: the same decoder on a small ResNet tower (6x6 feature map at 48 px, one token
# per 8 px cell) with image position embeddings that start from the grid coordinates. The convolutions learn
# per-object shape and colour within ~100 steps of stage-0 pretraining (benchmarks/RESULTS.md). Frozen after stage 0,
# the tower runs in eval mode (BatchNorm running statistics); a trainable one computes BatchNorm statistics per
# process under DDP (use SyncBatchNorm for single-process equivalence).
PRESETS["tiny-resnet"] = {
    **PRESETS["tiny"],
    "vision_config": {"model_type": "resnet", "embedding_size": 32, "hidden_sizes": [48, 96], "depths": [1, 1],
                      "layer_type": "basic", "downsample_in_first_stage": False},
    "image_size": 48,
    "image_position_embeddings": True,
}

TRAINING_STAGES = ("full", "projector", "dense", "moe")
# LoRA targets: decoder attention projections (modules) and the fused expert tensors (parameters: PEFT wraps
# `nn.Parameter`s through `target_parameters`, so the fused (E, ., .) experts get one adapter per tensor).
LORA_TARGETS = {
    "attention": {"target_modules": r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"},
    "experts": {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
    "dense_mlp": {"target_modules": r".*language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"},
}


def preset_config(name: str, **text_overrides) -> SparseMoEVLMConfig:
    """A model config from a named preset; keyword arguments override text (decoder) settings."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {sorted(PRESETS)}.")
    preset = PRESETS[name]
    return SparseMoEVLMConfig(vision_config=dict(preset["vision_config"]),
                              text_config={**preset["text_config"], **text_overrides},
                              image_token_id=preset["image_token_id"], image_size=preset["image_size"],
                              image_position_embeddings=preset.get("image_position_embeddings", False))


def apply_training_stage(model, stage: str, freeze_vision_tower: bool = False) -> dict[str, int]:
    """Choose what trains, as in MoE-LLaVA's stages:

    - `"full"`: everything;
    - `"projector"`: the multimodal projector only (stage I: align image features with the decoder);
    - `"dense"`: everything but the experts and routers (stage II on a dense model);
    - `"moe"`: experts and routers only (stage III: sparse fine-tuning).

    `freeze_vision_tower` additionally freezes the vision tower. Returns trainable / total parameter counts.
    """
    if stage not in TRAINING_STAGES:
        raise ValueError(f"Unknown training stage {stage!r}; expected one of {TRAINING_STAGES}.")
    for name, param in model.named_parameters():
        is_moe = "_moe." in name
        if stage == "full":
            trainable = True
        elif stage == "projector":
            trainable = "multi_modal_projector" in name
        elif stage == "dense":
            trainable = not is_moe
        else:
            trainable = is_moe
        if freeze_vision_tower and "vision_tower" in name:
            trainable = False
        param.requires_grad_(trainable)
    counts = {"trainable": model.num_parameters(only_trainable=True), "total": model.num_parameters()}
    if counts["trainable"] == 0:
        raise ValueError(f"Training stage {stage!r} leaves no trainable parameter in this model.")
    return counts


def apply_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               targets: tuple[str, ...] = ("attention", "experts")):
    """Wrap `model` with PEFT LoRA adapters on the chosen `targets` (keys of `LORA_TARGETS`); everything else is
    frozen. Needs the optional `peft` package (`pip install "hf-sparsemoe-vlm[peft]"`)."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"Unknown or empty LoRA targets {list(targets)}; choose from {sorted(LORA_TARGETS)}.")
    if "experts" in targets and not model.config.text_config.sparse_layer_indices:
        raise ValueError("LoRA target 'experts' needs a model with sparse layers; this decoder is dense.")
    if "dense_mlp" in targets and "dense" not in model.config.text_config.mlp_layer_types:
        raise ValueError("LoRA target 'dense_mlp' needs a model with dense layers; every layer here is sparse.")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs the `peft` package: pip install 'hf-sparsemoe-vlm[peft]'") from None
    module_patterns = [LORA_TARGETS[t]["target_modules"] for t in targets if "target_modules" in LORA_TARGETS[t]]
    parameters = [name for t in targets for name in LORA_TARGETS[t].get("target_parameters", [])]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules="|".join(f"(?:{p})" for p in module_patterns) if module_patterns else None,
                        target_parameters=parameters or None)
    return get_peft_model(model, config)


class _PatchHeads(torch.nn.Module):
    """What stage 0 trains, as one module: the vision tower and its two temporary heads. Accelerate prepares (places,
    DDP-wraps, autocasts) this module and never the VLM, whose own forward the Trainer later wraps."""

    def __init__(self, model, num_labels: int):
        super().__init__()
        base = model.model if hasattr(model, "model") else model
        self.vision_tower = base.vision_tower
        self.head = torch.nn.Linear(model.config.vision_feature_size, num_labels)
        self.offset_head = torch.nn.Linear(model.config.vision_feature_size, 2)
        # A plain attribute, not a submodule: the features come from the model's own code path (tower, then token
        # selection), but only the tower is trained.
        self._image_features = base.get_image_features

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._image_features(pixel_values).vision_tokens.float()
        return self.head(tokens), self.offset_head(tokens)


@contextmanager
def stage_zero_accelerator(mixed_precision: str | None = None, cpu: bool = False) -> Iterator[Accelerator]:
    """An `Accelerator` for `pretrain_vision_tower`, with `mixed_precision` ("no", "bf16", "fp16"; None: Accelerate's
    configuration), e.g. the Trainer's `TrainingArguments.mixed_precision`.

    Accelerate keeps one state per process, configured by its first `Accelerator`; a later one (the Trainer's) joins
    it: its FSDP or DeepSpeed settings would not apply, another precision would be refused. So when this is the
    first, the state is cleared on exit, and the next `Accelerator` is configured from its own arguments."""
    first = not is_initialized()
    # Batches without centre offsets leave the offset head without a gradient, which DDP must be told to expect.
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    try:
        yield accelerator
    finally:
        if first:
            AcceleratorState._reset_state()  # as Transformers' Trainer does between hyperparameter-search trials


def pretrain_vision_tower(model, image_processor, batches, num_labels: int, learning_rate: float = 2e-3,
                          logging_steps: int = 100, accelerator: Accelerator | None = None) -> list[float]:
    """Stage 0: pretrain the vision tower on per-patch labels before the VLM trains, the role a pretrained encoder
    (CLIP, SigLIP) plays in LLaVA-style models when no pretrained weights can be used.

    A temporary linear head classifies every image token's features (`get_image_features(...).vision_tokens`, before
    the projector) into one of `num_labels` classes with cross-entropy; the head is discarded afterwards. `batches`
    yields `(images, labels)`: a list of images and, per image, `image_seq_length` integer labels in the order of the
    image tokens (row by row; -100 ignores a cell), e.g. `synthetic_shapes.patch_label_batches`. Returns the loss of
    every step. Image tokens that each carry their own object's identity let the decoder bind question words to the
    right tokens from the start, which end-to-end training from pixels does not find on its own
    (`benchmarks/binding_diagnostics.py`).

    Batches may carry a third item, per image and cell the offset `(x, y)` of the owning object's centre from the
    cell's centre in cells, or None for cells without an object (`patch_label_batches(..., with_offsets=True)`): a
    second temporary head then regresses it (mean squared error, added to the loss). Every token of an object then
    carries the object's exact position (its cell, from the position embedding, plus this offset), finer than the
    grid, so comparing where two objects are is one linear read-out for the decoder.

    The steps run under `accelerator` (default: one from `stage_zero_accelerator()`, Accelerate's configuration): on
    its device, in its mixed precision, DDP-wrapped when there are several processes (every process sees the same
    batches, so the towers stay identical). The tower and heads are what it prepares, never `model`, which is returned
    on the device it came on. Its prepared objects are released at the end (`free_memory`, as between two trainings),
    so pass an accelerator meant for stage 0, not the Trainer's; under DDP it needs `find_unused_parameters=True`
    when some batch has no offsets."""
    if accelerator is None:
        with stage_zero_accelerator() as accelerator:
            return pretrain_vision_tower(model, image_processor, batches, num_labels, learning_rate, logging_steps,
                                         accelerator)
    seq_length = model.config.image_seq_length
    device = model.device
    module = _PatchHeads(model, num_labels)
    tower_params = list(module.vision_tower.parameters())
    was_training, requires_grad = model.training, [p.requires_grad for p in tower_params]
    model.to(accelerator.device)  # the features pass through the model's code (and its projector) on that device
    module.vision_tower.train()
    for p in tower_params:  # before `prepare`: DDP registers the parameters that require grad
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=learning_rate, weight_decay=0.0)
    # `prepare` runs the module's forward under the accelerator's autocast and returns fp32 outputs, so the losses
    # below are computed in fp32 without an explicit `accelerator.autocast()`.
    prepared, optimizer = accelerator.prepare(module, optimizer)
    losses = []
    try:
        for step, (images, labels, *rest) in enumerate(batches, start=1):
            labels = torch.as_tensor(labels, dtype=torch.long, device=accelerator.device)
            if labels.shape != (len(images), seq_length):
                raise ValueError(f"Patch labels must have shape (num_images, image_seq_length) = ({len(images)}, "
                                 f"{seq_length}) for this model (one label per image token, row by row); got "
                                 f"{tuple(labels.shape)}.")
            if labels.max() >= num_labels or labels.min() < -100:
                raise ValueError(f"Patch labels must be in [0, {num_labels}) (or -100 to ignore a cell); got values "
                                 f"in [{labels.min().item()}, {labels.max().item()}].")
            pixel_values = image_processor(images, return_tensors="pt")["pixel_values"].to(accelerator.device)
            logits, predicted_offsets = prepared(pixel_values)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, num_labels), labels.flatten())
            if rest and rest[0] is not None:
                offsets, known = _offset_targets(rest[0], len(images), seq_length, accelerator.device)
                if known.any():
                    loss = loss + torch.nn.functional.mse_loss(predicted_offsets[known], offsets[known])
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            losses.append(loss.item())
            if logging_steps and (step % logging_steps == 0 or step == 1):
                accelerator.print(f"vision pretraining step {step}: loss {losses[-1]:.4f}", flush=True)
    finally:
        # Drop the DDP wrapper (and its gradient hooks on the tower) and the optimizer state before the Trainer
        # wraps the model itself; the model goes back as it came.
        del prepared, optimizer
        accelerator.free_memory()
        for p, flag in zip(tower_params, requires_grad, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
        model.to(device)
    return losses


def _offset_targets(offsets, num_images: int, seq_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell `(x, y)` offsets (None = no object) as a `(num_images, seq_length, 2)` tensor and its known-cell mask."""
    if len(offsets) != num_images or any(len(per_image) != seq_length for per_image in offsets):
        raise ValueError(f"Centre offsets must give one entry per image token: ({num_images}, {seq_length}) entries of "
                         f"(x, y) or None, row by row.")
    known = torch.tensor([[cell is not None for cell in per_image] for per_image in offsets], device=device)
    values = torch.tensor([[cell if cell is not None else (0.0, 0.0) for cell in per_image] for per_image in offsets],
                          dtype=torch.float32, device=device)
    return values, known


PROMPT_ORDERS = ("random", "image_first", "question_first")


class VLMDataCollator:
    """Turns rows with an image, a question and an answer into a training batch.

    Each row becomes the chat `user: <image> question / assistant: answer` (`prompt_order="image_first"`, LLaVA's
    order) or `user: question <image>` (`"question_first"`: image tokens then attend to the question), rendered with
    the processor's chat template. `"random"` picks the order per example (reproducibly from `seed`), so that the
    trained model answers in either order. Conversation rows (e.g. LLaVA) keep their own order unless the order is
    random or given explicitly, in which case the image moves to the start or the end of its user turn. Labels are
    the input ids on the assistant's answer (and its end token) and -100 everywhere else: padding, image tokens,
    the prompt. Position ids count real tokens only, as `generate()` does with left padding.
    """

    def __init__(self, processor: SparseMoEVLMProcessor, image_column: str = "image",
                 question_column: str = "question", answer_column: str = "answer",
                 prompt_order: str = "image_first", seed: int = 0):
        if prompt_order not in PROMPT_ORDERS:
            raise ValueError(f"Unknown prompt order {prompt_order!r}; expected one of {PROMPT_ORDERS}.")
        self.processor = processor
        self.image_column = image_column
        self.question_column = question_column
        self.answer_column = answer_column
        self.prompt_order = prompt_order
        self._order_rng = random.Random(seed)
        self._turn_ids = self._assistant_turn_ids(processor.tokenizer)

    def conversation(self, row: dict, with_answer: bool = True, image_first: bool | None = None) -> list[dict]:
        """The row as chat messages; without the answer it ends before the last assistant turn. `image_first`
        places the image before (True) or after (False) the text of its user turn; None keeps the collator's
        fixed order (conversation rows: their own order)."""
        if image_first is None and self.prompt_order != "random":
            image_first = self.prompt_order == "image_first" if not row.get("messages") else None
        if row.get("messages"):  # a conversation (e.g. LLaVA): its image items get the row's image
            messages = [{"role": m["role"], "content": [
                {**item, "image": row[self.image_column]} if item["type"] == "image" else item
                for item in m["content"]]} for m in row["messages"]]
            if image_first is not None:
                messages = [{**m, "content": _place_image(m["content"], image_first)} for m in messages]
            if not with_answer:
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                messages = messages[:last]
            return messages
        content = [{"type": "image", "image": row[self.image_column]},
                   {"type": "text", "text": row[self.question_column]}]
        if image_first is False:  # the image tokens then attend to the question (causal attention)
            content.reverse()
        messages = [{"role": "user", "content": content}]
        if with_answer:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": row[self.answer_column]}]})
        return messages

    def reference(self, row: dict) -> str:
        """The answer generation is compared with: the answer column, or the last assistant turn."""
        if row.get("messages"):
            last = [m for m in row["messages"] if m["role"] == "assistant"][-1]
            return "".join(item.get("text") or "" for item in last["content"] if item["type"] == "text")
        return row[self.answer_column]

    def _training_order(self, row: dict) -> bool | None:
        if self.prompt_order != "random":
            return None
        if row.get("image_first") is not None:  # fixed per example by `assign_prompt_orders`
            return bool(row["image_first"])
        return self._order_rng.random() < 0.5

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        conversations = [self.conversation(row, image_first=self._training_order(row)) for row in rows]
        assistant = None
        if self.processor.chat_template == CHAT_TEMPLATE:
            batch = self.processor.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                                       return_tensors="pt", processor_kwargs={"padding": True})
            assistant = self._assistant_turns(batch["input_ids"], conversations)
        if assistant is None:  # another template: Transformers marks its {% generation %} spans (slower)
            batch = self.processor.apply_chat_template(
                conversations, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
                processor_kwargs={"padding": True},
            )
            assistant = batch.pop("assistant_masks").bool()
        batch["labels"] = batch["input_ids"].masked_fill(~assistant, -100)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return dict(batch)

    @staticmethod
    def _assistant_turn_ids(tokenizer) -> tuple[int, int, int] | None:
        """The ids of `<|assistant|>`, the newline after it and the end token, or None when the tokenizer lacks one
        of them. Resolved once, at construction: encoding the newline is an unpadded call, which switches the
        tokenizer's padding off, and its saved tokenizer.json would record that (a checkpoint saved mid-training
        would differ from the final one)."""
        header = tokenizer.convert_tokens_to_ids("<|assistant|>")
        newline = tokenizer.encode("\n", add_special_tokens=False)
        end = tokenizer.eos_token_id
        if len(newline) != 1 or end is None or header in (None, tokenizer.unk_token_id):
            return None
        return header, newline[0], end

    def _assistant_turns(self, input_ids: torch.Tensor, conversations: list[list[dict]]) -> torch.Tensor | None:
        """The tokens of every assistant turn, its end token included, under this package's chat template (a turn is
        `<|assistant|>` `\\n` content `<|end|>`): what `return_assistant_tokens_mask=True` marks, without its
        per-token Python loop (about 7% of a training step's time at the main job's size). None when a row's tokens do
        not show its turns one to one (e.g. a message whose text spells a special token): the caller then asks
        Transformers."""
        if self._turn_ids is None:
            return None
        header, newline, end = self._turn_ids
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, (ids, messages) in enumerate(zip(input_ids.tolist(), conversations, strict=True)):
            headers = [i for i, token in enumerate(ids) if token == header]
            ends = [i for i, token in enumerate(ids) if token == end]
            if (len(headers) != sum(m["role"] == "assistant" for m in messages) or len(ends) != len(messages)
                    or any(i + 1 >= len(ids) or ids[i + 1] != newline for i in headers)):
                return None
            for start in headers:
                stop = next((i for i in ends if i > start), None)
                if stop is None:
                    return None
                mask[row, start + 2 : stop + 1] = True
        return mask

    def prompts(self, rows: list[dict], image_first: bool | None = None) -> dict[str, torch.Tensor]:
        """Generation inputs: the same chats up to the assistant's turn, in the order `image_first` asks for
        (default: the collator's fixed order; image first when it trains on random orders)."""
        if image_first is None and self.prompt_order == "random":
            image_first = True
        return dict(self.processor.apply_chat_template(
            [self.conversation(row, with_answer=False, image_first=image_first) for row in rows],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True},
        ))


def assign_prompt_orders(dataset, seed: int = 0):
    """`dataset` with an `image_first` column: a random prompt order per example, fixed by `seed` and the row's index.
    A `VLMDataCollator(prompt_order="random")` follows it, so the order of each example does not depend on the
    order batches are drawn in (the same under resumption, several processes or any sampler); without the column
    the collator draws orders as batches come."""
    rng = random.Random(seed)
    flags = [rng.random() < 0.5 for _ in range(len(dataset))]
    if "image_first" in dataset.column_names:
        dataset = dataset.remove_columns("image_first")
    return dataset.add_column("image_first", flags)


def _place_image(content: list[dict], image_first: bool) -> list[dict]:
    """A user turn's content with its image item(s) moved to the start (or the end), text kept in order."""
    images = [item for item in content if item["type"] == "image"]
    if not images:
        return content
    texts = [item for item in content if item["type"] != "image"]
    return images + texts if image_first else texts + images


@torch.no_grad()
def generate_answers(model, collator: VLMDataCollator, rows, batch_size: int = 32, max_new_tokens: int = 16,
                     image_first: bool | None = None) -> list[str]:
    """Greedy answers of `model` to the questions of `rows` (any sequence of dict rows), asked in the prompt order
    `image_first` chooses (default: the collator's, see `VLMDataCollator.prompts`)."""
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        inputs = {k: v.to(model.device) for k, v in collator.prompts(chunk, image_first=image_first).items()}
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        answers.extend(text.strip() for text in collator.processor.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return answers


# None: the collator's own order (a fixed `prompt_order`; conversation rows keep theirs).
ORDER_NAMES = {True: "image_first", False: "question_first", None: "collator_order"}


def question_kinds(rows) -> list[str]:
    """Each row's question type (the `question_type` column: class names or strings), or `"answer"` without one.
    Kind `"caption"` is scored with BLEU / ROUGE, every other kind with exact match."""
    if "question_type" not in rows.column_names:
        return ["answer"] * len(rows)
    feature = rows.features["question_type"]
    names = getattr(feature, "names", None)
    return [names[value] if names and isinstance(value, int) else str(value) for value in rows["question_type"]]


def evaluate_answers(model, collator: VLMDataCollator, rows, *, image_first: tuple[bool | None, ...] = (True, False),
                     batch_size: int = 32, max_new_tokens: int = 24, prefix: str = "test"
                     ) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Ask every question of `rows` (a `datasets.Dataset`) in each prompt order of `image_first` (True: image first,
    False: question first, None: the collator's own order) and score the greedy answers: exact match on short
    answers (overall, per order as `<prefix>_exact_match_image_first` / `_question_first` when there are several
    orders, and per question type), BLEU / ROUGE on captions. Overall figures pool every order. Returns the metrics
    and the answers per order name. `sparsemoe-vlm evaluate`, the test figures of `train` and
    `SparseMoEVLMTrainer.evaluate` all score through it."""
    if not image_first:
        raise ValueError("`image_first` must name at least one prompt order (True: image first, False: question first).")
    references, kinds = [collator.reference(row) for row in rows], question_kinds(rows)
    answers = {ORDER_NAMES[order]: generate_answers(model, collator, rows, batch_size=batch_size,
                                                    max_new_tokens=max_new_tokens, image_first=order)
               for order in image_first}
    exact_match = load_metric("vqa_exact_match")
    metrics = {}

    def add_exact_match(key: str, keep) -> None:
        """Exact match on the rows whose kind `keep` accepts: pooled over the orders, and per order when several."""
        selected = [i for i, kind in enumerate(kinds) if keep(kind)]
        if not selected:
            return
        metrics[key] = exact_match.compute(predictions=[a[i] for a in answers.values() for i in selected],
                                           references=[references[i] for _ in answers for i in selected])["exact_match"]
        if len(answers) > 1:
            for name, order_answers in answers.items():
                metrics[f"{key}_{name}"] = exact_match.compute(
                    predictions=[order_answers[i] for i in selected],
                    references=[references[i] for i in selected])["exact_match"]

    add_exact_match(f"{prefix}_exact_match", lambda kind: kind != "caption")
    captions = [i for i, kind in enumerate(kinds) if kind == "caption"]
    if captions:
        scores = load_metric("caption_scores").compute(
            predictions=[a[i] for a in answers.values() for i in captions],
            references=[references[i] for _ in answers for i in captions])
        metrics.update({f"{prefix}_caption_{name}": value for name, value in scores.items()})
    for kind in sorted(set(kinds) - {"answer"}):
        add_exact_match(f"{prefix}_exact_match_{kind}", lambda k, kind=kind: k == kind)
    return metrics, answers


# The routing-health figures logged next to the loss (the log history of `trainer_state.json`, which the model card
# reads):
# `routing/<group>/<statistic>` for each statistic below, plus `routing/<loss>` for the router losses.
ROUTING_STATISTICS = ("experts_per_token", "load_entropy", "max_expert_load", "dead_experts")
ROUTING_LOG_PREFIX = "routing/"


def routing_log_key(group: str, statistic: str) -> str:
    return f"{ROUTING_LOG_PREFIX}{group}/{statistic}"


def routing_health(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar routing-health figures from `routing_stats`: per group, average experts per token, normalised
    entropy of the expert load (1 = perfectly balanced), the busiest expert's load share and the number of
    (layer, expert) pairs that received no token."""
    health = {}
    for key, value in stats.items():
        group, name = key.split("/")
        if name == "experts_per_token":
            health[routing_log_key(group, "experts_per_token")] = float(value)
        elif name == "expert_load":
            load = value.float().clamp(min=1e-12)
            entropy = -(load * load.log()).sum(-1) / math.log(load.shape[-1])
            health[routing_log_key(group, "load_entropy")] = float(entropy.mean())
            health[routing_log_key(group, "max_expert_load")] = float(value.max())
        elif name == "tokens_per_expert":
            health[routing_log_key(group, "dead_experts")] = float((value == 0).sum())
    return health


class LaplaceScaleCallback(TrainerCallback):
    """Adapts the ReLU routers' L1 (Laplace prior) coefficients toward `router_target_active_experts` once per
    optimizer step, from the active experts counted in that step's training forwards (whatever the gradient
    accumulation). `SparseMoEVLMTrainer` and `SparseMoEVLMSFTTrainer` add it themselves; add it to a plain
    `Trainer` with `callbacks=[LaplaceScaleCallback()]`."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # The Trainer may hand over a wrapper (PEFT): adapt the SparseMoE-VLM model inside it.
        target = next((m for m in model.modules() if hasattr(m, "adapt_laplace_scales")), None) if model else None
        if target is not None:
            target.adapt_laplace_scales()


def add_laplace_scale_callback(trainer: Trainer) -> None:
    """Add `LaplaceScaleCallback` to a trainer unless it has one, first in line, so that the callbacks after it
    (logging, the user's) see the coefficients of the step that just ended."""
    if not any(isinstance(c, LaplaceScaleCallback) for c in trainer.callback_handler.callbacks):
        trainer.callback_handler.callbacks.insert(0, LaplaceScaleCallback())


class _UniqueFileTensorBoardCallback(TensorBoardCallback):
    """Trainer's TensorBoard callback, except that every writer it opens gets its own event file. The stock one
    closes its writer at the end of training and opens a new one for a later `evaluate()`; tensorboardX names
    event files by the second, so that second writer could overwrite the training log of a short run."""

    _writer_ids = itertools.count()

    def _init_summary_writer(self, args):
        suffix = f".{os.getpid()}.{next(self._writer_ids)}"
        self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, filename_suffix=suffix)


class SparseMoEVLMTrainer(Trainer):
    """`Trainer` that logs the router losses and routing health next to the loss, keeps the expert load of the
    run for the plot (in every checkpoint too, so that a resumed run plots the whole run), and adds generation-based
    exact match to `evaluate()`. `run_id` is recorded in each checkpoint (see `checkpoints.find_last_checkpoint`)."""

    def __init__(self, *args, generation_collator: VLMDataCollator | None = None,
                 generation_max_new_tokens: int = 16, run_id: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_collator = generation_collator
        self.generation_max_new_tokens = generation_max_new_tokens
        self.run_id = run_id
        self._routing_sums: dict[str, float] = defaultdict(float)
        self._routing_count = 0
        self.expert_load: dict[str, torch.Tensor] = {}
        # The first optimizer step the expert load covers: 1, unless the run resumed from a checkpoint that kept no
        # routing counts.
        self.expert_load_first_step = 1
        callbacks = self.callback_handler.callbacks
        for index, callback in enumerate(callbacks):
            if type(callback) is TensorBoardCallback and callback.tb_writer is None:
                replacement = _UniqueFileTensorBoardCallback()
                replacement.logging_dir = callback.logging_dir
                callbacks[index] = replacement
        add_laplace_scale_callback(self)

    def restore_expert_load(self, checkpoint: str | Path) -> bool:
        """Continue the expert load of the run a checkpoint belongs to; False (the plot then starts after the
        checkpoint's step) when the checkpoint kept no routing counts."""
        counts = load_expert_load(checkpoint)
        if counts is None:
            self.expert_load = {}
            self.expert_load_first_step = TrainerState.load_from_json(
                str(Path(checkpoint) / "trainer_state.json")).global_step + 1
            return False
        self.expert_load, self.expert_load_first_step = counts, 1
        return True

    def _save_checkpoint(self, model, trial) -> None:
        # The routing counts and the run id go in first: the Trainer writes trainer_state.json last, so a checkpoint
        # that has it (a complete one) has them too.
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            save_expert_load(folder, self.expert_load)
            if self.run_id:
                write_run_file(folder, self.run_id)
        super()._save_checkpoint(model, trial)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and getattr(outputs, "routing_stats", None):
            for name in ("aux_loss", "z_loss", "l1_loss"):
                value = getattr(outputs, name, None)
                if value is not None:
                    self._routing_sums[f"{ROUTING_LOG_PREFIX}{name}"] += float(value.detach())
            for key, value in routing_health(outputs.routing_stats).items():
                self._routing_sums[key] += value
            for key, value in outputs.routing_stats.items():
                if key.endswith("tokens_per_expert"):
                    group = key.split("/")[0]
                    total = self.expert_load.get(group)
                    self.expert_load[group] = value.detach().cpu() if total is None else total + value.detach().cpu()
            self._routing_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._routing_count and "loss" in logs:
            logs.update({k: round(v / self._routing_count, 4) for k, v in self._routing_sums.items()})
            self._routing_sums.clear()
            self._routing_count = 0
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        collator = self.generation_collator
        if collator is not None and dataset is not None and len(dataset):
            # A run on random prompt orders is scored in both; a fixed order in its own.
            orders = (True, False) if collator.prompt_order == "random" else (None,)
            extra, _ = evaluate_answers(self.model, collator, dataset, image_first=orders,
                                        batch_size=self.args.per_device_eval_batch_size,
                                        max_new_tokens=self.generation_max_new_tokens, prefix=metric_key_prefix)
            self.log(extra)
            metrics.update(extra)
        return metrics


def _load_colour(fraction: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1): a sequential scale that reads in print and for colour-blind readers."""
    fraction = min(1.0, max(0.0, fraction))
    low, high = (247, 251, 255), (8, 48, 107)
    return tuple(round(lo + (hi - lo) * fraction) for lo, hi in zip(low, high, strict=True))


def plot_expert_load(expert_load: dict[str, torch.Tensor], path: str | Path, layer_names: list[str] | None = None,
                     note: str | None = None) -> Path:
    """Write a PNG heat map of the expert load: one panel per modality group (text / image experts), one row per
    sparse layer, one column per expert; each cell is the percentage of the group's token-to-expert assignments in
    that layer that went to the expert (a row sums to 100%; the uniform share is 100 / experts). The colour scale,
    shared by the panels, is drawn on the right. `note` is added to the title (e.g. which steps the counts cover)."""
    if not expert_load:
        raise ValueError("No expert load to plot: the run recorded no routing statistics.")
    shares = {group: 100 * counts.float() / counts.float().sum(-1, keepdim=True).clamp(min=1)
              for group, counts in expert_load.items()}
    scale_max = max(10.0, math.ceil(max(float(share.max()) for share in shares.values()) / 10) * 10)
    font, small, title_font = (ImageFont.load_default(size=size) for size in (16, 14, 20))
    cell, label_width, margin = 64, 86, 16
    top = 84  # title and subtitle
    panels = []
    for group, share in shares.items():
        layers, experts = share.shape
        panel = Image.new("RGB", (label_width + experts * cell + margin, layers * cell + 78), "white")
        draw = ImageDraw.Draw(panel)
        draw.text((label_width, 4), f"{group} experts", fill="black", font=font)
        for row in range(layers):
            label = layer_names[row] if layer_names and row < len(layer_names) else f"layer {row}"
            draw.text((6, 30 + row * cell + cell // 2 - 8), label, fill="black", font=small)
            for col in range(experts):
                value = float(share[row, col])
                x0, y0 = label_width + col * cell, 30 + row * cell
                colour = _load_colour(value / scale_max)
                draw.rectangle((x0, y0, x0 + cell - 2, y0 + cell - 2), fill=colour, outline=(200, 200, 200))
                dark = sum(colour) < 380
                draw.text((x0 + 8, y0 + cell // 2 - 8), f"{value:.0f}%", fill="white" if dark else "black", font=small)
        for col in range(experts):
            draw.text((label_width + col * cell + cell // 2 - 5, 34 + layers * cell), str(col), fill="black",
                      font=small)
        draw.text((label_width, 54 + layers * cell), "expert", fill="black", font=small)
        panels.append(panel)
    bar_width = 110
    width = sum(p.width for p in panels) + bar_width + 2 * margin
    height = top + max(p.height for p in panels) + margin
    canvas = Image.new("RGB", (max(width, 640), height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 10), "Expert load per sparse layer" + (f" ({note})" if note else ""), fill="black",
              font=title_font)
    draw.text((margin, 40), "% of each group's token-to-expert assignments (rows sum to 100%; uniform = 100 / experts)",
              fill=(60, 60, 60), font=small)
    x = margin
    for panel in panels:
        canvas.paste(panel, (x, top))
        x += panel.width
    # Colour scale: 0% at the bottom, scale_max at the top.
    bar_top, bar_height = top + 30, max(80, height - top - 30 - 2 * margin)
    for offset in range(bar_height):
        draw.line((x + 10, bar_top + offset, x + 34, bar_top + offset),
                  fill=_load_colour(1 - offset / max(1, bar_height - 1)))
    draw.rectangle((x + 10, bar_top, x + 34, bar_top + bar_height), outline=(120, 120, 120))
    for fraction in (0.0, 0.5, 1.0):
        y = bar_top + round((1 - fraction) * bar_height)
        draw.text((x + 40, y - 8), f"{fraction * scale_max:.0f}%", fill="black", font=small)
    draw.text((x + 6, top + 4), "% of tokens", fill="black", font=small)
    path = Path(path)
    canvas.save(path)
    return path
