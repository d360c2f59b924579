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
# Healthy while both servers answer, the schema is current and the stream exists.
HEALTHCHECK --interval=30s --timeout=15s --start-period=20s --retries=3 \
    CMD ["outbox-relay", "check"]
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
