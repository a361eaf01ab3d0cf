"""Stage 0: vision tower pretraining on the synthetic set's per-patch labels."""
import json
import math

import PIL.Image
import pytest
import torch
from accelerate.state import AcceleratorState, is_initialized

from hf_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMForConditionalGeneration, SparseMoEVLMImageProcessor
from hf_sparsemoe_vlm.app.cli import DEFAULT_VISION_PRETRAINING_STEPS, main
from hf_sparsemoe_vlm.app.synthetic_shapes import (
    COLOURS,
    PATCH_LABELS,
    PlacedShape,
    patch_centre_offsets,
    patch_label_batches,
    patch_labels,
)
from hf_sparsemoe_vlm.app.training import preset_config, pretrain_vision_tower, stage_zero_accelerator


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one precision per process (set by the first Accelerator): each test here starts without
    one, whatever ran before it (stage 0's default accelerator would take it)."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_patch_labels_mark_the_cells_each_shape_covers():
    square = PlacedShape("square", "red", x=12, y=12, radius=6)  # pixels 6..18 of a 48 px image
    labels = patch_labels([square], image_size=48, grid_size=6)  # 8 px cells
    red_square = PATCH_LABELS.index("red square")
    grid = [labels[row * 6:(row + 1) * 6] for row in range(6)]
    # Cells 0, 1, 2 overlap the square by 2, 8 and 3 px in each direction: area fractions (2*2, 2*8, 2*3, 8*8,
    # 8*3, 3*3) / 64, of which those >= 1/8 (the default min_coverage) count.
    S = red_square
    assert grid[:3] == [[0, S, 0, 0, 0, 0], [S, S, S, 0, 0, 0], [0, S, S, 0, 0, 0]]
    assert grid[3:] == [[0] * 6] * 3
    assert patch_labels([square], 48, 6, min_coverage=0.3)[6:9] == [0, S, S]
    # A second shape takes the cells it covers; the square keeps its own.
    circle = PlacedShape("circle", "blue", x=30, y=12, radius=5)
    both = patch_labels([square, circle], image_size=48, grid_size=6)
    assert both[9] == PATCH_LABELS.index("blue circle") and both[6:9] == [S, S, S]
    assert len(PATCH_LABELS) == 16 and PATCH_LABELS[0] == "background"


def test_centre_offsets_point_every_cell_of_an_object_at_its_centre():
    square = PlacedShape("square", "red", x=12, y=12, radius=6)
    circle = PlacedShape("circle", "blue", x=30, y=12, radius=5)
    offsets = patch_centre_offsets([square, circle], image_size=48, grid_size=6)
    labels = patch_labels([square, circle], image_size=48, grid_size=6)
    assert [cell is None for cell in offsets] == [label == 0 for label in labels]  # objects' cells only
    for index, offset in enumerate(offsets):
        if offset is None:
            continue
        row, col = divmod(index, 6)
        owner = square if labels[index] == PATCH_LABELS.index("red square") else circle
        # Cell centre + offset (in 8 px cells) = the owning object's centre (pixel centres at +0.5).
        assert (col + 0.5 + offset[0]) * 8 == pytest.approx(owner.x + 0.5)
        assert (row + 0.5 + offset[1]) * 8 == pytest.approx(owner.y + 0.5)
    batch = next(patch_label_batches(1, 2, grid_size=6, seed=3, with_offsets=True))
    assert len(batch) == 3 and [len(cells) for cells in batch[2]] == [36, 36]
    assert batch[:2] == next(patch_label_batches(1, 2, grid_size=6, seed=3))  # same scenes and labels


def test_pretraining_with_offsets_makes_tokens_carry_their_objects_position():
    torch.manual_seed(0)
    model, image_processor = _resnet_model()
    pretrain_vision_tower(model, image_processor, patch_label_batches(80, 16, grid_size=6, seed=0, with_offsets=True),
                          len(PATCH_LABELS), logging_steps=0)
    images, _, offsets = next(patch_label_batches(1, 64, grid_size=6, seed=99, with_offsets=True))
    with torch.no_grad():
        tokens = model.get_image_features(image_processor(images, return_tensors="pt")["pixel_values"]).vision_tokens
    known = torch.tensor([[cell is not None for cell in per_image] for per_image in offsets])
    targets = torch.tensor([[cell or (0.0, 0.0) for cell in per_image] for per_image in offsets])[known]
    features = torch.cat([tokens[known], torch.ones(int(known.sum()), 1)], dim=1)
    fitted = features @ torch.linalg.lstsq(features, targets).solution  # a linear read-out of the tokens
    residual = (fitted - targets).pow(2).mean()
    assert residual < 0.25 * targets.var(0).mean()  # most of the offset is linearly readable
    with pytest.raises(ValueError, match=r"Centre offsets must give one entry per image token: \(2, 36\)"):
        pretrain_vision_tower(model, image_processor, [(images[:2], [[0] * 36] * 2, [[None] * 35] * 2)], 16)


def test_patch_label_batches_are_deterministic_and_match_their_images():
    first = list(patch_label_batches(2, 3, grid_size=4, seed=7))
    again = list(patch_label_batches(2, 3, grid_size=4, seed=7))
    assert [labels for _, labels in first] == [labels for _, labels in again]
    images, labels = first[0]
    assert len(images) == len(labels) == 3 and all(len(row) == 16 for row in labels)
    assert all(image.size == (48, 48) for image in images)
    for image, row in zip(images, labels, strict=True):  # the labelled cells hold the labelled colour
        for cell, label in enumerate(row):
            if label:
                colour = PATCH_LABELS[label].split()[0]
                crop = image.crop(((cell % 4) * 12, (cell // 4) * 12, (cell % 4 + 1) * 12, (cell // 4 + 1) * 12))
                assert COLOURS[colour] in {rgb for _, rgb in crop.getcolors()}


def _resnet_model():
    config = SparseMoEVLMConfig(
        vision_config={"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [24, 32], "depths": [1, 1],
                       "layer_type": "basic", "downsample_in_first_stage": False},
        text_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "moe_intermediate_size": 32,
                     "num_experts": 2, "num_image_experts": 2, "num_experts_per_tok": 1},
        image_token_id=3, image_size=48)
    return SparseMoEVLMForConditionalGeneration(config), SparseMoEVLMImageProcessor(size={"height": 48, "width": 48})


def test_pretraining_teaches_the_tower_per_patch_labels_and_touches_nothing_else():
    torch.manual_seed(0)
    model, image_processor = _resnet_model()
    assert model.config.image_seq_length == 36
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.model.vision_tower.requires_grad_(False)  # a frozen tower trains in stage 0 and is frozen again after
    model.eval()
    losses = pretrain_vision_tower(model, image_processor, patch_label_batches(60, 16, grid_size=6, seed=0),
                                   len(PATCH_LABELS), logging_steps=0)
    assert len(losses) == 60 and losses[-1] < 0.25 * losses[0]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("model.vision_tower.") for name in changed)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters()) and not model.training
    # The image tokens the decoder reads now separate the classes: a fresh linear probe on them is near perfect.
    images, labels = next(patch_label_batches(1, 64, grid_size=6, seed=99))
    with torch.no_grad():
        tokens = model.get_image_features(image_processor(images, return_tensors="pt")["pixel_values"]).vision_tokens
    assert tokens.shape == (64, 36, 32)
    probe = torch.nn.Linear(32, len(PATCH_LABELS))
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
    targets = torch.tensor(labels).flatten()
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(probe(tokens.reshape(-1, 32)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (probe(tokens.reshape(-1, 32)).argmax(-1) == targets).float().mean()
    assert accuracy > 0.9


def _plain_stage_zero(model, image_processor, batches, num_labels: int, learning_rate: float) -> list[float]:
    """Stage 0 as a plain PyTorch loop (tower and the two heads, AdamW): one process, fp32."""
    head = torch.nn.Linear(model.config.vision_feature_size, num_labels)
    offset_head = torch.nn.Linear(model.config.vision_feature_size, 2)
    tower = model.model.vision_tower.train().requires_grad_(True)
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters(), *offset_head.parameters()],
                                  lr=learning_rate, weight_decay=0.0)
    losses = []
    for images, labels, offsets in batches:
        tokens = model.get_image_features(image_processor(images, return_tensors="pt")["pixel_values"]).vision_tokens
        loss = torch.nn.functional.cross_entropy(head(tokens).reshape(-1, num_labels), torch.tensor(labels).flatten())
        known = torch.tensor([[cell is not None for cell in per_image] for per_image in offsets])
        targets = torch.tensor([[cell or (0.0, 0.0) for cell in per_image] for per_image in offsets])
        loss = loss + torch.nn.functional.mse_loss(offset_head(tokens)[known], targets[known])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_stage_zero_under_accelerate_is_the_plain_loop_in_fp32_and_trains_in_bf16():
    def batches(steps=12):
        return patch_label_batches(steps, 8, grid_size=6, seed=0, with_offsets=True)

    torch.manual_seed(0)
    reference_model, image_processor = _resnet_model()
    reference = _plain_stage_zero(reference_model, image_processor, batches(), len(PATCH_LABELS), 2e-3)
    torch.manual_seed(0)
    model, _ = _resnet_model()
    with stage_zero_accelerator("no", cpu=True) as accelerator:
        losses = pretrain_vision_tower(model, image_processor, batches(), len(PATCH_LABELS), logging_steps=0,
                                       accelerator=accelerator)
    assert losses == reference  # bit for bit, and so are the weights
    reference_weights = reference_model.state_dict()
    assert all(torch.equal(value, reference_weights[name]) for name, value in model.state_dict().items())
    assert not is_initialized()  # the process's Accelerate state is left unset for the Trainer's accelerator

    torch.manual_seed(0)
    model, _ = _resnet_model()
    with stage_zero_accelerator("bf16", cpu=True) as accelerator:
        losses = pretrain_vision_tower(model, image_processor, batches(30), len(PATCH_LABELS), logging_steps=0,
                                       accelerator=accelerator)
        assert accelerator.mixed_precision == "bf16"
    assert losses[:12] != reference  # autocast ran in bf16
    assert all(math.isfinite(loss) for loss in losses) and sum(losses[-5:]) < 0.6 * sum(losses[:5])
    # The model stays as it was but for the tower's weights: fp32, its own forward (Accelerate wrapped only the
    # stage-0 module's), nothing left prepared.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert "forward" not in vars(model) and "forward" not in vars(model.model.vision_tower)
    assert accelerator._models == [] and accelerator._optimizers == []


def test_pretraining_rejects_labels_that_do_not_match_the_image_tokens():
    model, image_processor = _resnet_model()
    images = [PIL.Image.new("RGB", (48, 48))] * 2
    with pytest.raises(ValueError, match=r"shape \(num_images, image_seq_length\) = \(2, 36\).*got \(2, 16\)"):
        pretrain_vision_tower(model, image_processor, [(images, [[0] * 16] * 2)], num_labels=16)
    with pytest.raises(ValueError, match=r"must be in \[0, 16\).*got values in \[0, 16\]"):
        pretrain_vision_tower(model, image_processor, [(images, [[0] * 35 + [16]] * 2)], num_labels=16)


def test_cli_rejects_a_negative_number_of_stage_zero_steps(tmp_path):
    # (Stage 0 on other data than the synthetic set: tests/test_training.py.)
    assert DEFAULT_VISION_PRETRAINING_STEPS > 0
    with pytest.raises(ValueError, match="--vision_pretraining_steps must be >= 0"):
        main(["train", "--vision_pretraining_steps", "-1", "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
              "--num_train_examples", "8", "--num_validation_examples", "0", "--num_test_examples", "1",
              "--use_cpu", "true"])
    assert preset_config("tiny-resnet").image_seq_length ** 0.5 % 1 == 0  # a square grid to label


@pytest.mark.slow
def test_cli_pretrains_then_freezes_the_tower_and_records_it(tmp_path, capsys):
    output = tmp_path / "run"
    main(["train", "--output_dir", str(output), "--preset", "tiny-resnet", "--vision_pretraining_steps", "4",
          "--max_steps", "2", "--num_train_examples", "16", "--num_validation_examples", "0",
          "--num_test_examples", "2", "--per_device_train_batch_size", "4", "--max_new_tokens", "2",
          "--save_strategy", "no", "--use_cpu", "true"])
    printed = capsys.readouterr().out
    assert "vision pretraining: 4 steps" in printed and "(stage full)" in printed
    run_args = json.loads((output / "run_args.json").read_text())["model"]
    assert run_args["vision_pretraining_steps"] == 4 and run_args["freeze_vision_tower"] is True
    card = (output / "README.md").read_text()
    assert "| vision tower pretraining steps (stage 0, per-patch labels) | 4 |" in card
    assert "| vision tower frozen | True |" in card


def test_stage_zero_defaults_resolve_from_the_run():
    from hf_sparsemoe_vlm.app.cli import _vision_pretraining, parse_train_args

    def resolved(*argv):
        model_args, data_args, training_args = parse_train_args(["--output_dir", "unused", *argv])
        # resuming=True resolves the defaults without running stage 0 (a resumed run takes the tower from disk)
        _vision_pretraining(None, None, model_args, data_args, training_args, resuming=True)
        return model_args.vision_pretraining_steps, model_args.freeze_vision_tower

    assert resolved() == (DEFAULT_VISION_PRETRAINING_STEPS, True)  # a preset from scratch on the synthetic set
    assert resolved("--model_name_or_path", "some/checkpoint") == (0, False)  # a pretrained model: nothing to do
    assert resolved("--vision_pretraining_steps", "0") == (0, False)
    assert resolved("--freeze_vision_tower", "false") == (DEFAULT_VISION_PRETRAINING_STEPS, False)
    assert resolved("--vision_pretraining_steps", "7", "--freeze_vision_tower", "true") == (7, True)


def test_stage_zero_is_refused_where_accelerate_would_shard_the_tower(monkeypatch):
    from hf_sparsemoe_vlm.app.cli import _vision_pretraining, parse_train_args

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch --use_fsdp` sets it
    model_args, data_args, training_args = parse_train_args(["--output_dir", "unused", "--use_cpu", "true"])
    with pytest.raises(ValueError, match="stage 0 trains the vision tower with plain data parallelism"):
        _vision_pretraining(None, None, model_args, data_args, training_args, resuming=False)
    # Nothing to refuse without stage 0, or when a resumed run takes its tower from the checkpoint.
    _vision_pretraining(None, None, model_args, data_args, training_args, resuming=True)
    model_args, data_args, training_args = parse_train_args(["--output_dir", "unused", "--use_cpu", "true",
                                                             "--vision_pretraining_steps", "0"])
    _vision_pretraining(None, None, model_args, data_args, training_args, resuming=False)
