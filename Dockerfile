# The kvgate image: the gateway (`kvgate serve`), the KV cache node
# (`kvgate cache-node`) and, with the operator extra, the operator.
# Build the CPU engine in too with:  docker build --build-arg EXTRAS=operator,cpu .
FROM python:3.11-slim

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
    && if echo "${EXTRAS}" | grep -q cpu; then pip uninstall -y torchvision torchaudio torchcodec || true; fi

RUN useradd --uid 10001 --create-home kvgate
USER kvgate
EXPOSE 8000
STOPSIGNAL SIGTERM
ENTRYPOINT ["kvgate"]
CMD ["serve", "--config", "/app/config/gateway.yaml"]
