"""gpt_moe.data: manifest checks, disjoint per-rank sampling, exact resume (also across world sizes), validation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import PrepareConfig, prepare
from gpt_moe.data.manifest import Manifest, ShardInfo, SplitInfo
from gpt_moe.data.shards import TokenShards, TrainBatches, ValBatches
from gpt_moe.data.tokenizer import TokenizerInfo
from gpt_moe.data.verify import RECORD_FILE, verify_data
from gpt_moe.errors import DataError

SHARD_SIZES = {"train": [1000, 2500, 37, 1800], "val": [300, 150]}
SEQ = 8


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Shards whose tokens are their global positions (all distinct), so a window's first token names it."""
    root = tmp_path_factory.mktemp("synthetic")
    base, splits = 0, {}
    for split, sizes in SHARD_SIZES.items():
        shards = []
        for i, n in enumerate(sizes):
            data = (base + np.arange(n)).astype("<u2")
            base += n
            name = f"{split}_{i:05d}.bin"
            (root / name).write_bytes(data.tobytes())
            shards.append(ShardInfo(name, n, hashlib.sha256(data.tobytes()).hexdigest()))
        splits[split] = SplitInfo(documents=1, tokens=sum(sizes), shards=tuple(shards))
    info = TokenizerInfo(name="positions", sha256="0" * 64, n_vocab=1 << 16, eot_id=0, pat_str="", special_tokens={})
    manifest = Manifest(created_at="now", source="synthetic", args={}, tokenizer=info, dtype="uint16", splits=splits)
    (root / "manifest.json").write_text(manifest.to_json())
    return root


def expected_windows(split: str) -> set[int]:
    """First tokens of every window: starts at multiples of SEQ with SEQ + 1 tokens inside one shard."""
    base = 0 if split == "train" else sum(SHARD_SIZES["train"])
    firsts = set()
    for n in SHARD_SIZES[split]:
        firsts |= {base + k * SEQ for k in range((n - 1) // SEQ)}
        base += n
    return firsts


def test_batches_are_shifted_windows_of_the_shards(synthetic):
    shards = TokenShards(synthetic)
    loader = TrainBatches(shards, SEQ, micro_batch=5, seed=3)
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (5, SEQ) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        # tokens are positions: a window is consecutive and starts at a window start
        assert torch.equal(y[:, -1] - x[:, 0], torch.full((5,), SEQ))
        assert set(x[:, 0].tolist()) <= expected_windows("train")
    assert all(isinstance(a, np.memmap) for a in shards.tokens("train"))


@pytest.mark.parametrize("world_size, micro", [(2, 3), (3, 4)])
def test_ranks_never_share_a_window_within_an_epoch(synthetic, world_size, micro):
    shards = TokenShards(synthetic)
    loaders = [TrainBatches(shards, SEQ, micro, rank=r, world_size=world_size, seed=7) for r in range(world_size)]
    n_windows = len(expected_windows("train"))
    assert loaders[0].windows_per_epoch == n_windows
    steps = 2 * n_windows // (world_size * micro) + 1  # past the end of the second epoch
    seen = [[x[:, 0].tolist() for x, _ in (loader.next_batch() for _ in range(steps))] for loader in loaders]
    # order the items globally: step-major, then rank, then row
    items = [first for step in range(steps) for rank in range(world_size) for first in seen[rank][step]]
    for epoch in range(2):
        epoch_items = items[epoch * n_windows:(epoch + 1) * n_windows]
        assert sorted(epoch_items) == sorted(expected_windows("train"))  # each window once per epoch
    assert items[:n_windows] != items[n_windows:2 * n_windows]  # a new order each epoch
    full_steps = n_windows // (world_size * micro)  # steps that lie entirely inside the first epoch
    by_rank = [{first for step in seen[r][:full_steps] for first in step} for r in range(world_size)]
    assert all(len(s) == full_steps * micro for s in by_rank)
    assert all(not (by_rank[a] & by_rank[b]) for a in range(world_size) for b in range(a + 1, world_size))


def test_state_restore_reproduces_the_next_batches(synthetic):
    shards = TokenShards(synthetic)
    a = TrainBatches(shards, SEQ, 4, rank=1, world_size=2, seed=11)
    for _ in range(37):
        a.next_batch()
    state = a.state_dict()
    b = TrainBatches(shards, SEQ, 4, rank=1, world_size=2, seed=11)
    b.load_state_dict(state)
    for _ in range(100):  # crosses an epoch boundary
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    fresh = TrainBatches(shards, SEQ, 4, rank=1, world_size=2, seed=11)
    other = TrainBatches(shards, SEQ, 4, rank=1, world_size=2, seed=11)
    assert torch.equal(fresh.next_batch()[0], other.next_batch()[0])
    assert not torch.equal(fresh.next_batch()[0], TrainBatches(shards, SEQ, 4, 1, 2, seed=12).next_batch()[0])


def test_resume_with_another_world_size_continues_the_global_sequence(synthetic):
    shards = TokenShards(synthetic)
    two = [TrainBatches(shards, SEQ, 2, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(150):
        for loader in two:
            loader.next_batch()
    one = TrainBatches(shards, SEQ, 4, rank=0, world_size=1, seed=5)
    one.load_state_dict(two[0].state_dict())
    four = [TrainBatches(shards, SEQ, 1, rank=r, world_size=4, seed=5) for r in range(4)]
    for loader in four:
        loader.load_state_dict(two[1].state_dict())
    for _ in range(10):
        x_two = torch.cat([loader.next_batch()[0] for loader in two])
        assert torch.equal(one.next_batch()[0], x_two)
        assert torch.equal(torch.cat([loader.next_batch()[0] for loader in four]), x_two)


def test_state_from_other_data_or_settings_is_refused(synthetic):
    shards = TokenShards(synthetic)
    state = TrainBatches(shards, SEQ, 2, seed=1).state_dict()
    with pytest.raises(DataError, match="seq_len is 8 in the checkpoint but 16 now"):
        TrainBatches(shards, 16, 2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        TrainBatches(shards, SEQ, 2, seed=2).load_state_dict(state)


def test_validation_batches_are_fixed_and_split_across_ranks(synthetic):
    shards = TokenShards(synthetic)
    val = ValBatches(shards, SEQ, micro_batch=2, n_batches=5)
    n_windows = len(expected_windows("val"))
    assert len(val) == min(5, n_windows // 2)
    first = [x[:, 0].tolist() for x, _ in val]
    assert first == [x[:, 0].tolist() for x, _ in val]  # every pass is the same
    assert {t for batch in first for t in batch} <= expected_windows("val")
    ranks = [ValBatches(shards, SEQ, 2, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == n_windows // 4
    seen = [{t for x, _ in r for t in x[:, 0].tolist()} for r in ranks]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 4 * (n_windows // 4)
    with pytest.raises(DataError, match="fewer than one batch"):
        ValBatches(shards, SEQ, micro_batch=n_windows + 1)
    with pytest.raises(DataError, match="fewer than one window"):
        TrainBatches(shards, 10_000, 1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    text = (Path(__file__).read_text() + "\n") * 3
    for i in range(6):
        (root / f"doc{i}.txt").write_text(text[i * 100:] + "东京 😀\n")
    out = root / "out"
    prepare(PrepareConfig(sources=(str(root / "*.txt"),), tokenizer="bpe:300", out=out, val_fraction=0.3,
                          shard_tokens=4000, progress_bar=False))
    return out


def _copy(src: Path, dst: Path) -> Path:
    """A copy of a dataset (without a verification record: it describes the original files)."""
    dst.mkdir()
    for path in src.iterdir():
        if path.name != RECORD_FILE:
            (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_real_dataset_opens_verifies_and_decodes(prepared):
    shards = TokenShards(prepared)
    verify_data(shards, "always")
    assert shards.n_vocab == 300 and shards.dtype == np.dtype("<u2")
    enc = shards.tokenizer()
    tokens = np.concatenate(shards.tokens("train"))
    first_doc = tokens[:np.flatnonzero(tokens == shards.eot_id)[0]]
    assert enc.decode(first_doc.tolist()) == (prepared.parent / "doc0.txt").read_text()
    shards.check_vocab(300)
    shards.check_vocab(512)
    with pytest.raises(DataError, match="n_vocab 300 but the model's vocab_size is 256.*vocab_size >= 300"):
        shards.check_vocab(256)


def test_truncated_or_altered_shard_is_detected(prepared, tmp_path):
    truncated = _copy(prepared, tmp_path / "truncated")
    shard = truncated / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train_00000\.bin: \d+ bytes, the manifest says \d+ tokens.*truncated"):
        TokenShards(truncated)

    altered = _copy(prepared, tmp_path / "altered")
    name = Manifest.load(altered).splits["train"].shards[1].file
    shard = altered / name
    data = bytearray(shard.read_bytes())
    data[7] ^= 0x01
    shard.write_bytes(bytes(data))
    TokenShards(altered)  # sizes agree; only checksums can tell
    with pytest.raises(DataError, match=rf"{name}: sha256 .* differs from the manifest's .*altered"):
        verify_data(TokenShards(altered), "always")

    missing = _copy(prepared, tmp_path / "missing")
    val_shard = Manifest.load(missing).splits["val"].shards[0].file
    (missing / val_shard).unlink()
    with pytest.raises(DataError, match=rf"{val_shard}: missing"):
        TokenShards(missing)
    (missing / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.*incomplete"):
        TokenShards(missing)


def test_data_without_validation_split_says_so(prepared, tmp_path):
    manifest = Manifest.load(prepared)
    no_val = _copy(prepared, tmp_path / "no_val")
    for shard in manifest.splits["val"].shards:
        (no_val / shard.file).unlink()
    splits = {"train": manifest.splits["train"], "val": SplitInfo()}  # as data_prep --val-fraction 0 writes it
    (no_val / "manifest.json").write_text(dataclasses.replace(manifest, splits=splits).to_json())
    shards = TokenShards(no_val)
    assert shards.has_split("train") and not shards.has_split("val") and not shards.has_split("test")
    assert TokenShards(prepared).has_split("val")
    with pytest.raises(DataError, match=r"split 'val' has no tokens.*--val-fraction 0.*has_split"):
        ValBatches(shards, SEQ, micro_batch=1)


# ------------------------------------------------------------------------------ verification on first use


def _shard_files(directory: Path) -> list[str]:
    return [s.file for split in Manifest.load(directory).splits.values() for s in split.shards]


def _age(directory: Path, seconds: float = 60) -> None:
    """Set every shard's mtime `seconds` into the past (as for data prepared a while ago)."""
    past = time.time_ns() - int(seconds * 1e9)
    for name in _shard_files(directory):
        os.utime(directory / name, ns=(past, past))


def _flip_a_bit(path: Path, keep_mtime: bool = False) -> None:
    """Alter a shard in place (same size); with `keep_mtime`, as if within the same timestamp tick."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_verify_data_hashes_once_then_only_what_changed(prepared, tmp_path):
    data = _copy(prepared, tmp_path / "data")
    _age(data)
    files = _shard_files(data)
    shards = TokenShards(data)
    first = verify_data(shards)  # mode "first" is the default
    assert first.hashed == files and first.problems == [] and first.record == data / RECORD_FILE
    assert first.max_token_id == max(int(np.fromfile(data / f, dtype="<u2").max()) for f in files) < shards.n_vocab
    assert verify_data(shards, "first").hashed == []  # the record vouches for every shard
    assert verify_data(shards, "always").hashed == files and verify_data(shards, "never").hashed == []

    altered = data / files[1]
    original = altered.read_bytes()
    _flip_a_bit(altered)
    with pytest.raises(DataError, match=rf"{files[1]}: sha256 .* differs from the manifest's .*altered shard.*"
                                        rf"rerun `python -m data_prep .*--out {data}`"):
        verify_data(shards)
    with pytest.raises(DataError, match="altered shard"):  # not recorded as good: found again
        verify_data(shards, "first")
    assert verify_data(shards, "never").hashed == []  # "never" does not look
    altered.write_bytes(original)
    assert verify_data(shards).hashed == [files[1]]  # only the shard whose mtime changed
    record = json.loads((data / RECORD_FILE).read_text())
    assert sorted(record["shards"]) == sorted(files)


def test_verify_data_hashes_a_recently_modified_shard_again(prepared, tmp_path):
    """A shard modified within the timestamp granularity after it was hashed can keep its mtime: a record
    entry made within RACY_NS of the shard's mtime does not vouch for it."""
    data = _copy(prepared, tmp_path / "data")  # fresh files: modified just now
    shards = TokenShards(data)
    files = _shard_files(data)
    assert verify_data(shards).hashed == files
    _flip_a_bit(data / files[0], keep_mtime=True)  # same size, same mtime
    with pytest.raises(DataError, match=f"{files[0]}: sha256"):
        verify_data(shards)


def test_verify_data_without_a_writable_directory_verifies_every_time(prepared, tmp_path):
    data = _copy(prepared, tmp_path / "data")
    _age(data)
    if os.geteuid() == 0:  # root writes through file modes: make the record's name unusable instead
        (data / RECORD_FILE).mkdir()
    else:
        data.chmod(0o555)
    try:
        shards = TokenShards(data)
        for _ in range(2):
            check = verify_data(shards)
            assert check.hashed == _shard_files(data) and check.record is None and RECORD_FILE in check.record_error
    finally:
        data.chmod(0o755)
    assert [p.name for p in data.iterdir() if p.name.endswith(".tmp")] == []


def test_max_token_id_of_data_whose_manifest_lacks_it(synthetic):
    """Manifests written before the largest token id was recorded still work: it is computed."""
    assert all(s.max_token_id is None for split in Manifest.load(synthetic).splits.values() for s in split.shards)
    expected = sum(sum(sizes) for sizes in SHARD_SIZES.values()) - 1  # tokens are positions
    shards = TokenShards(synthetic)
    assert verify_data(shards, "never").max_token_id == expected
    assert verify_data(shards, "always").max_token_id == expected


def test_manifest_whose_vocabulary_is_too_small_for_its_data_is_refused(prepared, tmp_path):
    data = _copy(prepared, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["n_vocab"] = 200  # the data holds ids up to ~300
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"the data holds token id \d+ \(in .*\.bin\) but the manifest's tokenizer "
                                        r"bpe:300 has n_vocab 200"):
        verify_data(TokenShards(data), "never")
