"""The generative example and stateful signatures: tiny_lm's ahead-of-time prefill and decode give
TensorFlow's logits for sessions at different positions in one batch; both read only the filled
blocks of the cache and return only the new entries, a chunk prefilled at once gives what its tokens
decoded one at a time give, and a row's result does not depend on its batch-mates' positions; state
fed back across calls (through the session store, into a freshly opened engine) continues a session
exactly; the manifest records the state pairing; `kiln compile --state` refuses pairs that cannot
be state."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest

from examples.tiny_lm import APPENDED, CACHE_SHAPE, CHUNK, CONTEXT, STATE, VOCAB
from runtime import cli
from runtime.engines import open_servable
from runtime.errors import InvalidInput, ServableError
from runtime.manifest import MANIFEST_FILE, Signature, TensorSpec, read_manifest
from runtime.sessions import MemoryStore, servable_fingerprint
from runtime.sessions.state import initial_state, state_after

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
        state = fed_back("prefill", outputs, state)
    return logits, state


def fed_back(key, outputs, state):
    """The state after a call: each state input's paired output, or for an appended one (kv_cache)
    the state before with the output (kv_new) written at each row's position."""
    return {name: appended(state[name], outputs[output], state["position"]) if name in APPENDED[key]
            else outputs[output] for name, output in STATE[key].items()}


def appended(cache, new, position):
    """A copy of cache [B, L, 2, H, S, Dh] with new [B, L, 2, H, T, Dh] at slots position[b].. of row
    b, all T entries of every row as the runtime writes them, those past the last slot dropped."""
    cache = cache.copy()
    for row, slot in enumerate(position):
        kept = new[row, :, :, :, :max(0, CONTEXT - slot)]
        cache[row, :, :, :, slot:slot + kept.shape[3]] = kept
    return cache


def decode(run, tokens, state):
    outputs = run("decode", {"token": tokens, **state})
    return outputs["logits"], fed_back("decode", outputs, state)


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
    with nothing to prefill (count 0) changes nothing a caller sees: zero logits, the same position,
    and the same logits bit for bit from the next call, although the runtime wrote the padding
    tokens' entries past its position."""
    prompts = [encode(text) for text in PROMPTS]
    _, batch_state = prefill(engine.run, prompts, new_state(3))
    tokens = np.array([7, 200, 65], np.int32)
    together, _ = decode(engine.run, tokens, batch_state)
    for row in range(3):
        alone, _ = decode(engine.run, tokens[row:row + 1], {k: v[row:row + 1] for k, v in batch_state.items()})
        np.testing.assert_allclose(alone[0], together[row], atol=1e-5, rtol=0)
    inputs = {"tokens": np.full((3, CHUNK), 9, np.int32), "count": np.array([0, 1, 0], np.int32), **batch_state}
    idle = engine.run("prefill", inputs)
    after = state_after(engine.signature("prefill"), idle, inputs)
    np.testing.assert_array_equal(after["position"], batch_state["position"] + [0, 1, 0])
    assert not idle["logits"][[0, 2]].any() and idle["logits"][1].any()
    assert (after["kv_cache"][[0, 2]] != batch_state["kv_cache"][[0, 2]]).any()
    next_call, _ = decode(engine.run, tokens, after)
    np.testing.assert_array_equal(next_call[[0, 2]], together[[0, 2]])


def test_a_chunk_prefilled_at_once_is_its_tokens_decoded_one_at_a_time(engine):
    """Prefilling a chunk gives the logits after its last token, and the cache entries, of decoding
    its tokens one at a time: for sessions on either side of a block boundary with different counts
    (0 and a whole chunk included) in one batch, over caches holding noise before the position (the
    old tokens) and at and past it (masked)."""
    position = np.array([0, 5, 127, 128, 300], np.int32)
    count = np.array([CHUNK, 0, 1, 60, CHUNK], np.int32)
    start = {"kv_cache": np.random.default_rng(0).standard_normal((5, *CACHE_SHAPE)).astype(np.float32),
             "position": position}
    tokens = np.random.default_rng(1).integers(0, VOCAB, (5, CHUNK)).astype(np.int32)
    outputs = engine.run("prefill", {"tokens": tokens, "count": count, **start})
    assert outputs["kv_new"].shape == (5, *CACHE_SHAPE[:3], CHUNK, CACHE_SHAPE[4])
    prefilled = fed_back("prefill", outputs, start)

    decoded, logits = start, np.zeros((5, VOCAB), np.float32)
    for step in range(CHUNK):
        stepped_logits, stepped = decode(engine.run, tokens[:, step], decoded)
        going = step < count
        logits = np.where(going[:, None], stepped_logits, logits)
        decoded = {name: np.where(going.reshape(-1, *[1] * (value.ndim - 1)), stepped[name], value)
                   for name, value in decoded.items()}
    np.testing.assert_array_equal(prefilled["position"], position + count)
    np.testing.assert_array_equal(decoded["position"], position + count)
    np.testing.assert_allclose(outputs["logits"], logits, atol=TOLERANCE, rtol=0)
    assert not outputs["logits"][1].any()
    for row, filled in enumerate(position + count):  # past it, prefill wrote the padding tokens' entries
        np.testing.assert_allclose(prefilled["kv_cache"][row, :, :, :, :filled],
                                   decoded["kv_cache"][row, :, :, :, :filled], atol=TOLERANCE, rtol=0)


def test_a_row_does_not_depend_on_how_far_its_batch_mates_are(engine):
    """A row's prefill and decode are bit for bit the same beside a session 4 tokens in (one block
    of its cache read) as beside one 1900 tokens in (15 blocks): each row reads its own blocks only.
    Both calls run in the same bucket: buckets differ in their matmul kernels, so the same row alone
    in bucket 1 may differ in its last bits."""
    cache = np.random.default_rng(1).standard_normal((2, *CACHE_SHAPE)).astype(np.float32)
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, CHUNK)).astype(np.int32)
    calls = {"prefill": {"tokens": tokens, "count": np.array([50, CHUNK], np.int32)}, "decode": {"token": tokens[:, 0]}}
    for key, inputs in calls.items():
        near, far = (engine.run(key, {**inputs, "position": np.array([3, partner], np.int32), "kv_cache": cache})
                     for partner in (4, 1900))
        for name in ("logits", "kv_new", "position_out"):
            np.testing.assert_array_equal(far[name][0], near[name][0], err_msg=f"{key}: {name}")


def test_manifest_records_the_state_pairing(tiny_lm, engine):
    raw = orjson.loads((tiny_lm.servable / MANIFEST_FILE).read_bytes())
    for key in ("prefill", "decode"):
        signature = engine.signature(key)
        assert signature.stateful and signature.state == STATE[key]
        assert signature.position is not None and signature.position.to_builtins() == {"input": "position",
                                                                                      "capacity": CONTEXT}
        assert raw["signatures"][key]["state"] == STATE[key]
        assert signature.input("kv_cache").shape == (None, *CACHE_SHAPE)
        assert signature.appended == ("kv_cache",)
    assert engine.signature("prefill").input("tokens").shape == (None, CHUNK)
    zeros = initial_state(engine.signature("decode"), 3)
    assert {name: (array.shape, array.dtype, array.any()) for name, array in zeros.items()} == {
        "kv_cache": ((3, *CACHE_SHAPE), np.float32, False), "position": ((3,), np.int32, False)}


@pytest.mark.parametrize("key, call", [
    ("decode", {"token": np.zeros(2, np.int32)}),
    ("prefill", {"tokens": np.ones((2, CHUNK), np.int32), "count": np.array([3, 100], np.int32)}),
])
def test_a_full_cache_is_refused(engine, key, call):
    """Past the capacity a call's state is garbage: state_after refuses it, naming the row. Up to
    it, state_after appends kv_new at each row's position, the last slot included, and drops the
    entries past it."""
    taken = call.get("count", np.ones(2, np.int32))
    inputs = {**call, **new_state(2)}
    inputs["position"][:] = [5, CONTEXT + 1 - taken[1]]
    outputs = engine.run(key, inputs)
    with pytest.raises(InvalidInput, match=rf"at most {CONTEXT} tokens.*row\(s\) 1 to {CONTEXT + 1}"):
        state_after(engine.signature(key), outputs, inputs)
    inputs["position"][:] = [5, CONTEXT - taken[1]]
    outputs = engine.run(key, inputs)
    want = appended(inputs["kv_cache"], outputs["kv_new"], inputs["position"])
    after = state_after(engine.signature(key), outputs, inputs)
    assert list(after["position"]) == [5 + taken[0], CONTEXT]
    np.testing.assert_array_equal(after["kv_cache"], want)
    assert want[0, :, :, :, 5].any() and want[1, :, :, :, CONTEXT - 1].any()


def test_stateless_manifests_read_as_before(tiny_lm, tmp_path):
    """A stateless signature is written without the state fields (older Kilns read it); one whose
    state pairing does not fit its tensors is refused when the manifest is read."""
    spec = TensorSpec(name="x", dtype="float32", shape=(None, 2))
    dumped = Signature(engine="saved-model", inputs=(spec,), outputs=(spec,)).to_builtins()
    assert "state" not in dumped and "position" not in dumped
    assert Signature.parse(dumped).state == {}

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
