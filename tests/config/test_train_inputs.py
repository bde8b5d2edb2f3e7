"""Issue 10 item 10, training side: bad inputs that used to give tracebacks (or fail only after training) are one line
naming the key or file before any process group, model or index is built: train.init_from pointing at an HF
directory, an unwritable run.out_dir / data.cache_dir, an unusable data.split, all-zero blend weights, and data
tokenized with a larger vocabulary than the model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evolm_nemo import cli
from evolm_nemo.config import ConfigError, RootConfig, compose
from evolm_nemo.stages import plan_run
from evolm_nemo.stages.pretrain_data import check_token_ids
from evolm_nemo.data.synthetic import ensure_synthetic
from tests.conftest import run_evolm, unwritable_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A generated corpus (prepared .bin/.idx, 512-token tokenizer) as an indexed dataset."""
    c = ensure_synthetic(tmp_path_factory.mktemp("corpus"), 200, 7, vocab_size=512)
    return str(c.prefix), str(c.tokenizer_dir)


def _indexed(corpus, *more) -> list[str]:
    prefix, tok = corpus
    return ["data.source=indexed", f"data.paths=[{prefix}]", f"data.tokenizer={tok}", *more]


def _refused(capsys, args: list[str], key: str, *fragments: str) -> str:
    assert cli.main(["train", *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {key}: "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


def test_init_from_an_hf_directory_says_import_it_first(tmp_path, capsys):
    from tests.conversion._sources import make_source, make_tokenizer

    make_tokenizer(tmp_path / "tok")
    make_source("tiny_gqa", tmp_path / "hf", tmp_path / "tok")
    capsys.readouterr()  # transformers' save progress bar
    line = _refused(capsys, ["stage=sft", f"train.init_from={tmp_path / 'hf'}", f"run.out_dir={tmp_path / 'run'}"],
                    "train.init_from", "is a HuggingFace model directory",
                    f"import it first with evolm import-hf src={tmp_path / 'hf'} dst=")
    assert "Traceback" not in line and not (tmp_path / "run").exists()


def test_unwritable_run_dir_and_cache_are_found_before_training(tmp_path, capsys):
    ro = unwritable_dir(tmp_path)
    _refused(capsys, [f"run.out_dir={ro / 'run'}"], "run.out_dir", "not writable")
    _refused(capsys, [f"run.out_dir={tmp_path / 'run'}", f"data.cache_dir={ro / 'cache'}"], "data.cache_dir",
             "not writable")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _refused(capsys, [f"run.out_dir={a_file}"], "run.out_dir", "is a file, not a directory")
    _refused(capsys, [f"run.out_dir={a_file / 'run'}"], "run.out_dir", "is a file, not a directory")
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".evolm-write-probe-*"))


@pytest.mark.parametrize("split, fragment", [
    ("abc", "expected up to three non-negative"),
    ("'0,100,0'", "the train part of '0,100,0' is 0"),
    ("'1,2,3,4'", "expected up to three"),
    ("'-1,0,0'", "expected up to three non-negative"),
])
def test_bad_split(split, fragment, capsys, tmp_path):
    _refused(capsys, [f"data.split={split}", f"run.out_dir={tmp_path / 'run'}"], "data.split", fragment)


def test_good_splits_validate(corpus):
    for split in ("100,0,0", "98,2,0", "1", "99/1/0"):
        plan_run(compose("config", _indexed(corpus, f"data.split='{split}'"), RootConfig))


def test_all_zero_blend_weights(corpus, capsys, tmp_path):
    prefix, _ = corpus
    _refused(capsys, _indexed(corpus, f"data.paths=[{prefix},{prefix}]", "data.weights=[0,0]",
                              f"run.out_dir={tmp_path / 'run'}"), "data.weights", "all weights are zero")
    _refused(capsys, ["data.synthetic_kinds=[text,math]", "data.weights=[0.0,0.0]", f"run.out_dir={tmp_path / 'r'}"],
             "data.weights", "all weights are zero")


def test_data_with_a_larger_vocabulary_than_the_model(corpus, capsys, tmp_path):
    prefix, _ = corpus
    top = int(np.fromfile(prefix + ".bin", dtype=np.uint16).max())
    assert 256 <= top < 512
    line = _refused(capsys, _indexed(corpus, "model.vocab_size=256", f"run.out_dir={tmp_path / 'run'}"),
                    "data.paths", f"{prefix}.bin", f"largest token id {top} >= model.vocab_size=256",
                    "larger vocabulary")
    assert line
    check_token_ids([prefix], 512)  # fits: no error


def test_held_out_files_are_checked_as_training_data_is(corpus, capsys, tmp_path):
    """data.val_paths is read by the model as data.paths is: a held-out prefix tokenized with a larger vocabulary
    (it failed at the first validation, after the model was built, as an embedding-index traceback) or without its
    .bin is one line naming data.val_paths before anything is built."""
    small = ensure_synthetic(tmp_path / "small", 200, 8, vocab_size=300)  # the model's vocabulary: 300
    prefix, _ = corpus
    top = int(np.fromfile(prefix + ".bin", dtype=np.uint16).max())
    assert top >= 300
    base = ["data.source=indexed", f"data.paths=[{small.prefix}]", f"data.tokenizer={small.tokenizer_dir}",
            "model.vocab_size=300", "train.val_tokens_interval=1024", f"run.out_dir={tmp_path / 'run'}"]
    _refused(capsys, [*base, f"data.val_paths=[{prefix}]"], "data.val_paths", f"{prefix}.bin",
             f"largest token id {top} >= model.vocab_size=300")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "x.idx").write_bytes(Path(prefix + ".idx").read_bytes())
    _refused(capsys, [*base, f"data.val_paths=[{tmp_path / 'half' / 'x'}]"], "data.val_paths", "no ")
    assert not (tmp_path / "run").exists()


def test_token_check_reads_big_files_whole_once(tmp_path, capsys):
    """A .bin bigger than what is read at every check: it was sampled (64 evenly spaced chunks), so out-of-vocabulary
    ids between the chunks reached the embedding as a traceback after the model was built. Now it is read whole
    once, the largest id recorded beside it (<prefix>.verified) and read from there until the file changes."""
    import json
    import os

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    def build(prefix, top_at):
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for i in range(64):
            doc = np.full(4096, 7, dtype=np.int64)
            doc[top_at] = 39_999 if i == 50 else 7  # one id, in one document, where no sample chunk reads
            builder.add_document(torch.from_numpy(doc), [4096])
        builder.finalize(prefix + ".idx")

    prefix = str(tmp_path / "big")
    build(prefix, 2000)
    assert Path(prefix + ".bin").stat().st_size == 64 * 4096 * 2
    with pytest.raises(ConfigError) as err:
        check_token_ids([prefix], 32_000, sample_bytes=64 << 10)
    assert err.value.key == "data.paths" and "its largest token id 39999 >= model.vocab_size=32000" in err.value.message
    assert capsys.readouterr().out == f"[evolm] reading {prefix}.bin (0.0 GiB) once for its largest token id\n"
    assert check_token_ids([prefix], 40_000, sample_bytes=64 << 10) == 64 * 4096
    record = json.loads(Path(prefix + ".verified").read_text())
    assert record["measured"] == {"max_token_id": 39_999}
    record["measured"]["max_token_id"] = 123  # later checks read the record, not the data ...
    Path(prefix + ".verified").write_text(json.dumps(record))
    check_token_ids([prefix], 124, sample_bytes=64 << 10)
    os.utime(prefix + ".bin")  # ... until the file changes
    with pytest.raises(ConfigError, match="39999 >= model.vocab_size=124"):
        check_token_ids([prefix], 124, sample_bytes=64 << 10)
    # past full_bytes (hundreds of GB would outlast the process group's timeout) the file is sampled, and says so
    with pytest.raises(ConfigError, match="a sample of 32,768 of its 262,144 tokens has id 7 >= model.vocab_size=5"):
        check_token_ids([prefix], 5, sample_bytes=64 << 10, full_bytes=256 << 10)
    (tmp_path / "bad.idx").write_bytes(b"garbage" * 4)
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        check_token_ids([str(tmp_path / "bad")], 512)
    assert "unreadable index" in err.value.message


def test_an_index_and_a_bin_that_do_not_belong_together(corpus, tmp_path):
    """A cut .bin or .idx, an empty .bin, or an index of another preparation: megatron tracebacks in the first step
    (after the model was built) or -- an index of a smaller corpus -- training on wrong document boundaries without a
    word. Each is one line naming both files, before anything is built."""
    import shutil

    prefix, _ = corpus
    other = ensure_synthetic(tmp_path / "other", 100, 8, vocab_size=512)  # a smaller corpus, the same vocabulary
    cases = {"cut_bin": lambda d: Path(d + ".bin").write_bytes(Path(prefix + ".bin").read_bytes()[:20_000]),
             "empty_bin": lambda d: Path(d + ".bin").write_bytes(b""),
             "cut_idx": lambda d: Path(d + ".idx").write_bytes(Path(prefix + ".idx").read_bytes()[:2_000]),
             "other_idx": lambda d: shutil.copy(other.prefix + ".idx", d + ".idx")}
    for name, damage in cases.items():
        d = str(tmp_path / name / "corpus")
        Path(d).parent.mkdir()
        shutil.copy(prefix + ".bin", d + ".bin")
        shutil.copy(prefix + ".idx", d + ".idx")
        damage(d)
        with pytest.raises(ConfigError) as err:
            check_token_ids([d], 512)
        message = err.value.message
        if name == "cut_idx":
            assert "unreadable index" in message and "cut short" in message, message
        else:
            assert f"{d}.idx describes" in message and f"but {d}.bin holds" in message, message


def test_one_real_process_for_the_exit_code(tmp_path):
    proc = run_evolm("train", ["data.split=abc", f"run.out_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error: data.split: ")


def test_absurd_budgets_are_refused_before_any_index_is_built(corpus, tmp_path):
    # item 11: train.tokens=1000T used to sit for minutes building megatron's sample indices before the plan
    import time

    t0 = time.monotonic()
    proc = run_evolm("train", ["train.tokens=1000T", "train.iters=null", f"run.out_dir={tmp_path / 'run'}",
                               f"data.cache_dir={tmp_path / 'cache'}"], check=False)
    assert proc.returncode == 2 and time.monotonic() - t0 < 60
    line = proc.stderr.strip()
    assert line.startswith("error: train.tokens: 1000T means 976,562,500,000 iterations") and "\n" not in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    # relative to the prepared data: 2B tokens are thousands of passes over this corpus
    with pytest.raises(ConfigError) as err:
        plan_run(compose("config", _indexed(corpus, "train.tokens=2B", "train.iters=null"), RootConfig))
    assert err.value.key == "train.tokens" and "passes over the" in err.value.message
    plan_run(compose("config", _indexed(corpus, "train.tokens=1M", "train.iters=null"), RootConfig))


def test_the_plan_is_printed_before_the_dataset_indices_are_built(corpus, tmp_path):
    """Item 11: the plan (iterations, tokens, samples) comes first; megatron's index build can take minutes."""
    proc = run_evolm("train", [*_indexed(corpus), "train.iters=2", f"run.out_dir={tmp_path / 'r'}",
                               f"data.cache_dir={tmp_path / 'c'}", "train.progress=false", "train.tensorboard=false"])
    lines = proc.stdout.splitlines()
    plan = next(i for i, ln in enumerate(lines) if ln.startswith("[evolm] plan: pretrain tiny, 2 iters x "))
    header = next(i for i, ln in enumerate(lines) if ln.startswith("[evolm] pretrain tiny:"))
    assert plan < header and "building the dataset indices" in lines[plan]


# ------------------------------------------------------------------------------------------ issue 19 item 2


def _checksums(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256): what must be unchanged after a refused command."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stable_run(tmp_path_factory, data_cache):
    """A finished tiny WSD pretraining run: checkpoints, run.json and metrics.jsonl."""
    from tests.conftest import tiny

    out = tmp_path_factory.mktemp("stable") / "run"
    run_evolm("train", tiny(out, data_cache, "train.iters=2", "optim.decay_style=wsd"))
    assert list((out / "checkpoints").glob("iter_*")) and (out / "metrics.jsonl").is_file()
    return out


@pytest.mark.parametrize("case", ["sft_init_from_itself", "wsd_branch_from_itself"])
def test_overwrite_never_clears_the_runs_own_inputs(stable_run, data_cache, case):
    """`train.overwrite=true` into the directory the run starts from (an SFT whose parent is its own run.out_dir, a
    WSD branch whose stable run is its own run.out_dir) used to remove the parent's checkpoints (and metrics) and then
    fail to load them: refused in one line naming the input, the parent's every byte unchanged."""
    from tests.conftest import tiny

    before = _checksums(stable_run)
    extra = {"sft_init_from_itself": ["stage=sft", f"train.init_from={stable_run}", "train.resume=false"],
             "wsd_branch_from_itself": ["optim.decay_style=wsd", f"train.branch_from={stable_run}", "train.iters=4"]}
    key = {"sft_init_from_itself": "train.init_from", "wsd_branch_from_itself": "train.branch_from"}[case]
    proc = run_evolm("train", tiny(stable_run, data_cache, "train.overwrite=true", *extra[case]), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {key}: {stable_run} lies inside run.out_dir=") and \
        "train.overwrite=true removes" in lines[0], lines[0]
    assert _checksums(stable_run) == before


@pytest.mark.parametrize("key, where", [
    ("rl.critic_init", "checkpoints"),
    ("rl.reward_model", "checkpoints"),
    ("data.paths", "rl.jsonl"),
    ("rl.val_data", "val.jsonl"),
])
def test_every_input_inside_the_run_dir_is_refused_with_overwrite(stable_run, tmp_path, capsys, key, where):
    """The one rule (stages.check_inputs_outside_run) covers every input of a recipe: the RL critic and reward
    model, prompt files and validation data inside the run directory that train.overwrite=true starts over."""
    before = _checksums(stable_run)
    inside = stable_run / where
    args = ["stage=ppo", f"run.out_dir={stable_run}", "train.overwrite=true", f"train.init_from={tmp_path / 'sft'}",
            "data.source=indexed", f"data.paths=[{tmp_path / 'prompts.jsonl'}]"]
    args += {"rl.critic_init": [f"rl.critic_init={inside}"],
             "rl.reward_model": ["rl.reward=rm", f"rl.reward_model={inside}"],
             "data.paths": [f"data.paths=[{inside}]"],
             "rl.val_data": [f"rl.val_data={inside}", "rl.val_interval=1"]}[key]
    _refused(capsys, args, key, f"{inside} lies inside run.out_dir=")
    assert _checksums(stable_run) == before


def test_inputs_inside_the_run_dir_are_fine_without_overwrite(stable_run, tmp_path):
    """Without train.overwrite nothing of the run directory is removed: the rule does not apply (a fresh start
    there is refused by the run directory's own check instead)."""
    cfg = compose("config", ["stage=sft", f"run.out_dir={stable_run}", f"train.init_from={stable_run}",
                             "train.resume=false"], RootConfig)
    from evolm_nemo.stages import check_inputs_outside_run

    check_inputs_outside_run(cfg)


def _decoys(root: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of foreign directory in a folder of its own (so that no decoy's kind leaks into another's path):
    name -> (the run.out_dir to try, what the refusal must say)."""
    import json

    (root / "a" / "hf").mkdir(parents=True)
    (root / "a" / "hf" / "evolm_export.json").write_text("{}")
    (root / "b" / "ds").mkdir(parents=True)
    (root / "b" / "ds" / "manifest.json").write_text(json.dumps({"format": "evolm-sft-1"}))
    (root / "c" / "iter_0000001").mkdir(parents=True)
    (root / "c" / "iter_0000001" / "evolm.json").write_text("{}")
    (root / "d" / "hf").mkdir(parents=True)
    (root / "d" / "hf" / "evolm_export.json").write_text("{}")
    (root / "e" / "run" / "checkpoints").mkdir(parents=True)
    (root / "e" / "run" / "run.json").write_text("{}")
    return {"hf-export": (root / "a" / "hf", "is an HF export"), "sft-dataset": (root / "b" / "ds", "is an SFT dataset"),
            "checkpoint": (root / "c" / "iter_0000001", "is an evolm checkpoint"),
            "inside-export": (root / "d" / "hf" / "run", "lies inside an HF export"),
            "run-tensorboard": (root / "e" / "run" / "tensorboard", "own tensorboard")}


@pytest.mark.parametrize("what", ["hf-export", "sft-dataset", "checkpoint", "inside-export", "run-tensorboard"])
def test_a_run_directory_is_never_another_commands_output(tmp_path, capsys, what):
    """`evolm train run.out_dir=<an HF export / a dataset / a checkpoint>` wrote a run into it (mixing the two);
    now one line before anything is made, naming what the directory is, every byte as it was."""
    from tests.conftest import refused_in_process, tiny, tree_bytes

    target, says = _decoys(tmp_path)[what]
    before = tree_bytes(tmp_path)
    line = refused_in_process(capsys, "train", tiny(target, str(tmp_path / "cache")), "run.out_dir")
    assert "a training run goes in a directory of its own" in line and says in line, line
    assert tree_bytes(tmp_path) == before and not (tmp_path / "cache").exists()


def test_folders_that_only_look_like_outputs_are_not_refused(tmp_path):
    """A `~/checkpoints/` of one's own runs, or a folder holding an `iter_*` directory without a commit record, is not
    a training run or a checkpoint: outputs under them are fine (the rule asks for run.json / evolm.json)."""
    from evolm_nemo.fileio import owned_elsewhere
    from evolm_nemo.stages import check_run_dir

    (tmp_path / "home" / "checkpoints").mkdir(parents=True)
    (tmp_path / "scratch" / "iter_0000001").mkdir(parents=True)
    for path in (tmp_path / "home" / "checkpoints" / "evolm-1b", tmp_path / "scratch" / "iter_0000001" / "x",
                 tmp_path / "scratch" / "run"):
        assert owned_elsewhere(path) is None, path
        check_run_dir(str(path))


def test_data_paths_with_the_synthetic_source_is_refused(corpus, capsys, tmp_path):
    """`evolm train data.paths=[my/corpus]` (pretraining's default source is the generated one) trained on generated
    text and never read the files; so did `experiment=demo_rl data.paths=[rl.jsonl]`. Now one line says how to read
    them, and with data.source=indexed the same files are what the run plans on."""
    prefix, tok = corpus
    for base in ([], ["experiment=demo_rl"]):
        _refused(capsys, [*base, f"data.paths=[{prefix}]", f"run.out_dir={tmp_path / 'run'}"], "data.paths",
                 "data.source=synthetic generates its data and reads no files", "data.source=indexed")
    assert not (tmp_path / "run").exists()
    cfg = compose("config", _indexed(corpus, f"run.out_dir={tmp_path / 'run'}"), RootConfig)
    assert plan_run(cfg).iters > 0


def test_every_batch_read_is_checked_against_the_vocabulary(corpus, tmp_path):
    """A .bin past FULL_SCAN_BYTES is only sampled before the run: an id the sample missed reached the embedding as
    an index error deep in the forward pass (a device-side assert on GPU). Each microbatch is checked as it is read,
    and the error names the source of the blend it came from (real megatron datasets, a blend of two corpora)."""
    from evolm_nemo.data.gpt import BatchSchedule, _build_splits
    from evolm_nemo.data.tokenizer import load_tokenizer

    small = ensure_synthetic(tmp_path / "small", 200, 8, vocab_size=300)  # ids < 300
    prefix, _ = corpus  # ids up to 511
    cfg = compose("config", ["data.source=indexed", f"data.paths=[{small.prefix},{prefix}]", "data.weights=[0.5,0.5]",
                             f"data.tokenizer={small.tokenizer_dir}", "model.vocab_size=300",
                             f"data.cache_dir={tmp_path / 'cache'}"], RootConfig)
    tok = load_tokenizer(str(small.tokenizer_dir))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())  # megatron's blend asks the rank
    try:
        blend = _build_splits(cfg, [str(small.prefix), prefix], [0.5, 0.5], tok, [64, 0, 0])[0]
        alone = _build_splits(cfg, [str(small.prefix)], None, tok, [64, 0, 0])[0]
    finally:
        dist.destroy_process_group()
    with pytest.raises(ConfigError) as err:
        for it in range(8):
            BatchSchedule(blend, 8, 2, 0, 1, vocab_size=300).microbatches(it)
    assert err.value.key == "data.paths" and err.value.message.startswith(f"{prefix}.bin: sample ") and \
        ">= model.vocab_size=300" in err.value.message, err.value.message
    for it in range(8):
        assert len(BatchSchedule(alone, 8, 2, 0, 1, vocab_size=300).microbatches(it)) == 4
