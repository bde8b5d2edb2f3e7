# evolm-nemo evaluation image: NVIDIA's TensorRT-LLM release image (TensorRT-LLM with its own torch and
# transformers), pinned by tag, with this repository's evaluation side on top: `evolm eval downstream backend=trtllm`,
# `evolm export-trtllm`, `evolm score`, `evolm report`, lm-eval for `evolm eval upstream`.
# The base's torch, transformers, tokenizers and safetensors are kept (TensorRT-LLM pins them); evolm-nemo is
# installed without its dependency list, and the few packages evaluation needs come pinned from constraints.txt.
# vLLM is not added: it pins another CUDA torch build than TensorRT-LLM's (../shared/STACK.md), so the two do not
# fit one environment; use backend=trtllm here, or vLLM's own image for backend=vllm.
#   docker build -f containers/eval.Dockerfile -t evolm-nemo-eval:1.2.0 .
#   docker run --rm --gpus all --ipc=host evolm-nemo-eval:1.2.0 python containers/smoke.py eval
FROM nvcr.io/nvidia/tensorrt-llm/release:1.2.0

WORKDIR /workspace/evolm
COPY pyproject.toml constraints.txt ./
RUN grep -E '^(hydra-core|omegaconf|antlr4-python3-runtime|math-verify|lm_eval|datasets|matplotlib|einops|psutil|tqdm|pyarrow|xxhash)==' \
      constraints.txt > /tmp/eval-requirements.txt \
 && pip install --no-cache-dir -r /tmp/eval-requirements.txt
COPY evolm_nemo ./evolm_nemo
COPY recipes ./recipes
COPY conversion ./conversion
COPY eval ./eval
COPY containers/smoke.py ./containers/smoke.py
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "import evolm_nemo.evaluation.cli, math_verify, lm_eval; print('evolm-nemo eval side imports')"

# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CMD ["evolm"]
