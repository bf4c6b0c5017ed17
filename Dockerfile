# Multi-stage: build a wheel with the compilers the build needs, run it slim and non-root.
# The image carries the runtime dependencies only (pyproject's `dependencies`, pyarrow included,
# the `rocksdb` extra for `feedback.join_store: rocksdb` and `otel` for `tracing`; no `dev`, no
# `local`): enough for `serve`, `feedback`, `export`, `rollout` and the compose stack's traffic
# generator (tests/foundation/test_docker_image.py checks what they import).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY banditgate ./banditgate
COPY gateway ./gateway
COPY router ./router
COPY feedback ./feedback
COPY loadtests ./loadtests
COPY demo ./demo
RUN pip wheel --no-cache-dir -c constraints.txt -w /wheels .[rocksdb,otel]

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 banditgate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER banditgate
WORKDIR /home/banditgate
EXPOSE 8080 8081 6066
ENTRYPOINT []
CMD ["banditgate", "serve", "-c", "/etc/banditgate/banditgate.yaml"]
