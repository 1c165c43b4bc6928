"""Many nodes on one machine: each "node" is a loopback address (127.0.0.1 the master, 127.0.0.2), reached by its own
launcher started together with the others as a cluster job starts them, or over ssh by DeepSpeed's pdsh runner
(`tests/loopback_ssh.py`), sharing the run directory (the shared-file-system case). The launch forms of
docs/training.md "Many nodes" train as one node with as many ranks does; the banner counts the nodes; a node that
never starts ends the run in bounded time, named; the timeouts are validated flags."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import LOOPBACK_NODES, NODE_LAUNCHERS, free_port, rank_env, train_on_nodes
from loopback_ssh import SSH_NODES, LoopbackSshd
from test_train_multiprocess import LATER_STEP_TOLERANCE, STEP_TOLERANCE

from gpt_moe.errors import ConfigError
from gpt_moe.train.config import DIST_TIMEOUT_S, JOIN_TIMEOUT_S, build_parser, parse_train_args
from gpt_moe.train.hardware import Hardware
from gpt_moe.train.join import JoinError, join_all_ranks, missing_ranks_named, span_list
from gpt_moe.train.plan import launcher_ranks_per_node, plan_run

REPO = Path(__file__).resolve().parent.parent
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")
OLD_RUN = REPO / "tests" / "fixtures" / "run_v0_1"


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())["history"]


@pytest.fixture
def sshd(tmp_path):
    with LoopbackSshd(tmp_path / "ssh") as server:
        yield server


@pytest.mark.multiprocess
def test_two_nodes_by_every_launch_form_train_as_one_node_of_two_ranks(prepared_data, two_ranks_one_node, sshd,
                                                                        tmp_path):
    """2 nodes x 1 rank, by `torchrun --nnodes 2 --node_rank R`, by `deepspeed --hostfile H --no_ssh --node_rank R`
    and by `deepspeed --hostfile H` run once on node 0 (pdsh over ssh), against `deepspeed --num_gpus 2` on one
    node, same seed, fp32, a micro model for 3 steps: the same losses, clipped gradient norms and per-expert token
    counts at every step, the same checkpoint files written once into the shared run directory, and a banner that
    says 2 nodes x 1 rank per node (1 x 2 on one node) on one shared disk."""
    args = [*two_ranks_one_node.args, "--data", str(prepared_data)]
    one_node = two_ranks_one_node.run_dir
    assert "nodes: 1 node(s) x 2 rank(s) per node" in two_ranks_one_node.stdout
    reference = history(one_node)
    assert [h["step"] for h in reference] == [1, 2, 3]
    for form in (*NODE_LAUNCHERS, "pdsh"):
        run_dir = tmp_path / form
        if form == "pdsh":  # one runner, the ranks' output prefixed with their host by pdsh
            result, _ = sshd.deepspeed(list(SSH_NODES), "launch/train.py", *args, "--run-dir", str(run_dir))
            assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            assert "export OMP_NUM_THREADS=1;" in result.stderr + result.stdout  # reached the ranks over ssh
            lines = (result.stdout + result.stderr).splitlines()
            node0 = "\n".join(line for line in lines if line.startswith(f"{SSH_NODES[0]}: "))
            node1 = "\n".join(line for line in lines if line.startswith(f"{SSH_NODES[1]}: "))
            assert f"{SSH_NODES[1]}: " in node1 and not sshd.sessions(grace=5)  # both ran, and ended
        else:
            node0, node1 = (r.stdout + r.stderr for r in train_on_nodes(form, *args, "--run-dir", str(run_dir)))
        assert "nodes: 2 node(s) x 1 rank(s) per node" in node0, (form, node0[-2000:])
        assert "gpt-moe training" not in node1  # one banner: global rank 0's
        assert "Warning:" not in node1 and " WARNING gpt_moe" not in node1, (form, node1[-2000:])  # once per run
        assert f"disks: shared (all 2 nodes see one {run_dir})" in node0, form
        ours = history(run_dir)
        assert [h["step"] for h in ours] == [1, 2, 3], form
        for a, b in zip(reference, ours):
            # Every rank does the same arithmetic on the same rows wherever it runs; only the transport of the
            # gradient sum differs (DeepSpeed's shared-memory all-reduce on one node, gloo over TCP between nodes),
            # and a sum of two fp32 values is the same either way: measured bit-identical. rel=1e-6 leaves room
            # only for a reduction that adds in another order (~1e-7); both nodes reading node 0's rows (data
            # sampled by local rank, tried) moved the step-1 loss by 1.2e-4 relative, caught at once.
            for key in ("train/loss", "train/lm_loss", "train/mtp_loss", "train/grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=0), (form, a["step"], key)
            assert b["expert_loads"] == a["expert_loads"], (form, a["step"])
        tag = Path("checkpoints") / "step_00000003"
        assert (run_dir / tag / "COMPLETE").is_file(), form
        assert sorted(p.name for p in (run_dir / tag).iterdir()) == sorted(p.name for p in (one_node / tag).iterdir())


@pytest.mark.multiprocess
def test_two_nodes_of_two_ranks_with_the_experts_spread_over_both_train_as_ep1(prepared_data, two_ranks_one_node,
                                                                               tmp_path):
    """2 nodes x 2 ranks, --ep-size 4 (each rank holds 4 of the 16 routed experts, so the expert all-to-all crosses
    the nodes), each node on its own disk, against the EP=1 run of 2 ranks on one node with the same global batch
    (micro-batch 2 x 4 ranks reads the windows micro-batch 4 x 2 ranks reads): the same losses and clipped gradient
    norms within the EP tolerance (tests/test_train_multiprocess.py says why EP is not bit-identical), and every
    expert's checkpoint file on the node that trained it, none on the other."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    args = [*two_ranks_one_node.args, "--data", str(prepared_data), "--micro-batch", "2", "--ep-size", "4",
            "--run-dir", "runs/ep4"]
    node0, _ = train_on_nodes("deepspeed", *args, ranks_per_node=2, node_dirs=nodes)
    assert "nodes: 2 node(s) x 2 rank(s) per node" in node0.stdout
    reference, ours = history(two_ranks_one_node.run_dir), history(nodes[0] / "runs" / "ep4")
    assert [h["step"] for h in ours] == [h["step"] for h in reference] == [1, 2, 3]
    for a, b in zip(reference, ours):
        rel = STEP_TOLERANCE.get(a["step"], LATER_STEP_TOLERANCE)
        for key in ("train/loss", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=0), (a["step"], key)
    moe_layers = len(reference[0]["expert_loads"])  # the MoE layers and the MTP block's
    for node, experts in zip(nodes, (range(0, 8), range(8, 16))):
        files = (node / "runs" / "ep4" / "checkpoints" / "step_00000003").iterdir()
        held = sorted(tuple(map(int, match.groups())) for f in files if (match := EXPERT_FILE.fullmatch(f.name)))
        assert held == [(layer, e) for layer in range(moe_layers) for e in experts], (node, held)


SRUN_ON_LOOPBACK = """#!/bin/bash
# srun's stand-in: the task (after srun's options) once per node, all at once, SLURM_NODEID set; the worst exit
while [[ $1 == --* ]]; do shift; done
pids=(); for node in 0 1; do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0; for pid in "${pids[@]}"; do wait "$pid" || status=$?; done; exit $status
"""
SCONTROL_ON_LOOPBACK = "#!/bin/bash\n# scontrol show hostnames: the job's nodes\nprintf '127.0.0.1\\n127.0.0.2\\n'\n"


@pytest.mark.multiprocess
def test_the_slurm_template_trains_as_one_node_of_two_ranks(prepared_data, two_ranks_one_node, tmp_path):
    """launch/slurm_train.sbatch run by bash with stand-ins for SLURM's `scontrol` (the job's hosts: 127.0.0.1 and
    127.0.0.2) and `srun` (its task once per node, at once): one `deepspeed --no_ssh` launcher per node, and the
    job trains exactly as one node of 2 ranks."""
    tools = tmp_path / "slurm"
    tools.mkdir()
    for name, text in (("srun", SRUN_ON_LOOPBACK), ("scontrol", SCONTROL_ON_LOOPBACK)):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    run_dir = tmp_path / "slurm-run"
    env = dict(rank_env(), PATH=f"{tools}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="loop[1-2]",
               GPUS_PER_NODE="1", MASTER_PORT=free_port(), TMPDIR=str(tmp_path),
               TRAIN_ARGS=" ".join([*two_ranks_one_node.args, "--data", str(prepared_data), "--run-dir", str(run_dir)]))
    job = subprocess.run(["bash", "launch/slurm_train.sbatch"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "nodes: 2 node(s) x 1 rank(s) per node" in job.stdout
    assert (tmp_path / "gpt-moe-hosts.7.1").read_text() == "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"
    for a, b in zip(history(two_ranks_one_node.run_dir), history(run_dir), strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6, abs=0), a["step"]


@pytest.mark.multiprocess
def test_an_unreachable_node_ends_the_run_within_30_seconds_naming_it(prepared_data, two_ranks_one_node, sshd,
                                                                       tmp_path):
    """`deepspeed --hostfile H` over ssh with default flags, H naming 127.0.0.1 and 127.0.0.3 where no sshd listens:
    pdsh says at once that ssh to 127.0.0.3 failed; node 0's rank waits --join-timeout for rank 1, then names it
    and the run ends, non-zero, within about 30 s of the launch (measured ~27 s here) with nothing left running
    (without the join it waited out the 10-minute process-group timeout). With no sshd answering at all, DeepSpeed's
    runner refuses at once, naming the first host."""
    args = [*two_ranks_one_node.args, "--data", str(prepared_data), "--run-dir", str(tmp_path / "run")]
    unreachable = LOOPBACK_NODES[2]
    assert unreachable not in SSH_NODES
    result, elapsed = sshd.deepspeed([SSH_NODES[0], unreachable], "launch/train.py", *args, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    # the ranks' start-up (~5 s here, more under load), the join, the launchers' exits
    assert elapsed < JOIN_TIMEOUT_S + 20, (elapsed, output[-3000:])
    assert re.search(rf"^pdsh@.+: {re.escape(unreachable)}: ssh exited with exit code 255$", output, re.M), output
    assert re.search(rf"^{re.escape(SSH_NODES[0])}: error: rank 1 \(node 1 of 2\) did not join the run at "
                     rf"{re.escape(LOOPBACK_NODES[0])}:\d+ within {JOIN_TIMEOUT_S:g} s \(--join-timeout\); 1 of 2 "
                     r"ranks did\. ", output, re.M), output[-3000:]
    assert not sshd.sessions(grace=5)

    result, elapsed = sshd.deepspeed(list(SSH_NODES), "launch/train.py", *args, ssh_port=free_port(), timeout=120)
    assert result.returncode != 0 and elapsed < 30, (elapsed, result.stderr[-3000:])
    assert f"host={SSH_NODES[0]} was not reachable via ssh" in result.stderr.splitlines()[-1]


def test_rank_0_names_the_ranks_and_nodes_that_did_not_join():
    """Rank 0 of 4 (2 ranks per node, as the deepspeed launcher says) alone at the rendezvous: past the join
    timeout, one line naming ranks 1-3 on nodes 0 and 1. In this process: the join is a TCP store, no process
    group."""
    environ = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", "MASTER_ADDR": LOOPBACK_NODES[0],
               "MASTER_PORT": free_port()}
    started = time.monotonic()
    with pytest.raises(JoinError, match=rf"^ranks 1-3 \(nodes 0-1 of 2\) did not join the run at "
                                        rf"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']} within 1.5 s "
                                        r"\(--join-timeout\); 1 of 4 ranks did\. [^\n]+$"):
        join_all_ranks(1.5, environ)
    assert 1.5 <= time.monotonic() - started < 10
    assert join_all_ranks(1.5, {"RANK": "0", "WORLD_SIZE": "1"}) is None  # one rank: nothing to join
    assert span_list([7, 1, 2, 3, 9, 10]) == "1-3, 7, 9-10"
    # nodes of unequal size (a hostfile with 2 and 4 slots): this node's 2 ranks do not say where rank 3 is
    assert missing_ranks_named([3], 6, {"LOCAL_SIZE": "2", "CROSS_SIZE": "2"}) == "rank 3"
    assert missing_ranks_named([3, 4, 5], 6, {"LOCAL_SIZE": "3", "CROSS_SIZE": "2"}) == "ranks 3-5 (node 1 of 2)"


def test_the_banner_counts_nodes_from_the_launchers_environment(tmp_path):
    """Ranks per node from torchrun's LOCAL_WORLD_SIZE or the deepspeed launcher's LOCAL_SIZE; nodes = world / that."""
    assert launcher_ranks_per_node({"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2"}) == 2
    assert launcher_ranks_per_node({"LOCAL_SIZE": "1", "WORLD_SIZE": "2", "CROSS_SIZE": "2"}) == 1
    assert launcher_ranks_per_node({"WORLD_SIZE": "2"}) == 0  # plain python, a dry run: one node
    cfg, explicit, _ = parse_train_args(["--model", str(OLD_RUN / "model.json"), "--data", str(OLD_RUN / "data"),
                                         "--deepspeed", str(OLD_RUN / "zero2_fp32.json"), "--seq-len", "32",
                                         "--micro-batch", "2", "--run-dir", str(tmp_path / "run")])
    cpu = Hardware(bf16_supported=False, bf16_native=False, device_type="cpu")
    for world, per_node, expected in ((4, 2, "2 node(s) x 2 rank(s) per node"), (4, 0, "1 node(s) x 4 rank(s)"),
                                      (3, 2, "3 rank(s), 2 on this node (nodes of unequal size)")):
        assert f"nodes: {expected}" in plan_run(cfg, explicit, world, cpu, per_node).banner()


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan"])
@pytest.mark.parametrize("flag", ["dist_timeout", "join_timeout"])
def test_a_timeout_that_is_not_a_positive_number_is_one_line(flag, value):
    with pytest.raises(ConfigError, match=rf"^training config: {flag}={float(value)!r} is invalid; expected a "
                                          r"positive number of seconds$"):
        parse_train_args([f"--{flag.replace('_', '-')}", value])


def test_dist_timeout_defaults_to_ten_minutes_and_says_so():
    assert DIST_TIMEOUT_S == 600 and parse_train_args([])[0].dist_timeout == 600
    assert parse_train_args(["--dist-timeout", "45"])[0].dist_timeout == 45
    help_text = next(action.help for action in build_parser()._actions if action.dest == "dist_timeout")
    assert "frozen or lost node" in help_text and help_text.endswith("(default: 600.0)")


def test_join_timeout_defaults_to_twenty_seconds_and_says_when_to_raise_it():
    assert JOIN_TIMEOUT_S == 20 and parse_train_args([])[0].join_timeout == 20
    assert parse_train_args(["--join-timeout", "300"])[0].join_timeout == 300
    help_text = next(action.help for action in build_parser()._actions if action.dest == "join_timeout")
    assert "where nodes start independently, raise it" in help_text and help_text.endswith("(default: 20.0)")


def test_the_dist_timeout_is_the_process_groups_timeout():
    """start_distributed (the trainer passes it --dist-timeout) gives gloo's process group that timeout, and every
    group made after it (torch's default there is 30 minutes): a collective waiting for a frozen rank raises after
    it. One rank, in a fresh interpreter (the process group and the launcher variables it sets stay out of this
    one)."""
    script = ("import torch, torch.distributed as dist\n"
              "from gpt_moe.train.engine import start_distributed, end_distributed\n"
              "start_distributed(2, 7.5)\n"
              "backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu'))\n"
              "print('timeout', backend.options._timeout.total_seconds())\n"
              "later = dist.new_group([0])._get_backend(torch.device('cpu'))\n"
              "print('later group timeout', later.options._timeout.total_seconds())\n"
              "end_distributed()\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=rank_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "timeout 7.5" in result.stdout.splitlines()
    assert "later group timeout 7.5" in result.stdout.splitlines()  # DeepSpeed's ZeRO and expert groups are later
