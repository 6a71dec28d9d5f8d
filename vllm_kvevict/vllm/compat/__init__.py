"""Version-specific patches of vLLM internals, one module per supported vLLM series.

Each module exposes ``install_all()`` and ``PATCH_TARGETS`` (what it patches, for the tests
that fail loudly when vLLM moves one of them).
"""
