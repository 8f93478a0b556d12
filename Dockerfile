# Steerway gateway image: `docker build -t steerway . && docker run -p 8000:8000 steerway`
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STEERWAY_HOST=0.0.0.0 \
    STEERWAY_PORT=8000 \
    STEERWAY_WEB_DIR=/app/web

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY store ./store
COPY web ./web
RUN pip install . && useradd --system --uid 10001 --home-dir /app steerway \
    && mkdir -p /app/.steerway && chown steerway /app/.steerway

USER steerway
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2); sys.exit(0)"

CMD ["steerway", "serve"]
