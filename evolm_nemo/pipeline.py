"""`evolm pipeline` / `make demo`: the embedded default, end to end on a CPU laptop.

1. pretrain the `tiny` LLaMA-2 on the generated corpus (megatron-core engine, fp32 on CPU; recipe experiment=demo),
2. continue pretraining (CPT) from that checkpoint on a generated replay mix, text : math = 8 : 42 as in EvoLM's
   FW8+FM42 (recipe experiment=demo_cpt), printing each stage's loss curve summary,
3. print greedy samples from the final model (megatron-core's inference engine),
4. export the final checkpoint to a verified HF LlamaForCausalLM directory (logits checked against megatron),
5. evaluate it downstream with the `hf` backend (greedy + n=16) on held-out generated word problems in the
   GSM8K cooked schema, score them EvoLM-style, print the metrics table and the plot path.

Any training override works here too: `evolm pipeline train.iters=200 model.num_layers=4`.
"""

from __future__ import annotations

from pathlib import Path

from evolm_nemo.config import RootConfig, compose, validate

DEMO_PROBLEMS = 8  # held-out generated word problems for the final HF evaluation (greedy + n=16)
HELD_OUT = 64  # held-out problems for the greedy accuracy before and after SFT
MAX_NEW = 48  # completion tokens for those
STOP = ("Human:", "Assistant:")  # the template's turn markers end a completion
PROMPTS = ["Ben has 2 bags. Each bag has 7 cups. How many cups does Ben have?", "Count from 3 to 9:"]


def loss_curve(losses: list[float], points: int = 10) -> str:
    """A compact text summary: loss at evenly spaced iterations plus first / min / last."""
    n = len(losses)
    idx = sorted({min(n - 1, round(i * (n - 1) / (points - 1))) for i in range(points)})
    curve = "  ".join(f"{i + 1}:{losses[i]:.3f}" for i in idx)
    return (f"loss curve (iteration:loss): {curve}\n"
            f"loss first {losses[0]:.4f} -> min {min(losses):.4f} -> last {losses[-1]:.4f} "
            f"({'falling' if losses[-1] < losses[0] else 'NOT falling'})")


def _stage_overrides(overrides: list[str]) -> list[str]:
    """User overrides that also apply to the later stages (their run dirs and parents are the pipeline's own)."""
    own = ("run.out_dir=", "run.name=", "train.init_from=", "experiment=")
    return [o for o in overrides if not o.lstrip("+").startswith(own)]


def greedy_accuracy(model, tokenizer, problems: list[dict], template: str, max_new_tokens: int,
                    max_seq: int) -> tuple[float, list[str]]:
    """Greedy completions of ``problems`` (rows with ``problem``/``answer``) through megatron's inference engine on
    the live model, judged by the shared answer checker (strict). Every TP rank takes part."""
    from evolm_nemo.answers import judge
    from evolm_nemo.generation.engine import Generator

    prompts = [template.replace("{question}", p["problem"]) for p in problems]
    texts = Generator(model, tokenizer, max_seq=max_seq, max_batch=32).generate(prompts, max_new_tokens,
                                                                                 stop_strings=STOP)
    right = sum(judge("gsm8k_platinum", t, p["answer"], "strict") for t, p in zip(texts, problems))
    return right / max(len(problems), 1), texts


def _stage(name: str, overrides: list[str], out: Path, parent: str) -> tuple[RootConfig, object]:
    cfg = compose("config", [f"experiment={name}", *_stage_overrides(overrides), f"run.out_dir={out}",
                             f"train.init_from={parent}"], RootConfig)
    return cfg, validate(cfg)


def main(overrides: list[str]) -> int:
    cfg = compose("config", ["experiment=demo", *overrides], RootConfig)
    plan = validate(cfg)
    from evolm_nemo.data.sft_synthetic import ensure_synthetic_sft
    from evolm_nemo.data.tokenizer import load_tokenizer
    from evolm_nemo.fileio import read_jsonl
    from evolm_nemo.generation.engine import Generator
    from evolm_nemo.runtime.distributed import teardown
    from evolm_nemo.train.loop import run

    try:
        pre = run(cfg, plan)
        is_main = pre.runtime.is_main
        if is_main and pre.losses:
            print(f"[pretrain] {loss_curve(pre.losses)}")
        out = Path(pre.out_dir)
        cpt_cfg, cpt_plan = _stage("demo_cpt", overrides, out / "cpt", pre.checkpoint)
        cpt = run(cpt_cfg, cpt_plan)
        if is_main and cpt.losses:
            print(f"[cpt] {loss_curve(cpt.losses)}")
        sft_cfg, sft_plan = _stage("demo_sft", overrides, out / "sft", cpt.checkpoint)
        demo_data = ensure_synthetic_sft(sft_cfg)
        problems = read_jsonl(demo_data.eval_path)[:HELD_OUT]
        tokenizer = load_tokenizer(cpt.tokenizer)
        template, max_seq = sft_cfg.sft.prompt_template, cfg.model.seq_length
        can_generate = cfg.parallel.pp == 1  # the inference engine runs with pp=1 (every TP rank takes part)
        if can_generate:
            before, _ = greedy_accuracy(cpt.model, tokenizer, problems, template, MAX_NEW, max_seq)
        final = run(sft_cfg, sft_plan)
        if is_main and final.losses:
            print(f"[sft] {loss_curve(final.losses)}")
        if can_generate:
            after, texts = greedy_accuracy(final.model, tokenizer, problems, template, MAX_NEW, max_seq)
            if is_main:
                print(f"[sft] greedy accuracy on {len(problems)} held-out word problems (strict checker): "
                      f"before SFT {before:.1%} -> after SFT {after:.1%}")
                for p, t in list(zip(problems, texts))[:2]:
                    print(f"sample> Human: {p['problem']}\nAssistant:{t}")
            texts = Generator(final.model, tokenizer, max_seq=max_seq).generate(PROMPTS, 40)
            for prompt, text in zip(PROMPTS, texts):
                if is_main:
                    print(f"sample> {prompt}{text}")
        if not is_main:
            return 0
        print(f"checkpoints: pretrain {pre.checkpoint} -> cpt {cpt.checkpoint} -> sft {final.checkpoint}")
    finally:
        teardown()
    if final.runtime.world_size > 1:  # export and evaluation run in one process, after the training group
        print(f"next (one process): evolm export-hf src={final.checkpoint} dst={out / 'hf'} && "
              f"evolm eval downstream model={out / 'hf'}")
        return 0
    from evolm_nemo.conversion.cli import export_hf
    from evolm_nemo.evaluation.cli import demo as eval_demo

    hf_dir = out / "hf"
    export_hf([f"src={final.checkpoint}", f"dst={hf_dir}", "overwrite=true"])
    print(f"HF export (verified): {hf_dir}")
    data_dir = write_demo_problems(out / "eval_data", problems[:DEMO_PROBLEMS])
    tokens = plan.iters * plan.tokens_per_iter
    eval_demo(str(hf_dir), str(out / "eval"), str(data_dir), limit=DEMO_PROBLEMS, n=16,
              extra=(f"name=evolm-{cfg.model.name}-demo", f"size={cfg.model.name}", f"pretrain_tokens={tokens}",
                     f"stage={sft_cfg.stage}"))
    return 0


def write_demo_problems(directory, problems: list[dict]):
    """Held-out generated word problems in EvoLM's cooked GSM8K schema (gold after `#### `)."""
    from evolm_nemo.fileio import write_jsonl

    directory = Path(directory)
    rows = [{"id": q["id"], "problem": q["problem"], "gt_solution": f"{q['solution']}\n#### {q['answer']}",
             "gt_answer": None} for q in problems]
    write_jsonl(directory / "gsm8k_platinum.jsonl", rows)
    return directory
