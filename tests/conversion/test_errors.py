"""Bad sources fail before any heavy work with one line naming the field/file (exit 2) and leave no destination:
unsupported architectures, a missing shard, a wrong shape, a missing tensor, a truncated file, bad options.
These fail before megatron is set up, so they run through the real dispatcher in this process (plus one real
`evolm` process for the exit code and stderr as a user sees them)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evolm_nemo.config.errors import ConfigError
from tests.conftest import tree_bytes
from tests.conversion._sources import make_source, make_tokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("errsrc")
    make_tokenizer(root / "tok")
    make_source("tiny_gqa", root / "single", root / "tok")
    make_source("tiny_gqa", root / "sharded", root / "tok", max_shard_size="100KB")
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 1
    return root


def variant(good: Path, tmp_path: Path, which: str = "single", **config_edits) -> Path:
    src = tmp_path / "src"
    shutil.copytree(good / which, src)
    cfg = json.loads((src / "config.json").read_text())
    for key, value in config_edits.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def fails(capsys, tmp_path, args: list[str], key: str, *fragments: str) -> str:
    from evolm_nemo.cli import main

    dst = tmp_path / "dst"
    assert main([*args, f"dst={dst}"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), lines
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert not dst.exists() and not list(tmp_path.glob(".dst.tmp-*"))
    return lines[0]


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
UNSUPPORTED = {
    "rope_scaling_v5": ("rope_scaling", {"rope_parameters": LLAMA3_ROPE}),
    "rope_scaling_v4": ("rope_scaling", {"rope_parameters": None, "rope_theta": 10000.0,
                                         "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "gelu": ("hidden_act", {"hidden_act": "gelu"}),
    "attention_bias": ("attention_bias", {"attention_bias": True}),
    "mlp_bias": ("mlp_bias", {"mlp_bias": True}),
    "sliding_window": ("sliding_window", {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                                          "sliding_window": 4096}),
    "qwen2": ("architectures", {"architectures": ["Qwen2ForCausalLM"]}),
    "model_type": ("model_type", {"model_type": "gemma"}),
    "head_dim": ("head_dim", {"head_dim": 32}),
    "gqa_groups": ("num_key_value_heads", {"num_key_value_heads": 3}),
    "two_labels": ("num_labels", {"architectures": ["LlamaForSequenceClassification"],
                                  "id2label": {"0": "A", "1": "B"}}),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_architecture(good, tmp_path, capsys, case):
    key, edits = UNSUPPORTED[case]
    src = variant(good, tmp_path, **edits)
    fails(capsys, tmp_path, ["import-hf", f"src={src}"], key)


def test_missing_shard(good, tmp_path, capsys):
    src = variant(good, tmp_path, "sharded")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    fails(capsys, tmp_path, ["import-hf", f"src={src}"], "src", "missing shard", victim.name)


def test_wrong_shape(good, tmp_path, capsys):
    src = variant(good, tmp_path, intermediate_size=180)
    fails(capsys, tmp_path, ["import-hf", f"src={src}"], "src", "mlp.gate_proj.weight", "[176, 64]", "[180, 64]")


def test_missing_tensor(good, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = variant(good, tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    fails(capsys, tmp_path, ["import-hf", f"src={src}"], "src", "model.layers.1.self_attn.v_proj.weight")


def test_truncated_file(good, tmp_path, capsys):
    src = variant(good, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    fails(capsys, tmp_path, ["import-hf", f"src={src}"], "src", "model.safetensors")


def test_no_config(good, tmp_path, capsys):
    src = variant(good, tmp_path)
    (src / "config.json").unlink()
    fails(capsys, tmp_path, ["import-hf", f"src={src}"], "src", "config.json")


def test_layout_must_divide(good, tmp_path, capsys):
    fails(capsys, tmp_path, ["import-hf", f"src={good / 'single'}", "parallel.tp=4"], "parallel.tp")
    fails(capsys, tmp_path, ["import-hf", f"src={good / 'single'}", "parallel.pp=3"], "parallel.pp")


@pytest.mark.parametrize("shape", [{"vocab_size": 513}, {"ffn_hidden_size": 177}])
def test_layout_must_divide_the_vocabulary_and_ffn(shape):
    # megatron splits embedding rows and FFN columns evenly over tp (VocabParallelEmbedding asserts it)
    from evolm_nemo.config.schema import ModelConfig
    from evolm_nemo.conversion.importer import _check_layout

    m = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                    vocab_size=512)
    _check_layout(m, 2, 1)
    _check_layout(dataclasses.replace(m, **shape), 1, 1)
    with pytest.raises(ConfigError) as err:
        _check_layout(dataclasses.replace(m, **shape), 2, 1)
    assert err.value.key == "parallel.tp" and str(next(iter(shape.values()))) in str(err.value), str(err.value)


def test_bad_options(good, tmp_path, capsys):
    fails(capsys, tmp_path, ["import-hf", f"src={good / 'single'}", "dtype=int8"], "dtype")
    fails(capsys, tmp_path, ["import-hf", f"src={good / 'single'}", "bogus=1"], "bogus")
    fails(capsys, tmp_path, ["export-hf", f"src={tmp_path / 'nowhere'}"], "src")


def test_trtllm_missing_names_container(good, tmp_path, capsys):
    try:
        import tensorrt_llm  # noqa: F401
        pytest.skip("tensorrt_llm is installed here")
    except Exception:
        pass
    line = fails(capsys, tmp_path, ["export-trtllm", f"src={good / 'single'}", "max_seq=64"], "tensorrt_llm")
    assert "nvcr.io/nvidia/tensorrt-llm/release" in line
    fails(capsys, tmp_path, ["export-trtllm", f"src={good / 'single'}", "max_batch=8", "max_seq=64"], "max_batch")


def test_cli_process_one_line_exit_2(good, tmp_path):
    src = variant(good, tmp_path, hidden_act="gelu_new")
    dst = tmp_path / "dst"
    evolm = Path(sys.executable).with_name("evolm")
    proc = subprocess.run([str(evolm), "import-hf", f"src={src}", f"dst={dst}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: hidden_act: 'gelu_new' is not supported; only silu (SwiGLU)"]
    assert not dst.exists()


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_overlapping_the_source_is_refused_even_with_overwrite(good, tmp_path, capsys, where):
    """import-hf / export-hf with dst equal to, inside or around src would delete what they read: refused in one
    line, the source untouched."""
    from evolm_nemo.cli import main

    src = variant(good, tmp_path)
    before = sorted(p.name for p in src.iterdir())
    dst = {"same": src, "inside": src / "out", "parent": tmp_path}[where]
    assert main(["import-hf", f"src={src}", f"dst={dst}", "overwrite=true", "progress=false"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: dst:") and "overlaps the source" in lines[0], lines
    assert sorted(p.name for p in src.iterdir()) == before
    # export-hf likewise (the source is a megatron checkpoint imported here)
    ckpt = tmp_path / "ckpt"
    assert main(["import-hf", f"src={src}", f"dst={ckpt}", "progress=false"]) == 0
    import torch.distributed as dist

    assert not dist.is_initialized()  # the command's one-rank group is torn down: the calling process is as it was
    capsys.readouterr()
    target = {"same": ckpt, "inside": ckpt / "iter_0000000" / "hf", "parent": tmp_path}[where]
    assert main(["export-hf", f"src={ckpt}", f"dst={target}", "overwrite=true", "progress=false"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "overlaps the source" in lines[0], lines
    assert (ckpt / "iter_0000000" / "evolm.json").is_file()


# ---------------------------------------------------------------------------------------------------- issue 10

def test_config_json_that_is_not_an_object(good, tmp_path, capsys):
    src = variant(good, tmp_path)
    (src / "config.json").write_text("[1, 2, 3]\n")
    fails(capsys, tmp_path, ["import-hf", f"src={src}"], "src", "config.json", "expected a JSON object", "list")


def test_integer_tensors_are_refused_not_imported_as_fp32(good, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    src = variant(good, tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = (tensors[name] * 100).to(torch.int8)  # a quantized tensor without its scales
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    fails(capsys, tmp_path, ["import-hf", f"src={src}"], "src", name, "is int8", "dequantize")


def test_a_tokenizer_that_does_not_load_is_refused_naming_the_file(good, tmp_path, capsys):
    """The tokenizer files are copied into the checkpoint verbatim: a tokenizer.json cut short was imported (exit 0)
    and failed only at the checkpoint's first use. Now it is loaded first: one line naming the file, under src= or
    tokenizer= (whichever it came from)."""
    src = variant(good, tmp_path)
    tok = src / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[: tok.stat().st_size // 2])
    fails(capsys, tmp_path, ["import-hf", f"src={src}"], "src", f"{tok}: invalid JSON", "cut short")
    fails(capsys, tmp_path, ["import-hf", f"src={good / 'single'}", f"tokenizer={src}"], "tokenizer",
          f"{tok}: invalid JSON")


def test_a_tokenizer_with_more_tokens_than_the_vocabulary_is_refused(good, tmp_path, capsys):
    """Ids past vocab_size have no embedding row: such a tokenizer is refused, not copied into the checkpoint."""
    from transformers import AutoTokenizer

    src = variant(good, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens([f"<extra_{i}>" for i in range(512 - len(tok) + 1)])
    tok.save_pretrained(str(src))
    fails(capsys, tmp_path, ["import-hf", f"src={src}"], "src", "513 tokens", "vocab_size=512")


def test_a_bin_holding_pickled_code_is_one_line_without_torchs_advice(good, tmp_path, capsys):
    """A pytorch_model.bin with a pickle payload was refused with torch's whole multi-line message, including "Re-running
    `torch.load` with `weights_only` set to False will likely succeed" -- advice not to pass on. Now one line; the
    payload never runs."""
    import torch
    from safetensors.torch import load_file

    from tests.evaluation._tiny import Payload

    src = variant(good, tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    marker = tmp_path / "payload_ran"
    torch.save({**tensors, "payload": Payload(marker)}, src / "pytorch_model.bin")
    line = fails(capsys, tmp_path, ["import-hf", f"src={src}"], "src", "pytorch_model.bin: cannot load with "
                 "weights_only=True (it holds more than tensors: a reference to ", "open); convert it to "
                 "safetensors with a tool you trust")
    assert "set to False" not in line and "allowlist" not in line and "safe_globals" not in line
    assert not marker.exists()


@pytest.fixture(scope="module")
def ckpt(good, tmp_path_factory):
    """A megatron checkpoint made by import-hf (in this process; its group is torn down)."""
    from evolm_nemo.cli import main

    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    assert main(["import-hf", f"src={good / 'single'}", f"dst={out}", "progress=false"]) == 0
    return out


def test_export_with_a_garbled_metadata_file(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    meta = bad / "iter_0000000" / ".metadata"
    data = bytearray(meta.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = b"\0" * 64  # same size, garbled content
    meta.write_bytes(bytes(data))
    capsys.readouterr()
    fails(capsys, tmp_path, ["export-hf", f"src={bad}", "progress=false"], "src", "iter_0000000")
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_a_checkpoint_holding_pickled_code_is_one_line_without_torchs_advice(ckpt, tmp_path, capsys):
    """A checkpoint whose common.pt holds a pickle payload (its evolm.json checksums updated to match, so the
    integrity check passes) was refused with torch's message, "Re-running `torch.load` with `weights_only` set to
    False will likely succeed" -- advice not to pass on (and in training, train.init_from, a traceback). Now one
    line naming the checkpoint (checkpoint.io.load, the loader of export and training); the payload never runs."""
    from tests.evaluation._tiny import plant_payload

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    marker = tmp_path / "payload_ran"
    plant_payload(bad / "iter_0000000", marker)
    capsys.readouterr()
    line = fails(capsys, tmp_path, ["export-hf", f"src={bad}", "progress=false"], "src", "iter_0000000: its files "
                 "cannot be loaded with weights_only=True (it holds more than tensors: a reference to ")
    assert "set to False" not in line and "cannot load weights" not in line
    assert not marker.exists()


@pytest.mark.parametrize("edit,fragment", [
    (lambda m: m["model"].update(hidden_size="abc"), "model.hidden_size is 'abc', expected int"),
    (lambda m: m["model"].update(norm_eps=True), "model.norm_eps is True"),
    (lambda m: m.update(checksums=None), "checksums do not cover its files"),
    (lambda m: m["checksums"].pop(sorted(m["checksums"])[0]), "checksums do not cover its files"),
])
def test_export_of_an_edited_record_is_one_line(ckpt, tmp_path, capsys, edit, fragment):
    """An evolm.json whose model shape has a value of the wrong type was a TypeError in the model build; one whose
    checksums were nulled or thinned skipped (part of) the integrity check."""
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    path = bad / "iter_0000000" / "evolm.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    capsys.readouterr()
    fails(capsys, tmp_path, ["export-hf", f"src={bad}", "progress=false"], "src", fragment)


def _modes(root: Path) -> set:
    return {(p.is_dir(), p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")] if not p.is_symlink()}


def test_export_modes_follow_the_umask_and_killed_exports_are_cleaned(ckpt, tmp_path, capsys):
    import os
    import signal
    import time

    from evolm_nemo.cli import main
    from evolm_nemo.fileio import OWNER
    from tests.conftest import subprocess_env

    dst = tmp_path / "hf"
    # a real export killed (SIGKILL) while it writes: its hidden temp copy stays behind
    evolm = Path(sys.executable).with_name("evolm")
    proc = subprocess.Popen([str(evolm), "export-hf", f"src={ckpt}", f"dst={dst}", "progress=false"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "killed.log", "w"),
                            env={k: v for k, v in subprocess_env().items() if k not in ("MASTER_PORT", "MASTER_ADDR")})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        temps = [p for p in tmp_path.glob(".hf.tmp-*") if (p / OWNER).is_file()]
        if temps:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    stale = [p for p in tmp_path.glob(".hf.tmp-*")]
    assert len(stale) == 1 and not dst.exists()
    # not ours to remove: a temp dir of a live export, and one without an owner record
    live = tmp_path / ".hf.tmp-live"
    live.mkdir()
    (live / OWNER).write_text(f"{os.getpid()} {__import__('socket').gethostname()}\n")
    foreign = tmp_path / ".hf.tmp-foreign"
    foreign.mkdir()
    old = os.umask(0o027)
    try:
        capsys.readouterr()
        assert main(["export-hf", f"src={ckpt}", f"dst={dst}", "progress=false"]) == 0
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert f"removed {stale[0]}, left by an earlier run that was killed" in err
    assert not stale[0].exists() and live.is_dir() and foreign.is_dir()
    assert not (dst / OWNER).exists()
    # group-readable as a plain mkdir / open would make them under umask 027 (not mkdtemp's 0700 / 0600)
    assert _modes(dst) == {(True, 0o750), (False, 0o640)}


# ------------------------------------------------------------------------------------------ issue 19 items 4, 5

def _refused(capsys, args: list[str], *fragments: str) -> str:
    from evolm_nemo.cli import main

    capsys.readouterr()
    assert main(args) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: dst: "), lines
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


def test_export_and_import_never_overwrite_another_kind_of_output(good, ckpt, a_run, tmp_path, capsys):
    """export-hf / import-hf with dst=<a training run> overwrite=true used to delete its checkpoints and metrics:
    overwrite replaces only what the same command made (an export by an export, an import by an import). One line
    naming `dst`, every byte of the run (and of the other outputs) unchanged."""
    from evolm_nemo.cli import main

    before = tree_bytes(a_run)
    _refused(capsys, ["export-hf", f"src={ckpt}", f"dst={a_run}", "overwrite=true", "progress=false"],
             f"{a_run} is a training run's directory", "not an HF export", "replaces only an output of the same")
    _refused(capsys, ["import-hf", f"src={good / 'single'}", f"dst={a_run}", "overwrite=true", "progress=false"],
             f"{a_run} is a training run's directory", "not an imported checkpoint")
    assert tree_bytes(a_run) == before and not list(a_run.parent.glob(".run.*"))
    # an import is not an export's target, an export not an import's, an HF model of one's own not an export's
    imported = tmp_path / "imported"
    shutil.copytree(ckpt, imported)
    hf_dir = tmp_path / "hf"
    assert main(["export-hf", f"src={ckpt}", f"dst={hf_dir}", "progress=false"]) == 0
    sums = tree_bytes(imported), tree_bytes(hf_dir), tree_bytes(good / "single")
    _refused(capsys, ["export-hf", f"src={ckpt}", f"dst={imported}", "overwrite=true", "progress=false"],
             "is an imported checkpoint (made by evolm import-hf), not an HF export")
    _refused(capsys, ["import-hf", f"src={good / 'single'}", f"dst={hf_dir}", "overwrite=true", "progress=false"],
             "is an HF export (made by evolm export-hf), not an imported checkpoint")
    own = tmp_path / "own_model"
    shutil.copytree(good / "single", own)
    _refused(capsys, ["export-hf", f"src={ckpt}", f"dst={own}", "overwrite=true", "progress=false"],
             "is an HF model directory not made by evolm export-hf")
    assert (tree_bytes(imported), tree_bytes(hf_dir), tree_bytes(own)) == sums
    # ... while each replaces its own kind
    assert main(["export-hf", f"src={ckpt}", f"dst={hf_dir}", "overwrite=true", "progress=false"]) == 0
    assert main(["import-hf", f"src={good / 'single'}", f"dst={imported}", "overwrite=true", "progress=false"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_two_exports_into_one_dst_the_second_is_refused(ckpt, tmp_path, capsys):
    """export-hf's dst is locked like a run directory: a second export into it while the first runs (stopped here
    with SIGSTOP as soon as it holds the lock) refuses in one line naming `dst` and the first's pid; the first then
    finishes, leaving no lock file."""
    import signal
    import time

    from evolm_nemo.fileio import lock_path
    from tests.conftest import subprocess_env

    dst = tmp_path / "hf"
    evolm = Path(sys.executable).with_name("evolm")
    first = subprocess.Popen([str(evolm), "export-hf", f"src={ckpt}", f"dst={dst}", "progress=false"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={k: v for k, v in subprocess_env().items() if k not in ("MASTER_PORT", "MASTER_ADDR")})
    lock = lock_path(dst)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not (
                lock.is_file() and lock.read_text().strip() == str(first.pid)):
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first export ended before it could be stopped"
        _refused(capsys, ["export-hf", f"src={ckpt}", f"dst={dst}", "overwrite=true", "progress=false"],
                 f"{dst} is being written by another command (pid {first.pid})")
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert (dst / "evolm_export.json").is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_to_a_read_only_dir_is_one_line(ckpt, tmp_path):
    from tests.conftest import one_line_error, run_evolm, unwritable_dir

    dst = unwritable_dir(tmp_path) / "hf"
    proc = run_evolm("export-hf", [f"src={ckpt}", f"dst={dst}", "progress=false"], check=False)
    line = one_line_error(proc, "dst")
    assert f"cannot write {dst}" in line and "not writable" in line, line


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(ckpt, tmp_path, small_disk):
    """ENOSPC for real (a 256 KiB tmpfs, smaller than the weights): one line naming dst, no `.hf.tmp-*` left, the
    source untouched."""
    from evolm_nemo.checkpoint import io as ckpt_io
    from tests.conftest import one_line_error, run_evolm

    disk = small_disk.mount("256k")
    proc = run_evolm("export-hf", [f"src={ckpt}", f"dst={disk / 'hf'}", "progress=false"], check=False)
    line = one_line_error(proc, "dst")
    assert f"cannot write {disk / 'hf'}: No space left on device" in line, line
    assert list(disk.iterdir()) == [] and ckpt_io.damage(ckpt_io.resolve(ckpt)) is None


@pytest.mark.parametrize("edits, key", [
    ({"architectures": 5}, "architectures"),
    ({"architectures": ["LlamaForCausalLM", "Foo"]}, "architectures"),  # was imported as the first
    ({"architectures": ["LlamaForCausalLM", "LlamaForSequenceClassification"]}, "architectures"),  # two heads
    ({"architectures": ["LlamaForCausalLM", 5]}, "architectures"),
    ({"num_key_value_heads": "2"}, "num_key_value_heads"),
    ({"num_key_value_heads": -2}, "num_key_value_heads"),
    ({"hidden_size": True}, "hidden_size"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),  # was "src: cannot load tokenizer ...: TypeError"
    ({"attention_bias": "false"}, "attention_bias"),  # was refused as "biases are not supported"
    ({"rope_theta": None, "rope_parameters": None}, "rope_theta"),
    ({"rope_theta": "abc", "rope_parameters": None}, "rope_theta"),
    ({"rope_parameters": [1]}, "rope_parameters"),
    ({"max_position_embeddings": "x"}, "max_position_embeddings"),
    ({"max_position_embeddings": 2 ** 25}, "max_position_embeddings"),  # past model.seq_length's 2^24
    ({"rms_norm_eps": None}, "rms_norm_eps"),
    ({"model_type": None}, "model_type"),  # transformers could not load the source to verify
])
def test_config_values_of_the_wrong_type_are_named(good, tmp_path, capsys, edits, key):
    src = variant(good, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    for k, v in edits.items():  # None: the key is there with a null value (variant() would drop it)
        cfg[k] = v
    if edits.get("model_type", 0) is None:
        del cfg["model_type"]
    (src / "config.json").write_text(json.dumps(cfg))
    fails(capsys, tmp_path, ["import-hf", f"src={src}", "progress=false"], key)


def test_architectures_naming_one_head_more_than_once_is_that_head():
    """Only classes of different heads, or one not supported, are refused: two names of one head say which it is."""
    from evolm_nemo.conversion import hf

    assert hf.head_kind({"architectures": ["LlamaForCausalLM", "MistralForCausalLM"]}) == "lm"
    assert hf.head_kind({"architectures": ["LlamaForSequenceClassification"] * 2}) == "value"
    assert hf.head_kind({}) == "lm"
    with pytest.raises(ConfigError, match="LlamaModel is not supported"):
        hf.head_kind({"architectures": ["LlamaForCausalLM", "LlamaModel"]})


def test_bad_index_probe_and_paths_are_one_line(good, ckpt, tmp_path, capsys):
    src = variant(good, tmp_path, "sharded")
    index = src / "model.safetensors.index.json"
    for bad in ("[1, 2]", '{"weight_map": ["a"]}', '{"weight_map": {"model.norm.weight": 5}}'):
        index.write_text(bad)
        fails(capsys, tmp_path, ["import-hf", f"src={src}", "progress=false"], "src", "index")
    for key in ("probe_len", "probe_batch"):
        fails(capsys, tmp_path, ["import-hf", f"src={good / 'single'}", f"{key}=0", "progress=false"], key)
        fails(capsys, tmp_path, ["export-hf", f"src={ckpt}", f"{key}=0", "progress=false"], key)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    fails(capsys, tmp_path, ["import-hf", f"src={loop}", "progress=false"], "src", "cannot resolve")
    from evolm_nemo.cli import main

    assert main(["export-hf", f"src={ckpt}", f"dst={loop}", "progress=false"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: dst: cannot resolve")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["import-hf", f"src={good / 'single'}", f"dst={afile / 'sub'}", "progress=false"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: dst: cannot write")


def test_a_bf16_export_of_an_fp32_checkpoint_verifies(ckpt, tmp_path, capsys):
    """The reference logits are computed with the weights rounded to the export's dtype (what transformers reads):
    a bf16 export of an fp32 checkpoint used to fail its own check (logits 0.016 apart)."""
    import torch
    from safetensors.torch import load_file

    from evolm_nemo.cli import main
    from evolm_nemo.conversion.export import stored_dtype

    assert stored_dtype(ckpt / "iter_0000000") == torch.float32
    out = tmp_path / "bf16"
    assert main(["export-hf", f"src={ckpt}", f"dst={out}", "dtype=bf16", "progress=false"]) == 0, \
        capsys.readouterr().err
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    check = json.loads((out / "evolm_export.json").read_text())["verify"]
    assert check["max_diff"] <= 1e-4


def test_a_tokenizer_of_vocabulary_files_only_is_loaded_where_evaluation_accepts_it(tmp_path):
    """The loader's own pre-check knew three file names (tokenizer.json / .model, vocab.json) while evaluation's
    model-directory check knew more (vocab.txt, merges.txt, *.tiktoken, tokenizer_config.json): a directory the one
    accepted, the other refused. Both now ask the same question (data.tokenizer.has_tokenizer)."""
    import json

    from evolm_nemo.data.tokenizer import has_tokenizer, load_tokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    assert has_tokenizer(tmp_path)
    tok = load_tokenizer(str(tmp_path), require_eos=False)
    assert tok("hello world", add_special_tokens=False)["input_ids"] == [5, 6]
    (tmp_path / "vocab.txt").unlink()
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text("{}")
    assert not has_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="has no tokenizer files"):
        load_tokenizer(str(tmp_path), require_eos=False)
