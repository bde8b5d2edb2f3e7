"""The megatron side of the conversion tests, run in its own process so the CPU compatibility layer never enters
the pytest process: ``python _worker.py single <jobs.json> <results.json>`` (one process) or under torchrun
``... parallel <jobs.json> <results.json>`` (2 gloo ranks). Jobs are plain JSON; results are facts (exit codes,
stderr, files written), judged by the tests."""

from __future__ import annotations

import contextlib
import dataclasses
import io as stdio
import json
import os
import sys
from pathlib import Path

import torch


def cli(args: list[str]) -> dict:
    """The real `evolm` dispatcher, in this process; stderr captured."""
    from evolm_nemo.cli import main

    err = stdio.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    return {"rc": rc, "stderr": err.getvalue()}


def build(ckpt: str, tp: int = 1, pp: int = 1):
    """(model stage, meta) for a checkpoint at the current parallel state, weights loaded (resharded)."""
    from megatron.core import parallel_state

    from evolm_nemo.checkpoint import io
    from evolm_nemo.config.schema import ModelConfig, ParallelConfig
    from evolm_nemo.model.build import build_model
    from evolm_nemo.model.heads import build_value_model

    path = io.resolve(ckpt)
    meta = io.read_meta(path)
    m = dataclasses.replace(ModelConfig(**meta["model"]), layer_spec="local")
    builder = build_value_model if meta.get("head") == "value" else build_model
    model = builder(m, ParallelConfig(tp=tp, pp=pp), torch.float32,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage())
    io.load_weights(path, [model])
    model.eval()
    return model, meta


def positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)


def single(jobs: list[dict]) -> dict:
    from safetensors.torch import load_file, save_file

    from evolm_nemo.generation.greedy import greedy_ids
    from evolm_nemo.runtime import distributed

    out = {}
    for job in jobs:
        kind, key = job["kind"], job["id"]
        if kind == "cli":
            out[key] = cli(job["args"])
        elif kind in ("logits", "greedy"):
            distributed.setup(1, 1, seed=0, precision="fp32")
            model, meta = build(job["ckpt"])
            if kind == "logits":
                ids = load_file(job["ids"])["ids"]
                with torch.no_grad():
                    save_file({"logits": model(ids, positions(ids), None).float().contiguous()}, job["out"])
                out[key] = {"head": meta.get("head", "lm")}
            else:
                out[key] = {"tokens": greedy_ids(model, job["prompt"], job["steps"], job.get("eos"))}
        elif kind == "backbone":  # a value model started from an LM checkpoint (how an RM starts from SFT)
            from evolm_nemo.checkpoint import io
            from evolm_nemo.config.schema import ModelConfig, ParallelConfig
            from evolm_nemo.model.heads import build_value_model, load_backbone

            distributed.setup(1, 1, seed=0, precision="fp32")
            meta = io.read_meta(io.resolve(job["ckpt"]))
            m = dataclasses.replace(ModelConfig(**meta["model"]), layer_spec="local")
            model = build_value_model(m, ParallelConfig(), torch.float32)
            load_backbone(job["ckpt"], [model])
            ids = load_file(job["ids"])["ids"]
            with torch.no_grad():
                values = model.eval()(ids, positions(ids), None)
            save_file({"values": values.contiguous(), "head": model.output_layer.weight.detach().clone()},
                      job["out"])
            out[key] = {"shape": list(values.shape)}
        else:
            raise ValueError(kind)
    return out


def parallel(jobs: list[dict]) -> dict:
    """Each job: load a checkpoint at tp/pp (resharding), logits of a probe batch, save it natively at tp/pp."""
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from evolm_nemo.checkpoint import io
    from evolm_nemo.runtime import distributed

    out = {}
    for job in jobs:
        tp, pp = job["tp"], job["pp"]
        rt = distributed.setup(tp, pp, seed=0, precision="fp32")
        model, meta = build(job["ckpt"], tp, pp)
        ids = load_file(job["ids"])["ids"]
        with torch.no_grad():
            if pp == 1:
                logits = model(ids, positions(ids), None, runtime_gather_output=True)
            elif rt.rank == 0:  # first stage: hidden states [s, b, h] to the next stage
                dist.send(model(ids, positions(ids), None).contiguous(), dst=1)
                logits = None
            else:
                hidden = torch.empty(ids.shape[1], ids.shape[0], meta["model"]["hidden_size"])
                dist.recv(hidden, src=0)
                model.set_input_tensor(hidden)
                logits = model(ids, positions(ids), None)
        if logits is not None and (pp > 1 or rt.rank == 0):
            save_file({"logits": logits.float().contiguous()}, job["out"])
        keep = {k: meta[k] for k in ("model", "tokenizer", "head", "lineage", "stage") if k in meta}
        saved = io.save(job["save_to"], 0, [model], meta=keep, layout={"tp": tp, "pp": pp})
        out[job["id"]] = {"saved": str(saved), "rank": rt.rank}
        del model
    distributed.teardown()
    return out


if __name__ == "__main__":
    mode, jobs_file, results_file = sys.argv[1:4]
    results = (single if mode == "single" else parallel)(json.loads(Path(jobs_file).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(results_file).write_text(json.dumps(results, indent=1))
