import json

import pytest

from tiny_models import load_benchmark_script


TINY_TRAIN = ["--preset", "tiny", "--max_steps", "2", "--num_train_examples", "32", "--num_validation_examples", "4",
              "--num_test_examples", "6", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
              "--max_new_tokens", "4", "--vision_pretraining_steps", "0", "--question_types", "position"]


@pytest.mark.slow
def test_runs_driver_launches_missing_runs_records_finished_ones_and_tabulates(tmp_path, capsys):
    driver = load_benchmark_script("main_job_runs")
    runs_dir, output = tmp_path / "runs", tmp_path / "runs.json"
    # A run that finished while no driver was recording it (the driver was stopped after launching it).
    finished = runs_dir / "dense-seed0-threads1"
    finished.mkdir(parents=True)
    figures = {"test_exact_match": 0.5, "test_exact_match_position": 0.25, "train_minutes": 1.5}
    (finished / "all_results.json").write_text(json.dumps({**figures, "eval_loss": 3.0}))

    results = driver.main(["--seeds", "0", "--threads", "1", "--models", "sparse", "dense", "--runs_dir",
                           str(runs_dir), "--output", str(output), "--", *TINY_TRAIN])

    assert sorted(results) == ["dense/seed0/threads1", "sparse/seed0/threads1"]
    assert results["dense/seed0/threads1"] == figures  # recorded as it was, only the figures the table shows
    assert not (runs_dir / "dense-seed0-threads1.log").exists()  # and not run again
    sparse = results["sparse/seed0/threads1"]
    assert 0 <= sparse["test_exact_match"] <= 1 and sparse["train_minutes"] > 0
    assert "test_exact_match_position_image_first" in sparse and "test_exact_match_caption" not in sparse
    assert json.loads(output.read_text()) == results
    table = capsys.readouterr().out
    assert "| dense | 0 | 1 | 50.0% | - | - | 25.0% (- / -) | - | 1.5 |" in table
    assert "| **sparse mean** (1 runs) |" in table

    # Resuming with everything recorded launches nothing and changes nothing.
    before = output.read_text()
    assert driver.main(["--seeds", "0", "--threads", "1", "--models", "sparse", "dense", "--runs_dir", str(runs_dir),
                        "--output", str(output)]) == results
    assert output.read_text() == before
