"""The patch on the bundled real model (SmolLM2-135M, 30 layers): bit-identity without exits and
the logit-lens semantics of forced exits."""

import adainfer
import pytest
import torch
from adainfer import AdaInferConfig, ForcedExits, NeverExit

PROMPTS = [
    "The capital of France is",
    "I loved this movie because",
    "def fibonacci(n):",
    "Tweet: worst service ever, never again.\nSentiment:",
]


@pytest.fixture(scope="module")
def bundled():
    from adainfer.app.loading import load_bundled

    return load_bundled()


@pytest.mark.slow
@torch.inference_mode()
def test_bundled_model_bit_identical_without_exits(bundled):
    model, tok = bundled.model, bundled.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    gen = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    ref_logits = model(**batch).logits
    ref_tokens = model.generate(**batch, **gen)
    for config in (AdaInferConfig(enabled=False), AdaInferConfig(min_layer=20, interval=3)):
        with adainfer.patched(model, NeverExit(range(1, 30)), config):
            assert torch.equal(model(**batch).logits, ref_logits)
            assert torch.equal(model.generate(**batch, **gen), ref_tokens)


@pytest.mark.slow
@torch.inference_mode()
def test_bundled_model_forced_exits(bundled):
    model, tok = bundled.model, bundled.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    hidden = model(**batch, output_hidden_states=True).hidden_states
    ref_logits = model(**batch).logits
    exits = [10, 30, 21, 5]
    with adainfer.patched(model, ForcedExits(exits)) as handle:
        logits = model(**batch).logits
    assert handle.last_stats.exit_layers.tolist() == exits
    for row, k in enumerate(exits):
        if k == 30:
            torch.testing.assert_close(logits[row], ref_logits[row], rtol=1e-4, atol=1e-4)
        else:
            expected = model.lm_head(model.model.norm(hidden[k][row, -1]))
            torch.testing.assert_close(logits[row, -1], expected, rtol=1e-4, atol=1e-4)
