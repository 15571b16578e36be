"""A tuned lens with random (seeded) translators, shared by the lens tests: a zero-initialised
lens is the logit lens, so parity tests need one whose translators do something."""

from __future__ import annotations

import torch

from speech_lens import TunedLens


def random_tuned(model, seed: int = 11, scale: float = 0.3) -> TunedLens:
    lens = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return lens
