"""The override forms a Hydra / NeMo user types (``key=a,b``, ``+key=``, ``hydra.*``, ``${...}``): each composes as
meant or is one line naming the key and the fix, never Hydra's own message under the key ``recipe``."""

import pytest

from evolm_nemo.config import ConfigError, RootConfig, compose
from evolm_nemo.stages.pretrain_data import check_split


def test_a_comma_separated_string_is_the_string_and_a_comma_list_elsewhere_says_how_to_write_it():
    """`data.split=98,2,0` (megatron's `--split 98,2,0`, and what README, recipes/config.yaml and the held-out loss
    error tell you to type) was Hydra's "Ambiguous value" (a sweep) under the key `recipe`."""
    cfg = compose("config", ["data.split=98,2,0", "run.name=a,b"], RootConfig)
    assert cfg.data.split == "98,2,0" and check_split(cfg.data.split) == [98, 2, 0] and cfg.run.name == "a,b"
    assert compose("config", ["data.split='98,2,0'"], RootConfig).data.split == "98,2,0"  # quoted still works
    # README's `evolm report dynamics='runs/suite_nano/pt_*,runs/suite_nano/cpt_*'` (the shell drops the quotes): the
    # report splits the globs itself; paths with / * ~ : were read as a sweep and told to give one value
    from evolm_nemo.evaluation.report import ReportConfig

    globs = "runs/suite_nano/pt_*,~/runs/c:d/cpt_*"
    assert compose("report", [f"dynamics={globs}", "out=runs/x"], ReportConfig).dynamics == globs
    for override, key, fix in [("train.seed=1,2", "train.seed", "give it one value"),
                               ("data.weights=1,2", "data.weights", "write the list as data.weights=[1,2]")]:
        with pytest.raises(ConfigError) as err:
            compose("config", [override], RootConfig)
        assert err.value.key == key and "a sweep in Hydra's grammar" in err.value.message, str(err.value)
        assert fix in err.value.message, str(err.value)


@pytest.mark.parametrize("override", ["hydra.run.dir=/tmp/elsewhere", "hydra.job.chdir=true", "+hydra.verbose=true",
                                      "hydra/launcher=basic"])
def test_hydras_runtime_settings_are_refused_not_ignored(override):
    """Hydra applied them to its runtime config, which evolm never reads: `hydra.run.dir=x` trained into
    runs/<model>_<stage> without a word."""
    with pytest.raises(ConfigError) as err:
        compose("config", [override], RootConfig)
    assert err.value.key == override.lstrip("+").partition("=")[0] and "run.out_dir" in err.value.message


@pytest.mark.parametrize("override, key, says", [
    ("+experiment=demo", "experiment", "in the recipe's defaults list already; pick it without '+'"),
    ("+train.seed=3", "train.seed", "in the recipe already; set it without '+'"),
    ("lineage={a: 1}", "lineage", "not in the composed recipe; add it with +lineage=<value>"),
    ("optim.stage_lr={foo: 1}", "optim.stage_lr.foo", "unknown key"),
    ("train={foo: 1}", "train.foo", "unknown key; valid keys in train: tokens"),
    ("~train.seed", "train.seed", "removing a key (Hydra's ~key) is not supported"),  # was: "overrides are key=value"
])
def test_plus_and_dict_overrides_name_the_key_and_the_fix(override, key, says):
    """Hydra's own text under the key `recipe` ("Multiple values for experiment. To override a value use 'override
    experiment: demo'"), or a key called unknown while the list of valid keys named it (lineage)."""
    with pytest.raises(ConfigError) as err:
        compose("config", [override], RootConfig)
    assert err.value.key == key and says in err.value.message, str(err.value)
    assert compose("config", ["+lineage={a: 1}"], RootConfig).lineage == {"a": 1}  # as the error says


@pytest.mark.parametrize("override, key, says", [
    ("run.out_dir=${oc.env:EVOLM_TEST_NO_SUCH_VAR}/x", "run.out_dir", "Environment variable 'EVOLM_TEST_NO_SUCH_VAR'"),
    ("run.name=${model.nme}", "run.name", "${model.nme}: Interpolation key 'model.nme' not found"),
    ("data.paths=[${nope}]", "data.paths", "Interpolation key 'nope' not found"),
    ("optim.stage_lr.sft=${nope}", "optim.stage_lr.sft", "${nope}: Interpolation key 'nope' not found"),  # a dict's
    ("run.name=${model.name", "run.name", "cannot parse '${model.name'"),
])
def test_an_interpolation_that_fails_names_its_key(override, key, says):
    """OmegaConf's error carries no key (`error: recipe: Interpolation key 'model.nme' not found`), Hydra's parse
    error names no override (`error: recipe: mismatched input '{' expecting <EOF>`)."""
    with pytest.raises(ConfigError) as err:
        compose("config", [override], RootConfig)
    assert err.value.key == key and says in err.value.message, str(err.value)
    assert compose("config", ["run.out_dir=${oc.env:HOME}/${run.name}"], RootConfig).run.out_dir.endswith(
        "/tiny_pretrain")  # one that resolves is resolved


def test_environment_variables_that_shape_a_command_are_named_when_wrong(monkeypatch, tmp_path):
    """EVOLM_RECIPES pointing nowhere was `error: recipe: Primary config directory not found.`; a WORLD_SIZE that is
    no positive integer a ValueError traceback (or, 0, a division by zero) from the recipe's checks."""
    from evolm_nemo.config.validate import validate

    cfg = compose("config", [], RootConfig)
    monkeypatch.setenv("EVOLM_RECIPES", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as err:
        compose("config", [], RootConfig)
    assert err.value.key == "EVOLM_RECIPES" and "nowhere is not a directory" in err.value.message
    monkeypatch.delenv("EVOLM_RECIPES")
    for bad in ("abc", "0", "²"):  # (a superscript: isdigit() took it, int() raised)
        monkeypatch.setenv("WORLD_SIZE", bad)
        with pytest.raises(ConfigError) as err:
            validate(cfg)
        assert err.value.key == "WORLD_SIZE" and repr(bad) in err.value.message
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert validate(cfg).world_size == 1
