"""Caption scores as one `evaluate` metric module loadable offline from this file: corpus BLEU (sacrebleu) and mean
ROUGE-1/2/L F1 (rouge_score) of generated captions against one reference each."""

import datasets
import evaluate
import sacrebleu
from rouge_score import rouge_scorer


_DESCRIPTION = """Corpus BLEU (sacrebleu, 13a tokenisation; sacrebleu's score / 100) and mean ROUGE-1, ROUGE-2 and
ROUGE-L F1 (Google's rouge_score, with stemming) of generated captions against one reference each, all in [0, 1]."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated captions.
    references (`list[str]`): one reference caption per prediction.
Returns:
    bleu (`float`): corpus BLEU in [0, 1].
    rouge1, rouge2, rougeL (`float`): mean F1 in [0, 1].
"""

_ROUGE = ("rouge1", "rouge2", "rougeL")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionScores(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"bleu": 0.0, **dict.fromkeys(_ROUGE, 0.0)}
        scorer = rouge_scorer.RougeScorer(list(_ROUGE), use_stemmer=True)
        rouge = [scorer.score(reference, prediction)
                 for prediction, reference in zip(predictions, references, strict=True)]
        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score / 100.0,
                **{name: sum(s[name].fmeasure for s in rouge) / len(rouge) for name in _ROUGE}}
