"""A node lost mid-run: killed (its launcher and ranks SIGKILLed: a crashed host) or frozen (SIGSTOP: a hung GPU or
a network partition, its sockets left open). The survivor ends the run in bounded time with one line saying so,
every complete checkpoint stays intact, and the run resumes on one node (the layout converted)."""

import json
import signal
import time
from pathlib import Path

import pytest
from launching import NodeJob, train

from gpt_moe.checkpoint.records import newest_complete
from gpt_moe.train.engine import lost_rank_reason

LOST = "another rank stopped answering"


def lose_node_one(form: str, how: int, args: list[str], run_dir: Path) -> tuple[float, str]:
    """Trains on 2 loopback nodes until a checkpoint is complete, then sends `how` to node 1 (launcher and ranks);
    returns how long node 0's launcher took to exit after that, and what node 0 printed on stderr."""
    job = NodeJob(form, *args, "--run-dir", str(run_dir))
    started = time.monotonic()
    while newest_complete(run_dir / "checkpoints") is None:
        assert job.processes[0].poll() is None, job.finish(timeout=5, check=False)[0].stderr[-3000:]
        assert time.monotonic() - started < 300, "no checkpoint within 300 s"
        time.sleep(0.1)
    job.signal(1, how)
    lost_at = time.monotonic()
    job.processes[0].wait(timeout=300)
    survived_for = time.monotonic() - lost_at
    node0, _ = job.finish(timeout=1, check=False)  # the frozen node is killed here
    assert node0.returncode != 0
    return survived_for, node0.stderr


@pytest.mark.multiprocess
def test_a_killed_node_and_a_frozen_node_end_the_run_in_bounded_time_and_it_resumes_on_one_node(
        prepared_data, two_ranks_one_node, tmp_path):
    """Killed: the survivor's next collective fails on the closed connection and it exits within seconds (measured
    1.4-2.8 s). Frozen: the connection stays open, so only the collective timeout ends the wait: --dist-timeout 10
    plus at most 30 s (measured 22 s for 20). Both name the cause and the newest complete checkpoint in one line;
    the killed run then resumes on one rank from that checkpoint (2 ranks converted to 1)."""
    args = [*two_ranks_one_node.args, "--data", str(prepared_data), "--max-steps", "2000", "--save-interval", "2"]

    killed = tmp_path / "killed"
    seconds, stderr = lose_node_one("torchrun", signal.SIGKILL, args, killed)
    assert seconds < 15, stderr[-3000:]
    newest = newest_complete(killed / "checkpoints")
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and LOST in errors[0] and f"newest complete checkpoint is {newest}" in errors[0], errors

    frozen = tmp_path / "frozen"
    seconds, stderr = lose_node_one("deepspeed", signal.SIGSTOP, [*args, "--dist-timeout", "10"], frozen)
    assert 10 <= seconds < 10 + 30, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and LOST in errors[0] and "--dist-timeout 10s" in errors[0], errors

    step = json.loads((newest / "COMPLETE").read_text())["step"]
    resumed = train(*args, "--run-dir", str(killed), "--max-steps", str(step + 1), ranks=0)
    assert f"resumed from {newest} at step {step}" in resumed.stderr
    assert "converting from 2 ranks" in resumed.stderr
    history = json.loads((killed / "summary.json").read_text())["history"]
    assert history[-1]["step"] == step + 1


@pytest.mark.parametrize("message, lost", [
    ("[/x/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:13710: Connection reset by peer. This is typically "
     "caused by a remote worker hanging", "Read error [127.0.0.1]:13710: Connection reset by peer"),
    ("[/x/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation to complete",
     "Timed out waiting 20000ms for recv operation to complete"),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", None),
])
def test_only_a_collectives_failure_reads_as_a_lost_rank(message, lost):
    assert lost_rank_reason(RuntimeError(message)) == lost
    assert lost_rank_reason(ValueError("gloo")) is None
