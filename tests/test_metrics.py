import pytest

from hf_sparsemoe_vlm.app.metrics import load_metric


def test_vqa_exact_match_normalises_case_space_and_full_stop():
    metric = load_metric("vqa_exact_match")
    result = metric.compute(predictions=["Red.", " two ", "left"], references=["red", "two", "right"])
    assert result == {"exact_match": pytest.approx(2 / 3), "num_examples": 3}
    # Other punctuation counts, as the model card says ("a trailing full stop", not "punctuation").
    assert metric.compute(predictions=["red!", "red,"], references=["red", "red"])["exact_match"] == 0.0


def test_caption_bleu_and_rouge():
    scores = load_metric("caption_scores")
    assert scores.compute(predictions=["a red circle and a blue square"],
                          references=["a red circle and a blue square"])["bleu"] == pytest.approx(1.0)
    partial = scores.compute(predictions=["a red circle and a green square"],
                             references=["a red circle and a blue square"])["bleu"]
    assert 0.0 < partial < 1.0
    rouge = scores.compute(predictions=["a red circle"], references=["a blue square and a red circle"])
    assert rouge["rouge1"] == pytest.approx(0.6)  # 3 of 3 predicted, 3 of 7 reference unigrams: F1 = 0.6
    assert rouge["rougeL"] == pytest.approx(0.6)
    assert set(rouge) == {"bleu", "rouge1", "rouge2", "rougeL"}
    assert scores.compute(predictions=[], references=[]) == {"bleu": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_unknown_metric_lists_the_available_ones():
    with pytest.raises(ValueError, match="caption_scores.*vqa_exact_match"):
        load_metric("accuracy")
