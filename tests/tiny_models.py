"""Tiny SparseMoE-VLM configs and inputs shared by the tests (hidden sizes 32, a few experts: seconds on CPU), and
the files of a training run folder."""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from transformers import TrainerState, TrainingArguments

from hf_sparsemoe_vlm import SparseMoEVLMConfig, SparseMoEVLMForConditionalGeneration


CONVERSION_SCRIPTS = Path(__file__).resolve().parents[1] / "conversion"
BENCHMARK_SCRIPTS = CONVERSION_SCRIPTS.parent / "benchmarks"
IMAGE_TOKEN_ID = 127
PAD_TOKEN_ID = 0
IMAGE_SIZE = 32

VISION_CONFIGS = {
    "siglip": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 8},
    "clip": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 8, "projection_dim": 32},
    "dinov2": {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
               "mlp_ratio": 2, "image_size": IMAGE_SIZE, "patch_size": 8},
    "convnext": {"model_type": "convnext", "hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2,
                 "image_size": IMAGE_SIZE},
    "resnet": {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1],
               "layer_type": "basic"},
}


def make_config(vision: str = "siglip", **text_overrides) -> SparseMoEVLMConfig:
    """A tiny config; keyword arguments override the text (decoder) config."""
    text_config = {
        "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "moe_intermediate_size": 32, "num_experts": 4,
        "num_image_experts": 2, "num_experts_per_tok": 2, "pad_token_id": PAD_TOKEN_ID, "bos_token_id": 1,
        "eos_token_id": 2, "max_position_embeddings": 256,
    }
    text_config.update(text_overrides)
    return SparseMoEVLMConfig(
        vision_config=dict(VISION_CONFIGS[vision]), text_config=text_config, image_token_id=IMAGE_TOKEN_ID,
        image_size=IMAGE_SIZE,
    )


def make_model(vision: str = "siglip", seed: int = 0, **text_overrides) -> SparseMoEVLMForConditionalGeneration:
    torch.manual_seed(seed)
    return SparseMoEVLMForConditionalGeneration(make_config(vision, **text_overrides)).eval()


def make_inputs(config: SparseMoEVLMConfig, batch_size: int = 2, text_len: int = 6, with_image: bool = True,
                left_pad: list[int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """`[pad..] bos <image tokens> text...` prompts; `left_pad[i]` pads row i on the left."""
    generator = torch.Generator().manual_seed(seed)
    left_pad = left_pad or [0] * batch_size
    n_image = config.image_seq_length if with_image else 0
    length = max(left_pad) + 1 + n_image + text_len
    input_ids = torch.full((batch_size, length), PAD_TOKEN_ID)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    for row in range(batch_size):
        body_len = 1 + n_image + text_len - (left_pad[row] - min(left_pad))
        text = torch.randint(3, 120, (body_len - 1 - n_image,), generator=generator)
        body = torch.cat([torch.tensor([1]), torch.full((n_image,), IMAGE_TOKEN_ID), text])
        input_ids[row, length - body_len:] = body
        attention_mask[row, length - body_len:] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_image:
        inputs["pixel_values"] = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return inputs


CORPUS = [
    "a red circle above a blue square",
    "what colour is the triangle? green",
    "two yellow stars left of a purple circle",
    "how many squares are there? three",
    "the small orange triangle is below the big cyan square",
] * 10


def make_processor_and_model(vision: str = "siglip", seed: int = 0, **text_overrides):
    """A trained BPE tokenizer + image processor, and a tiny model whose config matches them."""
    from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, build_processor

    config = make_config(vision, **{"vocab_size": 320, **text_overrides})
    processor = build_processor(config, CORPUS)
    torch.manual_seed(seed)
    return processor, SparseMoEVLMForConditionalGeneration(config).eval()


# Script preamble for subprocesses that must load checkpoints through remote code only: the installed package is
# made unimportable (and checked to be).
BLOCK_PACKAGE = """
import sys
sys.modules["hf_sparsemoe_vlm"] = None
try:
    import hf_sparsemoe_vlm
except ImportError:
    pass
else:
    raise SystemExit("package unexpectedly importable")
"""


def fake_run(folder, router_type="topk"):
    """The files a `sparsemoe-vlm train` run leaves next to the weights, written as it writes them: results as
    `Trainer.save_metrics` does, the Trainer's state and arguments by their own serialisers, the script's arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "all_results.json").write_text(json.dumps({
        "validation_loss": 0.37, "test_exact_match": 0.614, "test_exact_match_shape": 0.316,
        "test_caption_bleu": 12.5, "test_caption_rougeL": 0.71, "train_minutes": 9.1}, indent=4, sort_keys=True))
    (folder / "run_args.json").write_text(json.dumps({
        "model": {"model_name_or_path": None, "preset": "tiny", "training_stage": "full"},
        "data": {"dataset": "synthetic", "num_train_examples": 40000, "image_size": 64}, "world_size": 1}))
    (folder / "training_args.json").write_text(TrainingArguments(
        output_dir=str(folder), max_steps=3000, num_train_epochs=3.0, per_device_train_batch_size=32,
        learning_rate=0.002, seed=0, report_to="none", use_cpu=True).to_json_string())
    routing = {"routing/text/experts_per_token": 1.5, "routing/text/load_entropy": 0.97,
               "routing/text/max_expert_load": 0.31, "routing/text/dead_experts": 0.0,
               "routing/image/experts_per_token": 1.25, "routing/image/load_entropy": 0.9,
               "routing/image/max_expert_load": 0.6, "routing/image/dead_experts": 1.0}
    TrainerState(global_step=3000, log_history=[{"loss": 2.0, "step": 50, **routing}, {"train_loss": 1.0}]
                 ).save_to_json(str(folder / "trainer_state.json"))
    (folder / "expert_load.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


# The Trainer settings runs written before all_results.json / trainer_state.json / training_args.json kept in
# run_args.json's "training", next to the process count and the precision.
OLD_TRAINING_SETTINGS = ("max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                         "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed")


def to_old_layout(folder):
    """Rewrite a run folder as `sparsemoe-vlm train` wrote it before Transformers wrote its files: metrics.json,
    log_history.json and the Trainer settings inside run_args.json, by hand."""
    metrics = json.loads((folder / "all_results.json").read_text())
    # In the old writer's order (validation figures first), not sorted as Trainer writes them.
    old_order = sorted(metrics, key=lambda key: not key.startswith("validation_"))
    (folder / "metrics.json").write_text(json.dumps({key: metrics[key] for key in old_order}, indent=2))
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    (folder / "log_history.json").write_text(json.dumps(history, indent=2))
    arguments = json.loads((folder / "training_args.json").read_text())
    run_args = json.loads((folder / "run_args.json").read_text())
    run_args["training"] = {**{key: arguments[key] for key in OLD_TRAINING_SETTINGS},
                            "world_size": run_args.pop("world_size"),
                            "precision": "bf16" if arguments["bf16"] else "fp16" if arguments["fp16"] else "fp32"}
    (folder / "run_args.json").write_text(json.dumps(run_args, indent=2))
    for name in ("all_results.json", "trainer_state.json", "training_args.json"):
        (folder / name).unlink()
    return folder


def _load_script(path: Path):
    """A script as a fresh module (the scripts are not a package), registered under its name so that its
    dataclasses resolve their module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def load_conversion_script(name: str):
    """`conversion/<name>.py` as a fresh module."""
    return _load_script(CONVERSION_SCRIPTS / f"{name}.py")


def load_benchmark_script(name: str):
    """`benchmarks/<name>.py` as a fresh module."""
    return _load_script(BENCHMARK_SCRIPTS / f"{name}.py")
