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

import hashlib
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

# Format 2 records each weight file's sha256 in config.json ("sha256": {file: hex}); format 1
# checkpoints had no hashes and are refused (re-save them with save_pretrained).
CHECKPOINT_FORMAT = 2
CONFIG_FILE = "config.json"


from defectforge.errors import CheckpointError, DefectforgeError  # noqa: E402  (re-exported: ``methods.base.CheckpointError``)


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


#: Which training rows a stage draws its batches from (``Stage.rows``).
STAGE_ROWS = ("all", "defective", "good", "balanced")


@dataclass(frozen=True)
class Stage:
    """One training stage: what it trains, on which rows, at which rate.

    * ``modules``: names from ``trainable_modules()``; only these change during the stage;
    * ``steps``: None = ``train.steps``;
    * ``rows``: ``all`` (every training row), ``defective``, ``good`` (defect-free rows; they are
      in the training data with ``data.train_on_good``), or ``balanced`` (each batch half
      defective, half good) — a mask model trains on defects only, a backbone on everything;
    * ``lr`` / ``weight_decay``: None = ``train.lr`` / ``train.weight_decay``. The loop fills them
      in before calling ``Generator.configure_optimizer``, which may add parameter groups.
    """

    name: str
    modules: tuple[str, ...]
    steps: int | None = None
    rows: str = "all"
    lr: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.rows not in STAGE_ROWS:
            raise ValueError(f"stage {self.name!r}: rows must be one of {STAGE_ROWS}, got {self.rows!r}")


def sampling_time_fields(model_cls: type) -> set[str]:
    """Names of a method config's fields marked ``json_schema_extra={"sampling_time": True}``:
    they change how a trained generator samples, never its weights (e.g. Defect-Gen's ``u``)."""
    out = set()
    for name, info in model_cls.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("sampling_time"):
            out.add(name)
    return out


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample, as ONE object every caller hands to ``Generator.sample``.

    Why one object: callers (``generate``, the evaluation actors, the pyfunc model, benchmarks)
    used to inspect each method's ``sample`` signature to decide what to pass. Now every method
    takes the same options and reads what applies to it:

    * ``sampler`` / ``steps``: the reverse process and its number of steps (None = all T);
    * ``batch_size``: the generator's own chunk size inside one call (None = all ``n`` at once);
    * ``guidance``: classifier-free guidance scales by name (methods list theirs in
      ``Generator.guidance_scales``; an unknown name is an error);
    * ``method``: values for the method config's *sampling-time* fields (Defect-Gen's ``u``),
      validated against the config model (``Generator.sampling_config``).

    A checkpoint records the options it was trained (or a sweep trial evaluated) with
    (``config.json`` "sampling"); they are the defaults of ``generate``, the evaluation and the
    registered model (``Generator.default_sampling``).
    """

    sampler: str = "ddim"
    steps: int | None = None
    batch_size: int | None = None
    guidance: dict[str, float] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from defectforge.errors import ConfigError

        if self.sampler not in ("ddpm", "ddim"):
            raise ConfigError(f"sampling.sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"sampling.{name} must be a positive integer or null, got {v!r}")
        for k, v in self.guidance.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"sampling.guidance.{k} must be a number, got {v!r}")

    def to_json(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "batch_size": self.batch_size,
                "guidance": dict(self.guidance), "method": dict(self.method)}

    @classmethod
    def from_json(cls, data: Any) -> SamplingOptions:
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        unknown = set(data) - {"sampler", "steps", "batch_size", "guidance", "method"}
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}")
        if not isinstance(data.get("guidance", {}), dict) or not isinstance(data.get("method", {}), dict):
            raise ValueError("'guidance' and 'method' must be objects")
        return cls(sampler=data.get("sampler", "ddim"), steps=data.get("steps"), batch_size=data.get("batch_size"),
                   guidance=dict(data.get("guidance", {})), method=dict(data.get("method", {})))

    @classmethod
    def from_config(cls, cfg: Any) -> SamplingOptions:
        """``cfg.sampling`` + the sampling-time fields of ``cfg.method`` (a sweep trial's ``u``)."""
        fields = sampling_time_fields(type(cfg.method))
        method = {k: v for k, v in cfg.method.model_dump(mode="json").items() if k in fields}
        return cls(sampler=cfg.sampling.sampler, steps=cfg.sampling.steps, guidance=dict(cfg.sampling.guidance),
                   method=method)

    def merged(self, sampler: str | None = None, steps: int | None = None, batch_size: int | None = None,
               guidance: dict[str, float] | None = None, method: dict[str, Any] | None = None) -> SamplingOptions:
        """These options with the given values on top (None = keep; dicts are merged key by key)."""
        return SamplingOptions(sampler=sampler or self.sampler, steps=self.steps if steps is None else steps,
                               batch_size=self.batch_size if batch_size is None else batch_size,
                               guidance={**self.guidance, **(guidance or {})}, method={**self.method, **(method or {})})


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
    #: names of the classifier-free guidance scales ``SamplingOptions.guidance`` may set
    guidance_scales: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodConfigBase, context: GeneratorContext) -> None:
        super().__init__()
        self.config = config
        self.context = context
        # The options ``sample`` uses when given none: the config's own sampling-time values until
        # a checkpoint's recorded options replace them (``load_generator``).
        self.default_sampling = SamplingOptions(method={k: v for k, v in config.model_dump(mode="json").items()
                                                        if k in sampling_time_fields(type(config))})
        self.provenance: dict[str, Any] = {}  # filled by the training loop, written by save_pretrained

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

    def configure_optimizer(self, stage: Stage, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimiser of ``stage`` over ``params`` (the trainable parameters of its modules).

        Default: AdamW at ``stage.lr`` with ``stage.weight_decay`` (both filled in by the loop),
        ``fused``: one kernel over all parameters instead of torch's default on CPU, a Python loop
        of ~6 small ops per tensor (issue 12, measured here on the laptop Defect-Gen's 420 tensors,
        3.1 M parameters: 7.5-8.5 ms per step against 30-44 ms, ~8 % of a training step). Same
        update up to float rounding; torch supports it on CPU and CUDA.
        Override for parameter groups (e.g. a new head at a higher rate than a fine-tuned body):
        every group must keep its ``lr`` as the base rate, the loop's warm-up scales it."""
        return torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay or 0.0, fused=True)

    def prepare_from_data(self, rows: list[dict[str, Any]]) -> None:
        """Hook run on every worker before the first stage with that worker's training rows.

        Default: nothing. Model-free methods (Crop-Paste) keep what they need from the rows here
        and return no stages; methods with data-derived statistics compute them here.
        """

    def begin_stage(self, stage: str) -> None:
        """Hook run on every worker when stage ``stage`` starts from its step 0 (not when a run
        resumes inside it), before its optimiser and EMA are built from the stage's parameters.

        Default: nothing. DefectSynth copies the (by then trained) backbone UNet's encoder into its
        ControlNet here, as ControlNet training starts from a copy of the frozen model."""

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
    def sample(self, n: int, conditions: Conditions, seed: int,
               options: SamplingOptions | None = None) -> GeneratedBatch:
        """``n`` pairs for ``conditions`` (len n), reproducible for (``seed``, ``options``);
        ``options`` None = ``self.default_sampling``."""

    def normal_images(self, n: int, conditions: Conditions) -> torch.Tensor:
        """``conditions.normal_image`` checked (n x H x W x 3 uint8 at the context's resolution) and
        returned as n x 3 x H x W floats in [-1, 1] on this generator's device: the defect-free
        images of the methods that generate onto them (AnomalyDiffusion, DefectSynth)."""
        if len(conditions) != n:
            raise ValueError(f"sample: {n} requested, {len(conditions)} conditions")
        if conditions.normal_image is None:
            raise ValueError(f"{self.method_name()} generates onto defect-free images: Conditions.normal_image "
                             "(N,H,W,3 uint8) is required")
        res = self.context.resolution
        normal = np.asarray(conditions.normal_image)
        if normal.dtype != np.uint8 or normal.shape != (n, res, res, 3):
            raise ValueError(f"Conditions.normal_image must be uint8 ({n},{res},{res},3), got {normal.dtype} "
                             f"{normal.shape}")
        return torch.from_numpy(normal.copy()).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1

    def pairs(self, images: torch.Tensor, masks: np.ndarray, conditions: Conditions,
              extras: dict[str, Any] | None = None) -> GeneratedBatch:
        """A ``GeneratedBatch`` from images (n x 3 x H x W in [-1, 1]) and binary masks (n x H x W):
        uint8 images, each mask carrying its condition's class id."""
        out = ((images.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        labels = np.stack([(np.asarray(masks[i]) > 0) * self.context.class_id(p, d)
                           for i, (p, d) in enumerate(zip(conditions.product, conditions.defect))]).astype(np.uint8)
        return GeneratedBatch(out, labels, list(conditions.product), list(conditions.defect), extras=extras or {})

    def sampling_config(self, options: SamplingOptions) -> MethodConfigBase:
        """This generator's config with ``options.method`` applied: only sampling-time fields may
        change (anything else would need other weights), and the config model validates the values
        (e.g. Defect-Gen's ``u`` inside its trained ``u_range``). Unknown guidance names fail too."""
        return check_sampling_fields(type(self.config), self.config.model_dump(mode="json"), options.method,
                                     options.guidance, self.guidance_scales, self.method_name())

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # --------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | Path, sampling: SamplingOptions | None = None,
                        provenance: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` + one ``<module>.safetensors`` per saved module into ``directory``.

        ``sampling`` (default ``self.default_sampling``) is recorded as the checkpoint's default
        sampling options; ``provenance`` (default ``self.provenance``: what the training loop
        knows — the full run config, a hash of the training rows' names, the run's name and MLflow
        run id) goes under ``"provenance"`` with the package version, so a checkpoint that
        travelled between machines still says where it came from."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        modules = self.saved_modules()
        hashes: dict[str, str] = {}
        for name, module in modules.items():
            state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(module).state_dict().items()}
            bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:  # never write a checkpoint that would sample garbage
                raise CheckpointError(f"{out}: module {name!r} holds non-finite weights ({', '.join(bad[:4])}); "
                                      "not saved")
            save_file(state, str(out / f"{name}.safetensors"))
            hashes[f"{name}.safetensors"] = file_sha256(out / f"{name}.safetensors")
        meta = {"format": CHECKPOINT_FORMAT, "method": self.method_name(),
                "method_config": self.config.model_dump(mode="json"), "context": self.context.to_json(),
                "modules": sorted(modules), "sha256": hashes,
                "sampling": (sampling or self.default_sampling).to_json(),
                "provenance": {"defectforge_version": _package_version(),
                               **(provenance if provenance is not None else self.provenance)}}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return out

    def load_modules(self, directory: str | Path, hashes: dict[str, str] | None = None,
                     names: list[str] | None = None) -> None:
        """Load every saved module (or only ``names``) from ``directory``; any missing/unexpected
        key is an error.

        ``hashes`` ({file name: sha256}, from ``config.json``; read there when None) is checked
        before a file is parsed, and every floating-point weight must be finite: a flipped byte, a
        truncated copy or a file overwritten with NaNs is refused naming the file, never sampled.
        """
        src = Path(directory)
        if hashes is None:
            hashes = read_checkpoint_meta(src)["sha256"]
        for name, module in self.saved_modules().items():
            if names is not None and name not in names:
                continue
            path = verified_weight_file(src, name, hashes)
            try:
                state = load_file(str(path), device=str(self.device))
            except Exception as exc:  # safetensors raises its own SafetensorError (or OSError)
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
            nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if nonfinite:
                raise CheckpointError(f"{path}: non-finite (NaN/inf) weights in {', '.join(nonfinite[:4])}"
                                      f"{' ...' if len(nonfinite) > 4 else ''}")
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


def verified_weight_file(directory: Path, module: str, hashes: dict[str, str]) -> Path:
    """``<directory>/<module>.safetensors`` once it exists and matches its sha256 in ``config.json``.

    Shared by every ``load_modules`` (methods overriding it call this too), so no method reads
    weights that changed after saving.
    """
    path = Path(directory) / f"{module}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no weights for module {module!r} ({path.name} missing)")
    expected = hashes.get(path.name)
    if expected is None:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: field 'sha256' has no hash for {path.name}")
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(f"{path}: sha256 {actual[:12]}... does not match {expected[:12]}... recorded in "
                              f"{CONFIG_FILE}: the file is corrupted, truncated or was replaced after saving")
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint, every field checked; ``CheckpointError`` naming the file and
    the field otherwise. Names in ``context`` become folder names when generating, so each must be a
    single safe path component (``defectforge.paths``)."""
    from defectforge.methods import registry
    from defectforge.paths import unsafe_reason

    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint folder not found: {directory}")
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a generator checkpoint: {CONFIG_FILE} not found "
            "(pass the directory that holds config.json and *.safetensors)"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc}); the file is truncated or not a "
                              "defectforge checkpoint config") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    fmt = meta.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > CHECKPOINT_FORMAT:
        written_by = (meta.get("provenance") or {}).get("defectforge_version", "a newer version")
        raise CheckpointError(f"{path}: checkpoint format {fmt} (written by defectforge {written_by}) is newer than "
                              f"this defectforge {_package_version()} reads (format {CHECKPOINT_FORMAT}); "
                              "upgrade defectforge to load it")
    if meta.get("format") != CHECKPOINT_FORMAT:
        hint = " (written before weight hashes were recorded; re-save it)" if meta.get("format") == 1 else ""
        raise CheckpointError(f"{path}: field 'format' is {meta.get('format')!r}, not {CHECKPOINT_FORMAT}{hint}")

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: field {field!r} {why}")

    method = meta.get("method")
    if not isinstance(method, str) or not method:
        raise bad("method", "is missing or not a method name")
    try:
        registry.get(method)  # imports that method alone when it can (registry.get)
    except KeyError:
        raise bad("method", f"names unknown method {method!r}; known: {', '.join(sorted(registry.generators()))}") \
            from None
    if not isinstance(meta.get("method_config"), dict):
        raise bad("method_config", "is missing or not an object")
    if meta["method_config"].get("name", method) != method:
        raise bad("method_config.name", f"is {meta['method_config'].get('name')!r} but field 'method' is {method!r}")
    ctx = meta.get("context")
    if not isinstance(ctx, dict):
        raise bad("context", "is missing or not an object")
    products, classes = ctx.get("products"), ctx.get("classes")
    if not isinstance(products, list) or not products:
        raise bad("context.products", "is missing or not a non-empty list")
    if not isinstance(classes, dict):
        raise bad("context.classes", "is missing or not an object")
    for p in products:
        if (why := unsafe_reason(p)) is not None:
            raise bad("context.products", f"holds product name {p!r} that {why}")
        if not isinstance(classes.get(p), list) or not classes[p]:
            raise bad(f"context.classes.{p}", "is missing or not a non-empty list of defect names")
        for d in classes[p]:
            if (why := unsafe_reason(d)) is not None:
                raise bad(f"context.classes.{p}", f"holds defect name {d!r} that {why}")
    if not isinstance(ctx.get("resolution"), int) or isinstance(ctx.get("resolution"), bool) or ctx["resolution"] < 1:
        raise bad("context.resolution", f"must be a positive integer, got {ctx.get('resolution')!r}")
    modules = meta.get("modules")
    if not isinstance(modules, list) or any(unsafe_reason(m) is not None for m in modules):
        raise bad("modules", "must be a list of module names")
    hashes = meta.get("sha256")
    if not isinstance(hashes, dict) or any(not isinstance(v, str) for v in hashes.values()):
        raise bad("sha256", "is missing or not an object {file: sha256 hex}")
    missing = [f"{m}.safetensors" for m in modules if f"{m}.safetensors" not in hashes]
    if missing:
        raise bad("sha256", f"has no hash for {', '.join(missing)}")
    if "provenance" in meta and not isinstance(meta["provenance"], dict):
        raise bad("provenance", "is not an object")
    if "sampling" in meta:  # absent in checkpoints written before sampling options were recorded
        try:
            SamplingOptions.from_json(meta["sampling"])
        except (TypeError, ValueError, DefectforgeError) as exc:
            raise bad("sampling", f"is not valid sampling options: {exc}") from None
    return meta


def _package_version() -> str:
    import defectforge

    return defectforge.__version__


def checkpoint_sampling(meta: dict[str, Any]) -> SamplingOptions:
    """The default sampling options a checkpoint records (``read_checkpoint_meta`` checked them);
    for an older checkpoint without them, its method config's sampling-time values."""
    if "sampling" in meta:
        return SamplingOptions.from_json(meta["sampling"])
    from defectforge.methods import registry

    fields = sampling_time_fields(registry.get(meta["method"]).config_class)
    return SamplingOptions(method={k: v for k, v in meta["method_config"].items() if k in fields})


def select_stages(gen: Generator, wanted: list[str] | None, init_from: str | None,
                  init_modules: list[str] | None = None) -> list[Stage]:
    """The stages a run trains (``train.stages``; None = all, in the method's order), after checking
    that every module of a stage skipped before a trained one comes from ``init_from``
    (``train.init_from``), a checkpoint of the same method. ``ConfigError`` naming the field
    otherwise. Stages after the last trained one may be skipped (trained by a later run)."""
    from defectforge.errors import ConfigError

    stages = gen.stages()
    known = [s.name for s in stages]
    if wanted is not None:
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ConfigError(f"train.stages: {gen.method_name()} has no stage {unknown[0]!r}; its stages: "
                              f"{', '.join(known) or 'none'}")
    chosen = [s for s in stages if wanted is None or s.name in wanted]
    # Stages skipped before a chosen one must be done already (a chosen stage builds on them);
    # skipped trailing stages are simply not trained yet (e.g. a sweep's pretraining run, which
    # trains only the first stage and leaves the rest to the trials).
    last = max((stages.index(s) for s in chosen), default=-1)
    skipped = [s for s in stages[:last] if s not in chosen]
    if init_from is not None:
        meta = read_checkpoint_meta(init_from)
        if meta["method"] != gen.method_name():
            raise ConfigError(f"train.init_from: {init_from} is a {meta['method']} checkpoint, not "
                              f"{gen.method_name()}")
        have = set(meta["modules"]) if init_modules is None else set(meta["modules"]) & set(init_modules)
    else:
        have = set()
    missing = sorted({m for s in skipped for m in s.modules} - have)
    if missing:
        raise ConfigError(f"train.stages skips stage(s) {', '.join(s.name for s in skipped)}; their modules "
                          f"{', '.join(missing)} must come from a checkpoint: set train.init_from to one that holds "
                          "them" + (f" ({init_from} does not)" if init_from else ""))
    return chosen


def check_checkpoint_sampling(meta: dict[str, Any], options: SamplingOptions) -> None:
    """``check_sampling_fields`` for the checkpoint ``meta`` describes (``read_checkpoint_meta``),
    without loading its weights: ``generate`` and ``evaluate`` fail here before any model load."""
    from defectforge.methods import registry

    cls = registry.get(meta["method"])
    check_sampling_fields(cls.config_class, meta["method_config"], options.method, options.guidance,
                          cls.guidance_scales, meta["method"])


def checkpoint_with_sampling(src: str | Path, dst: str | Path, sampling: SamplingOptions) -> Path:
    """``dst``: the checkpoint ``src`` with ``sampling`` as its recorded options.

    Why: trials of a sweep that share one trained generator (train once, sweep many) differ in how
    they sample (``u``, steps); each trial's checkpoint must carry its own options, so ``generate``
    and the registered model sample the winning trial as it was evaluated. Weight files are
    hard-linked when the filesystem allows (no copy of the weights), else copied; their hashes are
    unchanged and still checked at load. ``dst`` is replaced whole.
    """
    import os
    import shutil

    src, dst = Path(src), Path(dst)
    meta = read_checkpoint_meta(src)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == CONFIG_FILE or not f.is_file():
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    (dst / CONFIG_FILE).write_text(json.dumps({**meta, "sampling": sampling.to_json()}, indent=2, sort_keys=True))
    return dst


def check_sampling_fields(config_class: type, config: dict[str, Any], method: dict[str, Any],
                          guidance: dict[str, float] | None = None, guidance_scales: tuple[str, ...] = (),
                          method_name: str = "method") -> Any:
    """``config_class`` validated with ``method`` on top of ``config``; ``ConfigError`` naming the
    field when a key is not a sampling-time field or a value is invalid, or a guidance scale is
    unknown. Used before any model is loaded (``generate``) and inside ``sample``."""
    from pydantic import ValidationError

    from defectforge.errors import ConfigError

    allowed = sampling_time_fields(config_class)
    wrong = sorted(set(method) - allowed)
    if wrong:
        raise ConfigError(f"method.{wrong[0]} is not a sampling-time field of {method_name} (those change the "
                          f"trained weights; retrain instead); sampling-time fields: "
                          f"{', '.join('method.' + f for f in sorted(allowed)) or 'none'}")
    unknown = sorted(set(guidance or {}) - set(guidance_scales))
    if unknown:
        raise ConfigError(f"sampling.guidance.{unknown[0]}: {method_name} has "
                          + (f"the guidance scales {', '.join(guidance_scales)}" if guidance_scales
                             else "no guidance scales"))
    try:
        return config_class.model_validate({**config, **method})
    except ValidationError as exc:
        raise ConfigError(f"invalid sampling option: {_first_error(exc)}") from None


def build_generator(config: MethodConfigBase, context: GeneratorContext) -> Generator:
    from defectforge.methods import registry

    return registry.get(config.name)(config, context)


def load_generator(directory: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Load a checkpoint written by ``save_pretrained`` without any training code or pickles.

    Its recorded sampling options become ``default_sampling``; callers change them per call with
    ``SamplingOptions`` (sampling-time method fields such as Defect-Gen's ``u`` included).
    """
    from pydantic import ValidationError

    from defectforge.methods import registry

    meta = read_checkpoint_meta(directory)
    cls = registry.get(meta["method"])
    try:  # a problem in the checkpoint's own config is the checkpoint's, not the user's
        config = cls.config_class.model_validate(dict(meta["method_config"]))
    except ValidationError as exc:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: field 'method_config' is not a valid "
                              f"{meta['method']} config: {_first_error(exc)}") from None
    try:
        gen = cls(config, GeneratorContext.from_json(meta["context"])).to(device)
    except (ValueError, KeyError, TypeError) as exc:  # e.g. a context the method cannot build
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: cannot build {meta['method']} from it: "
                              f"{exc}") from None
    gen.load_modules(directory, meta["sha256"])
    gen.default_sampling = checkpoint_sampling(meta)
    gen.eval()
    return gen


def _first_error(exc: Any, prefix: str = "method") -> str:
    """The first pydantic error as ``method.<field>: <message>`` (more errors counted)."""
    import re

    errs = exc.errors()
    if not errs:
        return str(exc)
    e = errs[0]
    loc, msg = ".".join(str(p) for p in e["loc"]), e["msg"]
    named = re.match(r"Value error, field '([^']+)': (.*)", msg, re.S)
    if named:
        loc, msg = ".".join(p for p in (loc, named.group(1)) if p), named.group(2)
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{prefix}.{loc}: {msg}{more}" if loc else f"{prefix}: {msg}{more}"


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (weights are saved without the ``module.`` prefix)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
