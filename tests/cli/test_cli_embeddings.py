"""The embedding-store commands on several plates: embed (lists, --append, --replace-plate,
--overwrite), import-profiles of several tables, info of a store; every option has help."""

from __future__ import annotations

import argparse
import hashlib
import json
import re

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from plate_concepts.cli import build_parser, main
from plate_concepts.embeddings.store import EmbeddingStore
from plate_concepts.plates.model import Plate
from plate_concepts.plates.omezarr_write import write_ome_zarr_plate

# A fast, deterministic model: the crop itself, read as a 3 x 32 grid of 32-d patch tokens.
EMBED = ["--crop", "32", "--model", "module:torch.nn:Identity", "--device", "cpu", "--quiet"]  # fmt: skip


def write_plate(folder, name: str, seed: int):
    """A small OME-Zarr plate (wells B02, B03; 3 channels of 64 x 64) and its plate map."""
    rng = np.random.default_rng(seed)
    images = {
        (well, 0): [da.from_array(rng.integers(0, 4000, (3, 64, 64)).astype(np.uint16))]
        for well in ("B02", "B03")
    }
    plate = Plate(name=name, channels=["DNA", "ER", "Mito"], images=images, reader="test")
    path = write_ome_zarr_plate(plate, folder / f"{name}.ome.zarr")
    pd.DataFrame({"well": ["B02", "B03"], "treatment": ["DMSO", "drug"]}).to_csv(
        folder / "map.csv", index=False
    )
    return path


def digest(folder) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def info_json(path, capsys) -> dict:
    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_embed_several_plates_append_replace_and_describe(tmp_path, capsys):
    first, second, third = (
        write_plate(tmp_path, name, seed) for seed, name in enumerate(("P1", "P2", "P3"))
    )
    listing = tmp_path / "plates.txt"
    listing.write_text(
        f"# the screen\n{first.name}\n\n{second}\n"
    )  # relative to the list, and absolute
    store = tmp_path / "screen"
    mapped = ["--platemap", str(tmp_path / "map.csv"), "--control", "treatment=DMSO"]
    assert main(["embed", f"@{listing}", str(store), *mapped, *EMBED]) == 0
    assert "P1: 8 tokens" in capsys.readouterr().out

    info = info_json(store, capsys)
    assert info["n_tokens"] == 16 and info["dim"] == 32 and info["plates"] == ["P1", "P2"]
    assert info["wells_per_plate"] == {"P1": 2, "P2": 2} and info["controls_per_plate"] == {
        "P1": 4,
        "P2": 4,
    }
    assert info["labels"]["treatment"]["values"] == {"DMSO": 8, "drug": 8} and info["complete"]

    assert main(["embed", str(third), str(store), *mapped, *EMBED]) == 2
    assert "holds plate(s) ['P1', 'P2'], not ['P3']; pass --append" in capsys.readouterr().err
    assert (
        main(["embed", str(third), str(store), "--append", "--crop", "48", *mapped, *EMBED[2:]])
        == 2
    )
    assert "crop_size: store 32, now 48" in capsys.readouterr().err
    assert main(["embed", str(third), str(store), "--append", *mapped, *EMBED]) == 0
    before = EmbeddingStore.open(store).read_plate("P1")
    assert main(["embed", str(first), str(store), "--append", *mapped, *EMBED]) == 2
    assert "already holds plate(s) P1 (8 tokens); pass --replace-plate" in capsys.readouterr().err
    assert (
        main(["embed", str(first), str(store), "--append", "--replace-plate", *mapped, *EMBED]) == 0
    )
    replaced = EmbeddingStore.open(store)
    assert replaced.plates == ["P2", "P3", "P1"] and len(replaced) == 24
    np.testing.assert_allclose(replaced.read_plate("P1"), before, rtol=1e-5)

    capsys.readouterr()
    assert main(["info", str(store)]) == 0
    text = capsys.readouterr().out
    assert (
        "embedding store of 24 tokens, dimension 32" in text
        and "label treatment: DMSO (12), drug (12)" in text
    )
    assert re.search(r"P3\s+8\s+2\s+4", text)


def test_embed_overwrite_replaces_only_an_embedding_store(tmp_path, capsys):
    plate = write_plate(tmp_path, "P1", 0)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")
    before = digest(notes)
    assert main(["embed", str(plate), str(notes), "--overwrite", *EMBED]) == 2
    assert "is not an embedding store" in capsys.readouterr().err and digest(notes) == before
    assert main(["embed", str(plate), str(tmp_path / "s"), *EMBED]) == 0
    assert (
        main(["embed", str(plate), str(tmp_path / "s"), "--overwrite", "--crop", "48", *EMBED[2:]])
        == 0
    )
    assert set(EmbeddingStore.open(tmp_path / "s").obs["crop_size"]) == {48}
    assert main(["embed", str(plate), str(tmp_path / "s"), "--replace-plate", *EMBED]) == 2
    assert "--replace-plate goes with --append" in capsys.readouterr().err
    assert main(["embed", str(plate), str(tmp_path / "t"), "--model-input", "64", *EMBED]) == 2
    assert "--model-input go with --objects" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_import_profiles_of_several_tables_and_a_damaged_store(tmp_path, capsys):
    rng = np.random.default_rng(0)
    paths = []
    for plate, features in (("BR1", ["a", "b", "c"]), ("BR2", ["a", "b", "d"])):
        table = pd.DataFrame({"Metadata_Plate": plate, "Metadata_Well": ["A01", "A02", "B01", "B02"],
                              "Metadata_cell_line": ["X", "Y", "X", "Y"]})  # fmt: skip
        for name in features:
            table[name] = rng.standard_normal(4)
        table.loc[1, "a"] = np.nan
        paths.append(tmp_path / f"{plate}.csv")
        table.to_csv(paths[-1], index=False)
    store = tmp_path / "profiles"
    assert main(["import-profiles", *map(str, paths), str(store)]) == 2
    assert "'c' is missing from" in capsys.readouterr().err
    assert main(["import-profiles", *map(str, paths), str(store), "--features-join", "inner"]) == 2
    assert "feature 'a' in data row 2 (well A02) is empty (NaN)" in capsys.readouterr().err
    assert (
        main(
            [
                "import-profiles",
                *map(str, paths),
                str(store),
                "--features-join",
                "inner",
                "--drop-na",
                "rows",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        f"dropped 2 feature column(s) that some tables lack: c (missing from {paths[1]}), d (missing"
        in out
    )
    assert "dropped 2 row(s) holding NaN or inf (BR1.csv: 1, BR2.csv: 1)" in out
    info = info_json(store, capsys)
    assert (
        info["n_tokens"] == 6
        and info["dim"] == 2
        and info["wells_per_plate"] == {"BR1": 3, "BR2": 3}
    )
    assert info["controls_per_plate"] == {"BR1": None, "BR2": None}
    assert info["labels"]["cell_line"]["values"] == {"X": 4, "Y": 2}

    next((store / "tokens").rglob("c/0/0")).unlink()  # a copy that lost a chunk
    assert main(["info", str(store), "--check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing_chunks"] == {"tokens": [0]}
    assert main(["info", str(store), "--check", "--strict"]) == 1
    assert "MISSING: 1 chunk file(s) of tokens" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["embed", "import-profiles"])
def test_every_option_has_help_and_shows_its_default(command):
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = action.choices[command]
    text = " ".join(sub.format_help().split())
    for option in sub._actions:
        if isinstance(option, argparse._HelpAction) or option.dest == "debug":
            continue
        assert option.help and len(option.help) > 10, f"{command} {option.dest} has no help"
        if option.option_strings and option.default not in (None, False, argparse.SUPPRESS):
            assert re.search(rf"default:?\s+{re.escape(str(option.default))}", text), option.dest


def test_ctrl_c_during_embed_is_one_prefixed_line(tmp_path, capsys, monkeypatch):
    from conftest import REAL_DATA

    from plate_concepts.embeddings import embed as command
    from plate_concepts.embeddings.profiles import from_numpy

    def interrupted(plates, path, *args, cancel, **kwargs):  # Ctrl-C after 4 of the plate's tokens
        obs = pd.DataFrame({"plate": plates[0].name, "well": "B07", "field": 0, "crop_y": np.arange(4),
                            "crop_x": 0, "crop_size": 32})  # fmt: skip
        store = from_numpy(np.ones((4, 2)), obs, path)
        store.update_provenance(plates={plates[0].name: {"complete": False}}, pending_plates=[plates[0].name])
        cancel.set()
        return EmbeddingStore.open(path)

    monkeypatch.setattr(command, "embed_plates", interrupted)
    assert main(["embed", str(REAL_DATA / "nf1_plate2"), str(tmp_path / "s"), "--quiet"]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [("plate-concepts embed: interrupted: 4 tokens are stored; run the same command again "
                    "to finish (it resumes where it stopped)")]


def test_fit_and_evaluate_refuse_an_incomplete_store_unless_allowed(tmp_path, capsys):
    from plate_concepts.embeddings.profiles import from_numpy

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"plate": "P1", "well": ["B02", "B03"] * 32, "field": 0, "crop_y": np.arange(64),
                        "crop_x": 0, "crop_size": 32, "is_control": [True, False] * 32})  # fmt: skip
    store = from_numpy(rng.standard_normal((64, 8)), obs, tmp_path / "s")
    store.update_provenance(plates={"P1": {"complete": False}}, pending_plates=["P1", "P2"])
    fit = ["fit", str(tmp_path / "s"), str(tmp_path / "d.safetensors"), "--method", "topk", "--features", "4",
           "--k", "2", "--steps", "2", "--batch-size", "16", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(fit) == 2
    err = capsys.readouterr().err
    assert "is incomplete: the embedding of plate(s) P1 (64 tokens so far), P2 (not started)" in err
    assert "--allow-incomplete" in err and not (tmp_path / "d.safetensors").exists()
    assert main([*fit, "--allow-incomplete"]) == 0
    assert "warning: embedding store" in capsys.readouterr().err
    evaluate = ["evaluate", str(tmp_path / "s"), str(tmp_path / "d.safetensors")]
    assert main(evaluate) == 2 and "is incomplete" in capsys.readouterr().err
    # profiles and report too, and the option their message names exists.
    for reading in (["profiles", str(tmp_path / "s"), str(tmp_path / "d.safetensors"), "--label", "well"],
                    ["report", str(tmp_path / "s"), str(tmp_path / "d.safetensors"), str(tmp_path / "r.html")]):
        assert main([*reading, "--quiet"]) == 2
        assert "is incomplete" in capsys.readouterr().err and not (tmp_path / "r.html").exists()
        assert main([*reading, "--quiet", "--allow-incomplete"]) == 0
        assert "warning: embedding store" in capsys.readouterr().err
    assert (tmp_path / "r.html").is_file()
    assert main([*evaluate, "--allow-incomplete", "--json"]) == 0

    chunk = next((tmp_path / "s" / "tokens").rglob("c/0/0"))
    chunk.unlink()  # read as zeros before: FVU nan, exit 0
    assert main([*evaluate, "--allow-incomplete"]) == 2
    assert (
        f"the chunk file {chunk} holding committed tokens rows 0..63 is missing"
        in capsys.readouterr().err
    )
