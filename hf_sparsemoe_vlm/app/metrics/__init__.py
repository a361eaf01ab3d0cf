"""`evaluate` metric modules shipped with the package (usable offline): load them with `load_metric(name)`."""

from pathlib import Path

import evaluate


METRICS_DIR = Path(__file__).parent


def load_metric(name: str):
    """Load one of the package's `evaluate` metrics (`"vqa_exact_match"`, `"caption_scores"`: BLEU and ROUGE)
    from its file, without the Hub."""
    path = METRICS_DIR / f"{name}.py"
    if not path.is_file():
        available = sorted(p.stem for p in METRICS_DIR.glob("*.py") if p.stem != "__init__")
        raise ValueError(f"Unknown metric {name!r}; available: {available}.")
    return evaluate.load(str(path))
