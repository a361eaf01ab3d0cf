import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import make_inputs, make_model


SCRIPT = Path(__file__).parent / "scripts" / "distributed_forward.py"


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
