"""FeatureStore: the in-memory and the spilled-to-disk paths return identical rows."""
from __future__ import annotations

import os

import pytest
import torch

from patchcore.io.feature_store import FeatureStore

DIM = 12
CHUNKS = [5, 1, 17, 3, 40, 9]  # rows per append: uneven on purpose


def _rows(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, DIM, generator=gen) for n in CHUNKS])


def _fill(store: FeatureStore, rows: torch.Tensor) -> None:
    start = 0
    for n in CHUNKS:
        store.append(rows[start:start + n])
        start += n


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


@pytest.mark.parametrize("budget_rows", [0, 6, 30])  # spill at the first append, or after some in-memory chunks
def test_in_memory_and_spilled_are_bitwise_identical(tmp_path, budget_rows):
    rows = _rows(0)
    rows[3, 2] = float("nan")
    rows[7, 0] = -0.0
    total = rows.shape[0]
    gen = torch.Generator().manual_seed(1)
    queries = [torch.randperm(total, generator=gen)[:25],  # random order
               torch.randint(0, total, (60,), generator=gen),  # with repeats
               torch.arange(total - 1, -1, -1),  # everything, reversed
               torch.tensor([0, total - 1]),
               torch.tensor([], dtype=torch.long)]
    with FeatureStore(DIM, max_memory_bytes=1 << 30) as memory, \
            FeatureStore(DIM, max_memory_bytes=budget_rows * DIM * 4, spill_dir=tmp_path) as spilled:
        _fill(memory, rows)
        _fill(spilled, rows)
        assert not memory.spilled and spilled.spilled
        assert memory.rows == spilled.rows == total
        for index in queries:
            a, b = memory.gather(index), spilled.gather(index)
            assert a.dtype == b.dtype == torch.float32
            assert a.shape == b.shape == (len(index), DIM)
            assert _bytes(a) == _bytes(b) == _bytes(rows[index])


def test_spill_file_lives_in_spill_dir_and_is_deleted_on_close(tmp_path):
    store = FeatureStore(DIM, max_memory_bytes=10 * DIM * 4, spill_dir=tmp_path)
    store.append(_rows(2)[:8])
    assert os.listdir(tmp_path) == []  # still under budget: nothing on disk
    store.append(_rows(2)[8:20])
    assert store.spilled and os.listdir(tmp_path) == []  # an unnamed file: nothing a SIGKILL could leave
    assert os.readlink(f"/proc/self/fd/{store._file.fileno()}").startswith(str(tmp_path))  # in spill_dir
    store.close()
    assert os.listdir(tmp_path) == []
    store.close()  # closing twice is harmless


def test_context_manager_deletes_the_file_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureStore(DIM, max_memory_bytes=0, spill_dir=tmp_path) as store:
            store.append(_rows(3))
            assert store.spilled
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_appends_after_spilling_keep_order(tmp_path):
    rows = _rows(4)
    with FeatureStore(DIM, max_memory_bytes=7 * DIM * 4, spill_dir=tmp_path) as store:
        _fill(store, rows)
        index = torch.arange(rows.shape[0])
        assert _bytes(store.gather(index)) == _bytes(rows)


def test_gather_between_appends(tmp_path):
    # Reading rows back must not disturb where the next append goes.
    rows = _rows(6)
    with FeatureStore(DIM, max_memory_bytes=0, spill_dir=tmp_path) as store:
        store.append(rows[:20])
        assert _bytes(store.gather(torch.tensor([19, 3]))) == _bytes(rows[[19, 3]])
        store.append(rows[20:])
        assert _bytes(store.gather(torch.arange(rows.shape[0]))) == _bytes(rows)


def test_other_dtypes_are_stored_as_float32(tmp_path):
    rows = _rows(5)[:10].double()
    with FeatureStore(DIM, max_memory_bytes=0, spill_dir=tmp_path) as store:
        store.append(rows)
        assert _bytes(store.gather(torch.arange(10))) == _bytes(rows.float())


def test_bad_shapes_and_indices(tmp_path):
    with FeatureStore(DIM, max_memory_bytes=1 << 20) as store:
        with pytest.raises(ValueError, match=f"\\(n, {DIM}\\)"):
            store.append(torch.zeros(3, DIM + 1))
        with pytest.raises(ValueError):
            store.append(torch.zeros(DIM))
        store.append(torch.zeros(4, DIM))
        for bad in ([4], [-1], [0, 10]):
            with pytest.raises(IndexError):
                store.gather(torch.tensor(bad))


def test_sigkill_during_a_spilled_fit_leaves_no_file(tmp_path):
    """Issue 16: SIGTERM or SIGKILL during a fit that spills features left a 128 MB file in TMPDIR each time."""
    import textwrap

    from child import sigkill_when_printed

    code = textwrap.dedent(f"""
        import sys, time, torch
        from patchcore.io.feature_store import FeatureStore
        store = FeatureStore(16, max_memory_bytes=0, spill_dir={str(tmp_path)!r})
        store.append(torch.ones(100, 16))
        print("spilled", flush=True)
        time.sleep(60)
    """)
    sigkill_when_printed(code, "spilled")
    assert os.listdir(tmp_path) == []


def test_named_spill_files_left_by_earlier_versions_are_removed_unless_in_use(tmp_path):
    from patchcore.io.feature_store import remove_stale_spill_files

    stale = tmp_path / "patchcore-features-abc123.f32"
    stale.write_bytes(b"0" * 1024)
    busy = tmp_path / "patchcore-features-busy.f32"
    busy.write_bytes(b"0" * 1024)
    other = tmp_path / "notes.f32"
    other.write_bytes(b"keep")
    with open(busy, "rb"):  # a running fit of an earlier version still holds this one
        with FeatureStore(DIM, max_memory_bytes=0, spill_dir=tmp_path) as store:
            store.append(_rows(5))
        assert not stale.exists() and busy.exists() and other.exists()
    assert remove_stale_spill_files(tmp_path) == [busy]
