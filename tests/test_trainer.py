"""The router losses under Transformers' Trainer: gradient accumulation must not over-weight them, and the ReLU
routers' L1 coefficients adapt once per optimizer step."""

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_sparsemoe_vlm.app.training import LaplaceScaleCallback, SparseMoEVLMTrainer

from tiny_models import make_inputs, make_model


class FixedBatches(torch.utils.data.Dataset):
    def __init__(self, model, n: int):
        batch = make_inputs(model.config, batch_size=n, left_pad=([0, 2, 1, 3] * 2)[:n], seed=4)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        self.rows = [{**{k: v[i] for k, v in batch.items()}, "labels": labels[i]} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


@pytest.mark.slow
@pytest.mark.parametrize("router_type", ["topk", "relu"])
def test_gradient_accumulation_keeps_router_losses_at_their_weight(tmp_path, router_type):
    model = make_model(router_type=router_type, router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    data = FixedBatches(model, 4)
    # The loss each micro-batch of 2 rows gives, computed by hand.
    model.train()
    with torch.no_grad():
        micro = []
        for start in (0, 2):
            rows = [data[i] for i in range(start, start + 2)]
            batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
            micro.append(model(**batch).loss.item())
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=0.0, logging_steps=1, report_to=[], use_cpu=True,
                             dataloader_num_workers=0, save_strategy="no", seed=0,
                             train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # Mean of the micro-batch losses: with the aux terms over-weighted by the accumulation steps it would be larger.
    assert logged[0] == pytest.approx(sum(micro) / 2, rel=1e-4)
    assert math.isfinite(logged[0])


@pytest.mark.slow
def test_trainer_evaluate_returns_eval_loss_with_predictions(tmp_path):
    model = make_model(router_type="top_p")
    data = FixedBatches(model, 4)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True,
                             prediction_loss_only=False)
    metrics = Trainer(model=model, args=args, eval_dataset=data).evaluate()
    assert math.isfinite(metrics["eval_loss"])


class RecordLaplaceScales(TrainerCallback):
    """The ReLU routers' L1 coefficients after every optimizer step (runs after `LaplaceScaleCallback`)."""

    def __init__(self):
        self.trajectory = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.trajectory.append([r.laplace_inv_scale.item() for r in model.routers().values()])


def _laplace_trajectory(tmp_path, batch_size: int, accumulation: int, trainer_class=Trainer, callbacks=()):
    model = make_model(router_type="relu", router_target_active_experts=1.5, router_laplace_adapt_rate=1.25)
    data = FixedBatches(model, 8)
    recorder = RecordLaplaceScales()
    args = TrainingArguments(output_dir=str(tmp_path / f"b{batch_size}x{accumulation}"), max_steps=3,
                             per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                             learning_rate=1e-3, report_to=[], use_cpu=True, dataloader_num_workers=0,
                             save_strategy="no", seed=0, train_sampling_strategy="sequential")
    trainer = trainer_class(model=model, args=args, train_dataset=data, callbacks=[*callbacks, recorder])
    trainer.train()
    return recorder.trajectory


@pytest.mark.slow
def test_laplace_coefficients_adapt_once_per_optimizer_step_whatever_the_accumulation(tmp_path):
    one_batch = _laplace_trajectory(tmp_path, batch_size=8, accumulation=1, callbacks=[LaplaceScaleCallback()])
    accumulated = _laplace_trajectory(tmp_path, batch_size=4, accumulation=2, callbacks=[LaplaceScaleCallback()])
    assert len(one_batch) == len(accumulated) == 3
    torch.testing.assert_close(torch.tensor(accumulated), torch.tensor(one_batch), rtol=1e-6, atol=0)
    # One factor of 1.25 (up or down) per step from 1 / b = 1: adapting per micro-batch would give 1.25 ** 2 steps.
    for step, scales in enumerate(one_batch, start=1):
        for scale in scales:
            assert round(math.log(scale) / math.log(1.25)) in range(-step, step + 1, 2)
    assert one_batch[0] != [1.0] * len(one_batch[0])
    # SparseMoEVLMTrainer adds the callback itself.
    own = _laplace_trajectory(tmp_path, batch_size=8, accumulation=1, trainer_class=SparseMoEVLMTrainer)
    torch.testing.assert_close(torch.tensor(own), torch.tensor(one_batch), rtol=1e-6, atol=0)
