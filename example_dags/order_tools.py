"""Tools of the ``order_agent`` example: two read-only look-ups and one write the policy refuses.

Kept in a module of their own so that they are plain, importable Python that can be tested alone. They live
in their own registry, ``ORDER_TOOLS``; the operators refer to them by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from governed_ai.core.paths import provider_home
from governed_ai.core.tools import ToolRegistry, tool

DATA = Path(__file__).parent / "data"
ORDERS_FILE = DATA / "orders.json"
HELP_FILE = DATA / "order_help.json"

ORDER_TOOLS = ToolRegistry(name="order_agent")

# The same shape as the policy's constraint on lookup_order: with a grammar-constrained model the schema
# makes a malformed id impossible to write, and the policy refuses one from any other caller.
ORDER_ID = r"^[A-Z]{2}[0-9]{6}$"


class OrderLookup(BaseModel):
    order_id: str = Field(pattern=ORDER_ID, description="the order id, two capital letters and six digits")


class HelpSearch(BaseModel):
    query: str = Field(min_length=1, max_length=60, description="a few words to search the help articles for")


class Refund(BaseModel):
    order_id: str = Field(pattern=ORDER_ID)
    amount_eur: float = Field(gt=0, le=1000)
    reason: str = Field(default="", max_length=200)


@tool(registry=ORDER_TOOLS, description="Status, carrier, dates and items of one order, by its id.")
def lookup_order(args: OrderLookup) -> dict[str, Any]:
    orders: dict[str, Any] = json.loads(ORDERS_FILE.read_text())
    order = orders.get(args.order_id)
    if order is None:
        return {"order_id": args.order_id, "found": False}
    return {"order_id": args.order_id, "found": True, **order}


@tool(registry=ORDER_TOOLS, description="Search the customer help articles (returns, delivery, refunds).")
def search_kb(args: HelpSearch) -> list[dict[str, str]]:
    articles: list[dict[str, str]] = json.loads(HELP_FILE.read_text())
    words = set(re.findall(r"[a-z]{3,}", args.query.lower()))

    def score(article: dict[str, str]) -> int:
        return len(words & set(re.findall(r"[a-z]{3,}", f"{article['title']} {article['text']}".lower())))

    ranked = sorted(articles, key=score, reverse=True)
    return [a for a in ranked[:2] if score(a) > 0] or ranked[:1]


def refunds_file() -> Path:
    return provider_home() / "outputs" / "order_agent" / "refunds.jsonl"


@tool(registry=ORDER_TOOLS, side_effects=True, description="Refund money to the customer for an order.")
def issue_refund(args: Refund) -> dict[str, Any]:
    # The policy grants this tool to no example task: this line is what governance keeps from running.
    path = refunds_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(args.model_dump()) + "\n")
    return {"refunded": True, **args.model_dump()}
