"""kill -9 in the middle of `sparsemoe-vlm train`, then resume: the run ends exactly where an uninterrupted one does."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file


# Stage 0 (vision pretraining) runs in the first runs; the resumed run skips it and takes the tower from the checkpoint.
ARGS = ["--max_steps", "16", "--save_steps", "4", "--save_total_limit", "10", "--num_train_examples", "96",
        "--num_validation_examples", "4", "--num_test_examples", "4", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--max_new_tokens", "2", "--logging_steps", "4", "--image_size", "32",
        "--use_cpu", "true", "--disable_tqdm", "true", "--vision_pretraining_steps", "2"]


def run(output, *extra, wait=True):
    command = [sys.executable, "-m", "hf_sparsemoe_vlm.app.cli", "train", "--output_dir", str(output), *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    run(tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    process = run(interrupted, wait=False)
    deadline = time.time() + 300
    while not (interrupted / "checkpoint-8" / "trainer_state.json").exists():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "model.safetensors").exists()  # it never finished

    result = run(interrupted, "--resume_from_checkpoint", "last")
    assert "Test questions:" in result.stdout
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(interrupted / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from hf_sparsemoe_vlm.app.cli import main

    with pytest.raises(ValueError, match="no checkpoint in"):
        main(["train", "--output_dir", str(tmp_path / "empty"), *ARGS, "--resume_from_checkpoint", "last"])
