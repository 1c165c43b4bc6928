"""The data wing: the token-shard format and its reader, verification, tokenizers, the chat template and the
fine-tuning batches. Everything `data_prep` imports from here is torch-free at import time."""

from gpt_moe.moved import PACKAGES, forwarder

__getattr__ = forwarder(__name__, PACKAGES[__name__], package=True)  # this package's names as a module in 0.1
