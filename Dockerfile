# The router image: slim Python, non-root, tini as PID 1 (it reaps the model processes' orphans),
# /health as the healthcheck. Without a config it runs in endpoint mode against VLLM_BASE_URL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8010

# wget: the compose healthcheck (wget --spider) and troubleshooting (wget -O-) of the setup this replaces
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini wget \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 router

USER 10001
EXPOSE 8010
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8010'), timeout=3)"]
ENTRYPOINT ["tini", "--", "vllm-model-router"]
CMD ["serve"]
