"""What one vLLM step looks like to the exit loop, and its attention metadata for fewer requests.

vLLM builds a step's attention metadata in its model runner, before the model's forward, from one
backend-neutral ``CommonAttentionMetadata`` per KV-cache group, through each attention group's own
builder (``AttentionGroup.build_metadata``). The plugin wraps those two calls (``plugin.register``)
to keep, for the step about to run, the runner, and per attention group the common metadata it was
built from. When requests leave the step at an exit, ``StepCapture.metadata_for`` rebuilds every
group's metadata for the requests still active, through the same builder: the loop assumes nothing
about which attention backend runs.

Token-major layout (no batch dimension): request i of the step owns the tokens
``query_start_loc[i] : query_start_loc[i + 1]`` of the flattened ``[num_tokens, d]`` hidden states;
its last token is the one vLLM samples from (unless it is in the middle of a chunked prefill).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

# CommonAttentionMetadata fields indexed per request / per token when requests are selected.
_PER_REQUEST = (
    "seq_lens",
    "block_table_tensor",
    "is_prefilling",
    "seq_lens_cpu_upper_bound",
    "replayssm_decode_base_cpu",
)
# Fields that belong to features the exit loop refuses at start-up (settings.check_engine); met
# here anyway, they stop the step with an error rather than being carried over unsliced.
_UNSUPPORTED = (
    "logits_indices_padded",
    "encoder_seq_lens",
    "dcp_local_seq_lens",
    "mm_req_doc_ranges",
    "rswa_prefix_lens",
)


@dataclass
class GroupBuild:
    """One attention group's metadata build of this step: the group (its builder and layer names),
    the common metadata it was built from and the micro-batch index."""

    group: object
    common: object
    ubatch: int


@dataclass
class StepCapture:
    """The step vLLM is about to run, as the plugin's runner hooks saw it being prepared."""

    runner: object = None
    num_reqs: int = 0
    builds: list[GroupBuild] = field(default_factory=list)
    dummy: bool = False
    capturing: bool = False
    serial: int = 0  # grows with every step prepared: the model refuses a capture it already used

    def begin(self, runner, num_reqs: int) -> None:
        self.runner = runner
        self.num_reqs = int(num_reqs)
        self.builds = []
        self.capturing = True
        self.serial += 1

    @property
    def common(self):
        """The first group's common metadata (query layout and sequence lengths are the same in every group)."""
        return self.builds[0].common

    def layer_names(self) -> set[str]:
        return {name for b in self.builds for name in b.group.layer_names}

    def req_ids(self) -> list[str]:
        """vLLM's request ids of the step's requests, in step order."""
        return list(self.runner.input_batch.req_ids[: self.num_reqs])

    def samples_last_token(self) -> torch.Tensor:
        """(R,) bool: requests whose last scheduled token is a sampled one (their prompt is complete
        after this step). A request in the middle of a chunked prefill is never checked: its
        last token is not an answer."""
        batch = self.runner.input_batch
        prompt = torch.as_tensor(batch.num_prompt_tokens_cpu_tensor[: self.num_reqs])
        seq_lens = self.common.seq_lens.to("cpu")[: self.num_reqs]
        return seq_lens >= prompt

    def metadata_for(self, req_index: torch.Tensor, kept: torch.Tensor, token_index: torch.Tensor) -> dict[str, object]:
        """Per-layer attention metadata of the step restricted to requests ``req_index`` (sorted step
        indices), of which the first ``kept[i]`` query tokens stay (``token_index``: those tokens,
        grouped by request in step order), each group rebuilt by its own builder."""
        out: dict[str, object] = {}
        for b in self.builds:
            common = select_requests(b.common, req_index, kept, token_index)
            md = b.group.build_metadata(common, b.ubatch)
            for name in b.group.layer_names:
                out[name] = md
        return out


def select_requests(common, req_index: torch.Tensor, kept: torch.Tensor, token_index: torch.Tensor):
    """``CommonAttentionMetadata`` of the requests ``req_index`` only, each keeping the first
    ``kept[i]`` of its query tokens (``token_index``: those tokens, in order): per-request fields
    indexed, per-token fields gathered, the query layout recomputed and each sequence shortened by the
    query tokens it drops (they are the last ones: what stays attends exactly as before); the rest
    (causal flag, ...) kept."""
    for name in _UNSUPPORTED:
        if getattr(common, name, None) is not None:
            raise RuntimeError(f"AdaInfer cannot drop requests from a step that uses {name}: refuse that feature")
    if isinstance(common.causal, torch.Tensor):
        raise RuntimeError("AdaInfer cannot drop requests from a step with per-request causal flags")
    qsl_cpu = common.query_start_loc_cpu.to(torch.int64)
    req_cpu = req_index.to("cpu", torch.int64)
    lens = kept.to("cpu", torch.int64)
    dropped = (qsl_cpu[1:] - qsl_cpu[:-1]).index_select(0, req_cpu) - lens
    if bool((dropped < 0).any()) or bool((lens <= 0).any()):
        raise RuntimeError("AdaInfer: a request must keep between 1 and all of its query tokens")
    new_qsl = torch.zeros(req_cpu.numel() + 1, dtype=common.query_start_loc_cpu.dtype)
    torch.cumsum(lens, 0, out=new_qsl[1:])
    dev = common.query_start_loc.device
    req_dev = req_index.to(dev)
    changes = {
        "query_start_loc": new_qsl.to(dev),
        "query_start_loc_cpu": new_qsl,
        "num_reqs": int(req_cpu.numel()),
        "num_actual_tokens": int(token_index.numel()),
        "max_query_len": int(lens.max()) if lens.numel() else 0,
        "slot_mapping": common.slot_mapping.index_select(0, token_index.to(common.slot_mapping.device)),
        "_num_computed_tokens_cache": None,
        "_token_to_req_indices_cache": None,
    }
    for name in _PER_REQUEST:
        value = getattr(common, name, None)
        if value is not None:
            changes[name] = value.index_select(0, req_dev.to(value.device))
    for name in ("seq_lens", "seq_lens_cpu_upper_bound"):  # the dropped query tokens end each sequence
        if changes.get(name) is not None:
            changes[name] = changes[name] - dropped.to(device=changes[name].device, dtype=changes[name].dtype)
    seq_cpu = changes["seq_lens"].to("cpu")
    changes["max_seq_len"] = int(seq_cpu.max()) if seq_cpu.numel() else 0
    if common.positions is not None:
        changes["positions"] = common.positions.index_select(0, token_index.to(common.positions.device))
    if common.req_idx is not None:
        changes["req_idx"] = common.req_idx[req_cpu.numpy()]
    return dataclasses.replace(common, **changes)


CURRENT = StepCapture()
