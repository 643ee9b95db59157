"""Writes under faults: a writer SIGKILLed mid-write, two processes writing the
same cache, a full disk. Every cache and export goes through analysis.atomic,
so each file is the old complete one, the new complete one, or absent; the
next start recomputes what is missing and never reads a torn file.

Children are tests/fault_child.py processes; the kill points are seeded.
"""
from __future__ import annotations

import errno
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fault_child
from analysis.errors import StorageError
from analysis.spectra import SpectralCache
from analysis.statistics import StatisticsCache

CHILD = Path(fault_child.__file__)
ROOT = CHILD.parents[1]
SEEDS = range(3)
WRITE_WINDOW_S = fault_child.CHUNKS * fault_child.PAUSE_S   # one slow safetensors write lasts at least this


class Child:
    """A fault_child process whose stdout lines are read as they come."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, str(CHILD), *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            if line.startswith(prefix):
                return line
        self.proc.kill()
        raise AssertionError(f"the child never printed {prefix!r}: {self.proc.stderr.read()[-2000:]}")

    def finish(self, timeout: float = 120.0) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        return rc, self.proc.stderr.read()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def _kill_mid_write(kind: str, folder: Path, seed: int, content_seed: int = 0) -> float:
    """Start a slow-writing child, SIGKILL it a seeded moment after its first write began."""
    delay = random.Random(seed).uniform(0.0, 1.3 * WRITE_WINDOW_S)   # about 1 in 4 lands after that write
    child = Child(kind, "--dir", str(folder), "--seed", str(content_seed), "--slow")
    child.wait_for("WRITING")
    time.sleep(delay)
    child.kill()
    return delay


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


def _complete_safetensors(path: Path) -> dict | None:
    """The file's tensors if it is complete (safetensors refuses a file its header does not cover), else None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {"meta": f.metadata() or {}, **{k: f.get_tensor(k) for k in f.keys()}}
    except Exception:
        return None


# ---------------------------------------------------------------- killed writes
@pytest.mark.slow
def test_killed_spectral_cache_write_leaves_the_old_file_or_a_complete_one(tmp_path):
    tvs = fault_child.spectra_set(0)
    reference = SpectralCache(tvs, device="cpu", persist=False).compute()
    outcomes = []
    for seed in SEEDS:
        folder = tmp_path / f"seed{seed}"
        path = SpectralCache(tvs, device="cpu", cache_dir=folder).path
        folder.mkdir()
        save_file({"S::old": torch.ones(3)}, str(path), metadata={"format": "0", "tasks": "a,b,c"})  # stale format
        old = path.read_bytes()
        delay = _kill_mid_write("spectra", folder, seed)
        mid_write = bool(_temps(folder))
        now = path.read_bytes() if path.exists() else None
        new_complete = now is not None and now != old and _complete_safetensors(path) is not None
        assert now == old or new_complete, f"seed {seed}: {path} is neither the old file nor a complete new one"
        if mid_write:                               # the temporary file was never renamed: the old file stands
            assert now == old
        # the next start: loads a complete new file, recomputes over the stale one, never raises
        cache = SpectralCache(tvs, device="cpu", cache_dir=folder).compute()
        assert cache.compute_count == (0 if new_complete else len(cache.names))
        for name in cache.names:
            torch.testing.assert_close(cache.singular_values(name), reference.singular_values(name))
        assert cache.flush() and _complete_safetensors(path)["meta"]["format"] == "1"
        outcomes.append((seed, round(delay, 3), "mid-write" if mid_write else ("new" if new_complete else "old")))
    print(f"spectra kills (seed, s after the write began, what the kill hit): {outcomes}")
    assert any(o[2] == "mid-write" for o in outcomes), outcomes


@pytest.mark.slow
def test_killed_statistics_write_leaves_complete_files_or_none(tmp_path):
    tvs, evaluator = fault_child.statistics_inputs()
    reference = StatisticsCache(tvs, evaluator, "cpu", persist=False).fisher_diagonals(n=fault_child.STAT_N)
    outcomes = []
    for seed in SEEDS:
        folder = tmp_path / f"seed{seed}"
        _kill_mid_write("statistics", folder, seed)
        mid_write = bool(_temps(folder))
        files = sorted(folder.glob("fisher-*.safetensors"))
        complete = [p for p in files if _complete_safetensors(p) is not None]
        assert complete == files, f"seed {seed}: a torn statistics file at its final path"
        cache = StatisticsCache(tvs, evaluator, "cpu", cache_dir=folder)
        stats = cache.fisher_diagonals(n=fault_child.STAT_N)
        assert cache.compute_count == len(tvs.tasks) - len(complete)   # only the missing ones recomputed
        for task in tvs.tasks:
            for name, value in reference[task].items():
                torch.testing.assert_close(stats[task][name], value)
        outcomes.append((seed, len(complete), "mid-write" if mid_write else "between writes"))
    print(f"statistics kills (seed, complete files of 3, what the kill hit): {outcomes}")
    assert any(o[2] == "mid-write" for o in outcomes), outcomes


def _files(folder: Path) -> dict[str, bytes] | None:
    if not folder.is_dir():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_export_leaves_the_old_folder_or_the_new_one(tmp_path):
    """An export is a folder written whole (analysis.atomic.atomic_folder): after a kill it is the
    earlier export or the complete new one, never a mix; the killed writer's temporary folder sits
    beside it under a name no reader opens."""
    new_dir = tmp_path / "reference"
    fault_child.write_export(new_dir, 0)
    new = _files(new_dir)
    outcomes = []
    for seed in SEEDS:
        out = tmp_path / f"seed{seed}" / "merged"
        fault_child.write_export(out, 100 + seed)            # an earlier export in the same folder
        old = _files(out)
        _kill_mid_write("export", out, seed, content_seed=0)
        mid_write = any(not p.name.endswith(".old.tmp") for p in _temps(out.parent))
        now = _files(out)
        if now is None:   # killed between the two renames: the earlier export is whole under its aside name
            aside = [p for p in _temps(out.parent) if p.name.endswith(".old.tmp")]
            assert len(aside) == 1 and _files(aside[0]) == old, f"seed {seed}: the earlier export was lost"
        else:
            assert now in (old, new), f"seed {seed}: {out} is neither the earlier export nor the new one"
        if mid_write:
            assert now == old
        outcomes.append((seed, "absent" if now is None else "old" if now == old else "new",
                         "mid-write" if mid_write else "after the writes"))
        fault_child.write_export(out, 0)                     # the next export succeeds beside the leftover
        assert _files(out) == new
    print(f"export kills (seed, folder afterwards, what the kill hit): {outcomes}")
    assert any(o[2] == "mid-write" for o in outcomes), outcomes


@pytest.mark.parametrize("seed", SEEDS)
def test_a_truncated_cache_file_is_recomputed_never_read(tmp_path, seed):
    """A torn file at the final path (cut by something other than our writer) is refused on read."""
    tvs = fault_child.spectra_set(0)
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path).compute()
    cache.flush()
    data = cache.path.read_bytes()
    cache.path.write_bytes(data[:random.Random(seed).randrange(1, len(data))])
    again = SpectralCache(tvs, device="cpu", cache_dir=tmp_path).compute()
    assert again.compute_count == len(again.names)
    assert again.flush() and _complete_safetensors(cache.path) is not None   # rewritten whole


# ---------------------------------------------------------------- two processes at once
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["spectra", "statistics"])
def test_two_processes_computing_the_same_cache_end_with_one_valid_file(tmp_path, kind):
    folder, go = tmp_path / "cache", tmp_path / "go"
    children = [Child(kind, "--dir", str(folder), "--slow", "--go", str(go)) for _ in range(2)]
    for c in children:
        c.wait_for("READY")
    go.touch()                                              # both start computing now; their slow writes overlap
    results = [c.finish() for c in children]
    assert all(rc == 0 for rc, _ in results), [err[-2000:] for _, err in results]
    assert not _temps(folder)
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == (1 if kind == "spectra" else 3)
    assert all(_complete_safetensors(p) is not None for p in files)
    if kind == "spectra":
        assert SpectralCache(fault_child.spectra_set(0), device="cpu", cache_dir=folder).compute().compute_count == 0
    else:
        tvs, evaluator = fault_child.statistics_inputs()
        cache = StatisticsCache(tvs, evaluator, "cpu", cache_dir=folder)
        cache.fisher_diagonals(n=fault_child.STAT_N)
        assert cache.compute_count == 0


# ---------------------------------------------------------------- disk full
@pytest.fixture
def full_disk(monkeypatch):
    """safetensors' writer fails with ENOSPC after writing half of a file (what a full disk does)."""
    import analysis.atomic
    from safetensors.torch import save

    def half_then_enospc(tensors, filename, metadata=None):
        data = save(tensors, metadata)
        with open(filename, "wb") as fh:
            fh.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(analysis.atomic, "save_file", half_then_enospc)


def test_disk_full_spectral_cache_names_the_file_and_leaves_nothing(tmp_path, full_disk, monkeypatch):
    tvs = fault_child.spectra_set(0)
    cache = SpectralCache(tvs, device="cpu", cache_dir=tmp_path).compute()
    with pytest.raises(StorageError, match="no space left on device") as err:
        cache.flush()
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(cache.path)
    assert str(cache.path) in str(err.value)
    assert not cache.path.exists() and not _temps(tmp_path)
    assert cache.singular_values(cache.names[0]).shape == (3, 64)   # the factors are still served from memory
    monkeypatch.undo()                                               # space again: the next start writes it
    assert SpectralCache(tvs, device="cpu", cache_dir=tmp_path).compute().flush() and cache.path.is_file()


def test_disk_full_statistics_keep_results_and_name_each_file(tmp_path, full_disk):
    tvs, evaluator = fault_child.statistics_inputs()
    cache = StatisticsCache(tvs, evaluator, "cpu", cache_dir=tmp_path)
    stats = cache.fisher_diagonals(n=fault_child.STAT_N)
    assert set(stats) == set(tvs.tasks)
    assert len(cache.write_errors) == len(tvs.tasks)
    assert all(e.errno == errno.ENOSPC and Path(e.filename).parent == tmp_path for e in cache.write_errors)
    assert not list(tmp_path.iterdir())


def test_disk_full_export_raises_and_keeps_the_old_file(tmp_path, full_disk, monkeypatch):
    out = tmp_path / "merged"
    monkeypatch.undo()
    fault_child.write_export(out, 1)
    old = (out / "model.safetensors").read_bytes()
    import analysis.atomic
    from safetensors.torch import save

    def enospc(tensors, filename, metadata=None):
        Path(filename).write_bytes(save(tensors, metadata)[:1000])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(analysis.atomic, "save_file", enospc)
    with pytest.raises(StorageError, match=f"{out}: model-00001.safetensors: no space left on device"):
        fault_child.write_export(out, 2)
    assert (out / "model.safetensors").read_bytes() == old and not _temps(out) and not _temps(tmp_path)


def test_a_real_write_limit_gives_a_named_error_and_no_partial_file(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG): no patching anywhere."""
    out = tmp_path / "merged"
    rc, err = Child("export", "--dir", str(out), "--fsize", "200000").finish()   # model.safetensors is ~1 MB
    assert rc != 0 and "StorageError" in err and "model-00001.safetensors: File too large" in err, err[-2000:]
    assert not out.exists() and not _temps(tmp_path)   # the folder appears whole or not at all


def test_a_real_full_tmpfs_gives_enospc_and_no_partial_file(tmp_path):
    """A 256 KiB tmpfs, when this process may mount one (root); else skipped."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        cache = SpectralCache(fault_child.spectra_set(0), device="cpu", cache_dir=mnt).compute()
        with pytest.raises(StorageError, match="no space left on device") as err:
            cache.flush()
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(cache.path)
        assert not list(mnt.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
