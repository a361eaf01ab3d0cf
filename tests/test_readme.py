import re
from pathlib import Path

import pytest


README = Path(__file__).resolve().parents[1] / "README.md"
MAIN_JOB_OUTPUT = "runs/sparsemoe-vlm-tiny"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_python_examples_run():
    blocks = [block for block in _python_blocks() if MAIN_JOB_OUTPUT not in block]
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:  # the examples build on each other, like a notebook
        exec(compile(block, str(README), "exec"), namespace)


@pytest.mark.slow
def test_readme_examples_on_the_main_job_output_run(tmp_path):
    """The examples that use the main command's output run against a short run of the same command."""
    from hf_sparsemoe_vlm.app.cli import main

    blocks = [block for block in _python_blocks() if MAIN_JOB_OUTPUT in block]
    assert blocks
    output = tmp_path / "run"
    main(["train", "--output_dir", str(output), "--max_steps", "2", "--vision_pretraining_steps", "2",
          "--num_train_examples", "16", "--num_validation_examples", "0", "--num_test_examples", "2",
          "--per_device_train_batch_size", "4", "--max_new_tokens", "2", "--save_strategy", "no",
          "--use_cpu", "true"])
    for block in blocks:
        namespace: dict = {}
        exec(compile(block.replace(MAIN_JOB_OUTPUT, str(output)), str(README), "exec"), namespace)
        assert namespace["answer"].ndim == 1 and len(namespace["answer"]) >= 1  # generated token ids


def test_ci_runs_the_readme_test_command():
    command = re.search(r"Install and run the tests.*?```bash\n(.*?)\n```", README.read_text(), flags=re.DOTALL)
    ci = (README.parent / ".ci" / "run").read_text()
    assert command is not None and command.group(1) in ci
