"""Replace one vLLM function with a wrapper, once, keeping the original reachable.

Every monkeypatch of the plugin goes through :func:`wrap_attribute`, so that installing twice
(vLLM calls general plugins in several places of one process) wraps once, and so that tests can
check that the target still exists where the patch expects it.
"""

from __future__ import annotations

from typing import Any, Callable

_MARK = "__kvevict_original__"


def wrap_attribute(owner: Any, name: str, make_wrapper: Callable[[Any], Any]) -> bool:
    """Set ``owner.name = make_wrapper(original)`` unless already done; True if patched now.

    ``original`` is the raw attribute from ``owner.__dict__`` (a ``classmethod`` or
    ``staticmethod`` object stays one), so ``make_wrapper`` must return the same kind.

    Raises
    ------
    AttributeError
        If ``owner`` has no ``name`` of its own: vLLM moved it, the patch must be revisited.
    """
    if name not in vars(owner):
        raise AttributeError(f"{owner.__module__}.{owner.__qualname__}.{name} not found: vLLM moved it")
    original = vars(owner)[name]
    if is_wrapped(owner, name):
        return False
    wrapper = make_wrapper(original)
    target = wrapper.__func__ if isinstance(wrapper, (classmethod, staticmethod)) else wrapper
    setattr(target, _MARK, original)
    setattr(owner, name, wrapper)
    return True


def is_wrapped(owner: Any, name: str) -> bool:
    raw = vars(owner).get(name)
    target = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
    return hasattr(target, _MARK)


def original_of(owner: Any, name: str) -> Any:
    """The attribute as it was before :func:`wrap_attribute` (itself if never wrapped)."""
    raw = vars(owner)[name]
    target = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
    return getattr(target, _MARK, raw)
