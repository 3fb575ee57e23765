"""Reading what the exits did from the engine's worker processes.

The exit loop runs in vLLM's worker process(es); ``take_exit_layers(llm)`` asks them, through
``LLM.collective_rpc``, for the exit layer of every answer since the last read (and forgets them):
``{request_id: [exit layer of each sampled token]}``, L for tokens that ran every layer. Under tensor
parallel every rank takes the same decisions; rank 0's log is returned.
"""

from __future__ import annotations

# The worker method ``plugin.install_step_hooks`` adds (vLLM sends callables only with insecure
# pickling enabled; a method name it sends as a string).
WORKER_METHOD = "adainfer_exit_report"


def read_worker(worker, take: bool, prefix: str | None = None) -> dict | None:
    """This worker's exit log (the entries read are forgotten when ``take``; only request ids that
    start with ``prefix`` when given) and layer-work counters; None without exits."""
    model = worker.model_runner.get_model()
    loop = getattr(model, "adainfer_exit_loop", None)
    if loop is None:
        return None
    log = loop.take_log(prefix) if take else {}
    return {
        "log": log,
        "layer_tokens": loop.layer_tokens,
        "dense_tokens": loop.dense_tokens,
        "num_layers": loop.num_layers,
    }


def take_exit_layers(llm) -> dict[str, list[int]]:
    """``{request_id: [exit layers]}`` of the answers given since the last call.

    Raises:
        RuntimeError: the engine does not run AdaInfer (no exit loop in its model).
    """
    return {external_id(rid): layers for rid, layers in _rank0(llm, take=True)["log"].items()}


def layer_work(llm) -> tuple[int, int]:
    """(decoder-layer token rows computed, rows the dense model would have computed), since start-up."""
    r = _rank0(llm, take=False)
    return r["layer_tokens"], r["dense_tokens"]


def external_id(request_id: str) -> str:
    """The id a request was given (``RequestOutput.request_id``) from the engine's internal id:
    vLLM's input processor appends ``"-"`` and 8 random characters to make ids unique."""
    if len(request_id) > 9 and request_id[-9] == "-":
        return request_id[:-9]
    return request_id


def _rank0(llm, take: bool) -> dict:
    results = llm.collective_rpc(WORKER_METHOD, args=(take,))
    if not results or results[0] is None:
        raise RuntimeError("this engine does not run AdaInfer: no exit loop in its model (see adainfer.vllm)")
    return results[0]
