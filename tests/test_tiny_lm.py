"""The generative example and stateful signatures: tiny_lm's ahead-of-time prefill and decode give
TensorFlow's logits for sessions at different positions in one batch; state fed back across calls
(through the session store, into a freshly opened engine) continues a session exactly; the manifest
records the state pairing; `kiln compile --state` refuses pairs that cannot be state."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest

from examples.tiny_lm import CACHE_SHAPE, CHUNK, CONTEXT, STATE, VOCAB
from runtime import cli
from runtime.engines import open_servable
from runtime.engines.base import initial_state, state_after
from runtime.errors import InvalidInput, ServableError
from runtime.manifest import MANIFEST_FILE, Signature, TensorSpec, read_manifest
from runtime.sessions import MemoryStore, servable_fingerprint

TOLERANCE = 1e-5
PROMPTS = ["Kiln fires a SavedModel into machine code once, and serves it from a thin runtime. " * 4,
           "naïve café — UTF-8 bytes are the tokens: ünïcödé ✓",
           "Hi!"]
STEPS = 10


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)


@pytest.fixture(scope="module")
def tiny_lm(examples):
    return examples["tiny_lm"]


@pytest.fixture(scope="module")
def engine(tiny_lm):
    engine = open_servable(tiny_lm.servable)
    yield engine
    engine.close()


def tensorflow_runner(saved_model):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model))

    def run(key, inputs):
        outputs = loaded.signatures[key](**{name: tf.constant(value) for name, value in inputs.items()})
        return {name: value.numpy() for name, value in outputs.items()}

    return run


def prefill(run, prompts, state):
    """Prefill every row's prompt chunk by chunk in one batch (a row with nothing left gets count 0);
    the logits after each row's last token, and the state after."""
    rows = len(prompts)
    logits = np.zeros((rows, VOCAB), np.float32)
    for start in range(0, max(map(len, prompts)), CHUNK):
        tokens, count = np.zeros((rows, CHUNK), np.int32), np.zeros(rows, np.int32)
        for row, prompt in enumerate(prompts):
            part = prompt[start:start + CHUNK]
            tokens[row, :len(part)], count[row] = part, len(part)
        outputs = run("prefill", {"tokens": tokens, "count": count, **state})
        logits = np.where(count[:, None] > 0, outputs["logits"], logits)
        state = fed_back("prefill", outputs)
    return logits, state


def fed_back(key, outputs):
    return {name: outputs[output] for name, output in STATE[key].items()}


def decode(run, tokens, state):
    outputs = run("decode", {"token": tokens, **state})
    return outputs["logits"], fed_back("decode", outputs)


def new_state(rows):
    return {"kv_cache": np.zeros((rows, *CACHE_SHAPE), np.float32), "position": np.zeros(rows, np.int32)}


def test_sessions_at_different_positions_match_tensorflow(tiny_lm, engine):
    """Three sessions prefilled in chunks (300, 58 and 3 bytes) then decoded greedily together, each at
    its own position: the compiled code's logits are TensorFlow's, step by step."""
    assert {key: sig.engine for key, sig in engine.signatures.items()} == {"prefill": "xla-aot", "decode": "xla-aot"}
    prompts = [encode(text) for text in PROMPTS]
    tensorflow = tensorflow_runner(tiny_lm.saved_model)
    ours, ours_state = prefill(engine.run, prompts, new_state(3))
    theirs, theirs_state = prefill(tensorflow, prompts, new_state(3))
    np.testing.assert_array_equal(ours_state["position"], [len(p) for p in prompts])
    worst = np.abs(ours - theirs).max()
    for _ in range(STEPS):
        tokens = ours.argmax(axis=1).astype(np.int32)  # greedy on ours; TensorFlow is fed the same tokens
        ours, ours_state = decode(engine.run, tokens, ours_state)
        theirs, theirs_state = decode(tensorflow, tokens, theirs_state)
        worst = max(worst, np.abs(ours - theirs).max())
    assert worst <= TOLERANCE, f"logits differ from TensorFlow's by up to {worst}"
    np.testing.assert_array_equal(ours_state["position"], [len(p) + STEPS for p in prompts])
    assert np.abs(ours_state["kv_cache"] - theirs_state["kv_cache"]).max() <= TOLERANCE


def test_state_fed_back_through_the_store_continues_exactly(tiny_lm, engine):
    """A session whose state goes to the session store after every call, and is read back into a
    freshly opened engine, gives bit for bit the logits of the same calls made without a pause."""
    prompt = [encode(PROMPTS[0])]
    logits, state = prefill(engine.run, prompt, new_state(1))
    uninterrupted = []
    for _ in range(STEPS):
        logits, state = decode(engine.run, logits.argmax(axis=1).astype(np.int32), state)
        uninterrupted.append(logits)

    async def resumed():
        store = MemoryStore()
        manifest = (tiny_lm.servable / MANIFEST_FILE).read_bytes()
        fingerprint = servable_fingerprint("tiny_lm", 1, manifest)
        logits, state = prefill(engine.run, prompt, new_state(1))
        version = await store.save("tenant", "session", 0, state, None, fingerprint)
        steps = []
        for _ in range(STEPS):
            fresh = open_servable(tiny_lm.servable, verify=False)
            try:
                loaded = await store.load("tenant", "session", fingerprint)
                assert loaded.version == version
                logits, state = decode(fresh.run, logits.argmax(axis=1).astype(np.int32), loaded.tensors)
            finally:
                fresh.close()
            version = await store.save("tenant", "session", version, state, None, fingerprint)
            steps.append(logits)
        await store.close()
        return steps

    for step, (want, got) in enumerate(zip(uninterrupted, asyncio.run(resumed()))):
        np.testing.assert_array_equal(got, want, err_msg=f"decode step {step}")


def test_a_session_does_not_depend_on_its_batch(engine):
    """A session decoded beside others (bucket 4, padded) gets its logits alone (bucket 1), and a row
    with nothing to prefill (count 0) keeps its state bit for bit."""
    prompts = [encode(text) for text in PROMPTS]
    _, batch_state = prefill(engine.run, prompts, new_state(3))
    tokens = np.array([7, 200, 65], np.int32)
    together, _ = decode(engine.run, tokens, batch_state)
    for row in range(3):
        alone, _ = decode(engine.run, tokens[row:row + 1], {k: v[row:row + 1] for k, v in batch_state.items()})
        np.testing.assert_allclose(alone[0], together[row], atol=1e-5, rtol=0)
    idle = engine.run("prefill", {"tokens": np.full((3, CHUNK), 9, np.int32), "count": np.array([0, 1, 0], np.int32),
                                  **batch_state})
    for row in (0, 2):
        np.testing.assert_array_equal(idle["kv_cache_out"][row], batch_state["kv_cache"][row])
    np.testing.assert_array_equal(idle["position_out"], batch_state["position"] + [0, 1, 0])


def test_manifest_records_the_state_pairing(tiny_lm, engine):
    raw = orjson.loads((tiny_lm.servable / MANIFEST_FILE).read_bytes())
    for key in ("prefill", "decode"):
        signature = engine.signature(key)
        assert signature.stateful and signature.state == STATE[key]
        assert signature.position is not None and signature.position.model_dump() == {"input": "position",
                                                                                      "capacity": CONTEXT}
        assert raw["signatures"][key]["state"] == STATE[key]
        assert signature.input("kv_cache").shape == (None, *CACHE_SHAPE)
    assert engine.signature("prefill").input("tokens").shape == (None, CHUNK)
    zeros = initial_state(engine.signature("decode"), 3)
    assert {name: (array.shape, array.dtype, array.any()) for name, array in zeros.items()} == {
        "kv_cache": ((3, *CACHE_SHAPE), np.float32, False), "position": ((3,), np.int32, False)}


def test_a_full_cache_is_refused(engine):
    """Past the capacity a call's state is garbage: state_after refuses it, naming the row."""
    state = new_state(2)
    state["position"][:] = [5, CONTEXT]
    outputs = engine.run("decode", {"token": np.zeros(2, np.int32), **state})
    with pytest.raises(InvalidInput, match=rf"at most {CONTEXT} tokens.*row\(s\) 1 to {CONTEXT + 1}"):
        state_after(engine.signature("decode"), outputs)
    state["position"][:] = [5, CONTEXT - 1]
    outputs = engine.run("decode", {"token": np.zeros(2, np.int32), **state})
    assert list(state_after(engine.signature("decode"), outputs)["position"]) == [6, CONTEXT]


def test_stateless_manifests_read_as_before(tiny_lm, tmp_path):
    """A stateless signature is written without the state fields (older Kilns read it); one whose
    state pairing does not fit its tensors is refused when the manifest is read."""
    spec = TensorSpec(name="x", dtype="float32", shape=(None, 2))
    dumped = Signature(engine="saved-model", inputs=(spec,), outputs=(spec,)).model_dump(mode="json")
    assert "state" not in dumped and "position" not in dumped
    assert Signature.model_validate(dumped).state == {}

    import shutil

    copy = tmp_path / "tiny_lm" / "1"
    shutil.copytree(tiny_lm.servable, copy)
    raw = orjson.loads((copy / MANIFEST_FILE).read_bytes())
    raw["signatures"]["decode"]["state"]["kv_cache"] = "logits"
    (copy / MANIFEST_FILE).write_bytes(orjson.dumps(raw))
    with pytest.raises(ServableError, match=r"signature 'decode': state kv_cache=logits: the input is "
                                            r"float32\[-1, 2, 2, 4, 2048, 16\] but the output is float32\[-1, 256\]"):
        read_manifest(copy)


@pytest.fixture(scope="module")
def rnn_cell(tmp_path_factory):
    """A one-step RNN-like SavedModel with outputs that fit, and do not fit, its state input `h`."""
    import tensorflow as tf

    module = tf.Module()
    module.w = tf.Variable(tf.ones((3, 4)))

    @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32, name="x"),
                                  tf.TensorSpec((None, 4), tf.float32, name="h"),
                                  tf.TensorSpec((None, 4), tf.float32, name="c")])
    def step(x, h, c):
        h_out = tf.tanh(x @ module.w + h + c)
        return {"h_out": h_out, "h_int": tf.cast(h_out, tf.int32), "h_wide": tf.concat([h_out, h_out], 1),
                "h_one": tf.reduce_mean(h_out, axis=0, keepdims=True)}  # [1, 4]: not batched like h

    path = tmp_path_factory.mktemp("rnn") / "saved_model"
    tf.saved_model.save(module, str(path), signatures={"step": step})
    return path


@pytest.mark.parametrize("declared, message", [
    ("step:h=h_int", "state h=h_int: the input is float32[-1, 4] but the output is int32[-1, 4]; state must keep "
                     "its dtype and shape, batch dimension included"),
    ("step:h=h_wide", "the input is float32[-1, 4] but the output is float32[-1, 8]"),
    ("step:h=h_one", "the input is float32[-1, 4] but the output is float32[1, 4]"),
    ("step:hidden=h_out", "state hidden=h_out: 'hidden' is not an input; the inputs are c, h, x"),
    ("step:h=h_next", "state h=h_next: 'h_next' is not an output; the outputs are h_int, h_one, h_out, h_wide"),
    ("step:h=h_out,step:c=h_out", "state c=h_out: output 'h_out' is already fed back into input 'h'"),
    ("serving_default:h=h_out", "--state names signature(s) serving_default, which are not compiled; "
                                "the signatures are step"),
    ("step:h", "--state takes SIGNATURE:INPUT=OUTPUT[,...]; 'step:h' is not of that form"),
])
def test_compile_refuses_state_that_does_not_fit(rnn_cell, tmp_path, capsys, declared, message):
    out = tmp_path / "rnn" / "1"
    assert cli.main(["compile", str(rnn_cell), str(out), "--state", declared]) == 1
    error = capsys.readouterr().err
    assert error.startswith("kiln compile: error: ") and message in error, error
    assert not out.exists()


def test_compile_refuses_a_position_that_is_not_a_count_in_the_state(rnn_cell, tmp_path, capsys):
    out = tmp_path / "rnn" / "1"
    assert cli.main(["compile", str(rnn_cell), str(out), "--state", "step:h=h_out",
                     "--state-capacity", "step:x=16"]) == 1
    assert "position input 'x' is not one of its state inputs (h)" in capsys.readouterr().err
    assert cli.main(["compile", str(rnn_cell), str(out), "--state", "step:h=h_out",
                     "--state-capacity", "step:h=16"]) == 1
    assert ("position input 'h' is float32[-1, 4]; a position is an int32 or int64 count, one per row"
            in capsys.readouterr().err)
    assert cli.main(["compile", str(rnn_cell), str(out), "--state-capacity", "step:h=lots"]) == 1
    assert "--state-capacity for step:h must be a positive number of tokens, got 'lots'" in capsys.readouterr().err
