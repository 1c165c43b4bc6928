"""Node-local disks (gpt_moe.train.disks, gpt_moe.checkpoint.node_files): two loopback "nodes" as in
tests/test_many_nodes.py, each with its own working directory standing for its own disk, so that the same relative
`--run-dir runs/x --data data/small` are two directories. Each node prepares the same bytes, writes its own ranks'
checkpoint files and a COMPLETE record listing them, and resumes in place; gathered into one directory (what rsync
does) the checkpoint resumes on one rank, reshards and exports. Not gathered, it is refused in one line wherever it
is opened."""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_DATA_PREP
from launching import train, train_on_nodes

from gpt_moe.checkpoint.loading import load_for_inference, read_weights
from gpt_moe.checkpoint.model_dir import ModelDirectory
from gpt_moe.checkpoint.node_files import rank_files, require_files
from gpt_moe.checkpoint.records import COMPLETE, CheckpointRecord, Layout, NodeFiles, read_record, write_record
from gpt_moe.cli import EXIT_BAD_INPUT
from gpt_moe.data.manifest import MANIFEST_FILE, Manifest
from gpt_moe.data.verify import RECORD_FILE
from gpt_moe.errors import CheckpointError, ConfigError, DataError
from gpt_moe.train.checkpointer import open_resume_source
from gpt_moe.train.disks import (NODE_LOCAL, SHARED, Disks, Node, disks_mode, refuse_different_data,
                                 refuse_different_resumes)
from gpt_moe.train.plan import ResumePlan

REPO = Path(__file__).resolve().parent.parent
OLD_RUN = REPO / "tests" / "fixtures" / "run_v0_1"
INFERENCE_FILES = {"model_config.json", "tokenizer_info.json", "tokenizer.tiktoken", COMPLETE}
"""What every node's tag directory holds besides its own ranks' files."""
COMPARED = ("train/lm_loss", "train/mtp_loss", "train/grad_norm")
VERIFIED = RECORD_FILE  # the record of a prepared directory's verification, which training writes


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())["history"]


def script(name: str):
    """launch/NAME.py as a module (its `main(argv)` runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_on_each(nodes: list[Path], out: str) -> None:
    """`python -m data_prep ... --out OUT` in every node's directory at once, as each node would prepare its own."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    runs = [subprocess.Popen([sys.executable, "-m", "data_prep", *SMALL_DATA_PREP, "--out", out], cwd=node, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for node in nodes]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()[-2000:]


def assert_same_steps(ours: dict, reference: dict) -> None:
    assert ours["step"] == reference["step"]
    for key in (*COMPARED, "train/loss"):  # fp32 sums of the same values in another order: within 1e-6
        assert ours[key] == pytest.approx(reference[key], rel=1e-6, abs=0), (ours["step"], key)
    assert ours["expert_loads"] == reference["expert_loads"], ours["step"]


@pytest.mark.multiprocess
def test_node_local_disks_prepare_the_same_data_write_their_own_files_resume_and_gather(
        prepared_data, two_ranks_one_node, tmp_path):
    """2 nodes x 1 rank (torchrun) on two node directories, 3 fp32 steps of the micro model: each node prepared the
    data itself, byte for byte the reference's; the losses, gradient norms and expert loads are the one-node
    2-rank run's; each node's tag holds its own rank's files (and the model-states file, which each node's ranks
    load) as the COMPLETE record, the same on both nodes, lists; export refuses the ungathered tag in one line;
    the same two nodes resume for a 4th step; the tag gathered into one directory holds the reference's weights,
    resumes on one rank (converted: the 4th step is the nodes' 4th step) and exports."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    prepare_on_each(nodes, "data/small")
    for node in nodes:
        data = node / "data" / "small"
        assert {p.name for p in data.iterdir()} == {p.name for p in prepared_data.iterdir()} - {VERIFIED}
        for file in data.iterdir():
            if file.name != MANIFEST_FILE:  # which records when it was made
                assert file.read_bytes() == (prepared_data / file.name).read_bytes(), file
        assert Manifest.load(data).content_sha256() == Manifest.load(prepared_data).content_sha256()

    args = [*two_ranks_one_node.args, "--data", "data/small", "--run-dir", "runs/x"]
    node0, _ = train_on_nodes("torchrun", *args, node_dirs=nodes)
    assert "disks: node-local: each of the 2 nodes has its own runs/x and data" in node0.stdout
    assert all((node / "data" / "small" / VERIFIED).is_file() for node in nodes)  # each node checked its own copy
    for ours, reference in zip(history(nodes[0] / "runs/x"), history(two_ranks_one_node.run_dir), strict=True):
        assert_same_steps(ours, reference)

    tag = Path("runs/x/checkpoints/step_00000003")
    record = read_record(nodes[0] / tag)
    assert (nodes[0] / tag / COMPLETE).read_bytes() == (nodes[1] / tag / COMPLETE).read_bytes()
    assert [(n.node, n.ranks) for n in record.nodes] == [(0, (0,)), (1, (1,))]
    for rank, node in enumerate(nodes):
        held = {p.name for p in (node / tag).iterdir()}
        assert held == set(record.nodes[rank].files) | INFERENCE_FILES
        assert {f"client_rank{rank:05d}.pt", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                "mp_rank_00_model_states.pt"} == set(record.nodes[rank].files)
        assert {"train_config.json", "model_config.json", ".run.lock"} <= {p.name for p in (node / "runs/x").iterdir()}
    one_node_tag = two_ranks_one_node.run_dir / "checkpoints" / tag.name
    assert {p.name for p in one_node_tag.iterdir()} == {f for n in record.nodes for f in n.files} | INFERENCE_FILES
    with pytest.raises(CheckpointError, match=r"not gathered here: missing client_rank00001\.pt, zero_pp_rank_1_"
                                              r"mp_rank_00_optim_states\.pt on node 1 \("):
        load_for_inference(nodes[0] / tag)

    node0, _ = train_on_nodes("torchrun", *args, "--max-steps", "4", node_dirs=nodes)  # the last --max-steps counts
    assert "resume from runs/x/checkpoints/step_00000003 (step 3, 3,072 tokens): the same layout" in node0.stdout
    fourth = history(nodes[0] / "runs/x")[-1]

    gathered = tmp_path / "gathered"
    for node in nodes:  # rsync -a nodeN:runs/x/checkpoints/step_00000003/ gathered/checkpoints/step_00000003/
        shutil.copytree(node / tag, gathered / "checkpoints" / tag.name, dirs_exist_ok=True)
    gathered_tag = gathered / "checkpoints" / tag.name
    reference_weights = read_weights(ModelDirectory.open(one_node_tag))
    ours = read_weights(ModelDirectory.open(gathered_tag))
    assert ours.keys() == reference_weights.keys()
    assert all(ours[name].equal(reference_weights[name]) for name in ours)
    one = train(*two_ranks_one_node.args, "--data", str(nodes[0] / "data/small"), "--run-dir", str(gathered),
                "--max-steps", "4", "--grad-accum", "4", ranks=0).stdout
    assert "converting from 2 ranks, EP 1, ZeRO-2, fp32 to 1 rank, EP 1, ZeRO-2, fp32" in one
    assert_same_steps(history(gathered)[-1], fourth)
    assert script("reshard").main([str(gathered_tag), str(tmp_path / "layout-free"), "--no-progress"]) == 0
    assert script("export").main([str(gathered_tag), str(tmp_path / "export")]) == 0
    exported = read_weights(ModelDirectory.open(tmp_path / "export"))
    assert all(exported[name].equal(reference_weights[name]) for name in exported)


# ---------------------------------------------------------------------- fast: records and refusals
NODE_FILES = (NodeFiles(0, "node-a", (0,), ("client_rank00000.pt", "mp_rank_00_model_states.pt",
                                            "zero_pp_rank_0_mp_rank_00_optim_states.pt")),
              NodeFiles(1, "node-b", (1,), ("client_rank00001.pt", "mp_rank_00_model_states.pt",
                                            "zero_pp_rank_1_mp_rank_00_optim_states.pt")))


def node0_tag(tmp_path: Path) -> tuple[Path, CheckpointRecord]:
    """A tag as node 0 of 2 holds it on its own disk: its files (empty stand-ins) and a record listing both nodes'."""
    tag = tmp_path / "run" / "checkpoints" / "step_00000003"
    tag.mkdir(parents=True)
    for name in NODE_FILES[0].files:
        (tag / name).write_bytes(b"")
    write_record(tag, CheckpointRecord(3, Layout(2, 1, 2, False), 3072, nodes=NODE_FILES))
    return tag, read_record(tag)


def test_a_tag_not_gathered_is_one_line_naming_the_missing_files_and_their_node_wherever_it_is_opened(
        tmp_path, capsys):
    """export, reshard, --init-from / the app's loader and a resume in another layout need every listed file; a
    resume in the same layout on rank r needs rank r's. Each says what is missing, where it is and how to gather it
    before reading a tensor (the files here are empty: reading one would fail otherwise)."""
    tag, record = node0_tag(tmp_path)
    assert record.nodes == NODE_FILES  # the record keeps the lists through JSON
    missing = (f"{tag}: written on node-local disks and not gathered here: missing client_rank00001.pt, "
               f"zero_pp_rank_1_mp_rank_00_optim_states.pt on node 1 (node-b); gather it first: rsync -a "
               f"node-b:{tag}/ {tag}/ (docs/training.md, Many nodes)")
    for name in ("export", "reshard"):
        assert script(name).main([str(tag), str(tmp_path / name)]) == EXIT_BAD_INPUT
        assert capsys.readouterr().err == f"error: {missing}\n"
        assert not (tmp_path / name).exists()
    for opening in (lambda: ModelDirectory.open(tag), lambda: open_resume_source(ResumePlan(tag, record, True), 0)):
        with pytest.raises(CheckpointError) as refused:
            opening()
        assert str(refused.value) == missing
    with pytest.raises(CheckpointError, match=r"not gathered here: rank 1 needs client_rank00001\.pt, zero_pp_rank_1_"
                                              r"mp_rank_00_optim_states\.pt on node 1 \(node-b\); "):
        open_resume_source(ResumePlan(tag, record, False), 1)
    require_files(tag, record, rank=0)  # DeepSpeed's loader on rank 0 reads what node 0 holds
    for name in NODE_FILES[1].files:  # gathered
        (tag / name).write_bytes(b"")
    require_files(tag, record)


def test_the_files_deepspeeds_loader_reads_on_a_rank():
    """Its own partition and RNG files, the files of no rank, the files of the routed experts it holds; nothing of
    another rank (EP 2: rank 1 holds experts 8-15 of 16)."""
    listed = ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
              "bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt", "client_rank00001.pt", "client_rank00010.pt",
              "layer_0_expert_3_mp_rank_00_model_states.pt", "layer_1_expert_8_mp_rank_00_model_states.pt",
              "layer_0_expert_15_mp_rank_00_model_states.pt", "layer_0_expert_16_mp_rank_00_model_states.pt"]
    assert rank_files(listed, 1, (8, 16)) == {
        "mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "client_rank00001.pt",
        "layer_1_expert_8_mp_rank_00_model_states.pt", "layer_0_expert_15_mp_rank_00_model_states.pt"}
    assert rank_files(listed, 10, None) == {"mp_rank_00_model_states.pt", "client_rank00010.pt",
                                            "bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt"}


def test_the_disks_are_shared_when_every_node_sees_rank0s_file_node_local_when_only_node_0_does(tmp_path):
    assert disks_mode(tmp_path, [True]) == SHARED
    assert disks_mode(tmp_path, [True, True, True]) == SHARED
    assert disks_mode(tmp_path, [True, False, False]) == NODE_LOCAL
    with pytest.raises(ConfigError, match=rf"^--run-dir {tmp_path}: nodes \[0, 2\] see the one node 0 writes, nodes "
                                          r"\[1\] do not; every node must see one shared file system there, or each "
                                          r"its own disk \(node-local\)$"):
        disks_mode(tmp_path, [True, False, True])


def test_nodes_that_hold_different_data_or_find_different_checkpoints_are_one_line():
    """Each node's manifest digest leaves out when it was made, and nothing else; --resume auto on each node's own
    disk must find the same tag on every node."""
    manifest = Manifest.load(OLD_RUN / "data")
    later = dataclasses.replace(manifest, created_at="2030-01-01T00:00:00Z")
    split = manifest.splits["train"]
    other = dataclasses.replace(manifest, splits={**manifest.splits, "train": dataclasses.replace(
        split, shards=(dataclasses.replace(split.shards[0], sha256="0" * 64),))})
    assert later.content_sha256() == manifest.content_sha256() != other.content_sha256()
    nodes = (Node(0, "a", (0, 1)), Node(1, "b", (2, 3)))
    data = [(Path("data/x"), manifest.content_sha256())]
    refuse_different_data(nodes, data, [[later.content_sha256()], [manifest.content_sha256()]])
    with pytest.raises(DataError, match=rf"^data/x: the nodes hold different data \(manifest sha256 without its "
                                        rf"creation time: node 0 {manifest.content_sha256()[:12]}, node 1 "
                                        rf"{other.content_sha256()[:12]}\); prepare it with the same data_prep "):
        refuse_different_data(nodes, data, [[manifest.content_sha256()], [other.content_sha256()]])
    refuse_different_resumes(nodes, ["step_00000003", "step_00000003"], "auto")
    with pytest.raises(CheckpointError, match=r"^--resume auto: the nodes find different checkpoints to resume "
                                              r"\(node 0 step_00000003, node 1 none\); each node resumes from its own"):
        refuse_different_resumes(nodes, ["step_00000003", None], "auto")


def test_who_writes_what_a_directory_holds_once_global_rank_0_on_a_shared_disk_each_nodes_first_rank_on_its_own():
    """The writer prepares the default data (the others wait), holds the run lock, writes the configs, the inference
    files and COMPLETE: once per run directory."""
    nodes = (Node(0, "a", (0, 1)), Node(1, "b", (2, 3)))
    assert [Disks(SHARED, rank, nodes).writer for rank in range(4)] == [True, False, False, False]
    assert [Disks(NODE_LOCAL, rank, nodes).writer for rank in range(4)] == [True, False, True, False]
    assert Disks(NODE_LOCAL, 3, nodes).node == nodes[1]
