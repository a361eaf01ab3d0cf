"""Run under `torchrun --nproc_per_node 2`: load a checkpoint with tensor ("tp") or expert ("ep") parallelism,
check that the weights are really sharded and that the logits match the single-process ones stored beside it."""

import sys

import torch
from transformers import AutoModelForImageTextToText
from transformers.distributed import DistributedConfig

import hf_sparsemoe_vlm  # noqa: F401  (registers the Auto classes)


def main(checkpoint: str, expected_path: str, mode: str) -> None:
    distributed_config = DistributedConfig(tp_size=2) if mode == "tp" else DistributedConfig(tp_size=2, ep_size=2)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, distributed_config=distributed_config)
    experts = model.get_parameter("model.language_model.layers.0.mlp.text_moe.experts.gate_up_proj")
    full, local = tuple(experts.shape), tuple(experts.to_local().shape)
    # TP splits each expert's intermediate width; EP gives each rank half of the experts.
    expected_local = (full[0], full[1] // 2, full[2]) if mode == "tp" else (full[0] // 2, full[1], full[2])
    assert local == expected_local, (mode, full, local)

    expected = torch.load(expected_path)
    with torch.no_grad():
        logits = model(**expected["inputs"]).logits
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    diff = (logits - expected["logits"]).abs().max().item()
    print(f"DISTRIBUTED_OK mode={mode} rank={torch.distributed.get_rank()} local={local} max_abs_diff={diff:.1e}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
