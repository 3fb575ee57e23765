"""``AdaInferForCausalLM``: vLLM's Llama with AdaInfer's per-request early exit.

One vLLM step runs the requests of a continuous batch token-major: ``hidden [num_tokens, d]``,
request i owning tokens ``qsl[i]:qsl[i+1]``, vLLM's residual stream kept apart (``hidden + residual``
is the state Hugging Face's layer would return). The step's loop:

    h, residual = embed(input_ids), None
    for layer k = 1..L:
        fill K/V of layer k for the tokens of requests that exited (their frozen exit state)
        h, residual = layer(positions, h, residual)          # only the active requests' tokens
        if k is checked:
            s = h[last] + residual[last]                     # last token of each active request
            stop = core.check_rows(policy, head, k, s, ...)  # fused exit head + stop rule
            requests that stop: exit layer k, state h + residual of all their tokens frozen
            the active requests' tokens are compacted and the step's attention metadata is rebuilt
            for them by the backend's own builder (step.StepCapture.metadata_for)
    output: final norm of the active tokens and of the frozen states, back in token order

``compute_logits`` then delivers the exit answer by the Hugging Face runtime's contract
(``runtime.answers``): in label mode the sampled row of an exited request becomes the labels'
log-probabilities (``-inf`` elsewhere); over the full vocabulary its logits are the LM head on the
frozen state (the logit lens at the exit layer). Requests that ran every layer keep vLLM's logits.

K/V of skipped layers (state propagation): every later layer gets the exited tokens' K/V computed
from their frozen state through that layer's input norm, qkv projection and rotary embedding, and
written by the backend's own ``do_kv_cache_update``, so the request's later decode steps read K/V
for every layer, as in the HF runtime's ``generate``. A request is checked only when its last token
is sampled this step (a chunk of a longer prompt is never an answer).

Prefix caching: vLLM may hand a block that becomes full in this step to later requests with the
same prefix. So when a request exits, only its tokens at or after the last block boundary its
sequence reaches this step leave the step (frozen, their K/V state-propagated); the tokens of blocks
that become full keep running every layer (they are no longer checked, and the request's answer is
still its exit state), and the request stays in the attention metadata with that shorter query.
Cached blocks then always hold the full model's K/V: no request's answer depends on which requests
ran before it. Without prefix caching every token of an exited request leaves (the HF runtime's
semantics, exactly). With a shared few-shot prefix served from the cache, what a step computes is
mostly the requests' own suffixes, which exit.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llama import LlamaForCausalLM

from adainfer.runtime.answers import label_answer_logits
from adainfer.runtime.core import check_rows
from adainfer.runtime.policy import ClassifierPolicy
from adainfer.runtime.stats import ExitStats
from adainfer.vllm import settings as S
from adainfer.vllm.plugin import install_step_hooks
from adainfer.vllm.step import CURRENT
from adainfer_kernels.compaction import compact_rows, scatter_rows
from adainfer_kernels.exit_partials import ExitPartials, exit_head_partials, merge_exit_partials
from adainfer_kernels.head import ExitSignals, ReadoutHead

# Exit layers kept per request until read (``report.take_exit_layers``); older entries are dropped
# past this many requests so a server that nobody reads never grows without bound.
MAX_LOGGED_REQUESTS = 100_000


def _gather_slots(slots: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's slot mapping at ``tokens``; layers of one KV-cache group share one mapping
    tensor, which is gathered once for all of them."""
    gathered: dict[int, torch.Tensor] = {}
    out = {}
    for name, mapping in slots.items():
        if id(mapping) not in gathered:
            gathered[id(mapping)] = mapping.index_select(0, tokens.to(mapping.device))
        out[name] = gathered[id(mapping)]
    return out


class _CheckOnly:
    """A policy that runs every check of ``inner`` (same heads, same rules) but stops nothing."""

    needs_signals = True

    def __init__(self, inner: ClassifierPolicy) -> None:
        self.inner = inner
        self.label_token_ids = inner.label_token_ids

    def layers_to_check(self, num_layers: int) -> frozenset[int]:
        return self.inner.layers_to_check(num_layers)

    def head_and_rule(self, layer, base):
        return self.inner.head_and_rule(layer, base)

    def should_stop(self, layer, signals, rows) -> torch.Tensor:
        return torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)

    def final_label_bias(self, num_layers: int):
        return None


class _LocalLabels:
    """A label-mode classifier seen through label rows gathered into a (K, d) head: its subset is
    0..K-1 (everything else is the classifier's)."""

    def __init__(self, classifier) -> None:
        self._classifier = classifier
        self.vocab_subset = torch.arange(len(classifier.label_token_ids), dtype=torch.int64)

    def __getattr__(self, name):
        return getattr(self._classifier, name)


class VllmExitLoop:
    """The exit loop of one ``AdaInferForCausalLM`` (one per worker process)."""

    def __init__(self, model: AdaInferForCausalLM, policy, num_layers: int) -> None:
        self.model = model
        self.policy = policy
        self.num_layers = num_layers
        self.checked = frozenset(k for k in policy.layers_to_check(num_layers) if 1 <= k < num_layers)
        self._head: ReadoutHead | None = None
        self._used_serial = -1
        self._last: ExitStats | None = None  # the last step's, until its answers are delivered
        self.log: dict[str, list[int]] = defaultdict(list)  # request id -> exit layer of each answer
        self.layer_tokens = 0  # decoder-layer token rows computed, summed over steps
        self.dense_tokens = 0  # what the dense model would have computed
        self.tp_size = get_tensor_model_parallel_world_size()
        # Under tensor parallel: the label tokens whose LM-head rows a label lens gathers (None: the
        # full-vocabulary lens over this rank's shard, decoded by _shard_signals; or a probe).
        self.label_rows: list[int] | None = None
        self._vocab_start = 0
        self._decode = None
        cache = model.vllm_cache_config
        self.prefix_caching = bool(cache.enable_prefix_caching)
        self.block_size = int(cache.block_size)

    # ---- the readout head, read off the loaded weights
    def head(self) -> ReadoutHead:
        """The model's final norm + LM head. Under tensor parallel the LM head is vocab-sharded: the
        full-vocabulary lens reads this rank's shard (``_shard_signals`` merges the ranks' partials),
        and a label-token lens gets the K label rows gathered onto every rank once (``label_rows``)."""
        if self._head is None:
            m = self.model
            norm = m.model.norm
            weight = m.lm_head.weight
            if self.tp_size == 1:
                vocab = m.config.vocab_size
                weight = weight[:vocab] if weight.shape[0] != vocab else weight  # vLLM pads the vocabulary
            elif self.label_rows is not None:
                weight = self._gather_label_rows(weight)
            else:
                si = m.lm_head.shard_indices
                weight = weight[: si.org_vocab_end_index - si.org_vocab_start_index]
                self._vocab_start = int(si.org_vocab_start_index)
            self._head = ReadoutHead(
                weight=weight, norm="rms", norm_weight=norm.weight, eps=float(norm.variance_epsilon)
            )
        return self._head

    def _gather_label_rows(self, shard: torch.Tensor) -> torch.Tensor:
        """(K, d) rows of the label tokens, on every rank: each rank fills the rows its shard holds,
        an all-reduce (sum) completes them (once, a few KB)."""
        si = self.model.lm_head.shard_indices
        start, end = int(si.org_vocab_start_index), int(si.org_vocab_end_index)
        rows = torch.zeros((len(self.label_rows), shard.shape[1]), dtype=shard.dtype, device=shard.device)
        for k, token in enumerate(self.label_rows):
            if start <= token < end:
                rows[k] = shard[token - start]
        return get_tp_group().all_reduce(rows)

    def _shard_signals(self, last: torch.Tensor, head: ReadoutHead, rule, device) -> ExitSignals:
        """Full-vocabulary lens under tensor parallel: this rank's partials (max, sum-exp, top-2 with
        global ids) all-gathered (one (5, R) fp32 bundle: 20 bytes per row per rank) and merged by the same order-free
        function on every rank (``adainfer_kernels.exit_partials``)."""
        group = get_tp_group()
        rows = last.to(head.weight.dtype) if last.dtype != head.weight.dtype else last
        mine = exit_head_partials(rows, head, vocab_start=self._vocab_start)
        # One all-gather of a (5, R) fp32 bundle: vLLM's CPU shared-memory all-gather has no int64,
        # and ids below 2^24 (every vocabulary here) are exact in fp32.
        packed = torch.stack([t.to(torch.float32) for t in mine.fields()])
        every = group.all_gather(packed.unsqueeze(0).contiguous(), dim=0)  # (tp, 5, R)
        m, s_, i1, t2, i2 = every.unbind(1)
        gathered = (m, s_, i1.to(torch.int64), t2, i2.to(torch.int64))
        return merge_exit_partials(ExitPartials(*gathered), rule)

    # ---- one step
    def forward(self, input_ids, positions, inputs_embeds=None) -> torch.Tensor:
        step = CURRENT
        if step.dummy or not step.builds:
            # vLLM's warm-up and profiling runs (no request): nothing to check
            if step.dummy:
                return LlamaForCausalLM.forward(self.model, input_ids, positions, None, inputs_embeds)
            raise RuntimeError("AdaInfer saw no attention metadata being built for this step: exits cannot run")
        if step.serial == self._used_serial:
            raise RuntimeError("AdaInfer saw this step's attention metadata already used: exits cannot run")
        self._used_serial = step.serial
        fc = get_forward_context()
        if not isinstance(fc.attn_metadata, dict):
            raise RuntimeError("AdaInfer needs one attention metadata dict per step (no micro-batching)")
        saved_md, saved_slots = dict(fc.attn_metadata), dict(fc.slot_mapping)
        missing = set(saved_md) - step.layer_names()
        if missing:
            raise RuntimeError(f"AdaInfer cannot rebuild the attention metadata of layers {sorted(missing)[:3]}")
        try:
            return self._run(step, fc, input_ids, positions, inputs_embeds, saved_slots)
        finally:
            fc.attn_metadata.clear()
            fc.attn_metadata.update(saved_md)
            fc.slot_mapping.clear()
            fc.slot_mapping.update(saved_slots)

    def _run(self, step, fc, input_ids, positions, inputs_embeds, slots) -> torch.Tensor:
        inner = self.model.model
        n_reqs = step.num_reqs
        qsl = step.common.query_start_loc_cpu[: n_reqs + 1].to(torch.int64)
        hidden = inner.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        n_tokens = hidden.shape[0]
        if int(qsl[-1]) != n_tokens:
            raise RuntimeError(f"AdaInfer expects unpadded steps: {n_tokens} tokens for {int(qsl[-1])} scheduled")
        device = hidden.device
        stats = ExitStats.start(n_reqs, self.num_layers, "compact", self.policy.label_token_ids, device)
        checkable = step.samples_last_token().to(device)
        # Positions from which a request's tokens may be frozen at its exit: with prefix caching, the
        # tokens of blocks that become full this step keep running every layer (vLLM may hand those
        # blocks to later requests: they must hold the full model's K/V); without it, all of them.
        seq_lens = step.common.seq_lens.to("cpu", torch.int64)[:n_reqs]
        cacheable_end = (seq_lens // self.block_size) * self.block_size if self.prefix_caching else seq_lens * 0
        residual = None
        active = torch.arange(n_reqs, device=device)  # step indices of the requests still in the step
        undecided = checkable.clone()  # per step request: may still stop (checked, no exit yet)
        tokens = torch.arange(n_tokens, device=device)  # the active tokens, grouped by request in step order
        lens = (qsl[1:] - qsl[:-1]).to(device)  # active tokens per active request
        pos = positions
        answers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sampled token, exit state) of exits
        # the frozen tokens (step indices), their states and positions, and their slots per layer
        fin_tokens = fin_state = fin_pos = fin_slots = None
        base = self.head()
        for i in range(inner.start_layer, inner.end_layer):
            layer = inner.layers[i]
            if fin_tokens is not None:
                self._fill_kv(layer, fin_state, fin_pos, fin_slots)
            if active.numel():
                hidden, residual = layer(pos, hidden, residual)
                self.layer_tokens += hidden.shape[0]
            self.dense_tokens += n_tokens
            k = i + 1
            if k not in self.checked or not active.numel():
                continue
            sel = torch.nonzero(undecided.index_select(0, active)).squeeze(1)
            if sel.numel() == 0:
                continue
            last = (torch.cumsum(lens, 0) - 1).index_select(0, sel)  # an undecided request's last token is active
            state = hidden.index_select(0, last) + residual.index_select(0, last)
            rows = active.index_select(0, sel)
            stop = self._agree(check_rows(self.policy, base, k, state, rows, stats, self._decode))
            if not bool(stop.any()):
                continue
            gone = sel[stop]  # positions among the active requests
            gone_reqs = active.index_select(0, gone)
            stats.exit_layers.index_fill_(0, gone_reqs, k)
            undecided.index_fill_(0, gone_reqs, False)
            answers.append((tokens.index_select(0, last[stop]), state[stop]))
            # Which tokens leave: those of the stopped requests outside blocks that become full.
            owner = torch.repeat_interleave(torch.arange(active.numel(), device=device), lens)
            stopped = torch.zeros(active.numel(), dtype=torch.bool, device=device)
            stopped[gone] = True
            limit = cacheable_end.to(device).index_select(0, active)
            leave = stopped.index_select(0, owner) & (pos >= limit.index_select(0, owner))
            # One compaction event over the step's tokens (the C++ dispatcher, as in the HF loop):
            # the tokens that leave go out of hidden, residual and positions together.
            event = compact_rows(~leave, tokens, [hidden, residual, pos])
            new = (
                event.finished_rows,
                hidden.index_select(0, event.finished) + residual.index_select(0, event.finished),
                pos.index_select(0, event.finished),
            )
            if fin_tokens is not None:
                new = tuple(torch.cat(pair) for pair in zip((fin_tokens, fin_state, fin_pos), new, strict=True))
            fin_tokens, fin_state, fin_pos = new
            fin_slots = _gather_slots(slots, fin_tokens)
            hidden, residual, pos = event.tensors
            tokens = event.row_map
            lens = torch.zeros_like(lens).index_add_(0, owner, (~leave).to(lens.dtype))
            still = lens > 0
            active, lens = active[still], lens[still]
            if active.numel():
                fc.attn_metadata.update(step.metadata_for(active, lens, tokens))
                fc.slot_mapping.update(_gather_slots(slots, tokens))
        out = torch.empty((n_tokens, base.hidden_size), dtype=hidden.dtype, device=device)
        if active.numel():
            final, _ = inner.norm(hidden, residual)
            scatter_rows(out, tokens, final)
        if fin_tokens is not None:
            scatter_rows(out, fin_tokens, inner.norm(fin_state))
        if answers:  # a sampled token that kept running for the cache still answers from its exit state
            scatter_rows(out, torch.cat([a[0] for a in answers]), inner.norm(torch.cat([a[1] for a in answers])))
        self._record(step, stats, checkable)
        return out

    def _agree(self, stop: torch.Tensor) -> torch.Tensor:
        """Under tensor parallel, every rank takes rank 0's decision (a broadcast of a few bytes): the
        ranks hold the same hidden states after each layer's all-reduce, but a decision must not hang
        on that reduction being bitwise identical everywhere, or the ranks would drop different requests."""
        if self.tp_size == 1:
            return stop
        return get_tp_group().broadcast(stop.to(torch.uint8), src=0).to(torch.bool)

    def _fill_kv(self, layer, state, pos, slots: dict[str, torch.Tensor]) -> None:
        """K/V of ``layer`` for exited tokens (frozen states ``state``, their cache slots per layer
        ``slots``): input norm -> qkv -> rotary, written to the cache by the backend's
        ``do_kv_cache_update``."""
        attn = layer.self_attn
        a = attn.attn
        mapping = slots.get(a.layer_name)
        if mapping is None:
            return
        x = layer.input_layernorm(state)
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(pos, q, k)
        a.impl.do_kv_cache_update(
            a,
            k.reshape(-1, a.num_kv_heads, a.head_size),
            v.reshape(-1, a.num_kv_heads, a.head_size_v),
            a.kv_cache,
            mapping,
        )

    def _record(self, step, stats: ExitStats, checkable: torch.Tensor) -> None:
        self._last = stats
        layers = stats.exit_layers.tolist()
        for rid, k, answered in zip(step.req_ids(), layers, checkable.tolist(), strict=True):
            if answered:
                self.log[rid].append(int(k))
        if len(self.log) > MAX_LOGGED_REQUESTS:
            for rid in list(self.log)[: len(self.log) - MAX_LOGGED_REQUESTS]:
                del self.log[rid]

    # ---- answers
    def deliver(self, logits: torch.Tensor) -> torch.Tensor:
        """The exit answers in the sampled rows' logits (one row per request of the last step)."""
        stats, self._last = self._last, None
        if stats is None or logits is None:
            return logits
        labels = stats.label_token_ids
        if labels is None:
            return logits  # full vocabulary: the LM head on the frozen state is the exit answer
        if logits.shape[0] != stats.batch_size:
            raise RuntimeError(
                f"AdaInfer expects one sampled row per request: {logits.shape[0]} rows for {stats.batch_size}"
            )
        rows = torch.nonzero(stats.exit_layers < stats.num_layers).squeeze(1)
        if rows.numel() == 0:
            return logits
        logits[rows.to(logits.device)] = label_answer_logits(stats.label_logprobs.index_select(0, rows), labels, logits)
        return logits

    def take_log(self, prefix: str | None = None) -> dict[str, list[int]]:
        """The exit layers logged per request id (those starting with ``prefix`` when given), forgotten here."""
        if prefix is None:
            log, self.log = dict(self.log), defaultdict(list)
            return log
        return {rid: self.log.pop(rid) for rid in [r for r in self.log if r.startswith(prefix)]}


class AdaInferForCausalLM(LlamaForCausalLM):
    """vLLM's ``LlamaForCausalLM`` whose layer loop exits per request (``additional_config["adainfer"]``)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        plugin = S.PluginSettings.from_additional_config(vllm_config.additional_config)
        if plugin.exits != "off":
            S.check_engine(vllm_config, str(hf_config.model_type))
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.adainfer_settings = plugin
        self.vllm_cache_config = vllm_config.cache_config
        self.adainfer_exit_loop: VllmExitLoop | None = None
        if plugin.exits == "off":
            return
        from adainfer.calibration.classifier import StopClassifier

        classifier = StopClassifier.load(plugin.classifier)
        S.check_classifier(classifier, hf_config)
        S.check_attention(self.model.layers[self.model.start_layer].self_attn.attn)
        tp = vllm_config.parallel_config.tensor_parallel_size
        lens_labels = getattr(classifier, "readout", "lens") == "lens" and classifier.vocab_subset is not None
        if tp > 1 and lens_labels:
            # the label rows are gathered onto every rank: the policy indexes them 0..K-1, the
            # answers keep the real token ids
            policy = ClassifierPolicy(_LocalLabels(classifier))
            policy.label_token_ids = classifier.vocab_subset
        else:
            policy = ClassifierPolicy(classifier)
        if plugin.exits == "check":
            policy = _CheckOnly(policy)
        loop = VllmExitLoop(self, policy, int(hf_config.num_hidden_layers))
        if tp > 1 and getattr(classifier, "readout", "lens") == "lens":
            if lens_labels:
                loop.label_rows = [int(t) for t in classifier.label_token_ids]
            else:
                loop._decode = loop._shard_signals
        self.adainfer_exit_loop = loop
        install_step_hooks()

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if self.adainfer_exit_loop is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        return self.adainfer_exit_loop.forward(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor):
        logits = super().compute_logits(hidden_states)
        if self.adainfer_exit_loop is None:
            return logits
        return self.adainfer_exit_loop.deliver(logits)
