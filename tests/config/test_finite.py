"""Numbers a run cannot compute with are refused in one line before anything is built: NaN and inf (every range rule
written as a comparison let NaN through; inf trained NaN weights), values past float32's range, the ranges the
recipe's keys document, the mix weights megatron asserts on, and generator errors that named no recipe key."""

import dataclasses
import math
import typing

import pytest

from evolm_nemo.config import ConfigError, RootConfig, compose
from evolm_nemo.config.validate import validate
from tests.conftest import refused_in_process


def _refused(capsys, tmp_path, overrides, key):
    line = refused_in_process(capsys, "train", [*overrides, f"run.out_dir={tmp_path / 'run'}",
                                                f"data.cache_dir={tmp_path / 'cache'}"], key)
    assert list(tmp_path.iterdir()) == []  # nothing written: no run directory, no generated corpus
    return line


@pytest.mark.parametrize("overrides,key", [
    # tracebacks after the model was built
    (["optim.lr=nan"], "optim.lr"),
    (["optim.min_lr=nan"], "optim.min_lr"),
    (["optim.weight_decay=nan"], "optim.weight_decay"),
    (["model.init_method_std=nan"], "model.init_method_std"),
    (["optim.lr=1e300"], "optim.lr"),  # finite in Python, inf in the optimizer's float32 tensors
    # accepted silently with bad results
    (["optim.lr=inf"], "optim.lr"),  # NaN weights committed, "lr": Infinity in metrics.jsonl
    (["optim.clip_grad=nan"], "optim.clip_grad"),  # no clipping at all
    (["stage=ppo", "rl.temperature=inf"], "rl.temperature"),
    (["stage=ppo", "rl.critic_lr=inf"], "rl.critic_lr"),
    (["data.max_epochs=nan"], "data.max_epochs"),
    # failed at iteration 1 blaming optim.lr ("loss is nan")
    (["stage=rm", "rm.margin=nan"], "rm.margin"),
    (["stage=dpo", "dpo.beta=nan"], "dpo.beta"),
    (["stage=dpo", "dpo.beta=inf"], "dpo.beta"),
    (["stage=dpo", "dpo.sft_weight=nan"], "dpo.sft_weight"),
    (["stage=grpo", "rl.entropy_bonus=nan"], "rl.entropy_bonus"),
    (["stage=ppo", "rl.entropy_bonus=inf"], "rl.entropy_bonus"),
    (["stage=grpo", "rl.kl=loss", "rl.initial_policy_kl_penalty=nan"], "rl.initial_policy_kl_penalty"),
    # in a dict and in a list: the key an override sets
    (["optim.stage_lr.sft=inf"], "optim.stage_lr.sft"),
    (["train.peak_tflops=-1e39"], "train.peak_tflops"),
])
def test_a_nonfinite_number_is_refused_before_anything_is_built(capsys, tmp_path, overrides, key):
    line = _refused(capsys, tmp_path, overrides, key)
    assert "finite number within float32's range" in line, line


def _nan_of(hint):
    """A NaN in the shape of a schema field's type (a list, a dict or a plain float), or None for a non-float."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if hint is float:
        return math.nan
    if origin is typing.Union:  # Optional[float]
        return next((v for v in map(_nan_of, args) if v is not None), None)
    if origin is list and args == (float,):
        return [1.0, math.nan]
    if origin is dict and args[1:] == (float,):
        return {"x": math.nan}
    return None


def _float_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _float_fields(hints[f.name], f"{prefix}{f.name}.")
        elif (nan := _nan_of(hints[f.name])) is not None:
            yield f"{prefix}{f.name}", nan


FLOAT_FIELDS = list(_float_fields(RootConfig))


def test_the_schema_has_the_floats_this_file_walks():
    keys = {k for k, _ in FLOAT_FIELDS}
    assert {"optim.lr", "data.weights", "optim.stage_lr", "rl.tis_cap", "train.peak_tflops", "dpo.beta"} <= keys
    assert len(keys) > 35, sorted(keys)


@pytest.mark.parametrize("key,nan", FLOAT_FIELDS, ids=[k for k, _ in FLOAT_FIELDS])
def test_every_float_of_the_schema_must_be_finite(key, nan):
    """The generic rule, field by field: one a range rule forgets (or a float added later) is still refused, by
    ``validate`` itself (what `evolm train` and `evolm suite plan` both run first)."""
    cfg = RootConfig()
    group, name = key.split(".")
    setattr(getattr(cfg, group), name, nan)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    assert err.value.key == (f"{key}.x" if isinstance(nan, dict) else key), str(err.value)
    assert "finite" in err.value.message and ("at [1]" in err.value.message) == isinstance(nan, list)


def test_lineage_is_provenance_not_a_setting():
    cfg = RootConfig()
    cfg.lineage = {"note": math.nan}  # free-form, carried as given
    validate(cfg, world_size=1)


@pytest.mark.parametrize("weights", ["[-1,2]", "[inf,1]", "[nan,1]", "[1,1e39]"])
def test_mix_weights_are_finite_and_nonnegative(capsys, tmp_path, weights):
    """A negative or infinite weight died in megatron's AssertionError after the model was built; NaN was refused as
    "all weights are zero"."""
    line = _refused(capsys, tmp_path, ["data.synthetic_kinds=[text,math]", f"data.weights={weights}"], "data.weights")
    assert "finite number" in line and "all weights are zero" not in line, line


@pytest.mark.parametrize("overrides,key,words", [
    (["model.norm_eps=0"], "model.norm_eps", "> 0"),
    (["model.rope_base=-10000"], "model.rope_base", "> 0"),
    (["model.init_method_std=-0.02"], "model.init_method_std", "> 0"),
    (["model.init_method_std=0"], "model.init_method_std", "> 0"),
    (["train.peak_tflops=-5"], "train.peak_tflops", "> 0"),
    (["data.synthetic_val_docs=-1"], "data.synthetic_val_docs", ">= 0"),
    # the generated corpus's errors named their arguments (vocab_size, synthetic_docs), after the process group
    (["model.vocab_size=100"], "model.vocab_size", "at least 260"),
    (["data.synthetic_docs=0"], "data.synthetic_docs", "> 0"),
])
def test_documented_ranges_are_refused_by_their_recipe_key(capsys, tmp_path, overrides, key, words):
    line = _refused(capsys, tmp_path, overrides, key)
    assert words in line, line


@pytest.mark.parametrize("overrides,key", [
    (["rl.val_interval=-1"], "rl.val_interval"),  # 0 is off; a negative one asked for validation data
    (["rl.initial_policy_kl_penalty=-0.1"], "rl.initial_policy_kl_penalty"),  # even with rl.kl=off
    (["rl.kl=loss", "rl.initial_policy_kl_penalty=0"], "rl.initial_policy_kl_penalty"),  # (the rule before)
    # a KL coefficient without a KL term would be silently ignored (EvoLM's own scripts' trap)
    (["rl.initial_policy_kl_penalty=0.0001"], "rl.initial_policy_kl_penalty"),
])
def test_rl_ranges(overrides, key):
    """``rl.check_ranges`` is what the trainer and `evolm suite plan` refuse from the recipe alone (the trainer reaches
    it after the parent checkpoint's checks, so it is called here as the suite plan calls it)."""
    from evolm_nemo.stages.rl import check_ranges

    check_ranges(compose("config", ["stage=ppo"], RootConfig))
    with pytest.raises(ConfigError) as err:
        check_ranges(compose("config", ["stage=ppo", *overrides], RootConfig))
    assert err.value.key == key, str(err.value)


@pytest.mark.parametrize("stage,override", [
    ("grpo", "rl.critic_lr=1e-3"), ("grpo", "rl.value_clip=0.2"), ("grpo", "rl.gae_lambda=0.95"),
    ("grpo", "rl.discount_factor=0.99"), ("grpo", "rl.whiten_advantages=false"), ("ppo", "rl.grpo_normalize_std=false"),
])
def test_the_other_algorithms_rl_keys_are_refused_not_ignored(stage, override):
    """GRPO has no critic and no GAE, PPO no groups: a value other than the default of a key only the other one reads
    is refused (the run would silently train without it); the default itself (every preset's) passes."""
    from evolm_nemo.stages.rl import check_ranges

    check_ranges(compose("config", [f"stage={stage}"], RootConfig))
    with pytest.raises(ConfigError) as err:
        check_ranges(compose("config", [f"stage={stage}", override], RootConfig))
    assert err.value.key == override.split("=")[0] and "would be ignored" in err.value.message, str(err.value)
