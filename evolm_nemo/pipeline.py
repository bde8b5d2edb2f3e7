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

from evolm_nemo.config import RootConfig, compose, validate

DEMO_PROBLEMS = 8  # held-out generated word problems for the evaluation step
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
    """User overrides that also apply to the CPT stage (its run dir and parent are the pipeline's own)."""
    own = ("run.out_dir=", "run.name=", "train.init_from=", "experiment=")
    return [o for o in overrides if not o.lstrip("+").startswith(own)]


def main(overrides: list[str]) -> int:
    cfg = compose("config", ["experiment=demo", *overrides], RootConfig)
    plan = validate(cfg)
    from pathlib import Path

    from evolm_nemo.data.tokenizer import load_tokenizer
    from evolm_nemo.generation.engine import Generator
    from evolm_nemo.runtime.distributed import teardown
    from evolm_nemo.train.loop import run

    try:
        pre = run(cfg, plan)
        is_main = pre["runtime"].is_main
        if is_main and pre["losses"]:
            print(f"[pretrain] {loss_curve(pre['losses'])}")
        out = Path(pre["out_dir"])
        cpt_cfg = compose("config", ["experiment=demo_cpt", *_stage_overrides(overrides),
                                     f"run.out_dir={out / 'cpt'}", f"train.init_from={pre['checkpoint']}"],
                          RootConfig)
        cpt_plan = validate(cpt_cfg)
        final = run(cpt_cfg, cpt_plan)
        if is_main and final["losses"]:
            print(f"[cpt] {loss_curve(final['losses'])}")
        if cfg.parallel.pp == 1:  # greedy samples with megatron's inference engine; every TP rank takes part
            tokenizer = load_tokenizer(final["tokenizer"])
            texts = Generator(final["model"], tokenizer, max_seq=cfg.model.seq_length).generate(PROMPTS, 40)
            for prompt, text in zip(PROMPTS, texts):
                if is_main:
                    print(f"sample> {prompt}{text}")
        if not is_main:
            return 0
        print(f"checkpoints: pretrain {pre['checkpoint']} -> cpt {final['checkpoint']}")
    finally:
        teardown()
    if final["runtime"].world_size > 1:  # export and evaluation run in one process, after the training group
        print(f"next (one process): evolm export-hf src={final['checkpoint']} dst={out / 'hf'} && "
              f"evolm eval downstream model={out / 'hf'}")
        return 0
    from evolm_nemo.conversion.cli import export_hf
    from evolm_nemo.evaluation.cli import demo as eval_demo

    hf_dir = out / "hf"
    export_hf([f"src={final['checkpoint']}", f"dst={hf_dir}", "overwrite=true"])
    print(f"HF export (verified): {hf_dir}")
    data_dir = write_demo_problems(out / "eval_data", seed=cfg.data.synthetic_seed + 1000)
    tokens = plan.iters * plan.tokens_per_iter
    eval_demo(str(hf_dir), str(out / "eval"), str(data_dir), limit=DEMO_PROBLEMS, n=16,
              extra=(f"name=evolm-{cfg.model.name}-demo", f"size={cfg.model.name}", f"pretrain_tokens={tokens}",
                     f"stage={cpt_cfg.stage}"))
    return 0


def write_demo_problems(directory, seed: int):
    """Held-out generated word problems in EvoLM's cooked GSM8K schema (gold after `#### `)."""
    from pathlib import Path

    from evolm_nemo.data.synthetic import generate
    from evolm_nemo.fileio import write_jsonl

    directory = Path(directory)
    rows = [{"id": f"demo-{i:04d}", "problem": q["problem"], "gt_solution": f"{q['solution']}\n#### {q['answer']}",
             "gt_answer": None} for i, q in enumerate(generate("qa", DEMO_PROBLEMS, seed))]
    write_jsonl(directory / "gsm8k_platinum.jsonl", rows)
    return directory
