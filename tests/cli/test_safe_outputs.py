"""Nothing a user owns is replaced: --overwrite replaces only an output of the same kind, never
its source; leftovers of killed runs are cleaned by the next run. Data-loss cases run the real
command line and compare checksums of everything that must survive."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from plate_concepts._io import _host_id, atomic_path, clean_leftovers, replaceable_output
from plate_concepts.cli import main
from plate_concepts.plates import open_plate


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's project: Phenix-named TIFF exports in images/ (2 wells, 2 channels) and notes."""
    rng = np.random.default_rng(0)
    images = tmp_path / "proj" / "images"
    images.mkdir(parents=True)
    for row, column in [(2, 3), (2, 4)]:
        for channel in (1, 2):
            name = f"r{row:02d}c{column:02d}f01p01-ch{channel}sk1fk1fl1.tiff"
            tifffile.imwrite(images / name, rng.integers(0, 4000, (64, 80), dtype=np.uint16))
    (tmp_path / "proj" / "notes.txt").write_text("my lab notes\n")
    return tmp_path / "proj"


@pytest.mark.parametrize("out", [".", "images", "images/.."])
def test_convert_overwrite_never_deletes_the_source_folder(project, out, capsys):
    before = checksums(project)
    assert main(["convert", str(project / "images"), str(project / out), "--overwrite", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("plate-concepts convert: error:") and error.count("\n") == 1
    assert "refusing to replace" in error or "is not an OME-Zarr plate" in error
    assert checksums(project) == before


def test_convert_overwrite_refuses_a_users_folder(project, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("- image plate 2\n")
    before = checksums(notes)
    assert main(["convert", str(project / "images"), str(notes), "--overwrite", "--quiet"]) == 2
    assert "is not an OME-Zarr plate; refusing to replace it" in capsys.readouterr().err
    assert checksums(notes) == before


def test_convert_overwrite_replaces_a_plate_but_never_its_own_source(project, tmp_path, capsys):
    out = tmp_path / "plate.zarr"
    assert main(["convert", str(project / "images"), str(out), "--quiet"]) == 0
    first = checksums(out)
    assert main(["convert", str(project / "images"), str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert checksums(out) == first
    assert main(["convert", str(project / "images"), str(out), "--ngff", "0.4", "--overwrite", "--quiet"]) == 0
    assert open_plate(out).reader == "ome-zarr-0.4"
    replaced = checksums(out)
    assert main(["convert", str(out), str(out), "--overwrite", "--quiet"]) == 2
    assert "it is the source" in capsys.readouterr().err
    assert checksums(out) == replaced


def test_demo_overwrite_replaces_only_a_demo_folder(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("keep me\n")
    before = checksums(notes)
    small = ["--wells", "6", "--fields", "1", "--field-size", "128", "--quiet"]
    assert main(["demo", str(notes), *small, "--overwrite"]) == 2
    assert "is not a demo plate folder" in capsys.readouterr().err
    assert checksums(notes) == before
    demo_dir = tmp_path / "demo"
    assert main(["demo", str(demo_dir), *small]) == 0
    assert main(["demo", str(demo_dir), *small, "--seed", "1", "--overwrite"]) == 0
    assert '"seed": 1' in (demo_dir / "plate_concepts_demo.json").read_text()


def test_replaceable_output_rules(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert replaceable_output(empty, "ome-zarr-plate", overwrite=True) == empty
    assert replaceable_output(tmp_path / "new.zarr", "ome-zarr-plate", overwrite=False)
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; the output .* is a folder"):
        replaceable_output(tmp_path / "file.zarr", "ome-zarr-plate", overwrite=True)
    with pytest.raises(FileExistsError, match="is a folder; the output .* is a file"):
        replaceable_output(empty, "dictionary", overwrite=True)
    with pytest.raises(FileExistsError, match="holds the source"):
        replaceable_output(tmp_path, "ome-zarr-plate", overwrite=True, sources=[empty])
    with pytest.raises(FileExistsError, match="lies inside the source"):
        replaceable_output(empty, "ome-zarr-plate", overwrite=True, sources=[tmp_path])


# ---------------------------------------------------------------------- leftovers of killed runs
def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_dead_runs_are_cleaned_and_others_left_alone(tmp_path):
    out = tmp_path / "out.zarr"
    host = _host_id()
    dead = tmp_path / f".out.zarr.partial-{host}-{dead_pid()}-0123abcd"
    running = tmp_path / f".out.zarr.partial-{host}-{os.getpid()}-0123abce"
    legacy = tmp_path / ".out.zarr.partial-0123abcf"
    lookalike = tmp_path / ".out.zarr.partial-mine"  # not our pattern: never touched
    other = tmp_path / f".other.zarr.partial-{host}-{dead_pid()}-0123abcd"
    for folder in (dead, running, legacy, lookalike, other):
        folder.mkdir()
        (folder / "chunk").write_bytes(b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with atomic_path(out) as tmp:
            tmp.mkdir()
    messages = [str(w.message) for w in caught]
    assert not dead.exists() and any(f"removed {dead}" in m for m in messages)
    assert running.exists() and legacy.exists() and lookalike.exists() and other.exists()
    assert any(str(legacy) in m and "earlier version" in m for m in messages)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["out.zarr"]


@pytest.mark.skipif(sys.platform != "linux", reason="tells a killed, unreaped process by /proc")
def test_the_leftover_of_a_killed_run_not_yet_reaped_is_cleaned(tmp_path):
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed.kill()
        deadline = time.monotonic() + 10  # killed, not waited for: a zombie
        while Path(f"/proc/{killed.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        leftover = tmp_path / f".out.zarr.partial-{_host_id()}-{killed.pid}-0123abcd"
        leftover.mkdir()
        with pytest.warns(UserWarning, match="removed"):
            clean_leftovers(tmp_path / "out.zarr")
        assert not leftover.exists()
    finally:
        killed.wait()


def test_a_folder_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    out = tmp_path / "out.zarr"
    old = tmp_path / f".out.zarr.old-{_host_id()}-{dead_pid()}-0123abcd"
    old.mkdir()
    (old / "previous").write_text("the finished plate")
    with pytest.warns(UserWarning, match="put back"):
        clean_leftovers(out)
    assert (out / "previous").read_text() == "the finished plate" and not old.exists()


def test_a_run_killed_mid_write_leaves_nothing_after_the_next_run(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", str(out), "--wells", "6", "--fields", "2", "--field-size", "128", "--quiet"]
    # A forked copy of this process is the run that gets killed (no interpreter start-up).
    child = multiprocessing.get_context("fork").Process(target=main, args=(argv,))
    child.start()
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".demo.partial-*")) and time.monotonic() < deadline:
        assert child.is_alive(), "the demo finished before it could be killed"
        time.sleep(0.02)
    time.sleep(0.3)  # mid-write
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert list(tmp_path.glob(".demo.partial-*")) and not out.exists()
    assert main(argv) == 0
    warning = capsys.readouterr().err
    assert "plate-concepts demo: warning: removed" in warning and ".demo.partial-" in warning
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert len(open_plate(out / "demo_plate.zarr").wells) == 6
