"""Search spaces: YAML -> validated spec -> Optuna distributions / define-by-run -> config."""

from __future__ import annotations

import textwrap

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from defectforge.config import ConfigError, resolve_config
from defectforge.sweep.space import (
    REPO_SPACES,
    SpaceError,
    apply,
    define_by_run,
    load_space,
    to_optuna,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(tmp_path, body: str, name: str = "space.yaml"):
    f = tmp_path / name
    f.write_text(textwrap.dedent(body))
    return f


ALL_KINDS = """
    method: defect-gen
    parameters:
      method.u: {type: int, low: 25, high: 700, log: true}
      train.batch_size: {type: int, low: 2, high: 16, step: 2}
      train.lr: {type: float, low: 1e-4, high: 2.0e-3, log: true}
      train.weight_decay: {type: float, low: 0.0, high: 0.01}
      method.receptive_field: {type: categorical, choices: [small, medium, large]}
      sampling.sampler: {type: categorical, choices: [ddim, ddpm]}
      sampling.steps: {type: int, low: 10, high: 50, when: {sampling.sampler: ddim}}
      train.ema_decay: {type: fixed, value: 0.95}
"""


def test_each_kind_converts_to_its_optuna_distribution(tmp_path):
    space = load_space(write(tmp_path, ALL_KINDS))
    dists = to_optuna(space)
    assert dists["method.u"] == IntDistribution(25, 700, log=True)
    assert dists["train.batch_size"] == IntDistribution(2, 16, step=2)
    assert dists["train.lr"] == FloatDistribution(1e-4, 2e-3, log=True)  # "1e-4" read as a number
    assert dists["train.weight_decay"] == FloatDistribution(0.0, 0.01)
    assert dists["method.receptive_field"] == CategoricalDistribution(["small", "medium", "large"])
    assert "train.ema_decay" not in dists  # fixed: applied, never sampled
    assert space.fixed_values() == {"train.ema_decay": 0.95}
    # conditions come after the parameter they depend on, whatever the file order
    order = list(space.parameters)
    assert order.index("sampling.sampler") < order.index("sampling.steps")


@pytest.mark.parametrize("spec, fragment", [
    ("{type: gaussian, low: 0, high: 1}", "unknown type 'gaussian'"),
    ("{type: float, low: 1.0e-3, high: 1.0e-4}", "low (0.001) must be < high"),
    ("{type: int, low: 5, high: 5}", "must be < high"),
    ("{type: float, low: 0.0, high: 1.0, log: true}", "log scale needs low > 0"),
    ("{type: categorical, choices: []}", "non-empty list 'choices'"),
    ("{type: int, low: 1.5, high: 9}", "must be an integer"),
    ("{type: int, low: 1, high: 10, step: 4}", "multiple of step"),
    ("{type: float, low: 1.0e-4, hihg: 1.0e-3}", "unknown key(s) ['hihg']"),
    ("{type: fixed}", "needs 'value'"),
    ("{type: float, low: 1.0e-4, high: 1.0e-3, when: {train.nothing: 1}}", "when refers to 'train.nothing'"),
])
def test_invalid_spec_names_file_and_parameter(tmp_path, spec, fragment):
    f = write(tmp_path, f"method: defect-gen\nparameters:\n  train.lr: {spec}\n", "bad.yaml")
    with pytest.raises(SpaceError) as err:
        load_space(f)
    msg = str(err.value)
    assert str(f) in msg and "'train.lr'" in msg and fragment in msg, msg


def test_unknown_config_path_fails_naming_it(tmp_path):
    f = write(tmp_path, "method: defect-gen\nparameters:\n  method.uu: {type: int, low: 25, high: 700}\n")
    with pytest.raises(ConfigError) as err:  # SpaceError is a ConfigError
        load_space(f)
    msg = str(err.value)
    assert str(f) in msg and "unknown config path 'method.uu'" in msg and "'method.u'" in msg, msg  # suggestion
    f = write(tmp_path, "method: defect-gen\nparameters:\n  train.lr.x: {type: fixed, value: 1}\n")
    with pytest.raises(SpaceError, match=r"unknown config path 'train\.lr\.x'.*'train\.lr' is a value"):
        load_space(f)


def test_range_the_config_rejects_fails(tmp_path):
    # u must stay below T = 1000: the config model, not the space, knows that.
    f = write(tmp_path, "method: defect-gen\nparameters:\n  method.u: {type: int, low: 25, high: 1000}\n")
    with pytest.raises(SpaceError, match=r"'method\.u': value 1000 is rejected by the config"):
        load_space(f)
    f = write(tmp_path, "method: defect-gen\nparameters:\n"
                        "  method.receptive_field: {type: categorical, choices: [small, huge]}\n")
    with pytest.raises(SpaceError, match=r"value 'huge' is rejected"):
        load_space(f)


def test_points_must_lie_inside_the_distributions(tmp_path):
    base = "method: defect-gen\nparameters:\n  method.u: {type: int, low: 25, high: 700}\n" \
           "  sampling.sampler: {type: fixed, value: ddim}\n"
    for point, fragment in (("{method.u: 900}", "'method.u' = 900 is outside"),
                            ("{method.uu: 100}", "'method.uu' is not a parameter"),
                            ("{sampling.sampler: ddim}", "is fixed")):
        f = write(tmp_path, base + f"points_to_evaluate:\n  - {point}\n")
        with pytest.raises(SpaceError) as err:
            load_space(f)
        assert str(f) in str(err.value) and "points_to_evaluate[0]" in str(err.value), str(err.value)
        assert fragment in str(err.value), str(err.value)


def test_conditional_parameter_suggested_only_when_condition_holds(tmp_path):
    space = load_space(write(tmp_path, ALL_KINDS))
    fn = define_by_run(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        constants = fn(trial)
        assert constants == {"train.ema_decay": 0.95}
        sampler = trial.params["sampling.sampler"]
        seen.add(sampler)
        assert ("sampling.steps" in trial.params) == (sampler == "ddim"), trial.params
        study.tell(trial, 0.0)
    assert seen == {"ddim", "ddpm"}
    # FixedTrial: the same function, with the condition forced off and on.
    base = {"method.u": 100, "train.batch_size": 4, "train.lr": 1e-3, "train.weight_decay": 0.0,
            "method.receptive_field": "small"}
    fn(optuna.trial.FixedTrial({**base, "sampling.sampler": "ddpm"}))  # must not ask for sampling.steps
    with pytest.raises(ValueError, match="sampling.steps"):  # FixedTrial: asked but not given
        fn(optuna.trial.FixedTrial({**base, "sampling.sampler": "ddim"}))


def test_condition_on_inactive_or_never_matching_parameter(tmp_path):
    f = write(tmp_path, """
        method: defect-gen
        parameters:
          sampling.sampler: {type: fixed, value: ddim}
          sampling.steps: {type: int, low: 10, high: 50, when: {sampling.sampler: ddpm}}
    """)
    with pytest.raises(SpaceError, match=r"'sampling\.steps'.*can never hold"):
        load_space(f)
    f = write(tmp_path, """
        method: defect-gen
        parameters:
          train.lr: {type: float, low: 1.0e-4, high: 1.0e-3, when: {train.steps: 10}}
          train.steps: {type: int, low: 10, high: 20, when: {train.lr: 1.0e-4}}
    """)
    with pytest.raises(SpaceError, match="cycle"):
        load_space(f)


def test_apply_gives_a_valid_config_with_the_values(tmp_path):
    space = load_space(write(tmp_path, ALL_KINDS))
    cfg0 = resolve_config(method="defect-gen", preset="tiny")
    params = {"method.u": 350, "train.batch_size": 6, "train.lr": 1.5e-3, "train.weight_decay": 0.001,
              "method.receptive_field": "large", "sampling.sampler": "ddim", "sampling.steps": 12}
    cfg = apply(space, cfg0, params)
    assert (cfg.method.u, cfg.method.receptive_field, cfg.train.batch_size) == (350, "large", 6)
    assert cfg.train.lr == pytest.approx(1.5e-3) and cfg.sampling.steps == 12
    assert cfg.train.ema_decay == pytest.approx(0.95)  # the fixed value
    assert cfg0.method.u == 200  # the input is not modified
    with pytest.raises(SpaceError, match="'train.nope' is not a parameter"):
        apply(space, cfg0, {**params, "train.nope": 1})
    with pytest.raises(SpaceError, match="'sampling.steps' is given but its condition"):
        apply(space, cfg0, {**params, "sampling.sampler": "ddpm"})


def test_defectgen_space_loads_and_its_points_validate():
    space = load_space("defect-gen")
    assert space.source == REPO_SPACES / "defect_gen.yaml"
    assert load_space(space.source).parameters == space.parameters  # explicit path works too
    assert space.method == "defect-gen"
    d = to_optuna(space)
    # u inside the laptop preset's trained u_range [100, 500]: a sampling-time choice there
    assert d["method.u"].low == 100 and d["method.u"].high == 500 and d["method.u"].log
    assert set(d["method.receptive_field"].choices) == {"small", "medium", "large"}
    assert d["sampling.steps"] == IntDistribution(10, 50)
    assert "train.lr" not in d  # every lr would be a training of its own (train once, sweep many)
    tiny = resolve_config(method="defect-gen", preset="tiny")
    assert space.points_to_evaluate, "the paper's defaults must be evaluated first"
    fields = []
    for point in space.points_to_evaluate:
        cfg = space.apply(tiny, point)
        assert cfg.method.u == 200 and cfg.sampling.sampler == "ddim"
        fields.append(cfg.method.receptive_field)
    assert fields == ["small", "medium", "large"]  # each trained generator early, the paper's first
    # the laptop and paper presets accept the space as well (the laptop checks u against u_range)
    assert load_space(space.source, preset="laptop").parameters == space.parameters
    assert load_space("defect-gen", preset="paper").parameters == space.parameters


def test_a_presets_own_space_file_wins_for_that_preset_only(tmp_path, monkeypatch):
    """``<method>_<preset>.yaml`` is the default space of that preset's sweeps (the laptop files
    bound what a 2-CPU sweep trains and samples); other presets keep ``<method>.yaml``."""
    assert load_space("defect-gen", preset="laptop").source == REPO_SPACES / "defect_gen_laptop.yaml"
    assert load_space("defect-gen", preset="tiny").source == REPO_SPACES / "defect_gen.yaml"
    laptop = load_space("anomaly-diffusion", preset="laptop")
    assert laptop.source == REPO_SPACES / "anomaly_diffusion_laptop.yaml"
    general = load_space("anomaly-diffusion", preset="paper")
    assert general.source == REPO_SPACES / "anomaly_diffusion.yaml"
    assert to_optuna(laptop)["sampling.steps"] == IntDistribution(10, 25)
    assert to_optuna(general)["sampling.steps"] == IntDistribution(10, 50)
    assert to_optuna(laptop)["method.mask_guidance"].high == 2.0
    assert set(to_optuna(laptop)) == set(to_optuna(general))  # the same parameters, narrower bounds
    # a preset file under the working directory wins over the repository's general file too
    monkeypatch.chdir(tmp_path)
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "crop_paste_laptop.yaml").write_text(
        "method: crop-paste\nparameters:\n  method.scale_min: {type: float, low: 0.5, high: 0.9}\n")
    assert load_space("crop-paste", preset="laptop").source == tmp_path / "search_spaces" / "crop_paste_laptop.yaml"
    assert load_space("crop-paste", preset="tiny").source == REPO_SPACES / "crop_paste.yaml"


def test_extends_replaces_and_drops_parameters_and_keeps_or_replaces_the_points(tmp_path):
    """A narrowing file states only what differs: its parameters replace the base's whole specs in
    place (``null`` drops one), its points replace the base's, left out the base's are kept; the
    resolved mapping is what the resume check compares, so an edit of the base is seen."""
    from defectforge.sweep.run import resume_record
    from defectforge.sweep.space import space_data

    write(tmp_path, """\
        method: defect-gen
        parameters:
          method.u: {type: int, low: 100, high: 500}
          sampling.steps: {type: int, low: 10, high: 50}
          train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        points_to_evaluate:
          - {method.u: 200, sampling.steps: 40}
        objective: {metric: kid_randfeat, mode: min}
        """, "base.yaml")
    narrow = write(tmp_path, """\
        extends: base.yaml
        parameters:
          sampling.steps: {type: int, low: 10, high: 25}
          train.lr: null
        points_to_evaluate:
          - {method.u: 300, sampling.steps: 20}
        """, "narrow.yaml")
    space = load_space(narrow)
    assert space.source == narrow and space.method == "defect-gen"
    assert list(space.parameters) == ["method.u", "sampling.steps"]  # the base's order; lr dropped
    assert to_optuna(space)["sampling.steps"] == IntDistribution(10, 25)
    assert space.points_to_evaluate == [{"method.u": 300, "sampling.steps": 20}]
    assert space.objective == {"metric": "kid_randfeat", "mode": "min"}  # inherited
    # Without its own points the base's are kept, and checked against the narrowed ranges.
    write(tmp_path, "extends: base.yaml\nparameters:\n  method.u: {type: int, low: 300, high: 500}\n", "keep.yaml")
    with pytest.raises(SpaceError, match=r"keep.yaml: points_to_evaluate\[0\].*method.u.*200"):
        load_space(tmp_path / "keep.yaml")
    # An edited base is a changed space for the file extending it (a resumed sweep must match).
    cfg = resolve_config(method="defect-gen", preset="tiny")
    before = resume_record(cfg, narrow, [], ["fabric"])
    base = tmp_path / "base.yaml"
    base.write_text(base.read_text().replace("high: 500", "high: 600"))
    assert resume_record(cfg, narrow, [], ["fabric"]) != before
    assert space_data(narrow)["parameters"]["method.u"] == {"type": "int", "low": 100, "high": 600}


@pytest.mark.parametrize(("body", "message"), [
    ("extends: missing.yaml\nparameters: {}\n", r"bad.yaml: extends 'missing.yaml', but .*missing.yaml is not a file"),
    ("extends: bad.yaml\n", r"'extends' forms a cycle: .*bad.yaml -> .*bad.yaml"),
    ("extends: base.yaml\nmethod: crop-paste\n", r"bad.yaml: method is 'crop-paste', but the file it extends .* "
                                                  r"is for 'defect-gen'"),
    ("extends: base.yaml\nparameters:\n  method.uu: null\n", r"bad.yaml: parameter 'method.uu' is dropped \(null\) "
                                                               r"but .*base.yaml has no such parameter"),
    ("extends: base.yaml\nparameters:\n  method.u: null\n", r"'parameters' must be a non-empty mapping"),
    ("extends: [base.yaml]\n", r"bad.yaml: 'extends' must name a search-space file"),
    ("extends: base.yaml\nparameters: null\n", r"bad.yaml: 'parameters' must be a mapping .* leave the key out"),
    ("extends: ../" + "{dir}/bad.yaml\n", r"'extends' forms a cycle"),  # the same file by another path
    ("extend: base.yaml\n", r"bad.yaml: unknown top-level key\(s\) \['extend'\]"),
])
def test_a_bad_extends_fails_naming_the_file(tmp_path, body, message):
    write(tmp_path, "method: defect-gen\nparameters:\n  method.u: {type: int, low: 100, high: 500}\n", "base.yaml")
    with pytest.raises(SpaceError, match=message):
        load_space(write(tmp_path, body.replace("{dir}", tmp_path.name), "bad.yaml"))


def test_an_error_in_a_base_file_names_the_chain(tmp_path):
    """The entry at fault may be in the base: the message names every file of the space."""
    write(tmp_path, "method: defect-gen\nparameters:\n  method.uu: {type: int, low: 100, high: 500}\n", "base.yaml")
    narrow = write(tmp_path, "extends: base.yaml\nparameters:\n  sampling.steps: {type: int, low: 10, high: 25}\n",
                   "narrow.yaml")
    with pytest.raises(SpaceError, match=r"unknown config path 'method.uu'.*the space of narrow.yaml is "
                                         r".*base.yaml \+ .*narrow.yaml"):
        load_space(narrow)


def test_the_laptop_files_narrow_their_methods_general_space():
    """The repository's laptop files extend the general ones: the same parameters in the same
    order, only the bounds they list differ."""
    for method, narrowed in [("defect-gen", {"method.receptive_field"}),
                             ("anomaly-diffusion", {"method.mask_guidance", "sampling.steps"})]:
        laptop, general = load_space(method, preset="laptop"), load_space(method, preset="paper")
        assert list(laptop.parameters) == list(general.parameters)
        differ = {p for p in general.parameters if laptop.parameters[p] != general.parameters[p]}
        assert differ == narrowed, method


def test_laptop_main_job_space_sweeps_two_receptive_fields_inside_the_trained_u_range():
    space = load_space(REPO_SPACES / "defect_gen_laptop.yaml", preset="laptop")
    d = to_optuna(space)
    assert set(d["method.receptive_field"].choices) == {"small", "medium"}
    laptop = resolve_config(method="defect-gen", preset="laptop")
    lo, hi = laptop.method.u_range
    assert (d["method.u"].low, d["method.u"].high) == (lo, hi)


def test_crop_paste_space_loads():
    space = load_space("crop-paste")
    assert space.source.name == "crop_paste.yaml"
    cfg = resolve_config(method="crop-paste", preset="tiny")
    for point in space.points_to_evaluate:
        assert space.apply(cfg, point).method.scale_min <= space.apply(cfg, point).method.scale_max


def test_method_name_mismatch_and_missing_file(tmp_path):
    with pytest.raises(SpaceError, match="no search space for method 'defect-gan'"):
        load_space("defect-gan")
    with pytest.raises(SpaceError, match="unknown method 'nope'"):
        load_space(write(tmp_path, "method: nope\nparameters:\n  train.lr: {type: fixed, value: 1}\n"))


def _tpe_draws(space, seed: int, n: int = 12) -> list[dict]:
    fn = define_by_run(space)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4))
    for point in space.points_to_evaluate:
        study.enqueue_trial(point)
    draws = []
    for _ in range(n):
        trial = study.ask()
        fn(trial)
        p = trial.params
        draws.append(dict(p))
        # a deterministic objective so TPE's model phase depends only on the seed
        score = -abs(p["method.u"] - 300) / 700 \
            + (p["method.receptive_field"] == "medium") - p.get("sampling.steps", 0) / 100
        study.tell(trial, score)
    return draws


def test_seeded_tpe_study_is_reproducible():
    space = load_space("defect-gen")
    a, b, c = _tpe_draws(space, 7), _tpe_draws(space, 7), _tpe_draws(space, 8)
    assert a == b
    assert a != c
    assert a[0] == space.points_to_evaluate[0]  # the enqueued paper defaults come first
    dists = to_optuna(space)
    for draw in a:
        for key, value in draw.items():
            assert dists[key]._contains(dists[key].to_internal_repr(value))


def test_ray_optuna_search_uses_define_by_run_and_points():
    """The contract the sweep runner relies on: OptunaSearch(space=define_by_run(...)) yields flat
    dotted keys incl. the fixed values, the paper defaults first; apply() turns them into a config."""
    from ray.tune.search.optuna import OptunaSearch

    space = load_space("defect-gen")
    searcher = OptunaSearch(space=define_by_run(space), metric="score", mode="max",
                            points_to_evaluate=space.points_to_evaluate,
                            sampler=optuna.samplers.TPESampler(seed=0))
    tiny = resolve_config(method="defect-gen", preset="tiny")
    configs = []
    for i in range(3):
        config = searcher.suggest(f"t{i}")
        configs.append(config)
        cfg = space.apply(tiny, config)
        assert cfg.method.u == config["method.u"] and cfg.sampling.steps == config["sampling.steps"]
        searcher.on_trial_complete(f"t{i}", {"score": float(i)})
    assert configs[0] == {**space.points_to_evaluate[0], "sampling.sampler": "ddim"}


def test_a_command_line_override_of_a_swept_field_is_said(tmp_path):
    """``sampling.steps=4`` on a sweep's command line is replaced by each trial's sampled value when
    the space sweeps it (or fixes it): the sweep says so, naming the field and the space; a field
    the space does not name is not mentioned."""
    from defectforge.cli.sweep import swept_overrides

    overrides = ["sampling.steps=4", "train.steps=10", "method.k=3"]
    cfg = resolve_config(method="anomaly-diffusion", preset="tiny", overrides=overrides)
    lines = swept_overrides(cfg, overrides)
    space = load_space("anomaly-diffusion", preset="tiny")
    assert "train.steps" not in space.parameters and {"sampling.steps", "method.k"} <= set(space.parameters)
    assert len(lines) == 2 and "sampling.steps (command line)" in lines[0] and "method.k (command line)" in lines[1]
    assert all(str(space.source) in line for line in lines)
    own = write(tmp_path, """
        method: anomaly-diffusion
        parameters:
          train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
          sampling.steps: {type: fixed, value: 8}
    """)
    cfg = resolve_config(method="anomaly-diffusion", preset="tiny", overrides=[f"sweep.space={own}", *overrides])
    [line] = swept_overrides(cfg, overrides)  # method.k is not in this space
    assert line.startswith("[sweep] sampling.steps (command line) is fixed to 8 by the search space")
    same = ["sampling.steps=8"]  # the value the space fixes anyway: nothing to say
    assert swept_overrides(resolve_config(method="anomaly-diffusion", preset="tiny",
                                          overrides=[f"sweep.space={own}", *same]), same) == []
    # a section given whole names the swept fields under it, each once
    whole = ["sampling={steps: 4}", "sampling.steps=4"]
    cfg = resolve_config(method="anomaly-diffusion", preset="tiny", overrides=whole)
    [line] = swept_overrides(cfg, whole)
    assert line.startswith("[sweep] sampling.steps (command line) is swept by")
    # a space of another method: the sweep refuses it itself, naming both methods
    mine = ["sampling.steps=4"]
    cfg = resolve_config(method="defect-gen", preset="tiny", overrides=[f"sweep.space={own}", *mine])
    assert swept_overrides(cfg, mine) == []
