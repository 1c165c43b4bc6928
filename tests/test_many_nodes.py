"""Many nodes on one machine: each "node" is its own launcher on a loopback address (127.0.0.1 the master, 127.0.0.2),
started together as a cluster job starts them, sharing the run directory (the shared-file-system case). The launch
forms of docs/training.md "Many nodes" train as one node with as many ranks does; the banner counts the nodes; the
collective timeout is a validated flag."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launching import NODE_LAUNCHERS, rank_env, train_on_nodes

from gpt_moe.errors import ConfigError
from gpt_moe.train.config import DIST_TIMEOUT_S, build_parser, parse_train_args
from gpt_moe.train.hardware import Hardware
from gpt_moe.train.plan import launcher_ranks_per_node, plan_run

REPO = Path(__file__).resolve().parent.parent
OLD_RUN = REPO / "tests" / "fixtures" / "run_v0_1"


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())["history"]


@pytest.mark.multiprocess
def test_two_nodes_by_torchrun_and_by_deepspeed_without_ssh_train_as_one_node_of_two_ranks(
        prepared_data, two_ranks_one_node, tmp_path):
    """2 nodes x 1 rank, by `torchrun --nnodes 2 --node_rank R` and by `deepspeed --hostfile H --no_ssh --node_rank R`,
    against `deepspeed --num_gpus 2` on one node, same seed, fp32, a micro model for 3 steps: the same losses, clipped
    gradient norms and per-expert token counts at every step, the same checkpoint files written once into the shared
    run directory, and a banner that says 2 nodes x 1 rank per node (1 x 2 on one node)."""
    args = [*two_ranks_one_node.args, "--data", str(prepared_data)]
    one_node = two_ranks_one_node.run_dir
    assert "nodes: 1 node(s) x 2 rank(s) per node" in two_ranks_one_node.stdout
    reference = history(one_node)
    assert [h["step"] for h in reference] == [1, 2, 3]
    for form in NODE_LAUNCHERS:
        run_dir = tmp_path / form
        node0, node1 = train_on_nodes(form, *args, "--run-dir", str(run_dir))
        assert "nodes: 2 node(s) x 1 rank(s) per node" in node0.stdout, (form, node0.stdout[-2000:])
        assert "gpt-moe training" not in node1.stdout  # one banner: global rank 0's
        assert f"disks: shared (all 2 nodes see one {run_dir})" in node0.stdout, form
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
def test_a_dist_timeout_that_is_not_a_positive_number_is_one_line(value):
    with pytest.raises(ConfigError, match=rf"^training config: dist_timeout={float(value)!r} is invalid; expected a "
                                          r"positive number of seconds$"):
        parse_train_args(["--dist-timeout", value])


def test_dist_timeout_defaults_to_ten_minutes_and_says_so():
    assert DIST_TIMEOUT_S == 600 and parse_train_args([])[0].dist_timeout == 600
    assert parse_train_args(["--dist-timeout", "45"])[0].dist_timeout == 45
    help_text = next(action.help for action in build_parser()._actions if action.dest == "dist_timeout")
    assert "frozen or lost node" in help_text and help_text.endswith("(default: 600.0)")


def test_the_dist_timeout_is_the_process_groups_timeout():
    """start_distributed (the trainer passes it --dist-timeout) gives gloo's process group that timeout: a collective
    waiting for a frozen rank raises after it. One rank, in a fresh interpreter (the process group and the launcher
    variables it sets stay out of this one)."""
    script = ("import torch, torch.distributed as dist\n"
              "from gpt_moe.train.engine import start_distributed, end_distributed\n"
              "start_distributed(2, 7.5)\n"
              "backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu'))\n"
              "print('timeout', backend.options._timeout.total_seconds())\n"
              "end_distributed()\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=rank_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "timeout 7.5" in result.stdout.splitlines()
