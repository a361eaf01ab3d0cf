import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import make_inputs, make_model


SCRIPT = Path(__file__).parent / "scripts" / "distributed_forward.py"
LAPLACE_SCRIPT = Path(__file__).parent / "scripts" / "distributed_laplace.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode,router_type", [("tp", "topk"), ("ep", "top_p")])
def test_tensor_and_expert_parallel_logits_match_one_process(tmp_path, mode, router_type):
    model = make_model(router_type=router_type, num_shared_experts=1)
    inputs = make_inputs(model.config)
    model.save_pretrained(tmp_path / "ckpt")
    torch.save({"inputs": inputs, "logits": model(**inputs).logits.detach()}, tmp_path / "expected.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(SCRIPT), str(tmp_path / "ckpt"),
               str(tmp_path / "expected.pt"), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count(f"DISTRIBUTED_OK mode={mode}") == 2


@pytest.mark.slow
def test_laplace_coefficients_adapt_from_the_counts_of_every_process(tmp_path):
    """Two processes with different rows apply the factor one process computes from all the rows. The target sits
    between the pooled average and one half's average, so that without summing the counts over processes the
    replicas would take different factors and drift apart."""
    model = make_model(router_type="relu", num_experts=8, num_image_experts=8, router_laplace_adapt_rate=1.5,
                       router_target_active_experts=1.0).train()
    inputs = make_inputs(model.config, batch_size=4, left_pad=[0, 2, 1, 3], seed=3)

    def active_per_token(rows: slice) -> list[float]:
        with torch.no_grad():
            model(**{k: v[rows] for k, v in inputs.items()}, labels=inputs["input_ids"][rows])
        averages = [(r.observed[0] / r.observed[1]).item() for r in model.routers().values()]
        model.adapt_laplace_scales()  # clears the counts (the model is saved from the state before)
        return averages

    state = {k: v.clone() for k, v in model.state_dict().items()}
    pooled, first, second = (active_per_token(rows) for rows in (slice(0, 4), slice(0, 2), slice(2, 4)))
    router, high = max(((i, max(a, b)) for i, (a, b) in enumerate(zip(first, second, strict=True))),
                       key=lambda item: item[1] - pooled[item[0]])
    assert high - pooled[router] > 0.05, (pooled, first, second)
    model.load_state_dict(state)
    model.config.text_config.router_target_active_experts = (pooled[router] + high) / 2
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = type(model).from_pretrained(tmp_path / "ckpt").train()
    with torch.no_grad():
        reloaded(**inputs, labels=inputs["input_ids"])
    reloaded.adapt_laplace_scales()
    scales = torch.stack([r.laplace_inv_scale for r in reloaded.routers().values()])
    torch.save({"inputs": inputs, "scales": scales}, tmp_path / "expected.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(LAPLACE_SCRIPT), str(tmp_path / "ckpt"),
               str(tmp_path / "expected.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("LAPLACE_OK") == 2
