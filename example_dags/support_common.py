"""What the support example DAGs share: the tickets, the classification schema and the instruction.

Kept out of the DAG files so that each DAG can import it without importing (and registering) another DAG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

DATA_FILE = Path(__file__).parent / "data" / "support_messages.jsonl"


class TicketClassification(BaseModel):
    """What the triage team needs first: is the customer unhappy, and what is it about."""

    sentiment: Literal["negative", "positive"] = Field(description="is the customer unhappy or happy")
    summary: str = Field(max_length=160, description="the ticket in a few words")


# Measured with SmolLM2-135M: a short, direct instruction beats category lists and few-shot examples,
# which a model this small copies into its answers. A larger model can take a richer schema.
SYSTEM_PROMPT = (
    "You read customer support tickets. Is the customer unhappy (negative) or happy (positive)? "
    "Then summarise the ticket in a few words."
)


def read_tickets() -> list[dict[str, str]]:
    return [json.loads(line) for line in DATA_FILE.read_text().splitlines() if line.strip()]
