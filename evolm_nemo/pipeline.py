"""`evolm pipeline` / `make demo`: the embedded default, end to end on a CPU laptop.

1. pretrain the `tiny` LLaMA-2 on the generated corpus (megatron-core engine, fp32 on CPU; recipe experiment=demo),
2. continue pretraining (CPT) from that checkpoint on a generated replay mix, text : math = 8 : 42 as in EvoLM's
   FW8+FM42 (recipe experiment=demo_cpt), printing each stage's loss curve summary; both record their dynamics
   (held-out loss per source, capability probes: `dynamics_overrides`), reported at step 9,
3. fine-tune it (SFT, recipe experiment=demo_sft with train.epochs=2: `SFT_EPOCHS`) on generated word problems with
   worked solutions and print the greedy accuracy on held-out problems before and after SFT,
4. print greedy samples from the SFT model (megatron-core's inference engine),
5. train a tiny outcome reward model on the SFT model's own samples of RL-set problems (judged by the shared
   checker; `evolm prepare-rm` + `stage=rm`) and print its validation AUC,
6. GRPO from the SFT model on the demo's RL set (recipe experiment=demo_rl, rewards from the shared checker): print
   the mean reward over its first and last steps and the greedy accuracy on the held-out problems before and after
   (the accuracies and steps 4-6 use the inference engine: with parallel.pp > 1 they are skipped),
then, in a single process (a run over several processes stops after the trainings and prints the export and
evaluation commands):
7. export the SFT checkpoint to a verified HF LlamaForCausalLM directory (logits checked against megatron), the reward
   model as LlamaForSequenceClassification and the RL actor,
8. evaluate the SFT model and the RL actor downstream with the `hf` backend (greedy + n=16) on held-out generated
   word problems in the GSM8K cooked schema, score them EvoLM-style (RM@16 from our RM), print the metrics table
   and the plot path,
9. report the pretraining and CPT dynamics (probes and held-out loss vs tokens) in <run.out_dir>/dynamics/.

Any training override works here too: `evolm pipeline train.iters=200 model.num_layers=4`.

Everything goes under run.out_dir (runs/demo: the pretraining run, cpt/, sft/, rm/, rl/, the exports, eval/,
eval_rl/, dynamics/). Stopped (Ctrl-C; SIGTERM or SIGHUP, where a running training saves a checkpoint first), it
resumes when the same command runs again: finished stages are not trained again; the samples, exports and
evaluations after them are made again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from evolm_nemo.answers import judge
from evolm_nemo.config import RootConfig, compose
from evolm_nemo.conversion.config import ExportHFConfig
from evolm_nemo.data.rm import PrepareRMConfig, prepare_rm
from evolm_nemo.data.sft_synthetic import ensure_synthetic_sft, problem_pool
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.evaluation.evaluate import demo as eval_demo
from evolm_nemo.evaluation.report import build as report
from evolm_nemo.evaluation.upstream import default_tasks_dir
from evolm_nemo.fileio import read_jsonl, write_jsonl
from evolm_nemo.stages import check_recipe, plan_run, run
from evolm_nemo.suite.demo_data import write_demo_problems
from evolm_nemo.tasks import TURN_MARKERS, UPSTREAM

# torch / megatron-core (export, generation, the probes' inference, the process group) are imported where they are
# used: `evolm pipeline` composes and checks every stage's recipe first (``check_recipes``), so that a recipe error is
# one line without the heavy imports

DEMO_PROBLEMS = 8  # held-out generated word problems for the final HF evaluation (greedy + n=16)
HELD_OUT = 64  # held-out problems for the greedy accuracy before and after SFT
MAX_NEW = 48  # completion tokens for those
RM_PROBLEMS, RM_SAMPLES = 160, 8  # the demo RM's training samples: problems of the RL set x samples each
SFT_EPOCHS = 2  # the demo's SFT: 2 epochs (demo_sft's 4 leave greedy accuracy where GRPO on this model cannot raise it)
RL_WINDOW = 10  # the RL stage's mean reward over its first and last RL_WINDOW steps
PROBE_PROBLEMS = 32  # held-out word problems in the pretraining / CPT downstream probe
VAL_DOCS = 100  # generated held-out documents per corpus kind for the held-out loss
DYNAMICS_EVERY = {"pretrain": 102400, "cpt": 51200}  # tokens between probes: every 100 / 50 iterations
PROBE_FRACTION = "null"  # no bound: the demo's runs are seconds long and want their few points (a probe ~1 s)
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
    the live model, judged by the shared answer checker (strict): the downstream probe's code. Every TP rank takes
    part."""
    from evolm_nemo.evaluation.probe import Problems, downstream

    batch = Problems("gsm8k_platinum", [template.replace("{question}", p["problem"]) for p in problems],
                     [p["answer"] for p in problems], TURN_MARKERS)
    return downstream(model, tokenizer, batch, max_new_tokens, max_seq, mode="strict", max_batch=32)


def _compose_stage(name: str, overrides: list[str], out: Path, parent: str, *own: str) -> RootConfig:
    return compose("config", [f"experiment={name}", *_stage_overrides(overrides), f"run.out_dir={out}",
                              f"train.init_from={parent}", *own], RootConfig)


def _stage(name: str, overrides: list[str], out: Path, parent: str, *own: str) -> tuple[RootConfig, object]:
    cfg = _compose_stage(name, overrides, out, parent, *own)
    return cfg, plan_run(cfg)


def later_stages(overrides: list[str], out: Path, probe_dir: Path) -> dict[str, tuple]:
    """The stages after pretraining as ``main`` composes them: step -> (experiment, overrides, run directory, its
    own overrides); the parent of each is known only once the step before it has run."""
    return {"cpt": ("demo_cpt", [*dynamics_overrides(probe_dir, "cpt"), *overrides], out / "cpt", ()),
            "sft": ("demo_sft", overrides, out / "sft", (f"train.epochs={SFT_EPOCHS}",)),
            "rm": ("demo_rm", overrides, out / "rm", (f"data.paths=[{out / 'rm_data'}]",)),
            "rl": ("demo_rl", overrides, out / "rl", ())}


def check_recipes(cfg: RootConfig, overrides: list[str], out: Path, probe_dir: Path) -> None:
    """Every stage the pipeline will run, composed as it will be and checked by its recipe's own rules
    (``stages.check_recipe``) before the first one starts and before torch is imported: a key that a later stage
    refuses is one line now, not after minutes of pretraining. (Each stage's data and parent are checked when it
    starts: they are the stages before it.) RM and RL run only where the inference engine can (pp=1)."""
    check_recipe(cfg)
    steps = later_stages(overrides, out, probe_dir)
    parent = str(out / "checkpoints")  # a stand-in: the recipe's rules read no file
    for step in ("cpt", "sft", *(("rm", "rl") if cfg.parallel.pp == 1 else ())):
        name, stage_overrides, directory, own = steps[step]
        check_recipe(_compose_stage(name, stage_overrides, directory, parent, *own))


def own_samples(model, tokenizer, rl_path, problems: int, n: int, max_seq: int, seed: int = 0) -> list[dict]:
    """``n`` samples (temperature 1) of the first ``problems`` prompts of the demo's RL set (disjoint from its SFT
    and evaluation problems) from the live model, judged by the shared checker: `evolm score`-style rows for
    `evolm prepare-rm` (the prompt is already templated)."""
    from evolm_nemo.generation.continuous import ContinuousGenerator

    rows = read_jsonl(rl_path)[:problems]
    prompts = [r["prompt"] for r in rows for _ in range(n)]
    done = ContinuousGenerator(model, tokenizer, max_seq=max_seq, max_batch=64).complete(
        prompts, MAX_NEW, temperature=1.0, seed=seed, stop_strings=TURN_MARKERS)
    out = []
    for i, r in enumerate(rows):
        texts = [c.text for c in done[i * n:(i + 1) * n]]
        out.append({"id": r["id"], "problem": r["prompt"], "completions": texts,
                    "correct": [judge("gsm8k_platinum", t, r["gold_answer"], "strict") for t in texts]})
    return out


def train_demo_rm(final, tokenizer, demo_data, overrides: list[str], out: Path, max_seq: int):
    """The demo's reward model: its SFT model's own samples -> `prepare-rm` (outcome, balanced) -> `stage=rm`.
    Returns (the RM's TrainResult, its last metrics record)."""
    rows = own_samples(final.model, tokenizer, demo_data.rl_path, RM_PROBLEMS, RM_SAMPLES, max_seq)
    is_main = final.runtime.is_main
    scored, data = out / "rm_samples.jsonl", out / "rm_data"
    if is_main:
        write_jsonl(scored, rows)
        prepare_rm(PrepareRMConfig(input=str(scored), output=str(data), tokenizer=final.tokenizer, kind="outcome",
                                   prompt_template="{question}", overwrite=True, progress=False))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    right = sum(sum(r["correct"]) for r in rows)
    if is_main:
        print(f"[rm] {len(rows) * RM_SAMPLES} samples of the SFT model on {len(rows)} RL-set problems, "
              f"{right / (len(rows) * RM_SAMPLES):.1%} correct (strict checker) -> outcome RM data {data}")
    name, stage_overrides, directory, own = later_stages(overrides, out, Path())["rm"]  # (no probes)
    cfg, plan = _stage(name, stage_overrides, directory, final.checkpoint, *own)
    result = run(cfg, plan)
    last = json.loads((out / "rm" / "metrics.jsonl").read_text().splitlines()[-1])
    if is_main:
        if result.losses:  # empty when the run was already complete
            print(f"[rm] {loss_curve(result.losses)}")
        print(rm_validation_line(last))
    return result, last


def rm_validation_line(last: dict) -> str:
    """The demo's line on its outcome RM's final validation row (``val_auc`` is null when the held-out samples are
    all of one class: the AUC is undefined)."""
    auc = "undefined (one class)" if last.get("val_auc") is None else f"{last['val_auc']:.3f}"
    return (f"[rm] validation on held-out problems: AUC {auc}, accuracy {last['val_accuracy']:.3f} over "
            f"{last['val_examples']} samples")


def dynamics_overrides(probe_dir: Path, stage: str) -> list[str]:
    """The demo's checkpoint dynamics: held-out loss per source (on VAL_DOCS generated held-out documents per kind,
    so training keeps every document) and the capability probes -- lm-eval 0-shot on the six sample tasks of
    eval/upstream/sample through the live model, and greedy on PROBE_PROBLEMS of the demo's held-out word problems
    (in ``probe_dir``: ``probe_problems``)."""
    tokens = DYNAMICS_EVERY[stage]
    return [f"data.synthetic_val_docs={VAL_DOCS}", f"train.val_tokens_interval={tokens}",
            f"probe.tokens_interval={tokens}", f"probe.upstream=[{','.join(UPSTREAM)}]",
            f"probe.data_dir={default_tasks_dir() / 'sample'}", "probe.downstream=[gsm8k_platinum]",
            f"probe.downstream_dir={probe_dir}", f"probe.max_new_tokens={MAX_NEW}",
            f"probe.max_fraction={PROBE_FRACTION}"]


def probe_problems(overrides: list[str]) -> tuple[Path, list[dict]]:
    """The probe's held-out word problems and where they go: the data cache, under a name of their content (a cache,
    never the run directory: nothing is written there before the runs' own checks). ``write_probe_problems`` writes
    them there once."""
    base = compose("config", ["experiment=demo", *overrides], RootConfig)
    held_out, _ = problem_pool(compose("config", ["experiment=demo_sft", *_stage_overrides(overrides)], RootConfig))
    problems = held_out[:PROBE_PROBLEMS]
    key = hashlib.sha256(json.dumps(problems, sort_keys=True).encode()).hexdigest()[:16]
    return Path(base.data.cache_dir) / f"demo-probe-{key}", problems


def write_probe_problems(directory: Path, problems: list[dict]) -> None:
    if not (directory / "gsm8k_platinum.jsonl").is_file():
        write_demo_problems(directory, problems)


def main(overrides: list[str]) -> int:
    out = Path(compose("config", ["experiment=demo", *overrides], RootConfig).run.out_dir)
    probe_dir, probe_set = probe_problems(overrides)
    cfg = compose("config", ["experiment=demo", *dynamics_overrides(probe_dir, "pretrain"), *overrides], RootConfig)
    check_recipes(cfg, overrides, out, probe_dir)
    write_probe_problems(probe_dir, probe_set)
    plan = plan_run(cfg)
    from evolm_nemo.runtime.distributed import teardown

    try:
        pre = run(cfg, plan)
        is_main = pre.runtime.is_main
        if is_main and pre.losses:
            print(f"[pretrain] {loss_curve(pre.losses)}")
        steps = later_stages(overrides, out, probe_dir)
        name, stage_overrides, directory, own = steps["cpt"]
        cpt_cfg, cpt_plan = _stage(name, stage_overrides, directory, pre.checkpoint, *own)
        cpt = run(cpt_cfg, cpt_plan)
        if is_main and cpt.losses:
            print(f"[cpt] {loss_curve(cpt.losses)}")
        name, stage_overrides, directory, own = steps["sft"]
        sft_cfg, sft_plan = _stage(name, stage_overrides, directory, cpt.checkpoint, *own)
        demo_data = ensure_synthetic_sft(sft_cfg)
        problems = read_jsonl(demo_data.eval_path)[:HELD_OUT]
        tokenizer = load_tokenizer(cpt.tokenizer)
        template, max_seq = sft_cfg.sft.prompt_template, cfg.model.seq_length
        can_generate = cfg.parallel.pp == 1  # the inference engine runs with pp=1 (every TP rank takes part)
        rm = rl = None
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
            from evolm_nemo.generation.continuous import ContinuousGenerator

            texts = ContinuousGenerator(final.model, tokenizer, max_seq=max_seq).generate(PROMPTS, 40)
            for prompt, text in zip(PROMPTS, texts):
                if is_main:
                    print(f"sample> {prompt}{text}")
            rm, _ = train_demo_rm(final, tokenizer, demo_data, overrides, out, max_seq)
            name, stage_overrides, directory, own = steps["rl"]
            rl_cfg, rl_plan = _stage(name, stage_overrides, directory, final.checkpoint, *own)
            rl = run(rl_cfg, rl_plan)
            rl_after, _ = greedy_accuracy(rl.model, tokenizer, problems, template, MAX_NEW, max_seq)
            if is_main:
                r, k = rl.losses, min(RL_WINDOW, max(len(rl.losses) // 2, 1))
                if r:  # empty when the run was already complete
                    print(f"[rl] {rl_cfg.stage}: mean reward (strict checker, {rl_cfg.rl.samples_per_prompt} samples "
                          f"x {rl_cfg.rl.prompts_per_step} RL-set prompts per step) first {k} steps "
                          f"{sum(r[:k]) / k:.3f} -> last {k} steps {sum(r[-k:]) / k:.3f}")
                print(f"[rl] greedy accuracy on {len(problems)} held-out word problems (strict checker): "
                      f"before RL {after:.1%} -> after RL {rl_after:.1%}")
        if not is_main:
            return 0
        print(f"checkpoints: pretrain {pre.checkpoint} -> cpt {cpt.checkpoint} -> sft {final.checkpoint}"
              + (f" -> rl {rl.checkpoint}" if rl is not None else ""))
    finally:
        teardown()
    if final.runtime.world_size > 1:  # export and evaluation run in one process, after the training group
        print(f"next (one process): evolm export-hf src={final.checkpoint} dst={out / 'hf'} && "
              f"evolm eval downstream model={out / 'hf'}")
        return 0
    from evolm_nemo.conversion.export import export

    hf_dir = out / "hf"
    export(ExportHFConfig(src=str(final.checkpoint), dst=str(hf_dir), overwrite=True))
    print(f"HF export (verified): {hf_dir}")
    rm_dir = None
    if rm is not None:  # RM@16 in the table below from our own RM, exported as LlamaForSequenceClassification
        rm_dir = str(out / "rm_hf")
        export(ExportHFConfig(src=str(rm.checkpoint), dst=rm_dir, overwrite=True))
        print(f"RM export (verified, LlamaForSequenceClassification): {rm_dir}")
    data_dir = write_demo_problems(out / "eval_data", problems[:DEMO_PROBLEMS])
    tokens = str(plan.iters * plan.tokens_per_iter)
    eval_demo(str(hf_dir), str(out / "eval"), str(data_dir), limit=DEMO_PROBLEMS, n=16,
              name=f"evolm-{cfg.model.name}-demo", size=cfg.model.name, pretrain_tokens=tokens, stage=sft_cfg.stage,
              rm=rm_dir)
    if rl is not None:  # the RL actor on the same problems (RM@16 from the same RM)
        export(ExportHFConfig(src=str(rl.checkpoint), dst=str(out / "rl_hf"), overwrite=True))
        print(f"RL actor export (verified): {out / 'rl_hf'}")
        eval_demo(str(out / "rl_hf"), str(out / "eval_rl"), str(data_dir), limit=DEMO_PROBLEMS, n=16,
                  name=f"evolm-{cfg.model.name}-demo-rl", size=cfg.model.name, pretrain_tokens=tokens,
                  stage=rl_cfg.stage, rm=rm_dir)
    written = report(None, str(out / "dynamics"), dynamics=f"{out},{out / 'cpt'}")
    print(f"[dynamics] pretraining and CPT, probes and held-out loss vs tokens: {written['markdown']} "
          f"({written['dynamics']})")
    return 0

