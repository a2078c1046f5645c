"""Search spaces: one YAML file per method (``search_spaces/``), validated, turned into Optuna.

A file looks like::

    method: defect-gen
    parameters:
      method.u:               {type: int, low: 25, high: 700, log: true}
      method.receptive_field: {type: categorical, choices: [small, medium, large]}
      sampling.sampler:       {type: fixed, value: ddim}
      sampling.steps:         {type: int, low: 10, high: 50, when: {sampling.sampler: ddim}}
    points_to_evaluate:
      - {method.u: 200, method.receptive_field: small}
    objective: {metric: seg_gain, mode: max}        # optional

Why a file per method and not Python: a sweep is something people edit and compare; a YAML file
is diffable, loggable as an artifact, and reviewable without reading code.

A file may narrow another (a preset's file: ``defect_gen_laptop.yaml``) with ``extends``::

    extends: defect_gen.yaml        # relative to this file's folder
    parameters:
      method.receptive_field: {type: categorical, choices: [small, medium]}   # replaces the base's
      method.u: null                                                           # drops it
    points_to_evaluate: [...]       # replaces the base's list; left out, the base's is kept

Why: a copy of the base file with two bounds changed drifted from it the moment the base changed
(comments, a new parameter); with ``extends`` the narrowing file states only what differs.
:func:`space_data` resolves the chain; everything after it sees one plain mapping.

Why validate so much at load time: a sweep is expensive. A typo in a config path (``method.uu``),
a range the config itself rejects (``method.u`` up to T), or a default point outside its range
would otherwise surface as N errored trials minutes or hours later. Every parameter path is
checked against the method's real config model by applying sample values with
:func:`~defectforge.config.with_overrides` to the ``tiny`` preset, so the config model stays the
one source of truth about what exists and what is valid.

Names: a parameter's name *is* its dotted config path. Ray Tune's ``OptunaSearch`` unflattens
suggested names on ``/`` only, so the dotted names reach the trainable as flat keys of the trial
config, which :func:`apply` maps back onto a config. Conditional parameters (``when``) need the
define-by-run form (:func:`define_by_run`); :func:`to_optuna`'s flat dict cannot express them.

No Ray, no MLflow here: the sweep runner wires these into Tune.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from defectforge.config import ConfigBase, ConfigError, load_yaml, resolve_config, with_overrides

KINDS = ("int", "float", "categorical", "fixed")
_SPEC_KEYS = {
    "int": {"low", "high", "step", "log"},
    "float": {"low", "high", "step", "log"},
    "categorical": {"choices"},
    "fixed": {"value"},
}
_TOP_KEYS = {"method", "parameters", "points_to_evaluate", "objective"}
_FILE_KEYS = _TOP_KEYS | {"extends"}  # ``extends`` is resolved by space_data before parse_space
_MISSING = object()

# platform/defectforge/sweep/space.py -> the repository root holds search_spaces/ (editable install,
# or the working dir that `ray job submit --working-dir .` ships).
REPO_SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


class SpaceError(ConfigError):
    """A search-space problem; the message names the file and the parameter."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its dotted config path, its distribution kind, and an optional condition.

    ``when`` maps another parameter's path to the tuple of values for which this one is active.
    """

    path: str
    type: str
    low: int | float | None = None
    high: int | float | None = None
    step: int | float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def fixed(self) -> bool:
        return self.type == "fixed"

    def already_in(self, cfg: ConfigBase) -> bool:
        """Whether this is a fixed parameter whose value ``cfg`` already has (compared as
        conditions compare values: ``True`` is not ``1``)."""
        return self.fixed and _same(config_value(cfg, self.path), self.value)

    def distribution(self) -> BaseDistribution | None:
        """The Optuna distribution (``None`` for a fixed parameter, which is never sampled)."""
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        if self.type == "float":
            return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)
        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices))
        return None

    def contains(self, value: Any) -> bool:
        """Whether ``value`` can be drawn (or, for ``fixed``, is the value)."""
        if self.fixed:
            return value == self.value
        if self.type == "categorical":
            return any(_same(value, c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and (not isinstance(value, int)):
            return False
        dist = self.distribution()
        return bool(dist._contains(dist.to_internal_repr(value)))  # Optuna's own range/step check

    def probe_values(self) -> list[Any]:
        """Values that together exercise the whole range against the config model."""
        if self.fixed:
            return [self.value]
        if self.type == "categorical":
            return list(self.choices)
        return [self.low, self.high]

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        if self.type == "float":
            return trial.suggest_float(self.path, float(self.low), float(self.high), step=self.step, log=self.log)
        if self.type == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        raise ValueError(f"{self.path}: a fixed parameter is not suggested")


@dataclass
class SearchSpace:
    """A validated search space: ``parameters`` in dependency order (conditions before dependants)."""

    method: str
    parameters: dict[str, ParamSpec]
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)
    source: Path | None = None
    objective: dict[str, Any] | None = None  # {"metric": str | [str], "mode": "max"|"min" | [...]}

    @property
    def label(self) -> str:
        return str(self.source) if self.source else f"<search space for {self.method}>"

    def fixed_values(self) -> dict[str, Any]:
        return {p: s.value for p, s in self.parameters.items() if s.fixed}

    def active_values(self, params: dict[str, Any], cfg: ConfigBase | None = None) -> dict[str, Any]:
        """``params`` plus fixed values, keeping only parameters whose conditions hold.

        A condition on a parameter absent from ``params`` reads its current value in ``cfg``.
        Raises if ``params`` holds an unknown parameter or one whose condition does not hold.
        """
        for key in params:
            if key not in self.parameters:
                raise SpaceError(f"{self.label}: {key!r} is not a parameter of this search space "
                                 f"(known: {', '.join(self.parameters)})")
            if self.parameters[key].fixed and params[key] != self.parameters[key].value:
                raise SpaceError(f"{self.label}: parameter {key!r} is fixed to {self.parameters[key].value!r}, "
                                 f"got {params[key]!r}")
        out: dict[str, Any] = {}
        for path, spec in self.parameters.items():
            if not _condition_holds(spec, out, self.parameters, cfg):
                if path in params:
                    raise SpaceError(f"{self.label}: parameter {path!r} is given but its condition "
                                     f"{_fmt_when(spec)} does not hold")
                continue
            if spec.fixed:
                out[path] = spec.value
            elif path in params:
                out[path] = params[path]
        return out

    def apply(self, cfg: ConfigBase, params: dict[str, Any]) -> ConfigBase:
        """``cfg`` with ``params`` (dotted paths) and the fixed values applied and re-validated."""
        values = self.active_values(params, cfg)
        try:
            return with_overrides(cfg, values)
        except ConfigError as exc:
            raise SpaceError(f"{self.label}: values {values} give an invalid config: {exc}") from None


def apply(space: SearchSpace, cfg: ConfigBase, params: dict[str, Any]) -> ConfigBase:
    """Module-level alias of :meth:`SearchSpace.apply` (the sweep trainable's entry point)."""
    return space.apply(cfg, params)


def to_optuna(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Optuna distributions of the sampled parameters; fixed ones are excluded (apply() sets them).

    Conditions are not expressible in a flat dict: conditional parameters are included as if always
    active. Use :func:`define_by_run` to honour ``when``.
    """
    return {p: s.distribution() for p, s in space.parameters.items() if not s.fixed}


class DefineByRun:
    """A define-by-run function for ``OptunaSearch(space=...)`` (Ray 2.60) or ``study.ask()``.

    It suggests each active parameter in dependency order (a conditional parameter only when its
    condition holds on the values drawn so far) and returns the active fixed values as constants,
    which Ray merges into the trial config; ``None`` when there are none. A class, not a closure:
    Tune pickles the searcher (and this with it) into the sweep's checkpoint for ``Tuner.restore``.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> dict[str, Any] | None:
        drawn: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for path, spec in self.space.parameters.items():
            if not _condition_holds(spec, drawn, self.space.parameters, None):
                continue
            if spec.fixed:
                drawn[path] = constants[path] = spec.value
            else:
                drawn[path] = spec.suggest(trial)
        return constants or None


def define_by_run(space: SearchSpace) -> Callable[[optuna.Trial], dict[str, Any] | None]:
    """``DefineByRun(space)``: see there."""
    return DefineByRun(space)


# ---------------------------------------------------------------------------------- loading
def find_space_file(method: str, preset: str | None = None) -> Path:
    """``search_spaces/<method>_<preset>.yaml`` if there is one, else ``search_spaces/<method>.yaml``:
    next to the package, else under the working directory, else in a ``DEFECTFORGE_PLUGINS`` folder.

    One name per method: the file is the method name with underscores for dashes
    (``defect-gen`` -> ``defect_gen.yaml``), as its module is (``methods/defect_gen.py``). A
    preset's own file narrows the method's space to what that preset can afford (the laptop
    files bound the sampling steps and the trainings a 2-CPU sweep runs); it wins in every root
    before the method's general file is looked for.
    """
    from defectforge.methods.registry import plugin_dirs

    stem = method.replace("-", "_")
    stems = [f"{stem}_{preset}", stem] if preset else [stem]
    # A plugin method's space sits beside its module (see methods/registry.py).
    roots = dict.fromkeys([REPO_SPACES, Path(os.getcwd()) / "search_spaces", *plugin_dirs()])
    tried = []
    for name in stems:
        for root in roots:
            for ext in (".yaml", ".yml"):
                candidate = root / f"{name}{ext}"
                if candidate.is_file():
                    return candidate
                tried.append(str(candidate))
    raise SpaceError(f"no search space for method {method!r}; looked for: {', '.join(tried)}")


def load_space(path_or_method: str | os.PathLike[str], preset: str = "tiny") -> SearchSpace:
    """Load and validate a search space from a file path or a bare method name (see the module doc).

    ``preset`` is the base config every parameter path and point is validated against; for a
    method name it also picks ``<method>_<preset>.yaml`` when that file exists (:func:`find_space_file`).
    """
    text = str(path_or_method)
    is_path = isinstance(path_or_method, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text \
        or Path(text).is_file()
    # Absolute: the trials load the same file again from Tune's per-trial working folders.
    path = Path(text).expanduser().absolute() if is_path else find_space_file(text, preset)
    data, chain = _resolve(path)
    try:
        space = parse_space(data, source=path, preset=preset)
    except SpaceError as exc:
        if len(chain) == 1:
            raise
        # The entry at fault may be in any file of the chain: say which files make the space.
        raise SpaceError(f"{exc} [the space of {path.name} is {' + '.join(str(p) for p in reversed(chain))}, "
                         "later files replacing earlier entries]") from None
    if not is_path and space.method != text:
        raise SpaceError(f"{path}: method is {space.method!r}, but it was loaded for method {text!r}")
    return space


def space_data(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping of the space file at ``path`` with its ``extends`` chain resolved (module doc).

    The base is the file named by ``extends``, relative to this file's folder. Merged: the base's
    ``parameters`` with this file's entries replacing whole specs of the same path (``null``
    removes one), this file's ``points_to_evaluate`` and ``objective`` when given, else the base's.
    ``method`` may be left out (the base's) or must equal it; ``points_to_evaluate: null`` or
    ``objective: null`` drops the base's. This is what a sweep's resume check compares (and
    what the parent run logs), so editing a base file is a changed space for every file that
    extends it."""
    return _resolve(path)[0]


def _resolve(path: str | os.PathLike[str], _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """``space_data`` and the files that made it, ``path`` first, then the file it extends, ..."""
    path = Path(path).expanduser().absolute()
    if path.resolve() in {p.resolve() for p in _chain}:  # resolved: "../d/a.yaml" or a link is a.yaml
        raise SpaceError(f"{_chain[0]}: 'extends' forms a cycle: {' -> '.join(str(p) for p in (*_chain, path))}")
    try:
        data = load_yaml(path)
    except ConfigError as exc:
        where = f" (extended by {_chain[-1]})" if _chain else ""
        raise SpaceError(f"search space{where}: {exc}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: a search space must be a mapping (method, parameters, ...)")
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise SpaceError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_FILE_KEYS)}")
    if "extends" not in data:
        return data, [path]
    ref = data["extends"]
    if not isinstance(ref, str) or not ref:
        raise SpaceError(f"{path}: 'extends' must name a search-space file (e.g. extends: defect_gen.yaml)")
    base_path = (path.parent / Path(ref).expanduser()).absolute()
    if not base_path.is_file():
        raise SpaceError(f"{path}: extends {ref!r}, but {base_path} is not a file")
    base, files = _resolve(base_path, (*_chain, path))
    if "method" in data and data["method"] != base.get("method"):
        raise SpaceError(f"{path}: method is {data['method']!r}, but the file it extends ({base_path}) is for "
                         f"{base.get('method')!r}")
    own = data.get("parameters", {})
    if not isinstance(own, dict):
        raise SpaceError(f"{path}: 'parameters' must be a mapping of dotted config path -> spec (a spec of null "
                         f"drops that parameter of {base_path.name}); leave the key out to change none")
    parameters = dict(base.get("parameters") or {})
    for key, spec in own.items():
        if spec is None:
            if key not in parameters:
                raise SpaceError(f"{path}: parameter {key!r} is dropped (null) but {base_path} has no such "
                                 "parameter")
            del parameters[key]
        else:
            parameters[key] = spec
    merged = {k: v for k, v in base.items() if k != "parameters"}
    merged.update({k: v for k, v in data.items() if k not in ("extends", "parameters")})
    merged["parameters"] = parameters
    return merged, [path, *files]


def parse_space(data: dict[str, Any], source: Path | None = None, preset: str = "tiny") -> SearchSpace:
    """Validate a search-space mapping (a loaded YAML file) into a :class:`SearchSpace`."""
    label = str(source) if source else "<search space>"
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise SpaceError(f"{label}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    method = data.get("method")
    if not isinstance(method, str) or not method:
        raise SpaceError(f"{label}: 'method' must name a method (e.g. method: defect-gen)")
    try:
        base = resolve_config(method=method, preset=preset)
    except ConfigError as exc:
        raise SpaceError(f"{label}: {exc}") from None

    raw = data.get("parameters")
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{label}: 'parameters' must be a non-empty mapping of dotted config path -> spec")
    specs = {str(path): _parse_spec(str(path), spec, label) for path, spec in raw.items()}
    for spec in specs.values():
        _check_when(spec, specs, label)
        _check_against_config(spec, base, label)
    space = SearchSpace(method=method, parameters=_dependency_order(specs, label), source=source,
                        objective=_parse_objective(data.get("objective"), label))
    space.points_to_evaluate = _parse_points(data.get("points_to_evaluate"), space, base)
    return space


def _parse_spec(path: str, spec: Any, label: str) -> ParamSpec:
    where = f"{label}: parameter {path!r}"
    if not path or any(not part for part in path.split(".")):
        raise SpaceError(f"{where}: not a dotted config path (e.g. train.lr)")
    if path == "method.name":
        raise SpaceError(f"{where}: the method is set by the file's top-level 'method', not swept")
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: spec must be a mapping like {{type: float, low: 1.0e-4, high: 1.0e-3}}, "
                         f"got {spec!r}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise SpaceError(f"{where}: unknown type {kind!r}; one of {', '.join(KINDS)}")
    extra = set(spec) - _SPEC_KEYS[kind] - {"type", "when"}
    if extra:
        raise SpaceError(f"{where}: unknown key(s) {sorted(extra)} for type {kind}; "
                         f"allowed: {sorted(_SPEC_KEYS[kind] | {'when'})}")
    when = _parse_when(spec.get("when"), path, where)
    if kind == "fixed":
        if "value" not in spec:
            raise SpaceError(f"{where}: type fixed needs 'value'")
        return ParamSpec(path, kind, value=spec["value"], when=when)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: categorical needs a non-empty list 'choices'")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise SpaceError(f"{where}: choice {c!r} must be a string, number, boolean or null")
        if len({repr(c) for c in choices}) != len(choices):
            raise SpaceError(f"{where}: duplicate choices in {choices}")
        return ParamSpec(path, kind, choices=tuple(choices), when=when)

    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(f"{where}: type {kind} needs 'low' and 'high'")
    low, high = _number(spec["low"], kind, f"{where}: low"), _number(spec["high"], kind, f"{where}: high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: log must be true or false, got {log!r}")
    step = None if spec.get("step") is None else _number(spec["step"], kind, f"{where}: step")
    if low >= high:
        raise SpaceError(f"{where}: low ({low}) must be < high ({high})")
    if log and low <= 0:
        raise SpaceError(f"{where}: log scale needs low > 0, got low={low}")
    if step is not None:
        if step <= 0:
            raise SpaceError(f"{where}: step must be > 0, got {step}")
        if log and step != 1:
            raise SpaceError(f"{where}: step and log cannot be combined (Optuna samples log ranges continuously)")
        span = (high - low) / step
        if not math.isclose(span, round(span), abs_tol=1e-9):
            raise SpaceError(f"{where}: high - low ({high} - {low}) must be a multiple of step ({step})")
    return ParamSpec(path, kind, low=low, high=high, step=step, log=log, when=when)


def _number(value: Any, kind: str, where: str) -> int | float:
    # PyYAML reads 1e-4 (no dot in the mantissa) as a string; people mean a number.
    if isinstance(value, str) and kind == "float":
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(f"{where} must be a finite number, got {value!r}")
    if kind == "int":
        if not isinstance(value, int):
            raise SpaceError(f"{where} must be an integer for type int, got {value!r}")
        return value
    return float(value)


def _parse_when(when: Any, path: str, where: str) -> dict[str, tuple[Any, ...]]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise SpaceError(f"{where}: when must be a mapping {{other.path: value or [values]}}, got {when!r}")
    out = {}
    for other, allowed in when.items():
        if other == path:
            raise SpaceError(f"{where}: when refers to the parameter itself")
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not values:
            raise SpaceError(f"{where}: when {other!r} lists no values")
        out[str(other)] = values
    return out


def _check_when(spec: ParamSpec, specs: dict[str, ParamSpec], label: str) -> None:
    where = f"{label}: parameter {spec.path!r}"
    for other, allowed in spec.when.items():
        if other not in specs:
            raise SpaceError(f"{where}: when refers to {other!r}, which is not a parameter of this space "
                             f"(defined: {', '.join(specs)})")
        bad = [v for v in allowed if not specs[other].contains(v)]
        if bad and specs[other].fixed:
            raise SpaceError(f"{where}: when {other!r} in {list(allowed)} can never hold: "
                             f"{other!r} is fixed to {specs[other].value!r}")
        if bad:
            raise SpaceError(f"{where}: when {other!r}: value(s) {bad} are outside {other!r}'s distribution")


def _check_against_config(spec: ParamSpec, base: ConfigBase, label: str) -> None:
    """Each probe value, applied alone to the base config, must validate; names the path if unknown."""
    where = f"{label}: parameter {spec.path!r}"
    for value in spec.probe_values():
        try:
            with_overrides(base, {spec.path: value})
        except ConfigError as exc:
            known = _known_path(base.to_dict(), spec.path)
            if known is not True:
                raise SpaceError(f"{where}: unknown config path {spec.path!r} for method {base.method.name!r}"
                                 f"{known}") from None
            raise SpaceError(f"{where}: value {value!r} is rejected by the config: "
                             f"{str(exc).replace(chr(10), ' ')}") from None


def _known_path(tree: dict[str, Any], path: str) -> bool | str:
    """True if ``path`` exists in the dumped config; else a hint naming the closest keys."""
    node: Any = tree
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            if not isinstance(node, dict):
                return f" ({'.'.join(parts[:i])!r} is a value, not a section)"
            prefix = ".".join(parts[:i])
            close = difflib.get_close_matches(part, list(node), n=3)
            hint = f"; did you mean {', '.join(repr('.'.join([*parts[:i], c])) for c in close)}?" if close else ""
            return f" ({prefix or 'the config'!s} has no key {part!r}{hint})"
        node = node[part]
    return True


def _dependency_order(specs: dict[str, ParamSpec], label: str) -> dict[str, ParamSpec]:
    """File order, except that each condition's parameter comes before its dependants."""
    ordered: dict[str, ParamSpec] = {}
    visiting: list[str] = []

    def visit(path: str) -> None:
        if path in ordered:
            return
        if path in visiting:
            cycle = visiting[visiting.index(path):] + [path]
            raise SpaceError(f"{label}: parameter {path!r}: conditions form a cycle: {' -> '.join(cycle)}")
        visiting.append(path)
        for other in specs[path].when:
            visit(other)
        visiting.pop()
        ordered[path] = specs[path]

    for path in specs:
        visit(path)
    return ordered


def _parse_objective(obj: Any, label: str) -> dict[str, Any] | None:
    if obj is None:
        return None
    if isinstance(obj, str):
        obj = {"metric": obj}
    if not isinstance(obj, dict) or "metric" not in obj or set(obj) - {"metric", "mode"}:
        raise SpaceError(f"{label}: objective must be a metric name or {{metric: ..., mode: max|min}}")
    metrics = obj["metric"] if isinstance(obj["metric"], list) else [obj["metric"]]
    modes = obj.get("mode", "max")
    modes = modes if isinstance(modes, list) else [modes] * len(metrics)
    if not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise SpaceError(f"{label}: objective.metric must be a metric name or a list of them")
    if len(modes) != len(metrics) or any(m not in ("max", "min") for m in modes):
        raise SpaceError(f"{label}: objective.mode must be max/min, one per metric (got {obj.get('mode')!r})")
    single = not isinstance(obj["metric"], list)
    return {"metric": metrics[0] if single else metrics, "mode": modes[0] if single else modes}


def _parse_points(points: Any, space: SearchSpace, base: ConfigBase) -> list[dict[str, Any]]:
    """Each point: known, non-fixed parameters with values inside their distributions, consistent
    with the conditions, and a valid config when applied together."""
    label = space.label
    if points is None:
        return []
    if not isinstance(points, list):
        raise SpaceError(f"{label}: points_to_evaluate must be a list of mappings")
    out = []
    for i, point in enumerate(points):
        where = f"{label}: points_to_evaluate[{i}]"
        if not isinstance(point, dict) or not point:
            raise SpaceError(f"{where} must be a non-empty mapping of parameter -> value")
        clean: dict[str, Any] = {}
        for key, value in point.items():
            spec = space.parameters.get(key)
            if spec is None:
                raise SpaceError(f"{where}: {key!r} is not a parameter of this space")
            if spec.fixed:
                raise SpaceError(f"{where}: {key!r} is fixed; leave it out of the point")
            if spec.type == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
                value = _number(value, "float", f"{where}: {key!r}")
            if not spec.contains(value):
                raise SpaceError(f"{where}: parameter {key!r} = {value!r} is outside its distribution "
                                 f"{spec.distribution()}")
            clean[key] = value
        for key in clean:
            for other in space.parameters[key].when:
                if other not in clean and not space.parameters[other].fixed:
                    raise SpaceError(f"{where}: {key!r} is conditional on {other!r}; give {other!r} too")
        try:
            space.apply(base, clean)
        except SpaceError as exc:
            raise SpaceError(f"{where}: {exc}") from None
        out.append(clean)
    return out


# ---------------------------------------------------------------------------------- helpers
def _same(a: Any, b: Any) -> bool:
    # True == 1 in Python; a choice list [1, true] must not confuse them.
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def _condition_holds(spec: ParamSpec, values: dict[str, Any], specs: dict[str, ParamSpec],
                     cfg: ConfigBase | None) -> bool:
    for other, allowed in spec.when.items():
        value = values.get(other, _MISSING)
        if value is _MISSING:
            if specs[other].fixed or cfg is None:
                return False  # the condition's parameter is itself inactive
            value = config_value(cfg, other)
        if not any(_same(value, a) for a in allowed):
            return False
    return True


def config_value(cfg: ConfigBase, path: str) -> Any:
    """The value at dotted ``path`` in ``cfg`` (a sentinel when the path is absent)."""
    return _get_dotted(cfg.to_dict(), path)


def _get_dotted(tree: dict[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _fmt_when(spec: ParamSpec) -> str:
    return ", ".join(f"{k} in {list(v)}" for k, v in spec.when.items())
