"""Corpus BLEU for generated captions (sacrebleu), as an `evaluate` metric module loadable offline from this file."""

import datasets
import evaluate
import sacrebleu


_DESCRIPTION = """Corpus BLEU (sacrebleu, 13a tokenisation) of generated captions against one reference each, in
[0, 1] (sacrebleu's score / 100)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated captions.
    references (`list[str]`): one reference caption per prediction.
Returns:
    bleu (`float`): corpus BLEU in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionBleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"bleu": 0.0}
        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score / 100.0}
