"""bench/bench_generate.py's stand-in for the bundled model (a lent GPU cannot carry its 98 MB file):
the same architecture, random weights, random token ids."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_generate import random_prompts, random_weights_model


@pytest.mark.slow
def test_random_weights_model_has_the_bundled_models_architecture(bundled):
    model = random_weights_model("meta", torch.bfloat16)
    want = bundled.model
    assert type(model) is type(want)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {name: tuple(p.shape) for name, p in want.named_parameters()}
    for key in ("rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, key) == pytest.approx(getattr(want.config, key)), key
    assert model.config.rope_parameters["rope_theta"] == want.config.rope_parameters["rope_theta"]
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training


def test_random_prompts_are_seeded_ids_without_special_tokens():
    enc = random_prompts(49152, 3, 17)
    assert enc["input_ids"].shape == (3, 17) and bool((enc["attention_mask"] == 1).all())
    assert int(enc["input_ids"].min()) >= 3 and int(enc["input_ids"].max()) < 49152
    assert torch.equal(enc["input_ids"], random_prompts(49152, 3, 17)["input_ids"])
