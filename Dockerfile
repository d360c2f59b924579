# syntax=docker/dockerfile:1
# Build the wheels in one stage, install them into a clean slim image in the next.
FROM python:3.12.8-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY outbox_relay ./outbox_relay
COPY sql ./sql
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12.8-slim-bookworm
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Transactional-outbox relay from PostgreSQL to NATS JetStream"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home relay
USER 10001
# /metrics, /healthz and /readyz (OUTBOX_METRICS_PORT).
EXPOSE 9464
# Healthy while /readyz says so: both servers connected and the stream present.
HEALTHCHECK --interval=15s --timeout=6s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('OUTBOX_METRICS_PORT', '9464'), timeout=5)"]
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
