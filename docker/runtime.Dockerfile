# syntax=docker/dockerfile:1
# image: ghcr.io/ling-serving/ling-runtime
# The Ling-2.6 serving runtime (PyTorch + Triton + Ray) on a CUDA base. The operator runs it as
# `ling-runtime serve ...` (its pod command); the entrypoint is the same console script. Build from the
# repository root:
#   docker build -f docker/runtime.Dockerfile -t ghcr.io/ling-serving/ling-runtime:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# PyTorch's wheel index for the CUDA version of the base image.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM ${CUDA_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator operator
COPY runtime runtime
RUN python3 -m venv /tmp/build && /tmp/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${CUDA_IMAGE}
ARG TORCH_INDEX
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/ling PATH=/opt/ling/bin:$PATH PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
COPY hack/constraints.txt /tmp/constraints.txt
# torch and triton from the CUDA index, pinned like the GPU machines the kernels are tested on.
RUN python3 -m venv /opt/ling \
 && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -c /tmp/constraints.txt \
      "$(ls /wheels/ling_serving-*.whl)[runtime]" \
 && rm -rf /wheels /tmp/constraints.txt
# The runtime writes Triton's cache and Ray's session files; give it a home it owns.
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin ling
USER 1000:1000
WORKDIR /home/ling
ENV TRITON_CACHE_DIR=/home/ling/.triton
# HTTP (OpenAI API, /health, /metrics), torch.distributed init, Ray GCS: docs/architecture.md.
EXPOSE 30000 2345 6379
ENTRYPOINT ["ling-runtime"]
CMD ["serve"]
