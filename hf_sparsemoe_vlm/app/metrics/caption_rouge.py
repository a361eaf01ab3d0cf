"""ROUGE-1/2/L F1 for generated captions (rouge_score), as an `evaluate` metric module loadable offline."""

import datasets
import evaluate
from rouge_score import rouge_scorer


_DESCRIPTION = """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (Google's rouge_score, with stemming) of generated captions
against one reference each, in [0, 1]."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated captions.
    references (`list[str]`): one reference caption per prediction.
Returns:
    rouge1, rouge2, rougeL (`float`): mean F1 in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionRouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        names = ("rouge1", "rouge2", "rougeL")
        if not predictions:
            return dict.fromkeys(names, 0.0)
        scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
        scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references,
                                                                                       strict=True)]
        return {name: sum(s[name].fmeasure for s in scores) / len(scores) for name in names}
