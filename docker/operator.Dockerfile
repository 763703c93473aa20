# syntax=docker/dockerfile:1
# image: ghcr.io/ling-serving/ling-operator
# The LingDeployment operator: kopf + kubernetes client, no torch, no ray (ling_operator never imports
# them). Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/ling-serving/ling-operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hack/constraints.txt hack/constraints.txt
COPY operator operator
COPY runtime runtime
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# One virtualenv, owned by root and read-only to the operator (the pod runs with a read-only root fs).
ENV VIRTUAL_ENV=/opt/ling PATH=/opt/ling/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
COPY --from=build /src/hack/constraints.txt /tmp/constraints.txt
RUN python -m venv /opt/ling \
 && pip install --no-cache-dir -c /tmp/constraints.txt "$(ls /wheels/ling_serving-*.whl)[operator]" \
 && rm -rf /wheels /tmp/constraints.txt
# Numeric, so Kubernetes can verify runAsNonRoot; matches the chart's podSecurityContext.runAsUser.
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["ling-operator"]
