"""HF sampling backend on a tiny random Llama: greedy = transformers' greedy, n=16, stop strings, budgets, errors."""

from __future__ import annotations

import pytest

from evolm_nemo import fileio, tasks
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.evaluation import sampling
from evolm_nemo.evaluation.sampling import Spec
from evolm_nemo.tasks import cut_at_stop
from tests.evaluation._tiny import DAMAGES, damaged_copy, make_lm, one_thread

PROMPTS = [
    "Human: What is 2 + 3?\nAssistant:",
    "Human: Natalia sold 48 clips in April and half as many in May. How many in total?\nAssistant:",
    "Human: hi\nAssistant:",
]
STOP = ("e", "Assistant")  # "e" is frequent in the tiny vocabulary, so stops really happen


threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_lm")
    model, tok = make_lm(path)
    return path, model, tok


@pytest.fixture(scope="module")
def sampler(lm):
    s = sampling.HFSampler(str(lm[0]), batch_size=64)  # 4 prompts x 16 samples per generate call
    yield s
    s.close()


def test_cut_at_stop():
    assert cut_at_stop("x = 5.\nHuman: next", tasks.STOP) == "x = 5.\n"
    assert cut_at_stop("The answer is 5. Assistant: Human:", tasks.STOP) == "The answer is 5. "
    assert cut_at_stop("no stop here", tasks.STOP) == "no stop here"
    assert cut_at_stop("abc", ()) == "abc"


def test_greedy_equals_transformers_greedy(lm, sampler):
    import torch

    _, model, tok = lm
    got = sampler.generate(PROMPTS, Spec(max_new_tokens=24, stop=()))  # batched, left-padded
    assert sampler.stats["n"] == 1 and sampler.stats["prompts"] == 3
    for prompt, texts in zip(PROMPTS, got):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            ref = model.generate(ids, do_sample=False, max_new_tokens=24, repetition_penalty=1.1)
        ref_ids = [t for t in ref[0, ids.shape[1]:].tolist()]
        if tok.eos_token_id in ref_ids:
            ref_ids = ref_ids[:ref_ids.index(tok.eos_token_id)]
        assert texts == [tok.decode(ref_ids)]
        assert len(texts[0]) > 0


def test_greedy_stops_at_stop_strings(sampler):
    free = sampler.generate(PROMPTS, Spec(max_new_tokens=24, stop=()))
    stopped = sampler.generate(PROMPTS, Spec(max_new_tokens=24, stop=STOP))
    assert stopped == [[cut_at_stop(t[0], STOP)] for t in free]
    assert any(any(s in t[0] for s in STOP) for t in free)  # the stop strings did occur


def test_n16_returns_16_and_respects_stop_strings(sampler):
    spec = Spec(n=16, temperature=1.0, max_new_tokens=12)
    free = sampler.generate(PROMPTS, sampling.with_stop(spec, ()))
    stopped = sampler.generate(PROMPTS, sampling.with_stop(spec, STOP))
    assert [len(t) for t in stopped] == [16, 16, 16]
    assert sampler.stats["n"] == 16 and sampler.stats["tokens"] > 0
    # Same seed, same batches: each stopped sample is the free one cut at its first stop string.
    for f, s in zip(free, stopped):
        assert s == [cut_at_stop(t, STOP) for t in f]
        assert not any(x in t for t in s for x in STOP)
    assert sum(t != cut_at_stop(t, STOP) for f in free for t in f) > 10  # many were really cut
    assert len({t for f in free for t in f}) > 30  # samples differ from each other
    again = sampler.generate(PROMPTS, sampling.with_stop(spec, STOP))
    assert again == stopped  # seed 42 makes the run reproducible


def test_samples_do_not_depend_on_the_batching(lm, sampler):
    """A prompt's samples are a function of (seed, its position in the call): batch size 64 and 4 give the same
    16 samples; greedy completions keep their own budget (max_model_len less their own prompt) whatever the
    batch-mates (the longest prompt's budget cut every row of its batch)."""
    spec = Spec(n=16, temperature=1.0, max_new_tokens=10, stop=())
    small = sampling.HFSampler(str(lm[0]), batch_size=4)
    try:
        assert small.generate(PROMPTS, spec) == sampler.generate(PROMPTS, spec)
        _, _, tok = lm
        n_long = len(tok(PROMPTS[1]).input_ids)
        greedy = Spec(max_model_len=n_long + 4, stop=())  # the long prompt leaves 4 tokens, the others more
        together = sampler.generate(PROMPTS, greedy)
        alone = [small.generate([p], greedy)[0] for p in PROMPTS]
    finally:
        small.close()
    assert together == alone
    assert len(tok(together[0][0], add_special_tokens=False).input_ids) > 4  # a short prompt's own, larger budget


def test_max_model_len_budget(lm, sampler):
    _, _, tok = lm
    n_prompt = len(tok(PROMPTS[0]).input_ids)
    spec = Spec(n=2, temperature=1.0, max_model_len=n_prompt + 3, stop=())
    sampler.generate(PROMPTS[:1], spec)
    assert sampler.stats["tokens"] <= 2 * 3
    out = sampler.generate(PROMPTS[1:2], spec)  # this prompt alone is longer than the window
    assert out == [["", ""]] and sampler.stats["tokens"] == 0


def test_missing_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sampling, "installed", lambda name: name == "hf")
    assert sampling.pick("auto") == "hf"
    for name, module in (("vllm", "vllm"), ("trtllm", "tensorrt_llm")):
        with pytest.raises(ConfigError) as e:
            sampling.pick(name)
        assert e.value.key == "backend" and f"`{module}`" in e.value.message and "not installed" in e.value.message
    with pytest.raises(ConfigError, match="unknown backend 'tgi'"):
        sampling.pick("tgi")


def test_gpu_backend_without_gpu(monkeypatch):
    monkeypatch.setattr(sampling, "installed", lambda name: True)
    monkeypatch.setattr(sampling, "_cuda", lambda: False)
    assert sampling.pick("auto") == "hf"
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        sampling.pick("vllm")


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "c.jsonl"
    fileio.write_jsonl(path, [{"a": 1}, {"b": "é"}])
    assert fileio.read_jsonl(str(path)) == [{"a": 1}, {"b": "é"}]

    class Boom:
        pass

    with pytest.raises(TypeError):
        fileio.write_jsonl(path, [{"a": 2}, {"b": Boom()}])
    assert fileio.read_jsonl(str(path)) == [{"a": 1}, {"b": "é"}]  # old file intact, no temp left
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ConfigError) as e:
        fileio.read_jsonl(str(path))
    assert e.value.key == f"{path}:2"


# ------------------------------------------------------------------------------------- `evolm eval downstream` CLI


def test_eval_downstream_end_to_end(lm, tmp_path, capsys):
    import json

    import torch

    from evolm_nemo import cli
    from evolm_nemo.evaluation.score import score_rows
    from evolm_nemo.evaluation.tasks import get_task, load_problems
    from tests.conftest import REPO
    from tests.evaluation._tiny import make_rm

    path, model, tok = lm
    rm_dir = tmp_path / "rm"
    make_rm(rm_dir)
    data, out = REPO / "tests" / "fixtures" / "eval", tmp_path / "out"
    assert cli.main(["eval", "downstream", f"model={path}", "tasks=[gsm8k_platinum,strategyqa]", f"data_dir={data}",
                     "limit=2", "n=3", "max_new_tokens=8", "backend=hf", f"rm={rm_dir}", f"out={out}",
                     "name=tiny-sft", "stage=sft", "workers=1"]) == 0
    proc = capsys.readouterr()
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["suite"] for r in rows] == ["gsm8k_platinum"] * 2 + ["strategyqa"] * 2
    for r in rows:
        task = get_task(r["suite"])
        src = next(p for p in load_problems(task, path=str(data / f"{task.name}.jsonl")) if p["id"] == r["id"])
        assert {k: r[k] for k in ("id", "problem", "gt_solution", "gt_answer")} == src
        assert len(r["completions"]) == 3 and len(r["rm_scores"]) == 3 and isinstance(r["greedy"], str)
        # Greedy is transformers' greedy on the task's prompt, cut at the task's stop strings; a prompt that fills the
        # model's 256 positions (the default max_model_len here) gets empty completions, not text sampled past them.
        ids = tok(task.prompt(r["problem"]), return_tensors="pt").input_ids
        if ids.shape[1] >= 256:
            assert r["greedy"] == "" and r["completions"] == [""] * 3
            continue
        with torch.inference_mode():
            ref = model.generate(ids, do_sample=False, max_new_tokens=8, repetition_penalty=1.1)[0, ids.shape[1]:]
        ref = ref.tolist()
        ref = ref[:ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
        assert r["greedy"] == cut_at_stop(tok.decode(ref), task.stop)
    scored = [json.loads(x) for x in (out / "scored.jsonl").read_text().splitlines()]
    expect, summary = score_rows(rows, "evolm")
    assert scored == json.loads(json.dumps(expect))  # the same scorer as `evolm score`
    result = json.loads((out / "result.json").read_text())
    assert (result["model"], result["stage"], result["downstream"]["scoring"]) == ("tiny-sft", "sft", "evolm")
    assert set(result["downstream"]["suites"]) == {"gsm8k_platinum", "strategyqa"}
    assert result["downstream"]["id_avg"] == json.loads(json.dumps(summary["id_avg"]))
    assert result["downstream"]["sampling"]["backend"] == "hf" and result["downstream"]["sampling"]["n"] == 3
    # max_model_len: null is the model's 256-token context (shorter than EvoLM's 2048), recorded as used
    assert result["downstream"]["sampling"]["max_model_len"] == 256
    assert sum(len(tok(get_task(r["suite"]).prompt(r["problem"])).input_ids) < 256 for r in rows) == 2
    assert "prompt(s) fill max_model_len=256; their completions are empty" in proc.err
    assert "Pass@1" in proc.out and "strategyqa" in proc.out and "tok/s" in proc.err
    assert "Maj@3" in proc.out and "Pass@3" in proc.out and "@16" not in proc.out  # n=3 samples per problem


def test_eval_downstream_resumes_after_sampling(lm, tmp_path, capsys, monkeypatch):
    """A run stopped after sampling (here: its RM scores NaN) keeps each sampled suite under out/.sampled; the rerun
    with the same model and settings scores them without loading the model; a suite whose file is gone (a run
    stopped in it) is sampled again and gets the same samples (seeded by position); other settings sample afresh;
    a finished run leaves no .sampled behind."""
    import json

    import torch

    from evolm_nemo import cli
    from evolm_nemo.evaluation import evaluate, sampling
    from tests.conftest import REPO
    from tests.evaluation._tiny import make_rm

    path, _, _ = lm
    bad, good = tmp_path / "bad_rm", tmp_path / "rm"
    model, _ = make_rm(bad, seed=2)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(bad)
    make_rm(good)
    data, out = REPO / "tests" / "fixtures" / "eval", tmp_path / "out"
    args = ["eval", "downstream", f"model={path}", "tasks=[gsm8k_platinum,strategyqa]", f"data_dir={data}", "limit=2",
            "n=3", "max_new_tokens=8", "backend=hf", f"out={out}", "workers=1"]
    assert cli.main([*args, f"rm={bad}"]) == 2
    first = (out / "completions.jsonl").read_text()
    assert not (out / "result.json").exists()
    assert sorted(p.name for p in (out / evaluate.SAMPLED).iterdir()) == ["gsm8k_platinum.json", "strategyqa.json"]
    capsys.readouterr()

    def no_model(*a, **k):
        raise AssertionError("the model was loaded again")

    with monkeypatch.context() as m:
        m.setattr(sampling, "load", no_model)
        assert cli.main([*args, f"rm={good}"]) == 0
    said = capsys.readouterr().out
    assert said.count("completions kept from an interrupted run") == 2, said
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "rm_scores"} for r in rows] == \
        [json.loads(x) for x in first.splitlines()]
    assert not (out / evaluate.SAMPLED).exists() and (out / "result.json").is_file()
    # stopped in the second suite: only that one is sampled again, to the same samples
    assert cli.main([*args, f"rm={bad}"]) == 2
    (out / evaluate.SAMPLED / "strategyqa.json").unlink()
    capsys.readouterr()
    assert cli.main([*args, f"rm={good}"]) == 0
    said = capsys.readouterr().out
    assert "gsm8k_platinum: 2 problems' completions kept" in said and "strategyqa: 2 problems'" not in said, said
    assert [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()] == rows
    # another setting: everything sampled again
    assert cli.main([*args, f"rm={bad}"]) == 2
    capsys.readouterr()
    assert cli.main([*args, "seed=7", f"rm={good}"]) == 0
    assert "kept from an interrupted run" not in capsys.readouterr().out


def test_eval_downstream_bad_input_is_one_line(lm, tmp_path):
    from tests.conftest import run_evolm

    path = lm[0]
    cases = [
        (["tasks=[gsm8k,math]"], "error: tasks: unknown task 'gsm8k'"),
        ([f"data_dir={tmp_path}", "tasks=[math]"], f"error: data_dir: missing {tmp_path / 'math.jsonl'}"),
        (["scoring=loose"], "error: scoring: expected evolm or strict, got 'loose'"),
    ]
    if not sampling.installed("vllm"):
        cases.append((["backend=vllm"], "error: backend: vllm needs the `vllm` package, which is not installed"))
    afile = tmp_path / "afile"
    afile.write_text("x")  # an out that cannot be made: refused before any sampling, not after it
    cases.append(([f"out={afile}", "limit=1"], f"error: out: cannot write into {afile}: it is a file"))
    # no data_dir and no hub (tests run offline): one line naming data_dir, not the hub client's traceback
    cases.append((["tasks=[gsm8k_platinum]", "limit=1", f"out={tmp_path / 'o'}"],
                  "error: data_dir: cannot load gsm8k_platinum from the hub (madrylab/gsm8k-platinum: "))
    for extra, first in cases:
        proc = run_evolm("eval", ["downstream", f"model={path}", *extra], check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(first), proc.stderr
    proc = run_evolm("eval", ["downstream", f"model={tmp_path}"], check=False)
    assert proc.returncode == 2 and "error: model:" in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,key", [
    (["temperature=nan"], "temperature"), (["temperature=inf"], "temperature"), (["top_p=nan"], "top_p"),
    (["repetition_penalty=0"], "repetition_penalty"), (["repetition_penalty=-1"], "repetition_penalty"),
    (["repetition_penalty=nan"], "repetition_penalty"), (["tensor_parallel_size=0"], "tensor_parallel_size"),
    (["workers=-1"], "workers"), (["rm_batch_size=0"], "rm_batch_size"),
    (["max_model_len=257"], "max_model_len"),  # the tiny model's max_position_embeddings is 256
    (["rm=<causal lm>"], "rm"), (["rm=<two labels>"], "rm"), (["rm=<bad json>"], "rm"),
    (["data_dir=<empty suite>"], "data_dir"),
])
def test_eval_downstream_bad_settings_before_the_model_loads(lm, tmp_path, capsys, extra, key):
    """Settings transformers refuses only after the model is loaded (temperature / repetition_penalty NaN or <= 0),
    an rm that is no reward model (a causal LM export: was refused after all the sampling, completions.jsonl and
    .sampled/ left behind), an empty suite file (was rc 0 with n=0) and out-of-range counts: one line, nothing
    written, no model loaded."""
    from tests.conftest import REPO, refused_in_process

    causal, two, badjson, data = (tmp_path / n for n in ("causal", "two", "badjson", "data"))
    for d in (causal, two, badjson, data):
        d.mkdir()
    (causal / "config.json").write_text((lm[0] / "config.json").read_text())  # the tiny LlamaForCausalLM's
    (two / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"], '
                                     '"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}')
    (badjson / "config.json").write_text('{"architectures": ')
    (data / "gsm8k_platinum.jsonl").write_text((REPO / "tests" / "fixtures" / "eval" / "gsm8k_platinum.jsonl")
                                               .read_text())
    (data / "math.jsonl").write_text("\n")
    subst = {"rm=<causal lm>": f"rm={causal}", "rm=<two labels>": f"rm={two}", "rm=<bad json>": f"rm={badjson}",
             "data_dir=<empty suite>": f"data_dir={data}"}
    extra = [subst.get(e, e) for e in extra]
    if not any(e.startswith("data_dir=") for e in extra):
        extra.append(f"data_dir={REPO / 'tests' / 'fixtures' / 'eval'}")
    out = tmp_path / "out"
    line = refused_in_process(capsys, "eval", ["downstream", f"model={lm[0]}", "tasks=[gsm8k_platinum,math]",
                                               "limit=1", "n=2", "max_new_tokens=4", "backend=hf", f"out={out}",
                                               *extra], key)
    if key == "data_dir":
        assert f"no problems in {data / 'math.jsonl'}" in line
    if extra[0] == f"rm={causal}":
        assert "LlamaForCausalLM, not a reward model" in line
    if key == "max_model_len":  # the hf backend generated past the model's positions without a word
        assert line == (f"error: max_model_len: 257 is longer than the model's context of 256 tokens "
                        f"(max_position_embeddings in {lm[0] / 'config.json'}); set max_model_len <= 256, or null "
                        "for 256")
    assert not out.exists()


@pytest.mark.parametrize("generation_config", [True, False])
def test_a_model_naming_no_eos_is_one_line_before_it_loads(lm, tmp_path, capsys, generation_config):
    """A tokenizer without eos_token (and without a BOS on its prompts) beside a config naming no eos_token_id was an
    IndexError out of the hf sampler once the model had loaded; now one line, nothing written."""
    import json
    import shutil

    from tests.conftest import REPO, refused_in_process

    model = tmp_path / "model"
    shutil.copytree(lm[0], model)
    for name, drop in (("tokenizer_config.json", ("eos_token", "bos_token")), ("config.json", ("eos_token_id",)),
                       ("generation_config.json", ("eos_token_id",))):
        data = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps({k: v for k, v in data.items() if k not in drop}))
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps({**tokenizer, "post_processor": None}))
    if not generation_config:
        (model / "generation_config.json").unlink()
    out = tmp_path / "out"
    line = refused_in_process(capsys, "eval", ["downstream", f"model={model}", "tasks=[math]", "limit=1", "n=2",
                                               "max_new_tokens=4", "backend=hf", f"out={out}",
                                               f"data_dir={REPO / 'tests' / 'fixtures' / 'eval'}"], "model")
    assert "names no EOS token" in line and not out.exists()


@pytest.mark.parametrize("mode, tasks, why", [
    ("downstream", "[math,gsm8k_platinum,math]", "its problems would be sampled and counted twice"),
    ("upstream", "[piqa,arc_easy,piqa]", "it would count twice in the average"),
])
def test_a_task_listed_twice_is_one_line(lm, tmp_path, capsys, mode, tasks, why):
    """tasks=[math,math] sampled math twice and counted each problem twice in its suite's and the ID average
    (upstream: the task weighed twice in the average); refused before anything is read or written."""
    from tests.conftest import REPO, refused_in_process

    data = REPO / ("tests/fixtures/eval" if mode == "downstream" else "eval/upstream/sample")
    out = tmp_path / "out"
    line = refused_in_process(capsys, "eval", [mode, f"model={lm[0]}", f"tasks={tasks}", f"data_dir={data}",
                                               "limit=1", f"out={out}"], "tasks")
    assert line.endswith(f"is listed twice ({why}); list each task once") and not out.exists()


@pytest.mark.parametrize("backend", ["hf", "auto"])  # auto is hf on a machine without a GPU
def test_tensor_parallel_on_the_hf_backend_is_one_line(lm, tmp_path, capsys, backend):
    """tensor_parallel_size=2 with the hf sampler (one device) was silently ignored."""
    from tests.conftest import REPO, refused_in_process

    out = tmp_path / "out"
    line = refused_in_process(capsys, "eval", ["downstream", f"model={lm[0]}", f"backend={backend}", "limit=1",
                                               "tensor_parallel_size=2", f"data_dir={REPO / 'tests/fixtures/eval'}",
                                               f"out={out}"], "tensor_parallel_size")
    assert "needs backend=vllm or trtllm" in line and not out.exists()


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_model_directory_is_one_line_before_sampling(lm, tmp_path, capsys, damage):
    """A model directory transformers fails on only while loading it -- safetensors cut short, heads that do not
    divide the hidden size, a vocab_size or hidden_size its tensors do not have, tokenizer.json cut short, config.json
    not JSON, a pytorch_model.bin holding pickled code -- was a safetensors / transformers / torch traceback (exit 1;
    torch's advising to load the .bin with weights_only=False): now one line naming the file or field, before any
    model loads; nothing written, and the .bin's code never runs."""
    from tests.conftest import REPO, refused_in_process

    model = damaged_copy(lm[0], tmp_path / "model", damage)
    out = tmp_path / "out"
    line = refused_in_process(capsys, "eval", ["downstream", f"model={model}", "tasks=[gsm8k_platinum]",
                                               f"data_dir={REPO / 'tests' / 'fixtures' / 'eval'}", "limit=1", "n=2",
                                               "max_new_tokens=4", "backend=hf", f"out={out}"], "model")
    assert DAMAGES[damage] in line, line
    assert "weights_only` set to False" not in line and "allowlist" not in line, line
    assert not out.exists() and not (tmp_path / "model.unsafe").exists()


@pytest.mark.parametrize("damage", ["truncated_safetensors", "tokenizer_cut_short"])
def test_a_damaged_reward_model_is_one_line_before_sampling(lm, tmp_path, capsys, damage):
    """A damaged rm= directory was found only after all the sampling (a traceback once completions.jsonl was
    written): refused in one line naming rm and the file, before the policy is loaded."""
    from tests.conftest import REPO, refused_in_process
    from tests.evaluation._tiny import make_rm

    make_rm(tmp_path / "rm_src")
    rm_dir = damaged_copy(tmp_path / "rm_src", tmp_path / "rm", damage)
    out = tmp_path / "out"
    line = refused_in_process(capsys, "eval", ["downstream", f"model={lm[0]}", f"rm={rm_dir}",
                                               "tasks=[gsm8k_platinum]",
                                               f"data_dir={REPO / 'tests' / 'fixtures' / 'eval'}", "limit=1", "n=2",
                                               "max_new_tokens=4", "backend=hf", f"out={out}"], "rm")
    assert DAMAGES[damage] in line, line
    assert not out.exists()


def test_demo_hook_samples_scores_and_plots(lm, tmp_path, capsys):
    from evolm_nemo.evaluation.evaluate import demo
    from tests.conftest import REPO

    data = tmp_path / "data"
    data.mkdir()
    src = REPO / "tests" / "fixtures" / "eval" / "gsm8k_platinum.jsonl"
    (data / "gsm8k_platinum.jsonl").write_text(src.read_text())
    written = demo(str(lm[0]), str(tmp_path / "out"), str(data), limit=2, n=2, max_new_tokens=4, workers=1)
    out = capsys.readouterr().out
    assert written["id_vs_ood"] is None  # one ID suite only: no OOD axis
    assert f"plot: {written['maj_vs_pass']}" in out and "gsm8k_platinum" in out
    assert (tmp_path / "out" / "report" / "maj_vs_pass.png").stat().st_size > 1000


def test_the_presence_check_passes_tied_heads_and_checkpoints_transformers_renames(tmp_path):
    """The missing-tensor refusal (an untied lm_head.weight no file holds) must not refuse what transformers loads
    whole: a tied LM head (stored once, as the embedding) and a checkpoint whose names transformers converts on load
    (Mixtral's experts are stored one by one and loaded stacked)."""
    import torch
    from transformers import LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from evolm_nemo.evaluation.evaluate import check_model
    from tests.evaluation._tiny import _config, make_tokenizer

    tied, moe = tmp_path / "tied", tmp_path / "moe"
    tok = make_tokenizer(tied)
    config = _config(tok)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tied)
    check_model(str(tied))
    tok = make_tokenizer(moe)
    MixtralForCausalLM(MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                     max_position_embeddings=256)).save_pretrained(moe)
    check_model(str(moe))
