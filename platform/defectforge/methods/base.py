"""The generator protocol every method implements, and the checkpoint format they share.

Why a protocol and not a training script per method: ``train/``, ``sweep/`` and ``evaluate/``
know nothing of any one method. They build a generator from its config, train its *stages* in
order, call ``training_step`` for losses and ``sample`` for image + mask pairs, and save/load it
with ``save_pretrained`` / ``from_pretrained``. What differs between the four papers fits here:

* several trainable parts trained together or in sequence (Defect-Gen's two UNets; a mask model
  then an image model) -> ``stages()``;
* frozen pretrained backbones beside small trainable parts -> only ``saved_modules()`` are written
  to a checkpoint; frozen parts are rebuilt from the path named in the method's config;
* label or text conditions -> ``Conditions`` carries product and defect *names*; a method maps
  them to embeddings or prompts itself;
* masks that are given or generated, normal images to blend onto -> ``requires_masks`` /
  ``requires_normal_images`` tell the caller what to put into ``Conditions``.

This module is pure torch: no Ray, no MLflow.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from defectforge.config import MethodConfigBase

CHECKPOINT_FORMAT = 1
CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or does not match its model."""


@dataclass(frozen=True)
class GeneratorContext:
    """What a generator must know of the data it models, recorded in every checkpoint.

    ``classes[product]`` is the product's defect types in class-id order: mask value i (1-based)
    is ``classes[product][i - 1]``; 0 is background. ``products`` fixes the product-id order.
    ``image_channels`` is 1 when every training image is grayscale (stored as three equal
    channels, DESIGN.md's sample contract) and 3 otherwise: a method may model grayscale data as
    one channel instead of spending capacity on keeping three copies equal.
    """

    products: tuple[str, ...]
    classes: dict[str, tuple[str, ...]]
    resolution: int
    image_channels: int = 3

    @property
    def all_defects(self) -> tuple[str, ...]:
        """Sorted union of every product's defect types (for product-independent conditions)."""
        return tuple(sorted({d for p in self.products for d in self.classes[p]}))

    @property
    def max_classes(self) -> int:
        return max(len(self.classes[p]) for p in self.products)

    def class_id(self, product: str, defect: str) -> int:
        try:
            return self.classes[product].index(defect) + 1
        except (KeyError, ValueError):
            known = ", ".join(f"{p}: {list(self.classes[p])}" for p in self.products)
            raise KeyError(f"unknown product/defect {product!r}/{defect!r}; this generator knows {known}") from None

    def to_json(self) -> dict[str, Any]:
        return {"products": list(self.products), "classes": {k: list(v) for k, v in self.classes.items()},
                "resolution": self.resolution, "image_channels": self.image_channels}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GeneratorContext:
        return cls(products=tuple(data["products"]),
                   classes={k: tuple(v) for k, v in data["classes"].items()},
                   resolution=int(data["resolution"]), image_channels=int(data.get("image_channels", 3)))


@dataclass(frozen=True)
class Stage:
    """One training stage: which modules it trains, for how many steps (None = ``train.steps``)."""

    name: str
    modules: tuple[str, ...]
    steps: int | None = None


@dataclass
class Conditions:
    """What to generate, one entry per sample.

    ``mask`` (N,H,W uint8 class ids) is filled by the caller when the method ``requires_masks``;
    ``normal_image`` (N,H,W,3 uint8) when it ``requires_normal_images``.
    """

    product: list[str]
    defect: list[str]
    mask: np.ndarray | None = None
    normal_image: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.product) != len(self.defect):
            raise ValueError("Conditions: product and defect lists differ in length")

    def __len__(self) -> int:
        return len(self.product)

    def slice(self, start: int, stop: int) -> Conditions:
        return Conditions(self.product[start:stop], self.defect[start:stop],
                          None if self.mask is None else self.mask[start:stop],
                          None if self.normal_image is None else self.normal_image[start:stop])


@dataclass
class GeneratedBatch:
    """Generated pairs: ``images`` N,H,W,3 uint8; ``masks`` N,H,W uint8 class ids (product-local)."""

    images: np.ndarray
    masks: np.ndarray
    product: list[str]
    defect: list[str]
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.product)


class Generator(nn.Module, ABC):
    """Base class of every method. Subclasses set ``config_class`` and decorate with ``@register``.

    ``forward(batch, stage)`` is ``training_step`` so that a DDP wrapper around the generator
    synchronises gradients of whatever the step touches.
    """

    config_class: ClassVar[type[MethodConfigBase]]
    requires_masks: ClassVar[bool] = False
    requires_normal_images: ClassVar[bool] = False
    trainable: ClassVar[bool] = True

    def __init__(self, config: MethodConfigBase, context: GeneratorContext) -> None:
        super().__init__()
        self.config = config
        self.context = context

    @classmethod
    def method_name(cls) -> str:
        return cls.config_class.model_fields["name"].default

    # ----------------------------------------------------------------- what trains, and how
    @abstractmethod
    def stages(self) -> list[Stage]:
        """Training stages in order; each names modules from ``trainable_modules()``."""

    @abstractmethod
    def trainable_modules(self) -> dict[str, nn.Module]:
        """Every module some stage trains, by name."""

    def prepare_from_data(self, rows: list[dict[str, Any]]) -> None:
        """Hook run on every worker before the first stage with that worker's training rows.

        Default: nothing. Model-free methods (Crop-Paste) keep what they need from the rows here
        and return no stages; methods with data-derived statistics compute them here.
        """

    def saved_modules(self) -> dict[str, nn.Module]:
        """Modules written to a checkpoint. Default: the trainable ones."""
        return self.trainable_modules()

    @abstractmethod
    def training_step(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """Named losses for one batch; ``"loss"`` is the one back-propagated.

        ``batch``: ``image`` B,3,H,W float in [-1, 1]; ``mask`` B,H,W long class ids;
        ``product`` B long (index into ``context.products``); ``defect`` B long (class id of the
        sample's labelled defect type, 0 for defect-free).
        """

    def forward(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        return self.training_step(batch, stage)

    # --------------------------------------------------------------------------- generation
    @abstractmethod
    def sample(self, n: int, conditions: Conditions, seed: int) -> GeneratedBatch:
        """``n`` pairs for ``conditions`` (len n), reproducible for ``seed``."""

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # --------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + one ``<module>.safetensors`` per saved module into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        modules = self.saved_modules()
        for name, module in modules.items():
            state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(module).state_dict().items()}
            save_file(state, str(out / f"{name}.safetensors"))
        meta = {"format": CHECKPOINT_FORMAT, "method": self.method_name(),
                "method_config": self.config.model_dump(mode="json"), "context": self.context.to_json(),
                "modules": sorted(modules)}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return out

    def load_modules(self, directory: str | Path) -> None:
        """Load every saved module from ``directory``; any missing/unexpected key is an error."""
        src = Path(directory)
        for name, module in self.saved_modules().items():
            path = src / f"{name}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"checkpoint {src} has no weights for module {name!r} ({path.name} missing)")
            state = load_file(str(path), device=str(self.device))
            target = _unwrap(module)
            expected = set(target.state_dict())
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            if missing or unexpected:
                raise CheckpointError(
                    f"{path}: weights do not match module {name!r}: "
                    f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                    f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
                )
            try:
                target.load_state_dict(state, strict=True)
            except RuntimeError as exc:  # shape mismatch
                raise CheckpointError(f"{path}: {exc}") from None


def read_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a generator checkpoint: {CONFIG_FILE} not found "
            "(pass the directory that holds config.json and *.safetensors)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r} is not {CHECKPOINT_FORMAT}")
    return meta


def build_generator(config: MethodConfigBase, context: GeneratorContext) -> Generator:
    from defectforge.methods import registry

    return registry.get(config.name)(config, context)


def load_generator(directory: str | Path, device: str | torch.device = "cpu",
                   method_overrides: dict[str, Any] | None = None) -> Generator:
    """Load a checkpoint written by ``save_pretrained`` without any training code or pickles.

    ``method_overrides`` changes sampling-time fields (e.g. Defect-Gen's switch timestep ``u``).
    """
    from defectforge.methods import registry

    meta = read_checkpoint_meta(directory)
    cls = registry.get(meta["method"])
    cfg_dict = dict(meta["method_config"])
    cfg_dict.update(method_overrides or {})
    config = cls.config_class.model_validate(cfg_dict)
    gen = cls(config, GeneratorContext.from_json(meta["context"])).to(device)
    gen.load_modules(directory)
    gen.eval()
    return gen


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (weights are saved without the ``module.`` prefix)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
