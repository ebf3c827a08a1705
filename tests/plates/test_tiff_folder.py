"""TIFF-folder and LoadData readers, on the real NF1 / Phenix exports and on tiny TIFFs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import REAL_DATA as REAL

from plate_concepts.plates.loaddata import is_loaddata_csv, read_loaddata_csv
from plate_concepts.plates.platemap import attach_platemap
from plate_concepts.plates.tiff_folder import PRESETS, detect_tiff_preset, read_tiff_folder

NF1 = REAL / "nf1_plate2"
PHENIX = REAL / "phenix_pediatric_BR00143976"

needs_real = pytest.mark.skipif(
    not NF1.is_dir() or not PHENIX.is_dir(), reason=f"no real data in {REAL}"
)


def write_tiff(
    path: Path, value: int, shape: tuple[int, int] = (6, 5), dtype=np.uint16
) -> np.ndarray:
    """A tiny TIFF whose pixels encode ``value`` (plus a ramp, so position matters)."""
    data = (np.arange(shape[0] * shape[1]).reshape(shape) + value).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data)
    return data


# --- real data -------------------------------------------------------------------------------


@needs_real
def test_nf1_folder_reads_wells_channels_and_pixels_lazily():
    plate = read_tiff_folder(NF1 / "images")
    assert plate.reader == "tiff-nf1"
    assert plate.wells == ["B07", "D06", "D07", "F07", "H12"]
    assert plate.channels == ["DAPI", "GFP", "RFP"]
    assert plate.fields_per_well == {w: 1 for w in plate.wells}
    assert plate.image_shape == (904, 1224) and plate.dtype == np.uint16
    image = plate.image("D6")
    assert isinstance(image, da.Array) and image.shape == (3, 904, 1224)
    assert image.numblocks == (3, 1, 1)  # one lazy read per channel file
    expected = tifffile.imread(NF1 / "images" / "D6_01_2_2_GFP_001.tif")
    np.testing.assert_array_equal(image[1].compute(), expected)

    attach_platemap(plate, NF1 / "platemap_NF1_plate2.csv")
    genotype = plate.platemap["genotype"].to_dict()
    assert genotype == {"B07": "Null", "D06": "WT", "D07": "Null", "F07": "Null", "H12": "Null"}
    assert plate.well_metadata("d6")["gene_name"] == "NF1"


@needs_real
def test_nf1_cellprofiler_masks_become_numbered_label_images():
    from skimage.measure import label

    plate = read_tiff_folder(NF1 / "images")  # masks/ beside images/ is found
    assert plate.label_names == ["cells", "cytoplasm", "nuclei"]
    nuclei = plate.field_labels("B07")["nuclei"]
    assert nuclei.shape == plate.image_shape
    mask = tifffile.imread(NF1 / "masks" / "B7_01_1_3_DAPI_001_MaskNuclei.tiff")
    assert set(np.unique(mask)) == {0, 255}  # binary: the objects are its components
    ids = nuclei.compute()
    assert ids.dtype == np.int32 and ids.max() == 28
    np.testing.assert_array_equal(ids, label(mask > 0, connectivity=2))
    assert read_tiff_folder(NF1 / "images", masks=False).label_names == []


def test_mask_files_with_ids_stems_and_shapes(tmp_path):
    images = tmp_path / "images"
    for well in ("B07", "B08"):
        for channel in (1, 2):
            write_tiff(images / f"P_{well}_s1_w{channel}.tif", channel)
    ids = np.zeros((6, 5), np.uint16)
    ids[0:2, 0:2], ids[4:6, 3:5] = 7, 300  # object ids, kept as they are
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "labels" / "P_B08_s1_w1_MaskCells.tif", ids)
    tifffile.imwrite(tmp_path / "labels" / "P_B09_s1_w1_MaskCells.tif", ids)  # no such image
    plate = read_tiff_folder(images, "imagexpress")
    assert plate.label_names == ["cells"] and plate.field_labels("B07") == {}
    np.testing.assert_array_equal(plate.field_labels("B08")["cells"].compute(), ids)

    tifffile.imwrite(tmp_path / "labels" / "P_B07_s1_w2_MaskNuclei.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"P_B07_s1_w2_MaskNuclei\.tif is \(4, 4\).*\(6, 5\)"):
        read_tiff_folder(images, "imagexpress")
    with pytest.raises(FileNotFoundError, match="mask folder"):
        read_tiff_folder(images, "imagexpress", masks=tmp_path / "nowhere")


@needs_real
def test_phenix_field_and_platemap():
    plate = read_tiff_folder(PHENIX / "images")
    assert plate.reader == "tiff-phenix"
    assert plate.name == "phenix_pediatric_BR00143976"  # the folder above "images"
    assert plate.wells == ["C03"] and plate.fields("C03") == [0]  # field f03 re-indexed to 0
    assert plate.channels == [f"ch{i}" for i in range(1, 7)]
    assert plate.image_shape == (1080, 1080) and plate.dtype == np.uint16
    window = plate.image("C03")[2, 100:140, 200:260].compute()
    expected = tifffile.imread(PHENIX / "images" / "r03c03f03p01-ch3sk1fk1fl1.tiff")[
        100:140, 200:260
    ]
    np.testing.assert_array_equal(window, expected)

    attach_platemap(plate, PHENIX / "platemap_Assay_Plate1.csv")
    assert plate.platemap.loc["C03", "cell_line"] == "DAOY"
    assert plate.platemap.loc["C03", "seeding_density"] == 1000


@needs_real
def test_preset_detection_on_real_folders():
    assert detect_tiff_preset(NF1 / "images") == "nf1"
    assert detect_tiff_preset(PHENIX / "images") == "phenix"
    assert detect_tiff_preset(NF1 / "masks") is None  # ..._MaskNuclei.tiff names match no preset


# --- synthetic exports -----------------------------------------------------------------------


def test_imagexpress_names_thumbnails_and_uuids(tmp_path):
    planted = {}
    for well in ["B07", "C10"]:
        for site in [1, 2]:
            for wave in [1, 2]:
                value = 1000 * (well == "C10") + 100 * site + 10 * wave
                planted[(well, site, wave)] = write_tiff(
                    tmp_path / f"Plate1_{well}_s{site}_w{wave}.tif", value
                )
                write_tiff(tmp_path / f"Plate1_{well}_s{site}_w{wave}_thumb.tif", 7, shape=(2, 2))
    write_tiff(
        tmp_path / "Plate1_B07_s1_w1_thumb4D5E6F70-1234-4abc-8def-0123456789AB.tif", 7, (2, 2)
    )
    assert detect_tiff_preset(tmp_path) == "imagexpress"

    plate = read_tiff_folder(tmp_path)
    assert plate.reader == "tiff-imagexpress" and plate.name == "Plate1"
    assert plate.wells == ["B07", "C10"] and plate.fields_per_well == {"B07": 2, "C10": 2}
    assert plate.channels == ["ch1", "ch2"]
    np.testing.assert_array_equal(plate.image("C10", 1)[0].compute(), planted[("C10", 2, 1)])
    np.testing.assert_array_equal(plate.image("B7", 0)[1].compute(), planted[("B07", 1, 2)])


def test_imagexpress_uuid_names_without_plate_prefix(tmp_path):
    uuid = "5C1F6D2E-0A1B-4C2D-9E3F-112233445566"
    a = write_tiff(tmp_path / f"B07_s2_w3{uuid}.tif", 5)
    b = write_tiff(tmp_path / f"B07_s2_w1{uuid.replace('5C', '1F')}.tif", 9)
    plate = read_tiff_folder(tmp_path, "imagexpress", channel_names=["DNA", "Mito"])
    assert plate.channels == ["DNA", "Mito"] and plate.wells == ["B07"]
    stack = plate.image("B07").compute()
    np.testing.assert_array_equal(stack[0], b)
    np.testing.assert_array_equal(stack[1], a)


def test_imagexpress_timepoint_folders_pick_the_first_unless_asked(tmp_path):
    first = write_tiff(tmp_path / "TimePoint_1" / "P_A01_s1_w1.tif", 1)
    second = write_tiff(tmp_path / "TimePoint_2" / "P_A01_s1_w1.tif", 2)
    plate = read_tiff_folder(tmp_path, "imagexpress", recursive=True)
    np.testing.assert_array_equal(plate.image("A01")[0].compute(), first)
    plate = read_tiff_folder(tmp_path, "imagexpress", recursive=True, timepoint=2)
    np.testing.assert_array_equal(plate.image("A01")[0].compute(), second)


def test_user_regex_with_row_and_column_sorts_ids_numerically(tmp_path):
    pattern = (
        r"img_(?P<row>[A-H])-(?P<column>\d+)_f(?P<field>\d+)"
        r"_(?P<channel_name>[a-z]+)(?P<channel>\d)\.tif"
    )
    planted = {}
    for field in [3, 10]:  # as text "10" < "3"; as numbers field 3 comes first
        for channel, name in [(2, "actin"), (1, "dna")]:
            planted[(field, channel)] = write_tiff(
                tmp_path / f"img_D-4_f{field}_{name}{channel}.tif", field * 10 + channel
            )
    (tmp_path / "notes.txt").write_text("not an image")
    plate = read_tiff_folder(tmp_path, pattern)
    assert plate.reader == "tiff-pattern"
    assert plate.wells == ["D04"] and plate.fields("D04") == [0, 1]
    assert plate.channels == ["dna", "actin"]
    np.testing.assert_array_equal(plate.image("D04", 0)[1].compute(), planted[(3, 2)])
    np.testing.assert_array_equal(plate.image("D04", 1)[0].compute(), planted[(10, 1)])


def test_phenix_planes_select_first_or_given(tmp_path):
    for plane in [1, 2]:
        for channel in [1, 2]:
            write_tiff(
                tmp_path / f"r02c05f01p0{plane}-ch{channel}sk1fk1fl1.tiff", 100 * plane + channel
            )
    plate = read_tiff_folder(tmp_path)
    assert plate.wells == ["B05"]
    assert plate.image("B05")[1].compute()[0, 0] == 102
    assert read_tiff_folder(tmp_path, plane=2).image("B05")[0].compute()[0, 0] == 201
    with pytest.raises(ValueError, match=r"plane 5 not found.*\[1, 2\]"):
        read_tiff_folder(tmp_path, plane=5)


# --- bad input -------------------------------------------------------------------------------


def test_missing_channel_is_named(tmp_path):
    for field in [1, 2]:
        for wave in [1, 2, 3]:
            if (field, wave) != (2, 3):
                write_tiff(tmp_path / f"P_B07_s{field}_w{wave}.tif", wave)
    with pytest.raises(
        ValueError, match=r"well B07 field 2 has channels \[1, 2\] but the plate has \[1, 2, 3\]"
    ):
        read_tiff_folder(tmp_path, "imagexpress")


def test_shape_mismatch_names_the_file_and_both_shapes(tmp_path):
    write_tiff(tmp_path / "P_B07_s1_w1.tif", 1, shape=(6, 5))
    write_tiff(tmp_path / "P_B07_s1_w2.tif", 1, shape=(6, 5))
    write_tiff(tmp_path / "P_B08_s1_w1.tif", 1, shape=(6, 5))
    write_tiff(tmp_path / "P_B08_s1_w2.tif", 1, shape=(7, 5))
    with pytest.raises(ValueError, match=r"P_B08_s1_w2\.tif is \(7, 5\).*other 3 images are \(6, 5\)"):
        read_tiff_folder(tmp_path, "imagexpress")
    # The odd file is named even when it sorts first: the majority sets the plate's shape.
    write_tiff(tmp_path / "P_B07_s1_w1.tif", 1, shape=(8, 5))
    write_tiff(tmp_path / "P_B08_s1_w2.tif", 1, shape=(6, 5))
    with pytest.raises(ValueError, match=r"P_B07_s1_w1\.tif is \(8, 5\).*other 3 images are \(6, 5\)"):
        read_tiff_folder(tmp_path, "imagexpress")


def test_duplicate_files_for_one_channel(tmp_path):
    write_tiff(tmp_path / "P_B7_s1_w1.tif", 1)
    write_tiff(tmp_path / "P_B07_s1_w1.tif", 2)  # same well, other spelling
    with pytest.raises(ValueError, match=r"two files for well B07 field 1 channel 1"):
        read_tiff_folder(tmp_path, "imagexpress")


def test_no_matching_file_says_pattern_and_count(tmp_path):
    write_tiff(tmp_path / "something.tif", 1)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"'phenix' \(2 files seen"):
        read_tiff_folder(tmp_path, "phenix")
    with pytest.raises(ValueError, match=r"2 files .* matches any preset"):
        read_tiff_folder(tmp_path)
    assert detect_tiff_preset(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        read_tiff_folder(tmp_path / "absent")

    write_tiff(tmp_path / "P_B00_s1_w1.tif", 1)  # well-shaped, but there is no column 0
    assert detect_tiff_preset(tmp_path) is None
    with pytest.raises(ValueError, match=r"P_B00_s1_w1\.tif: the well in its name cannot be read"):
        read_tiff_folder(tmp_path, "imagexpress")


def test_regex_without_needed_groups(tmp_path):
    write_tiff(tmp_path / "B07_1.tif", 1)
    with pytest.raises(ValueError, match=r"needs 'well' \(or 'row' and 'column'\) and 'channel'"):
        read_tiff_folder(tmp_path, r"(?P<well>[A-H]\d+)_(?P<field>\d)\.tif")
    with pytest.raises(ValueError, match="needs 'well'"):
        read_tiff_folder(tmp_path, r"(?P<row>[A-H])\d+_(?P<channel>\d)\.tif")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        read_tiff_folder(tmp_path, r"(?P<well>[A-H")


def test_corrupt_and_truncated_tiffs_are_named(tmp_path):
    write_tiff(tmp_path / "P_B07_s1_w1.tif", 1)
    (tmp_path / "P_B07_s1_w2.tif").write_bytes(b"this is not a TIFF file at all")
    with pytest.raises(ValueError, match=r"TIFF header of .*P_B07_s1_w2\.tif"):
        read_tiff_folder(tmp_path, "imagexpress")

    good = tmp_path / "P_B07_s1_w2.tif"
    write_tiff(good, 2)
    (tmp_path / "P_B07_s1_w2.tif").write_bytes(good.read_bytes()[:12])  # cut inside the header
    with pytest.raises(ValueError, match=r"P_B07_s1_w2\.tif"):
        read_tiff_folder(tmp_path, "imagexpress")


def test_pixels_cut_off_after_a_good_header_fail_on_compute_naming_the_file(tmp_path):
    for wave in [1, 2]:
        write_tiff(tmp_path / f"P_B07_s1_w{wave}.tif", wave, shape=(64, 64))
    path = tmp_path / "P_B07_s1_w2.tif"
    data = path.read_bytes()
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    assert offset < len(data) - 100  # pixels come after the header here
    path.write_bytes(data[: offset + 10])
    plate = read_tiff_folder(tmp_path, "imagexpress")  # headers are intact: reading is lazy
    plate.image("B07")[0].compute()  # the intact channel still reads
    with pytest.raises(ValueError, match=r"cannot read the pixels of .*P_B07_s1_w2\.tif"):
        plate.image("B07").compute()


# --- LoadData --------------------------------------------------------------------------------


def nf1_loaddata(paths_for) -> pd.DataFrame:
    rows = []
    for well, site in [("B7", 3), ("D06", 2), ("r04c07", 1)]:
        short = {"B7": "B7", "D06": "D6", "r04c07": "D7"}[well]
        row = {"Metadata_Plate": "NF1_plate2", "Metadata_Well": well, "Metadata_Site": site}
        for number, channel in [(1, "DAPI"), (2, "GFP"), (3, "RFP")]:
            row[f"FileName_Orig{channel}"] = f"{short}_01_{number}_{site}_{channel}_001.tif"
            row[f"PathName_Orig{channel}"] = paths_for(channel)
        rows.append(row)
    return pd.DataFrame(rows)


@needs_real
def test_loaddata_with_absolute_and_relative_paths(tmp_path):
    relative = os.path.relpath(NF1 / "images", tmp_path)
    table = nf1_loaddata(lambda channel: str(NF1 / "images") if channel == "GFP" else relative)
    table["FileName_IllumDNA"] = "illum.npy"  # illumination functions are not image channels
    table["PathName_IllumDNA"] = "."
    csv = tmp_path / "load_data.csv"
    table.to_csv(csv, index=False)
    assert is_loaddata_csv(csv)

    plate = read_loaddata_csv(csv)
    assert plate.reader == "loaddata" and plate.name == "NF1_plate2"
    assert plate.channels == ["OrigDAPI", "OrigGFP", "OrigRFP"]
    assert plate.wells == ["B07", "D06", "D07"] and plate.image_shape == (904, 1224)
    folder_plate = read_tiff_folder(NF1 / "images")
    window = (slice(None), slice(300, 340), slice(500, 560))
    np.testing.assert_array_equal(
        plate.image("D07")[window].compute(), folder_plate.image("D07")[window].compute()
    )

    subset = read_loaddata_csv(csv, channel_names=["OrigRFP", "OrigDAPI"])
    assert subset.channels == ["OrigRFP", "OrigDAPI"] and subset.image("B07").shape[0] == 2
    renamed = read_loaddata_csv(csv, channel_names=["DNA", "ER", "Mito"])
    assert renamed.channels == ["DNA", "ER", "Mito"]


def test_is_loaddata_csv_rejects_other_tables(tmp_path):
    platemap = tmp_path / "platemap.csv"
    platemap.write_text("well,genotype\nB07,WT\n")
    assert not is_loaddata_csv(platemap)
    assert not is_loaddata_csv(tmp_path / "absent.csv")


def test_loaddata_bad_inputs(tmp_path):
    write_tiff(tmp_path / "a.tif", 1)
    csv = tmp_path / "load.csv"

    csv.write_text("Metadata_Well,Metadata_Site,Image\nB07,1,a.tif\n")
    with pytest.raises(ValueError, match=r"no FileName_<channel> / PathName_<channel>.*'Image'"):
        read_loaddata_csv(csv)

    csv.write_text("Metadata_Well,FileName_DNA\nB07,a.tif\n")
    with pytest.raises(ValueError, match=r"\['DNA'\] lack their FileName_ or PathName_"):
        read_loaddata_csv(csv)

    csv.write_text(
        "Metadata_Well,Metadata_Site,FileName_DNA,PathName_DNA\nB07,1,a.tif,.\nB08,1,gone.tif,.\n"
    )
    with pytest.raises(FileNotFoundError, match=r"row 2 \(well B08, channel DNA\): .*gone\.tif"):
        read_loaddata_csv(csv)

    csv.write_text("Metadata_Well,Metadata_Site,FileName_DNA,PathName_DNA\nX9Y,1,a.tif,.\n")
    with pytest.raises(
        ValueError, match=r"data row 1 has Metadata_Well='X9Y', which is not a well"
    ):
        read_loaddata_csv(csv)

    csv.write_text(
        "Metadata_Well,Metadata_Site,FileName_DNA,PathName_DNA\nB07,1,a.tif,.\nB7,1,a.tif,.\n"
    )
    with pytest.raises(ValueError, match=r"data row 2 repeats well B07 site 1"):
        read_loaddata_csv(csv)

    csv.write_text(
        "Metadata_Plate,Metadata_Well,FileName_DNA,PathName_DNA\nP1,B07,a.tif,.\nP2,B07,a.tif,.\n"
    )
    with pytest.raises(ValueError, match=r"plates \['P1', 'P2'\]"):
        read_loaddata_csv(csv)
    assert read_loaddata_csv(csv, plate="P2").name == "P2"


def test_presets_are_valid_patterns():
    for name, text in PRESETS.items():
        read_groups = set(re.compile(text).groupindex)
        assert "channel" in read_groups and (
            "well" in read_groups or {"row", "column"} <= read_groups
        ), name
