"""Exact match for short VQA answers, as an `evaluate` metric module loadable offline from this file."""

import datasets
import evaluate


_DESCRIPTION = """Share of predictions equal to their reference after lower-casing, stripping surrounding whitespace
and a trailing full stop. Returns `exact_match` in [0, 1] and the number of examples."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated answers.
    references (`list[str]`): reference answers.
Returns:
    exact_match (`float`): share of exact matches.
    num_examples (`int`): number of compared pairs.
"""


def _normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        matches = [_normalise(p) == _normalise(r) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(matches) / len(matches) if matches else 0.0, "num_examples": len(matches)}
