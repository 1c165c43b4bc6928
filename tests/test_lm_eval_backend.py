"""lm-eval's `gpt-moe` backend (gpt_moe/serve/lm_eval_model.py) against lm-eval's own `hf` backend, the independent
reference: local YAML tasks over local JSONL files (multiple choice, generation until a stop string, rolling
log-likelihood), run through `lm_eval.simple_evaluate` once with each backend on the same weights, compared item by
item; and the documented command line end to end. Offline: the tasks read their rows with `datasets`' json loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager

from gpt_moe.checkpoint.export import export
from gpt_moe.checkpoint.loading import load_for_inference
from gpt_moe.errors import CheckpointError, ConfigError
from gpt_moe.serve.lm_eval_model import GptMoeLM
from tests.published import deepseek_dir, with_deepseek_model

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4  # nats per item, as the export's logits match ours (tests/test_export.py)
MULTIPLE_CHOICE = [
    {"question": "The quick brown", "choices": [" fox", " dog", " router", " experts"], "answer": 0},
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
    {"question": "Experts route tokens; the router picks", "choices": [" two", " sixteen", " none"], "answer": 0},
    {"question": "", "choices": ["Once upon a time", "The end", "def main():"], "answer": 0},  # empty context
]
GENERATION = [{"prompt": "The quick brown fox", "target": " jumps"}, {"prompt": "def add(a, b):", "target": "\n"},
              {"prompt": "Once upon a time there was a model that", "target": " routed"}]
ROLLING = [{"text": "The quick brown fox jumps over the lazy dog. " * 4 + "def add(a, b):\n    return a + b\n" * 3},
           {"text": "Ünïcödé and emoji 🙂 too."}]
TASKS = ("gm_mc", "gm_gen", "gm_roll")


def write_tasks(directory: Path) -> Path:
    """Three lm-eval tasks (YAML) over JSONL files in `directory`: multiple choice, generation, rolling."""
    directory.mkdir(parents=True, exist_ok=True)

    def task(name: str, rows: list[dict], body: str) -> None:
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / name}.jsonl\n"
            f"  cache_dir: {directory / 'datasets-cache'}\ntest_split: test\n{body}")

    task("gm_mc", MULTIPLE_CHOICE, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
         'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
         "metric_list:\n  - metric: acc\n")
    task("gm_gen", GENERATION, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
         'generation_kwargs:\n  until: ["\\n\\n", "."]\n  max_gen_toks: 12\n  do_sample: false\n'
         "metric_list:\n  - metric: exact_match\n")
    task("gm_roll", ROLLING, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         "metric_list:\n  - metric: word_perplexity\n")
    return directory


def per_item(model: str, model_args: dict, tasks: Path, chat: bool = False) -> dict[str, list]:
    """Task -> each document's filtered responses (in document order) of one lm-eval run."""
    only_ours = TaskManager(include_path=str(tasks), include_defaults=False)  # lm-eval's thousands: 15 s to index
    result = lm_eval.simple_evaluate(model=model, model_args={**model_args, "device": "cpu", "batch_size": 3},
                                     tasks=list(TASKS), task_manager=only_ours, log_samples=True,
                                     apply_chat_template=chat)
    return {name: [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for name, samples in result["samples"].items()}


def assert_same_items(ours: dict[str, list], theirs: dict[str, list], chat: bool = False) -> float:
    """Every item: log-likelihoods within TOLERANCE, the same greedy flags and chosen answer, the same generated
    text (`chat`: ours ends at the end of the model's turn, where `hf` goes on to its EOS token or the token limit,
    so theirs starts with ours). Returns the largest log-likelihood difference."""
    assert sorted(ours) == sorted(theirs) == sorted(TASKS)
    largest = 0.0
    for a, b in zip(ours["gm_mc"], theirs["gm_mc"], strict=True):
        (la, ga), (lb, gb) = zip(*a), zip(*b)
        largest = max(largest, *(abs(x - y) for x, y in zip(la, lb, strict=True)))
        assert ga == gb and la.index(max(la)) == lb.index(max(lb)), (a, b)
    for a, b in zip(ours["gm_roll"], theirs["gm_roll"], strict=True):
        largest = max(largest, abs(a[0] - b[0]))
    assert largest <= TOLERANCE
    if chat:
        assert all(b.startswith(a) for (a,), (b,) in zip(ours["gm_gen"], theirs["gm_gen"], strict=True))
    else:
        assert ours["gm_gen"] == theirs["gm_gen"]
    return largest


@pytest.mark.multiprocess
def test_a_training_run_scores_as_the_hf_backend_scores_its_export(base_run, tmp_path):
    """The run directory (a ZeRO-2 checkpoint) through `gpt-moe` and its fp32 export through lm-eval's `hf`
    backend: the same per-item log-likelihoods, choices and greedy generations. A 48-token context makes the
    rolling task take several windows and the long prompts lose their beginning."""
    tasks = write_tasks(tmp_path / "tasks")
    exported = export(load_for_inference(base_run), tmp_path / "export", dtype=torch.float32)
    ours = per_item("gpt-moe", {"checkpoint": str(base_run), "max_length": 48}, tasks)
    theirs = per_item("hf", {"pretrained": str(exported), "dtype": "float32", "max_length": 48}, tasks)
    largest = assert_same_items(ours, theirs)
    print(f"largest |delta loglik| against hf: {largest:.2e}")
    assert any(text for (text,) in ours["gm_gen"])  # a few steps of training: it writes something


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A DeepSeek-V3-style transformers directory: its tokenizer adds a BOS token, its own chat template."""
    return with_deepseek_model(deepseek_dir(tmp_path_factory.mktemp("hf") / "DeepSeek-tiny"), 1280)


@pytest.mark.parametrize("source,chat", [("export", True), ("published", False), ("published", True)])
def test_chat_templates_and_a_published_tokenizer_score_as_the_hf_backend(source, chat, tiny_checkpoint, published,
                                                                         tmp_path):
    """Our export of a chat model with our template, and a published directory (BOS from its post-processor, an
    empty context scored after the BOS, its own template) with and without `--apply_chat_template`: item by item
    what the `hf` backend gives on the same directory."""
    directory = {"export": tiny_checkpoint, "published": published}[source]
    tasks = write_tasks(tmp_path / "tasks")
    ours = per_item("gpt-moe", {"checkpoint": str(directory), "max_length": 64}, tasks, chat)
    theirs = per_item("hf", {"pretrained": str(directory), "dtype": "float32", "max_length": 64}, tasks, chat)
    assert_same_items(ours, theirs, chat)


def test_model_args_and_generation_kwargs_are_checked(tiny_checkpoint, tmp_path):
    for args, message in (({"checkpoint": str(tiny_checkpoint), "pretrained": "x"}, "model_args pretrained"),
                          ({"checkpoint": str(tiny_checkpoint), "dtype": "int8"}, "dtype=int8"),
                          ({"checkpoint": str(tiny_checkpoint), "batch_size": "auto"}, "batch_size=auto")):
        with pytest.raises(ConfigError, match=message):
            GptMoeLM(**args)
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        GptMoeLM(checkpoint=str(tmp_path / "missing"))
    lm = GptMoeLM(checkpoint=str(tiny_checkpoint), device="cpu")
    with pytest.raises(ConfigError, match="num_beams"):
        lm._sampling({"until": ["\n"], "num_beams": 4})
    sampling, until = lm._sampling({"until": "\n", "do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert (sampling.temperature, sampling.top_p, sampling.top_k, until) == (0.7, 0.9, 0, ["\n"])


def test_the_documented_command_line_runs_a_local_task(tiny_checkpoint, tmp_path):
    """`python launch/lm_eval_harness.py --model gpt-moe ...` (docs/evaluation.md), offline, two items per task:
    lm-eval's results file with both tasks' metrics."""
    tasks = write_tasks(tmp_path / "tasks")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run([sys.executable, "launch/lm_eval_harness.py", "--model", "gpt-moe", "--model_args",
                             f"checkpoint={tiny_checkpoint},max_length=64", "--batch_size", "2", "--tasks",
                             "gm_mc,gm_gen", "--include_path", str(tasks), "--limit", "2", "--output_path",
                             str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert 0.0 <= results["results"]["gm_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["gm_gen"]["exact_match,none"] <= 1.0
    assert results["n-samples"]["gm_mc"] == {"original": 4, "effective": 2}


@pytest.mark.parametrize("source", ["export", "published"])
def test_chat_rendering_equals_transformers_apply_chat_template(source, tiny_checkpoint, published):
    """What lm-eval asks of a chat backend: the conversation as text, with a generation prompt or with the final
    assistant message left open (a prefilled answer), as transformers renders the same directory's template."""
    import transformers

    directory = {"export": tiny_checkpoint, "published": published}[source]
    lm = GptMoeLM(checkpoint=str(directory), device="cpu")
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 3 = ?"}]
    prefilled = [*messages, {"role": "assistant", "content": "The answer is"}]
    assert lm.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    assert lm.apply_chat_template(prefilled, add_generation_prompt=False) == theirs.apply_chat_template(
        prefilled, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    assert lm.tok_encode(lm.apply_chat_template(prefilled, False)) == theirs.encode(
        theirs.apply_chat_template(prefilled, tokenize=False, continue_final_message=True), add_special_tokens=False)
