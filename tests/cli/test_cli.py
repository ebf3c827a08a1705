"""The command line on real plates: info, convert (both NGFF versions), errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REAL_DATA as REAL

from plate_concepts.cli import main
from plate_concepts.plates import open_plate

NF1 = REAL / "nf1_plate2"
PHENIX = REAL / "phenix_pediatric_BR00143976"


def test_info_json_on_the_nf1_plate(capsys):
    assert main(["info", str(NF1 / "images"), "--platemap", str(NF1 / "platemap_NF1_plate2.csv"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "tiff-nf1"
    assert info["n_wells"] == 5 and info["wells"] == ["B07", "D06", "D07", "F07", "H12"]
    assert info["fields_per_well"] == {w: 1 for w in info["wells"]}
    assert info["channels"] == ["DAPI", "GFP", "RFP"]
    assert info["image_shape"] == [904, 1224] and info["dtype"] == "uint16"
    assert "genotype" in info["labels"]


def test_info_text_on_the_phenix_field(capsys):
    assert main(["info", str(PHENIX / "images")]) == 0
    out = capsys.readouterr().out
    assert "C03" in out and "1080 x 1080 uint16" in out and "tiff-phenix" in out


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_convert_a_real_plate_round_trips(tmp_path, ngff, capsys):
    out = tmp_path / "nf1.zarr"
    args = ["convert", str(NF1 / "images"), str(out), "--platemap", str(NF1 / "platemap_NF1_plate2.csv"),
            "--ngff", ngff, "--quiet"]
    assert main(args) == 0
    source = open_plate(NF1 / "images")
    converted = open_plate(out)
    assert converted.reader == f"ome-zarr-{ngff}"
    assert converted.wells == source.wells and converted.channels == source.channels
    np.testing.assert_array_equal(converted.image("D06").compute(), source.image("D06").compute())
    assert converted.platemap.loc["D06", "genotype"] == "WT"
    assert converted.n_levels >= 2
    # converting again onto the same path refuses without --overwrite, and leaves it intact
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert open_plate(out).wells == source.wells


def test_errors_name_the_bad_input(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    bad_map = tmp_path / "map.csv"
    bad_map.write_text("well,genotype\nA01,WT\nA02,Null\n")
    assert main(["info", str(NF1 / "images"), "--platemap", str(bad_map)]) == 2
    assert "match" in capsys.readouterr().err.lower()


def test_import_profiles_command_builds_a_store(tmp_path, capsys):
    import pandas as pd

    from plate_concepts.embeddings.store import EmbeddingStore

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Well": ["A1", "B02", "r03c04"],
                          "Metadata_Treatment": ["DMSO", "drug", "drug"]})
    for j in range(5):
        table[f"feat_{j}"] = rng.normal(size=3)
    table["other"] = 1.0
    path = tmp_path / "profiles.csv"
    table.to_csv(path, index=False)
    assert main(["import-profiles", str(path), str(tmp_path / "store"), "--features", "^feat_"]) == 0
    assert "3 tokens of dimension 5" in capsys.readouterr().out
    store = EmbeddingStore.open(tmp_path / "store")
    assert list(store.obs["well"]) == ["A01", "B02", "C04"]
    np.testing.assert_allclose(store.read(slice(None)), table.filter(regex="^feat_").to_numpy(), rtol=1e-6)
