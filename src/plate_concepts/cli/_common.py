"""What several commands share: help text with defaults, progress bars for terminals and logs,
a display for napari, and the napari hand-over of ``view`` and ``demo-run``."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm


def print_json(value: Any, indent: int = 2) -> None:
    """Print ``value`` as strict JSON: a NaN or infinite number (an undefined mAP, an FVU of
    tokens that do not vary) is ``null``, which every JSON reader accepts (``NaN`` is not JSON)."""

    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(v) for v in item]
        return item

    print(json.dumps(finite(value), indent=indent, allow_nan=False))


class CommandError(Exception):
    """An expected failure of a command, said in one line (``plate-concepts CMD: error: ...``)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to each option's help, except where there is nothing to say (no
    default, a flag that is off) or the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            _says_nothing(action.default)
            or "default" in text
            or not action.option_strings
        ):
            return text
        return super()._get_help_string(action)


def _says_nothing(default: Any) -> bool:
    """No default, or a flag that is off: by identity, since a default of 0 equals False."""
    return default is None or default is False or default == argparse.SUPPRESS


class CommandParser(argparse.ArgumentParser):
    """A command's parser whose options may be added only when that command is parsed or its
    help shown (:meth:`defer`): the dictionary settings' options import torch, which
    ``plate-concepts --help`` and the other commands need not wait for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def defer(self, add_options: Callable[[argparse.ArgumentParser], None]) -> None:
        self._deferred.append(add_options)

    def complete(self) -> CommandParser:
        """Add the deferred options now."""
        while self._deferred:
            self._deferred.pop(0)(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.complete()
        return super().format_help()


class CommandProgress(tqdm):
    """A progress bar for one step of a command (see :func:`progress_bar`); also a
    ``progress(done, total)`` callback for the library's long functions."""

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None and total != self.total:
            self.total = total
        self.update(done - self.n)  # update, not refresh: the bar's rate limit applies


class _LogLines:
    """A file for tqdm that turns each redraw into one plain line (no carriage returns or
    cursor movements), for logs."""

    _CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\r\x08]")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = self._CONTROL.sub("", text).strip()
        if line and line != self.last:  # closing redraws the last state: once is enough
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


TERMINAL_REDRAW_S = 0.5
LOG_LINE_EVERY_S = 5.0


def progress_bar(
    total: int | None = None, desc: str = "", unit: str = "it", quiet: bool = False
) -> CommandProgress:
    """The progress bar of every command: a tqdm bar on stderr that redraws at each update at
    most every 0.5 s on a terminal; when stderr is not a terminal (a log file, a pipe) it writes
    a plain line at most every 5 s and one at the end, with no control characters.

    Advance it with ``bar(done, total)`` (or ``bar.update(n)``); pass ``quiet=True`` for no
    output. Use it as a context manager so the last line is written.
    """
    stream = sys.stderr
    is_terminal = hasattr(stream, "isatty") and stream.isatty()
    return CommandProgress(
        total=total,
        desc=desc,
        unit=unit,
        disable=quiet,
        file=stream if is_terminal else _LogLines(stream),
        mininterval=TERMINAL_REDRAW_S if is_terminal else LOG_LINE_EVERY_S,
        miniters=1,  # no skipped redraws after a fast start (tqdm's dynamic miniters)
        dynamic_ncols=is_terminal,
        ncols=None if is_terminal else 100,
        ascii=not is_terminal,
        leave=True,
    )


def ensure_display(args: argparse.Namespace) -> None:
    """napari needs a display: without one (Linux, no ``$DISPLAY`` or ``$WAYLAND_DISPLAY``), run
    this command again under a virtual one (``xvfb-run``) when it only saves a screenshot and
    was started from the shell; otherwise say what to do. Returns only when a display is
    there."""
    if sys.platform != "linux" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    if getattr(args, "screenshot", None) and args.rerunnable and shutil.which("xvfb-run"):
        command = [sys.executable, "-m", "plate_concepts.cli", *sys.argv[1:]]
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp("xvfb-run", ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", *command])
    raise CommandError(
        "napari needs a display and there is none (no $DISPLAY): run this on a desktop, or "
        "with --screenshot PNG under a virtual display (install xvfb: it is then used "
        "automatically; or run scripts/with-display.sh plate-concepts ...)"
    )


def run_or_screenshot(viewer, screenshot: str | None) -> int:
    """Hand the viewer to the user, or (headless runs) save a screenshot of it and close it."""
    import napari

    if not screenshot:
        napari.run()
        return 0
    from qtpy.QtWidgets import QApplication

    for _ in range(20):  # let the canvas take its final size and workers draw their layers
        QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()
    Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(screenshot, canvas_only=False, flash=False)
    print(f"saved a screenshot of the viewer to {screenshot}")
    viewer.close()
    return 0
