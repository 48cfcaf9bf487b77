"""Server hardening, in-process: auth on every route of the real route table, path and Host tricks, keys,
binding rules, log injection, and a schema-driven fuzz of the request bodies (no 5xx, OpenAI errors only)."""

import json
import logging
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Mount
from starlette.testclient import TestClient

from lmforge.cli import build_parser
from lmforge.errors import LmforgeError
from lmforge.evaluation.report import load_for_inference
from lmforge.serving.app import ServedModel, create_app
from lmforge.serving.cli import settings_from_args
from lmforge.serving.guard import is_public
from lmforge.serving.security import KeyRing, RateLimiter, escape_for_log, host_header_allowed, load_api_keys
from lmforge.serving.settings import ServeSettings

KEY = "Secret-Key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app(trained_run):
    model, tokenizer, checkpoint = load_for_inference(trained_run, "cpu", prefer_finetuned=True)
    served = ServedModel(model, tokenizer, Path(trained_run), checkpoint, finetuned=False)
    settings = ServeSettings(api_keys=(KEY,), allowed_hosts=("127.0.0.1", "localhost"), rate_limit_per_minute=0,
                             max_tokens_limit=8, max_n=2, cache_size=0, feedback_file=Path(trained_run).parent / "fuzz-feedback.jsonl")
    return create_app(served, settings)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as started:
        yield started


def is_openai_error(response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)


def test_every_route_needs_a_key_except_the_allow_list(app, client):
    """Walk the app's real route table: each route, with its methods and HEAD/OPTIONS, without a key, with a
    wrong key, with the right key in the wrong case or scheme is 401; only /, /health and /static are public."""
    public, checked = set(), set()
    for route in app.routes:
        if isinstance(route, Mount):
            paths, methods = [route.path + "/index.html"], ["GET"]
        else:
            paths, methods = [re.sub(r"\{[^}]+\}", "tiny", route.path)], sorted(route.methods | {"HEAD", "OPTIONS"})
        for path in paths:
            if is_public(path):
                public.add(route.path)
                continue
            for method in methods:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY.lower()}"},
                                {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"X-Api-Key": KEY}):
                    response = client.request(method, path, headers=headers)
                    assert response.status_code == 401, (method, path, headers, response.status_code)
                    if method != "HEAD":
                        assert is_openai_error(response) and response.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
                checked.add(route.path)
    assert public == {"/", "/health", "/static"}
    assert {"/metrics", "/v1/models", "/v1/models/{model}", "/v1/chat/completions", "/v1/completions", "/v1/feedback"} <= checked
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200  # the scheme is case-insensitive


@pytest.mark.parametrize("path", ["//v1/models", "/V1/models", "/v1/models/", "/%2Fv1/models", "/v1%2Fmodels", "/v1/./models",
                                  "/v1/models%00", "/static/../v1/models", "/static/%2e%2e/v1/models", "/static//v1/models",
                                  "/health/", "/health/../v1/models", "/HEALTH", "/metrics/", "/v1/models?x=/health",
                                  "/static", "/static/"])
@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "POST"])
def test_path_tricks_do_not_bypass_auth(client, path, method):
    response = client.request(method, path)
    assert response.status_code == 401, (method, path, response.status_code)
    assert b"tiny" not in response.content


def test_host_header_tricks_get_403(client):
    for host in ["evil.example", "localhost/v1/models?", "localhost.evil.example", "127.0.0.1.nip.io", "localhost:80@evil.example",
                 "", "localhost:notaport", "[::1]"]:
        response = client.get("/health", headers={"Host": host})
        assert response.status_code == 403 and is_openai_error(response), host
        assert client.get("/v1/models", headers={**AUTH, "Host": host}).status_code == 403
    assert client.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
    assert host_header_allowed("127.0.0.1:8000", ("127.0.0.1",)) and not host_header_allowed("127.0.0.1 :8000", ("127.0.0.1",))


def test_key_ring_is_exact_and_case_sensitive(tmp_path):
    ring = KeyRing(["abcDEF123", "second"])
    assert ring.identify("abcDEF123") and ring.identify("second") and ring.identify("abcDEF123") != ring.identify("second")
    for wrong in ["abcdef123", "ABCDEF123", "abcDEF12", "abcDEF1234", " abcDEF123", "", "abcDEF123\x00"]:
        assert ring.identify(wrong) is None
    assert "abcDEF123" not in ring.identify("abcDEF123")  # the id names the key without revealing it
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nk1-from-file\n\n  k2-from-file  \n")
    assert load_api_keys(key_file, {"LMFORGE_API_KEYS": "k3, k1-from-file"}) == ["k1-from-file", "k2-from-file", "k3"]
    key_file.write_text("# nothing\n")
    with pytest.raises(LmforgeError, match="holds no keys"):
        load_api_keys(key_file, {})


def test_requests_past_the_in_flight_bound_get_503_before_their_body_is_read():
    """The guard alone, in front of an endpoint that holds each request until released: the bound on requests in
    flight (with the body limit, the bound on memory) answers the next one 503 at once, unread."""
    import asyncio

    from lmforge.serving.guard import GuardMiddleware, ServerState

    async def scenario():
        release, entered = asyncio.Event(), asyncio.Event()

        async def endpoint(scope, receive, send):  # stands for a long generation
            await receive()
            entered.set()
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})

        guard = GuardMiddleware(endpoint, ServerState(ServeSettings(api_keys=(KEY,), max_in_flight=1)))

        async def request():
            sent, body_reads = [], []

            async def receive():
                body_reads.append(1)
                return {"type": "http.request", "body": b"{}", "more_body": False}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"authorization", f"Bearer {KEY}".encode())],
                     "client": ("127.0.0.1", 1)}
            await guard(scope, receive, send)
            return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), len(body_reads)

        first = asyncio.create_task(request())
        await entered.wait()
        second = await request()
        release.set()
        return await first, second

    (first_status, _, _), (status, body, body_reads) = asyncio.run(scenario())
    assert first_status == 200 and status == 503 and body_reads == 0
    assert json.loads(body)["error"]["code"] == "server_overloaded"


def test_rate_limiter_refills_over_time():
    now = [0.0]
    limiter = RateLimiter(per_minute=2, clock=lambda: now[0])
    assert [limiter.acquire("a"), limiter.acquire("a")] == [0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(30.0) and limiter.acquire("b") == 0.0
    now[0] = 31.0
    assert limiter.acquire("a") == 0.0 and limiter.acquire("a") > 0


def serve_args(*argv):
    return build_parser().parse_args(["serve", "runs/x", *argv])


def test_binding_rules_refuse_unsafe_setups(tmp_path):
    with pytest.raises(LmforgeError, match="no API keys"):
        settings_from_args(serve_args(), environ={})
    assert settings_from_args(serve_args("--no-auth"), environ={}).api_keys == ()
    with pytest.raises(LmforgeError, match="refusing to serve without API keys on 0.0.0.0"):
        settings_from_args(serve_args("--no-auth", "--host", "0.0.0.0"), environ={})
    insecure = settings_from_args(serve_args("--no-auth", "--host", "0.0.0.0", "--insecure-bind"), environ={})
    assert insecure.api_keys == () and insecure.allowed_hosts is None
    keyed = settings_from_args(serve_args("--host", "0.0.0.0"), environ={"LMFORGE_API_KEYS": "k1,k2"})
    assert keyed.api_keys == ("k1", "k2") and keyed.allowed_hosts is None
    local = settings_from_args(serve_args(), environ={"LMFORGE_API_KEYS": "k1"})
    assert local.allowed_hosts is not None and "localhost" in local.allowed_hosts  # DNS-rebinding check on loopback
    for argv, message in [(["--max-n", "0"], "--max-n"), (["--cors-origin", "*"], "--cors-origin"), (["--port", "70000"], "--port"),
                          (["--request-timeout", "0"], "--request-timeout"), (["--max-body-bytes", "10"], "--max-body-bytes"),
                          (["--max-n", "10", "--max-queue", "4"], "--max-n")]:
        with pytest.raises(LmforgeError, match=re.escape(message)):
            settings_from_args(serve_args(*argv), environ={"LMFORGE_API_KEYS": "k1"})


def test_log_lines_cannot_be_forged(client, caplog):
    assert escape_for_log("a\r\nb\x1b[31m\u2028\x85\\") == "a\\r\\nb\\x1b[31m\\u2028\\x85\\\\"
    forged = "/v1/models%0D%0A2026-01-01T00:00:00 lmforge.serving.access 127.0.0.1 %22GET /admin%22 200%1B[2J"
    with caplog.at_level(logging.INFO, logger="lmforge.serving"):
        client.get(forged, headers=AUTH)
        client.get(forged)
        client.post("/v1/chat/completions", headers=AUTH,
                    json={"model": "x\r\nFORGED\x1b[0m", "messages": [{"role": "user", "content": "a"}]})
    lines = [record.getMessage() for record in caplog.records if record.name.startswith("lmforge.serving")]
    assert len(lines) == 3
    for line in lines:
        assert not any(char in line for char in "\r\n\x1b\x85\u2028"), line
    assert "\\r\\n2026-01-01" in lines[0] and "key=key-" in lines[0] and "key=-" in lines[1]
    assert re.search(r'"GET /v1/models\\r\\n.*" 404 [0-9.]+ms', lines[0])


def nasty_values():
    """Values of every JSON type, with the edges the limits exist for."""
    numbers = st.sampled_from([0, -1, 1, 2, 3, 7, 8, 9, 64, 10**6, 10**20, -10**20, 2**63, 0.5, -0.0, 1e308, -1e308, 2.5, 1.0000001])
    texts = st.sampled_from(["", "a", "user", "system", "<|eos|>", "<|end|><|system|>", "\x00", "\ud800", "x" * 5000, "\r\n\x1b[31m"])
    scalars = st.one_of(st.none(), st.booleans(), numbers, texts, st.floats(allow_nan=True, allow_infinity=True))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=3)),
                        max_leaves=8)


VALID_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                  "content": st.text(max_size=20)}), min_size=1, max_size=3)
VALID_PROMPTS = st.one_of(st.text(max_size=20), st.lists(st.integers(0, 500), min_size=1, max_size=8))
# A valid value for each field the schema knows (within this app's limits: max_tokens 8, n 2).
VALID_FIELDS = {
    "model": st.just("tiny"),
    "max_tokens": st.integers(1, 8),
    "n": st.integers(1, 2),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
    "seed": st.integers(0, 2**63 - 1),
    "stream": st.booleans(),
    "user": st.text(max_size=10),
}


def invalid_messages():
    roles = st.sampled_from(["tool", "", "USER", None, 1])
    contents = st.one_of(nasty_values(), st.lists(st.fixed_dictionaries({"type": st.sampled_from(["image_url", ""]),
                                                                         "text": nasty_values()}), min_size=1, max_size=2))
    message = st.one_of(st.fixed_dictionaries({"role": roles, "content": st.text(max_size=5)}),
                        st.fixed_dictionaries({"role": st.just("user"), "content": contents}),
                        st.fixed_dictionaries({"content": st.text(max_size=5)}), st.fixed_dictionaries({"role": st.just("user")}),
                        nasty_values())
    return st.one_of(st.just([]), st.lists(message, min_size=1, max_size=3), nasty_values())


@st.composite
def request_bodies(draw, content_field: str, valid_content, invalid_content):
    """A valid request (some optional fields set), then zero to two fields replaced by hostile values."""
    body = {content_field: draw(valid_content), **draw(st.fixed_dictionaries({}, optional=VALID_FIELDS))}
    fields = [content_field, *VALID_FIELDS, "max_completion_tokens", "logprobs", "top_logprobs", "echo", "stream_options",
              "presence_penalty", "frequency_penalty"]
    for field in draw(st.lists(st.sampled_from(fields), max_size=2, unique=True)):
        body[field] = draw(invalid_content if field == content_field else st.one_of(
            nasty_values(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True)))
    return body


STATUSES: list[int] = []  # of the fuzzed requests, to check that the fuzz reaches the model too


def check_response(response) -> None:
    STATUSES.append(response.status_code)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.status_code in (400, 404, 413, 422, 429), response.status_code
        assert is_openai_error(response), response.text[:300]


def encode_body(body) -> bytes:
    # allow_nan: NaN and Infinity go out as the server must refuse them; surrogates as invalid UTF-8.
    return json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


# Derandomized so that CI sees the same requests every run; LMFORGE_FUZZ_EXAMPLES=2000 LMFORGE_FUZZ_RANDOM=1 explores further.
FUZZ = settings(max_examples=int(os.environ.get("LMFORGE_FUZZ_EXAMPLES", "60")), derandomize=not os.environ.get("LMFORGE_FUZZ_RANDOM"),
                deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(body=request_bodies("messages", VALID_MESSAGES, invalid_messages()))
def test_fuzz_chat_completions(client, body):
    check_response(client.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=encode_body(body)))


@FUZZ
@given(body=request_bodies("prompt", VALID_PROMPTS, st.one_of(st.lists(st.integers(-3, 10**6), max_size=5), nasty_values(),
                                                               st.lists(st.lists(st.integers(-1, 10**4), max_size=3), max_size=3))))
def test_fuzz_completions(client, body):
    check_response(client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"}, content=encode_body(body)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000, b"\xff\xfe{}", b"null", b"[]",
                                                                b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}',
                                                                b'{"max_tokens": 1' + b"0" * 5000 + b"}"])))
def test_fuzz_raw_bodies(client, raw):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/feedback"):
        check_response(client.post(path, headers=AUTH, content=raw))


def test_after_the_fuzz_a_good_request_still_works(client):
    ten_mb = b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    response = client.post("/v1/completions", headers=AUTH, content=ten_mb)
    assert response.status_code == 413 and is_openai_error(response)
    response = client.post("/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    metrics = client.get("/metrics", headers=AUTH).text
    assert not re.search(r'status="5\d\d"', metrics), [line for line in metrics.splitlines() if 'status="5' in line]
    assert re.search(r"^lmforge_engine_requests_failed 0$", metrics, re.M), [line for line in metrics.splitlines() if "engine" in line]
    print("fuzzed statuses:", {status: STATUSES.count(status) for status in sorted(set(STATUSES))})
    assert STATUSES.count(200) >= 5 and STATUSES.count(422) >= 20  # both accepted and rejected requests were exercised
