"""Per-layer feature collection on a tiny random Llama (with the bundled tokenizer): the logit lens
matches the model's own decode, prefix sharing is exact, layer L is the model's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adainfer.calibration.features import (
    LayerFeatures,
    collect_features,
    label_margin,
    label_probs,
    label_signals,
    vocab_label_pred,
)
from adainfer.models import lens_head

from adainfer_kernels.reference import exit_head_ref

PREFIX = "Classify.\nTweet: I love it\nSentiment: positive\nTweet: awful day\nSentiment: negative\n"
SUFFIXES = [
    "Tweet: what a great game\nSentiment:",
    "Tweet: no\nSentiment:",
    "Tweet: the flight was delayed for six hours and nobody told us anything\nSentiment:",
    "Tweet: meh\nSentiment:",
    "Tweet: best concert ever\nSentiment:",
]
LABEL_IDS = (3524, 2731)


@pytest.fixture(scope="module")
def tiny(bundled):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bundled.tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, tokenizer


def _collect(tiny, **kw):
    model, tok = tiny
    return collect_features(model, tok, PREFIX, SUFFIXES, np.array([1, 0, 0, 0, 1]), LABEL_IDS, progress=False, **kw)


@pytest.mark.slow
def test_shapes_and_meta(tiny):
    f = _collect(tiny, batch_size=2)
    assert f.label_logits.shape == (5, 4, 2) and f.label_logits.dtype == np.float32
    assert f.vocab_top_prob.shape == (5, 4) and f.vocab_argmax.dtype == np.int64
    assert f.meta["shared_prefix"] is True
    assert f.meta["num_hidden_layers"] == 4 and f.meta["config"]["intermediate_size"] == 128
    tok = tiny[1]
    assert f.prompt_lengths.tolist() == [len(tok(PREFIX + s).input_ids) for s in SUFFIXES]


@pytest.mark.slow
def test_prefix_sharing_and_batching_do_not_change_the_features(tiny):
    shared = _collect(tiny, batch_size=2, share_prefix=True)
    whole = _collect(tiny, batch_size=3, share_prefix=False)
    single = _collect(tiny, batch_size=1, share_prefix=False)
    assert whole.meta["shared_prefix"] is False
    for other in (whole, single):
        np.testing.assert_allclose(shared.label_logits, other.label_logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(shared.vocab_top_prob, other.vocab_top_prob, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(shared.vocab_argmax, other.vocab_argmax)


@pytest.mark.slow
def test_logit_lens_matches_the_models_own_decode(tiny):
    """Layer k < L features = the model's own modules (final norm, LM head) on layer k's raw output,
    decoded by hand (softmax, top-2); layer L = the model's logits. Independent of the exit head: the
    hidden states come from ``output_hidden_states``, the decode from ``model.model.norm`` and
    ``model.lm_head``."""
    model, tok = tiny
    f = _collect(tiny, batch_size=5)
    n_layers = model.config.num_hidden_layers
    labels = list(LABEL_IDS)
    for i, s in enumerate(SUFFIXES):
        with torch.inference_mode():
            out = model(**tok(PREFIX + s, return_tensors="pt"), output_hidden_states=True)
            assert len(out.hidden_states) == n_layers + 1
            for k in range(1, n_layers):
                logits = model.lm_head(model.model.norm(out.hidden_states[k][0, -1])).double()
                np.testing.assert_allclose(f.label_logits[i, k - 1], logits[labels].numpy(), rtol=1e-4, atol=1e-4)
                probs = torch.softmax(logits, dim=-1)
                (p1, p2), (top_id, _) = probs.topk(2)
                np.testing.assert_allclose(f.vocab_top_prob[i, k - 1], float(p1), rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(f.vocab_gap[i, k - 1], float(p1 - p2), rtol=1e-4, atol=1e-6)
                z1, z2 = logits.topk(2).values
                if z1 - z2 > 1e-3:  # argmax is exact off near-ties
                    assert f.vocab_argmax[i, k - 1] == int(top_id), (i, k)
            # the last layer is the model's own answer (its hidden state is not normed twice)
            logits = out.logits[0, -1]
        np.testing.assert_allclose(f.label_logits[i, -1], logits[labels].numpy(), rtol=1e-4, atol=1e-4)
        assert f.vocab_argmax[i, -1] == int(logits.argmax())


@pytest.mark.slow
def test_label_signals_equal_the_exit_head_over_label_tokens_with_bias(tiny):
    model, tok = tiny
    f = _collect(tiny)
    bias = np.array([[0.5, -0.5]] * 4)
    top, gap, pred = label_signals(f, bias)
    raw = {}
    hook = model.model.layers[1].register_forward_hook(lambda m, a, o: raw.__setitem__("h", o))
    try:
        with torch.inference_mode():
            model(**tok(PREFIX + SUFFIXES[2], return_tensors="pt"))
    finally:
        hook.remove()
    h = raw["h"][0] if isinstance(raw["h"], tuple) else raw["h"]
    head = lens_head(model, vocab_subset=torch.tensor(LABEL_IDS), logit_bias=torch.tensor([0.5, -0.5]))
    with torch.inference_mode():
        sig = exit_head_ref(h[:, -1], head)
    np.testing.assert_allclose(top[2, 1], float(sig.top_prob[0]), rtol=1e-4)
    np.testing.assert_allclose(gap[2, 1], float(sig.gap[0]), rtol=1e-4, atol=1e-6)
    assert LABEL_IDS[pred[2, 1]] == int(sig.argmax[0])


def test_label_quantities_on_hand_made_logits():
    z = np.array([[[0.0, 2.0], [1.0, 1.0], [3.0, 0.0]]], dtype=np.float32)  # 1 example, 3 layers
    f = LayerFeatures(
        label_logits=z,
        labels=np.array([1]),
        label_token_ids=np.array([5, 9]),
        prompt_lengths=np.array([10]),
        vocab_argmax=np.array([[9, 4, 5]]),
        vocab_top_prob=np.zeros((1, 3), np.float32),
        vocab_gap=np.zeros((1, 3), np.float32),
    )
    top, gap, pred = label_signals(f)
    assert pred.tolist() == [[1, 0, 0]]  # a tie goes to the lower index, as in the kernel
    np.testing.assert_allclose(top[0], [1 / (1 + np.exp(-2)), 0.5, 1 / (1 + np.exp(-3))], rtol=1e-6)
    np.testing.assert_allclose(gap[0], 2 * top[0] - 1, atol=1e-6)
    np.testing.assert_allclose(label_margin(f, np.array([[0, 0], [0, 1], [0, 0]]))[0], [2, 1, -3])
    assert label_probs(f).shape == (1, 3, 2)
    assert vocab_label_pred(f).tolist() == [[1, -1, 0]]
    with pytest.raises(ValueError, match="label bias has shape"):
        label_signals(f, np.zeros((2, 2)))


def test_save_load_round_trip_without_pickle(tmp_path, make_features):
    f = make_features(20)
    f.meta["task"] = "x"
    path = tmp_path / "f.npz"
    f.save(path)
    g = LayerFeatures.load(path)
    np.testing.assert_array_equal(f.label_logits, g.label_logits)
    np.testing.assert_array_equal(f.labels, g.labels)
    assert g.meta == f.meta and g.vocab_argmax is None
    with np.load(path, allow_pickle=False) as z:  # readable with pickle disabled
        assert "label_logits" in z.files
    sub = f.subset(np.array([3, 1]))
    assert sub.n_examples == 2 and sub.labels.tolist() == [f.labels[3], f.labels[1]]


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_batch_size_must_be_a_positive_integer(batch_size):
    # checked before the model or tokenizer is touched: -1 used to run no batch and return all-zero features
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        collect_features(None, None, PREFIX, SUFFIXES, None, LABEL_IDS, batch_size=batch_size, progress=False)
