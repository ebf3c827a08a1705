"""A first day: a plate folder whose images sit in a subfolder is found (with its plate map
and masks), or the error names the folder to pass; a partly imaged plate takes its format from
its plate map; info lists the plate-map labels."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REAL_DATA as REAL

from plate_concepts.cli import main
from plate_concepts.plates import locate_plate, open_plate
from plate_concepts.plates.geometry import PlateFormat
from plate_concepts.plates.model import Plate

NF1 = REAL / "nf1_plate2"
PHENIX = REAL / "phenix_pediatric_BR00143976"


def test_info_on_the_nf1_plate_folder_finds_images_map_and_masks(capsys):
    # nf1_plate2/ holds images/, masks/ and platemap_NF1_plate2.csv side by side
    assert main(["info", str(NF1), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"] == str(NF1 / "images")
    assert info["wells"] == ["B07", "D06", "D07", "F07", "H12"]
    assert info["label_images"] == ["cells", "cytoplasm", "nuclei"]
    assert info["platemap"]["path"] == str(NF1 / "platemap_NF1_plate2.csv")
    assert info["labels"] == ["genotype"] and info["platemap"]["labels"] == ["genotype"]


def test_convert_a_plate_folder_keeps_its_plate_map(tmp_path):
    assert main(["convert", str(NF1), str(tmp_path / "nf1.zarr"), "--quiet"]) == 0
    plate = open_plate(tmp_path / "nf1.zarr")
    assert plate.platemap.loc["D06", "genotype"] == "WT" and plate.label_names == ["cells", "cytoplasm", "nuclei"]


def harmony_export(root: Path) -> Path:
    """A Harmony export: Images/ with Index.idx.xml and the Phenix field (links to the real
    files), beside Assaylayout/ and FFC_Profile/ folders of XML."""
    images = root / "Images"
    images.mkdir(parents=True)
    (images / "Index.idx.xml").write_text("<EvaluationInputData/>")
    for tiff in sorted((PHENIX / "images").glob("*.tiff")):
        os.symlink(tiff, images / tiff.name)
    for folder in ("Assaylayout", "FFC_Profile"):
        (root / folder).mkdir()
        (root / folder / "layout.xml").write_text("<x/>")
    return root


def test_a_harmony_export_folder_opens(tmp_path, capsys):
    export = harmony_export(tmp_path / "BR00143976__2021-01-01")
    assert locate_plate(export) == export / "Images"
    assert main(["info", str(export), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "tiff-phenix" and info["wells"] == ["C03"] and len(info["channels"]) == 6


def test_ambiguous_or_empty_folders_say_which_folder_to_pass(tmp_path, capsys):
    export = harmony_export(tmp_path / "run" / "plate1")
    harmony_export(tmp_path / "run" / "plate2")
    assert main(["info", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "its folders plate1, plate2 do: pass one of them" in err and str(export) in err
    (export / "Images2").mkdir()
    (export / "Images2" / "x.tif").write_bytes((export / "Images" / "r03c03f03p01-ch1sk1fk1fl1.tiff").read_bytes())
    os.rename(export / "Images", export / "Fields")
    assert main(["info", str(export)]) == 2
    assert "several plate sources: Fields, Images2; pass the one to open" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert main(["info", str(tmp_path / "notes")]) == 2
    assert "holds no plate: no TIFF images, OME-Zarr plate or LoadData CSV" in capsys.readouterr().err
    # A work folder of stores and dictionaries (demo-run's) says how to look at them.
    from plate_concepts.embeddings.store import EmbeddingStore

    EmbeddingStore.create(tmp_path / "notes" / "tokens", dim=4)
    assert main(["info", str(tmp_path / "notes")]) == 2
    assert f"'plate-concepts info {tmp_path / 'notes' / 'tokens'}' describes the embedding store" in (
        capsys.readouterr().err)
    assert main(["info", str(NF1 / "masks")]) == 2
    assert "is a folder of segmentation masks: pass the folder of the images" in capsys.readouterr().err


def test_a_partly_imaged_plate_takes_its_format_from_the_plate_map(capsys):
    # One imaged well (C03); the map covers rows C-N and columns 3-22: a 384-well plate.
    assert open_plate(PHENIX / "images").plate_format == PlateFormat(3, 4)
    plate = open_plate(PHENIX / "images", platemap=PHENIX / "platemap_Assay_Plate1.csv")
    assert plate.plate_format == PlateFormat(16, 24)
    assert main(["info", str(PHENIX), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plate_format"] == 384 and info["platemap"]["n_wells"] == 240
    assert "cell_line" in info["platemap"]["labels"]
    assert main(["info", str(PHENIX)]) == 0
    out = capsys.readouterr().out
    assert "(384-well format)" in out and "plate-map labels: cell_line" in out


def test_a_stated_format_is_kept_and_map_wells_off_every_plate_are_an_error():
    image = np.zeros((1, 8, 8), dtype=np.uint16)
    stated = Plate("p", ["a"], {("B02", 0): [image]}, reader="t", plate_format=PlateFormat(8, 12))
    stated.include_wells(["P24"])
    assert stated.plate_format == PlateFormat(8, 12)
    inferred = Plate("p", ["a"], {("B02", 0): [image]}, reader="t")
    with pytest.raises(ValueError, match="plate map .*AF99|outside every standard plate"):
        inferred.include_wells(pd.Index(["B02", "AF99"]), source="plate map x.csv")
