"""Run under `torchrun --nproc_per_node 2`: each process runs a training forward on its own rows, then
`adapt_laplace_scales()`; the coefficients must be the ones one process gets from all the rows (stored beside it)."""

import sys

import torch

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration


def main(checkpoint: str, expected_path: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(checkpoint).train()
    expected = torch.load(expected_path)
    rows = slice(2 * rank, 2 * rank + 2)  # rank 0 takes rows 0-1, rank 1 rows 2-3
    inputs = {name: value[rows] for name, value in expected["inputs"].items()}
    with torch.no_grad():
        model(**inputs, labels=inputs["input_ids"])
    model.adapt_laplace_scales()
    scales = torch.stack([router.laplace_inv_scale for router in model.routers().values()])
    torch.testing.assert_close(scales, expected["scales"], rtol=0, atol=0)
    print(f"LAPLACE_OK rank={rank} scales={scales.tolist()}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
