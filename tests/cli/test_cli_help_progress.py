"""Paper cuts of a first day: every option of every command says what it does and
its default; progress in a log is plain lines; the demo cache is named; napari's Qt is not
forced on an existing napari."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from plate_concepts.cli import build_parser, main

OWN_COMMANDS = ("info", "convert", "view", "demo", "demo-run")
ALL_COMMANDS = ("info", "convert", "view", "embed", "import-profiles", "fit", "evaluate", "compare",
                "encode", "profiles", "report", "names", "demo", "demo-run")
PROJECT = Path(__file__).resolve().parents[2]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_every_option_has_help_and_shows_its_default(command):
    parser = subcommands()[command]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, f"{command} {action.dest} has no help"
        # By identity: a default of 0 equals False but is shown.
        shown_default = not (action.default is None or action.default is False
                             or action.default == argparse.SUPPRESS)
        if shown_default and action.option_strings:
            value = action.default  # a list is given (and shown) comma-separated
            value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            said = re.escape(value)  # "(default: X)", or the help's own words
            assert re.search(rf"default:?\s+{said}", " ".join(text.split())) or (
                "default" in action.help and re.search(rf"\b{said}\b", action.help)
            ), f"{command} {action.option_strings[0]}: default {action.default} not shown"


def test_defaults_are_shown_once():
    text = " ".join(subcommands()["convert"].format_help().split())
    assert text.count("(default: 0.5)") == 1


def test_progress_in_a_log_is_plain_lines(tmp_path, capsys):
    nf1 = PROJECT.parent / "shared" / "data" / "real" / "nf1_plate2"
    assert main(["convert", str(nf1), str(tmp_path / "out.zarr")]) == 0
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith("converting") for line in lines)
    assert "5/5" in lines[-1] and "100%" in lines[-1]


def test_progress_bar_writes_a_line_at_most_every_few_seconds(capsys, monkeypatch):
    from plate_concepts.cli import _common

    monkeypatch.setattr(_common, "LOG_LINE_EVERY_S", 3600.0)
    with _common.progress_bar(1000, "steps", "step") as bar:
        for done in range(1, 1001):
            bar(done)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "1000/1000" in lines[-1]  # the first update and the last


def test_demo_run_names_the_cached_demo_plate(monkeypatch, tmp_path, capsys):
    from plate_concepts import demo_pipeline

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("PLATE_CONCEPTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_pipeline, "run_demo_pipeline", stop)
    assert main(["demo-run", str(tmp_path / "work"), "--no-viewer"]) == 130
    out = capsys.readouterr().out
    assert f"demo plate: {tmp_path / 'cache' / 'demo-v1-96w-2f-512px-seed0'}" in out


def test_napari_qt_backend_is_not_forced():
    import tomllib

    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    required = " ".join(project["dependencies"]).lower()
    assert "napari" in required
    assert not re.search(r"pyqt|pyside|napari\[", required)  # an existing napari keeps its Qt
    assert any("napari[" in extra for extra in project["optional-dependencies"]["qt"])


def test_the_command_list_and_light_commands_do_not_wait_for_torch():
    """`plate-concepts --help` took 5 s importing torch for the fit options; now only fit and
    compare, when parsed, build them (and still show every setting)."""
    import subprocess
    import sys

    code = ("import sys; from plate_concepts.cli import build_parser; p = build_parser(); "
            "p.format_help(); p.parse_args(['info', 'PLATE']); print('torch' in sys.modules)")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False", run.stderr
    fit_help = " ".join(subcommands()["fit"].format_help().split())
    assert "--features" in fit_help and "--k K" in fit_help and "--overwrite" in fit_help
    assert "--sparsity" in subcommands()["compare"].format_help()
