# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Model cards: a Jinja template filled through `huggingface_hub.ModelCard` from a model's config and, when there
is one, the folder of a `sparsemoe-vlm train` run (`all_results.json`, `trainer_state.json`, `training_args.json`,
`run_args.json`, `expert_load.png`; older runs: `metrics.json`, `log_history.json`) or of a conversion script
(`conversion.json`: base model and method). The training and conversion scripts write the card as `README.md` next
to the weights; `sparsemoe-vlm push` regenerates and uploads it."""

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..modeling_sparsemoe_vlm import ROUTER_CLASSES, SparseMoEVLMExpertGroup
from .training import ROUTING_LOG_PREFIX, ROUTING_STATISTICS, routing_log_key


TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
PROJECT_URL = "https://github.com/hf-sparsemoe-vlm/hf_sparsemoe_vlm"
HUB_URL = "https://huggingface.co"
SYNTHETIC_DATASET = ("hf_sparsemoe_vlm/synthetic_shapes", "Synthetic shapes VQA and captions (hf_sparsemoe_vlm)")
DEFAULT_LIMITATIONS = (
    "Trained only on the data listed above; answers outside that domain are not meaningful.",
    "Routing statistics describe the training distribution; other inputs may load the experts differently.",
    "Like every generative model it can produce fluent but wrong answers; check outputs before relying on them.",
)
# A training folder as Transformers writes it: the results by `Trainer.save_metrics("all", ...)`, the log history
# (routing statistics) inside `Trainer.save_state()`'s file, the Trainer's arguments by
# `TrainingArguments.to_json_string()`; the script's own model / data arguments in `run_args.json`. Folders written
# before kept the results, the log history and a few Trainer settings (run_args.json's "training") by hand, in
# `metrics.json` and `log_history.json`: they are read too.
RESULTS_FILE = "all_results.json"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_ARGS_FILE = "training_args.json"
RUN_ARGS_FILE = "run_args.json"
_OLD_RESULTS_FILE = "metrics.json"
_OLD_LOG_HISTORY_FILE = "log_history.json"
# The `TrainingArguments` a card reports (besides the process count and the precision).
_CARD_TRAINING_ARGS = ("max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                       "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed")
# Metric name in the results -> (model-index task, metric type, human-readable name).
_EVAL_METRICS = {
    "exact_match": ("visual-question-answering", "exact_match", "Exact match (short answers)"),
    "caption_bleu": ("image-to-text", "bleu", "Caption BLEU"),
    "caption_rouge1": ("image-to-text", "rouge", "Caption ROUGE-1"),
    "caption_rouge2": ("image-to-text", "rouge", "Caption ROUGE-2"),
    "caption_rougeL": ("image-to-text", "rouge", "Caption ROUGE-L"),
    "image_to_text_recall@1": ("image-to-text", "recall", "Image-to-text retrieval recall@1"),
    "text_to_image_recall@1": ("text-to-image", "recall", "Text-to-image retrieval recall@1"),
}


def parameter_counts(model, experts_per_token: dict[str, float] | None = None) -> dict[str, float]:
    """Total parameters by part, and the decoder parameters one token uses.

    A token runs through every decoder weight except the routed experts its router did not pick: the active count
    of a modality group adds `k` experts' worth, where `k` is `num_experts_per_tok` for top-k routing and, for the
    dynamic routers (top-p, ReLU), the measured average `experts_per_token[group]` when given, else their upper
    bound. Shared experts count fully.
    """
    inner = model.model if hasattr(model, "model") else model
    counts = {"total": model.num_parameters(), "vision_tower": inner.vision_tower.num_parameters(),
              "projector": sum(p.numel() for p in inner.multi_modal_projector.parameters())}
    counts["decoder"] = counts["total"] - counts["vision_tower"] - counts["projector"]
    routed = {"text": 0, "image": 0}
    active_experts = {"text": 0.0, "image": 0.0}
    for module in model.modules():
        if isinstance(module, SparseMoEVLMExpertGroup):
            size = sum(p.numel() for p in module.experts.parameters())
            per_expert = size / module.experts.num_experts
            k = (experts_per_token or {}).get(module.group, module.router.max_active_experts)
            routed[module.group] += size
            active_experts[module.group] += k * per_expert
    counts["routed_experts"] = routed["text"] + routed["image"]
    non_routed = counts["decoder"] - counts["routed_experts"]
    counts["active_per_text_token"] = non_routed + active_experts["text"]
    # Without an image group, image tokens share the text experts.
    counts["active_per_image_token"] = non_routed + (active_experts["image"] if routed["image"] else
                                                     active_experts["text"])
    for key in ("active_per_text_token", "active_per_image_token"):  # whole numbers unless `k` is an average
        if float(counts[key]).is_integer():
            counts[key] = int(counts[key])
    return counts


def _human(count: float) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f} B"
    if count >= 1e6:
        return f"{count / 1e6:.2f} M"
    if count >= 1e3:
        return f"{count / 1e3:.1f} K"
    return f"{count:.0f}"


def hub_dataset_ids(ids: str | None, option: str = "--dataset_hub_id") -> list[str] | None:
    """`"org/a, org/b"` -> `["org/a", "org/b"]` (None when empty), each checked to be a Hub repo id: the card's
    `datasets` metadata takes ids, and a local path there would be published."""
    parts = [part.strip() for part in (ids or "").split(",") if part.strip()]
    for part in parts:
        try:
            validate_repo_id(part)
        except HFValidationError as error:
            raise ValueError(f"{option} {part!r} is not a Hub dataset id ({error}); pass `namespace/name` ids, "
                             f"comma-separated.") from None
    return parts or None


def _public_name(path_or_id: str) -> str:
    """What a published card may say about a model or data source: a Hub id as is, a local path by its last part
    (the card is public; where the user keeps files is not)."""
    local = path_or_id.startswith((".", "~", "/")) or Path(path_or_id).is_absolute() or Path(path_or_id).exists()
    return Path(path_or_id).name if local else path_or_id


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run the training or remove the file.") from None


def results_path(run_dir: str | Path) -> Path:
    """The file holding a training folder's results: `all_results.json`, or `metrics.json` in a folder written before
    it (`all_results.json` when there is neither)."""
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS_FILE).is_file() and (run_dir / _OLD_RESULTS_FILE).is_file():
        return run_dir / _OLD_RESULTS_FILE
    return run_dir / RESULTS_FILE


def read_run_args(run_dir: str | Path) -> dict[str, dict]:
    """A training folder's arguments as `{"model": ..., "data": ..., "training": ...}` (empty when it has none):
    `training` holds the Trainer settings a card reports, `world_size` and `precision` (`bf16`, `fp16`, `fp32`)."""
    run_dir = Path(run_dir)
    run_args = _read_json(run_dir / RUN_ARGS_FILE) if (run_dir / RUN_ARGS_FILE).is_file() else {}
    if (run_dir / TRAINING_ARGS_FILE).is_file():
        arguments = _read_json(run_dir / TRAINING_ARGS_FILE)
        training = {key: arguments[key] for key in _CARD_TRAINING_ARGS if key in arguments}
        if "world_size" in run_args:  # a property of the launch, not a TrainingArguments field
            training["world_size"] = run_args["world_size"]
        training["precision"] = "bf16" if arguments.get("bf16") else "fp16" if arguments.get("fp16") else "fp32"
        run_args = {**{k: v for k, v in run_args.items() if k != "world_size"}, "training": training}
    return run_args


def read_log_history(run_dir: str | Path) -> list[dict]:
    """A training folder's `Trainer.state.log_history` (empty when it has none)."""
    run_dir = Path(run_dir)
    if (run_dir / TRAINER_STATE_FILE).is_file():
        return _read_json(run_dir / TRAINER_STATE_FILE).get("log_history", [])
    if (run_dir / _OLD_LOG_HISTORY_FILE).is_file():
        return _read_json(run_dir / _OLD_LOG_HISTORY_FILE)
    return []


def _last_routing_log(log_history: list[dict]) -> dict[str, float]:
    for entry in reversed(log_history):
        routing = {k: v for k, v in entry.items() if k.startswith(ROUTING_LOG_PREFIX)}
        if routing:
            return routing
    return {}


# Usage snippets draw their own example image, so that they run as written. A run on the synthetic set gets a
# scene of its own kind (a red circle left of a blue square) and a question of one of its question types.
_SYNTHETIC_IMAGE_CODE = """from PIL import Image, ImageDraw

image = Image.new("RGB", ({size}, {size}), (245, 245, 245))  # or Image.open("your_image.png")
draw = ImageDraw.Draw(image)
draw.ellipse(({a0}, {a1}, {a2}, {a3}), fill=(220, 40, 40))  # a red circle on the left
draw.rectangle(({b0}, {b1}, {b2}, {b3}), fill=(40, 80, 220))  # a blue square on the right
"""
_PLAIN_IMAGE_CODE = """from PIL import Image

image = Image.new("RGB", ({size}, {size}), (40, 80, 220))  # a stand-in: use your own, e.g. Image.open("photo.jpg")
"""
# Question type -> (question about the scene above, its answer).
_SYNTHETIC_QUESTIONS = {
    "colour": ("What colour is the circle?", "red"),
    "position": ("Which is further left, the circle or the square?", "circle"),
    "furthest": ("Which shape is furthest right?", "square"),
    "shape": ("What shape is blue?", "square"),
    "count": ("How many shapes are there?", "two"),
    "caption": ("Describe the image.", "a red circle and a blue square"),
}
_ORDER_WORDS = {"image_first": "the image before the question", "question_first": "the question before the image"}


def _usage_example(config, data_args: dict, synthetic: bool) -> tuple[str, str, str | None]:
    """The snippets' image code, question and (for the synthetic set) expected answer."""
    size = config.image_size
    if not synthetic:
        return _PLAIN_IMAGE_CODE.format(size=size).strip(), "What is in the image?", None
    unit = size / 48  # the synthetic scene's layout, scaled to the model's image size
    box = [round(v * unit) for v in (6, 14, 22, 30, 28, 12, 44, 28)]
    image_code = _SYNTHETIC_IMAGE_CODE.format(size=size, a0=box[0], a1=box[1], a2=box[2], a3=box[3], b0=box[4],
                                              b1=box[5], b2=box[6], b3=box[7]).strip()
    types = [t.strip() for t in str(data_args.get("question_types") or "colour").split(",") if t.strip()]
    question, answer = _SYNTHETIC_QUESTIONS.get(next((t for t in types if t in _SYNTHETIC_QUESTIONS), "colour"))
    return image_code, question, f"expected: {answer}"


def _prompt_order(data_args: dict, metrics: dict) -> tuple[str | None, bool, str | None, str | None]:
    """How the run ordered image and question, from its own arguments: (order, whether the snippets put the question
    first, a one-line comment for the snippet, a sentence with the measured figure per order)."""
    order = data_args.get("prompt_order")
    if order is None and data_args.get("image_after_question") is not None:  # runs from before --prompt_order
        order = "question_first" if data_args["image_after_question"] else "image_first"
    if order is None:
        return None, False, None, None
    figures = {name: metrics.get(f"test_exact_match_{name}") for name in _ORDER_WORDS}
    measured = {name: value for name, value in figures.items() if isinstance(value, int | float)}

    def figure(name):
        return f"{100 * measured[name]:.1f}%" if name in measured else None

    if order == "random":
        note = "trained with the image before or after the question, chosen per example, so either order works"
        if len(measured) == 2:
            note += (f" (test exact match: image first {figure('image_first')}, question first "
                     f"{figure('question_first')})")
        return order, False, "Trained on both prompt orders: the image may come before or after the question.", \
            note + "."
    other = "question_first" if order == "image_first" else "image_first"
    note = f"trained with {_ORDER_WORDS[order]} only; keep that order"
    if figure(order) and figure(other):
        note += f" (test exact match {figure(order)}; asked with {_ORDER_WORDS[other]}: {figure(other)})"
    comment = f"This model was trained with {_ORDER_WORDS[order]} only: keep that order."
    return order, order == "question_first", comment, note + "."


def build_model_card(
    model,
    model_id: str | None = None,
    run_dir: str | Path | None = None,
    *,
    base_model: str | None = None,
    conversion: str | None = None,
    datasets: list[str] | None = None,
    dataset_name: str | None = None,
    license: str = "apache-2.0",
    language: str | None = "en",
    tags: list[str] | None = None,
    limitations: list[str] | None = None,
) -> ModelCard:
    """The model card of `model` (a `SparseMoEVLMForConditionalGeneration`).

    Args:
        model_id: the Hub id the usage snippets load (default: the run folder's name, else `sparsemoe-vlm`).
        run_dir: a `sparsemoe-vlm train` output folder; its metrics, settings, routing statistics and expert-load
            plot fill the training, evaluation and routing sections and the `model-index` metadata.
        base_model: the checkpoint this one was converted or upcycled from (YAML `base_model`).
        conversion: how it was built from `base_model` (one line for the card's text).
        datasets: Hub dataset ids for the YAML `datasets` field (default: the run's `--dataset_hub_id`).
        dataset_name: the evaluation dataset's display name (default: the synthetic shapes set for a synthetic run,
            else the Hub id, else the local dataset's folder or file name: local paths are never published).
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    metrics, run_args, log_history = {}, {}, []
    if run_dir is not None:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"Run folder {run_dir} does not exist; pass the `--output_dir` of a training run.")
        if (run_dir / "conversion.json").is_file():  # written by the conversion scripts
            conversion_info = _read_json(run_dir / "conversion.json")
            base_model = base_model or conversion_info.get("base_model")
            conversion = conversion or conversion_info.get("method")
        if results_path(run_dir).is_file():
            metrics = _read_json(results_path(run_dir))
        run_args, log_history = read_run_args(run_dir), read_log_history(run_dir)
    model_id = model_id or (run_dir.resolve().name if run_dir is not None else "sparsemoe-vlm")
    config = model.config
    text_config = config.text_config
    data_args = run_args.get("data", {})
    synthetic = data_args.get("dataset") == "synthetic"
    datasets = datasets or hub_dataset_ids(data_args.get("dataset_hub_id"))
    # Training data is always local (`--dataset` takes folders and files): the published card names it by its
    # folder or file name, never by its path.
    local_name = Path(str(data_args.get("dataset") or "custom data")).name
    if datasets:
        dataset_type, default_name = datasets[0], datasets[0]
    elif synthetic:
        dataset_type, default_name = SYNTHETIC_DATASET
    else:
        dataset_type, default_name = local_name, local_name
    dataset_name = dataset_name or default_name

    routing_log = _last_routing_log(log_history)
    groups = list(text_config.expert_groups)
    measured = {g: routing_log[routing_log_key(g, "experts_per_token")] for g in groups
                if routing_log_key(g, "experts_per_token") in routing_log}
    router_class = ROUTER_CLASSES[text_config.router_type]
    counts = parameter_counts(model, measured if router_class.dynamic else None)
    vision = config.vision_config
    vision_width = getattr(vision, "hidden_size", None) or getattr(vision, "hidden_sizes", ["?"])[-1]
    vision_depth = getattr(vision, "num_hidden_layers", None) or sum(getattr(vision, "depths", []) or [0])
    vision_layers = f"{vision_depth} layer" + ("s" if vision_depth != 1 else "")
    sparse_layers = text_config.sparse_layer_indices
    architecture = [
        ("vision tower", f"{vision.model_type} (width {vision_width}, {vision_layers}), {config.image_size} px "
                         f"images -> {config.image_seq_length} image tokens"),
        ("projector", f"2-layer MLP ({config.projector_hidden_act}) -> {text_config.hidden_size}"),
        ("decoder", f"{text_config.num_hidden_layers} layers, hidden {text_config.hidden_size}, "
                    f"{text_config.num_attention_heads} heads ({text_config.num_key_value_heads} KV), "
                    f"vocabulary {text_config.vocab_size}"),
        ("attention", "prefix-LM: the prompt (image and text) attends bidirectionally, answers causally"
         if text_config.prefix_attention else "causal"),
        ("sparse layers", ", ".join(map(str, sparse_layers)) or "none (dense decoder)"),
    ]
    if sparse_layers:
        architecture += [
            ("experts per sparse layer", f"{text_config.num_experts} text"
             + (f" + {text_config.num_image_experts} image" if text_config.num_image_experts else " (shared by image "
                "and text tokens)") + f" routed, {text_config.num_shared_experts} shared; expert width "
             f"{text_config.moe_intermediate_size}"),
            ("router", router_class.describe(text_config)),
        ]
    dynamic = router_class.dynamic
    active_note = " (measured average)" if dynamic and measured else " (upper bound)" if dynamic else ""
    parameters = [("total", f"{counts['total']:,}"), ("vision tower", f"{counts['vision_tower']:,}"),
                  ("projector", f"{counts['projector']:,}"), ("decoder", f"{counts['decoder']:,}"),
                  ("routed experts (all groups)", f"{counts['routed_experts']:,}")]
    if sparse_layers:
        parameters += [(f"decoder, active per text token{active_note}", f"{round(counts['active_per_text_token']):,}"),
                       (f"decoder, active per image token{active_note}",
                        f"{round(counts['active_per_image_token']):,}")]

    training, training_summary = [], ""
    if run_args:
        settings = run_args.get("training", {})
        model_args = run_args.get("model", {})
        training_summary = (
            f"{'Fine-tuned' if model_args.get('model_name_or_path') else 'Trained from scratch'} with "
            f"`sparsemoe-vlm train` (Transformers `Trainer`) on "
            f"{'the embedded synthetic shapes set' if synthetic else '`' + dataset_name + '`'}"
            + (f" ({data_args['num_train_examples']:,} generated training examples at "
               f"{data_args.get('image_size', '?')} px)" if synthetic and data_args.get("num_train_examples") else "")
            + (f", starting from `{_public_name(model_args['model_name_or_path'])}`"
               if model_args.get("model_name_or_path") else
               f", from the `{model_args.get('preset')}` preset with a freshly trained tokenizer") + "."
        )
        names = {"vision_pretraining_steps": "vision tower pretraining steps (stage 0, per-patch labels)",
                 "freeze_vision_tower": "vision tower frozen", "training_stage": "training stage", "max_steps": "steps", "num_train_epochs": "epochs",
                 "per_device_train_batch_size":
                 "batch size per device", "gradient_accumulation_steps": "gradient accumulation", "world_size":
                 "processes", "learning_rate": "learning rate", "lr_scheduler_type": "schedule", "warmup_steps":
                 "warmup steps", "weight_decay": "weight decay", "precision": "precision", "seed": "seed"}
        merged = {**model_args, **settings}
        # Trainer ignores the epoch count when a number of steps is set.
        merged.pop("max_steps" if merged.get("max_steps", -1) <= 0 else "num_train_epochs", None)
        training = [(label, int(merged[key]) if isinstance(merged[key], float) and merged[key].is_integer()
                     else merged[key]) for key, label in names.items() if key in merged]
        if "train_minutes" in metrics:
            training.append(("wall time", f"{metrics['train_minutes']} min"))

    evaluation, eval_results = [], []
    for key, value in sorted(metrics.items()):  # the file's order is the writer's (Trainer sorts the keys)
        if not isinstance(value, int | float) or key == "train_minutes":
            continue
        split, _, name = key.partition("_")
        if split not in ("test", "validation") or name in ("runtime", "samples_per_second", "steps_per_second",
                                                            "epoch"):
            continue  # Trainer's bookkeeping, not results
        evaluation.append((name, split, f"{value:.4f}" if isinstance(value, float) else value))
        if split == "test" and name in _EVAL_METRICS:
            task, metric_type, metric_name = _EVAL_METRICS[name]
            eval_results.append(EvalResult(task_type=task, dataset_type=dataset_type, dataset_name=dataset_name,
                                           dataset_split="test", metric_type=metric_type,
                                           metric_value=round(float(value), 4), metric_name=metric_name))
    has_captions = any(key.startswith(("test_caption_", "validation_caption_")) for key in metrics)
    _, _, _, order_note = _prompt_order(data_args, metrics)
    evaluation_summary = (
        f"On held-out data of {dataset_name}"
        + (f"; the test figures come from {metrics['test_source']}" if metrics.get("test_source") else "")
        + ". Answers are generated greedily and compared after lower-casing and removing surrounding whitespace and a trailing full stop (exact match)"
        + ("; captions are scored with BLEU (sacrebleu) and ROUGE (rouge_score)" if has_captions else "")
        + ". `exact_match_<type>` breaks the exact match down by question type"
        + ("; `_image_first` / `_question_first` give each prompt order on its own (the plain figures pool both)"
           if "test_exact_match_image_first" in metrics else "") + ".")
    if order_note:
        evaluation_summary += " Prompt order: " + order_note
    if "test_image_to_text_recall@1" in metrics:
        evaluation_summary += (
            f" Retrieval (`sparsemoe-vlm evaluate --task retrieval`): every test image against every distinct test "
            f"caption, scored by the length-normalised likelihood of the caption as the answer to "
            f"\"{metrics.get('test_retrieval_prompt', '')}\" (text prior weight alpha "
            f"{metrics.get('test_retrieval_alpha', 0)}); recall@k and mean rank in both directions beside their chance "
            "levels (`_chance`); an identical caption of another image counts as right, a tie with a wrong one as "
            "wrong.")

    routing = []
    for group in groups:
        if routing_log_key(group, "load_entropy") in routing_log:
            routing.append((group, *(routing_log.get(routing_log_key(group, statistic), "-")
                                     for statistic in ROUTING_STATISTICS)))
    expert_load_plot = "expert_load.png" if run_dir is not None and (run_dir / "expert_load.png").is_file() else None
    # A run resumed from a checkpoint that kept no routing counts plots the steps after it only.
    first, last = run_args.get("expert_load_steps") or (1, None)
    expert_load_note = (f"steps {first} to {last} of {last} only: the run resumed from a checkpoint that kept no "
                        "routing counts") if expert_load_plot and first > 1 else None

    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-text-to-text", license=license, language=language,
        tags=["moe", "mixture-of-experts", "vision-language", "sparsemoe_vlm", "image-text-to-text", *(tags or [])],
        base_model=base_model, datasets=datasets, model_name=_public_name(model_id) if eval_results else None,
        eval_results=eval_results or None,
    )
    summary = (f"A {_human(counts['total'])}-parameter sparse Mixture-of-Experts vision-language model "
               f"({len(sparse_layers)} of {text_config.num_hidden_layers} decoder layers sparse, "
               f"{ROUTER_CLASSES[text_config.router_type].describe(text_config)}).")
    if not sparse_layers:
        decoder_mlps = "dense (this checkpoint has no sparse layer)"
    elif text_config.num_image_experts:
        decoder_mlps = "sparse Mixture-of-Experts layers with separate expert groups for image tokens and text tokens"
    else:
        decoder_mlps = "sparse Mixture-of-Experts layers with one expert pool for image and text tokens"
    image_code, example_question, expected_answer = _usage_example(config, data_args, synthetic or not run_args)
    expected_answer = expected_answer if synthetic else None  # only a model trained on such scenes knows it
    _, question_first, order_comment, order_note = _prompt_order(data_args, metrics)
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATE_PATH), model_name=model_id.split("/")[-1], model_id=model_id,
        summary=summary, project_url=PROJECT_URL, hub_url=HUB_URL, base_model=base_model, conversion=conversion,
        architecture=architecture, parameters=parameters, training=training, training_summary=training_summary,
        evaluation=evaluation, evaluation_summary=evaluation_summary, routing=routing,
        expert_load_plot=expert_load_plot, expert_load_note=expert_load_note, example_question=example_question, image_code=image_code,
        expected_answer=expected_answer, question_first=question_first, prompt_order_comment=order_comment,
        prompt_order_note=order_note,
        limitations=list(limitations or DEFAULT_LIMITATIONS), decoder_mlps=decoder_mlps,
    )
    # Optional sections leave runs of blank lines behind; Markdown needs at most one.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))


def write_model_card(model, output_dir: str | Path, **kwargs) -> Path:
    """Write `build_model_card(model, ...)` as `output_dir/README.md` (the file the Hub shows); returns its path.
    `run_dir` defaults to `output_dir`, so a training folder documents itself."""
    output_dir = Path(output_dir)
    kwargs.setdefault("run_dir", output_dir)
    card = build_model_card(model, **kwargs)
    path = output_dir / "README.md"
    card.save(path)
    return path


__all__ = ["build_model_card", "hub_dataset_ids", "parameter_counts", "read_log_history", "read_run_args",
           "results_path", "write_model_card"]
