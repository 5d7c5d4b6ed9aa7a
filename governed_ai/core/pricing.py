"""Money per token: turning usage into cost, and the worst case a call can cost before it is made."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat


class ModelPrice(BaseModel):
    """USD per million tokens, the unit every public price list uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1m_tokens: NonNegativeFloat = 0.0
    output_per_1m_tokens: NonNegativeFloat = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_per_1m_tokens + completion_tokens * self.output_per_1m_tokens
        ) / 1_000_000


class PriceTable(BaseModel):
    """Prices per model name; keys may be globs (``gpt-4o*``) so dated model versions share a price.

    A model with no entry costs 0.0: a local or self-hosted model has no per-token bill, and refusing to
    run would be worse than reporting zero. Budgets in tokens still apply to it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prices: dict[str, ModelPrice] = Field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Mapping[str, float]] | None) -> PriceTable:
        return cls(prices={name: ModelPrice(**dict(price)) for name, price in (raw or {}).items()})

    def price_for(self, model: str) -> ModelPrice:
        if model in self.prices:
            return self.prices[model]
        for pattern, price in self.prices.items():
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return ModelPrice()

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        return self.price_for(model).cost(prompt_tokens, completion_tokens)


def estimate_prompt_tokens(text_chars: int) -> int:
    """A deliberately pessimistic token estimate used for budget reservations.

    Real tokenizers average ~4 characters per token on English; reserving at ~2.5 keeps the estimate an
    upper bound for most text, so a reservation is rarely smaller than the call's actual usage.
    """
    return max(1, int(text_chars / 2.5) + 8)
