"""gpt-moe: a DeepSeek-style GPT (MLA + DeepSeekMoE + MTP) trained under DeepSpeed.

The package imports with torch alone; deepspeed, gradio and tensorboard are
imported only where they are used.
"""

__version__ = "0.1.0"

from gpt_moe import moved

moved.install()  # the import paths of 0.1 (gpt_moe.chat, gpt_moe.loading, ...) for one more release
