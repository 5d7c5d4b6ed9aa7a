"""The fault-injecting fake itself: faults at the configured rate, reproducible by seed, all kinds as the
openai SDK sees them, per-item success counts, and the subprocess mode printing its port."""

from __future__ import annotations

import asyncio
from collections import Counter

import openai
import pytest

from tests.fakes.fault_server import (
    FAULT_KINDS,
    FaultConfig,
    FaultServerProcess,
    FaultyFakeOpenAIServer,
    fault_for,
)

pytestmark = pytest.mark.reliability


def test_fault_decisions_follow_the_rate_and_the_seed():
    config = FaultConfig(fault_rate=0.2, seed=7)
    draws = [fault_for(config, f"item-{i}", 1) for i in range(5_000)]
    rate = sum(d is not None for d in draws) / len(draws)
    assert 0.18 < rate < 0.22
    assert set(Counter(d for d in draws if d)) == set(FAULT_KINDS)
    assert draws == [fault_for(config, f"item-{i}", 1) for i in range(5_000)]  # reproducible
    other_seed = [fault_for(FaultConfig(fault_rate=0.2, seed=8), f"item-{i}", 1) for i in range(5_000)]
    assert other_seed != draws
    assert {fault_for(FaultConfig(fault_rate=0.0), f"item-{i}", 1) for i in range(100)} == {None}
    with pytest.raises(ValueError, match="fault_rate"):
        FaultConfig(fault_rate=1.5)
    with pytest.raises(ValueError, match="kinds"):
        FaultConfig(kinds=("boom",))


async def call_each(base_url: str, keys: list[str], timeout: float) -> dict[str, str]:
    """One request per key (no retries); what happened to it, as the SDK reports it."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=timeout)
    bounded = asyncio.Semaphore(16)

    async def one(key: str) -> tuple[str, str]:
        async with bounded:
            return await call(key)

    async def call(key: str) -> tuple[str, str]:
        try:
            completion = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": f"Label [key={key}] please"}]
            )
            choices = getattr(completion, "choices", None)
            if not choices:
                return key, "malformed"
            return key, f"ok:{choices[0].message.content}"
        except openai.APITimeoutError:
            return key, "timeout"
        except openai.APIStatusError as error:
            retry = error.response.headers.get("retry-after-ms")
            return key, f"{error.status_code}" + (f" after {retry}ms" if retry else "")
        except ValueError:  # a body that is not JSON
            return key, "malformed"

    try:
        return dict(await asyncio.gather(*(one(k) for k in keys)))
    finally:
        await client.close()


def test_every_fault_kind_reaches_the_client_and_successes_are_counted_per_item():
    # The client timeout is far above a normal reply's 1 ms, so only held replies time out, even on a
    # loaded machine; a held reply waits for twice that.
    config = FaultConfig(latency_ms=1, fault_rate=0.5, seed=3, retry_after_s=0.25, timeout_hold_s=3.0)
    keys = [f"k{i}" for i in range(80)]
    with FaultyFakeOpenAIServer(config) as server:
        seen = asyncio.run(call_each(server.base_url, keys, timeout=1.5))
        stats = server.stats()

    expected = {k: fault_for(config, k, 1) for k in keys}
    for key, fault in expected.items():
        if fault is None:
            assert seen[key] == f"ok:positive [key={key}]"
        elif fault == "429":
            assert seen[key] == "429 after 250ms"
        elif fault == "500":
            assert seen[key] == "500"
        else:
            assert seen[key] == fault, key  # "timeout" or "malformed"
    assert stats["successes"] == {k: 1 for k, f in expected.items() if f is None}
    assert stats["attempts"] == dict.fromkeys(keys, 1)
    assert stats["chat_requests"] == 80
    assert set(stats["faults"]) == set(FAULT_KINDS)


def test_the_subprocess_mode_prints_its_port_and_serves_stats():
    with FaultServerProcess(FaultConfig(latency_ms=1, fault_rate=0.0)) as server:
        assert server.port > 0
        seen = asyncio.run(call_each(server.base_url, ["a", "b", "a"], timeout=5))
        stats = server.stats()
        server.reset_stats()
        after_reset = server.stats()
    assert seen == {"a": "ok:positive [key=a]", "b": "ok:positive [key=b]"}
    assert stats["successes"] == {"a": 2, "b": 1}
    assert after_reset["chat_requests"] == 0


def test_structured_requests_get_json_matching_their_schema_and_tokens_are_counted():
    from pydantic import BaseModel, Field

    from example_dags import order_tools
    from example_dags.support_common import TicketClassification
    from governed_ai.core.structured_output import response_format
    from governed_ai.core.tools.choice import constrained_step_model

    class Ranked(BaseModel):
        score: int = Field(gt=3, le=9)
        tags: list[str] = Field(min_length=2)
        code: str = Field(pattern=r"^(ab|cd)-[0-9]{3}$")

    tools = tuple(order_tools.ORDER_TOOLS.get(n) for n in ("lookup_order", "search_kb"))
    first_step = constrained_step_model(tools, allow_final=False, answer_schema=None)
    later_step = constrained_step_model(tools, allow_final=True, answer_schema=None, answer_max_chars=40)
    schemas = [TicketClassification, Ranked, first_step, later_step]
    with FaultyFakeOpenAIServer(FaultConfig(latency_ms=1)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        replies = {}
        for index, (model, mode) in enumerate(
            (m, mode) for m in schemas for mode in ("json_schema", "json_object")
        ):
            prompt = f"Classify [key=s{index}] please"
            completion = client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": prompt}],
                response_format=response_format(model, mode),  # type: ignore[arg-type]
            )
            replies[(model, mode)] = model.model_validate_json(completion.choices[0].message.content or "")
            assert completion.usage is not None
            assert server.stats()["tokens"][f"s{index}"] == completion.usage.total_tokens
        client.close()
    assert replies[(TicketClassification, "json_schema")].summary == "fake reply for s0"
    assert replies[(first_step, "json_object")].model_dump()["tool"] == "lookup_order"  # a tool first
    assert replies[(later_step, "json_schema")].model_dump()["tool"] == "final"  # then the answer
