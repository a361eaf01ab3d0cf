# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Making a trained sparse model smaller from its routing statistics: count, on calibration data, how often every
expert of every group is used, then keep the most used experts of each group and either drop the others (prune) or
fold each into the kept expert whose router logits it resembles most, weighted by use (merge, as MC-SMoE does).
`conversion/compress_experts.py` is the command-line front end.

Dropping an expert removes its router row. Top-k routing with renormalised weights and ReLU routing then give every
token whose experts were all kept exactly what they gave before (top-k softmax keeps the order of the kept experts
and renormalises over the chosen ones; ReLU gates do not depend on the other experts). Top-p routing and top-k
without renormalisation weigh experts by their share of the softmax over the whole group, which grows when experts
leave: their outputs move by the probability mass of the dropped experts.
"""

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling_sparsemoe_vlm import ROUTER_CLASSES, SparseMoEVLMForConditionalGeneration, prompt_prefix_mask


COMPRESSION_METHODS = ("prune", "merge")


@dataclass
class ExpertUsage:
    """Routing statistics of one expert group of one sparse layer over calibration tokens (padding not counted).

    Attributes:
        layer_idx: index of the decoder layer.
        group: `"text"` or `"image"`.
        tokens: the group's tokens seen.
        counts: `(experts,)` tokens that used each expert.
        mass: `(experts,)` summed routing weight each expert received.
        logit_products: `(experts, experts)` sum over tokens of the outer product of the router logits, from which
            the cosine similarity of two experts' logits follows.
    """

    layer_idx: int
    group: str
    tokens: int
    counts: torch.Tensor
    mass: torch.Tensor
    logit_products: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def logit_similarity(self) -> torch.Tensor:
        """`(experts, experts)` cosine similarity of the experts' router logits over the calibration tokens."""
        norms = self.logit_products.diagonal().clamp(min=1e-12).sqrt()
        return self.logit_products / (norms[:, None] * norms[None, :])

    def ranking(self) -> list[int]:
        """Experts from most to least used: by tokens routed, ties by routing mass, then by index."""
        return sorted(range(self.num_experts), key=lambda e: (-int(self.counts[e]), -float(self.mass[e]), e))


def model_inputs(model: SparseMoEVLMForConditionalGeneration, batch: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """A collator batch as the model's inputs without the labels (no loss is wanted), on the model's device; a
    prefix-attention model gets the prompt its labels mark as `prefix_mask`, so it attends as in training."""
    inputs = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
    if model.config.text_config.prefix_attention and "labels" in batch:
        inputs["prefix_mask"] = prompt_prefix_mask(batch["labels"], batch.get("attention_mask"),
                                                   model.config.image_token_id).to(model.device)
    return inputs


@torch.no_grad()
def collect_expert_usage(model: SparseMoEVLMForConditionalGeneration, batches: Iterable[dict[str, torch.Tensor]]
                         ) -> dict[tuple[int, str], ExpertUsage]:
    """Run `model` (in eval mode) over `batches` (processor / collator outputs; labels are ignored) and gather, per
    (sparse layer, group), how the routers used the experts."""
    was_training = model.training
    model.eval()
    usage: dict[tuple[int, str], ExpertUsage] = {}
    try:
        for batch in batches:
            inputs = model_inputs(model, batch)
            routing = model(**inputs, output_routing=True, logits_to_keep=1).routing
            attention_mask = inputs.get("attention_mask")
            flat_mask = attention_mask.reshape(-1) if attention_mask is not None else None
            for record in routing:
                counted = record.counted_tokens(flat_mask)
                logits = record.router_logits[counted].double()
                key = (record.layer_idx, record.group)
                if key not in usage:
                    experts = record.num_experts
                    usage[key] = ExpertUsage(record.layer_idx, record.group, 0, torch.zeros(experts, dtype=torch.long),
                                             torch.zeros(experts, dtype=torch.float64),
                                             torch.zeros(experts, experts, dtype=torch.float64))
                entry = usage[key]
                entry.tokens += int(counted.sum())
                entry.counts += record.expert_mask[counted].sum(0).cpu()
                entry.mass += record.routing_weights[counted].double().sum(0).cpu()
                entry.logit_products += (logits.T @ logits).cpu()
    finally:
        model.train(was_training)
    if not usage:
        raise ValueError("The calibration data gave no tokens to count: pass at least one batch.")
    return usage


def experts_to_keep(usage: dict[tuple[int, str], ExpertUsage], keep: float | dict[str, int]
                    ) -> dict[tuple[int, str], list[int]]:
    """The experts each group keeps (sorted): its most used ones. `keep` is a fraction of every group in (0, 1]
    (rounded, at least one expert), or the number of experts to keep per group name (`{"text": 2, "image": 1}`)."""
    kept = {}
    for key, entry in usage.items():
        if isinstance(keep, dict):
            if entry.group not in keep:
                raise ValueError(f"--keep names no count for the {entry.group!r} expert group (groups: "
                                 f"{sorted({group for _, group in usage})}).")
            count = keep[entry.group]
        else:
            if not 0 < keep <= 1:
                raise ValueError(f"--keep as a fraction must be in (0, 1], got {keep}.")
            count = max(1, round(keep * entry.num_experts))
        if not 1 <= count <= entry.num_experts:
            raise ValueError(f"Cannot keep {count} of the {entry.num_experts} {entry.group} experts: keep between 1 "
                             f"and {entry.num_experts}.")
        kept[key] = sorted(entry.ranking()[:count])
    return kept


def _merge_targets(entry: ExpertUsage, kept: list[int]) -> dict[int, int]:
    """Dropped expert -> the kept expert whose router logits are most similar (cosine over calibration tokens)."""
    similarity = entry.logit_similarity
    return {e: max(kept, key=lambda k: (float(similarity[e, k]), -k)) for e in range(entry.num_experts)
            if e not in kept}


def _match_units(similarity: torch.Tensor) -> torch.Tensor:
    """A one-to-one matching of rows to columns of a square similarity matrix with a high total: rounds of mutual
    best pairs among the unmatched (each round matches at least the best remaining pair). `match[row] = column`."""
    size = similarity.shape[0]
    match = torch.empty(size, dtype=torch.long)
    free_rows, free_cols = torch.arange(size), torch.arange(size)
    while free_rows.numel():
        remaining = similarity[free_rows][:, free_cols]
        best_col, best_row = remaining.argmax(1), remaining.argmax(0)
        mutual = best_row[best_col] == torch.arange(free_rows.numel())
        match[free_rows[mutual]] = free_cols[best_col[mutual]]
        taken = torch.zeros(free_cols.numel(), dtype=torch.bool)
        taken[best_col[mutual]] = True
        free_rows, free_cols = free_rows[~mutual], free_cols[~taken]
    return match


def align_expert_units(gate_up: torch.Tensor, down: torch.Tensor, target_gate_up: torch.Tensor,
                       target_down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One SwiGLU expert (`gate_up` `(2I, H)`, `down` `(H, I)`) with its hidden units reordered to line up with
    those of `target`, computing the same function. Independently trained experts hold similar units in arbitrary
    order, so averaging them unit by unit without this mixes unrelated units (MC-SMoE aligns before merging). A unit
    is its gate row, up row and down column; `silu(gate) * up` is odd in `up`, so a unit whose up row and down column
    both point the other way is the same unit with their signs flipped."""
    size = down.shape[1]

    def features(gate_up, down):
        return (F.normalize(gate_up[:size].double(), dim=1),
                F.normalize(torch.cat([gate_up[size:], down.T], dim=1).double(), dim=1))

    gate, rest = features(gate_up, down)
    target_gate, target_rest = features(target_gate_up, target_down)
    rest_similarity = target_rest @ rest.T
    order = _match_units(target_gate @ gate.T + rest_similarity.abs())
    signs = torch.where(rest_similarity.gather(1, order[:, None]).squeeze(1) < 0, -1.0, 1.0).to(gate_up.dtype)
    aligned_gate_up = torch.cat([gate_up[:size][order], gate_up[size:][order] * signs[:, None]])
    return aligned_gate_up, down[:, order] * signs


def compress_experts(model: SparseMoEVLMForConditionalGeneration, usage: dict[tuple[int, str], ExpertUsage],
                     keep: float | dict[str, int], method: str = "prune", num_experts_per_tok: int | None = None
                     ) -> SparseMoEVLMForConditionalGeneration:
    """A new model with fewer experts per group (the same number in every sparse layer, as the config states it):
    the `keep` most used of each group. `prune` drops the others with their router rows; `merge` folds each dropped
    expert into its most similar kept expert, the weights averaged by the tokens each expert served (a dropped expert
    nothing was routed to contributes nothing). Everything else is copied. `num_experts_per_tok` sets a new top-k
    (needed when fewer experts are kept than each token used)."""
    if method not in COMPRESSION_METHODS:
        raise ValueError(f"Unknown compression method {method!r}; expected one of {COMPRESSION_METHODS}.")
    text_config = model.config.text_config
    expected = {(layer, group) for layer in text_config.sparse_layer_indices for group in text_config.expert_groups}
    if set(usage) != expected:
        raise ValueError(f"The routing statistics cover {sorted(usage)} but the model's expert groups are "
                         f"{sorted(expected)}: collect them on this model with data that has tokens of every group "
                         "(images for the image experts).")
    kept = experts_to_keep(usage, keep)
    config = copy.deepcopy(model.config)
    # A group has as many experts in every layer, so it keeps as many in every layer.
    new_sizes = {group: len(experts) for (_, group), experts in kept.items()}
    config.text_config.num_experts = new_sizes["text"]
    if "image" in new_sizes:
        config.text_config.num_image_experts = new_sizes["image"]
    if num_experts_per_tok is not None:
        config.text_config.num_experts_per_tok = num_experts_per_tok
    router_class = ROUTER_CLASSES[text_config.router_type]
    if not router_class.dynamic and config.text_config.num_experts_per_tok > min(new_sizes.values()):
        raise ValueError(f"Keeping {min(new_sizes.values())} expert(s) in a group leaves fewer than the "
                         f"{config.text_config.num_experts_per_tok} each token uses (num_experts_per_tok): keep more, "
                         "or lower the top-k (--num_experts_per_tok).")
    bound = config.text_config.router_max_experts_per_tok
    if bound is not None and bound > min(new_sizes.values()):
        config.text_config.router_max_experts_per_tok = min(new_sizes.values())
    config.text_config._check_fields()

    state = model.state_dict()
    for (layer, group), experts in kept.items():
        prefix = f"model.language_model.layers.{layer}.mlp.{group}_moe."
        index = torch.tensor(experts)
        for name in ("router.weight", "router.bias"):
            if prefix + name in state:
                state[prefix + name] = state[prefix + name][index]
        if method == "merge":
            merged = _merged_group(state, prefix, usage[(layer, group)], experts)
            state[prefix + "experts.gate_up_proj"], state[prefix + "experts.down_proj"] = merged
        else:
            for name in ("experts.gate_up_proj", "experts.down_proj"):
                state[prefix + name] = state[prefix + name][index].contiguous()
    compressed = SparseMoEVLMForConditionalGeneration(config).to(model.dtype)
    compressed.load_state_dict(state, strict=True)
    return compressed.to(model.device).eval()


def _merged_group(state: dict[str, torch.Tensor], prefix: str, entry: ExpertUsage, kept: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept experts' fused tensors after folding every dropped expert into its merge target: units aligned to
    the target's, then averaged weighted by the tokens each expert served (a dropped expert nothing was routed to
    contributes nothing; a target that served no token keeps its own weights)."""
    gate_up, down = state[prefix + "experts.gate_up_proj"], state[prefix + "experts.down_proj"]
    served = entry.counts.to(torch.float64)
    merged_gate_up = [gate_up[k].double() * served[k] for k in kept]
    merged_down = [down[k].double() * served[k] for k in kept]
    total = [served[k].clone() for k in kept]
    for dropped, target in _merge_targets(entry, kept).items():
        slot = kept.index(target)
        aligned_gate_up, aligned_down = align_expert_units(gate_up[dropped], down[dropped], gate_up[target],
                                                           down[target])
        merged_gate_up[slot] += aligned_gate_up.double() * served[dropped]
        merged_down[slot] += aligned_down.double() * served[dropped]
        total[slot] += served[dropped]
    for slot, k in enumerate(kept):
        if total[slot] > 0:
            merged_gate_up[slot] /= total[slot]
            merged_down[slot] /= total[slot]
        else:
            merged_gate_up[slot], merged_down[slot] = gate_up[k].double(), down[k].double()
    return (torch.stack(merged_gate_up).to(gate_up.dtype).contiguous(),
            torch.stack(merged_down).to(down.dtype).contiguous())


def distill_compressed_model(student: SparseMoEVLMForConditionalGeneration,
                             teacher: SparseMoEVLMForConditionalGeneration, batches: list[dict[str, torch.Tensor]],
                             steps: int, learning_rate: float = 1e-4, seed: int = 0) -> list[float]:
    """Fine-tune a compressed model (`student`, in place) towards the model it came from (`teacher`) for `steps`
    AdamW steps over `batches` (cycled, shuffled per pass): the KL divergence of the student's next-token
    distribution from the teacher's on every real token. No labels are needed, so any calibration data serves; it
    recovers what removing experts cost the routers and the experts that absorbed others. Returns the loss of each
    step. The student is left in eval mode."""
    if steps < 0:
        raise ValueError(f"The number of distillation steps must be >= 0, got {steps}.")
    if steps and not batches:
        raise ValueError("Distillation needs at least one calibration batch.")
    if learning_rate <= 0:
        raise ValueError(f"The distillation learning rate must be positive, got {learning_rate}.")
    teacher.eval()
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        batch = batches[order.pop()]
        inputs = model_inputs(student, batch)
        real = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
        with torch.no_grad():
            target = F.log_softmax(teacher(**inputs).logits.float(), dim=-1)
        predicted = F.log_softmax(student(**inputs).logits.float(), dim=-1)
        divergence = F.kl_div(predicted, target, log_target=True, reduction="none").sum(-1)
        loss = divergence[real].mean() if real is not None else divergence.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    student.eval()
    return losses


def usage_summary(usage: dict[tuple[int, str], ExpertUsage], kept: dict[tuple[int, str], list[int]]
                  ) -> dict[str, dict]:
    """Per `layer<i>.<group>`: tokens seen, tokens per expert, the experts kept, and the share of routing mass they
    received (JSON-ready, for `conversion.json` and the summary)."""
    summary = {}
    for (layer, group), entry in sorted(usage.items()):
        mass = float(entry.mass.sum())
        summary[f"layer{layer}.{group}"] = {
            "tokens": entry.tokens, "tokens_per_expert": entry.counts.tolist(), "kept": kept[(layer, group)],
            "kept_mass_share": round(float(entry.mass[kept[(layer, group)]].sum()) / mass, 4) if mass else 1.0}
    return summary


__all__ = ["COMPRESSION_METHODS", "ExpertUsage", "align_expert_units", "collect_expert_usage", "compress_experts",
           "distill_compressed_model", "experts_to_keep", "model_inputs", "usage_summary"]
