"""Benchmark (not a test): `scr-export serve` under load, one server and Ray Serve with 1 and 2 replicas.

    python benchmarks/serve_load.py [--model tiny-llava] [--clients 8] [--seconds 20] [--max-tokens 16]
                                    [--max-concurrency 1] [--targets plain,ray1,ray2]

Converts the model to ONNX once, then for each target starts the server (127.0.0.1, a free port), waits until it
is ready, and runs ``--clients`` client threads for ``--seconds`` (streamed chat completions with one image,
bounded by time and by 10 000 requests): requests/s, generated tokens/s, p50 / p99 latency and time to first
token, and 429s. The server's overhead is the median latency of one client's sequential requests over the median
time of the same request through the runtime in-process (what `scr-export run` does after loading).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MAX_REQUESTS = 10_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(image_uri: str, max_tokens: int, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri}},
                                                      {"type": "text", "text": "What is the red object?"}]}],
            "max_tokens": max_tokens, "stream": stream, "stream_options": {"include_usage": True}}


def start(directory: Path, port: int, extra: list[str]) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "scr_export.cli", "serve", str(directory), "--port", str(port),
                             *extra], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                time.sleep(1.0)  # Ray: let every replica finish loading
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not become ready")


def one_request(client, url: str, payload: dict) -> tuple[int, float, float, int]:
    """(status, latency s, time to first token s, completion tokens) of one streamed request."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with client.stream("POST", url, json=payload) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, time.perf_counter() - t0, float("nan"), 0
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return 200, time.perf_counter() - t0, ttft if ttft is not None else float("nan"), tokens


def load(url: str, payload: dict, clients: int, seconds: float) -> dict:
    import httpx

    results: list[tuple[int, float, float, int]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop():
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < stop_at:
                res = one_request(client, url, payload)
                with lock:
                    results.append(res)
                    if len(results) >= MAX_REQUESTS:
                        return
                if res[0] == 429:
                    time.sleep(0.05)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[0] == 200]
    lat = sorted(r[1] for r in ok)
    ttft = sorted(r[2] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"requests": len(ok), "rejected": len(results) - len(ok), "rps": len(ok) / wall,
            "tok_s": sum(r[3] for r in ok) / wall, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
            "ttft50": pct(ttft, 0.5), "ttft99": pct(ttft, 0.99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-concurrency", type=int, default=1)
    ap.add_argument("--targets", default="plain,ray1,ray2")
    ap.add_argument("--image", default=str(ROOT / "examples" / "red_car.png"))
    args = ap.parse_args()

    import httpx

    from runtimes.registry import open_runtime
    from scr_export.convert import convert_to_onnx
    from scr_export.processing import load_image

    work = Path(tempfile.mkdtemp(prefix="scr-serve-bench-"))
    out, _ = convert_to_onnx(args.model, work / "m", progress=lambda m: print(f"[bench] {m}", file=sys.stderr))
    image = load_image(args.image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    # the same request through the runtime in-process, as `scr-export run` runs it after loading
    runtime = open_runtime(out)

    def direct():
        runtime.generate(runtime.encode([[image]], ["What is the red object?"]), max_new_tokens=args.max_tokens)

    for _ in range(3):
        direct()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        direct()
        times.append(time.perf_counter() - t0)
    t_direct = statistics.median(times)
    del runtime

    rows = []
    for target in args.targets.split(","):
        extra = ["--max-concurrency", str(args.max_concurrency), "--queue", str(4 * args.clients)]
        if target.startswith("ray"):
            extra += ["--ray", "--replicas", target[3:] or "1"]
        port = free_port()
        proc = start(out, port, extra)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            with httpx.Client(timeout=120) as client:
                for _ in range(3):
                    one_request(client, url, body(uri, args.max_tokens, True))
                seq = sorted(one_request(client, url, body(uri, args.max_tokens, True))[1] for _ in range(20))
            res = load(url, body(uri, args.max_tokens, True), args.clients, args.seconds)
            res["overhead"] = statistics.median(seq) / t_direct
            rows.append((target, res))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"model {args.model} (ONNX, CPU), {args.clients} clients x {args.seconds:.0f} s, {args.max_tokens} tokens per "
          f"request, one image, streamed; --max-concurrency {args.max_concurrency} per server or replica; "
          f"in-process request {t_direct * 1e3:.1f} ms")
    print("| target | requests/s | tokens/s | p50 latency | p99 latency | p50 TTFT | p99 TTFT | 429s | "
          "server / in-process (1 client) |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = {"plain": "one server", "ray1": "Ray Serve, 1 replica", "ray2": "Ray Serve, 2 replicas"}
    for target, r in rows:
        print(f"| {names.get(target, target)} | {r['rps']:.1f} | {r['tok_s']:.0f} | {r['p50'] * 1e3:.0f} ms | "
              f"{r['p99'] * 1e3:.0f} ms | {r['ttft50'] * 1e3:.0f} ms | {r['ttft99'] * 1e3:.0f} ms | {r['rejected']} | "
              f"{r['overhead']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
