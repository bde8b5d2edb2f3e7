"""megatron-core's static inference engine (KV cache) on CPU: greedy equals the no-cache reference loop token for
token (GQA and MHA, batched prompts of different lengths, several static batches, the max_seq window, EOS), seeded
sampling, stop strings, SDPA attention with fewer queries than keys, and TP=2 (also with sequence parallel) over
gloo equal to TP=1.

The megatron work runs in ``_engine_check.py`` subprocesses (one single-process run, then one 2-rank torchrun that
loads the checkpoint the first one saved); this file judges the facts they write."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, subprocess_env

SCRIPT = Path(__file__).with_name("_engine_check.py")


def _run(args: list[str], work: Path, mode: str) -> dict:
    proc = subprocess.run([*args, str(SCRIPT), mode, str(work)], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{mode} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return json.loads((work / f"{mode}.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def single(work) -> dict:
    return _run([sys.executable], work, "single")


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_greedy_equals_reference_loop(single, kind):
    facts = single[kind]
    assert all(len(r) == 24 for r in facts["ref"])  # full-length completions: every step is compared
    assert facts["batched"] == facts["ref"]  # one static batch, prompts of 1, 6, 11 and 20 tokens
    assert facts["small_batches"] == facts["ref"]  # max_batch=3: two static batches
    assert facts["finish"] == ["length"] * 4
    assert facts["texts"] == facts["ref_texts"]


def test_window_and_eos(single):
    window = single["window"]
    assert window["engine"] == window["ref"]
    assert len(window["engine"][0]) == 48 - window["prompt_len"] < 24  # cut by max_seq, not max_new_tokens
    assert window["finish"] == ["length", "length"]
    eos = single["eos_run"]
    assert eos["engine"] == eos["ref"]
    assert eos["finish"][0] == "eos" and eos["eos"] not in eos["engine"][0] and len(eos["engine"][0]) < 24


def test_sampling_is_seeded(single):
    runs = single["sampling"]
    assert runs["a"] == runs["a2"] and runs["topk"] == runs["topk2"]
    assert runs["a"] != runs["b"] and runs["a"] != runs["topk"] and runs["a"] != runs["topp"]
    assert single["global_rng_untouched"] and single["training_restored"]


def test_stop_strings(single):
    stop = single["stop"]
    cut = stop["full_text"][:stop["full_text"].find(stop["stop"])]
    assert 0 < len(cut) < len(stop["full_text"])
    assert stop["text"] == cut and stop["finish"] == "stop"
    assert len(stop["ids"]) < len(stop["full_ids"]) and stop["full_ids"][:len(stop["ids"])] == stop["ids"]
    assert stop["other"] == single["gqa"]["ref"][1]  # the other prompt in the batch runs on unaffected


def test_sdpa_with_fewer_queries_than_keys(single):
    errors = single["attention"]
    assert set(errors) == {"full_vs_megatron", "sq1_causal", "sq1_no_mask", "sq3_causal", "sq1_megatron"}
    assert max(errors.values()) < 1e-5, errors


def test_tensor_parallel_equals_single(single, work):
    tp = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port())], work, "tp")
    rank0, rank1 = tp["ranks"]
    assert rank0 == rank1
    assert rank0["greedy"] == single["gqa"]["ref"]
    assert rank0["sampled"] == single["sampling"]["a"]
    assert rank0["sp_greedy"] == single["gqa"]["ref"] and rank0["sp_restored"]
