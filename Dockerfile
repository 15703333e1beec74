# One image for the API and the training worker (the command picks which):
#   docker run IMAGE                       -> sparseshot serve (API; embedded worker without a broker URL)
#   docker run IMAGE sparseshot worker     -> a Celery training worker (give it a GPU: --gpus 1)
# torch comes from PyPI: the Linux x86_64 wheels bundle CUDA, so the same image runs on CPU or GPU.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPARSESHOT_DATA_DIR=/data

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/sparseshot

# The large, rarely changing layer first: torch + torchvision at the tested versions.
COPY constraints.txt ./
RUN pip install -c constraints.txt torch torchvision

COPY pyproject.toml README.md ./
COPY sparseshot ./sparseshot
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY benchmarks ./benchmarks
COPY scripts/prestart.sh ./scripts/prestart.sh
RUN pip install -c constraints.txt . \
    && useradd --create-home --uid 1000 sparseshot \
    && mkdir -p /data \
    && chown sparseshot:sparseshot /data

USER sparseshot
VOLUME ["/data"]
EXPOSE 8000

# The API's check. Other commands bring their own: docker-compose.yml gives workers a liveness-file
# check and disables it for the one-shot migration (`docker run ... sparseshot worker`: pass
# --no-healthcheck, or --health-cmd with SPARSESHOT_WORKER_ALIVE_FILE set).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1

CMD ["sparseshot", "serve", "--host", "0.0.0.0", "--port", "8000"]
