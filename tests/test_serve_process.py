"""`lmforge serve` as a real process on a free localhost port: the official openai client (streaming and not),
a bounded concurrent load, raw-socket path and Host tricks against uvicorn itself, a client that disconnects
mid-stream, and SIGTERM under load (in-flight requests finish, new ones get 503, exit status 0)."""

import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from lmforge.serving.server import wait_until_serving

openai = pytest.importorskip("openai")

KEY = "process-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serve(run, tmp_path, *flags):
    """Start `lmforge serve RUN` with the test key; yield (base URL, process, log path); SIGTERM it at the end."""
    port = free_port()
    log_path = tmp_path / f"serve-{port}.log"
    env = {**os.environ, "LMFORGE_API_KEYS": KEY}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(run), "--port", str(port), "--device", "cpu", *flags],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        problem = wait_until_serving(base, process)
        if problem:
            pytest.fail(f"{problem}:\n{log_path.read_text()}")
        yield base, process, log_path
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    with serve(trained_run, tmp_path_factory.mktemp("serve"), "--max-batch-size", "4") as running:
        yield running


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_chat_streaming_and_not(api, server):
    assert [model.id for model in api.models.list()] == ["tiny"]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What does json.dumps do?"}]
    reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    stream = api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == reply.choices[0].finish_reason


def test_openai_client_completions_streaming_echo_and_errors(api):
    reply = api.completions.create(model="tiny", prompt="The json module", max_tokens=10, temperature=0)
    text = reply.choices[0].text
    streamed = "".join(chunk.choices[0].text for chunk in api.completions.create(model="tiny", prompt="The json module", max_tokens=10,
                                                                                  temperature=0, stream=True) if chunk.choices)
    assert streamed == text
    scored = api.completions.create(model="tiny", prompt="The json module", max_tokens=1, temperature=0, echo=True, logprobs=1)
    logprobs = scored.choices[0].logprobs
    assert scored.choices[0].text.startswith("The json module") and len(logprobs.tokens) == len(logprobs.token_logprobs)
    assert all(value <= 0 for value in logprobs.token_logprobs)
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        api.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match=r"max_tokens is 60: \d+ tokens do not fit the model's context of 64"):
        api.completions.create(model="tiny", prompt="The json module " * 3, max_tokens=60)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api.base_url, api_key=KEY.upper(), max_retries=0).models.list()


def test_bounded_concurrent_load_has_no_errors(server):
    """32 clients x 2 requests at once (the server queues 64): every one answered 200; latency percentiles printed."""
    base = server[0]

    async def client(http, index):
        latencies = []
        for turn in range(2):
            started = time.perf_counter()
            response = await http.post("/v1/chat/completions", headers=AUTH, json={
                "model": "tiny", "messages": [{"role": "user", "content": f"question {index}-{turn}"}], "max_tokens": 8,
                "temperature": 0.7, "seed": index})
            latencies.append((response.status_code, time.perf_counter() - started))
        return latencies

    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
            return [result for results in await asyncio.gather(*(client(http, i) for i in range(32))) for result in results]

    started = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - started
    statuses = [status for status, _ in results]
    latencies = sorted(seconds for _, seconds in results)
    p50, p95, p99 = (statistics.quantiles(latencies, n=100)[q - 1] for q in (50, 95, 99))
    print(f"\nload: {len(results)} requests from 32 clients in {wall:.2f} s; latency p50 {p50 * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    assert statuses == [200] * 64


def raw_status(port: int, request: bytes) -> tuple[int, bytes]:
    """Send exact bytes (no client normalises the path or the Host) and read the status and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer.partition(b"\r\n\r\n")[2]


def test_raw_path_and_host_tricks_against_uvicorn(server):
    port = int(server[0].rsplit(":", 1)[1])
    host = f"127.0.0.1:{port}".encode()
    for target in [b"//v1/models", b"/V1/models", b"/v1/models/", b"/%2Fv1/models", b"/v1%2Fmodels", b"/v1/./models",
                   b"/static/../v1/models", b"/static/%2e%2e/v1/models", b"/health/../v1/models", b"http://localhost/v1/models",
                   b"/v1/models?", b"/v1/models#x", b"/v1/models%00"]:
        for method in (b"GET", b"HEAD", b"OPTIONS"):
            status, body = raw_status(port, method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            assert status in (400, 401), (method, target, status)
            assert b'"tiny"' not in body
    # DNS rebinding: a page on another name that resolves to 127.0.0.1 sends its own name as Host.
    for bad_host in [b"evil.example", b"evil.example:" + host.split(b":")[1], b"localhost/v1/models?", b"localhost@evil.example"]:
        status, body = raw_status(port, b"GET /health HTTP/1.1\r\nHost: " + bad_host + b"\r\nConnection: close\r\n\r\n")
        assert status in (400, 403), (bad_host, status)
    status, body = raw_status(port, b"GET /v1/models HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer " + KEY.encode()
                              + b"\r\nConnection: close\r\n\r\n")
    assert status == 403 and json.loads(body)["error"]["code"] == "forbidden_host"
    assert raw_status(port, b"GET /health HTTP/1.1\r\nHost: localhost:" + host.split(b":")[1] + b"\r\nConnection: close\r\n\r\n")[0] == 200


def engine_counter(base: str, name: str) -> float:
    metrics = httpx.get(f"{base}/metrics", headers=AUTH).text
    return float(re.search(rf"^lmforge_engine_{name} (\S+)$", metrics, re.M).group(1))


def test_client_disconnect_mid_stream_cancels_the_generation(server):
    base = server[0]
    before = engine_counter(base, "requests_cancelled")

    def busy():  # keeps the engine's 4 slots full, so the stream below is still queued or decoding when it leaves
        httpx.post(f"{base}/v1/completions", headers=AUTH, json={"prompt": "The", "max_tokens": 55, "n": 8, "temperature": 0.9},
                   timeout=60)

    background = threading.Thread(target=busy)
    background.start()
    time.sleep(0.05)
    with httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", headers=AUTH, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 55, "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the stream has begun; leave
    background.join()
    deadline = time.monotonic() + 20
    while engine_counter(base, "requests_cancelled") <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_counter(base, "requests_cancelled") == before + 1


def test_log_has_one_line_per_request_and_no_forged_lines(server):
    base, _, log_path = server
    httpx.get(f"{base}/v1/models%0D%0AFORGED%20line%1B[31m", headers=AUTH)
    time.sleep(0.2)
    lines = log_path.read_text(errors="replace").splitlines()
    assert not any(line.startswith("FORGED") for line in lines)
    assert any("/v1/models\\r\\nFORGED line\\x1b[31m" in line and " 404 " in line for line in lines)
    assert not any(KEY in line for line in lines)


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(trained_run, tmp_path):
    with serve(trained_run, tmp_path, "--max-batch-size", "1", "--rate-limit", "0", "--cache-size", "0") as (base, process, log_path):
        outcomes, accepted = [], threading.Semaphore(0)
        port = int(base.rsplit(":", 1)[1])
        # A request still uploading its body when the signal comes: in flight, so the server waits for it.
        body = json.dumps({"prompt": "The json module", "max_tokens": 8, "temperature": 0}).encode()
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])

        def streaming_client(index):
            with httpx.Client(base_url=base, timeout=120) as http:
                with http.stream("POST", "/v1/chat/completions", headers=AUTH, json={
                        "messages": [{"role": "user", "content": f"tell me {index}"}], "max_tokens": 40, "temperature": 0,
                        "stream": True}) as response:
                    lines = []
                    for line in response.iter_lines():
                        if not lines:
                            accepted.release()
                        if line.startswith("data: "):
                            lines.append(line[6:])
                    outcomes.append((response.status_code, lines))

        threads = [threading.Thread(target=streaming_client, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for _ in threads:
            assert accepted.acquire(timeout=60)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = httpx.post(f"{base}/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": "late"}]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        assert process.poll() is None  # still up: the slow request is in flight
        slow.sendall(body[10:])
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
        slow.close()
        assert answer.startswith(b"HTTP/1.1 200") and b'"text_completion"' in answer
        for thread in threads:
            thread.join(timeout=120)
        assert process.wait(timeout=60) == 0, log_path.read_text()
    assert len(outcomes) == 6
    for status, lines in outcomes:
        assert status == 200 and lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        assert not any("error" in chunk for chunk in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    log = log_path.read_text()
    assert "draining" in log and "Traceback" not in log


@pytest.mark.slow
def test_lm_eval_local_completions_scores_through_the_server_as_lmforge_does(trained_run, tmp_path):
    """lm-eval's own `local-completions` backend, through the real server, gives lmforge's log-likelihoods."""
    pytest.importorskip("tenacity", reason="lm-eval's API backends need tenacity (pip install 'lm-eval[api]')")
    from lmforge.evaluation.loglikelihood import score_continuations
    from lmforge.evaluation.report import load_for_inference
    from lmforge.interop.hf import export_hf
    from test_lm_eval_adapter import ITEMS, MC_TASK, write_jsonl

    export_hf(trained_run, tmp_path / "hf")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(MC_TASK.format(path=write_jsonl(tmp_path / "mc.jsonl", ITEMS)), encoding="utf-8")
    with serve(trained_run, tmp_path, "--rate-limit", "0") as (base, _, _):
        env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
        result = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                                 f"model=tiny,base_url={base}/v1/completions,tokenizer={tmp_path / 'hf'},max_length=62",
                                 "--tasks", "lmforge_adapter_mc", "--include_path", str(tmp_path / "tasks"),
                                 "--output_path", str(tmp_path / "out"), "--log_samples"],
                                capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (samples_file,) = (tmp_path / "out").rglob("samples_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    model, tokenizer, _ = load_for_inference(trained_run, "cpu")
    for sample in samples:
        requests = [(sample["doc"]["context"], " " + choice) for choice in sample["doc"]["choices"]]
        ours = score_continuations(model, tokenizer, requests)
        theirs = [response[0] for response in sample["resps"]]  # logged as strings: ["-12.3", "False"]
        assert [float(logprob) for logprob, _ in theirs] == pytest.approx([score.logprob for score in ours], abs=1e-4)
        assert [greedy == "True" for _, greedy in theirs] == [score.is_greedy for score in ours]
