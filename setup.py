"""vllm-kvevict: KV-cache eviction for vLLM that returns the memory to vLLM's block pool."""

from setuptools import find_packages, setup

setup(
    name="vllm-kvevict",
    version="0.1.0",
    description="Evict KV-cache entries of running requests in vLLM and return the memory",
    packages=find_packages(include=["vllm_kvevict", "vllm_kvevict.*"]),
    # the trained LKV artifacts (one per model) ship inside the package
    package_data={"vllm_kvevict.lkv": ["artifacts/*.safetensors"], "vllm_kvevict.vector": ["artifacts/*.safetensors"]},
    python_requires=">=3.10",
    install_requires=["pydantic>=2", "prometheus-client", "torch", "safetensors"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "openai", "requests"],
        "bench": ["matplotlib", "tqdm"],
        "deploy": ["grafana-foundation-sdk==1769699998!10.1.0", "pyyaml", "jsonschema", "matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["kvevict = vllm_kvevict.vllm.plugin:register"],
    },
)
