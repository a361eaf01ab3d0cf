import numpy as np
import pytest
from datasets import Image as ImageFeature

from hf_sparsemoe_vlm.app.synthetic_shapes import (
    ALL_QUESTION_TYPES,
    COLOURS,
    MIN_IMAGE_SIZE,
    NUMBER_WORDS,
    QUESTION_TYPES,
    SHAPES,
    generate_examples,
    make_synthetic_dataset,
)


def test_dataset_is_deterministic_by_seed_and_splits_differ():
    first = make_synthetic_dataset(20, 5, 5, seed=3)
    second = make_synthetic_dataset(20, 5, 5, seed=3)
    other = make_synthetic_dataset(20, 5, 5, seed=4)
    assert isinstance(first["train"].features["image"], ImageFeature)
    for a, b in zip(first["train"], second["train"], strict=True):
        assert a["question"] == b["question"] and a["answer"] == b["answer"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert [r["caption"] for r in first["train"]] != [r["caption"] for r in other["train"]]
    assert [r["caption"] for r in first["train"]][:5] != [r["caption"] for r in first["test"]]


def test_answers_agree_with_the_pixels():
    columns = generate_examples(240, seed=1, image_size=48, question_types=ALL_QUESTION_TYPES)
    names = ("image", "question", "answer", "question_type", "caption")
    for image, question, answer, kind, caption in zip(*(columns[k] for k in names), strict=True):
        pixels = np.asarray(image).reshape(-1, 3)
        present = {name for name, rgb in COLOURS.items() if (pixels == rgb).all(-1).sum() > 5}
        described = [part.split()[-2] for part in caption.replace(" and ", ", ").split(", ")]
        assert set(described) == present  # every shape in the caption is drawn, in its colour
        if kind == "colour":
            assert answer in present and f"{answer} {question.split()[-1][:-1]}" in caption
        elif kind == "shape":
            assert answer in SHAPES and f"{question.split()[-1][:-1]} {answer}" in caption
        elif kind == "count":
            assert answer == NUMBER_WORDS[len(present)]
        elif kind == "position":  # "Which is further left, the circle or the square?"
            words = question.split()
            side, first, second = words[3].rstrip(","), words[5], words[-1].rstrip("?")
            order = [part.split()[-1] for part in caption.replace(" and ", ", ").split(", ")]  # left to right
            leftmost, rightmost = sorted((first, second), key=order.index)
            assert side in ("left", "right") and answer == (leftmost if side == "left" else rightmost)
        elif kind == "furthest":  # "Which shape is furthest right?": the caption's first or last shape
            order = [part.split()[-1] for part in caption.replace(" and ", ", ").split(", ")]
            assert len(order) >= 2 and answer == (order[0] if question.endswith("left?") else order[-1])
        else:
            assert answer == caption


def test_question_types_can_be_chosen_and_unknown_ones_are_rejected():
    columns = generate_examples(30, seed=0, question_types=("count",))
    assert set(columns["question_type"]) == {"count"}
    with pytest.raises(ValueError, match="Unknown question types"):
        generate_examples(3, seed=0, question_types=("colour", "texture"))
    assert QUESTION_TYPES == ("colour", "shape", "count", "position", "caption")  # the default mix
    assert set(generate_examples(240, seed=1, question_types=ALL_QUESTION_TYPES)["question_type"]) == {
        *QUESTION_TYPES, "furthest"}
    data = make_synthetic_dataset(40, 0, 0, question_types=("furthest", "caption"))["train"]
    assert set(data.features["question_type"].int2str(data["question_type"])) == {"furthest", "caption"}


def test_a_new_question_type_leaves_the_draws_of_the_other_mixes_unchanged():
    # The main job's figures were recorded on these draws: adding "furthest" to the known types must not move them.
    columns = generate_examples(5, seed=3, question_types=("colour", "shape", "count", "position", "caption"))
    assert columns["question"][:3] == ["What shape is yellow?", "What shape is green?", "What shape is yellow?"]
    assert columns["answer"][:3] == generate_examples(3, seed=3)["answer"]


def test_single_shape_curriculum_comes_first_in_the_training_split():
    data = make_synthetic_dataset(30, 4, 4, seed=2, num_single_shape_first=20)
    train = data["train"]
    assert len(train) == 50 and len(data["validation"]) == 4
    first, rest = train.select(range(20)), train.select(range(20, 50))
    assert all(" and " not in caption for caption in first["caption"])  # one shape each
    assert QUESTION_TYPES.index("position") not in set(first["question_type"])  # position needs two shapes
    # The full task follows, unchanged by the curriculum (same draws as without it).
    plain = make_synthetic_dataset(30, 4, 4, seed=2)["train"]
    assert rest["question"] == plain["question"] and rest["caption"] == plain["caption"]
    assert make_synthetic_dataset(30, 4, 4, seed=2, num_single_shape_first=20)["train"]["caption"] == train["caption"]
    with pytest.raises(ValueError, match="leaves no question type"):
        generate_examples(3, seed=0, question_types=("position", "furthest"), max_shapes=1)
    assert set(generate_examples(20, seed=0, question_types=("furthest", "count"), max_shapes=1)["question_type"]) == {
        "count"}
    with pytest.raises(ValueError, match="max_shapes"):
        generate_examples(3, seed=0, max_shapes=4)


def test_images_too_small_for_three_shapes_are_refused_not_looped_on():
    with pytest.raises(ValueError, match=f"at least {MIN_IMAGE_SIZE} px"):
        make_synthetic_dataset(4, 0, 0, image_size=16)
    with pytest.raises(ValueError, match="num_train must be >= 0"):
        make_synthetic_dataset(-1, 0, 0)
    assert len(make_synthetic_dataset(4, 0, 0, image_size=MIN_IMAGE_SIZE)["train"]) == 4
