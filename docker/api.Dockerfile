# The API image: FastAPI + the job store. No torch, no Ray: the service never imports them.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY darwinfront ./darwinfront
COPY service ./service
COPY search ./search
COPY workers ./workers
COPY examples ./examples
RUN pip install .
RUN useradd --create-home darwinfront && mkdir -p /data && chown darwinfront /data
USER darwinfront
ENV DARWINFRONT_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["uvicorn", "service.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
