"""lm-evaluation-harness's own command line with this project's backend registered, so that `--model gpt-moe` runs
lm-eval's tasks on any checkpoint, run, export or transformers directory this project loads:

    python launch/lm_eval_harness.py --model gpt-moe --model_args checkpoint=runs/tiny,batch_size=8 \
        --tasks hellaswag,arc_easy [--apply_chat_template] [--limit N] [--output_path results/]

Every argument is lm-eval's (`lm_eval --help`; `ls tasks`, `validate` work too). lm-eval 0.4 looks models up only
in its own registry and has no plugin discovery, so a plain `lm_eval --model gpt-moe` cannot find ours: this script
imports `gpt_moe.serve.lm_eval_model` (which registers "gpt-moe") and then hands the command line to lm-eval's
`cli_evaluate`. (Not named lm_eval.py: run as a script, that name would shadow the lm_eval package.)
"""

from __future__ import annotations

import sys

from gpt_moe.cli import run_cli
from gpt_moe.errors import ConfigError


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        raise ConfigError(f"lm-eval is not installed ({err}); pip install -e '.[eval]'") from None
    import gpt_moe.serve.lm_eval_model  # noqa: F401 - registers the "gpt-moe" backend

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(run_cli(main))
