"""Chooses each row's next token from its logits, with that row's own decoding parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens; `temperature` None means greedy."""

    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k filter."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature is None

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def next_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[list[int]],
) -> list[int]:
    """One token per row of `logits` ([rows, vocab], float32), as `model.generate` would choose it.

    Greedy rows take the argmax, all at once; a row with presence/frequency penalties (OpenAI's
    definition, over the tokens it generated so far) has them applied first; sampled rows go
    through temperature, top-k and top-p in the order transformers applies them, then draw.
    """
    chosen = torch.argmax(logits, dim=-1).tolist()
    for row, row_params in enumerate(params):
        if row_params.greedy and not row_params.penalised:
            continue
        scores = logits[row]
        if row_params.penalised and histories[row]:
            scores = _penalise(scores, histories[row], row_params)
        if row_params.greedy:
            chosen[row] = int(torch.argmax(scores).item())
        else:
            chosen[row] = _sample(scores, row_params, generators[row])
    return [int(token) for token in chosen]


def _penalise(scores: torch.Tensor, history: list[int], params: SamplingParams) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(history, device=scores.device), minlength=scores.shape[-1])
    counts = counts[: scores.shape[-1]].to(scores.dtype)
    return scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(scores.dtype)


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    assert params.temperature is not None
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, scores.shape[-1])
        threshold = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop the low tail whose total mass is at most 1 - top_p, always keeping the most likely token.
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[-1] = False
        drop = drop_sorted.scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probabilities = scores.softmax(dim=-1)
    return int(torch.multinomial(probabilities, num_samples=1, generator=generator).item())
