"""ComfyUI's real executor (``execution.PromptExecutor`` with prompt validation), in-process, no HTTP."""

from __future__ import annotations


class DummyServer:
    """What ``execution.PromptExecutor`` touches on the server."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def prompt_executor():
    """A ``PromptExecutor`` without caching (every prompt runs every node)."""
    import execution

    return execution.PromptExecutor(DummyServer(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})


def run_prompt(ex, prompt: dict):
    """Validate ``prompt`` (API form) as the server does, then execute it on ``ex``; returns ``ex``."""
    import asyncio
    import uuid

    import execution

    pid = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
    assert valid[0], valid
    ex.execute(prompt, pid, {}, valid[2])
    return ex


def constant_node(name: str, return_types: tuple[str, ...], values: tuple):
    """Register a test node ``name`` without inputs that outputs ``values``; returns its class."""
    import nodes

    cls = type(name, (), {
        "RETURN_TYPES": return_types,
        "FUNCTION": "run",
        "CATEGORY": "testing",
        "INPUT_TYPES": classmethod(lambda cls: {"required": {}}),
        "run": lambda self: values,
    })
    nodes.NODE_CLASS_MAPPINGS[name] = cls
    return cls
