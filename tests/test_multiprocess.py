"""`sparsemoe-vlm train` under `accelerate launch` with 2 CPU processes (DDP over gloo) follows the single-process
run with the same global batch step for step."""

import json
import os
import socket
import subprocess
import sys

import pytest


# The SigLIP preset with every parameter training: a trainable BatchNorm tower (the default ResNet preset without
# stage 0) normalises with per-process batch statistics under DDP, so it would not match one process exactly.
COMMON = ["--preset", "tiny", "--max_steps", "4", "--num_train_examples", "96", "--num_validation_examples", "4",
          "--num_test_examples", "4", "--max_new_tokens", "2", "--logging_steps", "1", "--image_size", "32",
          "--save_strategy", "no", "--question_types", "count,colour,shape", "--train_sampling_strategy",
          "sequential", "--learning_rate", "1e-3", "--warmup_steps", "0", "--use_cpu", "true",
          "--disable_tqdm", "true", "--vision_pretraining_steps", "0"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(output_dir) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Accelerate 1.x runs `--cpu --num_processes 2` as a single process (its multi-CPU path needs MPI); the
    # torch.distributed launcher (`--multi_gpu`) with `--use_cpu true` gives 2 CPU processes over gloo.
    ddp = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
           "127.0.0.1", "--main_process_port", str(_free_port()), "-m", "hf_sparsemoe_vlm.app.cli", "train",
           "--output_dir", str(tmp_path / "ddp"), "--per_device_train_batch_size", "4",
           "--per_device_eval_batch_size", "4", *COMMON]
    result = subprocess.run(ddp, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    single = [sys.executable, "-m", "hf_sparsemoe_vlm.app.cli", "train", "--output_dir", str(tmp_path / "single"),
              "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", *COMMON]
    result = subprocess.run(single, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    ddp_losses, single_losses = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert len(ddp_losses) == len(single_losses) == 4
    assert ddp_losses[-1] < ddp_losses[0]  # it trains
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)
