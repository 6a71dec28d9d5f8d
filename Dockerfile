# vLLM (GPU) with the vllm-kvevict plugin. The plugin registers itself through the
# `vllm.general_plugins` entry point: the image's command is plain `vllm serve` plus our flags.
# CPU variant: deploy/Dockerfile.cpu (the same steps as the README's set-up). Compose and
# Kubernetes files using both: deploy/ (docs/OBSERVABILITY.md).
#   docker build -t vllm-kvevict:gpu .
#   docker run --gpus all -p 8000:8000 vllm-kvevict:gpu Qwen/Qwen2.5-7B-Instruct --kv-eviction criticalkv --kv-budget 0.1
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}
WORKDIR /opt/vllm-kvevict
COPY setup.py README.md ./
COPY vllm_kvevict ./vllm_kvevict
RUN pip install --no-cache-dir --no-deps . && pip install --no-cache-dir "pydantic>=2" prometheus-client
EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
CMD ["--help"]
