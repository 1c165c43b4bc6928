"""Hostile but fair input to the trainer and the checkpoint readers: a pickle that carries code, a save that
fails half-way, a resume from every saved step, and the one-line errors of bad paths and values."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import prepare_chat

from gpt_moe.checkpoint.records import RUN_LOCK_FILE

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = ["--seq-len", "32", "--micro-batch", "2", "--log-interval", "1", "--eval-batches", "2",
            "--sample-tokens", "4", "--warmup-steps", "30", "--keep-last", "10"]


def run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of DeepSpeed's model and optimizer files of a tag, by file and key path (our per-rank
    RNG files are left out)."""
    from gpt_moe.checkpoint.deepspeed_files import load_data_only

    found: dict[str, torch.Tensor] = {}

    def walk(node, path: str) -> None:
        if isinstance(node, torch.Tensor):
            found[path] = node
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    for file in sorted(tag_dir.glob("*.pt")):
        if not file.name.startswith("client_rank"):
            walk(load_data_only(file), file.name)
    return found


@pytest.fixture(scope="module")
def saved_run(prepared_data, fp32_zero2, tmp_path_factory) -> Path:
    """8 steps of `tiny`, evaluated and saved every 2 steps (tags 2, 4, 6, 8), one rank, fp32."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    result = run("launch/train.py", "--deepspeed", str(fp32_zero2), "--data", str(prepared_data), "--run-dir",
                 str(run_dir), "--max-steps", "8", "--save-interval", "2", "--eval-interval", "2", *TINY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.multiprocess
@pytest.mark.parametrize("step", [2, 4, 6])
def test_resume_from_every_saved_step_is_bit_exact(saved_run, prepared_data, fp32_zero2, tmp_path, step):
    """Weights, optimizer state and the routing biases (the MTP block's included) after resuming equal the
    uninterrupted run's, bit for bit. From step 6 DeepSpeed's CPU Adam kernel used to drift: it keeps beta^t as
    a running product, which a resumed run starts from pow(beta, t) (see ds_config._resolve_cpu_adam)."""
    tag = f"step_{step:08d}"
    resumed = tmp_path / "resumed"
    shutil.copytree(saved_run / "checkpoints" / tag, resumed / "checkpoints" / tag)
    result = run("launch/train.py", "--deepspeed", str(fp32_zero2), "--data", str(prepared_data), "--run-dir",
                 str(resumed), "--max-steps", "8", "--save-interval", "2", "--eval-interval", "2", *TINY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = tensors(resumed / "checkpoints" / "step_00000008"), tensors(saved_run / "checkpoints" /
                                                                                "step_00000008")
    assert ours.keys() == theirs.keys()
    biases = [key for key in ours if key.endswith("e_score_correction_bias")]
    assert len(biases) == 4 and any(".layers.4." in key for key in biases)  # 3 MoE layers + the MTP block
    assert any("exp_avg_sq" in key for key in ours)
    different = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not different, different[:5]


class Payload:
    """Unpickled by a loader that runs code (`weights_only=False`), this creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.multiprocess
def test_a_checkpoint_carrying_code_is_refused_everywhere_and_never_runs(saved_run, prepared_data, fp32_zero2,
                                                                        tmp_path):
    tag = tmp_path / "run" / "checkpoints" / "step_00000004"
    shutil.copytree(saved_run / "checkpoints" / "step_00000004", tag)
    marker = tmp_path / "payload-ran"
    states = tag / "mp_rank_00_model_states.pt"
    planted = torch.load(states, weights_only=False)
    planted["extra"] = Payload(marker)
    torch.save(planted, states)

    attempts = {
        "resume": run("launch/train.py", "--deepspeed", str(fp32_zero2), "--data", str(prepared_data),
                      "--run-dir", str(tmp_path / "run"), "--resume", str(tag), "--max-steps", "6", *TINY_RUN),
        "sample": run("launch/sample.py", "--checkpoint", str(tag), "--max-new-tokens", "4", "hello"),
        "export": run("launch/export.py", str(tag), str(tmp_path / "exported")),
        "app": run("app.py", "--checkpoint", str(tag), "--port", "0"),
    }
    for name, result in attempts.items():
        assert_one_line_error(result, str(tag))
        assert "holds more than tensors and plain data (it pickles io.open)" in result.stderr, name
    assert not marker.exists()
    torch.load(states, weights_only=False)  # the planted payload is real: a loader that runs code runs it
    assert marker.exists()


@pytest.mark.multiprocess
def test_a_failed_save_removes_its_partial_tag_and_keeps_the_previous(prepared_data, fp32_zero2, tmp_path):
    run_dir = tmp_path / "run"
    args = ["launch/train.py", "--deepspeed", str(fp32_zero2), "--data", str(prepared_data), "--run-dir",
            str(run_dir), "--max-steps", "6", "--save-interval", "2", "--eval-interval", "100", *TINY_RUN]
    assert_one_line_error(run(*args, "--inject-full-disk-at", "4"), "no space left on the device")
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000002"] and (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    again = run(*args)  # the same command resumes from the complete one
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["history"][0]["step"] == 3


# ------------------------------------------------------------------------------------------- one-line errors
def damaged_tag(root: Path, kind: str) -> Path:
    tag = root / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    if kind == "not json":
        (tag / "COMPLETE").write_text("{ half")
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    elif kind == "lacks keys":
        (tag / "COMPLETE").write_text(json.dumps({"step": 2}))
    elif kind == "never a checkpoint":
        (tag / "notes.txt").write_text("hello")
    return tag


@pytest.mark.parametrize("kind, message", [
    ("missing", "no checkpoint here (no such directory)"),
    ("never a checkpoint", "not a checkpoint (no COMPLETE marker and no DeepSpeed files)"),
    ("not json", "COMPLETE: not valid JSON"),
    ("lacks keys", "COMPLETE: lacks world_size, ep_size, zero_stage"),
])
def test_resume_of_what_is_no_complete_checkpoint_is_one_line(prepared_data, tmp_path, kind, message):
    tag = tmp_path / "missing" if kind == "missing" else damaged_tag(tmp_path, kind)
    started = time.perf_counter()
    result = run("launch/train.py", "--data", str(prepared_data), "--run-dir", str(tmp_path / "run"),
                 "--resume", str(tag))
    assert_one_line_error(result, message)
    assert time.perf_counter() - started < 15  # refused before anything starts (most of it is DeepSpeed's import)


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "4096"], "--seq-len 4096 exceeds the context of model 'tiny' (max_position_embeddings=2048)"),
    (["--run-dir", "{file}/run"], "cannot write there (Not a directory)"),
    (["--deepspeed", "{nested_typo}"], "zero_optimization.overlap_com: extra inputs are not permitted"),
])
def test_bad_training_input_is_one_line(prepared_data, tmp_path, args, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    nested_typo = tmp_path / "typo.json"
    nested_typo.write_text(json.dumps({**json.loads((REPO / "ds_configs" / "zero2.json").read_text()),
                                       "zero_optimization": {"stage": 2, "overlap_com": True}}))
    args = [a.format(file=a_file, nested_typo=nested_typo) for a in args]
    started = time.perf_counter()
    assert_one_line_error(run("launch/train.py", "--data", str(prepared_data), *args), message)
    assert time.perf_counter() - started < 15


def test_bad_inference_input_is_one_line(tiny_checkpoint, tmp_path):
    assert_one_line_error(run("launch/sample.py", "--checkpoint", str(tiny_checkpoint), "--temperature", "inf", "x"),
                          "--temperature inf: expected a number >= 0")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert_one_line_error(run("launch/export.py", str(tiny_checkpoint), str(a_file / "out")),
                          "cannot write the export there")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for script in ("launch/export.py", "launch/sample.py"):
        extra = [str(tmp_path / "out")] if script.endswith("export.py") else ["x"]
        args = [str(truncated), *extra] if script.endswith("export.py") else ["--checkpoint", str(truncated), *extra]
        assert_one_line_error(run(script, *args), "cannot load this checkpoint")


# ---------------------------------------------------------------------------------- data checked before step 1
def copy_of(prepared_data: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(prepared_data, data, ignore=shutil.ignore_patterns("verified.json", ".data_prep.lock"))
    return data


def test_a_shard_altered_in_place_is_refused_before_step_1(prepared_data, tmp_path):
    data = copy_of(prepared_data, tmp_path)
    shard = data / json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    content = bytearray(shard.read_bytes())
    content[10:12] = content[12:14]  # same size, other tokens
    shard.write_bytes(bytes(content))
    result = run("launch/train.py", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--max-steps", "2",
                 *TINY_RUN)
    assert_one_line_error(result, shard.name)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step trained


def edited_down_vocabulary(prepared_data: Path, small_config, tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of the data whose manifest says n_vocab 512, a model config of 512 tokens): the data's ids go to 1023."""
    data = copy_of(prepared_data, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["n_vocab"] = 512
    (data / "manifest.json").write_text(json.dumps(manifest))
    model = tmp_path / "model.json"
    model.write_text(json.dumps(small_config.replace(vocab_size=512).to_dict()))
    return data, model


def test_token_ids_beyond_the_models_vocabulary_are_refused_before_step_1(prepared_data, small_config, tmp_path):
    """The manifest's n_vocab lowered to 512 and a model of 512 tokens: ids up to 1023 would index past the
    embedding (an IndexError at step 1, or only at the first evaluation with a larger model)."""
    data, model = edited_down_vocabulary(prepared_data, small_config, tmp_path)
    result = run("launch/train.py", "--data", str(data), "--model", str(model), "--run-dir", str(tmp_path / "run"),
                 "--max-steps", "2", *TINY_RUN)
    assert_one_line_error(result, "token id")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_shard_changed_after_its_verification_with_size_and_mtime_kept_is_one_line(prepared_data, tmp_path):
    """`--verify-data first` trusts a verified shard whose size and mtime did not change (documented); ids beyond the
    vocabulary written into it that way are caught by the batch reader: one line, not an IndexError at step 1."""
    from gpt_moe.data.shards import TokenShards
    from gpt_moe.data.verify import verify_data

    data = copy_of(prepared_data, tmp_path)
    for file in data.glob("*.bin"):  # long settled: a shard written within 2 s of its hashing is hashed again
        os.utime(file, (time.time() - 600, time.time() - 600))
    shards = TokenShards(data)
    verify_data(shards, "first")  # recorded in verified.json
    shard = data / shards.manifest.splits["train"].shards[0].file
    stat = shard.stat()
    tokens = np.frombuffer(shard.read_bytes(), dtype=shards.dtype).copy()
    tokens[::7] = shards.n_vocab + 3  # every window reads some
    shard.write_bytes(tokens.tobytes())
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = run("launch/train.py", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--max-steps", "2",
                 "--verify-data", "first", *TINY_RUN)
    assert_one_line_error(result, f"{shard}: token id {shards.n_vocab + 3} is beyond the tokenizer's")
    assert "--verify-data always" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.multiprocess
def test_an_error_after_the_process_group_started_exits_2_every_time(prepared_data, small_config, tmp_path):
    """The edited-down n_vocab of the test above, on 2 ranks, ten times: every rank refuses in one line and the
    launcher exits 2; none aborts with "terminate called without an active exception" (exit 134, seen in 1 of 4 such
    runs before every rank took its process group down itself)."""
    data, model = edited_down_vocabulary(prepared_data, small_config, tmp_path)
    from launching import train

    for attempt in range(10):
        result = train("--data", str(data), "--model", str(model), "--run-dir", str(tmp_path / "run"),
                       "--max-steps", "2", *TINY_RUN, ranks=2, check=False)
        assert result.returncode == 2, (attempt, result.stderr[-2000:])
        assert "terminate called" not in result.stderr and "token id" in result.stderr, (attempt, result.stderr[-2000:])


# ------------------------------------------------------------------------------------ one run per run directory
def test_a_second_run_on_the_same_run_dir_is_refused_while_the_first_runs(prepared_data, fp32_zero2, tmp_path):
    """Two real launches racing on one --run-dir: the second is refused in one line naming the first (pid, host,
    start, command) before it writes anything; the first finishes with its own configs and every step logged once."""
    run_dir = tmp_path / "run"
    common = ["launch/train.py", "--deepspeed", str(fp32_zero2), "--data", str(prepared_data), "--run-dir",
              str(run_dir), "--seq-len", "64", "--micro-batch", "8", "--log-interval", "1", "--eval-interval", "1000",
              "--save-interval", "1000", "--sample-tokens", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    first = subprocess.Popen([sys.executable, *common, "--max-steps", "120"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = run_dir / RUN_LOCK_FILE
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    second = run(*common, "--max-steps", "5", "--lr", "1e-4")
    assert first.poll() is None, "the first run ended before the second started: make it longer"
    assert_one_line_error(second, f"--run-dir {run_dir} is in use by another training run (pid {first.pid} on ")
    assert "launch/train.py" in second.stderr and "--max-steps 120" in second.stderr  # its command
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if "train/loss" in record]  # not the evaluations' lines
    assert steps == list(range(1, 121))
    assert json.loads((run_dir / "train_config.json").read_text())["lr"] == 3e-3  # the first run's, not 1e-4
    assert lock.read_text() == ""  # released when the first run ended


def test_a_lock_left_by_a_dead_run_is_taken_over_and_one_from_another_host_is_refused(prepared_data, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "2026-01-01 00:00:00",
              "command": "python launch/train.py --max-steps 9"}
    (run_dir / RUN_LOCK_FILE).write_text(json.dumps(record))
    args = ["launch/train.py", "--data", str(prepared_data), "--run-dir", str(run_dir), "--max-steps", "1",
            "--eval-interval", "1000", *TINY_RUN]
    result = run(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"taking over the lock of a training run that ended without releasing it (pid {dead.stdout.strip()}" \
        in result.stderr
    elsewhere = {**record, "host": "another-host.example"}
    other = tmp_path / "other"
    other.mkdir()
    (other / RUN_LOCK_FILE).write_text(json.dumps(elsewhere))
    refused = run(*[a if a != str(run_dir) else str(other) for a in args])
    assert_one_line_error(refused, f"--run-dir {other} is held by a training run on another host (pid "
                                   f"{dead.stdout.strip()} on another-host.example")
    assert sorted(p.name for p in other.iterdir()) == [RUN_LOCK_FILE]  # nothing written


# ----------------------------------------------------------------------------------------------- launch/eval.py
def test_eval_checks_its_options_first_and_prepares_the_default_data(tiny_checkpoint, tmp_path):
    started = time.perf_counter()
    for flag in ("--items", "--max-new-tokens"):
        assert_one_line_error(run("launch/eval.py", str(tiny_checkpoint), "--chat", flag, "-1"),
                              f"{flag} -1: expected a positive integer")
    assert time.perf_counter() - started < 20  # before any model or data is read
    missing = tmp_path / "nowhere"
    assert_one_line_error(run("launch/eval.py", str(tiny_checkpoint), "--chat", "--data", str(missing)),
                          f"--format chat --source builtin-chat --tokenizer-from {tiny_checkpoint} --out {missing}")
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    fresh = subprocess.run([sys.executable, str(REPO / "launch" / "eval.py"), str(tiny_checkpoint), "--chat", "--items",
                            "3", "--max-new-tokens", "4", "--json"], cwd=tmp_path, capture_output=True, text=True,
                           env=env, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert (tmp_path / "data" / "chat-builtin" / "manifest.json").is_file()  # prepared as fine-tuning does
    assert json.loads(fresh.stdout.splitlines()[-1])["replies"] == 3


def test_eval_takes_a_validation_split_smaller_than_one_batch(tiny_checkpoint, tmp_path):
    data = prepare_chat(tiny_checkpoint, tmp_path / "chat", [(f"question {i}", f"answer {i}") for i in range(20)],
                        val_fraction=0.1)
    result = run("launch/eval.py", str(tiny_checkpoint), "--chat", "--data", str(data), "--items", "2",
                 "--max-new-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    loss = json.loads(result.stdout.splitlines()[-1])["held_out_assistant_loss"]
    assert np.isfinite(loss) and loss > 0


# ------------------------------------------------------------------------- weights checked by every loader
@pytest.fixture(scope="module")
def hf_weights(tmp_path_factory) -> Path:
    """A deepseek_v3 transformers directory (fp32) whose vocabulary fits the prepared corpus."""
    from hf_dirs import V3_LIKE, save_directory, transformers_model

    return save_directory(transformers_model("deepseek_v3", **{**V3_LIKE, "vocab_size": 1024}),
                          tmp_path_factory.mktemp("hf") / "hf")


def damaged_weights(source: Path, target: Path, damage: str) -> None:
    """A copy of `source` with one tensor of model.safetensors damaged, or its header."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    file = target / "model.safetensors"
    if damage == "header":
        content = bytearray(file.read_bytes())
        content[8:24] = b"\x00garbage\xff{{{{{{{{"  # inside the JSON header
        file.write_bytes(bytes(content))
        return
    state = load_file(file)
    key = "model.layers.1.self_attn.o_proj.weight"
    state[key] = {"shape": state[key][:-1], "int": state[key].to(torch.int64), "fp16": state[key].half(),
                  "nan": state[key].index_fill(1, torch.tensor([3]), float("nan"))}[damage]
    save_file(state, file)


@pytest.mark.parametrize("damage, message", [
    ("shape", "model.layers.1.self_attn.o_proj.weight is [63, 64] there but [64, 64] in the model config"),
    ("header", "model.safetensors: cannot load this checkpoint: not a readable safetensors file"),
    ("int", "model.layers.1.self_attn.o_proj.weight is int64; model weights are floating-point tensors"),
    ("fp16", "model.layers.1.self_attn.o_proj.weight is float16 while the other weights are float32"),
    ("nan", "model.layers.1.self_attn.o_proj.weight holds non-finite values"),
])
def test_init_from_damaged_weights_is_one_line_and_leaves_no_run_directory(hf_weights, prepared_data, tmp_path,
                                                                           damage, message):
    """Refused before the engine is built (header problems before anything starts; a non-finite value while the
    weights are read, on every rank alike); the run directory the start made is taken back."""
    weights = tmp_path / "weights"
    damaged_weights(hf_weights, weights, damage)
    result = run("launch/train.py", "--init-from", str(weights), "--data", str(prepared_data), "--run-dir",
                 str(tmp_path / "runs" / "sft"), "--max-steps", "1", *TINY_RUN)
    assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()
    assert "MiB of routed experts" not in result.stderr  # no load report: refused before the model was complete


@pytest.mark.parametrize("damage, message", [
    ("nan", "model.layers.1.self_attn.o_proj.weight holds non-finite values"),
    ("int", "model.layers.1.self_attn.o_proj.weight is int64"),
])
def test_sample_export_and_app_refuse_damaged_weights_in_one_line(tiny_checkpoint, tmp_path, damage, message):
    weights = tmp_path / "weights"
    damaged_weights(tiny_checkpoint, weights, damage)
    attempts = {"sample": run("launch/sample.py", "--checkpoint", str(weights), "--max-new-tokens", "2", "x"),
                "export": run("launch/export.py", str(weights), str(tmp_path / "out")),
                "app": run("app.py", "--checkpoint", str(weights), "--port", "0")}
    for name, result in attempts.items():
        assert_one_line_error(result, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]  # no export, no partial export


@pytest.mark.multiprocess
def test_reshard_of_a_truncated_optimizer_file_names_it_in_one_line(saved_run, tmp_path):
    tag = tmp_path / "step_00000004"
    shutil.copytree(saved_run / "checkpoints" / "step_00000004", tag)
    optimizer = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    result = run("launch/reshard.py", str(tag), str(tmp_path / "out"), "--no-progress")
    assert_one_line_error(result, f"{optimizer}: unreadable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]


@pytest.mark.multiprocess
def test_reshard_of_non_finite_optimizer_state_names_the_parameter_in_one_line(saved_run, tmp_path):
    tag = tmp_path / "step_00000004"
    shutil.copytree(saved_run / "checkpoints" / "step_00000004", tag)
    optimizer = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(optimizer, weights_only=False)
    with torch.no_grad():
        state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0][0] = float("inf")
    torch.save(state, optimizer)
    result = run("launch/reshard.py", str(tag), str(tmp_path / "out"), "--no-progress")
    assert_one_line_error(result, "the fp32 state of model.embed_tokens.weight holds non-finite values")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]
