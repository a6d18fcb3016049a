# The GPU image every cluster node runs (cluster/aws.yaml, cluster/gcp.yaml, cluster/kuberay/*.yaml):
# Ray 2.60 + the CUDA build of vLLM + rayuid, all installed at build time from the lock requirements-cuda.txt
# (regenerate it with cluster/lock-cuda.sh), so pods start in seconds and every node runs the same code.
#
#   docker build -t ghcr.io/YOUR_ORG/rayuid:$(git rev-parse --short HEAD) .
#   docker push ghcr.io/YOUR_ORG/rayuid:$(git rev-parse --short HEAD)
#
# Tested: the same versions (vllm 0.32.0, torch 2.13.0, ray 2.60.0) with vLLM's CPU build, by this repo's CI.
# The CUDA image itself has not been built or run by this project yet (no Docker daemon or GPU in its CI).
# torch 2.13.0 from PyPI is built for CUDA 13: nodes need an NVIDIA driver >= 580.
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}

ENV HF_HOME=/home/ray/.cache/huggingface \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /home/ray/rayuid

# Dependencies first (their layer is reused while only rayuid's code changes).
COPY requirements-cuda.txt .
RUN pip install --no-deps -r requirements-cuda.txt

COPY pyproject.toml README.md ./
COPY rayuid rayuid
COPY jobs jobs
RUN pip install --no-deps . && python -c "import rayuid.cli, vllm, ray; print('rayuid image ok')"
