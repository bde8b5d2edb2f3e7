# evolm-nemo training image: NVIDIA's NGC PyTorch release (CUDA, cuDNN, NCCL, Transformer Engine, Python 3.12),
# pinned by tag, with megatron-core 0.16.1 and this repository on top. The image's own torch, Transformer Engine,
# NVIDIA libraries and triton are kept; constraints.txt pins everything else.
#   docker build -f containers/train.Dockerfile -t evolm-nemo-train:25.09 .
#   docker run --rm --gpus all --ipc=host evolm-nemo-train:25.09 python containers/smoke.py train
# Build and run commands, Slurm/pyxis use: containers/README.md.
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /workspace/evolm
COPY pyproject.toml constraints.txt ./
# The base image's CUDA stack stays: drop its packages from the pins (torch, TE, nvidia-*, triton) before installing.
RUN grep -v -E '^(torch|transformer.engine|nvidia-|triton)' constraints.txt > /tmp/constraints.txt
COPY evolm_nemo ./evolm_nemo
COPY recipes ./recipes
COPY conversion ./conversion
COPY eval ./eval
COPY containers/smoke.py ./containers/smoke.py
RUN pip install --no-cache-dir -c /tmp/constraints.txt -e '.[tracking]' \
 && python -c "import megatron.core, evolm_nemo; print('megatron-core', megatron.core.__version__)"

# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CMD ["evolm"]
