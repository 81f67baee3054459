"""POST :generate on tiny_lm with sessions in a real redis-server: a session continued by another
process gives exactly what an uninterrupted run gives; concurrent writers, tenants, lost state
rebuilt from the token history, and bad requests."""

from __future__ import annotations

import asyncio
import json
import shutil

import orjson
import pytest

from runtime.app import App
from runtime.exchange import Request
from runtime.batching import BatchingParameters
from runtime.sessions.services import Sessions
from runtime.model_config import ModelConfig, ModelConfigList
from runtime.repository import Repository
from runtime.servable_cache import ServableCache
from tests.conftest import run_python

pytest_plugins = ["tests.redis_server"]
KEY = "00" * 32


@pytest.fixture(scope="module")
def models(examples, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    shutil.copytree(examples["tiny_lm"].servable, root / "tiny_lm" / "1")
    return root


def start_app(models, redis_url, monkeypatch) -> App:
    monkeypatch.setenv("KILN_SESSION_KEY", KEY)
    repository = Repository(ModelConfigList(models=(ModelConfig(name="tiny_lm", base_path=str(models / "tiny_lm")),)),
                            poll_seconds=0, cache=ServableCache(models / ".cache"))
    repository.start()
    parameters = BatchingParameters(mode="fixed", batch_timeout_micros=0)
    return App(repository, batching=lambda name: parameters, sessions=Sessions(redis_url))


def generate(app, body: dict, loop, **headers):
    response = loop.run_until_complete(app.respond(Request("POST", "/v1/models/tiny_lm:generate", headers,
                                                          orjson.dumps(body))))
    return response.status, orjson.loads(response.body), response.headers


@pytest.fixture
def served(models, redis_server, monkeypatch):
    app = start_app(models, redis_server.url, monkeypatch)
    loop = asyncio.new_event_loop()
    yield app, loop, redis_server
    loop.run_until_complete(app.sessions.close())
    loop.close()
    app.repository.stop()


def test_a_session_continued_in_another_process_matches_an_uninterrupted_run(served, models):
    app, loop, redis = served
    status, first, headers = generate(app, {"prompt": "Kiln fires ", "max_tokens": 6}, loop)
    assert status == 200 and headers["X-Kiln-Session"] == first["session"] and len(first["tokens"]) == 6
    continued = run_python(f"""
import asyncio, json, sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.test_generate import start_app, generate
class Patch:
    def setenv(self, name, value):
        import os; os.environ[name] = value
app = start_app(Path({str(models)!r}), {redis.url!r}, Patch())
loop = asyncio.new_event_loop()
print(json.dumps(generate(app, {{"prompt": "the clay", "max_tokens": 6, "session": {first["session"]!r}}}, loop)[:2]))
""")
    assert continued.returncode == 0, continued.stderr
    status, second = json.loads(continued.stdout.strip().splitlines()[-1])
    assert status == 200 and second["session"] == first["session"]
    whole = list(b"Kiln fires ") + first["tokens"] + list(b"the clay")
    status, uninterrupted, _ = generate(app, {"tokens": whole, "max_tokens": 6}, loop)
    assert uninterrupted["tokens"] == second["tokens"]
    assert uninterrupted["logprobs"] == pytest.approx(second["logprobs"], abs=1e-5)


def test_two_writers_of_one_session_one_wins_the_other_conflicts(served, monkeypatch):
    """Both requests load the session before either saves (the saves wait for both loads, so the
    race is certain however fast generation is): one wins, the other is told of the conflict."""
    app, loop, _ = served
    _, first, _ = generate(app, {"prompt": "abc", "max_tokens": 2}, loop)
    store = app.sessions.store()
    load, save, loaded, both_loaded = store.load, store.save, [], asyncio.Event()

    async def counted_load(*args, **kwargs):
        state = await load(*args, **kwargs)
        loaded.append(state.version)
        if len(loaded) == 2:
            both_loaded.set()
        return state

    async def held_save(*args, **kwargs):
        await both_loaded.wait()
        return await save(*args, **kwargs)

    monkeypatch.setattr(store, "load", counted_load)
    monkeypatch.setattr(store, "save", held_save)

    async def both():
        return await asyncio.gather(*(app.respond(Request("POST", "/v1/models/tiny_lm:generate", {}, orjson.dumps(
            {"prompt": text, "max_tokens": 3, "session": first["session"]}))) for text in ("one", "two")))

    responses = sorted(loop.run_until_complete(both()), key=lambda response: response.status)
    assert loaded == [1, 1] and [response.status for response in responses] == [200, 409]
    assert "another request advanced it first" in orjson.loads(responses[1].body)["error"]


def test_another_tenants_session_is_refused(served):
    app, loop, _ = served
    _, first, _ = generate(app, {"prompt": "mine", "max_tokens": 1}, loop, **{"x-kiln-tenant": "acme"})
    status, body, _ = generate(app, {"prompt": "x", "max_tokens": 1, "session": first["session"]}, loop,
                               **{"x-kiln-tenant": "other"})
    assert status == 403 and body["error"]


def test_lost_state_is_rebuilt_from_the_token_history(served):
    app, loop, redis = served
    _, first, _ = generate(app, {"prompt": "history ", "max_tokens": 3}, loop)
    client = redis.client()
    chunks = client.keys("*:chunk:*")
    assert chunks
    client.delete(*chunks)  # the state vanishes (evicted, say); the history stays
    status, resumed, _ = generate(app, {"prompt": "again", "max_tokens": 4, "session": first["session"]}, loop)
    whole = list(b"history ") + first["tokens"] + list(b"again")
    _, uninterrupted, _ = generate(app, {"tokens": whole, "max_tokens": 4}, loop)
    assert status == 200 and resumed["tokens"] == uninterrupted["tokens"]


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 3}, "exactly one of 'prompt'"),
    ({"prompt": "a", "tokens": [1]}, "exactly one of 'prompt'"),
    ({"tokens": [1, 999]}, "token ids must be from 0 to 255"),
    ({"prompt": "a", "max_tokens": -1}, "'max_tokens' must be"),
    ({"prompt": "a", "temperature": -1}, "'temperature' must be"),
    ({"prompt": "", "max_tokens": 2}, "the prompt is empty"),
    ({"prompt": "a", "session": "not-a-session"}, "session id"),
])
def test_bad_generate_requests(served, body, message):
    app, loop, _ = served
    status, answer, _ = generate(app, body, loop)
    assert status == 400 and message in answer["error"]


def test_streamed_tokens_arrive_as_server_sent_events_and_grpc_messages(examples, tmp_path, redis_server):
    """kiln serve on loopback: the same tokens as the whole answer, one event each, then the end;
    over gRPC the same, and a session continued there."""
    import grpc
    import httpx

    from runtime.protos import generated_module
    from tests.conftest import free_port, kiln_serve

    shutil.copytree(examples["tiny_lm"].servable, tmp_path / "tiny_lm" / "1")
    grpc_port = free_port()
    with kiln_serve(examples, tmp_path, "--redis-url", redis_server.url, "--grpc-port", str(grpc_port),
                    env={"KILN_SESSION_KEY": KEY}) as (_, url):
        whole = httpx.post(f"{url}/v1/models/tiny_lm:generate", json={"prompt": "stream ", "max_tokens": 5},
                           timeout=60).json()
        events = []
        with httpx.stream("POST", f"{url}/v1/models/tiny_lm:generate", timeout=60,
                          json={"prompt": "stream ", "max_tokens": 5, "stream": True}) as response:
            assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
            session = response.headers["x-kiln-session"]
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: "):]))
        assert [e["token"] for e in events[:-1]] == whole["tokens"]
        assert events[-1] == {"done": True, "session": session, "tokens": whole["tokens"]}
        missing = httpx.post(f"{url}/v1/models/nope:generate", json={"prompt": "x", "stream": True})
        assert missing.status_code == 404

        messages = generated_module("kiln.generation_pb2")
        stub = generated_module("kiln.generation_pb2_grpc").GenerationStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        streamed = list(stub.Generate(messages.GenerateRequest(model_name="tiny_lm", prompt="stream ", max_tokens=5),
                                      timeout=60))
        assert [m.token.id for m in streamed[:-1]] == whole["tokens"]
        done = streamed[-1].done
        assert list(done.tokens) == whole["tokens"]
        continued = list(stub.Generate(messages.GenerateRequest(model_name="tiny_lm", prompt="more", max_tokens=3,
                                                                session=done.session), timeout=60))
        uninterrupted = httpx.post(f"{url}/v1/models/tiny_lm:generate", timeout=60, json={
            "tokens": list(b"stream ") + whole["tokens"] + list(b"more"), "max_tokens": 3}).json()
        assert list(continued[-1].done.tokens) == uninterrupted["tokens"]
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(messages.GenerateRequest(model_name="tiny_lm", prompt="", max_tokens=3), timeout=60))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_prediction_cache_answers_repeats_without_the_engine_and_never_across_tenants(examples, tmp_path,
                                                                                           redis_server, monkeypatch):
    from runtime.access import Auth

    monkeypatch.setenv("KILN_SESSION_KEY", KEY)  # a shared store needs a shared key
    shutil.copytree(examples["half_plus_two"].servable, tmp_path / "half_plus_two" / "1")
    repository = Repository(ModelConfigList(models=(ModelConfig(name="half_plus_two",
                                                                base_path=str(tmp_path / "half_plus_two")),)),
                            poll_seconds=0, cache=ServableCache(tmp_path / ".cache"))
    repository.start()
    app = App(repository, auth=Auth((("acme", "k1"), ("other", "k2"))),
              sessions=Sessions(redis_server.url, prediction_cache_seconds=60))
    with repository.hold("half_plus_two") as handle:
        runs, original = [], handle.engine.run
        monkeypatch.setattr(handle.engine, "run", lambda key, inputs: runs.append(key) or original(key, inputs))
    loop = asyncio.new_event_loop()

    def predict(key: str, x: list[float]):
        response = loop.run_until_complete(app.respond(Request(
            "POST", "/v1/models/half_plus_two:predict", {"authorization": f"Bearer {key}"},
            orjson.dumps({"instances": x}))))
        return orjson.loads(response.body)["predictions"]

    try:
        assert predict("k1", [1.0, 2.0]) == [2.5, 3.0] and len(runs) == 1
        assert predict("k1", [1.0, 2.0]) == [2.5, 3.0] and len(runs) == 1  # a hit: the engine is not called
        assert predict("k2", [1.0, 2.0]) == [2.5, 3.0] and len(runs) == 2  # another tenant: a miss
        assert predict("k1", [1.0, 3.0]) == [2.5, 3.5] and len(runs) == 3  # other inputs: a miss
    finally:
        loop.run_until_complete(app.sessions.close())
        loop.close()
        repository.stop()


def test_a_stateful_signature_predicts_in_a_session(served, examples):
    """:predict on tiny_lm's decode: the request gives only the token; the state stays in the store,
    and two calls in one session give what the engine gives with the state carried by hand."""
    import numpy as np

    from runtime.engines.base import Engine
    from runtime.sessions.state import initial_state, state_after

    app, loop, _ = served

    def predict(body: dict):
        response = loop.run_until_complete(app.respond(Request("POST", "/v1/models/tiny_lm:predict", {},
                                                              orjson.dumps(body))))
        return response.status, orjson.loads(response.body), response.headers

    status, first, headers = predict({"signature_name": "decode", "instances": [65]})
    assert status == 200 and headers["X-Kiln-Session"] == first["session"]
    status, second, _ = predict({"signature_name": "decode", "instances": [66], "session": first["session"]})
    assert status == 200 and second["session"] == first["session"]
    assert set(second) == {"predictions", "session"}  # logits only: the state stays in the store
    engine = Engine.open(examples["tiny_lm"].servable)
    decode = engine.signature("decode")
    state = initial_state(decode, 1)
    for token, answer in ((65, first), (66, second)):
        inputs = {"token": np.array([token], np.int32), **state}
        outputs = engine.run("decode", inputs)
        state = state_after(decode, outputs, inputs)
        np.testing.assert_allclose(np.asarray(answer["predictions"][0]), outputs["logits"][0], rtol=1e-5, atol=1e-5)
    engine.close()
    status, refused, _ = predict({"signature_name": "decode", "instances": [65, 66]})
    assert status == 400 and "one row" in refused["error"]


def test_open_inference_protocol_sessions_by_sequence_id(examples, tmp_path, redis_server):
    """tritonclient over kiln serve: a stateful signature (chosen by the signature_name parameter)
    answers a new session's id as the response's sequence_id parameter and X-Kiln-Session; passing
    it back continues the session (the logits are the engine's with the state carried by hand), and
    sequence_end deletes it."""
    import numpy as np
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    from runtime.engines.base import Engine
    from runtime.sessions.state import initial_state, state_after
    from tests.conftest import free_port, kiln_serve

    shutil.copytree(examples["tiny_lm"].servable, tmp_path / "tiny_lm" / "1")

    def token(value: int):
        tensor = triton.InferInput("token", [1], "INT32")
        tensor.set_data_from_numpy(np.array([value], np.int32))
        return [tensor]

    decode = {"signature_name": "decode"}
    grpc_port = free_port()
    with kiln_serve(examples, tmp_path, "--redis-url", redis_server.url, "--grpc-port", str(grpc_port),
                    env={"KILN_SESSION_KEY": KEY}) as (_, url):
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        first = client.infer("tiny_lm", token(65), parameters=decode)
        session = first.get_response()["parameters"]["sequence_id"]
        assert [o["name"] for o in first.get_response()["outputs"]] == ["logits"]  # the state stays in the store
        second = client.infer("tiny_lm", token(66), sequence_id=session, parameters=decode)
        assert second.get_response()["parameters"]["sequence_id"] == session
        ended = client.infer("tiny_lm", token(67), sequence_id=session, sequence_end=True, parameters=decode)
        with pytest.raises(InferenceServerException, match="has no stored state: it expired, was deleted") as gone:
            client.infer("tiny_lm", token(68), sequence_id=session, parameters=decode)
        assert gone.value.status() == "404"
        with pytest.raises(InferenceServerException, match="session id is a string that Kiln gave") as numbered:
            client.infer("tiny_lm", token(68), sequence_id=7, parameters=decode)
        assert numbered.value.status() == "400"
        with pytest.raises(InferenceServerException, match="name one with the request parameter signature_name"):
            client.infer("tiny_lm", token(68))
        with pytest.raises(InferenceServerException, match="signature 'nope' not found"):
            client.infer("tiny_lm", token(68), parameters={"signature_name": "nope"})

        over_grpc = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        tensor = triton_grpc.InferInput("token", [1], "INT32")
        tensor.set_data_from_numpy(np.array([65], np.int32))
        opened = over_grpc.infer("tiny_lm", [tensor], parameters=decode).get_response()
        grpc_session = opened.parameters["sequence_id"].string_param
        continued = over_grpc.infer("tiny_lm", [tensor], sequence_id=grpc_session, sequence_end=True, parameters=decode)
        assert continued.get_response().parameters["sequence_id"].string_param == grpc_session
        np.testing.assert_array_equal(triton_grpc.InferResult(opened).as_numpy("logits"), first.as_numpy("logits"))
        with pytest.raises(InferenceServerException, match="has no stored state"):
            over_grpc.infer("tiny_lm", [tensor], sequence_id=grpc_session, parameters=decode)
    engine = Engine.open(examples["tiny_lm"].servable)
    signature, state = engine.signature("decode"), initial_state(engine.signature("decode"), 1)
    for value, answer in ((65, first), (66, second), (67, ended)):
        inputs = {"token": np.array([value], np.int32), **state}
        outputs = engine.run("decode", inputs)
        state = state_after(signature, outputs, inputs)
        np.testing.assert_allclose(answer.as_numpy("logits"), outputs["logits"], rtol=1e-5, atol=1e-5)
    engine.close()



def test_a_session_begun_by_predict_is_continued_by_generate_without_a_false_history(served):
    """A session begun by :predict keeps no token history; continued by :generate it still keeps
    none (a history of only the later tokens would rebuild a wrong state), so losing its state
    is an error rather than a silent rebuild."""
    app, loop, redis = served
    response = loop.run_until_complete(app.respond(Request("POST", "/v1/models/tiny_lm:predict", {}, orjson.dumps(
        {"signature_name": "decode", "instances": [65]}))))
    session = orjson.loads(response.body)["session"]
    status, continued, _ = generate(app, {"prompt": "more", "max_tokens": 2, "session": session}, loop)
    assert status == 200
    client = redis.client()
    keys = client.keys(f"*{session}*")
    assert keys and not [key for key in keys if key.endswith(b":history")]
    for key in keys:
        if b":chunk:" in key:
            client.delete(key)
    status, lost, _ = generate(app, {"prompt": "x", "max_tokens": 1, "session": session}, loop)
    assert status == 500 and "part of its state is missing" in lost["error"]
