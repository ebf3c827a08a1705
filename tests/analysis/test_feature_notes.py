"""Feature names beside a dictionary file: never an orphan file, never a lost edit (two programs
naming features at once), never a misread file (a bad entry is an error naming the file, and
nothing the writer would drop is accepted), and a warning when the dictionary was fitted again."""

from __future__ import annotations

import json
import threading
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from plate_concepts.analysis.feature_notes import FeatureNotes, notes_path
from plate_concepts.dictionary import ICFL
from plate_concepts.dictionary.io import read_dictionary_metadata

M = 8


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch.set_num_threads(1)
    x = np.random.default_rng(0).normal(size=(256, 6)).astype(np.float32)
    estimator = ICFL(n_features=M, n_rounds=1, per_round=2, steps=5, batch_size=64, device="cpu", seed=0)
    estimator.fit(x, is_control=np.ones(len(x), bool))
    return estimator.save(tmp_path_factory.mktemp("fit") / "d.safetensors")


@pytest.fixture
def dictionary(fitted, tmp_path):
    path = tmp_path / "d.safetensors"
    path.write_bytes(fitted.read_bytes())
    return path


def write_notes(dictionary, features, **extra):
    record = {"format": "plate-concepts-feature-notes", "version": 1, "features": features, **extra}
    notes_path(dictionary).write_text(json.dumps(record))


def test_a_missing_dictionary_is_an_error_not_an_orphan_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dictionary file .*typo\.safetensors does not exist"):
        FeatureNotes.load(tmp_path / "typo.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_edits_of_two_programs_are_both_kept(dictionary):
    viewer = FeatureNotes.load(dictionary)  # open for a long time
    terminal = FeatureNotes.load(dictionary)
    terminal.set(3, name="from the terminal")
    terminal.save()
    viewer.set(5, name="from the viewer")
    viewer.clear(6)  # a feature it never saw named: stays unnamed
    viewer.save()
    again = FeatureNotes.load(dictionary)
    assert again.name(3) == "from the terminal" and again.name(5) == "from the viewer"
    assert viewer.name(3) == "from the terminal"  # the viewer now shows it too
    # The same feature: the later save wins; clearing removes what the other wrote.
    terminal.set(5, name="renamed")
    terminal.save()
    viewer.clear(3)
    viewer.save()
    final = FeatureNotes.load(dictionary)
    assert final.name(5) == "renamed" and 3 not in final.named


def test_a_file_that_became_unreadable_is_not_overwritten(dictionary):
    notes = FeatureNotes.load(dictionary)
    notes.set(1, name="x")
    notes_path(dictionary).write_text('{"format": "plate-concepts-feature-notes", "version": 1, "feat')
    with pytest.raises(ValueError, match=r"d\.names\.json is not a readable feature-names file"):
        notes.save()
    assert notes_path(dictionary).read_text().endswith('"feat')


@pytest.mark.parametrize(("features", "extra", "message"), [
    ({"3": {"tags": "nucleus"}}, {}, r"entry '3': a feature's tags must be a list of text, got 'nucleus'"),
    ({"3": {"tags": None}}, {}, r"entry '3': a feature's tags must be a list"),
    ({"3": {"name": "a"}, "03": {"name": "b"}}, {}, r"entry '03': feature 3 has two entries"),
    ({"3": {"nmae": "typo"}}, {}, r"entry '3': unknown key\(s\) \['nmae'\]"),
    ({"3": {"name": "two\nlines"}}, {}, r"entry '3': a feature's name must be one line"),
    ({}, {"version": "1"}, r"\"version\" must be a whole number, got '1'"),
    ({}, {"version": True}, r"\"version\" must be a whole number, got True"),
])
def test_bad_entries_are_named_and_the_file_is_left_as_it_is(dictionary, features, extra, message):
    write_notes(dictionary, features, **extra)
    before = notes_path(dictionary).read_bytes()
    with pytest.raises(ValueError, match=rf"d\.names\.json is not a readable feature-names file.*{message}"):
        FeatureNotes.load(dictionary)
    assert notes_path(dictionary).read_bytes() == before


def test_names_and_tags_are_one_line_notes_may_be_more(dictionary):
    notes = FeatureNotes.load(dictionary)
    with pytest.raises(ValueError, match="name must be one line of printable text"):
        notes.set(1, name="enlarged\nnuclei")
    with pytest.raises(ValueError, match="tag must be one line"):
        notes.tag(1, "a\tb")
    notes.set(1, name=" 核の肥大 ✓ ", note="seen in\ntwo plates")
    notes.save()
    again = FeatureNotes.load(dictionary).get(1)
    assert again.name == "核の肥大 ✓" and again.note == "seen in\ntwo plates"


def test_names_of_an_earlier_fit_warn_until_saved_again(dictionary):
    notes = FeatureNotes.load(dictionary)
    notes.set(2, name="nuclei")
    notes.save()
    saved_at = read_dictionary_metadata(dictionary)["saved_at"]
    assert json.loads(notes_path(dictionary).read_text())["dictionary_saved_at"] == saved_at
    with _no_warning():
        FeatureNotes.load(dictionary)
    write_notes(dictionary, {"2": {"name": "nuclei"}}, n_features=M, dictionary_saved_at="2020-01-01T00:00:00+0000")
    with pytest.warns(UserWarning, match=r"d\.names\.json was written for another fit of d\.safetensors \(saved at 2020-01-01T00:00:00\+0000 \(now 20"):
        stale = FeatureNotes.load(dictionary)
    assert stale.name(2) == "nuclei"  # kept, never dropped
    write_notes(dictionary, {"2": {"name": "nuclei"}}, n_features=2 * M)
    with pytest.warns(UserWarning, match=rf"\(features {2 * M} \(now {M}\)\)"):
        FeatureNotes.load(dictionary)
    stale.set(4, name="checked")  # naming a feature of this fit records it
    stale.save()
    with _no_warning():
        assert FeatureNotes.load(dictionary).name(2) == "nuclei"


@contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_simultaneous_saves_keep_every_edit(dictionary):
    """Programs naming features at the same moment (threads here: each opens the lock apart)."""
    n = 8
    loaded = [FeatureNotes.load(dictionary) for _ in range(n)]
    start = threading.Barrier(n)

    def name(i: int) -> None:
        loaded[i].set(i, name=f"named by {i}")
        start.wait()
        loaded[i].save()

    for _ in range(3):
        threads = [threading.Thread(target=name, args=(i,)) for i in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert FeatureNotes.load(dictionary).named.keys() == set(range(n))
        notes_path(dictionary).unlink()
