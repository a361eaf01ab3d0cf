import os


# Tests never reach the Hub: everything is built from tiny random configs and saved to temporary folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
