# Steerway gateway image: `docker build -t steerway . && docker run -p 8000:8000 steerway`
# The build stage makes the wheel (it carries the pages, web/, as gateway/web); the image
# installs that wheel and nothing else of the source tree, the layout tests/test_wheel.py
# serves from.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY store ./store
COPY web ./web
RUN pip wheel --no-deps --wheel-dir /dist .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STEERWAY_HOST=0.0.0.0 \
    STEERWAY_PORT=8000

COPY --from=build /dist /dist
RUN pip install /dist/steerway-*.whl && rm -rf /dist \
    && useradd --system --uid 10001 --home-dir /app steerway \
    && mkdir -p /app/.steerway && chown steerway /app/.steerway

WORKDIR /app
USER steerway
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2); sys.exit(0)"

CMD ["steerway", "serve"]
