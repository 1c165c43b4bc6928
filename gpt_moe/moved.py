"""Import paths of the flat package (0.1), kept working for one release after the move into wings.

`gpt_moe.loading`, `gpt_moe.chat`, `python -m gpt_moe.params`, `from gpt_moe.data import TokenShards` ... still
work: importing an old module warns once (DeprecationWarning, naming its new home) and offers the names it offered;
the three modules that became packages (`gpt_moe.model`, `gpt_moe.data`, `gpt_moe.checkpoint`) forward their old
names the same way. These paths go in the next release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

MOVED: dict[str, tuple[str, ...]] = {
    **{f"gpt_moe.{name}": (f"gpt_moe.model.{name}",)
       for name in ("config", "norm", "rope", "attention", "moe", "loss", "params", "mtp_acceptance")},
    "gpt_moe.checkpointing": ("gpt_moe.model.recompute",),
    "gpt_moe.data_verify": ("gpt_moe.data.verify",),
    "gpt_moe.tokenizer": ("gpt_moe.data.tokenizer",),
    "gpt_moe.chat_data": ("gpt_moe.data.chat_batches",),
    **{f"gpt_moe.{name}": (f"gpt_moe.checkpoint.{name}",) for name in ("zero_files", "reshard", "loading", "export")},
    "gpt_moe.train_config": ("gpt_moe.train.config",),
    "gpt_moe.run_plan": ("gpt_moe.train.plan", "gpt_moe.train.hardware"),
    **{f"gpt_moe.{name}": (f"gpt_moe.train.{name}",)
       for name in ("ds_config", "memory_plan", "hardware", "peak_flops", "expert_parallel", "zero_memory", "metrics",
                    "moe_health")},
    "gpt_moe.trainer": ("gpt_moe.train.trainer", "gpt_moe.train.engine", "gpt_moe.train.evaluator"),
    "gpt_moe.generate": ("gpt_moe.serve.generate", "gpt_moe.train.evaluator"),
    "gpt_moe.chat": ("gpt_moe.serve.chat", "gpt_moe.data.chat_template"),
    **{f"gpt_moe.{name}": (f"gpt_moe.serve.{name}",) for name in ("chat_app", "routing_view", "chat_eval")},
}
"""Old module -> the modules that now define what it offered, searched in order."""

PACKAGES: dict[str, tuple[str, ...]] = {
    "gpt_moe.model": ("gpt_moe.model.model",),
    "gpt_moe.data": ("gpt_moe.data.manifest", "gpt_moe.data.shards"),
    "gpt_moe.checkpoint": ("gpt_moe.checkpoint.records", "gpt_moe.checkpoint.deepspeed_files",
                           "gpt_moe.checkpoint.loading"),
}
"""Old modules that are packages now -> where their old top-level names live."""


def forwarder(old: str, homes: tuple[str, ...], package: bool = False) -> Callable[[str], Any]:
    """A module `__getattr__` giving `old`'s names from their new homes (imported on first use). For a package
    (`package`), each old name warns, and the names of its submodules are left to the import system."""
    def __getattr__(name: str) -> Any:
        if name.startswith("__") or (package and importlib.util.find_spec(f"{old}.{name}") is not None):
            raise AttributeError(name)
        for home in homes:
            module = importlib.import_module(home)
            if hasattr(module, name):
                if package:
                    warnings.warn(f"{old}.{name} moved to {home}.{name}; the old path goes in the next release",
                                  DeprecationWarning, stacklevel=2)
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old flat modules (after every other finder has not) and makes each a forwarding module."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        homes = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} moved to {', '.join(homes)}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        module.__getattr__ = forwarder(module.__name__, homes)

    def get_code(self, fullname: str):
        """`python -m OLD` runs the new module's `main`."""
        home = MOVED[fullname][0]
        notice = f"{fullname} moved to {home}; use python -m {home}"
        source = f"import sys\nprint({notice!r}, file=sys.stderr)\nfrom {home} import main\nraise SystemExit(main())\n"
        return compile(source, f"<{fullname}: moved to {home}>", "exec")


def install() -> None:
    """Adds the finder once (the package's __init__ calls it)."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
