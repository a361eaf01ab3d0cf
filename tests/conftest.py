import atexit
import os
import shutil
import tempfile

import pytest


# Tests never reach the Hub: everything is built from tiny random configs and saved to temporary folders. The Hub
# round-trip tests (test_hub.py) talk to a loopback Hub (tests/hub_server.py) from subprocesses that switch back online.
# huggingface_hub and transformers read these variables when they are imported, which is after this file: the suite
# runs offline, with a private HF_HOME (no cache, token or remote-code modules of the user's are read or written) and
# no token from the environment.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="sparsemoe-vlm-tests-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_MODULES_CACHE",
                 "HF_DATASETS_CACHE", "HF_TOKEN_PATH"):
    os.environ.pop(variable, None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def hub_server():
    """A loopback Hugging Face Hub on 127.0.0.1 (`.endpoint`, `.token`, `.env(home)` for client subprocesses)."""
    from hub_server import LoopbackHub

    with LoopbackHub() as hub:
        yield hub
