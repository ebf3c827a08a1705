"""Every expected failure of the command line is one line ``plate-concepts CMD: error: ...``
naming what is wrong, with a non-zero exit; ``--debug`` shows the traceback. Damaged OME-Zarr
plates name the damaged file; ``info --check`` lists missing chunks."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from conftest import REAL_DATA as REAL

from plate_concepts.cli import main
from plate_concepts.plates.omezarr import write_ome_zarr_plate

NF1 = REAL / "nf1_plate2"


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"plate-concepts {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def nf1_zarr(tmp_path_factory) -> Path:
    from plate_concepts.plates import open_plate

    return write_ome_zarr_plate(open_plate(NF1 / "images"), tmp_path_factory.mktemp("z") / "nf1.zarr")


@pytest.fixture
def damaged(nf1_zarr, tmp_path) -> Path:
    """A copy of the NF1 plate to damage."""
    import shutil

    return Path(shutil.copytree(nf1_zarr, tmp_path / "nf1.zarr"))


def chunk_files(plate: Path, well_path: str) -> list[Path]:
    return sorted(p for p in (plate / well_path / "0" / "s0" / "c").rglob("*") if p.is_file())


def test_a_truncated_chunk_is_named(damaged, tmp_path, capsys):
    chunk = chunk_files(damaged, "D/6")[1]
    chunk.write_bytes(chunk.read_bytes()[:40])
    assert main(["convert", str(damaged), str(tmp_path / "copy.zarr"), "--quiet"]) == 2
    line = one_error_line(capsys, "convert")
    assert str(chunk) in line and "damaged or incomplete" in line
    assert not (tmp_path / "copy.zarr").exists()  # the failed conversion left nothing


def test_a_damaged_root_metadata_file_is_named(damaged, capsys):
    (damaged / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')
    assert main(["info", str(damaged)]) == 2
    line = one_error_line(capsys, "info")
    assert str(damaged / "zarr.json") in line and "not valid JSON" in line
    assert "preset" not in line


def test_a_damaged_well_metadata_file_is_named(damaged, capsys):
    (damaged / "D" / "6" / "zarr.json").write_bytes(b"\x00\x01garbage")
    assert main(["info", str(damaged)]) == 2
    line = one_error_line(capsys, "info")
    assert "well D06" in line and str(damaged / "D" / "6" / "zarr.json") in line


def test_info_check_reports_missing_chunks(damaged, capsys):
    assert main(["info", str(damaged), "--check"]) == 0
    assert "all 90 full-resolution chunk files are there" in capsys.readouterr().out
    lost = chunk_files(damaged, "F/7")[:2]
    for chunk in lost:
        chunk.unlink()
    assert main(["info", str(damaged), "--check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["missing_chunks"]
    assert report["files"] == [str(p) for p in lost] and report["fields"] == ["F07 field 0"]
    assert main(["info", str(damaged), "--check", "--strict"]) == 1
    out = capsys.readouterr().out
    assert "2 of 90 full-resolution chunk files are missing (in 1 field(s): F07 field 0)" in out


def test_output_paths_of_the_wrong_kind(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert main(["convert", str(NF1 / "images"), str(a_file), "--quiet"]) == 2
    assert "is a file; the output (an OME-Zarr plate) is a folder" in one_error_line(capsys, "convert")
    assert main(["demo", str(a_file), "--wells", "6", "--quiet"]) == 2
    assert "is a file" in one_error_line(capsys, "demo")
    assert main(["demo-run", str(a_file), "--no-viewer"]) == 2  # said before any work
    assert f"{a_file} is a file; demo-run's work folder is a folder" in one_error_line(capsys, "demo-run")
    # A work folder holding a user's own concept_report.json: refused before any work, kept.
    work = tmp_path / "work"
    work.mkdir()
    (work / "concept_report.json").write_text('{"my": "notes"}')
    assert main(["demo-run", str(work), "--no-viewer"]) == 2
    assert "concept_report.json already exists and is not a concept report of this demo" in one_error_line(
        capsys, "demo-run")
    assert (work / "concept_report.json").read_text() == '{"my": "notes"}'
    assert sorted(p.name for p in work.iterdir()) == ["concept_report.json"]
    # A path under a file: said at once (before any work), for every kind of output.
    for command in (["convert", str(NF1 / "images"), str(a_file / "x.zarr")],
                    ["report", str(tmp_path), str(tmp_path / "d.safetensors"), str(a_file / "r.html")]):
        assert main([*command, "--quiet"]) == 2
        assert f"cannot write {a_file}/" in (line := one_error_line(capsys, command[0]))
        assert f"{a_file} is a file, not a folder" in line
    # A folder where a file goes: the line suggests a file name of the right kind.
    assert main(["report", str(tmp_path), str(tmp_path / "d.safetensors"), str(tmp_path), "--quiet"]) == 2
    assert f"is a folder; the output (an HTML report) is a file: give a file path such as {tmp_path / 'report.html'}" in (
        one_error_line(capsys, "report"))


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("module:no_such_package_xyz.models:build", "no_such_package_xyz"),
        ("module:json:no_such_callable", "no_such_callable"),
        ("module:json:dumps", "dumps"),  # callable, but not a model: a TypeError somewhere
    ],
)
def test_a_bad_model_is_one_line(tmp_path, capsys, model, expected):
    code = main(["embed", str(NF1 / "images"), str(tmp_path / "store"), "--model", model, "--quiet"])
    assert code != 0
    assert expected in one_error_line(capsys, "embed")


def test_disk_full_and_permission_denied_are_one_line(tmp_path, capsys, monkeypatch):
    from plate_concepts.plates import omezarr_write

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.zarr"))

    monkeypatch.setattr(omezarr_write, "write_plate_metadata", full)
    assert main(["convert", str(NF1 / "images"), str(tmp_path / "out.zarr"), "--quiet"]) == 2
    line = one_error_line(capsys, "convert")
    assert "No space left on device" in line and "out.zarr" in line and "disk is full" in line

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out.zarr"))

    monkeypatch.setattr(omezarr_write, "write_plate_metadata", denied)
    assert main(["convert", str(NF1 / "images"), str(tmp_path / "out.zarr"), "--quiet"]) == 2
    assert "Permission denied" in one_error_line(capsys, "convert")
    assert not list(tmp_path.iterdir())  # the temporary folders went away


def test_a_bug_is_one_line_and_debug_shows_its_traceback(monkeypatch, capsys):
    from plate_concepts.cli import plates

    def broken(_plate):
        return None.shape  # an AttributeError: a bug, not bad input

    monkeypatch.setattr(plates, "plate_summary", broken)
    assert main(["info", str(NF1 / "images")]) == 1
    assert "--debug" in one_error_line(capsys, "info")
    with pytest.raises(AttributeError):
        main(["info", str(NF1 / "images"), "--debug"])
    with pytest.raises(AttributeError):
        main(["--debug", "info", str(NF1 / "images")])


def test_a_bare_key_error_is_a_bug_not_bad_input(monkeypatch, capsys):
    from plate_concepts.cli import plates

    def unguarded(_plate):
        return {}["n_wells"]

    monkeypatch.setattr(plates, "plate_summary", unguarded)
    assert main(["info", str(NF1 / "images")]) == 1
    line = one_error_line(capsys, "info")
    assert "KeyError: 'n_wells'" in line and "--debug" in line


def test_view_a_feature_the_dictionary_lacks_is_one_line_before_any_work(tmp_path, capsys):
    import numpy as np

    from plate_concepts.dictionary import ICFL

    tokens = np.random.default_rng(0).normal(size=(64, 4))
    ICFL(n_features=8, n_rounds=1, per_round=2, steps=1, batch_size=32, device="cpu").fit(
        tokens, is_control=np.ones(64, bool)).save(tmp_path / "d.safetensors")
    for feature in ("8", "-1"):
        assert main(["view", str(tmp_path / "d.safetensors"), "--feature", feature]) == 2
        assert f"--feature {feature} is not a feature of {tmp_path / 'd.safetensors'} (it has 8: 0..7)" in (
            one_error_line(capsys, "view"))


@pytest.mark.parametrize("argv", [
    ["info", "s3://bucket/screen.store"],
    ["encode", "/data/screen.store", "gs://bucket/dict.safetensors", "/data/screen.pass"],
    ["embed", "https://example.org/plate.zarr", "out.store", "--quiet"],
])
def test_a_url_for_a_path_is_one_line_saying_why(argv, capsys):
    assert main(argv) == 2
    line = one_error_line(capsys, argv[0])
    url = next(a for a in argv if "://" in a)
    assert f"error: {url} is a URL" in line and "mount it" in line


def test_a_scheduler_address_is_not_taken_for_a_path(tmp_path, capsys):
    assert main(["encode", str(tmp_path / "none.store"), str(tmp_path / "d.safetensors"),
                 str(tmp_path / "p.pass"), "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "none.store does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("options", "expected"), [
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--per-round", "0"], "argument --per-round: must be >= 1, got 0"),
    (["--method", "topk", "--k", "0"], "argument --k: must be >= 1, got 0"),
    (["--shrinkage", "2"], "argument --shrinkage: must be none, auto"),
])
def test_a_bad_setting_names_its_option_before_any_work(options, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", str(tmp_path / "no.store"), str(tmp_path / "d.safetensors"), *options])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "batch_size" not in err and "per_round" not in err
