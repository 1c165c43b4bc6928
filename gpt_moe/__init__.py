"""gpt-moe: a DeepSeek-style GPT (MLA + DeepSeekMoE + MTP) trained under DeepSpeed.

The package imports with torch alone; deepspeed, gradio and tensorboard are
imported only where they are used.
"""

__version__ = "0.1.0"
