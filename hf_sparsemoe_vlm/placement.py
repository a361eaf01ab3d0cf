# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Expert-aware placement: an Accelerate device map that keeps what every token uses (attention, norms,
embeddings, the vision tower, the projector, shared experts, the LM head) on the main device and puts the routed
expert groups, most of the weights and each used by a few tokens, on CPU or disk.

`device_map="auto"` cannot do this: it places whole decoder layers (`_no_split_modules`), so under a memory limit
it offloads attention together with the experts.
"""

from collections.abc import Mapping

import torch
from accelerate.utils import compute_module_sizes, convert_file_size_to_int

from .configuration_sparsemoe_vlm import SparseMoEVLMConfig
from .modeling_sparsemoe_vlm import SparseMoEVLMExpertGroup, SparseMoEVLMForConditionalGeneration


def _placement_units(module: torch.nn.Module, prefix: str = "") -> list[tuple[str, bool]]:
    """(name, is an expert group) for the largest modules that hold no expert group, and for every expert group."""
    if isinstance(module, SparseMoEVLMExpertGroup):
        return [(prefix, True)]
    if not any(isinstance(m, SparseMoEVLMExpertGroup) for m in module.modules()):
        return [(prefix, False)]
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise ValueError(f"{prefix or 'The model'} holds tensors of its own beside expert groups; it cannot be split.")
    units = []
    for name, child in module.named_children():
        units += _placement_units(child, f"{prefix}.{name}" if prefix else name)
    return units


def expert_offload_device_map(
    model_or_config: SparseMoEVLMForConditionalGeneration | SparseMoEVLMConfig,
    main_device: int | str = "cpu",
    expert_device: int | str = "disk",
    max_memory: Mapping[int | str, int | str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, int | str]:
    """A `device_map` for `from_pretrained` that puts the routed expert groups on `expert_device` ("cpu", "disk" or
    another device; "disk" needs `offload_folder`) and everything else on `main_device`.

    With `max_memory` (as `from_pretrained` takes it, e.g. `{"cpu": "2GB"}` or `{0: "20GiB"}`), expert groups stay
    on `main_device` too, layer by layer from the first, as long as they fit in its budget beside the rest; the
    others go to `expert_device`. Sizes are those of the weights in `dtype` (default: the config's).

        device_map = expert_offload_device_map(AutoConfig.from_pretrained(path), "cpu", "disk")
        model = AutoModelForImageTextToText.from_pretrained(path, device_map=device_map, offload_folder="offload")
    """
    if isinstance(model_or_config, SparseMoEVLMConfig):
        dtype = dtype or getattr(model_or_config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        with torch.device("meta"):
            model = SparseMoEVLMForConditionalGeneration._from_config(model_or_config, dtype=dtype)
    elif isinstance(model_or_config, SparseMoEVLMForConditionalGeneration):
        model = model_or_config
    else:
        raise TypeError(f"expert_offload_device_map takes a SparseMoEVLMConfig or a "
                        f"SparseMoEVLMForConditionalGeneration, got {type(model_or_config).__name__}.")
    if main_device == "disk":
        raise ValueError("main_device='disk' would stream attention and embeddings from disk at every step: give the "
                         "device that computes (a GPU index or 'cpu') and offload the experts with expert_device.")
    units = _placement_units(model)
    device_map = {name: (expert_device if is_expert else main_device) for name, is_expert in units}
    if max_memory is None:
        return device_map

    budgets = {key: convert_file_size_to_int(value) if isinstance(value, str) else int(value)
               for key, value in max_memory.items()}
    if main_device not in budgets:
        raise ValueError(f"max_memory names {sorted(map(str, budgets))} but not the main device {main_device!r}.")
    sizes = compute_module_sizes(model, dtype=dtype)
    shared = sum(sizes[name] for name, is_expert in units if not is_expert)
    budget = budgets[main_device] - shared
    if budget < 0:
        raise ValueError(f"Everything but the experts takes {shared / 2**20:.1f} MiB, more than max_memory gives "
                         f"{main_device!r} ({budgets[main_device] / 2**20:.1f} MiB): raise the limit, or use "
                         "device_map='auto', which offloads whole layers.")
    for name, is_expert in units:
        if is_expert and sizes[name] <= budget:
            device_map[name] = main_device
            budget -= sizes[name]
        elif is_expert:
            budget = -1  # keep the resident experts a prefix of the layers
    return device_map


__all__ = ["expert_offload_device_map"]
