"""One chokepoint: exactly one module of the package talks to a model or embedding endpoint.

Read from the source (AST), so a second path cannot hide behind an alias or a lazy import: only
``governed_ai/core/transport.py`` may build an SDK client, call its chat/embeddings APIs or send raw HTTP to
an endpoint. ``retry.py`` may import the SDK only for its exception types.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "governed_ai"
TRANSPORT = PACKAGE / "core" / "transport.py"
# Modules that may import the SDK, and what for.
# The gateway builds SDK clients for code the provider does not write (@task code, pydantic-ai): clients
# whose only transport is the governed client, never the network (checked below).
GATEWAY = PACKAGE / "core" / "openai_gateway.py"
SDK_IMPORTERS = {
    TRANSPORT: "the transport",
    PACKAGE / "core" / "retry.py": "exception types only",
    GATEWAY: "SDK clients over the governed client",
}
HTTP_LIBRARIES = {"httpx", "httpx2", "aiohttp", "requests", "urllib3", "openai"}
# The local model's launcher polls its own server's /models until it is ready; it never sends a prompt.
HTTP_IMPORTERS = {TRANSPORT, PACKAGE / "local_model.py"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported_roots(tree: ast.AST) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def attribute_chain(node: ast.AST) -> list[str]:
    chain: list[str] = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        chain.append(node.id)
    return list(reversed(chain))


def test_only_the_transport_and_the_retry_policy_import_the_sdk():
    importers = {path for path in modules() if "openai" in imported_roots(ast.parse(path.read_text()))}
    assert importers == set(SDK_IMPORTERS), sorted(str(p.relative_to(PACKAGE)) for p in importers)


def test_only_the_transport_calls_chat_or_embeddings_or_builds_a_client():
    offenders: list[str] = []
    for path in modules():
        if path == TRANSPORT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            chain = attribute_chain(node.func)
            joined = ".".join(chain)
            if path == GATEWAY and chain[-1:] in (["OpenAI"], ["AsyncOpenAI"]):
                continue  # its clients are checked by the next test
            if (
                "completions" in chain
                or "embeddings" in chain
                or chain[-1:] in (["OpenAI"], ["AsyncOpenAI"])
                or joined.endswith("with_raw_response.create")
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {joined}")
    assert offenders == []


def test_the_gateways_sdk_clients_can_only_reach_the_governed_client():
    """Every SDK client the gateway builds gets an HTTP client whose transport is the governed one, and the
    gateway names no network transport of any HTTP library."""
    tree = ast.parse(GATEWAY.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
    }
    assert not names & {"HTTPTransport", "AsyncHTTPTransport", "DefaultAioHttpClient", "ModelTransport"}
    clients = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        chain = attribute_chain(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if chain[-1:] in (["OpenAI"], ["AsyncOpenAI"]):
            clients += 1
            http_client = keywords.get("http_client")
            assert isinstance(http_client, ast.Call), f"line {node.lineno}: an SDK client without http_client"
            assert attribute_chain(http_client.func)[-1] in ("DefaultHttpxClient", "DefaultAsyncHttpxClient")
            transport = {k.arg: k.value for k in http_client.keywords}.get("transport")
            assert isinstance(transport, ast.Call) and attribute_chain(transport.func) == ["transport_class"]
    assert clients == 2


def test_pydantic_ai_providers_are_only_built_over_a_governed_sdk_client():
    """pydantic-ai's OpenAIProvider builds its own SDK client unless given one: the package always gives it
    the gateway's."""
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and attribute_chain(node.func)[-1:] == ["OpenAIProvider"]:
                keywords = {k.arg: k.value for k in node.keywords}
                client = keywords.get("openai_client")
                assert isinstance(client, ast.Call), f"{path}:{node.lineno}"
                where = f"{path}:{node.lineno}"
                assert attribute_chain(client.func) == ["governed_async_openai_client"], where
                assert set(keywords) == {"openai_client"}, f"{path}:{node.lineno}"


def test_no_other_module_brings_its_own_http_client():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(imported_roots(ast.parse(path.read_text())) & HTTP_LIBRARIES)
        for path in modules()
        if path not in HTTP_IMPORTERS and path not in SDK_IMPORTERS
    }
    assert {name: libs for name, libs in offenders.items() if libs} == {}


def test_the_transport_really_is_where_requests_are_sent():
    source = TRANSPORT.read_text()
    assert '"/chat/completions"' in source and '"/embeddings"' in source
    assert "AsyncOpenAI(" in source
