"""A user's ViT in the whole path: weights from a file on disk, the stains handed to it as RGB
images one by one (DINOv2-style) or tokenised per stain (a channel-wise microscopy ViT), then
embed -> fit -> browse, on a small randomly initialised ViT and a plate with a planted change."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import plate_of, quarter_cells
from safetensors.torch import save_file

from plate_concepts.embeddings.embedders import ModuleEmbedder, load_embedder, output_shape

VIT_SOURCE = textwrap.dedent(
    '''
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    WEIGHTS = Path(__file__).with_name("vit_weights.safetensors")


    class ViT(torch.nn.Module):
        """8-px patches, a CLS token, ``registers`` register tokens, one transformer layer.
        ``channelwise``: each stain is tokenised on its own (shared 1-channel patch embedding
        plus a per-stain embedding), giving P + C x N tokens, stain by stain."""

        def __init__(self, in_chans=3, dim=16, grid=4, registers=0, channelwise=False, stains=2):
            super().__init__()
            self.channelwise = channelwise
            self.patches = torch.nn.Conv2d(1 if channelwise else in_chans, dim, 8, stride=8)
            self.position = torch.nn.Parameter(torch.randn(1, grid * grid, dim) * 0.1)
            self.stain = torch.nn.Parameter(torch.randn(1, stains, 1, dim) * 0.1)
            self.prefix = torch.nn.Parameter(torch.randn(1, 1 + registers, dim))
            self.layer = torch.nn.TransformerEncoderLayer(dim, 4, 32, dropout=0.0, batch_first=True)

        def forward(self, x):
            b, c = x.shape[:2]
            if self.channelwise:
                tokens = self.patches(x.reshape(b * c, 1, *x.shape[2:])).flatten(2).transpose(1, 2)
                tokens = (tokens + self.position).reshape(b, c, -1, tokens.shape[-1]) + self.stain[:, :c]
                tokens = tokens.flatten(1, 2)
            else:
                tokens = self.patches(x).flatten(2).transpose(1, 2) + self.position
            return self.layer(torch.cat([self.prefix.expand(b, -1, -1), tokens], dim=1))


    def rgb():
        """A DINOv2-style RGB model with 4 register tokens, its weights read from disk."""
        model = ViT(registers=4)
        model.load_state_dict(load_file(WEIGHTS.with_name("rgb.safetensors")))
        return model


    def channelwise():
        model = ViT(channelwise=True)
        model.load_state_dict(load_file(WEIGHTS.with_name("channelwise.safetensors")))
        return model
    '''
)


@pytest.fixture
def vit(tmp_path, monkeypatch) -> str:
    """The module name of the ViTs, with randomly initialised weights saved beside it."""
    (tmp_path / "user_vit.py").write_text(VIT_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("user_vit")
    module = importlib.reload(module)  # this test's tmp_path
    torch.manual_seed(0)
    save_file(module.ViT(registers=4).state_dict(), str(tmp_path / "rgb.safetensors"))
    save_file(module.ViT(channelwise=True).state_dict(), str(tmp_path / "channelwise.safetensors"))
    return "user_vit"


RGB = "module:user_vit:rgb?channels=grey-rgb&reduce=concat&normalize=imagenet&prefix=5"
CHANNELWISE = "module:user_vit:channelwise?channels=tokens&reduce=concat&prefix=1"


def test_each_stain_reaches_the_model_as_the_guide_says(vit):
    import importlib

    crops = torch.rand(3, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    module = importlib.import_module(vit)
    rgb, channelwise = module.rgb().eval(), module.channelwise().eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        per_stain = [rgb((crops[:, [c]].expand(-1, 3, -1, -1) - mean) / std)[:, 5:] for c in range(2)]
        expected = torch.cat([t.reshape(3, 4, 4, 16) for t in per_stain], dim=-1)  # stain 0, then 1
        tokens = channelwise(crops)[:, 1:].reshape(3, 2, 4, 4, 16)

    embedder = load_embedder(RGB)
    assert isinstance(embedder, ModuleEmbedder) and embedder.name == RGB
    assert output_shape(embedder, 2, 32) == (4, 4, 32)
    torch.testing.assert_close(embedder(crops), expected, rtol=1e-5, atol=1e-5)
    mean_of_stains = load_embedder(RGB.replace("reduce=concat", "reduce=mean"))(crops)
    torch.testing.assert_close(mean_of_stains, (expected[..., :16] + expected[..., 16:]) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load_embedder(CHANNELWISE)(crops), tokens.permute(0, 2, 3, 1, 4).flatten(3))
    assert embedder.describe()["channels"] == "grey-rgb"

    with pytest.raises(ValueError, match="normalize='imagenet' is for 3-channel"):
        load_embedder("module:user_vit:channelwise?channels=native&normalize=imagenet")(crops)
    with pytest.raises(ValueError, match="after 1 prefix token"):  # 4 registers not declared
        load_embedder("module:user_vit:rgb?channels=tokens")(crops[:, :1].expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="unknown option 'stains'"):
        load_embedder("module:user_vit:rgb?stains=2")
    with pytest.raises(ValueError, match="channels must be one of"):
        load_embedder("module:user_vit:rgb?channels=rgb")


def planted_plate():
    """Six wells of two 64-px fields with four cells each (``cells``); in the drug wells
    (A02, B02) every cell's Mito stain is three times as bright."""
    rng = np.random.default_rng(0)
    wells = ["A01", "A02", "A03", "B01", "B02", "B03"]
    images, labels = {}, {}
    for well in wells:
        for field in range(2):
            cells = quarter_cells(field)
            image = rng.integers(100, 200, size=(2, 64, 64)).astype(np.uint16)
            image[0][cells > 0] += 800
            image[1][cells > 0] += 1500 if well in ("A02", "B02") else 500
            images[(well, field)] = image
            labels[(well, field)] = {"cells": cells}
    platemap = pd.DataFrame({"treatment": ["drug" if w in ("A02", "B02") else "DMSO" for w in wells]},
                            index=pd.Index(wells, name="well"))
    return plate_of(images, labels=labels, platemap=platemap, channels=["DNA", "Mito"])


@pytest.mark.parametrize("spec", [RGB, CHANNELWISE], ids=["grey-rgb", "channelwise"])
def test_user_vit_embed_fit_browse(vit, spec, tmp_path):
    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.dictionary.estimators import ICFL
    from plate_concepts.embeddings.embed import embed_plate

    torch.set_num_threads(1)
    plate = planted_plate()
    store = embed_plate(plate, tmp_path / "vit.store", spec, crop_size=32, patch_tokens=True,
                        control="treatment=DMSO", device="cpu")
    assert store.dim == 32 and store.patch_grid == (4, 4) and len(store) == 48
    assert store.provenance["model"] == spec and store.provenance["embedder"]["channels"] in ("grey-rgb", "tokens")

    torch.manual_seed(0)
    dictionary = ICFL(n_features=8, n_rounds=1, per_round=2, steps=150, batch_size=16, device="cpu").fit(store)
    assert dictionary.whitening_.covariance_ == "ledoit-wolf"  # 32 controls in 32 dimensions
    explorer = FeatureExplorer(store, dictionary, plate=plate, label_column="treatment").prepare()
    selectivity = explorer.selectivity("treatment")
    drug = list(selectivity.values).index("drug")
    feature = int(np.argmax(selectivity.maximum[drug]))
    assert selectivity.maximum[drug, feature] >= 0.5  # the planted change is found
    # Browsing: that feature's per-cell values are higher in the drug wells' cells.
    values = {well: explorer.cell_values(feature, well, 0, "cells")["mean_activation"].to_numpy()
              for well in plate.wells}
    assert all(len(v) == 4 for v in values.values())
    treated = np.concatenate([values["A02"], values["B02"]])
    untreated = np.concatenate([values[w] for w in ("A01", "A03", "B01", "B03")])
    assert treated.mean() > untreated.mean()
