import os

import pytest


# Tests never reach the Hub: everything is built from tiny random configs and saved to temporary folders. The Hub
# round-trip tests (test_hub.py) talk to a loopback Hub (tests/hub_server.py) from subprocesses that switch back online.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def hub_server():
    """A loopback Hugging Face Hub on 127.0.0.1 (`.endpoint`, `.token`, `.env(home)` for client subprocesses)."""
    from hub_server import LoopbackHub

    with LoopbackHub() as hub:
        yield hub
