"""Reading JSON configuration files (model, training and DeepSpeed configs) with one shape of error.

Every failure is a `ConfigError` whose message starts with the file and says what was expected:
a missing file, a file that is not JSON (with the line), JSON that is not an object, or a key the
reader does not know (a typo that would otherwise be ignored).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpt_moe.errors import ConfigError


def read_json_object(path: str | Path, what: str, hint: str = "") -> dict[str, Any]:
    """The JSON object in `path`; `what` names the file's role ("model config"), `hint` follows a
    missing-file error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found" + (f"; {hint}" if hint else "")) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a {what} JSON file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text); expected a {what} JSON file") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of {what} keys, got {type(data).__name__}")
    return data


def reject_unknown_keys(data: dict[str, Any], known: Iterable[str], source: str, label: str = "key",
                        hint: str = "") -> None:
    """ConfigError naming the first key of `data` not in `known` (default hint: the allowed keys)."""
    known = set(known)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {label} {unknown[0]!r}; "
                          + (hint or f"allowed keys: {', '.join(sorted(known))}"))
