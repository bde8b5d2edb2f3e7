"""The generation engines on CPU -- megatron-core's static inference engine (KV cache) and the continuous-batching
engine (``generation/continuous.py``): greedy equals the no-cache reference loop token for
token (GQA and MHA, batched prompts of different lengths, several static batches, the max_seq window, EOS), seeded
sampling, stop strings, SDPA attention with fewer queries than keys, and TP=2 (also with sequence parallel) over
gloo equal to TP=1; for the continuous engine also samples that do not depend on the batching and no idle slot.

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


ENGINES = ["static", "continuous"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_greedy_equals_reference_loop(single, kind, engine):
    facts, ref = single[kind][engine], single[kind]["ref"]
    assert all(len(r) == 24 for r in ref)  # full-length completions: every step is compared
    assert facts["batched"] == ref  # one batch, prompts of 1, 6, 11 and 20 tokens
    assert facts["small_batches"] == ref  # max_batch=3: two static batches / a slot refilled
    assert facts["finish"] == ["length"] * 4
    assert facts["texts"] == single[kind]["ref_texts"]


@pytest.mark.parametrize("engine", ENGINES)
def test_window_and_eos(single, engine):
    facts = single["gqa"][engine]
    window = facts["window"]
    assert window["engine"] == single["window_ref"]
    assert len(window["engine"][0]) == 48 - single["prompt_len"] < 24  # cut by max_seq, not max_new_tokens
    assert window["finish"] == ["length", "length"]
    eos = facts["eos_run"]
    assert eos["engine"] == single["eos_ref"]["ref"]
    assert eos["finish"][0] == "eos" and single["eos_ref"]["eos"] not in eos["engine"][0]
    assert len(eos["engine"][0]) < 24


@pytest.mark.parametrize("engine", ENGINES)
def test_sampling_is_seeded(single, engine):
    facts = single["gqa"][engine]
    runs = facts["sampling"]
    assert runs["a"] == runs["a2"] and runs["topk"] == runs["topk2"]
    assert runs["a"] != runs["b"] and runs["a"] != runs["topk"] and runs["a"] != runs["topp"]
    assert facts["global_rng_untouched"] and facts["training_restored"]


@pytest.mark.parametrize("engine", ENGINES)
def test_top_k_log_probs_are_of_the_truncated_distribution(single, engine):
    """With top_k the reported log-probs describe the distribution that sampled (tempered, cut to the top k), in
    both engines: top_k=1 is a one-token distribution (log p = 0 for every token)."""
    facts = single["gqa"][engine]
    one = [x for row in facts["topk_logp"]["1"] for x in row]
    assert one and all(abs(x) < 1e-6 for x in one), one[:8]
    five = [x for row in facts["topk_logp"]["5"] for x in row]
    assert five and all(x <= 1e-6 for x in five) and any(x < -1e-3 for x in five)
    assert any(x < -1e-3 for row in facts["tempered_logp"] for x in row)


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_strings(single, engine):
    stop = single["gqa"][engine]["stop"]
    cut = stop["full_text"][:stop["full_text"].find(stop["stop"])]
    assert 0 < len(cut) < len(stop["full_text"])
    assert stop["text"] == cut and stop["finish"] == "stop"
    assert len(stop["ids"]) < len(stop["full_ids"]) and stop["full_ids"][:len(stop["ids"])] == stop["ids"]
    assert stop["other"] == single["gqa"]["ref"][1]  # the other prompt in the batch runs on unaffected
    late = single["gqa"][engine]["late_stop"]  # met only past the row's budget: trimmed off, not a stop
    assert late["finish"] == "length" and late["ids"] == late["want"], late


def test_continuous_samples_do_not_depend_on_the_batching(single):
    """The same seed gives the same samples and log-probs with 16, 3 or 1 slots, for a request among other prompts,
    and for a batch split over two calls numbered by ``first_request`` (counter-based sampling: a token depends on
    (seed, request index, step) and its logits only)."""
    facts = single["gqa"]["continuous"]["continuous"]
    runs = facts["runs"]
    ids = {k: [r[0] for r in v] for k, v in runs.items()}
    assert ids["16"] == ids["3"] == ids["1"]
    assert {r[2] for r in runs["16"]} >= {"eos", "length"}  # a mix: some end early, some run to the budget
    for slots in ("3", "1"):
        for (_, a, _), (_, b, _) in zip(runs["16"], runs[slots]):
            assert len(a) == len(b) and max((abs(x - y) for x, y in zip(a, b)), default=0) < 1e-5
    alone_ids, alone_lp = facts["alone"]
    assert alone_ids == ids["16"][5]
    assert max(abs(x - y) for x, y in zip(alone_lp, runs["16"][5][1])) < 1e-5
    # split over two calls (two data-parallel ranks), the second's requests numbered from 7: the whole call's samples
    assert [h[0] for h in facts["halves"]] == ids["16"]
    for (_, a), (_, b, _) in zip(facts["halves"], runs["16"]):
        assert max((abs(x - y) for x, y in zip(a, b)), default=0) < 1e-5
    assert facts["unnumbered"] != ids["16"][7:]  # numbered from 0 instead, the second half samples other tokens


def test_continuous_batching_has_no_idle_slot(single):
    """Every decode row is a live sequence's next token: rows = tokens generated after each prefill's first, so a
    finished sequence never costs a step; with fewer slots than sequences, the slots are refilled."""
    facts = single["gqa"]["continuous"]["continuous"]
    for slots, runs in facts["runs"].items():
        stats = facts["stats"][slots]
        produced = sum(len(ids) + (finish == "eos") for ids, _, finish in runs)
        assert stats["decode_rows"] == produced - len(runs), (slots, stats, produced)
        assert stats["max_active"] <= int(slots)
    assert facts["stats"]["1"]["prefills"] == 12 and facts["stats"]["3"]["prefills"] > 4
    assert facts["stats"]["16"]["prefills"] == 1


def test_sdpa_with_fewer_queries_than_keys(single):
    errors = single["attention"]
    assert set(errors) == {"full_vs_megatron", "sq1_causal", "sq1_no_mask", "sq3_causal", "sq1_megatron"}
    assert max(errors.values()) < 1e-5, errors


def test_tensor_parallel_equals_single(single, work):
    tp = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port())], work, "tp")
    for engine in ENGINES:
        rank0, rank1 = tp[engine]
        assert rank0 == rank1, engine
        assert rank0["greedy"] == single["gqa"]["ref"], engine
        assert rank0["sampled"] == single["gqa"][engine]["sampling"]["a"], engine
        assert rank0["sp_greedy"] == single["gqa"]["ref"] and rank0["sp_restored"], engine


@pytest.mark.parametrize("settings", [
    dict(temperature=float("nan")),  # was accepted (NaN passes `< 0`): the continuous engine sampled one id forever
    dict(temperature=float("inf")),
    dict(temperature=-0.5),
    dict(top_p=float("nan")),
    dict(top_k=-1),
    dict(max_new_tokens=-1),  # was accepted: every completion silently empty
])
def test_bad_sampling_settings_refused(settings):
    """Both engines check a call's settings (``_Engine._request``) before any prompt is encoded or model run."""
    from evolm_nemo.generation.engine import _Engine

    args = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_k": 0, **settings}
    with pytest.raises(ValueError):
        _Engine()._request(["never encoded"], args["max_new_tokens"], args["temperature"], args["top_p"],
                           args["top_k"], None)
