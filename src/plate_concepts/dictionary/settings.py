"""Fit settings: one dataclass per method, each field documented once.

The estimators take these fields as their parameters, the command line builds its options from
them (:func:`plate_concepts.cli.dictionary` via :func:`setting_fields`) and the Dictionary panel
its widgets, so each default lives here once — a model hyper-parameter's default lives in the
model class's signature and is read from it.

``None`` for ``n_features``, ``steps``, ``batch_size`` and ``log_every`` means "from the data's
size" (:meth:`FitSettings.resolved`): the big-data defaults (8192 features, 4096 tokens per step,
2000 steps), capped on a small store so that the fit is not degenerate.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self

from plate_concepts._device import DEVICE_HELP
from plate_concepts.dictionary.base import DictionaryModule
from plate_concepts.dictionary.icfl import ICFLModule
from plate_concepts.dictionary.topk import TopKModule
from plate_concepts.dictionary.whitening import METHODS as WHITEN_METHODS
from plate_concepts.dictionary.whitening import SHRINKAGE_ESTIMATES

#: Sizes for a store with plenty of tokens.
FULL_FEATURES, FULL_BATCH, FULL_STEPS = 8192, 4096, 2000
#: On a small store: a feature per this many tokens, a batch of this fraction of the tokens,
#: and about this many passes over the tokens (the demo's hand-tuned settings follow this rule).
TOKENS_PER_FEATURE, BATCHES_PER_PASS, PASSES = 8, 3, 200
MIN_AUTO_FEATURES = 64
#: Groups of settings, in the order the command line and the panel show them.
GROUPS = ("dictionary", "whitening", "training", "checkpoint")


@dataclass(frozen=True)
class SettingInfo:
    """How a setting is documented, parsed and shown."""

    doc: str
    group: str
    flag: str | None = None  # command-line option (default: --field-name)
    label: str | None = None  # panel label (default: the field name in words)
    parse: Callable[[str], Any] | None = None  # text -> value (default: from the type)
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    advanced: bool = False  # left out of the panel (command line and Python only)
    auto: str | None = None  # what None means, for help texts


def setting(default: Any, doc: str, group: str, **info: Any) -> Any:
    """A dataclass field with its documentation (see :class:`SettingInfo`)."""
    return field(default=default, metadata={"setting": SettingInfo(doc, group, **info)})


def setting_info(f: dataclasses.Field) -> SettingInfo:
    return f.metadata["setting"]


def setting_fields(cls: type) -> list[dataclasses.Field]:
    """The settings of ``cls`` in display order (by group, then as declared)."""
    return sorted(fields(cls), key=lambda f: GROUPS.index(setting_info(f).group))


def setting_help(f: dataclasses.Field) -> str:
    """A setting's documentation with its default, for help texts and tooltips."""
    info = setting_info(f)
    if info.auto is not None:
        default = info.auto
    elif f.default is None:
        default = "none"
    elif isinstance(f.default, bool):
        default = str(f.default).lower()
    else:
        default = f"{f.default:g}" if isinstance(f.default, float) else str(f.default)
    return f"{info.doc} (default: {default})"


def model_default(module_class: type[DictionaryModule], name: str) -> Any:
    """A model hyper-parameter's default, read from the model class (its one definition)."""
    return inspect.signature(module_class.__init__).parameters[name].default


def parse_shrinkage(text: str | float | None) -> float | str | None:
    """"none", "auto", "ledoit-wolf", "oas" or a number in [0, 1] (command line and panel text)."""
    if text is None or isinstance(text, float | int):
        return None if text is None else float(text)
    text = text.strip().lower()
    if text == "none":
        return None
    if text in SHRINKAGE_ESTIMATES:
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"shrinkage must be none, {', '.join(SHRINKAGE_ESTIMATES)} or a number in [0, 1], got {text!r}"
        ) from None


def parse_value(f: dataclasses.Field, text: str) -> Any:
    """A setting from text (command line, panel): its parser, or its type's."""
    info = setting_info(f)
    if info.parse is not None:
        value = info.parse(text)
    else:
        kind = value_type(f)
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{f.name} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    _check(f, value)  # said where it was typed (--batch-size 0), not when the fit starts
    return value


def value_type(f: dataclasses.Field) -> type:
    """int, float, bool or str, from the field's annotation."""
    annotation = str(f.type)
    for kind in (bool, int, float):
        if annotation.startswith(kind.__name__):
            return kind
    return str


def sparsity_split(sparsity: int) -> tuple[int, int]:
    """ICFL's rounds ``J`` and features per round ``L`` with ``J x L = sparsity``: ``J`` the
    largest divisor of ``sparsity`` not above its square root."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Integral) or sparsity < 1:
        raise ValueError(f"the sparsity S must be a positive whole number of features, got {sparsity!r}")
    rounds = max(d for d in range(1, math.isqrt(int(sparsity)) + 1) if sparsity % d == 0)
    return rounds, int(sparsity) // rounds


def pow2_floor(n: float) -> int:
    return 1 << max(int(n), 1).bit_length() - 1


@dataclass
class FitSettings:
    """What every dictionary fit needs: the dictionary size, the whitening, the training loop
    and its checkpoints. Subclasses add their model's hyper-parameters."""

    method: ClassVar[str] = ""

    n_features: int | None = setting(
        None, "Dictionary size M (number of features).", "dictionary", flag="--features",
        label="features (M)", minimum=1,
        auto=f"{FULL_FEATURES}, on a small store one per {TOKENS_PER_FEATURE} tokens "
             f"(a power of two, at least {MIN_AUTO_FEATURES})",
    )
    whiten: str = setting(
        "pca", "Pre-processing fitted on the controls: 'pca' (control-centred PCA whitening), "
        "'pca-batch' (then each batch centred and scaled on its own controls) or 'none' (centring "
        "on the controls only); unit norm follows in every case.", "whitening", label="whitening",
        choices=WHITEN_METHODS,
    )
    shrinkage: float | str | None = setting(
        "auto", "Control covariance: 'auto' (exact with at least 10 control tokens per dimension, "
        "else Ledoit-Wolf shrinkage, which keeps every dimension), 'ledoit-wolf', 'oas', a "
        "shrinkage weight in [0, 1], or none (exact, as published: with fewer controls than "
        "dimensions the directions no control varies along are dropped).", "whitening",
        parse=parse_shrinkage,
    )
    eps: float = setting(
        1e-6, "Whitening ridge, relative to the largest control eigenvalue.", "whitening",
        minimum=0, advanced=True,
    )
    max_control_tokens: int = setting(
        50_000, "Fit the whitening on at most this many control tokens (a seeded random subset), so "
        "memory stays bounded (about 1 GB at d = 1024).", "whitening", minimum=2, advanced=True,
    )
    steps: int | None = setting(
        None, "Optimiser steps in total (a resumed fit continues up to this number).", "training",
        minimum=0, auto=f"{FULL_STEPS}, fewer on a small store (about {PASSES} passes over its tokens)",
    )
    batch_size: int | None = setting(
        None, "Tokens per step (and per rank).", "training", label="batch size", minimum=1,
        auto=f"{FULL_BATCH}, on a small store 1/{BATCHES_PER_PASS} of its tokens (a power of two)",
    )
    lr: float | None = setting(
        None, "Adam learning rate.", "training", label="learning rate", minimum=0,
        auto=f"the method's: ICFL {ICFLModule.lr_rule}; TopK {TopKModule.lr_rule}",
    )
    warmup_steps: int | None = setting(
        None, "Linear learning-rate warm-up from ~0.", "training", minimum=0, advanced=True,
        auto="5% of the steps, at most 1000",
    )
    seed: int = setting(
        0, "Seeds the initialisation, the control subset, the data order and the feature redraws.",
        "training", minimum=0,
    )
    device: str = setting("auto", f"Torch device: {DEVICE_HELP}.", "training")
    autocast_bf16: bool = setting(
        False, "Compute the loss under bfloat16 autocast (CUDA only).", "training", flag="--bf16",
        advanced=True,
    )
    log_every: int | None = setting(
        None, "Steps between progress reports.", "training", minimum=1, advanced=True,
        auto="a hundredth of the steps, at most 50",
    )
    checkpoint_minutes: float = setting(
        2.0, "Write a resumable checkpoint after at most this many minutes of training (0: only when "
        "cancelled), so a long fit that is interrupted or killed resumes where it was.",
        "checkpoint", minimum=0, advanced=True,
    )
    checkpoint_every: int = setting(
        0, "Also write a checkpoint every this many steps (0: by time only).", "checkpoint",
        minimum=0, advanced=True,
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            _check(f, getattr(self, f.name))

    @classmethod
    def model_fields(cls) -> list[str]:
        """The fields that are the model's hyper-parameters (passed to its constructor)."""
        common = {f.name for f in fields(FitSettings)}
        return [f.name for f in fields(cls) if f.name not in common]

    def resolved(self, n_tokens: int) -> Self:
        """A copy with every "from the data" (None) size chosen for ``n_tokens`` tokens."""
        batch = self.batch_size or min(FULL_BATCH, pow2_floor(n_tokens / BATCHES_PER_PASS))
        steps = self.steps if self.steps is not None else min(
            FULL_STEPS, math.ceil(PASSES * n_tokens / batch)
        )
        features = self.n_features or min(
            n_tokens, max(MIN_AUTO_FEATURES, min(FULL_FEATURES, pow2_floor(n_tokens / TOKENS_PER_FEATURE)))
        )
        log_every = self.log_every or max(1, min(50, steps // 100))
        return dataclasses.replace(self, n_features=features, batch_size=batch, steps=steps, log_every=log_every)

    def size_note(self, n_tokens: int) -> str | None:
        """One line saying which automatic sizes a small store capped (None if none)."""
        done = self.resolved(n_tokens)
        chosen = [
            (self.n_features, done.n_features, FULL_FEATURES, "features", "--features"),
            (self.batch_size, done.batch_size, FULL_BATCH, "tokens per step", "--batch-size"),
            (self.steps, done.steps, FULL_STEPS, "steps", "--steps"),
        ]
        capped = [(value, name, flag) for given, value, full, name, flag in chosen if given is None and value != full]
        if not capped:
            return None
        using = ", ".join(f"{value:,} {name}" for value, name, _ in capped)
        flags = ", ".join(flag for _, _, flag in capped)
        return f"small store ({n_tokens:,} tokens): using {using} ({flags} to choose)"

    def model_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields()}

    @classmethod
    def at_sparsity(cls, sparsity: int) -> dict[str, int]:
        """The model settings that code each token with ``sparsity`` features (a comparison
        at matched sparsity)."""
        raise NotImplementedError(f"{cls.__name__} does not say how to reach a sparsity")


@dataclass
class ICFLSettings(FitSettings):
    """ICFL: iterative codebook feature learning (method.md, "ICFL")."""

    method: ClassVar[str] = ICFLModule.method

    n_rounds: int = setting(
        model_default(ICFLModule, "n_rounds"), "ICFL: pursuit rounds J.", "dictionary",
        flag="--rounds", label="rounds (J)", minimum=1,
    )
    per_round: int = setting(
        model_default(ICFLModule, "per_round"),
        "ICFL: features picked per round L (at most J x L non-zeros per token).", "dictionary",
        flag="--per-round", label="per round (L)", minimum=1,
    )
    resample_every: int = setting(
        model_default(ICFLModule, "resample_every"),
        "ICFL: every this many steps, redraw one of each pair of near-duplicate features (0: never).",
        "dictionary", minimum=0, advanced=True,
    )
    resample_threshold: float = setting(
        model_default(ICFLModule, "resample_threshold"),
        "ICFL: the cosine above which two features are near-duplicates.", "dictionary",
        advanced=True,
    )
    use_gram: bool = setting(
        model_default(ICFLModule, "use_gram"),
        "ICFL: encode with the Gram-matrix pursuit (faster, same codes).", "dictionary",
        advanced=True,
    )

    @classmethod
    def at_sparsity(cls, sparsity: int) -> dict[str, int]:
        """J x L = ``sparsity`` (:func:`sparsity_split`)."""
        n_rounds, per_round = sparsity_split(sparsity)
        return {"n_rounds": n_rounds, "per_round": per_round}


@dataclass
class TopKSettings(FitSettings):
    """TopK sparse autoencoder with AuxK loss (method.md, "TopK")."""

    method: ClassVar[str] = TopKModule.method

    k: int = setting(
        model_default(TopKModule, "k"), "TopK: active features per token.", "dictionary",
        label="active features (k)", minimum=1,
    )
    k_aux: int | None = setting(
        model_default(TopKModule, "k_aux"), "TopK: dead features that reconstruct the residual "
        "in the AuxK loss.", "dictionary", minimum=1, advanced=True, auto="half the dimension",
    )
    aux_weight: float = setting(
        model_default(TopKModule, "aux_weight"), "TopK: weight of the AuxK loss.", "dictionary",
        minimum=0, advanced=True,
    )
    dead_window_tokens: int = setting(
        model_default(TopKModule, "dead_window_tokens"),
        "TopK: a feature is dead (and trained by AuxK) once silent for this many tokens.",
        "dictionary", minimum=1, advanced=True,
    )

    @classmethod
    def at_sparsity(cls, sparsity: int) -> dict[str, int]:
        """k = ``sparsity``."""
        sparsity_split(sparsity)  # the same check as ICFL's
        return {"k": int(sparsity)}


def _check(f: dataclasses.Field, value: Any) -> None:
    """One readable error for a bad setting value."""
    info = setting_info(f)
    if value is None:
        if info.auto is None and f.default is not None and f.name != "shrinkage":  # None: exact
            raise ValueError(f"{f.name} must be set, got None")
        return
    if f.name == "shrinkage":
        parsed = parse_shrinkage(value) if isinstance(value, str) else float(value)
        if isinstance(parsed, float) and not 0.0 <= parsed <= 1.0:
            raise ValueError(
                f"shrinkage must be none, {', '.join(SHRINKAGE_ESTIMATES)} or a number in [0, 1], got {value!r}"
            )
        return
    kind = value_type(f)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{f.name} must be True or False, got {value!r}")
        return
    if kind is str:
        if not isinstance(value, str) or (info.choices is not None and value not in info.choices):
            expected = f"one of {list(info.choices)}" if info.choices else "text"
            raise ValueError(f"{f.name} must be {expected}, got {value!r}")
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise ValueError(f"{f.name} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)):
        raise ValueError(f"{f.name} must be a finite number, got {value!r}")
    if f.name == "lr" and not value > 0:
        raise ValueError(f"lr must be a positive number (or None for the method's default), got {value!r}")
    if info.minimum is not None and value < info.minimum:
        raise ValueError(f"{f.name} must be >= {info.minimum:g}, got {value!r}")
