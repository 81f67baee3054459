"""Appended state (`kiln compile --state-append`): a signature whose output is only the entries a
call adds to a state input, which Kiln writes at each row's position. Checked on a small cache-like
SavedModel compiled ahead of time: the manifest records it, state_after writes each row's entries at
its own position (and nothing past the capacity), and declarations that cannot be appended are
refused naming what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import cli
from runtime.engines import open_servable
from runtime.sessions.state import initial_state, state_after
from runtime.errors import InvalidInput
from runtime.table import render

CAPACITY = 8


@pytest.fixture(scope="module")
def counter(tmp_path_factory):
    """step(x [B], position [B], log [B, 3, CAPACITY]): it appends x (three times, one per channel) to
    its log and answers the sum of what the log held before; `log_whole` is the log rewritten whole."""
    import tensorflow as tf

    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.float32, name="x"),
                                  tf.TensorSpec((None,), tf.int32, name="position"),
                                  tf.TensorSpec((None, 3, CAPACITY), tf.float32, name="log")])
    def step(x, position, log):
        entry = tf.tile(x[:, None, None], [1, 3, 1])
        return {"total": tf.reduce_sum(log, axis=[1, 2]), "entry": entry, "position_out": position + 1,
                "log_whole": log + 0.0, "entry_int": tf.cast(entry, tf.int32),
                "entries_all": tf.tile(entry, [1, 1, CAPACITY])}

    path = tmp_path_factory.mktemp("counter") / "saved_model"
    tf.saved_model.save(module, str(path), signatures={"step": step})
    return path


STATE = ["--state", "step:log=entry,step:position=position_out", "--state-capacity", f"step:position={CAPACITY}"]


@pytest.fixture(scope="module")
def servable(counter, tmp_path_factory):
    out = tmp_path_factory.mktemp("servables") / "counter" / "1"
    assert cli.main(["compile", str(counter), str(out), "--batch-sizes", "1,4", "--engine", "xla-aot", *STATE,
                     "--state-append", "step:log"]) == 0
    return out


def test_entries_land_at_each_rows_position(servable):
    engine = open_servable(servable)
    try:
        signature = engine.signature("step")
        assert signature.appended == ("log",) and signature.append_axis("log") == 2
        assert "log <- entry (appended at the position)" in render(engine.manifest)
        state = initial_state(signature, 3)
        state["position"][:] = [0, 5, CAPACITY - 1]
        for step, x in enumerate(([1, 2, 3], [10, 20, 30])):
            inputs = {"x": np.array(x, np.float32), **state}
            outputs = engine.run("step", inputs)
            if step == 1:
                with pytest.raises(InvalidInput, match=rf"at most {CAPACITY} tokens.*row\(s\) 2 to {CAPACITY + 1}"):
                    state_after(signature, outputs, inputs)
                break
            before = {name: array.copy() for name, array in state.items()}
            state = state_after(signature, outputs, inputs)
            for name in before:  # the call's inputs are left as they were
                np.testing.assert_array_equal(inputs[name], before[name])
        expected = np.zeros((3, 3, CAPACITY), np.float32)
        expected[0, :, 0], expected[1, :, 5], expected[2, :, CAPACITY - 1] = 1, 2, 3
        np.testing.assert_array_equal(state["log"], expected)
        np.testing.assert_array_equal(state["position"], [1, 6, CAPACITY])
        outputs = engine.run("step", {"x": np.zeros(3, np.float32), **state})
        np.testing.assert_array_equal(outputs["total"], [3, 6, 9])  # the compiled code reads what was appended
    finally:
        engine.close()


@pytest.mark.parametrize("appended, message", [
    ("step:log", None),
    ("step:x", "appended state input 'x' is not one of its state inputs (log, position)"),
    ("step:log,step:position", "state position=position_out: the input is int32[-1] but the output is int32[-1]; "
                               "appended entries keep the state's dtype and shape except on the one axis of the "
                               "capacity (8), where they number fewer"),
    ("step", "--state-append takes SIGNATURE:INPUT[,...]; 'step' is not of that form"),
    ("other:log", "--state-append names signature(s) other, which are not compiled"),
])
def test_compile_refuses_what_cannot_be_appended(counter, tmp_path, capsys, appended, message):
    if message is None:  # the declaration that fits, with the wrong outputs paired to it
        for output, wrong in (("entry_int", "the input is float32[-1, 3, 8] but the output is int32[-1, 3, 1]"),
                              ("entries_all", "but the output is float32[-1, 3, 8]; appended entries"),
                              ("log_whole", "but the output is float32[-1, 3, 8]; appended entries")):
            args = ["compile", str(counter), str(tmp_path / "c" / "1"), "--state",
                    f"step:log={output},step:position=position_out", "--state-capacity", f"step:position={CAPACITY}",
                    "--state-append", appended]
            assert cli.main(args) == 1
            assert wrong in capsys.readouterr().err
        no_position = ["compile", str(counter), str(tmp_path / "c" / "1"), "--state", "step:log=entry",
                       "--state-append", appended]
        assert cli.main(no_position) == 1
        assert ("an appended state needs a position (--state-capacity) to say where its entries go"
                in capsys.readouterr().err)
        return
    assert cli.main(["compile", str(counter), str(tmp_path / "c" / "1"), *STATE, "--state-append", appended]) == 1
    error = capsys.readouterr().err
    assert error.startswith("kiln compile: error: ") and message in error, error
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_an_appended_state_is_stored_up_to_its_position(servable):
    """trim_state keeps the filled part of the log (up to the rows' largest position); untrim_state
    puts it back at full shape with zeros after it, and refuses what does not fit the model."""
    from runtime.errors import SessionCorrupt
    from runtime.sessions.state import trim_state, untrim_state

    engine = open_servable(servable)
    try:
        signatures, signature = engine.signatures, engine.signature("step")
        state = initial_state(signature, 2)
        state["log"][:] = np.arange(2 * 3 * CAPACITY, dtype=np.float32).reshape(2, 3, CAPACITY)
        state["position"][:] = [2, 5]
        stored = trim_state(signatures, state)
        assert stored["log"].shape == (2, 3, 5) and stored["position"] is state["position"]
        np.testing.assert_array_equal(stored["log"], state["log"][:, :, :5])
        back = initial_state(signature, 2)
        back["log"][:] = 7  # whatever was there goes
        untrim_state(signatures, stored, back)
        np.testing.assert_array_equal(back["log"][:, :, :5], state["log"][:, :, :5])
        assert not back["log"][:, :, 5:].any()
        np.testing.assert_array_equal(back["position"], [2, 5])
        for broken, message in (
                ({**stored, "log": stored["log"][:, :, :4]}, "holds 4 entries, fewer than its position 5"),
                ({**stored, "log": stored["log"].astype(np.float64)}, "'log' is float64[2, 3, 5], which does not fit"),
                ({**stored, "log": np.zeros((2, 4, 5), np.float32)}, "'log' is float32[2, 4, 5], which does not fit"),
                ({"log": stored["log"]}, "the stored state holds log, but the model's state is log, position")):
            with pytest.raises(SessionCorrupt, match=message.replace("[", r"\[").replace("]", r"\]")):
                untrim_state(signatures, broken, initial_state(signature, 2))
    finally:
        engine.close()
