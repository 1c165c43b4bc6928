"""The checkpoint wing: what a run, a checkpoint tag, an export or a transformers directory holds on disk, how each
is read (without running pickled code), converted between layouts and written as an export."""

from gpt_moe.moved import PACKAGES, forwarder

__getattr__ = forwarder(__name__, PACKAGES[__name__], package=True)  # this package's names as a module in 0.1
