# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""`sparsemoe-vlm` command line. `sparsemoe-vlm train` fine-tunes (or trains from a preset) a SparseMoE-VLM with
Transformers' Trainer; it also runs under `accelerate launch`."""

import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import parse_flag_from_env
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import HfArgumentParser, TrainingArguments, set_seed

from .. import SparseMoEVLMConfig, SparseMoEVLMForConditionalGeneration, SparseMoEVLMProcessor, build_processor
from .checkpoints import checkpoint_problem, checkpoints, find_last_checkpoint, read_run_id, write_run_file
from .data import check_images, load_vlm_splits
from .model_card import (
    RESULTS_FILE,
    RUN_ARGS_FILE,
    TRAINING_ARGS_FILE,
    hub_dataset_ids,
    read_run_args,
    results_path,
    write_model_card,
)
from .retrieval import DEFAULT_RETRIEVAL_PROMPT, retrieval_metrics, score_image_texts
from .synthetic_shapes import (
    ALL_QUESTION_TYPES,
    MIN_IMAGE_SIZE,
    PATCH_LABELS,
    make_synthetic_dataset,
    patch_label_batches,
)
from .training import (
    PROMPT_ORDERS,
    TRAINING_STAGES,
    SparseMoEVLMTrainer,
    VLMDataCollator,
    apply_lora,
    apply_training_stage,
    assign_prompt_orders,
    evaluate_answers,
    plot_expert_load,
    preset_config,
    pretrain_vision_tower,
    stage_zero_accelerator,
)


DEFAULT_VISION_PRETRAINING_STEPS = 300
MAIN_JOB_QUESTION_MIX = "colour,shape,count,position,position,caption"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A SparseMoE-VLM checkpoint folder (model + processor) to fine-tune. "
                                        "Without it a model is built from --preset and a tokenizer is trained."})
    preset: str = field(default="tiny-resnet", metadata={"help": "Model preset used when no checkpoint is given."})
    router_type: str | None = field(default=None, metadata={"help": "Override the preset's router: topk, top_p, relu."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Override settings of the preset's decoder (its text_config) for a model built from scratch, as "
                "comma-separated key=value pairs (Transformers' `PretrainedConfig.update_from_string` format, as in "
                "its run_clm.py example), e.g. `num_key_value_heads=4` or "
                "`num_attention_heads=8,num_key_value_heads=8,head_dim=32`."})
    prefix_attention: bool | None = field(default=None, metadata={
        "help": "Override the preset (or the checkpoint's config): the prompt, image and question, attends "
                "bidirectionally (prefix-LM, as PaliGemma), so image tokens see the question whichever comes first; "
                "answers stay causal."})
    dense_baseline: bool = field(
        default=False, metadata={"help": "Replace every sparse layer of the preset by a dense MLP with the same "
                                         "number of active parameters (for side-by-side comparisons)."})
    training_stage: str = field(default="full", metadata={"help": f"What trains: one of {TRAINING_STAGES}."})
    vision_pretraining_steps: int | None = field(default=None, metadata={
        "help": "Stage 0: steps of vision tower pretraining on the synthetic set's per-patch shape/colour labels "
                "(batch of --per_device_train_batch_size, --learning_rate) before the VLM trains. Default: "
                f"{DEFAULT_VISION_PRETRAINING_STEPS} when a preset model is trained from scratch on the synthetic set, "
                "else 0."})
    vision_pretraining_offsets: bool = field(default=True, metadata={
        "help": "Stage 0 also teaches each image token where its object's centre is, relative to the token's cell "
                "(a regression head beside the per-patch classes), so tokens carry positions finer than the grid."})
    freeze_vision_tower: bool | None = field(default=None, metadata={
        "help": "Freeze the vision tower. Default: frozen after stage-0 pretraining (as LLaVA keeps its pretrained "
                "encoder frozen), trained otherwise."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains the weights themselves. With LoRA (needs "
                                                     "`peft`) only the adapters train; the saved model is merged and "
                                                     "the adapter is saved in <output_dir>/adapter."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_targets: str = field(default="attention,experts", metadata={
        "help": "Comma-separated LoRA targets: attention (decoder q/k/v/o), experts (fused expert tensors), "
                "dense_mlp (dense decoder MLPs)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start a new run in an --output_dir that holds checkpoints of an earlier run, deleting them first "
                "(without it such a folder is refused: resume that run with --resume_from_checkpoint last, or pick "
                "another folder)."})


@dataclass
class DataArguments:
    dataset: str = field(default="synthetic", metadata={
        "help": "`synthetic` (the embedded shapes set), a `save_to_disk` folder, an imagefolder directory with "
                "metadata.jsonl, or a .json/.jsonl file of rows with an image path (LLaVA conversations too)."})
    dataset_hub_id: str | None = field(default=None, metadata={
        "help": "Hub id(s) of the training data, comma-separated (e.g. `liuhaotian/LLaVA-Instruct-150K`): the model "
                "card's `datasets` metadata and the dataset its results are reported on. Local paths never go into "
                "the card (it names a local dataset by its folder or file name)."})
    image_column: str = field(default="image", metadata={"help": "Image column (or image path field)."})
    question_column: str = field(default="question", metadata={"help": "Question / prompt column."})
    answer_column: str = field(default="answer", metadata={"help": "Answer / target column."})
    num_train_examples: int = field(default=32000, metadata={"help": "Synthetic training examples."})
    num_validation_examples: int = field(default=200, metadata={"help": "Synthetic validation examples."})
    num_test_examples: int = field(default=300, metadata={"help": "Synthetic test examples."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic data."})
    image_size: int = field(default=48, metadata={"help": "Side of the synthetic images (pixels)."})
    question_types: str = field(default=MAIN_JOB_QUESTION_MIX, metadata={
        "help": f"Comma-separated synthetic question types (of {', '.join(ALL_QUESTION_TYPES)}); a type listed "
                "twice is asked twice as often. The default asks relative position twice as often as the others: it "
                "is the one question that needs two objects found and compared."})
    num_single_shape_first: int = field(default=0, metadata={
        "help": "Synthetic curriculum: this many single-shape examples come first and the run keeps the data's "
                "order (train_sampling_strategy=sequential); 0 = off."})
    prompt_order: str = field(default="random", metadata={
        "help": "Where the image goes in the user turn: `random` (per example, so the model answers in either "
                "order), `image_first` (`<image> question`, LLaVA's order) or `question_first` (`question <image>`: "
                "image tokens attend to the question). Conversation rows keep their own order unless `random`."})
    image_after_question: bool | None = field(default=None, metadata={
        "help": "Deprecated: use --prompt_order (true = question_first, false = image_first)."})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "Validation data in any form --dataset takes (instead of the source's own validation split, or rows "
                "carved from its training rows)."})
    test_dataset: str | None = field(default=None, metadata={
        "help": "Test data in any form --dataset takes (instead of the source's own test split, or rows carved from "
                "its training rows). The test figures of all_results.json and the model card come from it."})
    max_new_tokens: int = field(default=24, metadata={"help": "Generation length for evaluation and answers."})
    num_demo_answers: int = field(default=5, metadata={"help": "Test questions answered and printed at the end."})


TRAIN_DEFAULTS = {
    "output_dir": "runs/sparsemoe-vlm-tiny",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 100,
    "weight_decay": 0.0,
    "num_train_epochs": 5,  # with max_steps -1 (Transformers' default) the epochs count: 5 x 1,000 steps
    "logging_steps": 50,
    "eval_strategy": "no",
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "report_to": "none",
    "remove_unused_columns": False,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
    "seed": 0,
}


def parse_train_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog="sparsemoe-vlm train")
    parser.set_defaults(**TRAIN_DEFAULTS)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # Checked before any data is made or any step runs (these otherwise fail deep inside a library, or late).
    for flag, value, least in (("--gradient_accumulation_steps", training_args.gradient_accumulation_steps, 1),
                               ("--per_device_train_batch_size", training_args.per_device_train_batch_size, 1),
                               ("--per_device_eval_batch_size", training_args.per_device_eval_batch_size, 1),
                               ("--num_validation_examples", data_args.num_validation_examples, 0),
                               ("--num_test_examples", data_args.num_test_examples, 0)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}.")
    if model_args.config_overrides:
        if model_args.model_name_or_path:
            raise ValueError("--config_overrides shapes a preset model built from scratch; a checkpoint's weights "
                             "fix its own config. Leave it out with --model_name_or_path.")
        preset_config(model_args.preset, **parse_config_overrides(model_args.preset, model_args.config_overrides))
    if data_args.dataset == "synthetic":
        if data_args.num_train_examples < 1:
            raise ValueError(f"--num_train_examples must be >= 1 to train on the synthetic set, got "
                             f"{data_args.num_train_examples}. To score a saved model use `sparsemoe-vlm evaluate`.")
        if data_args.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"--image_size must be >= {MIN_IMAGE_SIZE} (three separate shapes per image), got "
                             f"{data_args.image_size}.")
    return model_args, data_args, training_args


def resolve_prompt_order(data_args: DataArguments) -> str:
    """The prompt order a run trains with; the deprecated `--image_after_question` still chooses a fixed one."""
    if data_args.image_after_question is not None:
        data_args.prompt_order = "question_first" if data_args.image_after_question else "image_first"
        data_args.image_after_question = None
    if data_args.prompt_order not in PROMPT_ORDERS:
        raise ValueError(f"--prompt_order {data_args.prompt_order!r}: expected one of {PROMPT_ORDERS}.")
    return data_args.prompt_order


def load_data(data_args: DataArguments, seed: int, caption_column: str | None = None,
              check_splits: tuple[str, ...] = ("train", "validation", "test")):
    """The train / validation / test splits `data_args` names, and where each comes from (one line per split). With
    `caption_column`, rows need an image and a caption (retrieval), not a question and an answer. The images of
    `check_splits` (data on disk) are opened first: a missing or unreadable one raises a `ValueError` naming it."""
    if data_args.dataset == "synthetic":
        if data_args.eval_dataset or data_args.test_dataset:
            raise ValueError("--eval_dataset / --test_dataset take data on disk; the synthetic set generates its own "
                             "held-out splits (--num_validation_examples, --num_test_examples, --synthetic_seed).")
        question_types = tuple(t.strip() for t in data_args.question_types.split(",") if t.strip())
        dataset = make_synthetic_dataset(data_args.num_train_examples, data_args.num_validation_examples,
                                         data_args.num_test_examples, seed=data_args.synthetic_seed,
                                         image_size=data_args.image_size, question_types=question_types,
                                         num_single_shape_first=data_args.num_single_shape_first)
        seed_note = f"synthetic shapes, seed {data_args.synthetic_seed}"
        origins = {"train": f"generated ({seed_note})",
                   "validation": f"generated held-out examples ({seed_note}; drawn apart from the training examples)",
                   "test": f"generated held-out examples ({seed_note}; drawn apart from the training examples)"}
        return dataset, origins
    dataset, origins = load_vlm_splits(data_args.dataset, data_args.image_column, data_args.question_column,
                                       data_args.answer_column, seed=seed, validation_source=data_args.eval_dataset,
                                       test_source=data_args.test_dataset, caption_column=caption_column)
    # Every image is opened (not decoded) now, before any step: a missing or unreadable file, or a URL offline, is
    # named here rather than after training steps ran.
    check_images(dataset, origins, splits=check_splits)
    return dataset, origins


def _print_splits(dataset, origins: dict[str, str]) -> None:
    for split in ("train", "validation", "test"):
        print(f"data: {split} {len(dataset[split]):,} rows, {origins[split]}", flush=True)


def require_sparsemoe_checkpoint(path: str | Path, flag: str) -> None:
    """Refuse a checkpoint of another architecture (e.g. a Llama or LLaVA folder) with the conversion scripts to use;
    a folder or id that cannot be read is left to `from_pretrained` to report."""
    try:
        config, _ = SparseMoEVLMConfig.get_config_dict(str(path))
    except Exception:
        return
    model_type = config.get("model_type")
    if model_type != SparseMoEVLMConfig.model_type:
        kind = f"a `{model_type}` checkpoint" if model_type else "a checkpoint whose config.json names no model_type"
        raise ValueError(
            f"{flag} {path} is {kind}, not a SparseMoE-VLM checkpoint (model_type {SparseMoEVLMConfig.model_type!r}). "
            "Convert it first with a script of conversion/ (see conversion/README.md): conversion/upcycle_llava.py "
            "for a LLaVA model, conversion/compose.py for a vision encoder and a Llama-family language model, "
            "conversion/convert_moe_llava.py for MoE-LLaVA weights; then pass the converted folder.")


def parse_config_overrides(preset: str, overrides: str) -> dict:
    """`--config_overrides` ("key=value,key=value") as decoder settings, each value typed like the preset's own."""
    text_config = preset_config(preset).text_config
    try:
        text_config.update_from_string(overrides)
        keys = [pair.split("=", 1)[0] for pair in overrides.split(",")]
    except (ValueError, TypeError) as error:
        raise ValueError(f"--config_overrides {overrides!r}: {error}. Give comma-separated key=value settings of the "
                         "decoder config (SparseMoEVLMTextConfig), e.g. num_key_value_heads=4.") from None
    return {key: getattr(text_config, key) for key in keys}


def _has_processor(folder: Path | None) -> bool:
    return folder is not None and (folder / "processor_config.json").is_file() and (folder / "tokenizer.json").is_file()


def _build_model_and_processor(model_args: ModelArguments, train_split, checkpoint: Path | None = None):
    """Load a checkpoint, or build the preset (optionally as its dense baseline) with a tokenizer trained on the
    training texts. A resumed run (`checkpoint`) takes the checkpoint's processor (its token ids are the ones the
    weights were trained on, whatever the data now) and, for a preset model, its config."""
    if model_args.model_name_or_path:
        require_sparsemoe_checkpoint(model_args.model_name_or_path, "--model_name_or_path")
        source = checkpoint if _has_processor(checkpoint) else model_args.model_name_or_path
        model = SparseMoEVLMForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
        if model_args.prefix_attention is not None:
            model.config.text_config.prefix_attention = model_args.prefix_attention
        return model, SparseMoEVLMProcessor.from_pretrained(source)
    processor = SparseMoEVLMProcessor.from_pretrained(checkpoint) if _has_processor(checkpoint) else None
    if processor is not None and (checkpoint / "config.json").is_file():  # LoRA checkpoints hold the adapter only
        return SparseMoEVLMForConditionalGeneration(SparseMoEVLMConfig.from_pretrained(checkpoint)), processor
    if checkpoint is not None and processor is None:
        print(f"warning: {checkpoint} has no processor (processor_config.json, tokenizer.json); the tokenizer is "
              "trained again from the training texts, which gives the token ids the checkpoint was trained with only "
              "if those texts did not change.", file=sys.stderr, flush=True)
    overrides = {"router_type": model_args.router_type} if model_args.router_type else {}
    if model_args.prefix_attention is not None:
        overrides["prefix_attention"] = model_args.prefix_attention
    if model_args.config_overrides:
        overrides.update(parse_config_overrides(model_args.preset, model_args.config_overrides))
    config = preset_config(model_args.preset, **overrides)
    if model_args.dense_baseline:
        # Same active parameters per token: each sparse layer becomes one MLP as wide as the experts a token uses
        # (top-k routed + shared).
        text = config.text_config
        active_width = (text.num_experts_per_tok + text.num_shared_experts) * text.moe_intermediate_size
        if "dense" in text.mlp_layer_types and text.intermediate_size != active_width:
            raise ValueError(f"--dense_baseline needs the preset's dense layers to be as wide as a sparse layer's "
                             f"active experts ({active_width}); got intermediate_size={text.intermediate_size}.")
        config = preset_config(model_args.preset, **overrides, intermediate_size=active_width,
                               mlp_layer_types=["dense"] * text.num_hidden_layers)
    if processor is None:
        texts = [text for column in ("question", "answer", "caption") if column in train_split.column_names
                 for text in train_split[column]]
        if "messages" in train_split.column_names:
            texts += [item["text"] for messages in train_split["messages"] for m in messages
                      for item in m["content"] if item["type"] == "text" and item.get("text")]
        processor = build_processor(config, texts)
    return SparseMoEVLMForConditionalGeneration(config), processor


def _print_demo_answers(collator, rows, answers: dict[str, list[str]], count: int) -> None:
    print("\nTest questions:")
    for i in range(min(count, len(rows))):
        row = rows[i]
        question = row["question"] if row.get("question") else \
            collator.conversation(row, with_answer=False)[-1]["content"][-1].get("text", "")
        given = "   ".join(f"{order}: {order_answers[i]}" for order, order_answers in answers.items())
        print(f"  Q: {question}\n  A: {given}   (reference: {collator.reference(row)})")


def _vision_pretraining(model, processor, model_args: ModelArguments, data_args: DataArguments,
                        training_args: TrainingArguments, resuming: bool) -> None:
    """Resolve the stage-0 defaults and run it. A resumed run skips it: its tower comes from the checkpoint."""
    steps = model_args.vision_pretraining_steps
    if steps is None:
        steps = DEFAULT_VISION_PRETRAINING_STEPS if (
            data_args.dataset == "synthetic" and not model_args.model_name_or_path) else 0
    if steps < 0:
        raise ValueError(f"--vision_pretraining_steps must be >= 0, got {steps}.")
    if steps and data_args.dataset != "synthetic":
        raise ValueError("--vision_pretraining_steps needs per-patch labels, which only the synthetic set provides; "
                         f"set it to 0 with --dataset {data_args.dataset}.")
    if steps and not resuming and (training_args.deepspeed_plugin is not None
                                   or parse_flag_from_env("ACCELERATE_USE_FSDP")):
        # Accelerate would shard the stage-0 module (the model's own tower) in place, under the Trainer's plan.
        raise ValueError(f"--vision_pretraining_steps {steps}: stage 0 trains the vision tower with plain data "
                         "parallelism, which a DeepSpeed or `accelerate launch --use_fsdp` run does not give. "
                         "Pretrain it in a run without them (or with the Trainer's --fsdp), then fine-tune that model "
                         "with --model_name_or_path, or set --vision_pretraining_steps 0.")
    model_args.vision_pretraining_steps = steps
    if model_args.freeze_vision_tower is None:
        model_args.freeze_vision_tower = steps > 0
    if steps and not resuming:
        grid_size = math.isqrt(model.config.image_seq_length)
        if grid_size ** 2 != model.config.image_seq_length:
            raise ValueError(f"Vision pretraining labels a square grid of image tokens; this tower gives "
                             f"{model.config.image_seq_length} tokens. Set --vision_pretraining_steps 0.")
        batches = patch_label_batches(steps, training_args.per_device_train_batch_size, grid_size,
                                      seed=training_args.seed + 1, image_size=data_args.image_size,
                                      with_offsets=model_args.vision_pretraining_offsets)
        # Stage 0 runs on the Trainer's device, process group and precision (`--bf16` / `--fp16`).
        with stage_zero_accelerator(training_args.mixed_precision, cpu=training_args.use_cpu) as accelerator:
            losses = pretrain_vision_tower(model, processor.image_processor, batches, len(PATCH_LABELS),
                                           learning_rate=training_args.learning_rate, accelerator=accelerator)
        print(f"vision pretraining: {steps} steps, patch loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)


def _resume_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: `last` (or `true`) is the newest complete checkpoint of this
    run in `output_dir` (incomplete ones and those of another run are passed over, with a warning); a folder must
    be a complete checkpoint. Refused with the reason, naming the file, before any work."""
    if resume is None:
        return None
    if resume.lower() in ("last", "true"):
        checkpoint, skipped = find_last_checkpoint(output_dir)
        for line in skipped:
            print(f"warning: --resume_from_checkpoint {resume} passes over {line}", file=sys.stderr, flush=True)
        if checkpoint is None:
            reasons = f" that can be resumed ({'; '.join(skipped)})" if skipped else ""
            raise ValueError(f"--resume_from_checkpoint {resume}: no checkpoint in {output_dir}{reasons}. Start a "
                             f"new run without --resume_from_checkpoint (with --overwrite_output_dir to clear the "
                             f"folder's checkpoints), or give a checkpoint folder.")
        print(f"resuming from {checkpoint}", flush=True)
        return checkpoint
    checkpoint = Path(resume)
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ValueError(f"Cannot resume from {checkpoint}: {problem}. Resume from an earlier checkpoint, or with "
                         f"--resume_from_checkpoint last, which passes over incomplete checkpoints.")
    return checkpoint


def _check_output_dir(output_dir: Path, fresh: bool, overwrite: bool, main_process: bool = True) -> None:
    """Refuse an output folder that cannot be written, and (for a new run) one holding checkpoints of an earlier
    run: `--resume_from_checkpoint last` could pick them up, and the Trainer's rotation by step number would delete
    this run's lower-numbered checkpoints first. `--overwrite_output_dir` deletes them."""
    earlier = checkpoints(output_dir) if fresh else []
    if earlier and not overwrite:
        names = ", ".join(path.name for path in earlier[:4]) + (" ..." if len(earlier) > 4 else "")
        raise ValueError(f"--output_dir {output_dir} holds checkpoints of an earlier run ({names}). Continue that run "
                         f"with --resume_from_checkpoint last, train into another --output_dir, or pass "
                         f"--overwrite_output_dir true to delete them and start anew.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir, prefix=".write-test-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
    except OSError as error:
        raise ValueError(f"--output_dir {output_dir} cannot be written ({error.strerror or error}); nothing was "
                         f"trained. Choose a writable folder, or fix its permissions or free space.") from None
    if main_process:
        for path in earlier:
            shutil.rmtree(path)
            print(f"--overwrite_output_dir: deleted {path}", flush=True)


def _check_free_space(model, output_dir: Path, training_args: TrainingArguments) -> None:
    """Refuse to start when the output folder's disk cannot hold one checkpoint (weights, plus Adam's two moments
    unless --save_only_model) and the final model."""
    if training_args.save_strategy == "no":
        needed = 0
    else:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        needed = weights + (0 if training_args.save_only_model else 2 * trainable)
    needed += sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise ValueError(f"--output_dir {output_dir}: {free / 2**20:,.0f} MiB free on its disk, but a checkpoint and "
                         f"the final model need about {needed / 2**20:,.0f} MiB; nothing was trained. Free space or "
                         f"choose another folder.")


def _save_after_failure(trainer, error: BaseException) -> None:
    """After a fault in the middle of training, save what was trained as a checkpoint (if steps ran since the last
    one) and say how to continue; the original error is raised again by the caller."""
    state = trainer.state
    step = state.global_step
    last = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if step == 0 or trainer.args.world_size > 1 or not trainer.is_world_process_zero():
        # (several processes: the others may be waiting in a collective; their checkpoints stay as written)
        print(f"error: training stopped at step {step} ({reason}).", file=sys.stderr, flush=True)
        return
    if checkpoint_problem(last) is None:
        saved = f"the checkpoint of step {step}, {last}, is complete"
    else:
        try:
            trainer._save_checkpoint(trainer.model, trial=None)
            problem = checkpoint_problem(last)
            saved = f"saved what was trained to {last}" if problem is None else f"could not save step {step} ({problem})"
        except Exception as save_error:  # e.g. the disk that stopped training is full
            traceback.print_exc()
            saved = f"could not save step {step} ({type(save_error).__name__}: {save_error})"
    print(f"error: training stopped at step {step} ({reason}); {saved}. Fix the cause, then continue with "
          f"--resume_from_checkpoint last (it resumes the newest complete checkpoint).", file=sys.stderr, flush=True)


def train(argv: list[str]) -> dict[str, float]:
    """Run `sparsemoe-vlm train`; returns the final metrics."""
    model_args, data_args, training_args = parse_train_args(argv)
    hub_dataset_ids(data_args.dataset_hub_id)  # a bad id is an error now, not after training
    set_seed(training_args.seed)
    started = time.time()
    output_dir = Path(training_args.output_dir)

    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise ValueError("Nothing to train: --max_steps and --num_train_epochs are both 0. To score a saved model use "
                         "`sparsemoe-vlm evaluate MODEL_DIR`.")
    resolve_prompt_order(data_args)
    if model_args.model_name_or_path:
        require_sparsemoe_checkpoint(model_args.model_name_or_path, "--model_name_or_path")
    # The output folder and the checkpoint to resume are checked before any data is read or any step runs.
    checkpoint = _resume_checkpoint(training_args.resume_from_checkpoint, output_dir)
    _check_output_dir(output_dir, fresh=checkpoint is None, overwrite=model_args.overwrite_output_dir,
                      main_process=training_args.process_index == 0)
    dataset, origins = load_data(data_args, training_args.seed)
    _print_splits(dataset, origins)
    if model_args.lora_r > 0 and (model_args.training_stage != "full" or model_args.freeze_vision_tower):
        raise ValueError("--lora_r trains only the LoRA adapters (everything else is frozen); leave "
                         "--training_stage at full and --freeze_vision_tower off with LoRA.")
    model, processor = _build_model_and_processor(model_args, dataset["train"], checkpoint)
    _vision_pretraining(model, processor, model_args, data_args, training_args, resuming=checkpoint is not None)
    counts = apply_training_stage(model, model_args.training_stage, model_args.freeze_vision_tower)
    if model_args.lora_r > 0:
        model = apply_lora(model, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                           tuple(t.strip() for t in model_args.lora_targets.split(",") if t.strip()))
        counts["trainable"] = model.num_parameters(only_trainable=True)
    print(f"model: {counts['total']:,} parameters, {counts['trainable']:,} trainable "
          f"(stage {model_args.training_stage}); router {model.config.text_config.router_type}", flush=True)
    _check_free_space(model, output_dir, training_args)

    if data_args.num_single_shape_first > 0:
        if data_args.dataset != "synthetic":
            raise ValueError("--num_single_shape_first is a curriculum of the synthetic data; set it to 0 with "
                             f"--dataset {data_args.dataset}.")
        training_args.train_sampling_strategy = "sequential"  # the curriculum is the data's order
    collator = VLMDataCollator(processor, prompt_order=data_args.prompt_order, seed=training_args.seed)
    if data_args.prompt_order == "random":
        dataset["train"] = assign_prompt_orders(dataset["train"], seed=training_args.seed)
    # A new run records itself in the output folder and each of its checkpoints; a resumed one continues the
    # checkpoint's run (see `find_last_checkpoint`).
    run_id = read_run_id(checkpoint) or read_run_id(output_dir) if checkpoint is not None else None
    if training_args.process_index == 0:
        run_id = write_run_file(output_dir, run_id)
    trainer = SparseMoEVLMTrainer(
        model=model, args=training_args, train_dataset=dataset["train"], eval_dataset=dataset["validation"],
        data_collator=collator, processing_class=processor, generation_collator=collator,
        generation_max_new_tokens=data_args.max_new_tokens, run_id=run_id,
    )
    if checkpoint is not None and not trainer.restore_expert_load(checkpoint):
        print(f"warning: {checkpoint} kept no routing counts (written by an older version): the expert-load plot "
              f"covers steps {trainer.expert_load_first_step} onwards only.", file=sys.stderr, flush=True)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    except BaseException as error:
        _save_after_failure(trainer, error)
        raise

    metrics = {}
    if len(dataset["validation"]):
        metrics.update({f"validation_{k.removeprefix('eval_')}": v for k, v in trainer.evaluate().items()})
    test = dataset["test"]
    test_metrics, answers = evaluate_answers(model, collator, test, batch_size=training_args.per_device_eval_batch_size,
                                             max_new_tokens=data_args.max_new_tokens)
    metrics.update(test_metrics)
    metrics["test_source"] = origins["test"]
    metrics["train_minutes"] = round((time.time() - started) / 60, 2)

    if trainer.is_world_process_zero():
        saved = ["model", "processor", "model card (README.md)", f"results ({RESULTS_FILE})"]
        if model_args.lora_r > 0:
            trainer.model.save_pretrained(output_dir / "adapter")
            model = trainer.model.merge_and_unload()  # a plain checkpoint for from_pretrained / pipeline / push
            model.save_pretrained(output_dir)
        else:
            trainer.save_model(str(output_dir))
        processor.save_pretrained(output_dir)
        if trainer.expert_load:
            # The counts of a resumed run continue those kept in its checkpoint: the plot covers the whole run, unless
            # that checkpoint kept none.
            first, last = trainer.expert_load_first_step, trainer.state.global_step
            plot_expert_load(trainer.expert_load, output_dir / "expert_load.png",
                             [f"layer {i}" for i in model.config.text_config.sparse_layer_indices],
                             note=f"steps {first}-{last} of {last} only" if first > 1 else None)
            saved.append("routing plot (expert_load.png)")
        # What the model card (and `evaluate`) read back: the results, the log history (routing statistics) in the
        # Trainer's state, the Trainer's arguments as Transformers serialises them and the script's own arguments
        # with the process count (a property of the launch, not an argument).
        trainer.save_metrics("all", metrics, combined=False)
        trainer.save_state()
        (output_dir / TRAINING_ARGS_FILE).write_text(training_args.to_json_string())
        (output_dir / RUN_ARGS_FILE).write_text(json.dumps(
            {"model": asdict(model_args), "data": asdict(data_args), "world_size": training_args.world_size,
             "expert_load_steps": [trainer.expert_load_first_step, trainer.state.global_step]}, indent=2))
        write_model_card(model, output_dir, model_id=training_args.hub_model_id or str(output_dir))
        _print_demo_answers(collator, test, answers, data_args.num_demo_answers)
        print("\nMetrics: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
        print(f"Saved {', '.join(saved)} to {output_dir}")
    return metrics


DEFAULT_PUSH_TIMEOUT = 120.0


@dataclass
class PushArguments:
    folder: str = field(metadata={"help": "A saved SparseMoE-VLM folder (model + processor), e.g. a training run."})
    repo_id: str = field(metadata={"help": "Hub repository, `namespace/name`."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing); default main."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    commit_message: str = field(default="Upload SparseMoE-VLM model, processor and model card")
    include_plot: bool = field(default=True, metadata={"help": "Upload the folder's expert_load.png with the card."})
    datasets: str | None = field(default=None, metadata={
        "help": "Hub dataset id(s), comma-separated, for the card's `datasets` metadata (default: the ones the "
                "folder's card or training run names)."})
    keep_card: bool = field(default=False, metadata={
        "help": "Upload the folder's README.md unchanged instead of regenerating the card for `repo_id`."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in token / HF_TOKEN)."})
    timeout: float = field(default=DEFAULT_PUSH_TIMEOUT, metadata={
        "help": "Seconds to wait for the Hub on any one network operation (connecting, sending a piece of a file, "
                "awaiting an answer) before the push fails; the Hub client alone would wait forever."})


@contextmanager
def _hub_timeout(seconds: float):
    """Every request huggingface_hub makes inside gives up after `seconds` without progress (its shared HTTP client
    has no timeout of its own). The client factory in use (a user's, for proxies) is kept and restored after."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def bounded():
        client = previous()
        client.timeout = httpx2.Timeout(seconds)
        return client

    set_client_factory(bounded)  # closes the current client: the next request makes a bounded one
    try:
        yield
    finally:
        set_client_factory(previous)


def push(argv: list[str]) -> str:
    """Run `sparsemoe-vlm push`: load the folder (refusing to upload one that does not load or whose processor does
    not match the model), stage model + processor + model card (+ routing plot), have the Hub validate the card's
    metadata and upload them in one commit.
    Returns the commit URL."""
    # `push <folder> <repo_id>`: the two positionals become --folder / --repo_id.
    argv, positional = list(argv), []
    while argv and not argv[0].startswith("-") and len(positional) < 2:
        positional.append(argv.pop(0))
    flags = ("--folder", "--repo_id")[:len(positional)]
    argv = [token for flag, value in zip(flags, positional, strict=True) for token in (flag, value)] + argv
    parser = HfArgumentParser(PushArguments, prog="sparsemoe-vlm push <folder> <repo_id>")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    folder = Path(args.folder)
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        raise SystemExit(f"Refusing to push to {args.repo_id!r}: {error} Use `namespace/name` or `name`.") from None
    try:
        datasets = hub_dataset_ids(args.datasets, "--datasets")
    except ValueError as error:
        raise SystemExit(f"Refusing to push: {error}") from None
    if args.revision is not None and not _valid_branch_name(args.revision):
        raise SystemExit(f"Refusing to push to the branch {args.revision!r}: not a valid git branch name (no spaces, "
                         "'..', '~', '^', ':', '?', '*', '[', '\\', '@{', no leading '-' or '/', no trailing '/', "
                         "'.' or '.lock'). Name the branch e.g. `v1` or `experiments/moe-4e`.")
    if not (folder / "config.json").is_file():
        raise SystemExit(f"Refusing to upload {folder}: no config.json there. Pass a folder written by "
                         f"`save_pretrained` or `sparsemoe-vlm train`.")
    try:
        require_sparsemoe_checkpoint(folder, "The folder")
    except ValueError as error:
        raise SystemExit(f"Refusing to upload: {error}") from None
    try:
        model, loading = SparseMoEVLMForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
        processor = SparseMoEVLMProcessor.from_pretrained(folder)
    except Exception as error:  # anything that stops a user from loading it stops the upload
        raise SystemExit(f"Refusing to upload {folder}: it does not load ({type(error).__name__}: {error}). "
                         f"Fix or re-save the checkpoint, then push again.") from None
    # Missing weights load as fresh random ones with only a warning: uploading them would publish a broken model.
    problems = {name: sorted(map(str, loading.get(name) or ())) for name in ("missing_keys", "mismatched_keys",
                                                                             "unexpected_keys")}
    if any(problems.values()):
        listed = "; ".join(f"{name.replace('_', ' ')}: {keys[:4]}" + (" ..." if len(keys) > 4 else "")
                           for name, keys in problems.items() if keys)
        raise SystemExit(f"Refusing to upload {folder}: its weights do not match its config ({listed}). The "
                         f"checkpoint is incomplete or from another model; re-save it, then push again.")
    config = model.config
    if processor.image_token_id != config.image_token_id or processor.image_seq_length != config.image_seq_length:
        raise SystemExit(
            f"Refusing to upload {folder}: the processor does not match the model (image token id "
            f"{processor.image_token_id} vs {config.image_token_id}, image tokens {processor.image_seq_length} vs "
            f"{config.image_seq_length}). Save the processor built for this model (`build_processor`).")

    if not args.timeout > 0:
        raise SystemExit(f"--timeout must be > 0 seconds, got {args.timeout}.")
    api = HfApi(token=args.token)
    with tempfile.TemporaryDirectory(prefix="sparsemoe-vlm-push-") as stage, _hub_timeout(args.timeout):
        stage = Path(stage)
        model.save_pretrained(stage)  # weights, config, generation config, modeling code for trust_remote_code
        processor.save_pretrained(stage)
        if args.keep_card and (folder / "README.md").is_file():
            shutil.copy(folder / "README.md", stage / "README.md")
        else:
            previous = ModelCard.load(folder / "README.md").data if (folder / "README.md").is_file() else None
            write_model_card(model, stage, model_id=args.repo_id, run_dir=folder,
                             base_model=getattr(previous, "base_model", None),
                             datasets=datasets or getattr(previous, "datasets", None),
                             license=getattr(previous, "license", None) or "apache-2.0")
        if args.include_plot and (folder / "expert_load.png").is_file():
            shutil.copy(folder / "expert_load.png", stage / "expert_load.png")
        elif not args.include_plot:  # the card would link a missing picture
            card = (stage / "README.md").read_text()
            (stage / "README.md").write_text("\n".join(line for line in card.splitlines()
                                                        if "(expert_load.png)" not in line) + "\n")
        step = "validate the model card's metadata"
        try:
            ModelCard.load(stage / "README.md").validate()  # the Hub's own metadata checks, before anything is sent
            step = "create the repository"
            api.create_repo(args.repo_id, private=args.private, exist_ok=True)
            if args.revision and args.revision != "main":
                step = f"create the branch {args.revision!r}"
                api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
            step = "upload the files"
            commit = api.upload_folder(repo_id=args.repo_id, folder_path=stage, revision=args.revision,
                                       commit_message=args.commit_message)
        except Exception as error:  # HTTP errors (401, 403, 404, ...) and unreachable endpoints alike
            if _is_timeout(error):
                # The commit may have been made with its answer lost: all of the files landed, or none did.
                where = f"{constants.ENDPOINT}/{args.repo_id}/commits/{args.revision or 'main'}"
                raise SystemExit(
                    f"Push of {folder} to {args.repo_id} timed out: the Hub did not answer for {args.timeout:g} s "
                    f"while trying to {step} ({type(error).__name__}). The upload is one commit, so either all of "
                    f"the folder's files landed or none did: check {where}, then run the same push again (files "
                    f"already there are not sent twice); on a slow connection raise --timeout.") from None
            # upload_folder is one commit: a failure before it returns leaves none of the folder's files on the Hub
            # (the repository or branch may already have been created).
            raise SystemExit(
                f"Push of {folder} to {args.repo_id} failed while trying to {step}; none of its files were uploaded "
                f"({type(error).__name__}: {error}). Check the token (`hf auth login`, HF_TOKEN or --token), that it "
                f"may write to this namespace, and the endpoint ({constants.ENDPOINT}).") from None
    print(f"Pushed {folder} to {args.repo_id} ({args.revision or 'main'}): {commit.commit_url}")
    return commit.commit_url


def _is_timeout(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a network timeout."""
    import httpx2

    for _ in range(20):  # the chain of causes, bounded
        if error is None:
            return False
        if isinstance(error, httpx2.TimeoutException | TimeoutError):
            return True
        error = error.__cause__ or error.__context__
    return False


def _valid_branch_name(name: str) -> bool:
    """Whether `name` is a branch name git (and the Hub) accepts (`git check-ref-format --branch` rules)."""
    forbidden = (" ", "..", "~", "^", ":", "?", "*", "[", "\\", "@{", "//", "\t", "\n")
    return (bool(name) and not any(part in name for part in forbidden) and name != "@"
            and not name.startswith(("-", "/", ".")) and not name.endswith(("/", ".", ".lock"))
            and all(not part.startswith(".") and not part.endswith(".lock") for part in name.split("/"))
            and all(ord(c) >= 32 and c != "\x7f" for c in name))


@dataclass
class EvaluateArguments:
    model_dir: str = field(metadata={"help": "A SparseMoE-VLM folder (model + processor), e.g. a training run."})
    split: str = field(default="test", metadata={"help": "The split to score: test, validation or train."})
    prompt_orders: str = field(default="both", metadata={
        "help": "Ask each question with the image first, the question first, or `both` (each scored on its own "
                "and pooled)."})
    batch_size: int = field(default=64, metadata={
        "help": "Questions generated (or candidate texts scored) per batch."})
    task: str = field(default="vqa", metadata={
        "help": "`vqa`: answer the split's questions (exact match, caption BLEU / ROUGE). `retrieval`: rank the "
                "split's distinct captions for each image and the images for each caption by the likelihood of the "
                "caption as the answer to --retrieval_prompt (recall@1/5/10, mean rank, both directions, with chance "
                "levels)."})
    caption_column: str = field(default="caption", metadata={"help": "Caption column for --task retrieval."})
    retrieval_prompt: str = field(default=DEFAULT_RETRIEVAL_PROMPT, metadata={
        "help": "The captioning question each caption answers in --task retrieval."})
    retrieval_alpha: float = field(default=0.0, metadata={
        "help": "Weight of the text prior divided out in --task retrieval: log P(t|i) - alpha log P(t), in [0, 1]."})
    metrics_file: str | None = field(default=None, metadata={
        "help": "Where the metrics JSON goes (default: MODEL_DIR/eval_<split>_results.json)."})
    update_card: bool = field(default=False, metadata={
        "help": "Put the figures into the run's results (MODEL_DIR/all_results.json, or metrics.json in folders "
                "written before it) and regenerate MODEL_DIR/README.md (the model card) with them."})
    model_id: str | None = field(default=None, metadata={
        "help": "The id the regenerated card's usage snippets load (default: MODEL_DIR as given)."})


EVALUATION_ORDERS = {"both": (True, False), "image_first": (True,), "question_first": (False,)}
EVALUATION_TASKS = ("vqa", "retrieval")


def _evaluate_retrieval(model, processor, rows, eval_args: EvaluateArguments, prefix: str) -> dict:
    """Retrieval figures of `rows` (images and their captions): every image against every distinct caption."""
    captions = rows["caption"]
    texts = sorted(set(captions))
    print(f"retrieval: {len(rows):,} images x {len(texts):,} distinct captions (alpha {eval_args.retrieval_alpha})",
          flush=True)
    scores = score_image_texts(model, processor, rows["image"], texts, prompt=eval_args.retrieval_prompt,
                               alpha=eval_args.retrieval_alpha, batch_size=eval_args.batch_size, progress=True)
    metrics = {f"{prefix}_{key}": value for key, value in retrieval_metrics(scores, captions, texts).items()}
    metrics[f"{prefix}_retrieval_alpha"] = eval_args.retrieval_alpha
    metrics[f"{prefix}_retrieval_prompt"] = eval_args.retrieval_prompt
    return metrics


def _write_json_atomically(path: Path, value) -> None:
    """Write next to the target, then rename: an interrupted write never leaves a truncated file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2))
    temporary.replace(path)


def evaluate(argv: list[str]) -> dict[str, float]:
    """Run `sparsemoe-vlm evaluate MODEL_DIR`: score a saved model on a split of any dataset `train` reads (by
    default the data and settings of the run that wrote MODEL_DIR) in one or both prompt orders; write the metrics
    JSON and, with --update_card, the run's metrics and model card. Returns the metrics."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model_dir", argv.pop(0)] + argv
    model_dir = Path(argv[argv.index("--model_dir") + 1]) if "--model_dir" in argv[:-1] else None
    parser = HfArgumentParser((EvaluateArguments, DataArguments), prog="sparsemoe-vlm evaluate MODEL_DIR")
    run_args = read_run_args(model_dir) if model_dir is not None else {}
    run_data = run_args.get("data", {})
    if run_data:
        # The run's own data settings are the defaults: `evaluate runs/x` re-scores the test set x was scored on.
        known = {f.name for f in DataArguments.__dataclass_fields__.values()}
        parser.set_defaults(**{k: v for k, v in run_data.items() if k in known and k != "image_after_question"})
    eval_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    model_dir = Path(eval_args.model_dir)
    if eval_args.split not in ("train", "validation", "test"):
        raise SystemExit(f"--split {eval_args.split!r}: expected test, validation or train.")
    if eval_args.task not in EVALUATION_TASKS:
        raise SystemExit(f"--task {eval_args.task!r}: expected one of {EVALUATION_TASKS}.")
    if eval_args.prompt_orders not in EVALUATION_ORDERS:
        raise SystemExit(f"--prompt_orders {eval_args.prompt_orders!r}: expected one of {sorted(EVALUATION_ORDERS)}.")
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} is not a saved model (no config.json there). Pass the --output_dir of "
                         f"`sparsemoe-vlm train` or a folder written by `save_pretrained`.")
    require_sparsemoe_checkpoint(model_dir, "MODEL_DIR")
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(model_dir)
    processor = SparseMoEVLMProcessor.from_pretrained(model_dir)
    if data_args.dataset == "synthetic" and eval_args.split != "train":
        data_args.num_train_examples, data_args.num_single_shape_first = 0, 0  # generate only what is scored
    # Rows carved from a training file are carved with the run's seed, so its test rows are the ones scored here.
    retrieval = eval_args.task == "retrieval"
    dataset, origins = load_data(data_args, seed=run_args.get("training", {}).get("seed", 0),
                                 caption_column=eval_args.caption_column if retrieval else None,
                                 check_splits=(eval_args.split,))
    rows = dataset[eval_args.split]
    if len(rows) == 0:
        raise SystemExit(f"The {eval_args.split} split of {data_args.dataset} is empty; nothing to score.")
    print(f"data: {eval_args.split} {len(rows):,} rows, {origins[eval_args.split]}", flush=True)
    prefix = eval_args.split
    started = time.time()
    if retrieval:
        metrics = _evaluate_retrieval(model, processor, rows, eval_args, prefix)
    else:
        collator = VLMDataCollator(processor)
        metrics, answers = evaluate_answers(model, collator, rows,
                                            image_first=EVALUATION_ORDERS[eval_args.prompt_orders],
                                            batch_size=eval_args.batch_size, max_new_tokens=data_args.max_new_tokens,
                                            prefix=prefix)
        metrics[f"{prefix}_prompt_orders"] = eval_args.prompt_orders
        _print_demo_answers(collator, rows, answers, data_args.num_demo_answers)
    metrics[f"{prefix}_source"] = origins[eval_args.split]
    metrics["eval_minutes"] = round((time.time() - started) / 60, 2)
    metrics_file = Path(eval_args.metrics_file) if eval_args.metrics_file else \
        model_dir / f"eval_{eval_args.split}{'_retrieval' if retrieval else ''}_results.json"
    _write_json_atomically(metrics_file, metrics)
    print("\nMetrics: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    print(f"Wrote {metrics_file}")
    if eval_args.update_card:
        run_metrics_path = results_path(model_dir)  # updated where the run keeps them, whichever layout
        run_metrics = json.loads(run_metrics_path.read_text()) if run_metrics_path.is_file() else {}
        # The new figures replace the split's figures of the same task; Trainer's loss figures stay.
        replaced = ((f"{prefix}_image_to_text", f"{prefix}_text_to_image", f"{prefix}_retrieval") if retrieval else
                    (f"{prefix}_exact_match", f"{prefix}_caption_", f"{prefix}_source", f"{prefix}_prompt_orders"))
        run_metrics = {k: v for k, v in run_metrics.items() if not k.startswith(replaced)}
        run_metrics.update({k: v for k, v in metrics.items() if k != "eval_minutes"})
        _write_json_atomically(run_metrics_path, run_metrics)
        card = write_model_card(model, model_dir, model_id=eval_args.model_id or str(model_dir))
        print(f"Updated {run_metrics_path} and the model card {card}")
    return metrics


COMMANDS = {"train": train, "evaluate": evaluate, "push": push}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: sparsemoe-vlm {train,evaluate,push} [options]   (sparsemoe-vlm <command> --help for the options)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    COMMANDS[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
