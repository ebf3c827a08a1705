"""Importing profile tables, one per plate: aligned features, NaN handling, text cells,
column names kept findable after the Metadata_ prefix is dropped, export back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from plate_concepts.embeddings.profiles import export_profiles, import_profiles
from plate_concepts.plates.platemap import ControlSpec, control_mask

FEATURES = ["Cells_AreaShape_Area", "Cells_Intensity_MeanIntensity_DNA", "Nuclei_Texture_Contrast"]


def plate_table(plate: str, n: int = 12, seed: int = 0, features=FEATURES) -> pd.DataFrame:
    """A pycytominer-style per-plate profile table (one row per well)."""
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {
            "Metadata_Plate": plate,
            "Metadata_Well": [f"{'ABCD'[i % 4]}{i // 4 + 1:02d}" for i in range(n)],
            "Metadata_cell_line": np.where(np.arange(n) % 3 == 0, "A549", "U2OS"),
            "Metadata_pert_iname": [f"drug{i % 4}" for i in range(n)],
        }
    )
    for name in features:
        table[name] = rng.standard_normal(n)
    return table


def test_one_table_per_plate_into_one_store_and_back(tmp_path):
    tables = [
        plate_table("BR01", seed=1),
        plate_table("BR02", seed=2).sample(frac=1, random_state=0),
    ]
    tables[1] = tables[1][[*tables[1].columns[:4], *FEATURES[::-1]]]  # another column order
    paths = [tmp_path / "BR01.parquet", tmp_path / "BR02.csv"]
    tables[0].to_parquet(paths[0], index=False)
    tables[1].to_csv(paths[1], index=False)

    store = import_profiles(paths, tmp_path / "store", block_rows=5)
    assert store.plates == ["BR01", "BR02"] and len(store) == 24 and store.dim == 3
    assert store.provenance["feature_names"] == FEATURES and store.provenance["source"] == [
        str(p) for p in paths
    ]
    np.testing.assert_allclose(store.read_plate("BR02"), tables[1][FEATURES].to_numpy(), rtol=1e-6)
    assert list(store.read_obs(plate="BR02")["well"]) == list(tables[1]["Metadata_Well"])
    assert store.describe()["labels"]["cell_line"]["values"] == {"U2OS": 16, "A549": 8}

    # The prefix was dropped on import; the table's own name still finds the column.
    assert store.resolve_column("Metadata_cell_line") == "cell_line"
    for spec in ("Metadata_cell_line=A549", "cell_line=A549"):
        assert control_mask(store.obs, ControlSpec.parse(spec)).sum() == 8

    out = tmp_path / "back.parquet"
    export_profiles(store, out, block_rows=7)
    back = pd.read_parquet(out)
    expected = pd.concat(tables, ignore_index=True)[back.columns]
    pd.testing.assert_frame_equal(
        back, expected.astype(back.dtypes.to_dict()), check_exact=False, rtol=1e-6
    )


def test_tables_with_other_features_need_an_inner_join_that_reports_what_it_drops(tmp_path):
    first = plate_table("P1")
    second = plate_table("P2", features=FEATURES[1:] + ["Cytoplasm_Extra"])
    paths = [tmp_path / "P1.csv", tmp_path / "P2.csv"]
    first.to_csv(paths[0], index=False)
    second.to_csv(paths[1], index=False)
    with pytest.raises(
        ValueError,
        match=rf"'Cells_AreaShape_Area' is missing from {paths[1]}; 'Cytoplasm_Extra' is missing from {paths[0]}.*--features-join inner.*keep the 2",
    ):
        import_profiles(paths, tmp_path / "exact")
    assert not (tmp_path / "exact").exists()

    store = import_profiles(paths, tmp_path / "inner", features_join="inner")
    assert store.provenance["feature_names"] == FEATURES[1:]
    assert store.provenance["dropped_features"] == {
        "Cells_AreaShape_Area": f"missing from {paths[1]}",
        "Cytoplasm_Extra": f"missing from {paths[0]}",
    }
    np.testing.assert_allclose(store.read_plate("P2"), second[FEATURES[1:]].to_numpy(), rtol=1e-6)


def test_nan_and_inf_are_an_error_unless_columns_or_rows_holding_them_are_dropped(tmp_path):
    first, second = plate_table("P1"), plate_table("P2", seed=3)
    first.loc[4, "Nuclei_Texture_Contrast"] = np.nan
    second.loc[[2, 7], "Cells_AreaShape_Area"] = [np.inf, np.nan]
    paths = [tmp_path / "P1.parquet", tmp_path / "P2.csv"]
    first.to_parquet(paths[0], index=False)
    second.to_csv(paths[1], index=False)
    with pytest.raises(
        ValueError,
        match=r"'Nuclei_Texture_Contrast' in data row 5 \(well A02\) is empty \(NaN\).*--drop-na columns\|rows",
    ):
        import_profiles(paths, tmp_path / "e")

    columns = import_profiles(paths, tmp_path / "c", drop_na="columns", block_rows=4)
    assert (
        columns.provenance["feature_names"] == ["Cells_Intensity_MeanIntensity_DNA"]
        and len(columns) == 24
    )
    assert columns.provenance["dropped_features"] == {
        "Cells_AreaShape_Area": "holds NaN or inf", "Nuclei_Texture_Contrast": "holds NaN or inf",
    }  # fmt: skip

    rows = import_profiles(paths, tmp_path / "r", drop_na="rows", block_rows=4)
    assert rows.provenance["dropped_rows"] == {str(paths[0]): 1, str(paths[1]): 2}
    assert len(rows) == 21 and rows.tokens_per_plate() == {"P1": 11, "P2": 10}
    kept = second.drop(index=[2, 7])
    np.testing.assert_allclose(rows.read_plate("P2"), kept[FEATURES].to_numpy(), rtol=1e-6)
    assert list(rows.read_obs(plate="P2")["well"]) == list(kept["Metadata_Well"])


def test_a_text_cell_in_a_feature_column_is_an_error_naming_it(tmp_path):
    table = plate_table("P1").astype({"Nuclei_Texture_Contrast": object})
    table.loc[5, "Nuclei_Texture_Contrast"] = "#DIV/0!"
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(
        ValueError,
        match=r"feature column 'Nuclei_Texture_Contrast' holds text in data row 6 \('#DIV/0!'\)",
    ):
        import_profiles(tmp_path / "t.csv", tmp_path / "s")
    table.astype({"Nuclei_Texture_Contrast": str}).to_parquet(tmp_path / "t.parquet", index=False)
    with pytest.raises(ValueError, match=r"holds text in data row 6 \('#DIV/0!'\)"):
        import_profiles(tmp_path / "t.parquet", tmp_path / "s")
    # An empty or damaged file is named.
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "t.parquet").read_bytes()[:100])
    for name, kind in (("empty.csv", "csv"), ("cut.parquet", "parquet")):
        with pytest.raises(ValueError, match=rf"profile table {tmp_path / name} cannot be read as a {kind} table"):
            import_profiles(tmp_path / name, tmp_path / "s")
    # A column of text only is not a feature: left out with a warning.
    plate_table("P1").assign(Image_FileName="a.tif").to_csv(tmp_path / "names.csv", index=False)
    with pytest.warns(UserWarning, match=r"text columns \['Image_FileName'\] are neither"):
        assert import_profiles(tmp_path / "names.csv", tmp_path / "n").dim == 3


def test_a_plate_in_two_tables_is_refused(tmp_path):
    plate_table("P1").to_csv(tmp_path / "a.csv", index=False)
    plate_table("P1", seed=4).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(ValueError, match=r"plate 'P1' is in two profile tables"):
        import_profiles([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "s")
    with pytest.raises(
        FileExistsError, match="refusing to replace"
    ):  # the output may not hold a table
        import_profiles(tmp_path / "a.csv", tmp_path, overwrite=True)
    assert (tmp_path / "a.csv").is_file()
