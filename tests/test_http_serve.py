"""``peftkit serve``: the real server on the loopback interface, driven by the official ``openai`` client and by
plain HTTP. Every answer is checked against the same input through ``Server.predict`` / ``Server.generate`` on
a server of its own (greedy decoding), and the batcher is checked to have merged concurrent requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from peftkit.config.recipe import build_recipe
from peftkit.serve.serving import load_server
from peftkit.store.registry import Registry
from peftkit.train.training import train
from tests.conftest import REPO, free_port, make_recipe

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

SERVED = ["sentiment", "chat", "writer", "multi"]
TIMEOUT = 60.0  # seconds: a bound on every request, so a hung server fails the test instead of stalling it


def _train(tiny_dir: Path, out: Path, name: str, steps: int = 4, lr: float = 2e-2, **kwargs: Any) -> None:
    data = make_recipe(tiny_dir, out, quant="4bit", **kwargs)
    data["train"].update(max_steps=steps, eval_at_start=False, lr=lr)
    data["data"]["max_eval_samples"] = 16
    data["output"]["name"] = name
    train(build_recipe(data), echo=lambda line: None)


@pytest.fixture(scope="module")
def registry(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    out = tmp_path_factory.mktemp("http")
    llama = {"base": {"model": str(tiny_dir / "llama")}}
    _train(tiny_dir, out, "sentiment", **llama)
    _train(tiny_dir, out, "extra", **llama, train={"seed": 3})  # loaded at runtime only
    # instruction-tuned with the tokenizer's chat template; one small step, so that it still writes words
    _train(tiny_dir, out, "chat", steps=1, lr=1e-3, task="causal_lm")
    _train(tiny_dir, out, "writer", task="causal_lm", data={"train": str(tiny_dir / "text.txt")})  # plain text
    also = [{"name": "score", "train": str(tiny_dir / "reg_train.tsv"), "eval": str(tiny_dir / "reg_dev.tsv"),
             "max_train_samples": 64, "task": {"type": "regression"}}]
    _train(tiny_dir, out, "multi", **llama, data={"name": "sent", "also": also})
    return Registry(out / "adapters")


@pytest.fixture(scope="module")
def reference(registry: Registry):
    """The same adapters on a server of their own, called directly: what every HTTP answer must equal."""
    return load_server(registry, SERVED)


class Running:
    def __init__(self, app: Any, port: int):
        self.app, self.port = app, port
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def served(registry: Registry):
    from peftkit.serve.http_app import build_app

    server = load_server(registry, SERVED)
    running = Running(build_app(server, max_batch=32, max_wait_ms=5), free_port())
    running.model_server = server
    yield running
    running.stop()


@pytest.fixture
def http(served: Running):
    with httpx.Client(base_url=served.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def client(served: Running):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def _predicted(reference: Any, rows: list, model: str) -> list[dict]:
    return [{k: v for k, v in p.items() if k != "adapter"} for p in reference.predict(rows, model)]


def _same_prediction(got: dict, expected: dict) -> None:
    assert set(got) == set(expected) | {"index"}
    for key, value in expected.items():
        if isinstance(value, dict) and key != "probs":  # a multi-task adapter: one prediction per task
            _same_prediction({**got[key], "index": 0}, value)
        elif key == "probs":
            assert got[key] == pytest.approx(value, abs=1e-5)
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, abs=1e-5)
        else:
            assert got[key] == value


def _classify_ok(http: Any, reference: Any) -> None:
    """A good request, for after a bad one: the server still serves, correctly."""
    response = http.post("/v1/classify", json={"model": "sentiment", "input": ["good film"]})
    assert response.status_code == 200, response.text
    _same_prediction(response.json()["data"][0], _predicted(reference, ["good film"], "sentiment")[0])


# ---- OpenAI routes: equal to Server.generate --------------------------------------------------------------------

GENERATIONS = [("chat", "say king again"), ("writer", "say king again"), ("base", "good river")]


def test_completions_equal_server_generate(client, reference):
    for model, prompt in GENERATIONS:
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
        expected = reference.generate([prompt], model, max_new_tokens=10)[0]
        assert expected and answer.choices[0].text == expected, model  # non-empty: a meaningful comparison
        assert answer.model == model and answer.object == "text_completion"
        assert answer.usage.prompt_tokens == len(reference.prompt_ids(prompt, model))
        ids = reference.generate_ids([reference.prompt_ids(prompt, model)], model, max_new_tokens=10)[0]
        eos = reference.tokenizer.eos_token_id
        used = ids[: ids.index(eos) + 1] if eos in ids else ids
        assert answer.usage.completion_tokens == len(used)
        assert answer.choices[0].finish_reason == ("stop" if eos in ids else "length")
    several = client.completions.create(model="writer", prompt=["the film was", "good river"], max_tokens=6,
                                        temperature=0)
    assert [c.text for c in several.choices] == reference.generate(["the film was", "good river"], "writer",
                                                                   max_new_tokens=6)
    # a seed makes sampling repeatable through HTTP too: it runs alone, as Server.generate with that seed
    sampled = [client.completions.create(model="writer", prompt="the film was", max_tokens=8, temperature=1.0,
                                         seed=5).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1] == reference.generate(["the film was"], "writer", max_new_tokens=8,
                                                          temperature=1.0, seed=5)[0]


def test_chat_uses_the_adapters_layout_else_the_tokenizers_template(client, reference):
    from peftkit.serve.chat import chat_prompt_ids

    one = [{"role": "user", "content": "say king again"}]
    answer = client.chat.completions.create(model="chat", messages=one, max_tokens=10, temperature=0)
    # the instruction adapter's own training layout: exactly what Server.generate gives the same text
    assert answer.choices[0].message.content == reference.generate(["say king again"], "chat", max_new_tokens=10)[0]
    assert answer.choices[0].message.role == "assistant" and answer.object == "chat.completion"
    turns = [{"role": "system", "content": "the king"}, {"role": "user", "content": "say king"},
             {"role": "assistant", "content": "king"}, {"role": "user", "content": "again"}]
    tokenizer = reference.tokenizer
    for model in ("chat", "writer"):  # trained with the template / on plain text: the tokenizer's template
        ids = chat_prompt_ids(reference.served(model).task, tokenizer, turns)
        assert ids == list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))
        answer = client.chat.completions.create(model=model, messages=turns, max_tokens=10, temperature=0)
        expected = reference.decode(reference.generate_ids([ids], model, max_new_tokens=10)[0])
        assert answer.choices[0].message.content == expected and answer.usage.prompt_tokens == len(ids)


def test_chat_without_a_template_gets_the_plain_layout(reference):
    import copy

    from peftkit.serve.chat import chat_prompt_ids

    plain = copy.deepcopy(reference.tokenizer)
    plain.chat_template = None
    task = reference.served("chat").task
    one = [{"role": "user", "content": "say king"}]
    assert chat_prompt_ids(task, plain, one) == task.prompt_ids(plain, "say king") == \
        plain("### Instruction:\nsay king\n\n### Response:\n")["input_ids"]
    turns = one + [{"role": "assistant", "content": "king"}, {"role": "user", "content": "again"}]
    assert chat_prompt_ids(task, plain, turns) == (
        task.prompt_ids(plain, "say king") + plain("king", add_special_tokens=False)["input_ids"]
        + [plain.eos_token_id] + plain("### Instruction:\nagain\n\n### Response:\n", add_special_tokens=False)["input_ids"])


def test_streams_come_in_pieces_that_add_up_to_the_unstreamed_answer(client):
    whole = client.completions.create(model="writer", prompt="say king again", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="writer", prompt="say king again", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(pieces) >= 3, pieces  # streamed as it was generated, not in one piece at the end
    assert "".join(pieces) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": "say king again"}]
    whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="chat", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_models_lists_adapters_with_their_base_and_task_views(client, reference):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "sentiment", "chat", "writer", "multi", "multi:sent", "multi:score"}
    base = reference.description["base"]
    assert all(models[name].parent == base for name in models if name != "base")
    assert models["base"].parent is None and models["base"].root == base


# ---- /v1/classify: equal to Server.predict ----------------------------------------------------------------------

def test_classify_equals_server_predict(http, reference):
    cases = [("sentiment", ["the film was great and good", "bad awful plot"]),
             ("sentiment", [{"text": "good film", "text_pair": "the river"}]),
             ("multi", ["dull boring"]), ("multi:score", [{"text": "a good movie"}]), ("multi:sent", ["great"])]
    for model, rows in cases:
        response = http.post("/v1/classify", json={"model": model, "input": rows})
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [d["index"] for d in data] == list(range(len(rows)))
        for got, expected in zip(data, _predicted(reference, rows, model)):
            _same_prediction(got, expected)
    single = http.post("/v1/classify", json={"model": "sentiment", "input": "bad awful plot"}).json()["data"]
    _same_prediction(single[0], _predicted(reference, ["bad awful plot"], "sentiment")[0])


# ---- batching across requests -----------------------------------------------------------------------------------

def test_concurrent_requests_for_different_adapters_share_mixed_batches(served, http, client, reference):
    before = http.get("/metrics").json()["batches"]
    hook = _slowed(served.model_server, 0.05)  # a first generation keeps the model thread busy ...
    try:
        with ThreadPoolExecutor(7) as pool:
            blocker = pool.submit(client.completions.create, model="writer", prompt="king", max_tokens=30,
                                  temperature=0)
            _wait_for(http, lambda m: m["in_flight"] == 1 and m["queue_length"] == 0)
            classify = [pool.submit(http.post, "/v1/classify", json={"model": m, "input": [t]})
                        for m, t in [("sentiment", "bad awful plot"), ("multi:score", "good film")]]
            complete = [pool.submit(client.completions.create, model=m, prompt=p, max_tokens=8, temperature=0)
                        for m, p in GENERATIONS]
            chat = pool.submit(client.chat.completions.create, model="chat", max_tokens=8, temperature=0,
                               messages=[{"role": "user", "content": "good river"}])
            _wait_for(http, lambda m: m["queue_length"] == 6)  # ... while these six queue up behind it
            hook.remove()
            results = [f.result(TIMEOUT) for f in [*classify, *complete, chat]]
            assert blocker.result(TIMEOUT).choices[0].text == reference.generate(["king"], "writer",
                                                                                 max_new_tokens=30)[0]
    finally:
        hook.remove()
    for response, (model, text) in zip(results[:2], [("sentiment", "bad awful plot"), ("multi:score", "good film")]):
        _same_prediction(response.json()["data"][0], _predicted(reference, [text], model)[0])
    for answer, (model, prompt) in zip(results[2:5], GENERATIONS):
        assert answer.choices[0].text == reference.generate([prompt], model, max_new_tokens=8)[0]
    assert results[5].choices[0].message.content == reference.generate(["good river"], "chat", max_new_tokens=8)[0]
    after = http.get("/metrics").json()["batches"]

    def merged(kind: str, what: str) -> dict[int, int]:
        seen = {int(k): v - before.get(kind, {}).get(what, {}).get(k, 0) for k, v in after[kind][what].items()}
        return {k: v for k, v in seen.items() if v}

    # the two classifications in one batch of two adapters; the four generations (and the chat among them) in
    # one batch of three adapters (chat twice), beside the blocker's batch of one
    assert merged("predict", "requests") == {2: 1} and merged("predict", "adapters") == {2: 1}
    assert merged("generate", "requests") == {1: 1, 4: 1} and merged("generate", "adapters") == {1: 1, 3: 1}


def _wait_for(http: Any, condition: Any) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        metrics = http.get("/metrics").json()
        if condition(metrics):
            return metrics
        assert time.monotonic() < deadline, metrics
        time.sleep(0.01)


# ---- bad requests: OpenAI's error shape, the field named, the server still serving ---------------------------

BAD = [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", r"^model: 'nope' is not loaded"),
    ("/v1/classify", {"model": "nope", "input": "x"}, 404, "model", r"^model: 'nope' is not loaded \(loaded: "
                                                                    r"sentiment, multi, multi:sent, multi:score\)"),
    ("/v1/classify", {"model": "multi:nope", "input": "x"}, 404, "model", r"no task 'nope'; its tasks: sent, score$"),
    ("/v1/completions", b'{"model": "chat", "prompt": ', 400, "body", r"^the request body is not valid JSON"),
    ("/v1/completions", [1, 2], 400, "body", r"^body: "),
    ("/v1/completions", {"model": "chat"}, 400, "prompt", r"^prompt: required$"),
    ("/v1/completions", {"model": "chat", "prompt": " "}, 400, "prompt", r"^prompt: empty prompt$"),
    ("/v1/completions", {"model": "chat", "prompt": ["x", ""]}, 400, "prompt[1]", r"^prompt\[1\]: empty prompt$"),
    ("/v1/chat/completions", {"model": "chat", "messages": []}, 400, "messages", r"^messages: empty"),
    ("/v1/classify", {"model": "sentiment", "input": []}, 400, "input", r"^input: give a string"),
    ("/v1/classify", {"model": "sentiment", "input": ["ok", ""]}, 400, "input[1]", r"^input\[1\]: empty input$"),
    ("/v1/classify", {"model": "sentiment", "input": ["good", "good " * 40]}, 400, "input[1]",
     r"^input\[1\]: longer than the 32 tokens sentiment was trained on"),
    ("/v1/completions", {"model": "chat", "prompt": "good " * 130}, 400, "prompt", r"^prompt: \d+ tokens leave no room to generate in the model's context of 128 tokens; shorten it$"),
    ("/v1/completions", {"model": "writer", "prompt": "good", "max_tokens": 500}, 400, "max_tokens",
     r"^max_tokens: 500 new tokens after \d+ prompt tokens pass the model's context of 128; ask for at most"),
    ("/v1/completions", {"model": "sentiment", "prompt": "x"}, 400, "model", r"^model: sentiment is a classification "
                                                                             r"adapter and generates no text; use POST /v1/classify$"),
    ("/v1/chat/completions", {"model": "multi", "messages": [{"role": "user", "content": "x"}]}, 400, "model",
     r"multi_task adapter and generates no text"),
    ("/v1/classify", {"model": "chat", "input": "x"}, 400, "model", r"^model: chat is a causal_lm adapter, which "
                                                                    r"writes text; use POST /v1/completions"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "n": 2}, 400, "n", r"^n: 2 is not supported"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "logprobs": 3}, 400, "logprobs", r"^logprobs: 3 is not"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "x"}], "tools": []}, 400,
     "tools", r"^tools: unsupported parameter"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0].role", r"^messages\[0\].role: Input should be"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "temperature": 5}, 400, "temperature", r"^temperature: "),
    ("/v1/completions", {"model": "chat", "prompt": ["x", "y"], "stream": True}, 400, "prompt", r"stream one prompt"),
    ("/v1/classify", {"model": "sentiment", "input": [{"text": "x", "label": 1}]}, 400, "input[0].label",
     r"^input\[0\].label: this adapter reads text, text_pair$"),
    ("/v1/load_lora_adapter", {"lora_name": "nope"}, 404, "lora_name", r"^no adapter named 'nope'"),
    ("/v1/load_lora_adapter", {"lora_name": "../x"}, 400, "lora_name", r"^adapter name '../x' is not allowed"),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 400, "lora_name", r"^adapter 'nope' is not loaded"),
    ("/v1/nothing", {}, 404, None, r"^POST /v1/nothing: Not Found; the endpoints: /health"),
]


@pytest.mark.parametrize("path, body, status, param, message", BAD, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(BAD)])
def test_bad_request_answers_4xx_naming_the_field_and_the_server_keeps_serving(http, reference, path, body, status,
                                                                              param, message):
    import re

    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and isinstance(error["type"], str)
    assert re.search(message, error["message"]), error["message"]
    _classify_ok(http, reference)


def test_the_openai_client_sees_the_error_and_its_field(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="chat", prompt="x", n=2)
    assert raised.value.status_code == 400 and raised.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


# ---- adapters loaded and unloaded while serving -----------------------------------------------------------------

def test_load_and_unload_while_serving(http, client, registry, reference):
    extra = load_server(registry, ["extra"])
    rows = ["good film", "bad awful plot"]
    # the server has predicted before the load: on bitsandbytes' packed CPU path its 4-bit layers are packed now,
    # and loading an adapter must leave them so (peft reads the state dict, which would unpack them)
    _classify_ok(http, reference)
    assert http.post("/v1/classify", json={"model": "extra", "input": rows}).status_code == 404
    for _ in range(2):  # loaded, unloaded, and loaded again under a reused internal name
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "extra"})
        assert response.status_code == 200, response.text
        assert "extra" in {m.id for m in client.models.list().data}
        response = http.post("/v1/classify", json={"model": "extra", "input": rows})
        for got, expected in zip(response.json()["data"], _predicted(extra, rows, "extra")):
            _same_prediction(got, expected)
        _classify_ok(http, reference)  # the adapters already there are untouched
        again = http.post("/v1/load_lora_adapter", json={"lora_name": "extra"})
        assert again.status_code == 400 and again.json()["error"]["message"] == "adapter 'extra' is already loaded"
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
        gone = http.post("/v1/classify", json={"model": "extra", "input": rows})
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
        _classify_ok(http, reference)
    wrong = http.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "/elsewhere/extra"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "lora_path"
    path = str(registry.folder("extra"))  # vLLM's clients send the path: the registry's own folder is accepted
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": path}).status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200


# ---- health and metrics ---------------------------------------------------------------------------------------

def test_health_and_metrics_count_what_happened(http, reference):
    assert http.get("/health").json() == {"status": "ok", "base": reference.description["base"], "adapters": SERVED}
    before = http.get("/metrics").json()["requests"]
    http.post("/v1/classify", json={"model": "sentiment", "input": "good"})
    http.post("/v1/classify", json={"model": "sentiment", "input": "good"})
    http.post("/v1/classify", json={"model": "nope", "input": "good"})
    metrics = http.get("/metrics").json()
    counts = metrics["requests"]["/v1/classify"]
    old = before.get("/v1/classify", {})
    assert counts.get("200", 0) - old.get("200", 0) == 2 and counts.get("404", 0) - old.get("404", 0) == 1
    latency = metrics["latency"]["/v1/classify"]
    assert latency["count"] >= 3 and 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert metrics["queue_length"] == 0 and metrics["in_flight"] == 0


# ---- a client that goes away, and shutdown ---------------------------------------------------------------------

def _slowed(server: Any, seconds: float):
    """Every forward pass of ``server``'s model takes at least ``seconds``: a generation long enough to act during."""
    return server.model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


def test_a_client_gone_mid_stream_stops_its_row(served, http, reference):
    ids = reference.generate_ids([reference.prompt_ids("king", "writer")], "writer", max_new_tokens=100)[0]
    assert reference.tokenizer.eos_token_id not in ids  # unstopped, it would run all 100 steps (3 s here)
    before = http.get("/metrics").json()["abandoned_jobs"]
    hook = _slowed(served.model_server, 0.03)
    try:
        body = {"model": "writer", "prompt": "king", "max_tokens": 100, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # the first piece of text: the client goes away here
        # its row stops at the next step (a full run would be 100 slowed steps), and nothing is left running
        metrics = _wait_for(http, lambda m: m["abandoned_jobs"] > before and m["in_flight"] == 0)
    finally:
        hook.remove()
    assert metrics["queue_length"] == 0
    _classify_ok(http, reference)


def test_shutdown_finishes_the_requests_in_flight(served, reference):
    from peftkit.serve.http_app import build_app

    app = build_app(served.model_server, max_wait_ms=5)  # a second server over the same (idle) model
    running = Running(app, free_port())
    hook = _slowed(served.model_server, 0.02)
    try:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http, ThreadPoolExecutor(2) as pool:
            body = {"model": "writer", "prompt": "king", "max_tokens": 40, "temperature": 0}
            whole = pool.submit(http.post, "/v1/completions", json=body)
            streamed = pool.submit(lambda: http.post("/v1/completions", json={**body, "stream": True}).text)
            deadline = time.monotonic() + 10
            while app.state.metrics.in_flight < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            running.server.should_exit = True  # what uvicorn's SIGINT / SIGTERM handler does
            expected = reference.generate(["king"], "writer", max_new_tokens=40)[0]
            assert whole.result(TIMEOUT).json()["choices"][0]["text"] == expected
            events = [json.loads(line[6:]) for line in streamed.result(TIMEOUT).splitlines()
                      if line.startswith("data: {")]
            assert "".join(e["choices"][0]["text"] for e in events) == expected
        running.thread.join(TIMEOUT)
        assert not running.thread.is_alive() and app.state.batcher.closed
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{running.url}/health", timeout=5)
    finally:
        hook.remove()
        running.stop()


# ---- the command ------------------------------------------------------------------------------------------------

def test_serve_without_the_extra_says_which_to_install_in_one_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from peftkit.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` fails as if it were not installed
    result = CliRunner().invoke(main, ["serve", "--adapter", "sentiment", "--registry", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.splitlines() == ['Error: peftkit serve needs FastAPI and uvicorn (fastapi is not '
                                          'installed): pip install "peftkit[serve]"']


def test_serve_command_answers_and_stops_on_sigterm(registry, reference):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "peftkit", "serve", "--adapter", "sentiment", "--registry",
                                str(registry.root), "--port", str(port)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "peftkit serve did not come up"
            time.sleep(0.2)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/classify", timeout=TIMEOUT,
                              json={"model": "sentiment", "input": ["bad awful plot"]})
        _same_prediction(response.json()["data"][0], _predicted(reference, ["bad awful plot"], "sentiment")[0])
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: the process ends as SIGTERM's
        assert process.wait(TIMEOUT) == -signal.SIGTERM
        log = process.stdout.read()
        assert "Shutting down" in log and "Application shutdown complete" in log, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
