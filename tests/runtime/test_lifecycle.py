"""A patched model under the things a real program does to it: calls from several threads, deep
copies, parts changed after apply(), and autograd. Each test failed on the runtime before these fixes."""

from __future__ import annotations

import copy
import threading

import adainfer
import pytest
import torch
from adainfer import AdaInferConfig, ForcedExits, StopRulePolicy
from adainfer.calibration.classifier import ModelIdentity, StopClassifier
from tiny_models import VOCAB, decode_hidden, left_padded_batch, tiny_llama

from adainfer_kernels.head import StopRule


@torch.inference_mode()
def test_two_threads_on_one_patched_model_each_get_their_own_exits_and_stats():
    model = tiny_llama("sdpa")
    batches = {3: left_padded_batch(3, 9, seed=1), 5: left_padded_batch(5, 11, seed=2)}
    # a score policy: each row's exit depends on its own hidden state, whatever runs beside it
    policy = StopRulePolicy(StopRule(4.0, 0.0, -1.5), layers=[1, 2, 3], label_token_ids=[5, 17, 40])
    with adainfer.patched(model, policy) as handle:
        alone = {}
        for b, batch in batches.items():
            model(**batch)
            alone[b] = handle.last_stats.exit_layers.tolist()
        assert any(k < 4 for k in alone[3] + alone[5]), "the test needs exits"
        errors = []

        def calls(b: int) -> None:
            for _ in range(15):
                model(**batches[b])
                stats = handle.last_stats
                if stats.batch_size != b or stats.exit_layers.tolist() != alone[b]:
                    errors.append((b, stats.batch_size, stats.exit_layers.tolist()))

        def worker(b: int) -> None:
            try:
                with torch.inference_mode():  # grad mode is per thread: a server's worker sets its own
                    calls(b)
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(b,)) for b in (3, 5, 3, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:5]


@torch.inference_mode()
def test_a_deep_copy_is_patched_on_its_own_weights():
    model = tiny_llama("sdpa")
    batch = left_padded_batch(4, 9)
    pristine = copy.deepcopy(model)  # never patched: what both models must compute once unpatched
    handle = adainfer.apply(model, ForcedExits([1, 4, 2, 3]))
    twin = copy.deepcopy(model)
    twin_handle = adainfer.handle_of(twin)
    assert twin_handle is not None and twin_handle is not handle and twin_handle.model is twin
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.01)
    ref = model(**batch).logits
    n_before = len(handle.history)
    out = twin(**batch).logits
    assert not torch.allclose(out, ref), "the copy must run its own (changed) weights"
    assert len(handle.history) == n_before and len(twin_handle.history) == 1, "stats land on the copy's handle"
    assert twin_handle.last_stats.exit_layers.tolist() == [1, 4, 2, 3]
    twin.generate(**batch, max_new_tokens=2, do_sample=False)  # the copy's generate wrapper, its own handle
    assert len(handle.history) == n_before and len(twin_handle.history) == 3
    twin_handle.remove()
    handle.remove()
    assert adainfer.handle_of(twin) is None and adainfer.handle_of(model) is None
    assert "generate" not in model.__dict__ and "generate" not in twin.__dict__, "the class's generate again"
    # both run plain code again: bit for bit what an independent, never patched copy computes
    assert torch.equal(model(**batch).logits, pristine(**batch).logits)
    with torch.no_grad():
        for p in pristine.parameters():
            p.mul_(1.01)  # now the twin's weights
    assert torch.equal(twin(**batch).logits, pristine(**batch).logits)
    assert twin(**batch).logits.shape == out.shape


@torch.inference_mode()
def test_the_exit_head_follows_resize_token_embeddings():
    model = tiny_llama("sdpa")
    batch = left_padded_batch(4, 9)
    with adainfer.patched(model, ForcedExits([1, 4, 2, 3])) as handle:
        model.resize_token_embeddings(VOCAB + 64)
        logits = model(**batch).logits
        assert logits.shape[-1] == VOCAB + 64
        assert handle.loop.base_head.vocab_size == VOCAB + 64
    ref_hidden = model(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(logits[0, -1], decode_hidden(model, ref_hidden[1][0, -1]), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_a_classifier_for_the_old_vocabulary_is_refused_after_a_resize():
    model = tiny_llama("sdpa")
    clf = StopClassifier(
        identity=ModelIdentity.from_model(model),
        method="gap",
        target="consistency",
        vocab_mode="labels",
        w_top_prob=0.0,
        w_gap=1.0,
        w_layer=0.0,
        intercept=0.0,
        threshold=0.5,
        min_layer=1,
        label_token_ids=(5, 17),
    )
    with adainfer.patched(model, clf):
        model.resize_token_embeddings(VOCAB + 64)
        with pytest.raises(ValueError, match=r"classifier was fitted for .* vocab 320"):
            model(**left_padded_batch(2, 9))


@torch.inference_mode()
def test_the_loop_follows_a_removed_decoder_layer():
    model = tiny_llama("sdpa", layers=4)
    batch = left_padded_batch(4, 9)
    with adainfer.patched(model, ForcedExits([1, 3, 2, 3])) as handle:
        del model.model.layers[3]
        model.config.num_hidden_layers = 3
        out = model(**batch).logits
        tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert handle.last_stats.num_layers == 3 and handle.last_stats.exit_layers.tolist() == [1, 3, 2, 3]
    with adainfer.patched(model, ForcedExits([1, 3, 2, 3])):
        again = model(**batch).logits
    torch.testing.assert_close(out, again)
    assert tokens.shape == (4, 12)
    # against the unpatched 3-layer model: exited rows are the logit lens of their layer, the others its logits
    ref = model(**batch, output_hidden_states=True)
    for row, k in enumerate([1, 3, 2, 3]):
        want = ref.logits[row, -1] if k == 3 else decode_hidden(model, ref.hidden_states[k][row, -1])
        torch.testing.assert_close(out[row, -1], want, rtol=1e-5, atol=1e-5)


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits[:, -1].float(), dim=-1).sum() - logits[:, -1, 7].float().sum()


@pytest.mark.parametrize("mode", ["compact", "mask"])
def test_backward_through_forced_exits_gives_the_logit_lens_gradients(mode):
    """Gradients through a patched model equal those of the same function computed by hand from the
    unpatched model's hidden states (exited rows: the logit lens of their exit layer)."""
    exits = [1, 4, 2, 3]
    batch = left_padded_batch(4, 9)
    model = tiny_llama("eager")
    with adainfer.patched(model, ForcedExits(exits), AdaInferConfig(mode=mode)):
        _loss(model(**batch).logits).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model(**batch, output_hidden_states=True)
    rows = []
    for r, k in enumerate(exits):
        rows.append(out.logits[r, -1] if k == 4 else decode_hidden(model, out.hidden_states[k][r, -1]))
    _loss(torch.stack(rows)[:, None]).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["compact", "mask"])
def test_a_labels_loss_backpropagates(mode):
    model = tiny_llama("eager")
    batch = left_padded_batch(4, 9)
    batch["attention_mask"][:] = 1
    with adainfer.patched(model, ForcedExits([1, 4, 2, 3]), AdaInferConfig(mode=mode)):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_native_scatter_rows_tells_autograd_it_wrote_in_place():
    """A graph that saved a tensor must refuse to backward once scatter_rows overwrote it (the native
    op used to leave the version counter alone, and backward silently used the new values)."""
    from adainfer_kernels.compaction import scatter_rows

    out = torch.zeros(4, 3)
    w = torch.ones(4, 3, requires_grad=True)
    z = (w * out).sum()  # saves `out` for backward
    scatter_rows(out, torch.tensor([0]), torch.full((1, 3), 5.0))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
