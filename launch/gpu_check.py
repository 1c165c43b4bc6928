"""GPU check: the CUDA paths of gpt-moe, exercised end to end in a few minutes on one machine.

    python launch/gpu_check.py [--out DIR] [--skip-throughput]

Stages, in order (each prints its timings; a summary ends the run; exit status 1 if any stage failed):

  env         torch / CUDA / GPUs / DeepSpeed versions and the MFU peak of `gpt_moe.train.hardware`
  data        the built-in corpus prepared with data_prep's Python API (bpe:1024, ~2M tokens) into a temp dir
  kernel      `tiny` forward + backward in bf16: every expert matmul took `torch._grouped_mm`, none the loop
  train       `python launch/train.py` (one rank, ds_configs/zero2.json, bf16 by "auto"): loss falls, bf16 used,
              tokens/s and MFU of the last logged window
  decode      the trained checkpoint through `load_for_inference`: latent-cache decoding equals the uncached
              forward (fp32 tightly, bf16 within bf16 rounding), greedy decode tokens/s
  throughput  `small` forward + backward in bf16 on random ids: tokens/s and MFU at a size that fills the GPU
  ep          with 2+ GPUs, 2-rank NCCL runs with --ep-size 2 and --ep-size 1: equal per-step losses and equal
              logits of the two merged checkpoints

Without CUDA it prints one line and exits 0. `--device cpu` (a developer flag) runs the same flow on CPU in
fp32 at smaller sizes, skipping what only CUDA can show. Never part of the test suite's run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

NO_GPU_LINE = "gpu_check: needs a CUDA GPU (none found here); nothing checked"
# Tolerances (their reasons are in check_decode's and check_ep's docstrings)
DECODE_FP32_MAX_DIFF = 2e-3  # latent cache vs uncached forward, fp32 logits
DECODE_BF16_ERROR_RATIO, DECODE_BF16_ERROR_FLOOR = 2.0, 0.01  # mean |bf16 - fp32| of the cached vs uncached path
EP_LOSS_RTOL = 2e-2  # per-step loss, EP=2 vs EP=1, bf16
EP_LOGITS_MEAN_DIFF = 1e-2  # mean |logits(EP=2 checkpoint) - logits(EP=1 checkpoint)|, fp32 inference
START = time.perf_counter()


@dataclass(frozen=True)
class Sizes:
    """What each stage runs on one kind of device (CPU sizes keep a development run to minutes)."""

    data_tokens: int
    data_workers: int
    bpe_sample_chars: int
    val_fraction: float  # per document: a small corpus needs a larger share to fill a few validation batches
    kernel_batch: tuple[int, int]  # batch, seq
    train_steps: int
    train_seq: int
    train_batch: int
    train_log: int
    train_timeout: int
    decode_prefill: int
    decode_steps: int
    generate_tokens: int
    throughput_model: str
    throughput_seq: int
    throughput_batches: tuple[int, ...]  # tried in order until one fits in memory
    throughput_steps: int
    ep_steps: int
    ep_seq: int
    ep_batch: int
    ep_timeout: int


GPU_SIZES = Sizes(data_tokens=2_000_000, data_workers=8, bpe_sample_chars=1 << 23, val_fraction=0.05,
                  kernel_batch=(8, 512),
                  train_steps=40, train_seq=512, train_batch=16, train_log=10, train_timeout=240,
                  decode_prefill=128, decode_steps=64, generate_tokens=128,
                  throughput_model="small", throughput_seq=2048, throughput_batches=(16, 8, 4), throughput_steps=10,
                  ep_steps=6, ep_seq=512, ep_batch=8, ep_timeout=180)
CPU_SIZES = Sizes(data_tokens=300_000, data_workers=2, bpe_sample_chars=1 << 21, val_fraction=0.2,
                  kernel_batch=(2, 128), train_steps=16, train_seq=64, train_batch=8, train_log=4, train_timeout=240,
                  decode_prefill=48, decode_steps=16, generate_tokens=32,
                  throughput_model="tiny", throughput_seq=256, throughput_batches=(8,), throughput_steps=3,
                  ep_steps=3, ep_seq=64, ep_batch=4, ep_timeout=240)


class StageFailed(Exception):
    """A check did not hold; the message is the one line the summary shows. `value` still goes to later stages
    (a training run that needed a fallback still leaves a checkpoint to decode)."""

    def __init__(self, message: str, value=None, details: dict | None = None) -> None:
        super().__init__(message)
        self.value, self.details = value, details or {}


class StageSkipped(Exception):
    """A stage that cannot run here; the message says why (not counted as passed)."""


def say(message: str) -> None:
    """One progress line: seconds since start and wall-clock time."""
    print(f"[{time.perf_counter() - START:6.1f}s {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------- stage bookkeeping
class Report:
    """Stage results, printed as they finish and written to `out/gpu_check.json` after each stage, so a run
    killed by an outer timeout still leaves what it had."""

    def __init__(self, out: Path | None, device: str, time_limit_s: float) -> None:
        self.out = out
        self.deadline = START + time_limit_s
        self.results: dict = {"device": device, "time_limit_s": time_limit_s, "stages": {}}
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def left(self, reserve: float = 0.0) -> float:
        """Seconds left before the time limit, less `reserve` (what later stages and the summary need)."""
        return self.deadline - time.perf_counter() - reserve

    def run(self, name: str, check, *args):
        """Runs check(*args) -> (key line, details dict, value for later stages); records PASS/FAIL/SKIPPED."""
        say(f"== {name}")
        start = time.perf_counter()
        value = None
        try:
            if self.left() < 20:
                raise StageSkipped(f"time limit: {self.left():.0f}s left of {self.results['time_limit_s']:.0f}s")
            key, details, value = check(*args)
            status = "PASS"
        except StageSkipped as why:
            status, key, details = "SKIPPED", str(why), {}
        except StageFailed as why:
            status, key, details, value = "FAIL", str(why), why.details, why.value
        except (KeyboardInterrupt, SystemExit):
            seconds = time.perf_counter() - start
            self.results["stages"][name] = {"status": "FAIL", "key": "interrupted from outside", "seconds": seconds}
            self.write()
            raise
        except Exception as err:  # noqa: BLE001 -- anything else: one line in the summary, the traceback in the log
            traceback.print_exc(file=sys.stdout)
            status, key, details = "FAIL", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", {}
        seconds = time.perf_counter() - start
        self.results["stages"][name] = {"status": status, "key": key, "seconds": round(seconds, 1), **details}
        say(f"== {name}: {status} ({seconds:.1f}s) {key}")
        self.write()
        return value

    def write(self) -> None:
        if self.out is not None:
            self.results["elapsed_s"] = round(time.perf_counter() - START, 1)
            (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))

    def finish(self) -> int:
        stages = self.results["stages"]
        failed = [n for n, r in stages.items() if r["status"] == "FAIL"]
        self.results["ok"] = not failed
        self.write()
        print("=" * 100)
        print(f"gpu_check summary ({time.perf_counter() - START:.0f}s, device {self.results['device']})")
        for name, result in stages.items():
            print(f"  {result['status']:<8} {name:<11} {result['key']}")
        skipped = [n for n, r in stages.items() if r["status"] == "SKIPPED"]
        verdict = "FAIL: " + ", ".join(failed) if failed else "all checks that ran passed"
        print(f"  => {verdict}" + (f" (skipped, not passed: {', '.join(skipped)})" if skipped else ""))
        print("=" * 100, flush=True)
        return 1 if failed else 0


# ---------------------------------------------------------------------- subprocesses
def subprocess_env() -> dict[str, str]:
    """The environment for the trainer: this checkout importable, unbuffered output, ninja on PATH for
    DeepSpeed's JIT builds (the `ninja` wheel's binary may not be on PATH)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if shutil.which("ninja") is None:
        try:
            import ninja

            env["PATH"] = os.pathsep.join((ninja.BIN_DIR, env.get("PATH", "")))
        except (ImportError, AttributeError):
            pass
    return env


def run_logged(cmd: list[str], timeout: float, label: str) -> tuple[int | None, list[str]]:
    """Runs cmd in its own process group, echoing its output with a prefix; returns (exit status or None on
    timeout, last lines). On timeout or exit, whatever is left of the group (launcher ranks) is killed."""
    say(f"{label}: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    tail: deque[str] = deque(maxlen=60)

    def pump() -> None:
        for line in proc.stdout:  # text mode: tqdm's carriage returns end lines too
            line = line.rstrip()
            if line:
                tail.append(line)
                print(f"    {label}| {line[:300]}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code: int | None = None
    try:
        code = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        say(f"{label}: no exit after {timeout:.0f}s, killing its process group")
    finally:  # also when this script is stopped (SIGTERM from an outer `timeout` raises SystemExit here)
        _end_group(proc)
        reader.join(timeout=5)
    return code, list(tail)


def _end_group(proc: subprocess.Popen) -> None:
    """Ends whatever is left of the process group of `proc` (SIGTERM, then SIGKILL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc.poll()  # reap the leader if it has exited: an unreaped leader alone would still count as a member
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)
    proc.wait()


# ---------------------------------------------------------------------- stages
def check_env(device) -> tuple[str, dict, float]:
    from gpt_moe.train.hardware import device_peak_flops

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpus": os.cpu_count()}
    if device.type == "cuda":
        count = torch.cuda.device_count()
        info["gpus"] = [f"{torch.cuda.get_device_name(i)} sm{''.join(map(str, torch.cuda.get_device_capability(i)))} "
                        f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB" for i in range(count)]
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["nvcc"] = _nvcc()
    info["ninja"] = shutil.which("ninja", path=subprocess_env()["PATH"]) or "not found"
    info["packages"] = _versions(("setuptools", "ninja", "triton", "tiktoken", "tokenizers", "pydantic", "hjson"))
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as err:  # noqa: BLE001 -- reported, and the training stages will fail on it
        info["deepspeed"] = f"import failed: {type(err).__name__}: {err}"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak, how = device_peak_flops(device, dtype)
    info["peak_flops"], info["peak_source"] = peak, how
    for key, value in info.items():
        say(f"  {key}: {value}")
    if str(info["deepspeed"]).startswith("import failed"):
        raise StageFailed(f"deepspeed {info['deepspeed']}", value=peak)
    gpus = f"{len(info.get('gpus', []))} x {info['gpus'][0]}" if info.get("gpus") else "CPU"
    return f"torch {info['torch']}, deepspeed {info['deepspeed']}, {gpus}, peak {peak / 1e12:.3g} TFLOP/s", info, peak


def _versions(names: tuple[str, ...]) -> str:
    """Installed versions (DeepSpeed's JIT builds need setuptools, through torch.utils.cpp_extension, and ninja)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} MISSING")
    return ", ".join(found)


def _nvcc() -> str:
    """The CUDA compiler that torch's (and so DeepSpeed's) JIT builds will use."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as err:  # noqa: BLE001 -- e.g. setuptools missing: reported, the JIT build will fail on it
        return f"torch.utils.cpp_extension does not import ({type(err).__name__}: {err})"
    if CUDA_HOME is None:
        return "no CUDA_HOME found: DeepSpeed's JIT builds will fail"
    return f"{CUDA_HOME}: {_command_line([str(Path(CUDA_HOME) / 'bin' / 'nvcc'), '--version'], last=True)}"


def _command_line(cmd: list[str], last: bool = False) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable ({type(err).__name__})"
    return (out[-1] if last else out[0]) if out else "no output"


def check_data(work: Path, sizes: Sizes) -> tuple[str, dict, Path]:
    """The built-in corpus (this interpreter's standard library) -> bpe:1024 token shards."""
    from data_prep import PrepareConfig, prepare

    config = PrepareConfig(sources=("builtin",), tokenizer="bpe:1024", out=work / "data", workers=sizes.data_workers,
                           val_fraction=sizes.val_fraction, max_tokens=sizes.data_tokens,
                           bpe_sample_chars=sizes.bpe_sample_chars, progress_bar=False)
    result = prepare(config)
    manifest = json.loads((result.out / "manifest.json").read_text())
    splits = {name: split.get("tokens") for name, split in manifest.get("splits", {}).items()}
    details = {"tokens": result.tokens, "encode_s": round(result.seconds, 1), "splits": splits}
    return f"{result.tokens:,} tokens in {result.seconds:.1f}s (encode), splits {splits}", details, result.out


def check_kernel(device, dtype, sizes: Sizes) -> tuple[str, dict, None]:
    """One forward + backward of `tiny`, counting which path every grouped expert matmul took."""
    import gpt_moe.model.moe as moe
    from gpt_moe.model.config import ModelConfig
    from gpt_moe.model.model import DeepSeekForCausalLM

    config = ModelConfig.from_preset("tiny")
    model = DeepSeekForCausalLM(config, seed=0).to(device=device, dtype=dtype)
    batch, seq = sizes.kernel_batch
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
    calls = {"kernel": 0, "loop": 0}
    has_kernel, grouped_mm = moe._has_grouped_mm, torch._grouped_mm

    def counted_has(x, weight):
        result = has_kernel(x, weight)
        calls["kernel" if result else "loop"] += 1
        return result

    def counted_mm(*args, **kwargs):
        calls["grouped_mm"] = calls.get("grouped_mm", 0) + 1
        return grouped_mm(*args, **kwargs)

    moe._has_grouped_mm, torch._grouped_mm = counted_has, counted_mm
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
            loss.backward()
    finally:
        moe._has_grouped_mm, torch._grouped_mm = has_kernel, grouped_mm
    aten_calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_grouped_mm")
    expected = 2 * len(model.moe_layers())  # gate_up and down per MoE layer, the MTP block's included
    details = {**calls, "expected_forward": expected, "aten_grouped_mm_fwd_bwd": aten_calls,
               "loss": loss.item(), "dtype": str(dtype)}
    say(f"  {details}")
    if calls["loop"] or calls["kernel"] != expected or calls.get("grouped_mm", 0) != expected:
        raise StageFailed(f"expected {expected} grouped matmuls on the kernel, got {calls['kernel']} kernel / "
                          f"{calls['loop']} per-expert loop / {calls.get('grouped_mm', 0)} torch._grouped_mm calls")
    if not torch.isfinite(loss):
        raise StageFailed(f"loss {loss.item()} is not finite")
    return (f"{expected}/{expected} forward grouped matmuls on torch._grouped_mm ({dtype}), 0 per-expert loops, "
            f"{aten_calls} aten::_grouped_mm forward+backward"), details, None


def train_command(ds_config: Path | str, data: Path, run_dir: Path, steps: int, seq: int, batch: int, log: int,
                  extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "launch/train.py", "--deepspeed", str(ds_config), "--data", str(data),
            "--run-dir", str(run_dir), "--max-steps", str(steps), "--seq-len", str(seq), "--micro-batch", str(batch),
            "--log-interval", str(log), "--eval-interval", str(steps), "--save-interval", str(steps),
            "--eval-batches", "4", "--warmup-steps", str(max(1, steps // 4)), "--sample-tokens", "0",
            "--resume", "none", *extra]


def torch_adam_config(work: Path) -> Path:
    """zero2.json with DeepSpeed's `torch_adam` switch: torch.optim.AdamW instead of the JIT-built FusedAdam."""
    raw = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    raw["optimizer"]["params"]["torch_adam"] = True
    path = work / "zero2_torch_adam.json"
    path.write_text(json.dumps(raw, indent=1))
    return path


FUSED_ADAM_HINTS = ("fused_adam", "FusedAdam", "ninja", "nvcc", "CUDA_HOME", "cpp_extension", "Error building",
                    "setuptools")


def check_train(data: Path, work: Path, sizes: Sizes, device, left) -> tuple[str, dict, dict]:
    """The real trainer, one rank; on CUDA its AdamW is DeepSpeed's FusedAdam, JIT-built with nvcc on first use.
    If that build fails, the run is repeated with torch's AdamW (so the later stages still get a checkpoint)
    and the stage fails, naming the build as the cause."""
    ds_config: Path | str = "ds_configs/zero2.json"
    run_dir = work / "run_tiny"
    cmd = train_command(ds_config, data, run_dir, sizes.train_steps, sizes.train_seq, sizes.train_batch,
                        sizes.train_log)
    start = time.perf_counter()
    code, tail = run_logged(cmd, min(sizes.train_timeout, left(60)), "train")
    note = ""
    if code != 0 and code is not None and any(h in line for line in tail for h in FUSED_ADAM_HINTS):
        say("train: the run failed in what looks like DeepSpeed's FusedAdam build; retrying with torch AdamW")
        note = "FusedAdam JIT build failed (see log); "
        ds_config, run_dir = torch_adam_config(work), work / "run_tiny_torch_adam"
        cmd = train_command(ds_config, data, run_dir, sizes.train_steps, sizes.train_seq, sizes.train_batch,
                            sizes.train_log)
        code, tail = run_logged(cmd, min(sizes.train_timeout, left(30)), "train")
    seconds = time.perf_counter() - start
    if code != 0:
        raise StageFailed(f"{note}launch/train.py {'timed out' if code is None else f'exited {code}'} after "
                          f"{seconds:.0f}s: {tail[-1][:200] if tail else 'no output'}")
    value = {"run_dir": run_dir, "ds_config": ds_config}
    try:
        key, details = _read_training(run_dir, device, note)
    except StageFailed as why:  # the checkpoint is still worth decoding
        raise StageFailed(str(why), value=value, details=why.details) from None
    details.update(wall_s=round(seconds, 1), ds_config=str(ds_config))
    if note:
        raise StageFailed(note + key, value=value, details=details)
    return key, details, value


def _read_training(run_dir: Path, device, note: str) -> tuple[str, dict]:
    """Checks a finished run's summary: loss fell, bf16 on CUDA; key numbers of the last logged window."""
    summary = json.loads((run_dir / "summary.json").read_text())
    history = summary["history"]
    bf16 = json.loads((run_dir / "ds_config.resolved.json").read_text())["bf16"]["enabled"]
    first, last = history[0], history[-1]
    details = {"bf16": bf16, "steps": summary["step"], "val_loss": summary["val_loss"],
               "loss_first_window": first["train/loss"], "loss_last_window": last["train/loss"],
               "tokens_per_sec": last["perf/tokens_per_sec"], "mfu": last["perf/mfu"],
               "memory_gb": last["perf/memory_gb"], "skipped_steps": summary["skipped_steps"]}
    say(f"  {details}")
    key = (f"loss {first['train/loss']:.3f} -> {last['train/loss']:.3f} (val {summary['val_loss']:.3f}), "
           f"bf16 {bf16}, {last['perf/tokens_per_sec']:,.0f} tokens/s, MFU {last['perf/mfu']:.1%}")
    if not last["train/loss"] < first["train/loss"] - 0.3:
        raise StageFailed(f"{note}loss did not fall: {key}", details=details)
    if device.type == "cuda" and bf16 is not True:
        raise StageFailed(f"{note}bf16 \"auto\" resolved to {bf16!r} on a CUDA GPU: {key}", details=details)
    return key, details


def decode_tokens(tokenizer, batch: int, length: int, device):
    """[batch, length] ids of real text (windows of argparse's source, which every Python ships)."""
    ids = tokenizer.encode_ordinary(Path(argparse.__file__).read_text())
    if len(ids) < batch * length:
        raise StageFailed(f"argparse.py gave only {len(ids)} tokens, {batch * length} needed")
    return torch.tensor(ids[: batch * length], device=device).view(batch, length)


def cached_logits(model, tokens, prefill: int):
    """Logits of prefill + one-token latent-cache decode steps. tokens: [batch, seq] -> [batch, seq, vocab] fp32."""
    caches = model.new_cache(tokens.shape[0], tokens.shape[1])
    pieces = [model.decode_step(tokens[:, :prefill], caches)[0]]
    pieces += [model.decode_step(tokens[:, t:t + 1], caches)[0] for t in range(prefill, tokens.shape[1])]
    return torch.cat(pieces, dim=1).float()


def check_decode(train: dict | None, sizes: Sizes, device) -> tuple[str, dict, None]:
    """The latent cache against the uncached forward, on the trained checkpoint.

    fp32: equal to 2e-3 (the CPU unit test holds 1e-5; CUDA kernels reduce in other orders, while a wrong
    position, mask or absorbed projection is off by O(1) in the logits).
    bf16: both paths round differently, so neither equals the other to fp32 precision. Each is compared with
    the fp32 forward instead: the cached path's mean error must stay within 2x the uncached forward's own bf16
    error + 0.01 (0.01 ~ bf16's spacing at logit 2-4, 2^-6 = 0.016): a bug makes it orders of magnitude larger."""
    from gpt_moe.checkpoint.loading import load_for_inference

    if train is None:
        raise StageSkipped("needs the train stage's checkpoint")
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference means fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    ref = load_for_inference(train["run_dir"], device=device, dtype=torch.float32)
    seq = sizes.decode_prefill + sizes.decode_steps
    tokens = decode_tokens(ref.tokenizer, 2, seq, device)
    with torch.no_grad():
        full32 = ref.model(tokens).logits.float()
        cached32 = cached_logits(ref.model, tokens, sizes.decode_prefill)
    fp32_diff = (cached32 - full32).abs().max().item()
    details = {"fp32_max_abs_diff": fp32_diff, "logit_max_abs": full32.abs().max().item(), "tokens": list(tokens.shape)}
    say(f"  fp32: cached vs uncached max |diff| {fp32_diff:.2e} (logits up to {details['logit_max_abs']:.1f})")
    if fp32_diff > DECODE_FP32_MAX_DIFF:
        raise StageFailed(f"fp32 latent-cache logits differ from the uncached forward by {fp32_diff:.2e} > "
                          f"{DECODE_FP32_MAX_DIFF}", details=details)
    model = ref.model
    if device.type == "cuda":
        del ref
        model = load_for_inference(train["run_dir"], device=device, dtype=torch.bfloat16).model
        details.update(_bf16_errors(model, tokens, full32, sizes.decode_prefill))
    details.update(_greedy_speed(model, tokens[0, : sizes.decode_prefill].tolist(), sizes.generate_tokens, device))
    key = f"fp32 max |cached - uncached| {fp32_diff:.1e}; "
    if "bf16_cached_mean_err" in details:
        key += (f"bf16 mean err vs fp32: cached {details['bf16_cached_mean_err']:.4f}, uncached "
                f"{details['bf16_full_mean_err']:.4f}; ")
    else:
        key += "bf16 comparison needs CUDA (skipped); "
    return key + f"greedy decode {details['decode_tokens_per_sec']:.0f} tokens/s", details, None


def _bf16_errors(model, tokens, full32, prefill: int) -> dict:

    with torch.no_grad():
        full16 = model(tokens).logits.float()
        cached16 = cached_logits(model, tokens, prefill)
    err_full, err_cached = (full16 - full32).abs(), (cached16 - full32).abs()
    result = {"bf16_full_mean_err": err_full.mean().item(), "bf16_cached_mean_err": err_cached.mean().item(),
              "bf16_full_max_err": err_full.max().item(), "bf16_cached_max_err": err_cached.max().item(),
              "bf16_cached_vs_full_max_diff": (cached16 - full16).abs().max().item(),
              "bf16_top1_agree_cached": (cached16.argmax(-1) == full32.argmax(-1)).float().mean().item(),
              "bf16_top1_agree_full": (full16.argmax(-1) == full32.argmax(-1)).float().mean().item()}
    say(f"  bf16: {result}")
    bound = DECODE_BF16_ERROR_RATIO * result["bf16_full_mean_err"] + DECODE_BF16_ERROR_FLOOR
    if result["bf16_cached_mean_err"] > bound:
        raise StageFailed(f"bf16 latent-cache logits: mean error vs fp32 {result['bf16_cached_mean_err']:.4f} > "
                          f"{bound:.4f} ({DECODE_BF16_ERROR_RATIO} x the uncached bf16 forward's "
                          f"{result['bf16_full_mean_err']:.4f} + {DECODE_BF16_ERROR_FLOOR})", details=result)
    return result


def _greedy_speed(model, prompt: list[int], new_tokens: int, device) -> dict:
    """Greedy generation through `generate_ids` (prefill + latent-cache steps), batch 1, after a short warm-up."""
    from gpt_moe.serve.generate import SamplingConfig, generate_ids

    def generate(n: int) -> list[int]:
        out = [int(t[0]) for t in generate_ids(model, [prompt], SamplingConfig(max_new_tokens=n, temperature=0))]
        _sync(device)
        return out

    generate(4)
    start = time.perf_counter()
    out = generate(new_tokens)
    seconds = time.perf_counter() - start
    if len(out) != new_tokens:
        raise StageFailed(f"greedy generation returned {len(out)} tokens, {new_tokens} asked")
    say(f"  greedy: {new_tokens} tokens in {seconds:.2f}s ({new_tokens / seconds:.0f} tokens/s), prompt "
        f"{len(prompt)} tokens; ids {out[:12]}...")
    return {"decode_tokens_per_sec": new_tokens / seconds, "decode_new_tokens": new_tokens, "prompt": len(prompt)}


def _sync(device) -> None:

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_throughput(sizes: Sizes, device, dtype, peak: float, budget_s: float) -> tuple[str, dict, None]:
    """Forward + backward (no optimizer) of a GPU-sized preset on random ids: tokens/s and MFU =
    tokens/s x training FLOPs per token (gpt_moe.model.params) / the device's peak. The batch is the first of
    `throughput_batches` that fits; timing stops early at `budget_s`."""
    from gpt_moe.model.config import ModelConfig
    from gpt_moe.model.params import account

    config = ModelConfig.from_preset(sizes.throughput_model)
    model = _random_model(config, device, dtype)
    seq = sizes.throughput_seq
    flops_per_token = account(config, seq).flops_per_token
    for batch in sizes.throughput_batches:
        try:
            timed = _time_steps(model, batch, seq, sizes.throughput_steps, device, budget_s)
        except torch.cuda.OutOfMemoryError:
            timed = None  # memory is released below, once the exception (and the frames it holds) is gone
        if timed is not None:
            seconds, steps = timed
            break
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        say(f"  batch {batch} x {seq} does not fit; trying a smaller one")
    else:
        raise StageFailed(f"no batch of {sizes.throughput_batches} x {seq} fits")
    tokens_per_sec = batch * seq * steps / seconds
    mfu = tokens_per_sec * flops_per_token / peak
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    details = {"model": config.name, "batch": batch, "seq": seq, "timed_steps": steps, "step_s": seconds / steps,
               "tokens_per_sec": tokens_per_sec, "mfu": mfu, "flops_per_token": flops_per_token,
               "peak_memory_gib": memory, "dtype": str(dtype)}
    say(f"  {details}")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the later stages' processes get the memory back
    return (f"{config.name} {batch}x{seq} fwd+bwd: {tokens_per_sec:,.0f} tokens/s, MFU {mfu:.1%}, "
            f"{seconds / steps * 1e3:.0f} ms/step, peak memory {memory:.1f} GiB"), details, None


def _random_model(config, device, dtype):
    """The model built on the device with N(0, initializer_range) weights (the trainer's seeded init draws every
    expert on the CPU, which takes seconds at this size) and unit norm weights."""
    from gpt_moe.model.model import DeepSeekForCausalLM

    with torch.device(device):
        model = DeepSeekForCausalLM(config, seed=None)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0) if param.dim() == 1 else param.normal_(0.0, config.initializer_range)
    model = model.to(dtype=dtype)
    for _, moe in model.moe_layers():  # the balancing bias stays fp32, as in training
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    return model.train()


def _time_steps(model, batch: int, seq: int, steps: int, device, budget_s: float) -> tuple[float, int]:
    """(seconds, steps) of timed forward + backward steps after two warm-up steps; stops early at budget_s."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device)

    def step() -> None:
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        model.zero_grad(set_to_none=True)

    deadline = time.perf_counter() + budget_s
    for _ in range(2):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    done = 0
    while done < steps and (done == 0 or time.perf_counter() < deadline):
        step()
        done += 1
        if done == 1 or done % 4 == 0:
            _sync(device)  # bounds the queue, so the deadline is checked against finished work
    _sync(device)
    return time.perf_counter() - start, done


def check_ep(data: Path | None, train: dict | None, work: Path, sizes: Sizes, device, left,
             ) -> tuple[str, dict, None]:
    """2 ranks through the deepspeed launcher (NCCL on GPUs): --ep-size 2 against --ep-size 1 (data parallel), the
    same global batch and initial weights, bf16 where "auto" picks it.

    Per-step losses are a coarse check only: ranks holding the wrong experts (measured on CPU in fp32 by swapping
    the two ranks' expert ranges) train a model whose experts merely start from other random weights, and its
    losses stay within 0.5% of EP=1's over 6 steps. The sharp check is the merged checkpoints: loaded without
    DeepSpeed in fp32, the EP=2 model's logits must equal the EP=1 model's to a mean |diff| of 0.01 (the swap
    gave 0.077 and the correct layout 1e-5 in fp32; bf16 rounding in the reductions, amplified by AdamW over a
    few steps, is expected at 1e-4..1e-3). Losses must agree to 2%: the layouts only change reduction orders,
    which moves bf16 results by a few ulps (2^-8 relative each) that compound over the steps."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        raise StageSkipped(f"needs 2 GPUs, found {torch.cuda.device_count()}: skipped, not counted as passed")
    if data is None:
        raise StageSkipped("needs the data stage's shards")
    ds_config = train["ds_config"] if train else "ds_configs/zero2.json"
    losses = {ep: _ep_run(ep, ds_config, data, work / f"run_ep{ep}", sizes, left) for ep in (1, 2)}
    details: dict = {"losses_ep1": losses[1], "losses_ep2": losses[2]}
    if not len(losses[1]) == len(losses[2]) == sizes.ep_steps:
        raise StageFailed(f"expected {sizes.ep_steps} logged steps per run: {details}", details=details)
    worst = max(abs(b - a) / abs(a) for a, b in zip(losses[1], losses[2], strict=True))
    details["max_rel_loss_diff"] = worst
    details.update(_merged_logits_diff(work / "run_ep1", work / "run_ep2", data, sizes, device))
    say(f"  {details}")
    if worst > EP_LOSS_RTOL:
        raise StageFailed(f"EP=2 losses differ from EP=1 by up to {worst:.2%} (> {EP_LOSS_RTOL:.0%}): {details}",
                          details=details)
    if details["logits_mean_abs_diff"] > EP_LOGITS_MEAN_DIFF:
        raise StageFailed(f"the merged EP=2 checkpoint's logits differ from EP=1's by "
                          f"{details['logits_mean_abs_diff']:.4f} on average (> {EP_LOGITS_MEAN_DIFF}): experts "
                          "misplaced or not synchronised", details=details)
    return (f"{sizes.ep_steps} steps: losses of EP=2 and EP=1 agree to {worst:.1e} (relative), merged checkpoints' "
            f"logits to {details['logits_mean_abs_diff']:.1e} (mean |diff|)"), details, None


def _ep_run(ep: int, ds_config: Path | str, data: Path, run_dir: Path, sizes: Sizes, left) -> list[float]:
    """One 2-rank run through the deepspeed launcher; returns its per-step losses."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", _free_port(),
           *train_command(ds_config, data, run_dir, sizes.ep_steps, sizes.ep_seq, sizes.ep_batch, 1,
                          ("--ep-size", str(ep), "--clip", "0.5"))[1:]]
    code, tail = run_logged(cmd, min(sizes.ep_timeout, left(5)), f"ep{ep}")
    if code != 0:
        raise StageFailed(f"--ep-size {ep} run {'timed out' if code is None else f'exited {code}'}: "
                          f"{tail[-1][:200] if tail else 'no output'}")
    return [h["train/loss"] for h in json.loads((run_dir / "summary.json").read_text())["history"]]


def _merged_logits_diff(run_one: Path, run_two: Path, data: Path, sizes: Sizes, device) -> dict:
    """Both runs' final checkpoints (experts merged by global id) in fp32: |logits difference| on validation text."""
    from gpt_moe.checkpoint.loading import load_for_inference
    from gpt_moe.data.shards import TokenShards, ValBatches

    torch.backends.cuda.matmul.allow_tf32 = False
    inputs, _ = next(iter(ValBatches(TokenShards(data), sizes.ep_seq, 8, 1)))
    inputs = inputs.to(device)
    with torch.no_grad():
        one = load_for_inference(run_one, device=device).model(inputs).logits
        two = load_for_inference(run_two, device=device).model(inputs).logits
    diff = (two - one).abs()
    return {"logits_mean_abs_diff": diff.mean().item(), "logits_max_abs_diff": diff.max().item()}


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ---------------------------------------------------------------------- the run
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results to OUT/gpu_check.json (after every stage)")
    parser.add_argument("--skip-throughput", action="store_true", help="skip the `small` throughput stage")
    parser.add_argument("--work", type=Path, help="working directory to keep (default: a temporary one, removed)")
    parser.add_argument("--throughput-budget", type=float, default=60.0, help="seconds the throughput stage may time")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="seconds for the whole check: stages that would start later are skipped (default 420)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU_LINE, flush=True)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # cleanup runs on `timeout`
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    dtype, sizes = (torch.bfloat16, GPU_SIZES) if device.type == "cuda" else (torch.float32, CPU_SIZES)
    say(f"gpu_check on {device} ({dtype}); sizes {asdict(sizes)}")
    if device.type == "cpu":
        say("developer mode (--device cpu): fp32, small sizes; the bf16 and NCCL parts are CUDA-specific and skipped")
    report = Report(args.out, str(device), args.time_limit)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            run_stages(report, args, work, device, dtype, sizes)
    finally:  # the summary also when stopped from outside
        code = report.finish()
    return code


def run_stages(report: Report, args: argparse.Namespace, work: Path, device, dtype, sizes: Sizes) -> None:
    peak = report.run("env", check_env, device) or float("nan")
    data = report.run("data", check_data, work, sizes)
    report.run("kernel", check_kernel, device, dtype, sizes)
    train = report.run("train", check_train, data, work, sizes, device, report.left) if data else \
        _skip(report, "train", "data")
    report.run("decode", check_decode, train, sizes, device)
    if args.skip_throughput:
        _skip(report, "throughput", None)
    else:
        budget = min(args.throughput_budget, report.left(30 if device.type == "cuda" else 90))
        report.run("throughput", check_throughput, sizes, device, dtype, peak, budget)
    report.run("ep", check_ep, data, train, work, sizes, device, report.left)


def _skip(report: Report, name: str, needs: str | None) -> None:
    why = f"needs the {needs} stage" if needs else "--skip-throughput"
    report.results["stages"][name] = {"status": "SKIPPED", "key": why, "seconds": 0.0}
    say(f"== {name}: SKIPPED {why}")
    report.write()


if __name__ == "__main__":
    sys.exit(main())
