"""``make test-vllm`` sets ADAINFER_VLLM_REFERENCE: there, vLLM must import (a skip would hide a broken
venv); elsewhere (``make test`` in .venv) the modules skip themselves."""

import os

if os.environ.get("ADAINFER_VLLM_REFERENCE"):
    import vllm  # noqa: F401
