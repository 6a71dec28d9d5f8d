"""Entry point of the ``vllm.general_plugins`` group.

vLLM calls :func:`register` in the API server, the engine core and every worker.
"""


def register() -> None:
    """Register the plugin with vLLM (no-op until the plugin lands)."""
