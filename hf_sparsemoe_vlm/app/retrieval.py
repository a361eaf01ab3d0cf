# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Image-text retrieval with the generative model.

A candidate text's score for an image is its length-normalised log-likelihood as the answer to a captioning prompt
about the image: the mean log-probability of the tokens of the assistant turn (the text and the end-of-turn token,
the tokens training scores). Optionally the text's prior is divided out, `log P(t|i) - alpha * log P(t)`, with
`P(t)` the same answer's likelihood to the prompt without an image (VisualGPTScore's debiasing; `alpha = 0` is the
plain likelihood): a generative model otherwise prefers short, common texts whatever the image.

The image and the prompt are encoded once per image and their KV cache serves every candidate text (the prompt
without the image likewise once for all texts), instead of running the vision tower and the prompt once per pair.
"""

import copy
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..modeling_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration
from ..processing_sparsemoe_vlm import SparseMoEVLMProcessor


DEFAULT_RETRIEVAL_PROMPT = "Describe the image."


def _conversation(prompt: str, text: str | None, with_image: bool) -> list[dict]:
    user = [{"type": "image"}] if with_image else []
    messages = [{"role": "user", "content": [*user, {"type": "text", "text": prompt}]}]
    if text is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return messages


def answer_tokens(processor: SparseMoEVLMProcessor, texts: Sequence[str], prompt: str = DEFAULT_RETRIEVAL_PROMPT,
                  with_image: bool = True) -> tuple[list[int], list[list[int]]]:
    """The conversation's token ids before the answer (one image token standing for the image), and for every text
    the ids of its assistant turn: what the chat template writes and training scores."""
    tokenizer = processor.tokenizer
    prefix, answers = None, []
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Candidate text {index} is {text!r}: every candidate must be a non-empty string.")
        encoded = tokenizer.apply_chat_template(
            _conversation(prompt, text, with_image), chat_template=processor.chat_template, tokenize=True,
            return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = encoded["input_ids"], encoded["assistant_masks"]
        if 1 not in mask:
            raise ValueError("The chat template marks no assistant tokens ({% generation %}): retrieval scores the "
                             "answer tokens training scores, so it needs a template that marks them.")
        start = mask.index(1)
        if prefix is None:
            prefix = ids[:start]
        elif ids[:start] != prefix:
            raise ValueError(f"Candidate text {index} changes the tokens before the answer ({text[:40]!r}): the chat "
                             "template must write the answer after a prompt that does not depend on it.")
        answers.append([token for token, scored in zip(ids[start:], mask[start:], strict=True) if scored])
    return prefix, answers


def _prefix_inputs(model, processor, prefix: list[int], image=None) -> dict[str, torch.Tensor]:
    """Model inputs for the tokens before the answer: the image token expanded to the image's tokens and the
    image's pixels, as the processor gives them."""
    if image is not None:
        image_token = processor.image_token_id
        prefix = [t for token in prefix for t in ([token] * model.config.image_seq_length if token == image_token
                                                  else [token])]
    ids = torch.tensor([prefix], device=model.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if image is not None:
        inputs["pixel_values"] = processor.image_processor([image], return_tensors="pt")["pixel_values"].to(
            model.device)
    return inputs


def _check_lengths(model, prefix_length: int, answers: list[list[int]], texts: Sequence[str]) -> None:
    limit = model.config.text_config.max_position_embeddings
    for index, answer in enumerate(answers):
        if prefix_length + len(answer) > limit:
            raise ValueError(f"Candidate text {index} ({texts[index][:40]!r}...) needs {prefix_length + len(answer)} "
                             f"positions with the prompt and the image but the model's context is {limit}: shorten "
                             "or drop it.")


def _padded(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(len(sequences), longest)` token ids and their attention mask."""
    ids = torch.full((len(sequences), max(len(s) for s in sequences)), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids, mask


def _mean_logprob(logprobs: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Per row, the mean log-probability (`logprobs`: rows x positions x vocabulary) of `targets` where `scored`."""
    token_logprobs = logprobs.gather(-1, targets[..., None])[..., 0] * scored
    return (token_logprobs.sum(-1) / scored.sum(-1)).cpu()


def _as_prefix(model: SparseMoEVLMForConditionalGeneration, prompt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `prefix_mask` argument marking the prompt, for a model that attends to its prompt bidirectionally (as it
    was trained and as `generate` runs it); nothing for a causal model."""
    return {"prefix_mask": prompt} if model.config.text_config.prefix_attention else {}


@torch.no_grad()
def _answer_logprobs(model: SparseMoEVLMForConditionalGeneration, prefix_inputs: dict[str, torch.Tensor],
                     answers: list[list[int]], batch_size: int, pad_token_id: int) -> torch.Tensor:
    """Mean log-probability of every answer after one prompt: the prompt runs once, its cache serves each batch."""
    prefix = model(**prefix_inputs, use_cache=True, **_as_prefix(model, prefix_inputs["attention_mask"]))
    prefix_length = prefix_inputs["input_ids"].shape[1]
    first = prefix.logits[0, -1].float().log_softmax(-1)
    scores = []
    for start in range(0, len(answers), batch_size):
        ids, mask = (t.to(model.device) for t in _padded(answers[start:start + batch_size], pad_token_id))
        rows, length = ids.shape
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(rows)
        attention_mask = torch.cat([prefix_inputs["attention_mask"].expand(rows, -1), mask], dim=1)
        positions = torch.arange(prefix_length, prefix_length + length, device=model.device).expand(rows, -1)
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                       mm_token_type_ids=torch.zeros_like(ids)).logits.float()
        # token 0 is predicted by the prompt's last position, token j by the answer's position j - 1
        logprobs = torch.cat([first.expand(rows, 1, -1), logits[:, :-1].log_softmax(-1)], dim=1)
        scores.append(_mean_logprob(logprobs, ids, mask))
    return torch.cat(scores)


@torch.no_grad()
def _pair_logprobs(model, processor, image, prefix: list[int], answers: list[list[int]], batch_size: int,
                   pad_token_id: int) -> torch.Tensor:
    """The same scores without reuse: every (image, text) pair runs whole, the vision tower included."""
    inputs = _prefix_inputs(model, processor, prefix, image)
    expanded = inputs["input_ids"][0].tolist()
    scores = []
    for start in range(0, len(answers), batch_size):
        chunk = answers[start:start + batch_size]
        ids, mask = (t.to(model.device) for t in _padded([expanded + a for a in chunk], pad_token_id))
        prompt = torch.zeros_like(mask)
        prompt[:, :len(expanded)] = 1
        logits = model(input_ids=ids, attention_mask=mask, **_as_prefix(model, prompt),
                       pixel_values=inputs["pixel_values"].expand(len(chunk), -1, -1, -1)).logits.float()
        answer = slice(len(expanded), None)
        scores.append(_mean_logprob(logits[:, len(expanded) - 1:-1].log_softmax(-1), ids[:, answer], mask[:, answer]))
    return torch.cat(scores)


@torch.no_grad()
def score_image_texts(model: SparseMoEVLMForConditionalGeneration, processor: SparseMoEVLMProcessor,
                      images: Sequence, texts: Sequence[str], *, prompt: str = DEFAULT_RETRIEVAL_PROMPT,
                      alpha: float = 0.0, batch_size: int = 64, reuse_image_computation: bool = True,
                      progress: bool = False) -> torch.Tensor:
    """`(len(images), len(texts))` scores: the length-normalised log-likelihood of each text as the answer to
    `prompt` about each image, minus `alpha` times its likelihood to the prompt without an image.

    `reuse_image_computation=False` runs every pair whole (for comparison; the scores agree to float rounding)."""
    if len(images) == 0 or len(texts) == 0:
        raise ValueError(f"Retrieval needs at least one image and one candidate text; got {len(images)} image(s) and "
                         f"{len(texts)} text(s).")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the weight of the text prior) must be in [0, 1], got {alpha}.")
    was_training = model.training
    model.eval()
    try:
        prefix, answers = answer_tokens(processor, texts, prompt, with_image=True)
        _check_lengths(model, len(prefix) - 1 + model.config.image_seq_length, answers, texts)
        pad = processor.tokenizer.pad_token_id or 0
        rows = []
        for image in tqdm(images, desc="scoring images", unit="image", disable=not progress):
            if reuse_image_computation:
                rows.append(_answer_logprobs(model, _prefix_inputs(model, processor, prefix, image), answers,
                                             batch_size, pad))
            else:
                rows.append(_pair_logprobs(model, processor, image, prefix, answers, batch_size, pad))
        scores = torch.stack(rows)
        if alpha > 0:
            prior = text_prior(model, processor, texts, prompt=prompt, batch_size=batch_size)
            scores = scores - alpha * prior[None, :]
        return scores
    finally:
        model.train(was_training)


@torch.no_grad()
def text_prior(model: SparseMoEVLMForConditionalGeneration, processor: SparseMoEVLMProcessor, texts: Sequence[str], *,
               prompt: str = DEFAULT_RETRIEVAL_PROMPT, batch_size: int = 64) -> torch.Tensor:
    """`(len(texts),)` length-normalised log-likelihood of each text as the answer to `prompt` without an image:
    the `log P(t)` that `score_image_texts(..., alpha=a)` subtracts `a` times."""
    was_training = model.training
    model.eval()
    try:
        prefix, answers = answer_tokens(processor, texts, prompt, with_image=False)
        _check_lengths(model, len(prefix), answers, texts)
        return _answer_logprobs(model, _prefix_inputs(model, processor, prefix), answers, batch_size,
                                processor.tokenizer.pad_token_id or 0)
    finally:
        model.train(was_training)


def _chance_recall(num_candidates: int, num_correct: int, k: int) -> float:
    """Probability that a random ranking puts one of `num_correct` right candidates in the top `k`."""
    if k >= num_candidates:
        return 1.0
    return 1.0 - math.comb(num_candidates - num_correct, k) / math.comb(num_candidates, k)


def retrieval_metrics(scores: torch.Tensor, image_captions: Sequence[str], texts: Sequence[str],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k and mean rank in both directions from `(images, texts)` scores, with the chance level of each.

    `image_captions[i]` is image i's own caption, `texts` the candidates. A text equal (as a string) to an image's
    caption is a right answer for it: near-duplicate captions are common (the same shapes in other places), and an
    identical string scores identically, so counting only the image's own copy would turn ties into misses. Ties
    in score with a wrong candidate count against the query: the rank of a query is 1 + the number of wrong
    candidates scoring at least as high as its best right one."""
    scores = scores.float()
    correct = torch.tensor([[caption == text for text in texts] for caption in image_captions])
    if not correct.any(1).all():
        missing = [i for i in range(len(image_captions)) if not correct[i].any()]
        raise ValueError(f"Images {missing[:5]} have no candidate text equal to their caption: include every "
                         "image's caption among the texts.")
    metrics = {}
    for direction, matrix, right in (("image_to_text", scores, correct), ("text_to_image", scores.T, correct.T)):
        queries = right.any(1)  # a text no image has as its caption is no query
        matrix, right = matrix[queries], right[queries]
        best_right = matrix.masked_fill(~right, float("-inf")).amax(1, keepdim=True)
        ranks = 1 + ((matrix >= best_right) & ~right).sum(1).float()
        num_candidates, num_right = matrix.shape[1], right.sum(1)
        for k in ks:
            metrics[f"{direction}_recall@{k}"] = float((ranks <= k).float().mean())
            metrics[f"{direction}_recall@{k}_chance"] = sum(
                _chance_recall(num_candidates, int(m), k) for m in num_right) / len(num_right)
        metrics[f"{direction}_mean_rank"] = float(ranks.mean())
        # a random ranking puts the best of m right answers among N at (N - m) / (m + 1) + 1 on average
        metrics[f"{direction}_mean_rank_chance"] = float(((num_candidates - num_right) / (num_right + 1) + 1).float()
                                                         .mean())
        metrics[f"{direction}_queries"] = int(queries.sum())
    metrics["retrieval_images"], metrics["retrieval_texts"] = len(image_captions), len(texts)
    return metrics


__all__ = ["DEFAULT_RETRIEVAL_PROMPT", "answer_tokens", "retrieval_metrics", "score_image_texts", "text_prior"]
