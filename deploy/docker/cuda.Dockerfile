# llmctl for NVIDIA GPUs (Triton kernels; torch's CUDA 12.8 wheels bring the CUDA libraries).
#   docker build -f deploy/docker/cuda.Dockerfile -t llmctl:cuda .
#   docker run --gpus all --ipc=host -p 8000:8000 -v hf-cache:/home/llmctl/.cache/huggingface llmctl:cuda --model M
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY core ./core
COPY gpu ./gpu
COPY triton_kernels ./triton_kernels
COPY plugin_cuda ./plugin_cuda
COPY server ./server
COPY cli ./cli
COPY deploy/docker/install.sh ./deploy/docker/install.sh
ARG LLMCTL_TORCH_SPEC=torch==2.13.0
ENV LLMCTL_PIP_FLAGS=--no-cache-dir
RUN sh deploy/docker/install.sh cuda /src

FROM ${BASE_IMAGE} AS runtime
# gcc: Triton compiles a small launcher for each kernel when it is first used.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 1001 llmctl \
    && useradd --create-home --uid 1001 --gid 1001 --shell /usr/sbin/nologin llmctl
COPY --from=build /opt/llmctl /opt/llmctl
ENV PATH=/opt/llmctl/bin:$PATH \
    HF_HOME=/home/llmctl/.cache/huggingface \
    LLMCTL_CACHE_DIR=/home/llmctl/.cache/llmctl \
    TRITON_CACHE_DIR=/home/llmctl/.cache/triton \
    LLMCTL_PORT=8000 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYTHONUNBUFFERED=1
USER 1001:1001
WORKDIR /home/llmctl
RUN mkdir -p /home/llmctl/.cache/huggingface /home/llmctl/.cache/llmctl /home/llmctl/.cache/triton
VOLUME ["/home/llmctl/.cache/huggingface"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['LLMCTL_PORT'] + '/health', timeout=4)"]
# Tensor-parallel workers exchange data through /dev/shm (NCCL): run with --ipc=host or a large --shm-size.
ENTRYPOINT ["llmctl", "serve", "--host", "0.0.0.0", "--port", "8000"]
