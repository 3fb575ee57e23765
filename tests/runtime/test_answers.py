"""The exit answer, delivered: every read-out of a patched model (label-token argmax of the returned
logits, their softmax, generate(max_new_tokens=1), handle.last_stats, adainfer.classify) gives the
answer the exit rule decided, and rows that never exit keep the model's own logits bit for bit."""

from __future__ import annotations

import adainfer
import numpy as np
import pytest
import torch
from adainfer import AdaInferConfig, StopRulePolicy
from adainfer.calibration.classifier import StopClassifier
from adainfer.models import lens_head
from tiny_models import label_classifier, left_padded_batch, tiny_llama

from adainfer_kernels.reference import exit_head_ref

LABELS = (5, 17, 40)


def _policy():
    """Stops a row when its top label probability passes 0.375: on the 6-row batch below rows 0, 1
    and 5 stop at layer 1, row 2 at layer 2, rows 3 and 4 run all 4 layers (asserted)."""
    from adainfer_kernels.head import StopRule

    return StopRulePolicy(StopRule(4.0, 0.0, -1.5), layers=[1, 2, 3], label_token_ids=list(LABELS))


def _classifier(model, bias_scale: float = 0.05) -> StopClassifier:
    """A label-mode StopClassifier with a per-layer label bias (tiny_models.label_classifier)."""
    return label_classifier(model, LABELS, (" a", " b", " c"), bias_scale)


@pytest.mark.parametrize("mode", ["compact", "mask"])
@torch.inference_mode()
def test_every_read_out_gives_the_exit_answer(mode):
    model = tiny_llama("sdpa")
    batch = left_padded_batch(6, 9)
    ref_logits = model(**batch).logits
    hidden = model(**batch, output_hidden_states=True).hidden_states
    with adainfer.patched(model, _policy(), AdaInferConfig(mode=mode)) as handle:
        logits = model(**batch).logits
        stats = handle.last_stats
        generated = model.generate(**batch, max_new_tokens=1, do_sample=False)[:, -1]
    exits = stats.exit_layers.tolist()
    assert exits == [1, 1, 2, 4, 4, 1], exits
    labels = torch.tensor(LABELS)
    label_argmax = logits[:, -1, labels].argmax(-1)
    assert torch.equal(label_argmax, stats.answer_label), "label-token argmax of the logits"
    assert torch.equal(labels[stats.answer_label], stats.answer_token)
    base = lens_head(model, vocab_subset=labels)
    for row, k in enumerate(exits):
        if k < 4:
            # the answer is the exit head's at the exit layer (the kernel's decision)
            sig = exit_head_ref(hidden[k][row : row + 1, -1], base)
            assert int(sig.argmax) == int(stats.answer_token[row])
            torch.testing.assert_close(stats.answer_prob[row], sig.top_prob[0], rtol=1e-5, atol=1e-6)
            # the returned distribution is the answer's: label log-probs, -inf elsewhere
            probs = torch.softmax(logits[row, -1].float(), dim=-1)
            torch.testing.assert_close(probs[labels], stats.label_logprobs[row].exp(), rtol=1e-5, atol=1e-6)
            assert float(probs[labels].sum()) == pytest.approx(1.0, abs=1e-5)
            assert int(generated[row]) == int(stats.answer_token[row]), "generate(max_new_tokens=1)"
        else:
            assert torch.equal(logits[row], ref_logits[row]) or mode == "compact"
            torch.testing.assert_close(logits[row], ref_logits[row], rtol=1e-5, atol=1e-5)
            want = torch.log_softmax(ref_logits[row, -1, labels].float(), dim=-1)
            torch.testing.assert_close(stats.label_logprobs[row], want, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_no_exit_leaves_the_logits_bit_identical_even_in_label_mode():
    model = tiny_llama("sdpa")
    batch = left_padded_batch(4, 9)
    ref = model(**batch).logits
    clf = _classifier(model).with_threshold(None)  # never stops early
    with adainfer.patched(model, clf) as handle:
        assert torch.equal(model(**batch).logits, ref)
        assert handle.last_stats.exit_layers.tolist() == [4] * 4
        assert (handle.last_stats.answer_label >= 0).all(), "full-depth answers are known"


@torch.inference_mode()
def test_full_depth_correction_is_explicit_and_read_the_same_everywhere():
    model = tiny_llama("sdpa")
    batch = left_padded_batch(6, 9)
    clf = _classifier(model)
    ref = model(**batch).logits
    with adainfer.patched(model, clf) as handle:
        plain = model(**batch).logits
        plain_stats = handle.last_stats
    with adainfer.patched(model, clf, AdaInferConfig(correct_full_depth=True)) as handle:
        corrected = model(**batch).logits
        stats = handle.last_stats
        generated = model.generate(**batch, max_new_tokens=1, do_sample=False)[:, -1]
    full = (stats.exit_layers == 4).nonzero().squeeze(1)
    assert full.numel() > 0
    # off (default): full-depth rows are the model's own logits; on: the corrected label answer
    assert torch.equal(plain[full], ref[full])
    bias = torch.tensor(clf.label_bias[-1])
    want = torch.log_softmax(ref[full, -1][:, list(LABELS)].float() + bias, dim=-1)
    torch.testing.assert_close(stats.label_logprobs[full], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(corrected[:, -1, list(LABELS)].argmax(-1), stats.answer_label)
    assert torch.equal(generated, stats.answer_token), "with the correction every row generates its answer"
    exited = (stats.exit_layers < 4).nonzero().squeeze(1)
    assert torch.equal(stats.answer_label[exited], plain_stats.answer_label[exited])


@torch.inference_mode()
def test_classify_returns_what_the_patched_model_returns():
    model = tiny_llama("sdpa")
    batch = left_padded_batch(6, 9)
    clf = _classifier(model)
    # The same prompts as token ids: a tokenizer stand-in that returns this batch's rows.
    rows = [batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist() for r in range(6)]
    prompts = [" ".join(map(str, r)) for r in rows]
    tok = _IdsTokenizer()
    got = adainfer.classify(model, tok, prompts, clf, batch_size=4, correct_full_depth=True)
    with adainfer.patched(model, clf, AdaInferConfig(correct_full_depth=True)) as handle:
        singles = []
        for r in rows:
            model(input_ids=torch.tensor([r]))
            singles.append((int(handle.last_stats.answer_label[0]), int(handle.last_stats.exit_layers[0])))
    assert [(int(a), int(b)) for a, b in zip(got.label_index, got.exit_layers, strict=True)] == singles
    assert got.labels == [clf.label_words[i] for i in got.label_index]
    np.testing.assert_allclose(got.probs.sum(1), 1.0, rtol=1e-5)
    # layers saved = 1 - mean exit / L, from the exits the patched model recorded row by row
    assert len(got) == 6 and got.num_layers == 4
    assert got.layers_saved == pytest.approx(1.0 - np.mean([k for _, k in singles]) / 4, abs=1e-12)
    assert any(k < 4 for _, k in singles), "the test needs exits: layers_saved would be 0 by any count"


def test_classify_refuses_bad_arguments():
    model = tiny_llama("sdpa")
    clf = _classifier(model)
    with pytest.raises(TypeError, match="not one string"):
        adainfer.classify(model, _IdsTokenizer(), "1 2 3", clf)
    with pytest.raises(ValueError, match="batch_size"):
        adainfer.classify(model, _IdsTokenizer(), ["1 2 3"], clf, batch_size=0)
    with pytest.raises(ValueError, match=r"\{text\}"):
        adainfer.classify(model, _IdsTokenizer(), ["1 2 3"], clf, prompt="no placeholder")


class _IdsTokenizer:
    """Tokenizes '12 7 301' into [12, 7, 301]; pads on the left with 0."""

    padding_side = "left"
    pad_token_id = 0

    def __call__(self, texts, return_tensors="pt", padding=True):
        seqs = [[int(t) for t in s.split()] for s in texts]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("mode", ["compact", "mask"])
@torch.inference_mode()
def test_forced_exit_answers_are_the_logit_lens_from_either_read_out(mode):
    """A policy decided without signals (ForcedExits) leaves its exits' full-vocabulary answers to
    the model's own logits (the LM head on the frozen state, one pass); through the bare decoder
    they are decoded on first read. Both give the logit lens of the exit layer."""
    from adainfer import ForcedExits
    from tiny_models import decode_hidden

    model = tiny_llama("sdpa")
    batch = left_padded_batch(4, 9)
    hidden = model(**batch, output_hidden_states=True).hidden_states
    exits = [2, 4, 1, 3]
    want = []
    for row, k in enumerate(exits):
        logits = decode_hidden(model, hidden[k][row, -1]) if k < 4 else model(**batch).logits[row, -1]
        want.append(torch.softmax(logits.float(), -1).max(-1))
    with adainfer.patched(model, ForcedExits(exits), AdaInferConfig(mode=mode)) as handle:
        model(**batch)
        via_logits = handle.last_stats
        model.model(**batch)
        via_decoder = handle.last_stats
        assert via_decoder._pending, "the bare decoder's exits are decoded on first read, not in the pass"
    for stats in (via_logits, via_decoder):
        for row, k in enumerate(exits):
            if stats is via_decoder and k == 4:
                assert int(stats.answer_token[row]) == -1, "full depth through the bare decoder: unknown"
                continue
            assert int(stats.answer_token[row]) == int(want[row].indices), (row, k)
            torch.testing.assert_close(stats.answer_prob[row], want[row].values, rtol=1e-5, atol=1e-6)
