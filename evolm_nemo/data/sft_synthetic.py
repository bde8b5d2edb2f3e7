"""The demo's post-training data: generated word problems with worked solutions ending in ``\\boxed{n}``, split three
ways from one pool -- SFT (prepared exactly as `evolm prepare-sft` prepares a file, consistency filter included), RL
(``{"id", "prompt", "gold_answer"}`` rows for the RL stage) and held-out evaluation problems -- with no question in
two of them. Built once per (sizes, seed, tokenizer) under ``data.cache_dir``, atomically.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.data.synthetic import generate
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.fileio import commit_first, release_output, staged_dir, write_jsonl

RL_EXAMPLES = 1000  # the demo RL set
EVAL_EXAMPLES = 200  # held-out problems (the demo scores a prefix of them)
DONE = "complete.json"


@dataclass(frozen=True)
class SyntheticSFT:
    root: Path

    @property
    def sft_dir(self) -> Path:
        return self.root / "sft"

    @property
    def rl_path(self) -> Path:
        return self.root / "rl.jsonl"

    @property
    def eval_path(self) -> Path:
        """Held-out problems as ``{"id", "problem", "solution", "answer"}`` rows."""
        return self.root / "eval.jsonl"


def synthetic_tokenizer(cfg: RootConfig) -> str:
    """The tokenizer the generated SFT set is written with: data.tokenizer, else the parent checkpoint's
    (``train.init_from``, which ``stages.plan_run`` requires of an SFT run)."""
    from evolm_nemo.checkpoint import io as ckpt

    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    ref = ckpt.parent_tokenizer(cfg.train.init_from, key="train.init_from")
    if not ref:
        raise ConfigError("train.init_from", "its checkpoint records no tokenizer; set data.tokenizer")
    return ref


def ensure_synthetic_sft(cfg: RootConfig) -> SyntheticSFT:
    """Generate (once) the demo's SFT dataset, RL set and held-out problems for ``cfg``'s parent tokenizer."""
    from evolm_nemo.data.sft import tokenizer_fingerprint

    s = cfg.sft
    ref = synthetic_tokenizer(cfg)
    tok = load_tokenizer(ref, key="data.tokenizer")
    digest = tokenizer_fingerprint(tok)["vocab_sha256"][:8]
    name = f"synthetic-sft-n{s.synthetic_examples}-r{RL_EXAMPLES}-e{EVAL_EXAMPLES}-s{s.synthetic_seed}-tok{digest}"
    root = Path(cfg.data.cache_dir) / name
    if (root / DONE).is_file():
        return SyntheticSFT(root)
    with staged_dir(root, mode=0o755) as tmp:
        _build(tmp, cfg, tok, ref)
        commit_first(tmp, root, DONE)  # another rank may have finished first
    return SyntheticSFT(root)


def problem_pool(cfg: RootConfig) -> tuple[list[dict], list[dict]]:
    """(held-out problems, the rest) of the demo's generated word problems: unique questions, shuffled by the seed;
    the first EVAL_EXAMPLES are held out from SFT and RL. A pure function of ``cfg.sft`` (no tokenizer needed)."""
    from evolm_nemo.data.sft_prepare import question_key

    s = cfg.sft
    want = s.synthetic_examples + RL_EXAMPLES + EVAL_EXAMPLES
    pool, seen = [], set()
    size = want
    while len(pool) < want:  # generated problems repeat now and then: draw more until the pool is unique
        pool, seen = [], set()
        for i, q in enumerate(generate("qa", size, s.synthetic_seed)):
            key = question_key(q["problem"])
            if key not in seen:
                seen.add(key)
                pool.append({"id": f"demo-{i:06d}", **q})
        size = int(size * 1.25) + 16
    random.Random(s.synthetic_seed).shuffle(pool)
    return pool[:EVAL_EXAMPLES], pool[EVAL_EXAMPLES:]


def _build(out: Path, cfg: RootConfig, tok, ref: str) -> None:
    from evolm_nemo.data.sft_prepare import PrepareSFTConfig, prepare_sft

    s = cfg.sft
    held_out, rest = problem_pool(cfg)
    write_jsonl(out / "eval.jsonl", held_out)
    rows = ((f"generated row {i}", {"id": r["id"], "question": r["problem"], "answer": r["solution"],
                                    "gold": r["answer"]}) for i, r in enumerate(rest))
    prep = PrepareSFTConfig(input="generated", output=str(out / "sft"), tokenizer=ref, reference_key="gold",
                            id_key="id", prompt_template=s.prompt_template, answer_template=s.answer_template,
                            allocation=f"{s.synthetic_examples}/{RL_EXAMPLES}", rl_output=str(out / "rl.jsonl"),
                            seed=s.synthetic_seed, cutoff=cfg.model.seq_length + 1, progress=False)
    manifest = prepare_sft(prep, rows=rows, tokenizer=tok)
    for output in (prep.output, prep.rl_output):  # their locks (beside them, in this private staged directory)
        release_output(output)
    (out / DONE).write_text(json.dumps({"sft": manifest["examples"], "rl": manifest["split"]["rl"],
                                        "eval": len(held_out)}) + "\n")
