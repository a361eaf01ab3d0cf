# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""The embedded default dataset: images of coloured geometric shapes with captions and questions about colour,
shape, count and relative position. Generated on the fly, deterministic by seed, no download."""

import random
from dataclasses import dataclass

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
# The default mix. "furthest" (which shape is furthest left / right of all) is asked only when named: a bridge
# between captions (which list the shapes left to right) and "position" (which of two named shapes is further left).
QUESTION_TYPES = ("colour", "shape", "count", "position", "caption")
ALL_QUESTION_TYPES = (*QUESTION_TYPES, "furthest")
TWO_SHAPE_QUESTIONS = ("position", "furthest")
# Three shapes no smaller than 3 px in radius, apart and in distinct columns, need at least this many pixels a side.
MIN_IMAGE_SIZE = 20


@dataclass(frozen=True)
class PlacedShape:
    shape: str
    colour: str
    x: int  # centre
    y: int
    radius: int

    def describe(self) -> str:
        return f"a {self.colour} {self.shape}"


# Per-patch classes for vision tower pretraining: background, then every (shape, colour) pair.
PATCH_LABELS = ("background",) + tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)


def _draw(draw: ImageDraw.ImageDraw, s: PlacedShape, fill) -> None:
    box = (s.x - s.radius, s.y - s.radius, s.x + s.radius, s.y + s.radius)
    if s.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif s.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(s.x, s.y - s.radius), (s.x - s.radius, s.y + s.radius), (s.x + s.radius, s.y + s.radius)],
                     fill=fill)


def draw_shapes(shapes: list[PlacedShape], image_size: int, background=(245, 245, 245)) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        _draw(draw, s, COLOURS[s.colour])
    return image


def patch_labels(shapes: list[PlacedShape], image_size: int, grid_size: int,
                 min_coverage: float = 0.125) -> list[int]:
    """The class (index into `PATCH_LABELS`) of each cell of a `grid_size` x `grid_size` grid over the image, row by
    row: the shape covering most of the cell, or background when no shape covers `min_coverage` of it."""
    return _patch_owners(shapes, image_size, grid_size, min_coverage)[0]


def patch_centre_offsets(shapes: list[PlacedShape], image_size: int, grid_size: int,
                         min_coverage: float = 0.125) -> list[tuple[float, float] | None]:
    """For each cell (row by row): where the centre of the shape that owns the cell (as in `patch_labels`) lies,
    relative to the cell's own centre, in cells (x, y); None for background. Every cell of one object then points at
    the same point, so an image token that learns it carries its object's exact position, finer than its cell."""
    owners = _patch_owners(shapes, image_size, grid_size, min_coverage)[1]
    cell = image_size / grid_size
    offsets = []
    for index, owner in enumerate(owners):
        if owner is None:
            offsets.append(None)
            continue
        row, col = divmod(index, grid_size)
        offsets.append(((owner.x + 0.5 - (col + 0.5) * cell) / cell, (owner.y + 0.5 - (row + 0.5) * cell) / cell))
    return offsets


def _patch_owners(shapes: list[PlacedShape], image_size: int, grid_size: int,
                  min_coverage: float) -> tuple[list[int], list[PlacedShape | None]]:
    best_label, best_coverage = [0] * grid_size ** 2, [0.0] * grid_size ** 2
    owner: list[PlacedShape | None] = [None] * grid_size ** 2
    for s in shapes:
        mask = Image.new("L", (image_size, image_size), 0)
        _draw(ImageDraw.Draw(mask), s, 1)
        pixels = torch.tensor(list(mask.getdata()), dtype=torch.float32).view(1, image_size, image_size)
        coverage = torch.nn.functional.adaptive_avg_pool2d(pixels, grid_size).flatten().tolist()
        label = PATCH_LABELS.index(f"{s.colour} {s.shape}")
        for cell, value in enumerate(coverage):
            if value >= min_coverage and value > best_coverage[cell]:
                best_label[cell], best_coverage[cell], owner[cell] = label, value, s
    return best_label, owner


def patch_label_batches(num_batches: int, batch_size: int, grid_size: int, seed: int = 0, image_size: int = 48,
                        max_shapes: int = 3, with_offsets: bool = False):
    """Batches of `(images, labels)` for vision tower pretraining: freshly drawn scenes of 1 to `max_shapes` shapes
    and their per-cell `patch_labels` (`labels` is a list of `batch_size` lists of `grid_size ** 2` ints),
    deterministic in `seed`. `with_offsets` adds a third item, the per-cell `patch_centre_offsets`."""
    rng = random.Random(seed)
    for _ in range(num_batches):
        scenes = [place_shapes(rng, rng.randint(1, max_shapes), image_size) for _ in range(batch_size)]
        batch = ([draw_shapes(shapes, image_size) for shapes in scenes],
                 [patch_labels(shapes, image_size, grid_size) for shapes in scenes])
        if with_offsets:
            batch += ([patch_centre_offsets(shapes, image_size, grid_size) for shapes in scenes],)
        yield batch


def place_shapes(rng: random.Random, count: int, image_size: int) -> list[PlacedShape]:
    """`count` shapes with distinct shape types and colours, not overlapping, at distinct horizontal positions."""
    kinds = rng.sample(SHAPES, count)
    colours = rng.sample(list(COLOURS), count)
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"Synthetic images must be at least {MIN_IMAGE_SIZE} px a side to hold three separate "
                         f"shapes; got image_size={image_size} (the default is 48).")
    min_radius, max_radius = max(3, image_size // 8), max(4, image_size // 5)
    for _ in range(100_000):  # a draw fits within a few tries at any size allowed above; never loop forever
        placed = []
        for kind, colour in zip(kinds, colours, strict=True):
            radius = rng.randint(min_radius, max_radius)
            x = rng.randint(radius + 1, image_size - radius - 2)
            y = rng.randint(radius + 1, image_size - radius - 2)
            placed.append(PlacedShape(kind, colour, x, y, radius))
        separated = all(
            abs(a.x - b.x) >= a.radius + b.radius + 2 or abs(a.y - b.y) >= a.radius + b.radius + 2
            for i, a in enumerate(placed) for b in placed[i + 1:]
        )
        distinct_columns = all(abs(a.x - b.x) >= image_size // 8 for i, a in enumerate(placed) for b in placed[i + 1:])
        if separated and distinct_columns:
            return placed
    raise RuntimeError(f"Could not place {count} separate shapes in a {image_size} px image; use a larger image_size.")


def caption(shapes: list[PlacedShape]) -> str:
    """Shapes described from left to right."""
    ordered = sorted(shapes, key=lambda s: s.x)
    parts = [s.describe() for s in ordered]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_question(rng: random.Random, shapes: list[PlacedShape], kind: str) -> tuple[str, str]:
    if kind == "colour":
        target = rng.choice(shapes)
        return f"What colour is the {target.shape}?", target.colour
    if kind == "shape":
        target = rng.choice(shapes)
        return f"What shape is {target.colour}?", target.shape
    if kind == "count":
        return "How many shapes are there?", NUMBER_WORDS[len(shapes)]
    if kind == "position":
        first, second = rng.sample(shapes, 2)
        side = rng.choice(("left", "right"))
        further = min if side == "left" else max
        return f"Which is further {side}, the {first.shape} or the {second.shape}?", further(
            (first, second), key=lambda s: s.x).shape
    if kind == "furthest":
        side = rng.choice(("left", "right"))
        furthest = min if side == "left" else max
        return f"Which shape is furthest {side}?", furthest(shapes, key=lambda s: s.x).shape
    if kind == "caption":
        return "Describe the image.", caption(shapes)
    raise ValueError(f"Unknown question type {kind!r}; expected one of {ALL_QUESTION_TYPES}.")


def generate_examples(num_examples: int, seed: int, image_size: int = 48,
                      question_types: tuple[str, ...] = QUESTION_TYPES, max_shapes: int = 3) -> dict[str, list]:
    """Columns `image` (PIL), `question`, `answer`, `question_type`, `caption`, deterministic in `seed`. Images hold
    1 to `max_shapes` shapes (position and furthest questions need two, so `max_shapes=1` leaves them out)."""
    unknown = [kind for kind in question_types if kind not in ALL_QUESTION_TYPES]
    if unknown:
        raise ValueError(f"Unknown question types {unknown}; expected a subset of {ALL_QUESTION_TYPES}.")
    if not 1 <= max_shapes <= len(SHAPES):
        raise ValueError(f"`max_shapes` must be in [1, {len(SHAPES)}], got {max_shapes}.")
    if max_shapes == 1:
        question_types = tuple(kind for kind in question_types if kind not in TWO_SHAPE_QUESTIONS)
        if not question_types:
            raise ValueError("Position and furthest questions need two shapes; `max_shapes=1` leaves no question "
                             "type.")
    rng = random.Random(seed)
    columns = {"image": [], "question": [], "answer": [], "question_type": [], "caption": []}
    for _ in range(num_examples):
        kind = rng.choice(question_types)
        count = rng.randint(2 if kind in TWO_SHAPE_QUESTIONS else 1, max_shapes)
        shapes = place_shapes(rng, count, image_size)
        question, answer = make_question(rng, shapes, kind)
        columns["image"].append(draw_shapes(shapes, image_size))
        columns["question"].append(question)
        columns["answer"].append(answer)
        columns["question_type"].append(kind)
        columns["caption"].append(caption(shapes))
    return columns


def make_synthetic_dataset(num_train: int = 6000, num_validation: int = 300, num_test: int = 300, seed: int = 0,
                           image_size: int = 48, question_types: tuple[str, ...] = QUESTION_TYPES,
                           num_single_shape_first: int = 0):
    """The synthetic shapes VQA / captioning dataset as a `datasets.DatasetDict` (train / validation / test, each
    from its own seed) with an `Image` column.

    `num_single_shape_first` > 0 makes a curriculum: the training split starts with that many single-shape examples
    (shape and colour identity without having to find the object the question is about), followed by `num_train`
    examples of the full task. Train on it in order (`TrainingArguments(train_sampling_strategy="sequential")`); the
    examples are independent draws, so order within each part is already random."""
    for name, value in (("num_train", num_train), ("num_validation", num_validation), ("num_test", num_test),
                        ("num_single_shape_first", num_single_shape_first)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"Synthetic images must be at least {MIN_IMAGE_SIZE} px a side to hold three separate "
                         f"shapes; got image_size={image_size} (the default is 48).")
    features = Features({
        "image": ImageFeature(), "question": Value("string"), "answer": Value("string"),
        "question_type": ClassLabel(names=list(ALL_QUESTION_TYPES)), "caption": Value("string"),
    })
    splits = {}
    for offset, (name, size) in enumerate((("train", num_train), ("validation", num_validation), ("test", num_test))):
        columns = generate_examples(size, seed=seed * 1000 + offset, image_size=image_size,
                                    question_types=question_types)
        if name == "train" and num_single_shape_first > 0:
            first = generate_examples(num_single_shape_first, seed=seed * 1000 + 999, image_size=image_size,
                                      question_types=question_types, max_shapes=1)
            columns = {key: first[key] + columns[key] for key in columns}
        columns["question_type"] = [ALL_QUESTION_TYPES.index(kind) for kind in columns["question_type"]]
        splits[name] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)


__all__ = ["ALL_QUESTION_TYPES", "COLOURS", "PATCH_LABELS", "QUESTION_TYPES", "SHAPES", "PlacedShape", "draw_shapes",
           "generate_examples", "make_question", "make_synthetic_dataset", "patch_centre_offsets", "patch_label_batches", "patch_labels",
           "place_shapes"]
