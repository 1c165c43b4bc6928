"""The model wing: a DeepSeek-style GPT (MLA attention, DeepSeekMoE, multi-token prediction) and what is computed
from its shape alone (parameter and FLOP accounting). Imports nothing above it (data, checkpoints, training,
serving)."""

from gpt_moe.moved import PACKAGES, forwarder

__getattr__ = forwarder(__name__, PACKAGES[__name__], package=True)  # this package's names as a module in 0.1
