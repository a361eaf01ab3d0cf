#!/usr/bin/env python
# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Sparse upcycling of a Transformers LLaVA checkpoint into a SparseMoE-VLM checkpoint.

Input: a `LlavaForConditionalGeneration` folder (Llama, Mistral or Qwen2 text model; CLIP or SigLIP vision tower)
with its processor. Output: a `SparseMoEVLMForConditionalGeneration` folder with processor and model card. The
vision tower, projector, embeddings, attention, norms and LM head are copied; the MLPs of the selected layers become
image and text expert groups (copies of the MLP, optionally with noise) with freshly initialised routers.

With `--noise_std 0` (the default) the converted model reproduces the LLaVA model: the script checks logits
(max abs difference < 1e-5 in float32; written in bfloat16 / float16, against LLaVA rounded to that dtype, up to
one rounding step of the routing constants) and greedy generation on the written checkpoint and exits non-zero otherwise.

Example:
    python conversion/upcycle_llava.py --input llava-1.5-7b-hf --output llava-1.5-7b-moe \\
        --sparse_layers every_other --num_experts 4 --num_image_experts 4 --router_type topk
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from hf_sparsemoe_vlm import SparseMoEVLMImageProcessor, SparseMoEVLMProcessor
from hf_sparsemoe_vlm.conversion import scripts
from hf_sparsemoe_vlm.conversion.upcycling import (
    SUPPORTED_TEXT_MODEL_TYPES,
    add_upcycling_arguments,
    upcycle_llava,
    upcycling_options,
)


SUPPORTED_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


def build_parser() -> argparse.ArgumentParser:
    parser = scripts.conversion_parser("upcycle_llava.py", __doc__, dtype_help=(
        "dtype of the written weights (auto: the one the LLaVA config.json records, float32 if none). The checks "
        "against LLaVA then use its weights rounded to this dtype."))
    parser.add_argument("--input", required=True, help="LlavaForConditionalGeneration folder (model + processor).")
    add_upcycling_arguments(parser)
    return parser


def check_input(input_dir: Path):
    """Validate the LLaVA folder from its config alone, before loading any weight."""
    if not (input_dir / "config.json").is_file():
        raise ValueError(f"{input_dir} has no config.json; pass a LLaVA checkpoint folder.")
    config = AutoConfig.from_pretrained(input_dir)
    if config.model_type != "llava":
        raise ValueError(f"{input_dir} holds a {config.model_type!r} model; this script converts 'llava' "
                         f"(LlavaForConditionalGeneration) checkpoints.")
    if config.text_config.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ValueError(f"LLaVA text model {config.text_config.model_type!r} is not supported; supported: "
                         f"{SUPPORTED_TEXT_MODEL_TYPES}.")
    if config.vision_config.model_type not in SUPPORTED_VISION_TOWERS:
        raise ValueError(f"LLaVA vision tower {config.vision_config.model_type!r} is not supported; supported: "
                         f"{SUPPORTED_VISION_TOWERS}.")
    sliding_window = getattr(config.text_config, "sliding_window", None)
    if sliding_window and getattr(config.text_config, "use_sliding_window", True) and \
            sliding_window < config.text_config.max_position_embeddings:
        print(f"warning: the text model uses a sliding window of {sliding_window} tokens; the converted decoder "
              f"attends over the full context (identical outputs up to {sliding_window} tokens).", file=sys.stderr)
    return config


def processor_from_llava(llava_processor, config):
    """Our processor with LLaVA's tokenizer, chat template and image normalisation at the tower's resolution."""
    source = llava_processor.image_processor
    image_processor = SparseMoEVLMImageProcessor(
        size={"height": config.image_size, "width": config.image_size},
        image_mean=list(source.image_mean), image_std=list(source.image_std))
    processor = SparseMoEVLMProcessor(
        image_processor=image_processor, tokenizer=llava_processor.tokenizer,
        chat_template=llava_processor.chat_template, image_token=llava_processor.image_token,
        image_seq_length=config.image_seq_length, max_position_embeddings=config.text_config.max_position_embeddings)
    if processor.image_token_id != config.image_token_id:
        raise ValueError(f"The LLaVA tokenizer gives {processor.image_token!r} id {processor.image_token_id} but the "
                         f"model's image_token_id is {config.image_token_id}; the checkpoint is inconsistent.")
    return processor


def compare_with_dense(dense, converted, config, exact: bool, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Logits and greedy tokens of the converted model (run in float32, its weights stored in `dtype`) against the
    dense one; raises when `exact` and they differ."""
    inputs = scripts.verification_inputs(config)
    with torch.no_grad():
        reference = dense(**inputs).logits
        difference = (reference - converted(**inputs).logits).abs().max().item()
        # The converted model never generates the image placeholder; ask the same of LLaVA.
        greedy = {"max_new_tokens": 8, "do_sample": False, "suppress_tokens": [config.image_token_id],
                  "pad_token_id": config.text_config.pad_token_id or 0}
        dense_tokens = dense.generate(**inputs, **greedy)
        converted_tokens = converted.generate(**inputs, **greedy)
    same_tokens = dense_tokens.shape == converted_tokens.shape and torch.equal(dense_tokens, converted_tokens)
    tolerance = scripts.logits_tolerance(dtype, reference)
    if exact and difference >= tolerance:
        raise RuntimeError(f"The upcycled model's logits differ from LLaVA's by {difference:.3g} (>= "
                           f"{tolerance:.3g}) with noise off; the conversion is wrong.")
    if exact and not same_tokens:
        raise RuntimeError("Greedy generation of the upcycled model differs from LLaVA's with noise off"
                           + ("." if dtype == torch.float32 else f" (rounding to {dtype}; `--dtype float32` keeps "
                                                                  "the conversion exact)."))
    return {"max abs logit difference vs LLaVA": f"{difference:.2e}", "logit tolerance": f"{tolerance:.2e}",
            "greedy tokens equal to LLaVA": "yes" if same_tokens else "no"}


def convert(args: argparse.Namespace) -> Path:
    """Upcycle, check against LLaVA and write the folder `args` describe; returns the written folder."""
    started = time.time()
    input_dir = Path(args.input)
    output_dir = scripts.check_output_dir(args.output, args.overwrite, sources={"--input": args.input})
    dtype = scripts.output_dtype(args.dtype, check_input(input_dir))
    options = upcycling_options(args)
    llava = scripts.load_source("the LLaVA model", input_dir, lambda: LlavaForConditionalGeneration.from_pretrained(
        input_dir, dtype=torch.float32).eval())
    llava_processor = scripts.load_source("the LLaVA processor", input_dir,
                                          lambda: AutoProcessor.from_pretrained(input_dir))
    model = upcycle_llava(llava, noise_std=args.noise_std, seed=args.seed, **options)
    processor = processor_from_llava(llava_processor, model.config)
    # Written in `dtype`; checked against LLaVA with its weights rounded the same way (a no-op when the source was
    # stored in `dtype`), so noise-free upcycling stays exact.
    scripts.round_parameters(llava, dtype)
    model.to(dtype)

    def verify(reloaded) -> dict[str, str]:  # runs on the written checkpoint, before it is moved into place
        return compare_with_dense(llava, reloaded.float(), model.config, exact=args.noise_std == 0, dtype=dtype)

    conversion = (f"sparse upcycling of LLaVA: layers {model.config.text_config.sparse_layer_indices} upcycled, "
                  f"noise {args.noise_std}")
    scripts.finish_conversion(
        model, processor, args, title=f"Upcycled {input_dir} -> {output_dir}",
        rows=[("source text / vision model", f"{llava.config.text_config.model_type} / "
                                             f"{llava.config.vision_config.model_type}"),
              ("source parameters", f"{llava.num_parameters():,}")],
        conversion=conversion, verify=verify, started=started,
        conversion_info={"base_model": args.base_model, "method": conversion, "source": str(input_dir),
                         "options": {**options, "noise_std": args.noise_std, "seed": args.seed,
                                     "dtype": str(dtype).removeprefix("torch.")}})
    return output_dir


def main(argv: list[str] | None = None) -> int:
    return scripts.run_conversion_script(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
