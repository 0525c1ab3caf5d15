# llmctl for CPUs (x86-64 with AVX-512/AMX gets the native kernels; any CPU runs the torch paths).
#   docker build -f deploy/docker/cpu.Dockerfile -t llmctl:cpu .
#   docker run -p 8000:8000 --shm-size=4g -v hf-cache:/home/llmctl/.cache/huggingface llmctl:cpu --model M
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY core ./core
COPY plugin_cpu ./plugin_cpu
COPY server ./server
COPY cli ./cli
COPY deploy/docker/install.sh ./deploy/docker/install.sh
ARG LLMCTL_TORCH_SPEC=torch==2.13.0
ENV LLMCTL_PIP_FLAGS=--no-cache-dir
RUN sh deploy/docker/install.sh cpu /src

FROM ${PYTHON_IMAGE} AS runtime
# gcc and libgomp: the CPU kernels are compiled on first start for the host's own ISA (-march=native), so they
# cannot be built into the image; the result is cached under ~/.cache/llmctl.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 1001 llmctl \
    && useradd --create-home --uid 1001 --gid 1001 --shell /usr/sbin/nologin llmctl
COPY --from=build /opt/llmctl /opt/llmctl
ENV PATH=/opt/llmctl/bin:$PATH \
    HF_HOME=/home/llmctl/.cache/huggingface \
    LLMCTL_CACHE_DIR=/home/llmctl/.cache/llmctl \
    LLMCTL_PORT=8000 \
    PYTHONUNBUFFERED=1
USER 1001:1001
WORKDIR /home/llmctl
RUN mkdir -p /home/llmctl/.cache/huggingface /home/llmctl/.cache/llmctl
VOLUME ["/home/llmctl/.cache/huggingface"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['LLMCTL_PORT'] + '/health', timeout=4)"]
# The multi-process executor shares tensors through /dev/shm: run with --shm-size=4g (or --ipc=host).
ENTRYPOINT ["llmctl", "serve", "--host", "0.0.0.0", "--port", "8000"]
