"""Plate maps: reading, joining on any well spelling, label columns and control masks."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from conftest import REAL_DATA as REAL

from plate_concepts.plates.geometry import PlateFormat
from plate_concepts.plates.model import Plate
from plate_concepts.plates.platemap import (
    ControlSpec,
    attach_platemap,
    control_mask,
    label_columns,
    read_platemap,
    resolve_column,
)

NF1_MAP = REAL / "nf1_plate2" / "platemap_NF1_plate2.csv"
PHENIX_MAP = REAL / "phenix_pediatric_BR00143976" / "platemap_Assay_Plate1.csv"

needs_real = pytest.mark.skipif(
    not NF1_MAP.is_file() or not PHENIX_MAP.is_file(), reason="no real data"
)


def tiny_plate(wells: list[str]) -> Plate:
    images = {(w, 0): [da.zeros((1, 4, 4), dtype=np.uint8)] for w in wells}
    return Plate(name="tiny", channels=["dna"], images=images, reader="test")


@needs_real
def test_real_nf1_platemap_uses_well_position_and_keeps_columns():
    table = read_platemap(NF1_MAP)
    assert table.index.name == "well" and len(table) == 32
    assert list(table.columns) == ["WellRow", "WellCol", "well_position", "gene_name", "genotype"]
    assert table.loc["H12", "genotype"] == "Null" and table.loc["D06", "genotype"] == "WT"
    assert table.loc["A01", "well_position"] == "A1"
    assert label_columns(table) == ["genotype"]  # gene_name is constant, positions are not labels


@needs_real
def test_real_phenix_platemap_and_its_labels():
    table = read_platemap(PHENIX_MAP)
    assert table.loc["C03", "cell_line"] == "DAOY" and table.loc["C03", "well"] == "C03"
    # condition is constant; row/column/well are positions; seeding_density has 5 values.
    assert label_columns(table) == ["cell_line", "seeding_density"]


@pytest.mark.parametrize(
    "header, rows",
    [
        ("well,treatment", ["B7,DMSO", "C12,drug", "A1,none"]),
        ("Metadata_Well,treatment", ["B07,DMSO", "C12,drug", "A01,none"]),
        ("WellName,treatment", ["r02c07,DMSO", "r03c12,drug", "r01c01,none"]),
        ("row,column,treatment", ["B,7,DMSO", "C,12,drug", "A,1,none"]),
        ("WellRow,WellCol,treatment", ["2,7,DMSO", "3,12,drug", "1,1,none"]),
        ("Metadata_Row,Metadata_Col,treatment", ["b,07,DMSO", "c,12,drug", "a,1,none"]),
    ],
)
def test_join_on_any_well_spelling(tmp_path, header, rows):
    path = tmp_path / "map.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    plate = attach_platemap(tiny_plate(["B07", "C12"]), path)
    assert plate.platemap["treatment"].to_dict() == {"B07": "DMSO", "C12": "drug"}
    assert plate.well_metadata("b7")["treatment"] == "DMSO"


def test_tsv_parquet_and_explicit_well_column(tmp_path):
    table = pd.DataFrame({"position": ["B7", "C12"], "dose": [0.5, 1.0], "site": ["x", "y"]})
    tsv = tmp_path / "map.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    assert read_platemap(tsv, well_column="position")["dose"].to_dict() == {"B07": 0.5, "C12": 1.0}
    parquet = tmp_path / "map.parquet"
    table.rename(columns={"position": "Well"}).to_parquet(parquet)
    assert read_platemap(parquet).loc["C12", "site"] == "y"
    # Excel's "CSV" where a comma is the decimal mark: semicolons between the cells.
    excel = tmp_path / "map.csv"
    excel.write_bytes("\ufeffWell;dose;site\r\nB7;0,5;x\r\nC12;1;y\r\n".encode())
    assert read_platemap(excel)[["dose", "site"]].to_dict("index") == {"B07": {"dose": 0.5, "site": "x"}, "C12": {"dose": 1.0, "site": "y"}}
    with pytest.raises(ValueError, match="unknown file type '.xlsx'"):
        (tmp_path / "map.xlsx").write_text("x")
        read_platemap(tmp_path / "map.xlsx")
    with pytest.raises(FileNotFoundError):
        read_platemap(tmp_path / "absent.csv")
    # An empty, damaged or mis-quoted file is named.
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "cut.parquet").write_bytes(parquet.read_bytes()[:100])
    (tmp_path / "quote.csv").write_text('well,x\n"B7,1\n')
    for name, kind in (("empty.csv", "csv"), ("cut.parquet", "parquet"), ("quote.csv", "csv")):
        with pytest.raises(ValueError, match=rf"plate map {tmp_path / name} cannot be read as a {kind} table: "):
            read_platemap(tmp_path / name)


def test_attach_warns_for_unmapped_wells_and_fails_when_none_match(tmp_path):
    frame = pd.DataFrame({"well": ["B7", "E5"], "genotype": ["WT", "Null"]})
    with pytest.warns(UserWarning, match=r"wells \['C03'\] are not in the plate map"):
        plate = attach_platemap(tiny_plate(["B07", "C03"]), frame)
    assert plate.platemap.loc["B07", "genotype"] == "WT"
    assert pd.isna(plate.platemap.loc["C03", "genotype"])
    assert list(plate.platemap.index) == ["B07", "C03"]

    with pytest.raises(ValueError, match=r"matches no well.*\['A01', 'A02'\].*\['B07', 'E05'\]"):
        attach_platemap(tiny_plate(["A01", "A02"]), frame)


def test_bad_platemaps_are_explained(tmp_path):
    path = tmp_path / "map.csv"
    path.write_text("sample,genotype\ns1,WT\n")
    with pytest.raises(
        ValueError, match=r"no well column.*\['sample', 'genotype'\].*'well_position'"
    ):
        read_platemap(path)

    path.write_text("well,genotype\nB07,WT\nB07,Null\nC1,WT\nr03c01,WT\n")
    with pytest.raises(ValueError, match=r"wells appear more than once: \['B07', 'C01'\]"):
        read_platemap(path)

    path.write_text("well,genotype\nB07,WT\nplate-edge,Null\n")
    with pytest.raises(ValueError, match=r"data row 2 has well='plate-edge', which is not a well"):
        read_platemap(path)

    path.write_text("row,column,genotype\nB,7,WT\nB,,Null\n")
    with pytest.raises(ValueError, match=r"data row 2 has row='B', column=''"):
        read_platemap(path)


def test_label_columns_rule():
    table = pd.DataFrame(
        {
            "well": ["A01", "A02", "A03", "A04"],
            "Metadata_Row": [1, 1, 1, 1],
            "my_well": ["A1", "A2", "A3", "A4"],  # spells the well: not a label
            "compound": ["DMSO", "DMSO", "X", "Y"],
            "dose": [0.0, 0.0, 1.0, 1.0],
            "replicate_id": ["r1", "r2", "r3", "r4"],  # unique per well: identifier
            "batch": ["b1"] * 4,  # constant
        }
    ).set_index("well", drop=False)
    assert label_columns(table) == ["compound", "dose"]


def test_control_spec_parse_and_mask():
    spec = ControlSpec.parse(" treatment = DMSO, untreated ")
    assert spec == ControlSpec("treatment", ["DMSO", "untreated"])
    assert str(spec) == "treatment=DMSO,untreated"
    obs = pd.DataFrame(
        {"treatment": ["DMSO", "drug", "untreated", None], "plate_id": [1, 2, 1.0, 3]}
    )
    np.testing.assert_array_equal(control_mask(obs, spec), [True, False, True, False])
    # 1, 1.0 and '1' are the same value when compared as text
    np.testing.assert_array_equal(
        control_mask(obs, ControlSpec.parse("plate_id=1")), [True, False, True, False]
    )
    with pytest.warns(UserWarning, match=r"\['mock'\] match no row"):
        np.testing.assert_array_equal(
            control_mask(obs, ControlSpec.parse("treatment=drug,mock")), [False, True, False, False]
        )
    for bad in ["genotype", "=WT", "genotype=", "genotype= , "]:
        with pytest.raises(ValueError, match="is not 'column=value"):
            ControlSpec.parse(bad)


def test_control_mask_errors_list_what_exists():
    table = pd.DataFrame(
        {"genotype": ["WT", "Null", "Null"]}, index=pd.Index(["B07", "C03", "D06"], name="well")
    )
    with pytest.raises(
        ValueError, match=r"'treatment' not found; available columns: \['genotype'\]"
    ):
        control_mask(table, ControlSpec.parse("treatment=DMSO"))
    with pytest.raises(ValueError, match=r"no row has genotype in \['wt'\].*\['Null', 'WT'\]"):
        control_mask(table, ControlSpec.parse("genotype=wt"))
    np.testing.assert_array_equal(
        control_mask(table, ControlSpec.parse("well=C03")), [False, True, False]
    )


def test_a_plate_map_well_that_is_not_on_the_plate_is_an_error_naming_its_row(tmp_path):
    path = tmp_path / "map.csv"
    path.write_text("well,genotype\nB07,WT\nC03,Null\nZ99,WT\n")
    with pytest.raises(
        ValueError, match=rf"plate map {path}: data row 3 has well 'Z99', which is on no plate"
    ):
        attach_platemap(tiny_plate(["B07", "C03"]), path)
    frame = pd.DataFrame({"well": ["B07", "H13"], "genotype": ["WT", "Null"]})
    stated = Plate(
        name="p96", channels=["dna"], images={("B07", 0): [da.zeros((1, 4, 4), dtype=np.uint8)]},
        reader="test", plate_format=PlateFormat.from_n_wells(96),
    )  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"data row 2 has well 'H13', which is not on this 96-well plate \(A01\.\.H12\)",
    ):
        attach_platemap(stated, frame)
    widened = attach_platemap(tiny_plate(["B07"]), frame)  # a format inferred from the images grows
    assert widened.plate_format.n_wells == 384


def test_one_resolver_for_column_names_with_or_without_the_metadata_prefix():
    columns = ["plate", "well", "field", "cell_line", "Metadata_dose", "Treatment"]
    assert resolve_column("cell_line", columns) == "cell_line"
    assert resolve_column("Metadata_cell_line", columns) == "cell_line"  # the prefix was dropped
    assert resolve_column("dose", columns) == "Metadata_dose"  # the prefix was kept
    assert resolve_column("Metadata_Site", columns) == "field"  # an index alias
    assert resolve_column("treatment", columns) == "Treatment"  # case
    with pytest.raises(
        ValueError, match=r"label column 'genotype' not found; available columns: \['plate'"
    ):
        resolve_column("genotype", columns, "label column")
    with pytest.raises(ValueError, match="not found"):  # two columns equal ignoring case
        resolve_column("dna", ["DNA", "Dna"])

    obs = pd.DataFrame({"cell_line": ["A549", "U2OS", "A549"]})
    for spec in ("cell_line=A549", "Metadata_cell_line=A549", "CELL_LINE=A549"):
        np.testing.assert_array_equal(
            control_mask(obs, ControlSpec.parse(spec)), [True, False, True]
        )
    jump = pd.DataFrame({"Metadata_cell_line": ["A549", "U2OS"]})
    np.testing.assert_array_equal(
        control_mask(jump, ControlSpec.parse("cell_line=U2OS")), [False, True]
    )
