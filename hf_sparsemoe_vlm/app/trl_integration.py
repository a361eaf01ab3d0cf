# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Fine-tuning with TRL: `SparseMoEVLMSFTTrainer`, a `trl.SFTTrainer` whose loss is this model's own.

Needs `trl>=1.16` (`pip install -e ".[trl]"`). Everything of `SFTTrainer` is kept (dataset formats, the
vision-language collator that tokenizes and processes images on the fly, `assistant_only_loss`, prompt-completion
datasets with `completion_only_loss`, PEFT, `SFTConfig`); two things change:

- **The loss.** Stock `SFTTrainer` computes the loss through a fused LM head that it patches onto the model: the head
  runs the backbone and, for Mixture-of-Experts models, adds a Mixtral load-balancing loss computed from
  `backbone_outputs.router_logits` (one `(batch * seq_len, experts)` tensor per sparse layer, which this model
  returns). That trains, but with one balance loss pooled over text and image tokens, no z-loss, no L1 term, and
  ReLU routers' coefficients left unadapted. Here the loss is the model's forward with labels: token cross-entropy
  + `router_aux_loss_coef` x the per-modality load-balancing loss + `router_z_loss_coef` x z-loss (+ the L1 term of
  ReLU routers, whose coefficients adapt once per optimizer step through `LaplaceScaleCallback`, as in
  `SparseMoEVLMTrainer`). `SFTConfig(router_aux_loss_coef=...)` still sets the aux coefficient (TRL writes it into
  the text config, which the forward reads); `aux_loss`, `z_loss` (and `l1_loss`) are logged next to TRL's
  `entropy`, `mean_token_accuracy` and `num_tokens`.
- **Image tokens are never labels.** TRL's vision collator copies `input_ids` into `labels` without masking image
  placeholder tokens (in language-modeling datasets without `assistant_only_loss`), so the collator is wrapped to set
  them to -100.

`SFTConfig` options that replace the loss itself (`loss_type="dft"`, `label_smoothing_factor`, a
`compute_loss_func`) are refused; packing and padding-free training are refused by TRL for vision datasets.
"""

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig
from trl import SFTTrainer

from .training import add_laplace_scale_callback


@dataclass
class IgnoreImageTokenLabels:
    """Wraps a data collator: labels at image placeholder tokens become -100 (the model never predicts them)."""

    collator: Any
    image_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        if "labels" in batch and "input_ids" in batch:
            batch["labels"] = batch["labels"].masked_fill(batch["input_ids"] == self.image_token_id, -100)
        return batch


class SparseMoEVLMSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` for SparseMoE-VLM: same arguments; the loss is the model's own (cross-entropy + router
    losses) and image tokens are excluded from the labels. See the module docstring."""

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        config = AutoConfig.from_pretrained(model) if isinstance(model, str) else getattr(model, "config", None)
        output_router_logits = getattr(config.get_text_config(), "output_router_logits", None) if config else None
        super().__init__(*args, **kwargs)
        if self.args.loss_type != "nll" or self.args.label_smoothing_factor > 0 or self.compute_loss_func is not None:
            raise ValueError(
                f"{type(self).__name__} trains on the model's own loss (cross-entropy + router losses): "
                "`loss_type` must be 'nll', with no `label_smoothing_factor` and no `compute_loss_func`."
            )
        # TRL turns `output_router_logits` on for its fused head; the model's forward computes the router losses
        # whenever labels are given, so the config keeps the user's value (and generation does not return logits).
        text_config = self.model.config.get_text_config()
        if output_router_logits is not None:
            text_config.output_router_logits = output_router_logits
        self.data_collator = IgnoreImageTokenLabels(self.data_collator, self.model.config.image_token_id)
        add_laplace_scale_callback(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = {**inputs, "use_cache": False}
        # Without `fused_lm_head=True`, TRL's patched forward is the model's own.
        outputs = model(**inputs)
        loss = outputs.loss

        with torch.no_grad():
            logits = outputs.logits[:, :-1]
            labels = inputs["labels"][:, 1:].to(logits.device)
            mask = labels != -100
            log_probs = logits.float().log_softmax(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            correct = (logits.argmax(-1) == labels) & mask
            gather = self.accelerator.gather_for_metrics
            num_valid = gather(mask.sum()).sum()
            entropy_sum = gather((entropy * mask).sum()).sum()
            num_correct = gather(correct.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        for name in ("aux_loss", "z_loss", "l1_loss"):
            value = getattr(outputs, name, None)
            if value is not None:
                self._metrics[mode][name].append(gather(value.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss


__all__ = ["IgnoreImageTokenLabels", "SparseMoEVLMSFTTrainer"]
