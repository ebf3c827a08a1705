"""One token per segmented object: object tables and crops (known answers), embedding a plate
object by object (index, masking, resume, refusals) and real CellProfiler masks."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REAL_DATA, TinyEmbedder, make_feature_plate, plate_of, quarter_cells

from plate_concepts.embeddings.embed import embed_plate
from plate_concepts.embeddings.embedders import ModelEmbedder
from plate_concepts.embeddings.objects import object_crops, object_table
from plate_concepts.embeddings.tiling import IntensityNormalizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny() -> ModelEmbedder:
    """Tokens whose first C entries are the crop's mean intensity per channel."""
    return ModelEmbedder(TinyEmbedder(), "tiny")


def test_object_table_and_crops_known_answers():
    labels = np.zeros((40, 50), dtype=np.uint16)
    labels[2:6, 3:9] = 4  # 4 x 6 px, centroid (3.5, 5.5)
    labels[30:40, 40:50] = 9  # in the corner, centroid (34.5, 44.5)
    labels[20, 20] = 2
    table = object_table(labels)
    assert table["label"].tolist() == [2, 4, 9]
    np.testing.assert_allclose(table[["centroid_y", "centroid_x"]].to_numpy(), [[20, 20], [3.5, 5.5], [34.5, 44.5]])
    assert table["area"].tolist() == [1, 24, 100]
    corners = object_crops(table, labels.shape, 16)
    # Centred where the field allows (centroid 20 -> rows 12..27), else moved inside the field.
    np.testing.assert_array_equal(corners, [[12, 12], [0, 0], [24, 34]])
    for (y, x), obj in zip(corners, table.itertuples(), strict=True):
        assert obj.label in labels[y : y + 16, x : x + 16]
    with pytest.raises(ValueError, match="do not fit in fields of 40 x 50 px"):
        object_crops(table, labels.shape, 41)
    with pytest.raises(ValueError, match="integer ids"):
        object_table(labels.astype(float))
    assert object_table(np.zeros((5, 5), np.int32)).empty


def test_embed_one_token_per_cell_with_its_index_and_mask(tmp_path):
    plate = make_feature_plate(wells=["A01", "A02", "B01"])
    store = embed_plate(plate, tmp_path / "cells.store", tiny(), objects="cells", object_size=32,
                        mask=True, control="treatment=DMSO", device="cpu")
    obs = store.obs
    assert len(store) == 3 * 2 * 4  # four cells per field
    assert store.provenance["objects"] == {"label_image": "cells", "mask": True}
    assert store.provenance["crop_size"] == 32
    one = obs[(obs["well"] == "A02") & (obs["field"] == 1) & (obs["object_label"] == 6)].iloc[0]
    # quarter_cells(1): cell 6 is the top-right quarter, rows 4..27, columns 36..59.
    assert (one["object_y"], one["object_x"], one["object_area"], one["field_objects"]) == (15.5, 47.5, 576, 4)
    assert (one["crop_y"], one["crop_x"]) == (0, 32) and one["treatment"] == "drug"
    # The token of a masked crop is the mean of the object's scaled pixels over the crop.
    normalizer = IntensityNormalizer.from_record(store.provenance["plates"]["tiny"]["normalization"])
    scaled = normalizer(np.asarray(plate.image("A02", 1).compute()))
    inside = quarter_cells(1)[0:32, 32:64] == 6
    expected = (scaled[:, 0:32, 32:64] * inside).mean(axis=(1, 2))
    np.testing.assert_allclose(store.read([one.name])[0, :2], expected, rtol=1e-5)
    # Object columns are an index, not labels.
    assert "object_label" not in store.describe()["labels"] and "treatment" in store.describe()["labels"]


def test_an_interrupted_object_run_resumes_to_the_uninterrupted_store(tmp_path):
    plate = make_feature_plate(wells=["A01", "A02", "B01"])
    settings = {"objects": "nuclei", "object_size": 24, "control": "treatment=DMSO", "device": "cpu",
                "batch_size": 5, "group_size": 5}
    whole = embed_plate(plate, tmp_path / "whole.store", tiny(), **settings)
    stop, batches = threading.Event(), []

    def cancel() -> bool:
        batches.append(1)
        return len(batches) > 2  # after three batches of five objects, mid-field

    part = embed_plate(plate, tmp_path / "part.store", tiny(), cancel=cancel, **settings)
    assert 0 < len(part) < len(whole) and not part.is_complete
    done = embed_plate(plate, tmp_path / "part.store", tiny(), **settings)
    assert done.is_complete and len(done) == len(whole) == 24
    key = ["well", "field", "object_label"]
    a, b = whole.obs.sort_values(key), done.obs.sort_values(key)
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    np.testing.assert_array_equal(whole.read(a.index.to_numpy()), done.read(b.index.to_numpy()))
    assert not stop.is_set()
    # Object tokens and crop tokens do not mix in one store.
    with pytest.raises(ValueError, match="objects: store"):
        embed_plate(make_feature_plate(wells=["B02"]), tmp_path / "whole.store", tiny(), crop_size=24,
                    device="cpu")


def test_objects_need_their_label_image(tmp_path):
    plate = plate_of({("A01", 0): np.zeros((1, 32, 32), np.uint16)})
    with pytest.raises(ValueError, match="has no label image 'cells' to take objects from"):
        embed_plate(plate, tmp_path / "x.store", tiny(), objects="cells", device="cpu")
    plate = make_feature_plate(wells=["A01"])
    with pytest.raises(ValueError, match="object crops of 96 px do not fit"):
        embed_plate(plate, tmp_path / "y.store", tiny(), objects="cells", device="cpu")


@pytest.mark.skipif(not (REAL_DATA / "nf1_plate2").is_dir(), reason="needs ../shared/data/real")
def test_one_token_per_nucleus_of_real_cellprofiler_masks(tmp_path):
    from plate_concepts.plates import open_plate

    nf1 = REAL_DATA / "nf1_plate2"
    plate = open_plate(nf1 / "images", platemap=nf1 / "platemap_NF1_plate2.csv")
    wells = ["D6", "D7"]
    sub = plate_of(
        {(w, 0): np.asarray(plate.image(w, 0).compute()) for w in wells},
        labels={(w, 0): {"nuclei": np.asarray(plate.field_labels(w, 0)["nuclei"].compute())} for w in wells},
        platemap=plate.platemap, channels=list(plate.channels), name="nf1",
    )
    store = embed_plate(sub, tmp_path / "nuclei.store", tiny(), objects="nuclei", object_size=64,
                        control="genotype=WT", device="cpu", batch_size=64)
    for well in wells:
        expected = object_table(np.asarray(sub.field_labels(well, 0)["nuclei"].compute()))
        rows = store.obs[store.obs["well"] == well.replace("D", "D0")]
        assert sorted(rows["object_label"]) == expected["label"].tolist()
        assert (rows["field_objects"] == len(expected)).all()
    assert store.obs.groupby("genotype")["is_control"].all().to_dict() == {"Null": False, "WT": True}


def test_the_explorer_gives_each_cell_its_own_tokens_value(tmp_path):
    """Selectivity, the activation pass and the per-cell values of the Features panel read the
    object tokens: a cell's value is its token's code; other label images use the maps."""
    from plate_concepts.analysis.activation_pass import label_columns_of
    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.dictionary.estimators import ICFL

    plate = make_feature_plate(wells=["A01", "A02", "B01", "B02"])
    store = embed_plate(plate, tmp_path / "cells.store", tiny(), objects="cells", object_size=32,
                        control="treatment=DMSO", device="cpu")
    assert sorted(label_columns_of(store)) == ["batch", "treatment"]  # object columns are no labels
    torch.manual_seed(0)
    dictionary = ICFL(n_features=4, n_rounds=1, per_round=2, steps=10, batch_size=16, device="cpu").fit(store)
    explorer = FeatureExplorer(store, dictionary, plate=plate).prepare()
    assert sorted(explorer.label_columns) == ["batch", "treatment"]
    codes = dictionary.transform(store.read()).dense()
    obs = store.obs
    for feature in range(4):
        values = explorer.cell_values(feature, "A02", 1, "cells")
        rows = obs.index[(obs["well"] == "A02") & (obs["field"] == 1)]
        expected = pd.Series(codes[rows, feature].numpy(), index=obs.loc[rows, "object_label"]).sort_index()
        assert values["label"].tolist() == [5, 6, 7, 8] and (values["area"] == 576).all()
        np.testing.assert_allclose(values["mean_activation"], expected.to_numpy(), rtol=1e-6)
    nuclei = explorer.cell_values(0, "A02", 1, "nuclei")  # not the objects: from the field map
    assert nuclei["label"].tolist() == [5, 6, 7, 8] and (nuclei["area"] < 576).all()


def _upsample_twice(image: np.ndarray) -> np.ndarray:
    """Bilinear 2x upsampling of (..., y, x), half-pixel centres, edges repeated, written out:
    output 2i takes 1/4 of input i - 1 and 3/4 of input i, output 2i + 1 3/4 of i and 1/4 of i + 1."""
    for axis in (-2, -1):
        before = np.concatenate([np.take(image, [0], axis), np.take(image, range(image.shape[axis] - 1), axis)], axis)
        after = np.concatenate([np.take(image, range(1, image.shape[axis]), axis), np.take(image, [-1], axis)], axis)
        even, odd = 0.25 * before + 0.75 * image, 0.75 * image + 0.25 * after
        image = np.stack([even, odd], axis=axis).reshape(*image.shape[:axis % image.ndim], -1,
                                                         *image.shape[axis % image.ndim + 1:])
    return image


def test_object_crops_shown_to_the_model_at_another_size(tmp_path):
    plate = make_feature_plate(wells=["A01", "A02", "B01"])
    settings = {"objects": "cells", "object_size": 32, "mask": True, "control": "treatment=DMSO", "device": "cpu"}
    store = embed_plate(plate, tmp_path / "up.store", tiny(), model_input=64, patch_tokens=True, **settings)
    assert store.provenance["objects"] == {"label_image": "cells", "mask": True, "model_input": 64}
    # The model saw 64 px (16-px pooling: a 4 x 4 grid); the crop and its index stay in field pixels.
    assert store.provenance["crop_size"] == 32 and store.patch_grid == (4, 4)
    obs = store.obs
    one = obs[(obs["well"] == "A02") & (obs["field"] == 1) & (obs["object_label"] == 6)].iloc[0]
    assert (one["crop_y"], one["crop_x"], one["crop_size"]) == (0, 32, 32)
    normalizer = IntensityNormalizer.from_record(store.provenance["plates"]["tiny"]["normalization"])
    masked = normalizer(np.asarray(plate.image("A02", 1).compute()))[:, 0:32, 32:64] * (quarter_cells(1)[0:32, 32:64] == 6)
    upsampled = _upsample_twice(masked)
    assert upsampled.shape == (2, 64, 64)
    np.testing.assert_allclose(store.read([one.name])[0, :2], upsampled.mean(axis=(1, 2)), rtol=1e-5)
    patches = store.read_patches([one.name])[0, :, :, :2].astype(np.float64)  # float16 patch grid
    np.testing.assert_allclose(patches, upsampled.reshape(2, 4, 16, 4, 16).mean(axis=(2, 4)).transpose(1, 2, 0), atol=2e-3)

    # Tokens made at another input size are not comparable: resume and append refuse, naming it.
    with pytest.raises(ValueError, match="model_input"):
        embed_plate(plate, tmp_path / "up.store", tiny(), patch_tokens=True, **settings)
    with pytest.raises(ValueError, match="model_input"):
        embed_plate(plate, tmp_path / "up.store", tiny(), model_input=48, patch_tokens=True, **settings)
    with pytest.raises(ValueError, match="goes with objects"):
        embed_plate(plate, tmp_path / "tiles.store", tiny(), model_input=64, crop_size=32, device="cpu")
    with pytest.raises(ValueError, match="model_input must be a positive whole number"):
        embed_plate(plate, tmp_path / "bad.store", tiny(), model_input=0, **settings)
