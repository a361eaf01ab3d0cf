"""Where the main job loses accuracy: the same decoder, trained on the same synthetic questions for the same steps,
once with the real vision tower (pixels in, the `tiny-resnet` preset) and once with *oracle* image tokens: a learned
embedding of the ground-truth label of each feature-map cell (which shape of which colour covers most of it, or
background), plus a learned position embedding. If the oracle decoder answers a question type after a few hundred
steps and the real model does not, the budget runs out on learning per-object vision features, not on binding the
question to image tokens. Prints a markdown table and writes benchmarks/results/binding_diagnostics.json.

    python benchmarks/binding_diagnostics.py [--steps 600 --question_types colour --min_shapes 2]
"""

import argparse
import json
import math
import random
import time
import types
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hf_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMForConditionalGeneration, build_processor
from hf_sparsemoe_vlm.app.synthetic_shapes import (
    COLOURS,
    QUESTION_TYPES,
    SHAPES,
    draw_shapes,
    make_question,
    patch_labels,
    place_shapes,
)
from hf_sparsemoe_vlm.app.training import PRESETS, SparseMoEVLMTrainer, VLMDataCollator, generate_answers


def cell_labels(shapes, image_size: int, grid: int) -> torch.Tensor:
    """(grid * grid,) oracle labels in raster order: the `PATCH_LABELS` index of the shape covering most of each
    cell (at least 1/8 of it), 0 for background; the labels stage-0 vision pretraining learns."""
    return torch.tensor(patch_labels(shapes, image_size, grid), dtype=torch.long)


def make_rows(num: int, seed: int, question_types: list[str], min_shapes: int, image_size: int, grid: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        kind = rng.choice(question_types)
        count = rng.randint(max(min_shapes, 2 if kind == "position" else 1), len(SHAPES))
        shapes = place_shapes(rng, count, image_size)
        question, answer = make_question(rng, shapes, kind)
        rows.append({"image": draw_shapes(shapes, image_size), "question": question, "answer": answer,
                     "question_type": kind, "num_shapes": count, "cell_labels": cell_labels(shapes, image_size, grid)})
    return rows


class OracleCollator(VLMDataCollator):
    """The usual batches, with each image's cell labels where the pixels would be (the oracle tower reads them)."""

    def __call__(self, rows):
        return {**super().__call__(rows), "pixel_values": torch.stack([r["cell_labels"] for r in rows]).float()}

    def prompts(self, rows, image_first=None):
        return {**super().prompts(rows, image_first=image_first), "pixel_values": torch.stack([r["cell_labels"] for r in rows]).float()}


def use_oracle_image_tokens(model: SparseMoEVLMForConditionalGeneration) -> None:
    """Replace the vision tower + projector by an embedding of the cell labels plus a learned position embedding."""
    config = model.config
    hidden = config.text_config.hidden_size
    model.oracle_labels = torch.nn.Embedding(1 + len(SHAPES) * len(COLOURS), hidden)
    model.oracle_positions = torch.nn.Parameter(torch.randn(config.image_seq_length, hidden) * 0.02)

    def get_image_features(self, pixel_values, **kwargs):
        features = model.oracle_labels(pixel_values.long()) + model.oracle_positions
        return BaseModelOutputWithPooling(pooler_output=features)

    model.model.get_image_features = types.MethodType(get_image_features, model.model)
    for param in model.model.vision_tower.parameters():
        param.requires_grad_(False)


def run(vision: str, args, train_rows, test_rows, processor, config) -> dict:
    set_seed(args.seed)
    model = SparseMoEVLMForConditionalGeneration(config)
    collator_class = OracleCollator if vision == "oracle" else VLMDataCollator
    if vision == "oracle":
        use_oracle_image_tokens(model)
    collator = collator_class(processor, prompt_order="question_first" if args.image_after_question else "image_first")
    training_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / vision), per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=min(100, args.steps // 10),
        max_steps=args.steps, logging_steps=max(1, args.steps // 6), report_to="none", save_strategy="no",
        remove_unused_columns=False, disable_tqdm=True, seed=args.seed, use_cpu=True,
    )
    trainer = SparseMoEVLMTrainer(model=model, args=training_args, train_dataset=train_rows, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    minutes = (time.perf_counter() - start) / 60
    answers = generate_answers(model, collator, test_rows, batch_size=64, max_new_tokens=24)
    correct = [answer == row["answer"] for answer, row in zip(answers, test_rows, strict=True)]
    result = {"vision": vision, "train_minutes": round(minutes, 2),
              "final_train_loss": round(next(e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), 4)}
    for kind in args.question_types:
        hits = [ok for ok, row in zip(correct, test_rows, strict=True) if row["question_type"] == kind]
        result[kind] = round(sum(hits) / len(hits), 3) if hits else None  # None: no test question of this type
    multi = [ok for ok, row in zip(correct, test_rows, strict=True) if row["num_shapes"] > 1]
    result["multi_shape_images"] = round(sum(multi) / len(multi), 3) if multi else None
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--question_types", type=lambda s: s.split(","), default=["colour"],
                        help=f"Comma-separated subset of {QUESTION_TYPES}.")
    parser.add_argument("--min_shapes", type=int, default=2, help="Fewest shapes per training image (1-3).")
    parser.add_argument("--image_size", type=int, default=48)
    parser.add_argument("--image_after_question", type=lambda s: s.lower() == "true", default=True)
    parser.add_argument("--num_test", type=int, default=300)
    parser.add_argument("--vision", type=lambda s: s.split(","), default=["real", "oracle"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="/tmp/binding_diagnostics")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "binding_diagnostics.json"))
    args = parser.parse_args(argv)
    unknown = [k for k in args.question_types if k not in QUESTION_TYPES or k == "caption"]
    if unknown:
        parser.error(f"unknown or unsupported question types {unknown}; choose from {QUESTION_TYPES[:-1]}")

    preset = PRESETS["tiny-resnet"]
    config = SparseMoEVLMConfig(vision_config=dict(preset["vision_config"]), text_config=dict(preset["text_config"]),
                                image_token_id=preset["image_token_id"], image_size=args.image_size)
    grid = math.isqrt(config.image_seq_length)
    train_rows = make_rows(args.steps * args.batch_size, args.seed + 1, args.question_types, args.min_shapes,
                           args.image_size, grid)
    test_rows = make_rows(args.num_test, args.seed + 2, args.question_types, 1, args.image_size, grid)
    processor = build_processor(config, [text for row in train_rows[:5000] for text in (row["question"], row["answer"])])
    results = [run(vision, args, train_rows, test_rows, processor, config) for vision in args.vision]

    columns = ["vision", "train_minutes", "final_train_loss", *args.question_types, "multi_shape_images"]
    print(f"\n{args.steps} steps x {args.batch_size}, questions {','.join(args.question_types)}, training images with "
          f">= {args.min_shapes} shapes, {args.image_size} px, {grid}x{grid} image tokens")
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for result in results:
        print("| " + " | ".join(str(result[c]) for c in columns) + " |")
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("results",)},
                                "torch": torch.__version__, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
