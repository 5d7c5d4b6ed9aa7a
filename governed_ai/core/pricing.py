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

    A model with no entry is *unpriced*: its cost is reported as 0.0 and budgets in tokens still apply to
    it, but a budget with a cost limit refuses it unless the policy lets that budget count it in tokens only
    (see :class:`governed_ai.core.budget.BudgetGate`). A free model is priced explicitly with zeros.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prices: dict[str, ModelPrice] = Field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Mapping[str, float]] | None) -> PriceTable:
        return cls(prices={name: ModelPrice(**dict(price)) for name, price in (raw or {}).items()})

    def find(self, model: str) -> ModelPrice | None:
        """The price of ``model`` (an exact entry first, then the first glob that matches), or None."""
        if model in self.prices:
            return self.prices[model]
        for pattern, price in self.prices.items():
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return None

    def has_price(self, model: str) -> bool:
        """Whether ``model`` has a price (zeros count: that is an explicit "free")."""
        return self.find(model) is not None

    def price_for(self, model: str) -> ModelPrice:
        found = self.find(model)
        return found if found is not None else ModelPrice()

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        return self.price_for(model).cost(prompt_tokens, completion_tokens)


def estimate_prompt_tokens(text_chars: int) -> int:
    """A deliberately pessimistic token estimate used for budget reservations.

    Real tokenizers average ~4 characters per token on English; reserving at ~2.5 keeps the estimate an
    upper bound for most text, so a reservation is rarely smaller than the call's actual usage.
    """
    return max(1, int(text_chars / 2.5) + 8)
