import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:  # the examples build on each other, like a notebook
        exec(compile(block, str(README), "exec"), namespace)


def test_ci_runs_the_readme_test_command():
    command = re.search(r"Install and run the tests.*?```bash\n(.*?)\n```", README.read_text(), flags=re.DOTALL)
    ci = (README.parent / ".ci" / "run").read_text()
    assert command is not None and command.group(1) in ci
