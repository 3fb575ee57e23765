"""Pieces a ``generate`` call is handed in the generation tests: a per-row stopping criterion and a
streamer that records what it is sent."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer


class StopOnToken(StoppingCriteria):
    """Stops each row whose last token is ``token`` (per row: the others go on)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class Recorder(BaseStreamer):
    """Collects what ``generate`` streams (the prompt, then each step's tokens) and whether it ended."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value) -> None:
        self.chunks.append(value.detach().clone())

    def end(self) -> None:
        self.ended = True

    def same_as(self, other: Recorder) -> bool:
        return (
            self.ended == other.ended
            and len(self.chunks) == len(other.chunks)
            and all(torch.equal(a, b) for a, b in zip(self.chunks, other.chunks, strict=True))
        )
