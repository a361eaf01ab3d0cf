#!/usr/bin/env python
# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Compose a SparseMoE-VLM from separately pretrained parts: a vision encoder + a Llama-family causal LM + a new
projector.

The vision folder may hold any in-library vision model the SparseMoE-VLM config supports (CLIP / SigLIP vision
models or their dual text-image checkpoints, DINOv2, ViT, ConvNeXt, ResNet). The LM folder holds a Llama, Mistral or
Qwen2 causal LM with its tokenizer. The LM's MLPs in the selected layers are upcycled into image and text expert
groups, the tokenizer gets an `<image>` token (embeddings and LM head grow by the new rows, initialised to the mean
of the existing ones) and the projector is freshly initialised, so the result is ready for projector pre-training
(`sparsemoe-vlm train --model_name_or_path <output> --training_stage projector`).

With `--noise_std 0` the composed model reproduces the LM on text (logits over the LM's vocabulary, max abs
difference < 1e-5) and the vision encoder's features; the script checks both on the written checkpoint.

Example:
    python conversion/compose.py --vision openai/clip-vit-base-patch32 --language_model Qwen/Qwen2-0.5B \\
        --output clip-qwen2-moe --sparse_layers every_other --num_experts 4 --num_image_experts 4
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from hf_sparsemoe_vlm import (
    SparseMoEVLMConfig,
    SparseMoEVLMForConditionalGeneration,
    SparseMoEVLMImageProcessor,
    SparseMoEVLMProcessor,
)
from hf_sparsemoe_vlm.conversion import scripts
from hf_sparsemoe_vlm.conversion.upcycling import (
    SUPPORTED_TEXT_MODEL_TYPES,
    add_upcycling_arguments,
    sparse_text_config_from_dense,
    upcycle_decoder_state_dict,
    upcycling_options,
)
from hf_sparsemoe_vlm.processing_sparsemoe_vlm import IMAGE_TOKEN


TOLERANCE = 1e-5


def build_parser() -> argparse.ArgumentParser:
    parser = scripts.conversion_parser("compose.py", __doc__, dtype_help=(
        "dtype of the written weights (auto: the one the language model's config.json records, float32 if none). "
        "The checks against the parts then use their weights rounded to this dtype."))
    parser.add_argument("--vision", required=True, help="Folder of a pretrained vision encoder (+ image processor).")
    parser.add_argument("--language_model", required=True, help="Folder of a Llama-family causal LM + tokenizer.")
    parser.add_argument("--image_size", type=int, default=None,
                        help="Input resolution (default: the encoder's image_size, 224 if it has none).")
    parser.add_argument("--vision_feature_layer", type=int, default=-1,
                        help="Hidden state of the encoder used as image features (LLaVA uses -2).")
    parser.add_argument("--vision_feature_select_strategy", choices=("default", "full"), default="default",
                        help="default: drop class/register tokens; full: keep them.")
    parser.add_argument("--projector_hidden_act", default="gelu")
    add_upcycling_arguments(parser)
    return parser


def vision_config_of(config):
    """The vision sub-config of a dual (CLIP / SigLIP) config, or the config itself."""
    return getattr(config, "vision_config", None) or config


def check_inputs(vision_dir: Path, lm_dir: Path):
    """Validate both folders from their configs, before loading any weight."""
    for name, folder in (("--vision", vision_dir), ("--language_model", lm_dir)):
        if not (folder / "config.json").is_file():
            raise ValueError(f"{name} {folder} has no config.json; pass a saved model folder.")
    lm_config = AutoConfig.from_pretrained(lm_dir)
    if lm_config.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ValueError(f"--language_model holds a {lm_config.model_type!r} model; supported: "
                         f"{SUPPORTED_TEXT_MODEL_TYPES}.")
    vision_config = vision_config_of(AutoConfig.from_pretrained(vision_dir))
    return vision_config, lm_config


def vision_half(model):
    """The vision model of a dual text-image checkpoint (CLIP, SigLIP), or the model itself."""
    return model.vision_model if hasattr(model, "vision_model") and hasattr(model, "text_model") else model


def load_vision_weights(tower, vision_dir: Path):
    """Copy the encoder's weights into `tower` (built from the same config) and return the loaded encoder. Pooling
    heads the VLM never uses are left out; anything missing or not fitting raises."""
    encoder = vision_half(scripts.load_source("the vision encoder", vision_dir, lambda: AutoModel.from_pretrained(
        vision_dir, dtype=torch.float32))).eval()
    state, target = encoder.state_dict(), tower.state_dict()
    missing = sorted(set(target) - set(state))
    if missing:
        raise ValueError(f"The vision encoder in {vision_dir} lacks weights the tower needs: {missing[:5]}.")
    unused = sorted(k for k in set(state) - set(target) if not k.startswith(("head.", "pooler.")))
    if unused:
        raise ValueError(f"Weights of the vision encoder in {vision_dir} do not fit the tower: {unused[:5]}.")
    tower.load_state_dict({k: state[k] for k in target})
    return encoder


def compose(args):
    """Build the composed model, its processor, and the LM / encoder used to check it."""
    vision_dir, lm_dir = Path(args.vision), Path(args.language_model)
    vision_config, lm_config = check_inputs(vision_dir, lm_dir)
    tokenizer = scripts.load_source("the tokenizer", lm_dir, lambda: AutoTokenizer.from_pretrained(lm_dir))
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lm = scripts.load_source("the language model", lm_dir, lambda: AutoModelForCausalLM.from_pretrained(
        lm_dir, dtype=torch.float32)).eval()
    old_vocab = lm.config.vocab_size

    text_config = sparse_text_config_from_dense(lm_config, **upcycling_options(args))
    text_config.vocab_size = old_vocab
    image_size = args.image_size or getattr(vision_config, "image_size", None) or 224
    config = SparseMoEVLMConfig(
        # the image token id is set once the embeddings have its row (below)
        vision_config=vision_config.to_dict(), text_config=text_config, image_token_id=0, image_size=image_size,
        projector_hidden_act=args.projector_hidden_act, vision_feature_layer=args.vision_feature_layer,
        vision_feature_select_strategy=args.vision_feature_select_strategy,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(args.seed)
    model = SparseMoEVLMForConditionalGeneration(config)  # projector keeps its fresh initialisation

    lm_state = lm.state_dict()
    decoder = upcycle_decoder_state_dict({k[len("model."):]: v for k, v in lm_state.items() if k.startswith("model.")},
                                         text_config, noise_std=args.noise_std, seed=args.seed)
    missing, unexpected = model.model.language_model.load_state_dict(decoder, strict=False)
    missing = [k for k in missing if not k.endswith("laplace_inv_scale")]
    if missing or unexpected:
        raise ValueError(f"Decoder weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    if not config.tie_word_embeddings:
        model.lm_head.weight.data.copy_(lm_state["lm_head.weight"])
    if len(tokenizer) > old_vocab:  # the image token's rows, sampled close to the mean of the existing ones
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.image_token_id = image_token_id
    encoder = load_vision_weights(model.model.vision_tower, vision_dir)
    model.eval()

    try:
        source_processor = AutoImageProcessor.from_pretrained(vision_dir)
        normalisation = {"image_mean": list(source_processor.image_mean), "image_std": list(source_processor.image_std)}
    except (OSError, ValueError, AttributeError):  # no image processor saved: use the tower family's defaults
        normalisation = {}
    image_processor = SparseMoEVLMImageProcessor.from_model_config(config, **normalisation)
    processor = SparseMoEVLMProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=config.image_seq_length,
        max_position_embeddings=text_config.max_position_embeddings,
        chat_template=getattr(tokenizer, "chat_template", None))
    return model, processor, lm, encoder, old_vocab


def check_against_parts(model, lm, encoder, old_vocab: int, exact: bool,
                        dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Text logits against the LM (over its vocabulary) and image features against the encoder; `model` runs in
    float32 with its weights stored in `dtype`."""
    inputs = scripts.verification_inputs(model.config)
    text_ids = inputs["input_ids"][:, model.config.image_seq_length:]
    with torch.no_grad():
        reference_logits = lm(input_ids=text_ids).logits
        composed = model(input_ids=text_ids).logits[..., :old_vocab]
        text_difference = (composed - reference_logits).abs().max().item()
        reference = encoder(inputs["pixel_values"], output_hidden_states=True).hidden_states
        ours = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        layer = model.config.vision_feature_layer
        vision_difference = (reference[layer] - ours[layer]).abs().max().item()
    text_tolerance = scripts.logits_tolerance(dtype, reference_logits)
    if exact and text_difference >= text_tolerance:
        raise RuntimeError(f"The composed model's text logits differ from the LM's by {text_difference:.3g} (>= "
                           f"{text_tolerance:.3g}).")
    if vision_difference >= TOLERANCE:  # the tower is copied as is: exact in any dtype
        raise RuntimeError(f"The composed vision tower's features differ from the encoder's by "
                           f"{vision_difference:.3g}.")
    return {"max abs text logit difference vs LM": f"{text_difference:.2e}", "logit tolerance": f"{text_tolerance:.2e}",
            "max abs feature difference vs encoder": f"{vision_difference:.2e}"}


def convert(args: argparse.Namespace) -> Path:
    """Compose, check against the parts and write the folder `args` describe; returns the written folder."""
    started = time.time()
    output_dir = scripts.check_output_dir(args.output, args.overwrite,
                                  sources={"--vision": args.vision, "--language_model": args.language_model})
    model, processor, lm, encoder, old_vocab = compose(args)
    dtype = scripts.output_dtype(args.dtype, AutoConfig.from_pretrained(args.language_model))
    # Written in `dtype`; checked against the parts with their weights rounded the same way.
    scripts.round_parameters(lm, dtype)
    scripts.round_parameters(encoder, dtype)
    model.to(dtype)

    def verify(reloaded) -> dict[str, str]:  # runs on the written checkpoint, before it is moved into place
        return check_against_parts(reloaded.float(), lm, encoder, old_vocab, exact=args.noise_std == 0, dtype=dtype)

    conversion = (f"composed from the vision encoder `{args.vision}` and the language model `{args.language_model}` "
                  f"(layers {model.config.text_config.sparse_layer_indices} upcycled; new projector)")
    scripts.finish_conversion(
        model, processor, args, title=f"Composed {args.vision} + {args.language_model} -> {output_dir}",
        rows=[("vision encoder", f"{model.config.vision_config.model_type}, {model.config.image_seq_length} image "
                                 "tokens"),
              ("language model", f"{lm.config.model_type}, vocabulary {old_vocab} -> "
                                 f"{model.config.text_config.vocab_size}"),
              ("image token", f"{processor.image_token!r} = id {model.config.image_token_id}")],
        conversion=conversion, verify=verify, started=started,
        conversion_info={"base_model": args.base_model, "method": conversion, "vision": args.vision,
                         "language_model": args.language_model, "noise_std": args.noise_std, "seed": args.seed,
                         "dtype": str(dtype).removeprefix("torch.")})
    return output_dir


def main(argv: list[str] | None = None) -> int:
    return scripts.run_conversion_script(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
