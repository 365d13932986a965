"""gpt-oss's built-in tools as MCP servers: sandboxed python, a browser over a document index."""


class ToolsError(Exception):
    """Every error of ``gptoss_vllm.tools``: a built-in tool server cannot be started or its index built."""
