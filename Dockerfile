FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# The locked runtime dependencies first (a layer that changes only with the lock), each
# checked against its hash; then refundsync itself, built by the locked setuptools.
COPY requirements/main.txt requirements/main.txt
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements/main.txt
COPY pyproject.toml README.md ./
COPY models ./models
COPY ingest ./ingest
COPY worker ./worker
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && useradd --system refundsync
USER refundsync
EXPOSE 8000
CMD ["refundsync", "ingest", "--host", "0.0.0.0", "--port", "8000"]
