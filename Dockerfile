FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY ingest ./ingest
COPY worker ./worker
RUN pip install --no-cache-dir . && useradd --system refundsync
USER refundsync
EXPOSE 8000
CMD ["refundsync", "ingest", "--host", "0.0.0.0", "--port", "8000"]
