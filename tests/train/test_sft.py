"""SFT on the one engine, judged from outside: K steps equal transformers' LlamaForCausalLM + torch AdamW with the
masked per-token loss (weights 1e-5); one global batch of very different answer lengths gives the same loss and
gradients for micro 1x4, 2x2, 4x1 and DP=2 (1e-6); TP=2 / PP=2 equal TP=1; SIGKILL mid-epoch and resume reproduces
the uninterrupted losses; a dataset made with another tokenizer is refused in one line.

A transformers-made Llama (random, perturbed weights) is imported with `evolm import-hf`; its SFT data comes from
`evolm prepare-sft`; training is `evolm train stage=sft` exactly as the documented contract writes it."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.data.sft import SFTDataset
from tests.conftest import REPO, one_line_error, run_evolm, subprocess_env, tiny, train_then_sigkill, tree_bytes
from tests.conversion._sources import load_tensors, make_source, make_tokenizer

QUESTIONS = [
    ("What is 2 + 3?", "5"),
    ("Is the sky green?", "No. The sky is blue on a clear day, because air scatters blue light more than red light."),
    ("Name a fox.", "The quick brown fox."),
    ("Tell me about the lazy dog and the fox.",
     "The quick brown fox jumps over the lazy dog. The answer is 5."),
]
ROWS = [{"question": q, "answer": a} for q, a in QUESTIONS] * 3  # 12 rows: 3 global batches of 4
LR, MIN_LR = 1e-3, 1e-4


def metrics(out) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r}


@pytest.fixture(scope="module")
def hf_parent(tmp_path_factory):
    return make_parent(tmp_path_factory.mktemp("sft_ref"), "tiny_gqa", seed=3)


def make_parent(root, shape: str, seed: int) -> dict:
    """A transformers-made Llama of ``shape``, its tokenizer, the `evolm import-hf` checkpoint and a prepared SFT
    dataset, under ``root``."""
    tok_dir = root / "tokenizer"
    make_tokenizer(tok_dir)
    hf = make_source(shape, root / "hf", tok_dir, seed=seed)
    run_evolm("import-hf", [f"src={hf}", f"dst={root / 'imported'}", "progress=false"])
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_evolm("prepare-sft", [f"input={data}", f"output={root / 'sft'}", f"tokenizer={tok_dir}",
                              "question_key=question", "answer_key=answer", "filter=false", "dedup=false",
                              "progress=false"])
    return {"root": root, "tok": tok_dir, "hf": hf, "ckpt": root / "imported", "data": root / "sft"}


def sft_overrides(out, parent, *extra):
    """The documented contract, plus run-local settings (fixed order, no warmup so step 1 trains)."""
    return [f"run.out_dir={out}", "stage=sft", f"train.init_from={parent['ckpt']}", f"data.paths=[{parent['data']}]",
            "train.epochs=1", "parallel.micro_batch_size=2", "parallel.global_batch_size=4", f"optim.lr={LR}",
            f"optim.min_lr={MIN_LR}", "optim.warmup_fraction=0", "optim.weight_decay=0", "train.log_interval=1",
            "sft.shuffle=false", "train.progress=false", "train.tensorboard=false", *extra]


def _reference_batches(parent):
    """Each example's ids and prompt length, computed here with the tokenizer (not read from our dataset); text
    normalised as prepare-sft documents it (outer whitespace stripped)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(parent["tok"]))
    out = []
    for r in ROWS:
        prompt = tok(f"Human: {r['question'].strip()}\nAssistant:")["input_ids"]
        answer = tok(r["answer"].strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((prompt + answer, len(prompt)))
    return out


def _masked_loss(model, batch):
    """Sum of answer-token CE over a list of (ids, prompt_len), and the number of answer tokens."""
    total, count = 0.0, 0
    for ids, plen in batch:
        x = torch.tensor([ids])
        logits = model(input_ids=x[:, :-1]).logits[0].float()
        ce = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        total = total + ce[plen - 1:].sum()
        count += len(ids) - plen
    return total, count


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory, hf_parent):
    """The contract's run, padded, one process: the reference of the transformers comparison and of the layouts."""
    out = tmp_path_factory.mktemp("sft_padded") / "run"
    return out, run_evolm("train", sft_overrides(out, hf_parent))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sft_steps_equal_transformers_adamw(tmp_path, hf_parent, padded_run, layout):
    from transformers import LlamaForCausalLM

    if layout == "padded":
        out, proc = padded_run
    else:
        out = tmp_path / "run"
        proc = run_evolm("train", sft_overrides(out, hf_parent, "train.packing=true"))
    assert "12 examples (0 truncated, 0 dropped" in proc.stdout  # every example fits: the reference is exact
    ours = metrics(out)
    assert sorted(ours) == [1, 2, 3]
    # the dataset holds exactly the ids the reference computes (prompt and answer encoded separately, EOS last)
    ref_batches = _reference_batches(hf_parent)
    ds = SFTDataset(hf_parent["data"])
    assert [(ds.ids(i).tolist(), int(ds.prompt_len[i])) for i in range(len(ds))] == ref_batches
    run_evolm("export-hf", [f"src={out}", f"dst={tmp_path / 'hf_out'}", "progress=false"])

    model = LlamaForCausalLM.from_pretrained(str(hf_parent["hf"]), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for step in range(3):
        lr = MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * step / 3))  # cosine, no warmup
        assert abs(ours[step + 1]["lr"] - lr) < 1e-12
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        total, count = _masked_loss(model, ref_batches[4 * step:4 * step + 4])
        loss = total / count
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        assert abs(ours[step + 1]["loss"] - float(loss)) < 1e-5, (step, ours[step + 1]["loss"], float(loss))
        assert abs(ours[step + 1]["grad_norm"] - float(norm)) < 1e-5 * max(1.0, float(norm))
        assert ours[step + 1]["answer_tokens"] == count
    got = load_tensors(tmp_path / "hf_out")
    want = {k: v.detach() for k, v in model.state_dict().items()}
    assert set(got) == set(want)
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    moved = max(float((got[k].float() - load_tensors(hf_parent["hf"])[k].float()).abs().max()) for k in want)
    assert worst < 1e-5 and moved > 1e-3, (worst, moved)  # equal to the reference, and it really trained


# (packed rows under a 120-token budget: test_packed_under_pp4_equals_the_padded_run, through 4 pipeline stages)
SPLITS = (("1x4", ["parallel.micro_batch_size=1"], 1), ("4x1", ["parallel.micro_batch_size=4"], 1),
          ("dp2", ["parallel.micro_batch_size=1"], 2), ("packed", ["train.packing=true"], 1),
          ("packed_dp2", ["train.packing=true"], 2), ("budget_120", ["parallel.max_tokens_per_microbatch=120"], 1))


def test_loss_and_grads_do_not_depend_on_the_split(tmp_path, hf_parent):
    """One global batch of 4 very different answer lengths: micro 1x4, 4x1, DP=2, packed rows (one rank and two) and
    a 120-token budget all agree (two steps): the layout is never the batch."""
    from transformers import LlamaForCausalLM

    runs = {}
    for name, extra, nproc in SPLITS:
        out = tmp_path / name
        run_evolm("train", sft_overrides(out, hf_parent, *extra, "train.iters=2"), nproc=nproc)
        runs[name] = metrics(out)
    base = runs["1x4"]
    for name, got in runs.items():
        for it in (1, 2):
            for key in ("loss", "grad_norm"):
                assert abs(got[it][key] - base[it][key]) <= 1e-6 * max(1.0, abs(base[it][key])), \
                    (name, it, key, got[it][key], base[it][key])
            assert got[it]["answer_tokens"] == base[it]["answer_tokens"]
    assert runs["4x1"][1]["padding_fraction"] > 0.2 and runs["packed"][1]["padding_fraction"] == 0.0
    # the test can fail: averaging per-microbatch means (the classic bug) gives another loss for this batch
    model = LlamaForCausalLM.from_pretrained(str(hf_parent["hf"]), dtype=torch.float32)
    batch = _reference_batches(hf_parent)[:4]
    with torch.no_grad():
        per_example = [(lambda t, c: float(t) / c)(*_masked_loss(model, [ex])) for ex in batch]
        total, count = _masked_loss(model, batch)
    assert abs(float(total) / count - base[1]["loss"]) < 1e-5
    assert abs(sum(per_example) / 4 - base[1]["loss"]) > 1e-3
    lengths = [len(ids) - plen for ids, plen in batch]
    assert max(lengths) > 10 * min(lengths)


@pytest.mark.parametrize("layout,packing", [("tp2", False), ("pp2", False), ("tp2_sp", True), ("pp2", True)])
def test_sft_layouts_equal_tp1(tmp_path, hf_parent, padded_run, layout, packing):
    ref, out = padded_run[0], tmp_path / layout
    run_evolm("train", sft_overrides(out, hf_parent, f"parallel={layout}", "parallel.micro_batch_size=2",
                                     "parallel.global_batch_size=4", f"train.packing={str(packing).lower()}"),
              nproc=2)
    want, got = metrics(ref), metrics(out)
    for it in (1, 2, 3):
        assert abs(got[it]["loss"] - want[it]["loss"]) < 1e-5, (layout, it, got[it]["loss"], want[it]["loss"])


def test_packed_under_pp4_equals_the_padded_run(tmp_path):
    """PP=4 (4 ranks, a 4-layer model: where Megatron-Bridge #2952 broke the packed loss): packed rows under a token
    budget (several microbatches through the 1F1B pipeline) give the padded PP=1 run's losses and grad norms."""
    parent = make_parent(tmp_path, "tiny4_gqa", seed=5)
    run_evolm("train", sft_overrides(tmp_path / "padded", parent, "model.num_layers=4", "parallel.micro_batch_size=1"))
    run_evolm("train", sft_overrides(tmp_path / "pp4", parent, "model.num_layers=4", "parallel.pp=4", "train.packing=true",
                                     "parallel.max_tokens_per_microbatch=120"), nproc=4)
    want, got = metrics(tmp_path / "padded"), metrics(tmp_path / "pp4")
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for it in (1, 2, 3):
        for key in ("loss", "grad_norm"):
            assert abs(got[it][key] - want[it][key]) <= 1e-5 * abs(want[it][key]), (it, key, got[it], want[it])


def test_no_leakage_between_padded_or_packed_examples(tmp_path):
    """Per-example logits in a right-padded microbatch, and in one packed row (position ids restarting, attention
    within each example), equal each example run alone (real megatron model)."""
    script = REPO / "tests" / "train" / "_sft_leakage.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "facts.json")], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["lengths"][0] != facts["lengths"][-1]
    assert facts["max_diff"] < 1e-5 and facts["max_diff_packed"] < 1e-5, facts
    assert facts["padded_loss_positions"] == 0  # padding carries no loss weight


@pytest.fixture(scope="module")
def synthetic_parent(a_run):
    return a_run  # a tiny pretraining run (only read: train.init_from)


def _synthetic_sft(out, cache, parent, *extra):
    return tiny(out, cache, "experiment=demo_sft", f"train.init_from={parent}", "sft.synthetic_examples=200",
                "parallel.micro_batch_size=4", "parallel.global_batch_size=8", *extra)


KILL_ARGS = ["train.epochs=2", "train.iters=30", "train.save_interval=3", "train.keep_last=20"]
# 200 examples / 8 = 25 iterations per epoch: the resumed run crosses into epoch 2 (reshuffled)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache, synthetic_parent):
    full = tmp_path_factory.mktemp("sft_full") / "full"
    run_evolm("train", _synthetic_sft(full, data_cache, synthetic_parent, *KILL_ARGS))
    return full, metrics(full)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sigkill_mid_epoch_then_resume_matches(tmp_path, data_cache, synthetic_parent, uninterrupted, layout):
    """The killed run resumes to the uninterrupted padded run's metrics: exactly (1e-6) when it is padded too, within
    1e-5 relative when it is packed (another layout of the same batches: only the order of additions differs)."""
    iters = 30
    full, want = uninterrupted
    assert sorted(want) == list(range(1, iters + 1))
    assert want[iters]["epoch"] == pytest.approx(iters * 8 / 200)
    assert all(0.0 <= r["padding_fraction"] < 1.0 and r["answer_tokens"] > 0 for r in want.values())
    assert want[iters]["answer_tokens_total"] == sum(r["answer_tokens"] for r in want.values())
    meta = json.loads((ckpt.latest(full / "checkpoints") / "evolm.json").read_text())
    assert [s["stage"] for s in meta["lineage"]["stages"]] == ["pretrain", "sft"]
    assert meta["lineage"]["stages"][-1]["examples"] == 200

    args = [*KILL_ARGS, *(["train.packing=true"] if layout == "packed" else [])]
    out = tmp_path / "killed"
    killed_at = train_then_sigkill(_synthetic_sft(out, data_cache, synthetic_parent, *args), out, at_least=6)
    assert killed_at < 25, "the run left epoch 1 before it could be killed"
    resumed = run_evolm("train", _synthetic_sft(out, data_cache, synthetic_parent, *args))
    assert "resuming at iteration" in resumed.stdout
    got = metrics(out)
    assert sorted(got) == list(range(1, iters + 1))
    tol = 1e-6 if layout == "padded" else 1e-5
    for it in range(1, iters + 1):
        assert abs(got[it]["loss"] - want[it]["loss"]) <= tol * max(1.0, abs(want[it]["loss"])), \
            (it, got[it]["loss"], want[it]["loss"])
    assert got[iters]["answer_tokens_total"] == want[iters]["answer_tokens_total"]
    if layout == "packed":
        assert all(r["padding_fraction"] == 0.0 for r in got.values())  # rows hold exactly their examples
        assert sum(r["padding_fraction"] for r in want.values()) > 1.0


def test_dataset_from_another_tokenizer_is_refused(tmp_path, hf_parent, synthetic_parent):
    proc = run_evolm("train", [f"run.out_dir={tmp_path / 'run'}", "stage=sft", f"train.init_from={synthetic_parent}",
                               f"data.paths=[{hf_parent['data']}]", "train.progress=false"], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.paths:") and "tokenized with" in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,key", [
    (["train.tokens=1M", "train.epochs=null"], "train.tokens"),
    (["train.epochs=null", "train.iters=null"], "train.epochs"),
    (["train.init_from=null"], "train.init_from"),
    (["data.paths=[/nonexistent/sft]"], "data.paths"),
    (["sft.overlength=wrap"], "sft.overlength"),
    (["parallel.global_batch_size=64", "parallel.micro_batch_size=2"], "parallel.global_batch_size"),
    (["parallel.max_tokens_per_microbatch=4"], "parallel.max_tokens_per_microbatch"),
    (["train.packing=true", "model.core_attention=megatron"], "train.packing"),
])
def test_bad_sft_recipe_is_one_line(tmp_path, hf_parent, capsys, extra, key):
    from tests.conftest import refused_in_process

    refused_in_process(capsys, "train", sft_overrides(tmp_path / "run", hf_parent, *extra), key)
    assert not (tmp_path / "run").exists()


def test_a_token_budget_without_packing_is_refused_under_pipeline_parallel(hf_parent):
    """Pipeline stages exchange one activation shape; a budget's microbatches change their row count."""
    from evolm_nemo.config import ConfigError, RootConfig, compose
    from evolm_nemo.stages import plan_run

    args = sft_overrides("/nonexistent/run", hf_parent, "parallel=pp2", "parallel.max_tokens_per_microbatch=256")
    with pytest.raises(ConfigError) as err:
        plan_run(compose("config", args, RootConfig), world_size=2)
    assert err.value.key == "parallel.max_tokens_per_microbatch" and "train.packing=true" in str(err.value)
    plan_run(compose("config", [*args, "train.packing=true"], RootConfig), world_size=2)  # packed rows: one shape


def test_resume_on_other_data_or_order_is_refused(tmp_path, hf_parent):
    """An SFT run resumed with other data.paths content or another order is refused in one line naming the key,
    nothing touched; the same data moved elsewhere resumes."""
    out, args = tmp_path / "run", ["train.epochs=null", "train.iters=2", "train.save_interval=1"]
    run_evolm("train", sft_overrides(out, hf_parent, *args))
    shutil.rmtree(out / "checkpoints" / "iter_0000002")  # as if killed after iteration 1
    other = tmp_path / "other"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:8]))
    run_evolm("prepare-sft", [f"input={rows}", f"output={other}", f"tokenizer={hf_parent['tok']}",
                              "question_key=question", "answer_key=answer", "filter=false", "dedup=false",
                              "progress=false"])
    before = tree_bytes(out)
    line = one_line_error(run_evolm("train", sft_overrides(out, hf_parent, *args, f"data.paths=[{other}]"),
                                    check=False), "data.paths")
    assert "iter_0000001 was trained on other data than data.paths holds now" in line and "train.resume=false" in line
    line = one_line_error(run_evolm("train", sft_overrides(out, hf_parent, *args, "sft.shuffle=true"), check=False),
                          "sft.shuffle")
    assert tree_bytes(out) == before
    moved = tmp_path / "moved"
    shutil.copytree(hf_parent["data"], moved)
    resumed = run_evolm("train", sft_overrides(out, hf_parent, *args, f"data.paths=[{moved}]"))
    assert "resuming at iteration 1" in resumed.stdout and sorted(metrics(out)) == [1, 2]


def _rehash(ds):
    """Recompute a dataset's manifest content_sha256 as `evolm prepare-sft` does (token bytes, then the index)."""
    import numpy as np

    manifest = json.loads((ds / "manifest.json").read_text())
    h = hashlib.sha256((ds / "tokens.bin").read_bytes())
    h.update(np.load(ds / "index.npy").tobytes())
    manifest["content_sha256"] = h.hexdigest()
    (ds / "manifest.json").write_text(json.dumps(manifest))


def test_a_bit_flip_or_an_out_of_vocabulary_id_is_refused(tmp_path, hf_parent):
    """A prepared dataset is hashed at first use against its manifest's content_sha256 and recorded as verified
    (later runs do not hash it again); a same-size bit flip in tokens.bin is then refused in one line naming the
    dataset, before a run directory exists. A token id past model.vocab_size (a dataset prepared with a larger
    vocabulary) is refused likewise, instead of an IndexError in the embedding."""
    import numpy as np

    ds = tmp_path / "sft"
    shutil.copytree(hf_parent["data"], ds)
    args = ["train.epochs=null", "train.iters=1"]
    run_evolm("train", sft_overrides(tmp_path / "first", hf_parent, *args, f"data.paths=[{ds}]"))
    record = json.loads((ds / ".verified").read_text())
    assert record["measured"]["sha256"] == json.loads((ds / "manifest.json").read_text())["content_sha256"]
    stamp = (ds / ".verified").stat().st_mtime_ns
    run_evolm("train", sft_overrides(tmp_path / "second", hf_parent, *args, f"data.paths=[{ds}]"))
    assert (ds / ".verified").stat().st_mtime_ns == stamp  # verified once, not hashed again

    tokens = ds / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit
    tokens.write_bytes(bytes(data))
    first = tree_bytes(tmp_path / "first")
    line = one_line_error(run_evolm("train", sft_overrides(tmp_path / "run", hf_parent, *args, f"data.paths=[{ds}]"),
                                    check=False), "data.paths")
    assert f"{ds}: its content (tokens.bin, index.npy) does not match the content_sha256" in line
    assert not (tmp_path / "run").exists() and tree_bytes(tmp_path / "first") == first

    big = tmp_path / "big"
    shutil.copytree(hf_parent["data"], big)
    manifest = json.loads((big / "manifest.json").read_text())
    ids = np.fromfile(big / "tokens.bin", dtype=manifest["dtype"])
    vocab = int(json.loads((ckpt.resolve(hf_parent["ckpt"]) / "evolm.json").read_text())["model"]["vocab_size"])
    ids[3] = vocab + 5
    ids.tofile(big / "tokens.bin")
    _rehash(big)
    line = one_line_error(run_evolm("train", sft_overrides(tmp_path / "run", hf_parent, *args,
                                                           f"data.paths=[{big}]"), check=False), "data.paths")
    assert f"token id {vocab + 5} >= model.vocab_size={vocab}" in line and "tokens.bin" in line
    assert not (tmp_path / "run").exists()
