"""Run configuration: pydantic models, named presets, YAML files and dotted ``key=value`` overrides.

Why one module: every command and job resolves its configuration the same way, in this order,
each layer refining the one before::

    defaults  ->  preset (tiny | laptop | paper)  ->  YAML file  ->  dotted overrides  ->  validation

Validation happens before any Ray or model work, so a bad value fails in a second or two with the
field's dotted path (and the file it came from) in the message.

The ``method`` section is a discriminated union on ``method.name``. Its branches are not listed
here: each generator's file in ``methods/`` defines its own config class and registers it, so that
adding a method touches one new file (see ``methods/base.py``).
"""

from __future__ import annotations

import copy
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

# tiny: seconds-scale tests (wiring, not quality); laptop: meaningful output on 2 CPUs within
# minutes; paper: the papers' sizes, for GPUs.
PRESETS = ("tiny", "laptop", "paper")


from defectforge.errors import ConfigError  # noqa: E402  (re-exported: ``config.ConfigError``)


def _absolute(value: str | None) -> str | None:
    """A local path made absolute where the configuration is validated (the driver's working folder).

    Why: Ray Tune starts each trial in its own working folder (``RAY_CHDIR_TO_TRIAL_DIR``), and Ray
    workers on other nodes start elsewhere, so a relative path the user typed (``--data data/synth``)
    named a folder that did not exist there and every trial of a sweep failed. The logged
    configuration then also names the folder unambiguously. Idempotent: an absolute path is kept.
    """
    return None if value is None else str(Path(value).expanduser().absolute())


# A file or folder on this machine, given in any form and stored absolute (see ``_absolute``).
LocalPath = Annotated[str | None, AfterValidator(_absolute)]


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_accepts_bool(a) for a in typing.get_args(annotation))


class _Strict(BaseModel):
    # Unknown keys are typos until proven otherwise: reject them, naming the key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        # pydantic's lax mode reads true as 1: train.steps=true would train one step. A boolean is
        # never a number or a name here, so it is refused wherever the field is not a bool.
        # (A model validator, not a field one: pydantic forbids "before" validators on the
        # discriminator field method.name.)
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and not _accepts_bool(field.annotation):
                    raise ValueError(f"field {key!r}: got {value!r}, a true/false value where a number or "
                                     "text belongs")
        return data


# --------------------------------------------------------------------------------------- data
class SplitConfig(_Strict):
    """Few-shot split of each (product, defect) set of defective images into train and test.

    ``lowest-third``: ids sorted numerically, the first floor(n/3) train (Defect-Gen/AnomalyDiffusion
    protocol). ``first-k``: the first ``k`` ids train. ``half``: a seeded random half trains.
    ``group``: whole groups (a metadata column, e.g. one physical tile shot at six exposures) are
    assigned to train until ``train_fraction`` is reached, so no group leaks across the cut.
    ``manifest``: bring your own split, a CSV ``product,defect,id,side`` (side train/test) at
    ``manifest``, every defective image on exactly one side. ``all``: every defective image trains
    (e.g. a customer's few images); only ``test/good`` is left for testing.

    ``zero_shot`` (any protocol): the listed products' defective images are all on the test side,
    so a generator learns those products from their defect-free images only and their defects
    from the other products (DefectDiffu's zero-shot generation: a defect direction learned on
    one product, applied to another). Only a method that can transfer defects across products
    accepts it, and only in ``train.mode=multi-product``.
    """

    protocol: Literal["lowest-third", "first-k", "half", "group", "manifest", "all"] = "lowest-third"
    seed: int = 0
    k: int = Field(5, ge=1, description="images per defect type in train (first-k)")
    train_fraction: float = Field(1 / 3, gt=0, lt=1, description="share of groups in train (group)")
    group_column: str = "group"
    metadata: LocalPath = Field(
        None, description="CSV with columns cls,id,<group_column>; default <data>/metadata.csv"
    )
    manifest: LocalPath = Field(
        None, description="CSV with columns product,defect,id,side (side: train or test) for protocol=manifest"
    )
    zero_shot: list[str] = Field(default_factory=list, description="products whose defective images never train "
                                                                   "(all on the test side): zero-shot generation "
                                                                   "of their defects from the other products'")

    @model_validator(mode="after")
    def _manifest_needs_a_file(self) -> SplitConfig:
        if self.protocol == "manifest" and not self.manifest:
            raise ValueError("data.split.manifest: protocol=manifest needs the CSV file "
                             "(columns product,defect,id,side), e.g. data.split.manifest=split.csv")
        return self


class SynthConfig(_Strict):
    """The built-in procedural dataset (``defectforge data synth``)."""

    seed: int = 0
    size: int = Field(128, ge=32, le=1024)
    products: int = Field(2, ge=1, le=4)


class DataConfig(_Strict):
    path: LocalPath = Field(None, description="dataset root (MVTec layout); null = built-in synthetic")
    products: list[str] | None = Field(None, description="products to use; null = all")
    resolution: int = Field(256, ge=16, le=2048)
    split: SplitConfig = SplitConfig()
    on_bad_sample: Literal["error", "skip"] = "error"
    train_on_good: bool = Field(False, description="also train generators on defect-free images")
    augment_flip: bool = Field(True, description="random horizontal flips while training generators")
    synth: SynthConfig = SynthConfig()


# ----------------------------------------------------------------------------------- training
class ScalingSection(_Strict):
    num_workers: int = Field(0, ge=0, description="0 = run the loop in-process (no worker actors)")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})


class TrainConfig(_Strict):
    mode: Literal["per-product", "multi-product"] = "per-product"
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up over each stage's first steps")
    weight_decay: float = Field(0.0, ge=0)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(0.999, gt=0, lt=1)
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept per run")
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts; -1 = unlimited")
    nan_policy: Literal["error"] = "error"
    stages: list[str] | None = Field(None, description="train only these stages (null = all); the modules of "
                                                         "the others come from train.init_from")
    init_from: str | None = Field(None, description="generator checkpoint whose saved modules initialise the model "
                                                    "before training (e.g. a pretrained backbone stage)")
    init_modules: list[str] | None = Field(None, description="only these modules come from train.init_from (null = "
                                                             "every module it saved), e.g. [backbone] from a "
                                                             "pretraining run whose other modules have other sizes")
    scaling: ScalingSection = ScalingSection()


class SamplingConfig(_Strict):
    """How a trained generator samples. Every field is sampling-time: it never shapes the trained
    weights, so sweep trials that differ only here reuse one trained generator (train/reuse.py)."""

    n: int = Field(16, ge=1)
    batch_size: int = Field(8, ge=1)
    sampler: Literal["ddpm", "ddim"] = "ddim"
    steps: int | None = Field(None, ge=1, description="sampling steps; null = all training timesteps")
    guidance: dict[str, float] = Field(default_factory=dict,
                                       description="classifier-free guidance scales by name (methods that have them)")
    seed: int = 0
    reject_empty_masks: bool = True
    max_attempts: int = Field(4, ge=1, description="draws per sample when rejecting empty masks")


class EvaluationConfig(_Strict):
    feature_extractor: Literal["standard", "randfeat"] = "standard"
    weights_dir: LocalPath = Field(None, description="local dir with Inception/LPIPS weights; env DEFECTFORGE_WEIGHTS")
    require_standard_weights: bool = Field(
        False, description="feature_extractor=standard without the weights files is an error; false = use the "
                           "stand-in extractors (metric names suffixed _randfeat/_randnet) and say so in one line")
    n_per_defect: int = Field(16, ge=1)
    segmentation: bool = True
    seg_seeds: int = Field(2, ge=1)
    seg_steps: int = Field(300, ge=1)
    synthetic_ratio: float = Field(1.0, ge=0)
    cache_real_segmentation: bool = Field(
        True, description="reuse the real-only segmentation baseline (identical for every trial of a study) "
                          "from <run_root>/cache/segmentation-real, keyed by a hash of its rows, seed and steps")
    diversity: Literal["auto", "driver", "tasks"] = Field(
        "auto", description="where LPIPS / IC-LPIPS / mask quality run: one Ray task per (product, defect) "
                            "(scales out), the driver (no worker start-up; FID/KID/IS still run as one Ray task "
                            "per level), or auto = up to 64 MiB of pixels "
                            "generated from a checkpoint, the evaluation's map tasks also make each image's LPIPS "
                            "embedding and the per-type tasks only compare them (the driver if the embeddings "
                            "exceed 256 MiB); otherwise, and for pairs read from --generated, tasks")
    num_actors: int = Field(1, ge=1, description="concurrent map tasks (CPU: on reused workers that cache their "
                                              "models) or actors (GPU) of the evaluation's Ray Data pass")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per evaluation actor; > 0 = an actor pool on GPUs")


class TrackingConfig(_Strict):
    uri: str | None = Field(None, description="MLflow URI; null = sqlite under run_root; env MLFLOW_TRACKING_URI wins")
    experiment: str | None = None
    run_root: str = "runs"
    timeout_s: float = Field(10.0, gt=0, description="how long to wait for a tracking server")


class SweepConfig(_Strict):
    name: str | None = Field(None, description="sweep name; the same name + storage resumes; default sweep-<method>")
    space: str | None = Field(None, description="search-space YAML; default search_spaces/<method>_<preset>.yaml "
                                                "if it exists, else search_spaces/<method>.yaml")
    num_trials: int = Field(4, ge=1)
    max_concurrent: int | None = Field(None, ge=1, description="trials at once over the whole sweep (all studies); "
                                          "default: what the cluster's resources hold")
    objective: str | None = Field(None, description="metric, or metric:mode,metric:mode for multi-objective; "
                                  "default seg_gain (max) when evaluation.segmentation, else kid (min)")
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: training reports before a trial may be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    trial_max_failures: int = Field(0, ge=-1, description="Tune retries of a failed trial")
    storage_path: str | None = Field(None, description="Tune/Train storage, a filesystem path: on a multi-node "
                                     "cluster under a shared mount (EFS/Filestore/NFS) named in DEFECTFORGE_SHARED_FS; "
                                     "unset: <DEFECTFORGE_STORAGE_PATH>/sweeps/<run root>-<hash>, else "
                                     "<run_root>/sweeps")
    register_model: bool = Field(True, description="register the best generator with alias 'best'")
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        # The sweep name becomes a folder under the storage path: one safe path component.
        from defectforge.paths import unsafe_reason

        if value is not None and (why := unsafe_reason(value)) is not None:
            raise ValueError(f"sweep name {value!r} {why}; it must be a single folder name")
        return value


class MethodConfigBase(_Strict):
    """Base of every method's config; subclasses add ``name: Literal[...]`` and their fields."""

    name: str

    @classmethod
    def preset(cls, name: str) -> dict[str, Any]:
        """The method's part of preset ``name`` (overrides of its own fields)."""
        return {}

    @classmethod
    def run_preset(cls, name: str) -> dict[str, Any]:
        """The method's changes to the run-wide sections (``train``, ``evaluation``, ...) of preset
        ``name``, merged over the global preset and under a config file and overrides. For a
        method whose stages fix their own steps, so that e.g. its reports (``train.checkpoint_every``:
        a sweep scheduler's rungs) fall inside them. Default: none."""
        return {}

    def pretraining(self) -> dict[str, Any] | None:
        """The stage a sweep trains once per study and every trial starts from, or None.

        ``{"stage": name, "fields": method fields it depends on, "modules": what it trains}``: a
        sweep trains that stage alone (keyed by the data, ``train`` and only these method fields,
        so trials that differ elsewhere share it), then each trial trains the other stages with
        ``train.init_from`` = that run and ``train.init_modules`` = ``modules`` (sweep/runner.py).
        Default: none (every trial trains all its stages)."""
        return None

    def trains_on_good(self) -> bool:
        """Whether some stage needs the defect-free training images whatever ``data.train_on_good``
        says (a backbone pretrained here learns the product from them). Default: no."""
        return False

    def zero_shot(self) -> bool:
        """Whether the method can draw a product's defects having seen none of them, from what it
        learned of those defects on other products (``data.split.zero_shot``). Default: no (a
        method with per-(product, defect) parts would sample an untrained part)."""
        return False


class ConfigBase(_Strict):
    preset: Literal["tiny", "laptop", "paper"] = "tiny"
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    sampling: SamplingConfig = SamplingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _zero_shot(self) -> ConfigBase:
        listed = self.data.split.zero_shot
        method = getattr(self, "method", None)
        if not listed or method is None:
            return self
        if not method.zero_shot():
            raise ValueError(f"data.split.zero_shot={listed}: method {method.name!r} cannot draw a product's "
                             "defects without training on them (zero-shot generation is defect-diffu's)")
        if self.train.mode != "multi-product":
            raise ValueError(f"data.split.zero_shot={listed} needs train.mode=multi-product: a zero-shot "
                             "product learns its defects from the other products, so they train together")
        if self.data.products is not None and not set(self.data.products) - set(listed):
            raise ValueError(f"data.split.zero_shot={listed} lists every product of data.products="
                             f"{self.data.products}: at least one must train on its defects")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# Global parts of the presets; each method adds its own through MethodConfigBase.preset().
_PRESET_VALUES: dict[str, dict[str, Any]] = {
    "tiny": {
        "data": {"resolution": 64},
        "train": {"steps": 200, "batch_size": 8, "lr": 5e-4, "checkpoint_every": 100, "log_every": 20,
                  "ema_decay": 0.99},
        "sampling": {"sampler": "ddim", "steps": 20, "n": 16, "batch_size": 16},
        "evaluation": {"n_per_defect": 8, "seg_steps": 200, "seg_seeds": 2},
    },
    "laptop": {
        "data": {"resolution": 64},
        "train": {"steps": 800, "batch_size": 8, "lr": 1e-3, "warmup_steps": 50, "checkpoint_every": 200,
                  "log_every": 50, "ema_decay": 0.995},
        "sampling": {"sampler": "ddim", "steps": 25, "n": 16, "batch_size": 32},
        "evaluation": {"n_per_defect": 16, "seg_steps": 200, "seg_seeds": 2},
    },
    "paper": {
        "data": {"resolution": 256},
        "train": {"steps": 100_000, "batch_size": 16, "lr": 1e-4, "weight_decay": 2e-3,
                  "checkpoint_every": 5000, "log_every": 100, "ema_decay": 0.9999},
        "sampling": {"sampler": "ddpm", "steps": None, "n": 500, "batch_size": 16},
        "evaluation": {"n_per_defect": 500, "seg_steps": 5000, "seg_seeds": 3},
    },
}


def config_model() -> type[ConfigBase]:
    """The full ``Config`` model, its ``method`` field a union of every registered method config."""
    from defectforge.methods import registry

    method_classes = tuple(registry.config_classes().values())
    if len(method_classes) == 1:
        method_type: Any = method_classes[0]
    else:
        method_type = Annotated[Union[method_classes], Field(discriminator="name")]  # noqa: UP007
    return create_model("Config", __base__=ConfigBase, method=(method_type, ...))


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into a copy of ``base``; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    # YAML reads 1e-4 as a string (no dot in the mantissa); numbers are what people mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def set_dotted(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def _format_errors(exc: ValidationError, source: str | None) -> str:
    where = f" (from {source})" if source else ""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in _TAGS))
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        msg = err["msg"]
        named = re.match(r"Value error, field '([^']+)': (.*)", msg, re.S)
        if named:  # a model validator that names its field: report the field's dotted path
            loc, msg = f"{loc}.{named.group(1)}" if loc else named.group(1), named.group(2)
        lines.append(f"  {loc or '<root>'}: {msg}{shown}")
    if len(lines) == 1:  # the usual case: one line, so the CLI prints one line
        return f"invalid configuration{where}: {lines[0].strip()}"
    return f"invalid configuration{where}:\n" + "\n".join(lines)


_TAGS: set[str] = set()


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def resolve_config(
    method: str | None = None,
    preset: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> ConfigBase:
    """Build and validate a config from its layers (see the module docstring).

    ``extra`` holds values that command-line flags set (e.g. ``--data``); they sit between the
    file and the dotted overrides.
    """
    from defectforge.methods import registry

    file_tree = load_yaml(config_file) if config_file else {}
    override_pairs = [parse_override(o) for o in overrides]
    override_tree: dict[str, Any] = {}
    for path, value in override_pairs:
        set_dotted(override_tree, path, value)

    # Which preset and which method: the most specific layer wins
    # (defaults < file < command-line flags < dotted overrides).
    extra = extra or {}
    sections = {name for name, f in ConfigBase.model_fields.items() if name != "preset"} | {"method"}
    for layer, label in ((file_tree, str(config_file)), (extra, "command-line flags"),
                         (override_tree, "command-line overrides")):
        for key in sections & set(layer):
            if not isinstance(layer[key], dict):
                raise ConfigError(f"{key} (from {label}): must be a section (a mapping of fields, e.g. "
                                  f"'{key}: {{name: ...}}'), got {type(layer[key]).__name__} {layer[key]!r}")
    preset_name, method_name = "tiny", "defect-gen"
    for layer in (file_tree, {"preset": preset, "method": {"name": method}}, extra, override_tree):
        if layer.get("preset"):
            preset_name = layer["preset"]
        m = layer.get("method")
        if isinstance(m, dict) and m.get("name"):
            method_name = m["name"]
    if preset_name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset_name!r}; known: {', '.join(PRESETS)}")
    classes = registry.config_classes()
    if method_name not in classes:
        raise ConfigError(
            f"method.name: unknown method {method_name!r}; known: {', '.join(sorted(classes))}"
        )
    _TAGS.update(classes)

    tree: dict[str, Any] = {"preset": preset_name, "method": {"name": method_name}}
    tree = deep_merge(tree, _PRESET_VALUES[preset_name])
    tree = deep_merge(tree, classes[method_name].run_preset(preset_name))
    tree["method"] = deep_merge(tree["method"], classes[method_name].preset(preset_name))
    source = None
    for layer, label in ((file_tree, str(config_file) if config_file else None), (extra, None),
                         (override_tree, "command-line overrides")):
        if layer:
            tree = deep_merge(tree, layer)
            source = label or source
    tree["preset"] = preset_name
    tree.setdefault("method", {})["name"] = method_name
    model = config_model()
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, _blame(exc, file_tree, override_tree, config_file))) from None


def _blame(exc: ValidationError, file_tree: dict, override_tree: dict, config_file: Any) -> str | None:
    """Name where the first bad value came from: the overrides, the file, or the preset/defaults."""
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p in _TAGS)]
        for tree, label in ((override_tree, "command-line overrides"), (file_tree, str(config_file))):
            node: Any = tree
            for part in loc:
                if isinstance(node, dict) and part in node:
                    node = node[part]
                else:
                    node = None
                    break
            if node is not None and tree:
                return label
    return None


def save_config(cfg: ConfigBase, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(tree: dict[str, Any]) -> ConfigBase:
    """Re-validate a config dict (e.g. one stored next to a checkpoint or sent to a Ray worker)."""
    from defectforge.methods import registry

    _TAGS.update(registry.config_classes())
    try:
        return config_model().model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, None)) from None


def with_overrides(cfg: ConfigBase, overrides: dict[str, Any]) -> ConfigBase:
    """A copy of ``cfg`` with dotted-path overrides applied and validated (used by sweeps)."""
    tree = cfg.to_dict()
    for key, value in overrides.items():
        set_dotted(tree, key.split("."), value)
    return config_from_dict(tree)

