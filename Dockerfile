# kvgate images, as build targets:
#
#   docker build --target engine -t ghcr.io/kvgate/kvgate-engine:0.1.0 .
#       vLLM's own OpenAI server image plus kvgate, so engines can load the
#       tiered KV connector (kvcache.vllm_connector) that an EnginePool's
#       kvCacheRef wires in. Its entry point is `vllm serve`.
#   docker build --target kvgate -t ghcr.io/kvgate/kvgate:0.1.0 .   (the default target)
#       The gateway (`kvgate serve`), the KV cache node (`kvgate cache-node`)
#       and the operator (`kvgate operator`). Its entry point is `kvgate`.
#
# The CPU engine can be built into the kvgate image too, for a laptop:
#   docker build --build-arg EXTRAS=operator,cpu .
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0

# ---- the engine: vLLM plus the kvgate connector -----------------------------
FROM ${VLLM_IMAGE} AS engine
WORKDIR /opt/kvgate
COPY pyproject.toml README.md ./
COPY kvgate ./kvgate
COPY router ./router
COPY kvcache ./kvcache
COPY operators ./operators
COPY proto ./proto
# vLLM (and torch) come from the base image: install kvgate's own dependencies only.
# (The variable lets pip write to an interpreter marked as system-managed.)
ENV PIP_BREAK_SYSTEM_PACKAGES=1
RUN python3 -m pip install --no-cache-dir . \
    && python3 -c "import kvcache.vllm_connector, vllm"
ENV PYTHONUNBUFFERED=1
EXPOSE 8000 5557
ENTRYPOINT ["vllm", "serve"]

# ---- gateway, cache node and operator ----------------------------------------
FROM python:3.11-slim AS kvgate
ARG EXTRAS=operator
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY kvgate ./kvgate
COPY router ./router
COPY kvcache ./kvcache
COPY operators ./operators
COPY proto ./proto
COPY config ./config
RUN pip install ".[${EXTRAS}]" \
    && if echo "${EXTRAS}" | grep -q cpu; then pip uninstall -y torchvision torchaudio torchcodec || true; fi \
    && kvgate --help >/dev/null

# A fixed non-root UID, so pods can run with runAsNonRoot.
RUN useradd --uid 10001 --create-home kvgate
USER 10001
EXPOSE 8000 50051 9400
STOPSIGNAL SIGTERM
ENTRYPOINT ["kvgate"]
CMD ["serve", "--config", "/app/config/gateway.yaml"]
