"""Data preparation throughput and memory, side by side in one run: python launch/bench.py data.

Every contender tokenizes the same text, the `builtin` corpus (stdlib .py files + pydoc
topics), with the same tokenizer (default bpe:4096, trained once here and not timed):

    raw          tiktoken `encode_ordinary_batch(texts, num_threads=1)` on the texts in memory
    workers=N    `data_prep` in a child process with N workers: reading, tokenizing, writing
                 and hashing the shards (its encoding phase, worker start-up included)

Each round runs every contender once; the table shows each one's best round, because
the speed of a shared machine drifts between runs. Peak memory is the resident set of
the data_prep process tree (the run and its workers), sampled every 50 ms, for the whole
corpus and for a quarter of it: flat means it does not grow with the corpus.
Targets (issue 3): workers=N >= 0.8 x N x raw; peak < 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_prep.encode import pieces
from data_prep.sources import open_corpus
from gpt_moe.data.tokenizer import load_bpe_file, load_standard, parse_tokenizer_spec, save_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[1]

PEAK_TARGET_BYTES = 1.5e9
SPEED_TARGET = 0.8


def _child(config_json: str) -> None:
    """Run one preparation and print its result as JSON (called in a fresh process)."""
    from data_prep import PrepareConfig, prepare

    config = json.loads(config_json)
    result = prepare(PrepareConfig(**{**config, "sources": tuple(config["sources"]), "out": Path(config["out"])}))
    print(json.dumps({"tokens": result.tokens, "seconds": result.seconds}))


def run_prep(config: dict) -> dict:
    """data_prep in a child process; its result plus the peak RSS of its process tree.

    The tree's members are listed at every sample during the first second (the workers start
    then) and every 0.5 s after (a /proc scan costs ~2 ms, which would steal CPU from the run
    if done at every sample); their RSS is summed every 50 ms.
    """
    import psutil

    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    root, members, started, listed, peak = psutil.Process(proc.pid), [], time.monotonic(), 0.0, 0
    while proc.poll() is None:
        try:
            if time.monotonic() - listed > 0.5 or time.monotonic() - started < 1.0:
                members, listed = [root, *root.children(recursive=True)], time.monotonic()
            total = 0
            for member in members:
                try:
                    total += member.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"data_prep failed: {stderr.strip().splitlines()[-1] if stderr.strip() else proc.returncode}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss": peak}


def report(args: argparse.Namespace, n_chars: int, n_tokens: int, raw_best: float, prep_best: dict[int, float],
           peaks: dict[int, int], quarter_workers: int, quarter: dict, load_before: float) -> None:
    """The table: tokens/s of raw tiktoken and of data_prep per worker count, their ratios and peak memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"data_prep throughput: builtin corpus, {n_chars / 1e6:.1f}M characters -> {n_tokens / 1e6:.2f}M tokens "
          f"(+1 end-of-text per document), tokenizer {args.tokenizer}, {cores} CPU cores, best of {args.rounds} rounds")
    print()
    print(f"{'':34}{'tokens/s':>10}{'x raw':>8}{'target':>10}{'peak RSS (tree)':>18}")
    print(f"{'raw encode_ordinary_batch, 1 thread':34}{raw_best / 1e6:>9.2f}M{1:>7.2f}x{'':>10}{'-':>18}")
    for workers in args.workers:
        ratio = prep_best[workers] / raw_best
        target = SPEED_TARGET * workers
        mark = "ok" if ratio >= target else "MISSED"
        print(f"{f'data_prep --workers {workers}':34}{prep_best[workers] / 1e6:>9.2f}M{ratio:>7.2f}x"
              f"{f'>={target:.1f}x {mark}':>10}{peaks[workers] / 1e6:>15.0f} MB")
    print(f"{f'data_prep --workers {quarter_workers}, 1/4 of corpus':34}{'':>10}{'':>8}{'':>10}"
          f"{quarter['peak_rss'] / 1e6:>15.0f} MB")
    peak = max(peaks.values())
    print()
    print(f"1-minute load average before the run: {load_before:.2f} on {cores} cores"
          + (" (other processes were competing for the CPU: rerun on an idle machine)" if load_before > 0.5 else ""))
    print(f"peak memory {peak / 1e9:.2f} GB (target < {PEAK_TARGET_BYTES / 1e9:.1f} GB): "
          f"{'ok' if peak < PEAK_TARGET_BYTES else 'MISSED'}; quarter corpus {quarter['peak_rss'] / 1e6:.0f} MB "
          f"vs full {peaks[quarter_workers] / 1e6:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/bench.py data", description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="bpe:4096", help="bpe:N | cl100k_base | o200k_base | gpt2")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    corpus = open_corpus(["builtin"])
    texts = [piece.text for piece in pieces(corpus.documents())]
    n_chars = sum(map(len, texts))
    spec = parse_tokenizer_spec(args.tokenizer)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        if spec.kind == "bpe":  # train once; every contender uses the saved file
            save_tokenizer(train_bpe(texts, spec.vocab_size, name=args.tokenizer), tmp)
            enc, prep_tokenizer = load_bpe_file(tmp / "tokenizer.tiktoken"), str(tmp / "tokenizer.tiktoken")
        else:
            enc, prep_tokenizer = load_standard(args.tokenizer), args.tokenizer

        def config(workers: int, run: str, max_tokens: int | None = None) -> dict:
            return {"sources": ["builtin"], "tokenizer": prep_tokenizer, "out": str(tmp / run), "workers": workers,
                    "max_tokens": max_tokens, "progress_bar": False}

        raw_best, prep_best, peaks, n_tokens = 0.0, {w: 0.0 for w in args.workers}, {w: 0 for w in args.workers}, 0
        for round_ in range(args.rounds):
            start = time.perf_counter()
            n_tokens = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=1)))
            raw_best = max(raw_best, n_tokens / (time.perf_counter() - start))
            for workers in args.workers:
                result = run_prep(config(workers, f"r{round_}_w{workers}"))
                prep_best[workers] = max(prep_best[workers], result["tokens"] / result["seconds"])
                peaks[workers] = max(peaks[workers], result["peak_rss"])
        quarter_workers = max(args.workers)
        quarter = run_prep(config(quarter_workers, "quarter", max_tokens=n_tokens // 4))

    report(args, n_chars, n_tokens, raw_best, prep_best, peaks, quarter_workers, quarter, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
