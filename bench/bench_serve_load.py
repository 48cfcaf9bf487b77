"""Load on `lmforge serve`: concurrent clients against a real server process, latency percentiles, errors.

    python bench/bench_serve_load.py RUN [--clients 32] [--requests 10] [--max-tokens 16] [--max-batch-size 8]

RUN is a trained run (e.g. runs/default, or runs/tiny from `lmforge run tiny`). The script starts
`lmforge serve RUN` on a free localhost port with a throwaway API key, then, with asyncio and httpx:

- 1 client sending --requests chat completions one after another (the latency of a lone user);
- --clients clients each sending --requests chat completions, all at once (non-streaming);
- the same with streaming, timing the first content token (time to first token) and the whole reply.

Every request samples (temperature 0.7, a seed per request: nothing is served from the cache) up to
--max-tokens tokens. The peer is the inference engine itself in this process with no HTTP: the same
requests, all submitted at once, so the ratio is what the HTTP layer (auth, JSON, SSE, the event-loop
bridge) costs at that load. Prints a Markdown table; the server's log goes to a temporary file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lmforge.serving.server import wait_until_serving


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def body(index: int, args, stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": f"Tell me about module number {index}."}], "max_tokens": args.max_tokens,
            "temperature": 0.7, "seed": index, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}


async def one_request(http: httpx.AsyncClient, payload: dict, headers: dict) -> dict:
    started = time.perf_counter()
    if not payload["stream"]:
        response = await http.post("/v1/chat/completions", json=payload, headers=headers)
        ok = response.status_code == 200
        tokens = response.json()["usage"]["completion_tokens"] if ok else 0
        return {"ok": ok, "status": response.status_code, "seconds": time.perf_counter() - started, "tokens": tokens}
    first_token, tokens, status = None, 0, 0
    async with http.stream("POST", "/v1/chat/completions", json=payload, headers=headers) as response:
        status = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                status = 500
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first_token is None:
                first_token = time.perf_counter() - started
    return {"ok": status == 200, "status": status, "seconds": time.perf_counter() - started, "tokens": tokens,
            "first_token": first_token}


async def load(base: str, key: str, clients: int, requests: int, args, stream: bool) -> tuple[list[dict], float]:
    headers = {"Authorization": f"Bearer {key}"}

    async def client(index: int) -> list[dict]:
        return [await one_request(http, body(index * 1000 + turn, args, stream), headers) for turn in range(requests)]

    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await one_request(http, body(-1, args), headers)  # warm-up, untimed
        started = time.perf_counter()
        results = await asyncio.gather(*(client(i) for i in range(clients)))
        return [result for per_client in results for result in per_client], time.perf_counter() - started


def engine_peer(run: Path, args, total: int) -> tuple[int, float]:
    """The same number of requests straight into an in-process engine, all at once: (tokens, seconds)."""
    from lmforge.evaluation.report import load_for_inference
    from lmforge.inference.engine import Engine
    from lmforge.inference.generate import SamplingParams
    from lmforge.tokenizer.bpe import END

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))  # as `lmforge serve` sets them
    model, tokenizer, _ = load_for_inference(run, args.device, prefer_finetuned=True)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=total + 1).start()
    end_id = tokenizer.token_id(END)

    def prompt(index):
        return [tokenizer.bos_id, *tokenizer.encode_chat(body(index, args)["messages"], add_generation_prompt=True)]

    engine.complete(prompt(-1), SamplingParams(max_new_tokens=args.max_tokens, temperature=0.7, seed=0, stop_token_ids=[end_id]))
    started = time.perf_counter()
    handles = [engine.submit(prompt(i), SamplingParams(max_new_tokens=args.max_tokens, temperature=0.7, seed=i, stop_token_ids=[end_id]))
               for i in range(total)]
    tokens = 0
    for handle in handles:
        for event in handle.events():
            pass
        tokens += event.completion_tokens
    seconds = time.perf_counter() - started
    engine.stop()
    return tokens, seconds


def row(name: str, results: list[dict], seconds: float) -> str:
    errors = sum(not result["ok"] for result in results)
    latencies = sorted(result["seconds"] * 1000 for result in results)
    tokens = sum(result["tokens"] for result in results)
    first = sorted(result["first_token"] * 1000 for result in results if result.get("first_token"))
    ttft = f"{percentile(first, 50):.0f} / {percentile(first, 95):.0f}" if first else "-"
    return (f"| {name} | {len(results)} | {errors} | {len(results) / seconds:.1f} | {tokens / seconds:.0f} | "
            f"{percentile(latencies, 50):.0f} | {percentile(latencies, 95):.0f} | {percentile(latencies, 99):.0f} | {ttft} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a trained run folder")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    key = secrets.token_hex(16)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)
    queue = max(64, args.clients * 2)
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(args.run), "--port", str(port), "--device", args.device,
                                "--max-batch-size", str(args.max_batch_size), "--max-queue", str(queue), "--rate-limit", "0"],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LMFORGE_API_KEYS": key})
    try:
        problem = wait_until_serving(base, process, timeout=180)
        if problem:
            sys.exit(f"{problem}; see {log.name}")
        lone, lone_seconds = asyncio.run(load(base, key, 1, args.requests, args, stream=False))
        many, many_seconds = asyncio.run(load(base, key, args.clients, args.requests, args, stream=False))
        streamed, streamed_seconds = asyncio.run(load(base, key, args.clients, args.requests, args, stream=True))
    finally:
        process.send_signal(signal.SIGTERM)
        exit_status = process.wait(timeout=120)
    peer_tokens, peer_seconds = engine_peer(args.run, args, args.clients * args.requests)

    print(f"`lmforge serve {args.run.name}`, max_tokens {args.max_tokens}, --max-batch-size {args.max_batch_size}, device {args.device}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; "
          f"server exit status after SIGTERM: {exit_status}\n")
    print("| load | requests | errors | requests/s | tokens/s | p50 ms | p95 ms | p99 ms | first token p50 / p95 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(row(f"1 client x {args.requests}", lone, lone_seconds))
    print(row(f"{args.clients} clients x {args.requests}", many, many_seconds))
    print(row(f"{args.clients} clients x {args.requests}, streaming", streamed, streamed_seconds))
    print(f"| peer: the engine in-process, {args.clients * args.requests} at once, no HTTP | {args.clients * args.requests} | 0 | "
          f"{args.clients * args.requests / peer_seconds:.1f} | {peer_tokens / peer_seconds:.0f} | | | | |")
    server_tokens_per_second = sum(result["tokens"] for result in many) / many_seconds
    print(f"\nserver / engine tokens/s at {args.clients} clients: {server_tokens_per_second / (peer_tokens / peer_seconds):.2f}")


if __name__ == "__main__":
    main()
