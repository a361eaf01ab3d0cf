import json

import pytest
import torch

from hf_sparsemoe_vlm.app.synthetic_shapes import COLOURS, SHAPES, PlacedShape

from tiny_models import load_benchmark_script


def test_oracle_cell_labels_follow_the_drawn_pixels():
    benchmark = load_benchmark_script("binding_diagnostics")
    square = PlacedShape("square", "red", 12, 12, 6)  # pixels 6..18: cells 0-2, the corner cells get too few pixels
    circle = PlacedShape("circle", "blue", 36, 30, 8)
    labels = benchmark.cell_labels([square, circle], image_size=48, grid=6).view(6, 6)
    square_label = 1 + SHAPES.index("square") * len(COLOURS) + list(COLOURS).index("red")
    circle_label = 1 + SHAPES.index("circle") * len(COLOURS) + list(COLOURS).index("blue")
    assert labels[1, 1] == square_label and labels[0, 1] == square_label and labels[0, 0] == 0
    assert labels[3, 4] == circle_label and labels[2, 4] == circle_label and labels[2, 3] == 0
    assert set(labels.unique().tolist()) == {0, square_label, circle_label}
    assert int((labels == 0).sum()) == 36 - 6 - 7


@pytest.mark.slow
def test_binding_diagnostics_trains_real_and_oracle_models_and_writes_results(tmp_path):
    benchmark = load_benchmark_script("binding_diagnostics")
    results_path = tmp_path / "results.json"
    results = benchmark.main(["--steps", "2", "--batch_size", "4", "--num_test", "12", "--question_types",
                              "colour,count", "--output_dir", str(tmp_path / "runs"), "--results", str(results_path)])
    assert [r["vision"] for r in results] == ["real", "oracle"]
    written = json.loads(results_path.read_text())
    assert written["results"] == results and written["settings"]["question_types"] == ["colour", "count"]
    for result in results:  # 12 test questions with seed 2 include both types and multi-shape images
        assert 0.0 <= result["colour"] <= 1.0 and 0.0 <= result["count"] <= 1.0
        assert 0.0 <= result["multi_shape_images"] <= 1.0
        assert torch.isfinite(torch.tensor(result["final_train_loss"]))


def test_binding_diagnostics_rejects_caption_questions(capsys):
    with pytest.raises(SystemExit):
        load_benchmark_script("binding_diagnostics").main(["--question_types", "caption"])
    assert "unknown or unsupported question types ['caption']" in capsys.readouterr().err
