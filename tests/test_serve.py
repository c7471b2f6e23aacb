"""`scr-export serve`: the OpenAI-compatible server on 127.0.0.1, against `scr-export run`'s runtime, with bounded
request counts and times. Servers run in this process (uvicorn in a thread) except where a signal or Ray is
involved (a subprocess)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fastapi  # noqa: E402,F401  (installed by the README's test command: a failed import fails)
import openai  # noqa: E402,F401  (installed by the README's test command: a failed import fails)

import httpx  # noqa: E402

from conftest import make_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(text: str, *images, **kw) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(im)}} for im in images]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}], **kw}


class LiveServer:
    """The app on uvicorn in a thread, on 127.0.0.1 and a free port; ``url``, ``engine``, ``close()``."""

    def __init__(self, directory, **settings):
        import uvicorn

        from scr_export.serve.app import ServeSettings, create_app
        from scr_export.serve.engine import EngineSettings
        from scr_export.serve.images import ImagePolicy

        images = settings.pop("images", ImagePolicy())
        self.app = create_app(ServeSettings(engine=EngineSettings(directory=Path(directory), **settings),
                                            images=images))
        self.engine = self.app.state.engine
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server did not become ready: {self.engine.load_error}")

    def post(self, body, **kw) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=60, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def llava_dir(converted):
    return converted("llava")[0]


@pytest.fixture(scope="module")
def server(llava_dir):
    from scr_export.serve.images import ImagePolicy

    s = LiveServer(llava_dir, max_concurrency=2, queue=40, max_images=2,
                   images=ImagePolicy(max_bytes=200_000))
    yield s
    s.close()


@pytest.fixture(scope="module")
def runtime(llava_dir):
    from runtimes.registry import open_runtime

    return open_runtime(llava_dir)


def run_like_cli(runtime, images, prompt, max_new_tokens, **kw) -> str:
    """What `scr-export run` prints for this request (same calls as the CLI's run command)."""
    res = runtime.generate(runtime.encode([list(images)], [prompt]), max_new_tokens=max_new_tokens, **kw)
    return res.texts[0]


def test_the_openai_client_talks_to_the_server_plain_and_streamed(server, runtime):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    image = make_image(120, 90, seed=4)
    messages = chat("What is in the picture?", image)["messages"]
    plain = client.chat.completions.create(model="llava", messages=messages, max_tokens=12)
    text = plain.choices[0].message.content
    assert text == run_like_cli(runtime, [image], "What is in the picture?", 12)
    assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens > 64  # 64 image tokens + text
    assert plain.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="llava", messages=messages, max_tokens=12, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text and len(chunks) >= 3
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    models = client.models.list()
    assert [m.id for m in models.data] == ["llava"]


def test_scr_options_per_request_match_run_with_the_same_settings(server, runtime):
    image = make_image(100, 100, seed=5)
    off = server.post(chat("Describe.", image, max_tokens=8, scr={"enabled": False})).json()
    assert off["choices"][0]["message"]["content"] == run_like_cli(runtime, [image], "Describe.", 8, scr=False)
    k2 = server.post(chat("Describe.", image, max_tokens=8, scr={"k": 2, "lambda": 1.3})).json()
    config = runtime.config.replace(k=2, lam=1.3)
    assert k2["choices"][0]["message"]["content"] == run_like_cli(runtime, [image], "Describe.", 8, config=config)
    # the layer range is baked into ONNX graphs: another one is refused, naming the fix
    r = server.post(chat("Describe.", image, max_tokens=8, scr={"layers": [0, 2]}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "scr" and "convert again" in r.text


def test_sampling_is_seeded_and_greedy_stays_the_default(server):
    image = make_image(100, 80, seed=6)
    a = server.post(chat("Say something.", image, max_tokens=10, temperature=1.0, top_p=0.9, seed=7)).json()
    b = server.post(chat("Say something.", image, max_tokens=10, temperature=1.0, top_p=0.9, seed=7)).json()
    c = server.post(chat("Say something.", image, max_tokens=10, temperature=1.0, top_p=0.9, seed=8)).json()
    greedy = server.post(chat("Say something.", image, max_tokens=10)).json()
    text = lambda r: r["choices"][0]["message"]["content"]  # noqa: E731
    assert text(a) == text(b)
    assert len({text(a), text(c), text(greedy)}) >= 2  # a random tiny model's distribution is nearly flat


def test_stop_strings_cut_the_answer_and_end_it(server, runtime):
    image = make_image(120, 90, seed=4)
    full = run_like_cli(runtime, [image], "What is in the picture?", 24)
    stop = full[5:7]
    assert stop and full.find(stop) >= 1
    r = server.post(chat("What is in the picture?", image, max_tokens=24, stop=[stop])).json()
    assert r["choices"][0]["message"]["content"] == full[: full.find(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("case", ["malformed_json", "not_an_image", "image_too_large", "beyond_context",
                                  "unknown_scr_option", "max_tokens_zero", "too_many_images", "bad_base64",
                                  "remote_url", "local_path", "multi_turn", "bad_temperature"])
def test_bad_requests_get_a_4xx_json_error_naming_the_problem_and_the_server_keeps_serving(case, server):
    image = make_image(64, 64, seed=1)
    noisy = __import__("PIL.Image", fromlist=["Image"]).fromarray(
        np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8))
    bodies = {
        "not_an_image": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}},
            {"type": "text", "text": "hi"}]}]},
        "bad_base64": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}, {"type": "text", "text": "x"}]}]},
        "image_too_large": chat("hi", noisy),
        "beyond_context": chat("hi", image, max_tokens=5000),
        "unknown_scr_option": chat("hi", image, scr={"strength": 2}),
        "max_tokens_zero": chat("hi", image, max_tokens=0),
        "too_many_images": chat("hi", image, image, image),
        "remote_url": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}, {"type": "text", "text": "x"}]}]},
        "local_path": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(ROOT / "examples" / "red_car.png")}},
            {"type": "text", "text": "x"}]}]},
        "multi_turn": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "user", "content": "c"}]},
        "bad_temperature": chat("hi", image, temperature=5),
    }
    expect = {"malformed_json": ("invalid_json", "JSON"), "not_an_image": ("invalid_image", "not an image"),
              "bad_base64": ("invalid_image", "base64"), "image_too_large": ("image_too_large", "limit"),
              "beyond_context": ("context_length_exceeded", "exceed"), "unknown_scr_option": ("invalid_request",
              "scr.strength"), "max_tokens_zero": ("invalid_max_tokens", "max_tokens"),
              "too_many_images": ("too_many_images", "at most 2"), "remote_url": ("remote_url_refused", "remote"),
              "local_path": ("local_file_refused", "--allow-local-files"),
              "multi_turn": ("unsupported_conversation", "one user message"),
              "bad_temperature": ("invalid_sampling", "temperature")}
    if case == "malformed_json":
        r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=30,
                       headers={"Content-Type": "application/json"})
    else:
        r = server.post(bodies[case])
    code, words = expect[case]
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["code"] == code and words in err["message"], err
    ok = server.post(chat("Still there?", image, max_tokens=2))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_32_concurrent_requests_each_get_the_sequential_answer(server):
    images = [make_image(96, 72, seed=s) for s in range(4)]
    prompts = ["What is it?", "Describe the colours.", "Where is the object?", "Count the shapes."]
    sequential = [server.post(chat(p, im, max_tokens=6)).json()["choices"][0]["message"]["content"]
                  for p, im in zip(prompts, images)]
    jobs = [(i % 4) for i in range(32)]
    with cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: server.post(chat(prompts[i], images[i], max_tokens=6)), jobs))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200][:2]
    assert [r.json()["choices"][0]["message"]["content"] for r in answers] == [sequential[i] for i in jobs]


def test_beyond_the_queue_a_request_gets_429_at_once_not_a_timeout(llava_dir):
    s = LiveServer(llava_dir, max_concurrency=1, queue=1)
    try:
        image = make_image(64, 64, seed=2)
        held = [s.engine.admit() for _ in range(2)]  # the runtime's place and the queue's one, taken
        for h in held:
            h.__enter__()
        t0 = time.perf_counter()
        r = s.post(chat("hi", image, max_tokens=2))
        assert r.status_code == 429 and time.perf_counter() - t0 < 5
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        metrics = httpx.get(s.url + "/metrics").text
        assert "scr_queue_depth 2.0" in metrics
        for h in held:
            h.__exit__(None, None, None)
        assert s.post(chat("hi", image, max_tokens=2)).status_code == 200
        # a burst against the real capacity (1 + 1): every answer is a 200 or a 429, none times out
        with cf.ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(lambda _: s.post(chat("hi", image, max_tokens=40)).status_code, range(12)))
        assert set(codes) <= {200, 429} and 200 in codes
    finally:
        s.close()


def _long_prompt(server, image) -> int:
    """max_tokens for a request that really runs that long (the random model never hits its end of sequence
    there): measured, not assumed."""
    r = server.post(chat("Tell a long story.", image, max_tokens=600)).json()
    assert r["choices"][0]["finish_reason"] == "length", "pick another image: this one ends early"
    return 600


def test_a_client_that_disconnects_mid_stream_leaves_no_work_running(server):
    image = make_image(80, 80, seed=9)
    n = _long_prompt(server, image)
    before = server.engine.metrics.tokens._value.get()
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + "/v1/chat/completions",
                           json=chat("Tell a long story.", image, max_tokens=n, stream=True)) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks, then hang up
            assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (server.engine._running == 0 and server.engine.idle()):
        time.sleep(0.02)
    assert server.engine._running == 0 and server.engine.idle()
    produced = server.engine.metrics.tokens._value.get() - before
    assert produced < n, f"the request ran to the end ({produced} tokens) after its client left"


def test_health_models_and_metrics(server):
    h = httpx.get(server.url + "/health").json()
    assert h == {"status": "ready", "model": "llava"}
    server.post(chat("Metrics?", make_image(64, 64), max_tokens=3))
    text = httpx.get(server.url + "/metrics").text
    for name in ("scr_requests_total", "scr_queue_depth", "scr_generated_tokens_total",
                 "scr_time_to_first_token_seconds_bucket", "scr_diagnostic_seconds_count",
                 "scr_decode_tokens_per_second_count", "scr_request_errors_total"):
        assert name in text, name


def _spawn(args, port):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scr_export.cli", "serve", *args, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready")


def test_sigterm_drains_the_request_in_flight_then_exits(llava_dir, server):
    image = make_image(80, 80, seed=9)
    n = _long_prompt(server, image)
    port = free_port()
    proc = _spawn([str(llava_dir)], port)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", url, json=chat("Tell a long story.", image, max_tokens=n, stream=True)) as r:
                lines = r.iter_lines()
                next(lines)
                proc.send_signal(signal.SIGTERM)
                rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        last = json.loads([x for x in rest if x.startswith("data: {")][-1][6:])
        assert last["choices"][0]["finish_reason"] == "length"  # it ran to its end after the signal
        # uvicorn re-raises the signal once drained: the exit status is SIGTERM's, as service managers expect
        assert proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):  # and nothing listens any more
            httpx.post(url, json=chat("hi", image, max_tokens=2), timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ray_serve_with_two_replicas_answers_like_the_plain_server(llava_dir, server):
    import ray  # noqa: E402,F401  (installed by the README's test command: a failed import fails)
    image = make_image(110, 70, seed=12)
    want = [server.post(chat(p, image, max_tokens=6)).json()["choices"][0]["message"]["content"]
            for p in ("One?", "Two?", "Three?", "Four?")]
    port = free_port()
    proc = _spawn([str(llava_dir), "--ray", "--replicas", "2", "--host", "127.0.0.1"], port)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with cf.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda p: httpx.post(url, json=chat(p, image, max_tokens=6), timeout=120),
                                ["One?", "Two?", "Three?", "Four?"] * 2))
        assert [r.status_code for r in got] == [200] * 8, [r.text for r in got]
        assert [r.json()["choices"][0]["message"]["content"] for r in got] == want * 2
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_gguf_directory_serves_what_run_prints(gguf_dir):
    """The server reaches llama.cpp through the same runtime interface: the same tokens as `scr-export run`, plain
    and streamed, with SCR on and off."""
    import llama_cpp  # noqa: E402,F401  (installed by the README's test command: a failed import fails)
    from runtimes.registry import open_runtime

    out, _ = gguf_dir("qwen2_vl", "q8_0")
    image = make_image(112, 84, seed=3)
    runtime = open_runtime(out)
    s = LiveServer(out)
    try:
        for scr in (True, False):
            want = run_like_cli(runtime, [image], "What is it?", 8, scr=scr)
            r = s.post(chat("What is it?", image, max_tokens=8, scr={"enabled": scr})).json()
            assert r["choices"][0]["message"]["content"] == want
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60,
                          json=chat("What is it?", image, max_tokens=8, stream=True)) as resp:
            deltas = [json.loads(x[6:])["choices"][0]["delta"].get("content") or "" for x in resp.iter_lines()
                      if x.startswith("data: {")]
        assert "".join(deltas) == run_like_cli(runtime, [image], "What is it?", 8)
    finally:
        s.close()


def _readme_block(language: str, marker: str) -> str:
    section = (ROOT / "README.md").read_text().split("## Serving")[1].split("\n## ")[0]
    blocks = [b.split("\n", 1)[1] for b in section.split("```")[1::2] if b.startswith(language + "\n")]
    return next(b for b in blocks if marker in b)


def test_the_readmes_curl_and_openai_examples_run_as_written(llava_dir, runtime):
    """The Serving section's two examples, run against a server of the directory `convert` made (port swapped)."""
    from scr_export.processing import load_image

    s = LiveServer(llava_dir)
    try:
        assert Path(llava_dir).name == "llava"  # the examples' model id
        port = lambda text: text.replace("127.0.0.1:8000", f"127.0.0.1:{s.port}")  # noqa: E731
        curl = subprocess.run(["bash", "-c", port(_readme_block("bash", "curl"))], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert curl.returncode == 0, curl.stderr
        answer = json.loads(curl.stdout)["choices"][0]["message"]["content"]
        client = subprocess.run([sys.executable, "-c", port(_readme_block("python", "OpenAI("))], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        want = run_like_cli(runtime, [load_image(ROOT / "examples" / "red_car.png")], "What is the red object?", 16,
                            config=runtime.config.replace(lam=1.1))
        assert answer == want and client.stdout == want + "\n"
    finally:
        s.close()


def test_serve_refuses_bad_flags_and_directories_before_listening(llava_dir, tmp_path):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "scr_export.cli", "serve", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    r = serve(str(tmp_path / "nothing"), "--port", str(free_port()))
    assert r.returncode == 2 and "fix:" in r.stderr
    r = serve(str(llava_dir), "--max-concurrency", "0")
    assert r.returncode == 2 and "--max-concurrency 0 is below 1" in r.stderr


@pytest.mark.parametrize("family, kind", [("llava", "onnx"), ("qwen2_vl", "onnx"), ("qwen2_vl", "gguf")])
def test_a_text_only_chat_is_answered_as_the_pytorch_model_answers_it(family, kind, converted, gguf_dir):
    """No image: SCR has nothing to edit, and the answer is the model's own (PyTorch, same input ids)."""
    from conftest import TINY_PRESETS, load

    from runtimes.registry import open_runtime
    from scr_export.reference import generate

    if kind == "gguf":
        import llama_cpp  # noqa: E402,F401  (installed by the README's test command: a failed import fails)
        out = gguf_dir(family, "f32")[0]
    else:
        out = converted(family)[0]
    runtime = open_runtime(out)
    inputs = runtime.encode([[]], ["Hello, who are you?"], text_only=True)
    assert not any(inputs.layouts) and "pixel_values" not in inputs.tensors
    vlm = load(TINY_PRESETS[family])
    if kind == "gguf":  # llama.cpp's Qwen2-VL deviation (RMS eps 0), mirrored as validate does
        from runtimes.llamacpp.quantize import dequantized_model
        from runtimes.llamacpp.quirks import apply_quirks

        vlm = dequantized_model(vlm, out / "model-f32.gguf", False)
        apply_quirks(vlm, "qwen2vl")
    want = generate(vlm, inputs, runtime.config, max_new_tokens=6, stop_at_eos=False)
    got = runtime.generate(inputs, max_new_tokens=6, stop_at_eos=False)
    assert got.plan.is_identity and got.tokens.tolist() == want.tokens.tolist()
    s = LiveServer(out)
    try:
        r = s.post({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hello, who are you?"}], "max_tokens": 6})
        assert r.status_code == 200, r.text
        alone = runtime.generate(runtime.encode([[]], ["Be brief.\nHello, who are you?"], text_only=True),
                                 max_new_tokens=6)
        assert r.json()["choices"][0]["message"]["content"] == alone.texts[0]
    finally:
        s.close()
