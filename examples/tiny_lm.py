"""`tiny_lm`: a small decoder-only transformer over UTF-8 bytes, with a fixed-size K/V cache as
session state: the generative example for stateful signatures and continuous batching.

Keras layers with seeded random weights (untrained: the text it generates is noise, but every
number is reproducible), 2 layers, d_model 64, 4 heads of 16, learned position embeddings over a
2048-token context. The SavedModel has two signatures, each with a free batch dimension B, whose
rows are independent sessions at positions of their own:

    prefill  tokens int32 [B, 128]   up to CHUNK bytes of prompt, left-aligned
             count int32 [B]         how many of them are real (0..128; 0 leaves the row's state as it was)
             position int32 [B]      tokens already in the cache
             kv_cache float32 [B, 2, 2, 4, 2048, 16]   (layer, key/value, head, slot, head dim)
          -> logits float32 [B, 256] (after the last real token), kv_cache_out, position_out int32 [B]
    decode   token int32 [B], position int32 [B], kv_cache -> logits, kv_cache_out, position_out

position_out is position + count (prefill) or position + 1 (decode), never clipped: a value over
CONTEXT means the call overflowed the cache and its results are garbage (the manifest records
CONTEXT as the position's capacity, and runtime.engines.base.state_after refuses such a row). A long prompt is prefilled chunk by chunk.
State pairing (STATE, given to `kiln compile --state`): kv_cache <- kv_cache_out and
position <- position_out in both signatures; a new session starts from zeros.

Every row writes the cache at a position of its own, so the write is a gather rather than a
scatter or a dynamic slice: each slot takes the token of this call that lands there (slot -
position, when in 0..count-1) or keeps its value, one select per cache element. It is exact, costs
one pass over the cache (a one-hot matmul would cost as much as the attention itself at a 128-token
chunk), and tfcompile takes it as a plain gather. Slots at or past position_out keep what they held
and are masked out of the attention.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

VOCAB = 256  # UTF-8 bytes are the tokens
LAYERS = 2
D_MODEL = 64
HEADS = 4
HEAD_DIM = D_MODEL // HEADS
MLP = 4 * D_MODEL
CONTEXT = 2048  # K/V cache slots: the most tokens a session holds
CHUNK = 128  # prompt tokens per prefill call
CACHE_SHAPE = (LAYERS, 2, HEADS, CONTEXT, HEAD_DIM)
SEED = 0

STATE = {signature: {"kv_cache": "kv_cache_out", "position": "position_out"} for signature in ("prefill", "decode")}
# For examples/build.py: what `kiln compile` is told besides the SavedModel. Both signatures must
# compile ahead of time: a fallback to the saved-model engine fails the build instead.
COMPILE_OPTIONS = {"state": STATE, "positions": {signature: ("position", CONTEXT) for signature in STATE},
                   "engine": "xla-aot"}


def save(out: Path, log: Callable[[str], None] = print) -> None:
    """Build the seeded model and write its SavedModel (prefill and decode) to `out`."""
    import tensorflow as tf

    model = build()
    module = tf.Module()
    module.model = model
    module.weights = list(model.weights)  # tracked, so the SavedModel holds them
    cache = tf.TensorSpec((None, *CACHE_SHAPE), tf.float32, name="kv_cache")
    rows = tf.TensorSpec((None,), tf.int32)

    @tf.function(input_signature=[tf.TensorSpec((None, CHUNK), tf.int32, name="tokens"),
                                  tf.TensorSpec.from_spec(rows, name="count"),
                                  tf.TensorSpec.from_spec(rows, name="position"), cache])
    def prefill(tokens, count, position, kv_cache):
        return model.step(tokens, count, position, kv_cache)

    @tf.function(input_signature=[tf.TensorSpec.from_spec(rows, name="token"),
                                  tf.TensorSpec.from_spec(rows, name="position"), cache])
    def decode(token, position, kv_cache):
        return model.step(token[:, None], tf.ones_like(token), position, kv_cache)

    tf.saved_model.save(module, str(out), signatures={"prefill": prefill, "decode": decode})
    parameters = sum(int(tf.size(weight)) for weight in model.weights)
    log(f"tiny_lm: {parameters:,} parameters, context {CONTEXT}, prefill chunk {CHUNK}")


def build():
    """The model with its weights drawn from SEED: the same numbers on every run."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(SEED)
    model = _model_class()()
    model.step(np.zeros((1, 1), np.int32), np.ones(1, np.int32), np.zeros(1, np.int32),
               np.zeros((1, *CACHE_SHAPE), np.float32))  # creates the weights
    return model


def _model_class():
    """Keras is imported only when a model is built; the classes are made then."""
    import keras
    import tensorflow as tf

    class Block(keras.layers.Layer):
        """Pre-norm attention over the cache, then a GELU MLP, each with a residual."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-5)
            self.qkv = keras.layers.Dense(3 * D_MODEL)
            self.attention_out = keras.layers.Dense(D_MODEL)
            self.mlp_norm = keras.layers.LayerNormalization(epsilon=1e-5)
            self.mlp_in = keras.layers.Dense(MLP, activation="gelu")
            self.mlp_out = keras.layers.Dense(D_MODEL)

        def call(self, x, keys, values, source, written, bias):
            """x [B, T, D]; keys, values [B, H, S, Dh]; source [B, S]: the token of this call each
            cache slot takes, where `written` [B, 1, S, 1] is true; bias [B, 1, T, S]: 0 or -1e9."""
            batch, steps = tf.shape(x)[0], x.shape[1]
            qkv = tf.reshape(self.qkv(self.attention_norm(x)), [batch, steps, 3, HEADS, HEAD_DIM])
            query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]
            keys = tf.where(written, _by_slot(key, source), keys)
            values = tf.where(written, _by_slot(value, source), values)
            scores = tf.einsum("bthd,bhsd->bhts", query, keys) * HEAD_DIM ** -0.5 + bias
            mixed = tf.einsum("bhts,bhsd->bthd", tf.nn.softmax(scores), values)
            x = x + self.attention_out(tf.reshape(mixed, [batch, steps, D_MODEL]))
            return x + self.mlp_out(self.mlp_in(self.mlp_norm(x))), keys, values

    def _by_slot(new, source):
        """new [B, T, H, Dh] laid out by cache slot: [B, H, S, Dh], slot s holding token source[b, s]."""
        return tf.gather(tf.transpose(new, [0, 2, 1, 3]), source, axis=2, batch_dims=1)

    class TinyLM(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.token_embedding = keras.layers.Embedding(VOCAB, D_MODEL)
            self.position_embedding = keras.layers.Embedding(CONTEXT, D_MODEL)
            self.blocks = [Block() for _ in range(LAYERS)]
            self.norm = keras.layers.LayerNormalization(epsilon=1e-5)
            self.head = keras.layers.Dense(VOCAB)

        def step(self, tokens, count, position, kv_cache) -> dict[str, tf.Tensor]:
            """Append tokens[:, :count] at each row's position; logits after its last real token."""
            tokens, count, position = (tf.convert_to_tensor(t, tf.int32) for t in (tokens, count, position))
            kv_cache = tf.convert_to_tensor(kv_cache, tf.float32)
            steps = tokens.shape[1]
            offsets = tf.range(steps)
            positions = position[:, None] + offsets  # [B, T]
            slots = tf.range(CONTEXT)
            source = slots - position[:, None]  # [B, S]: which token of this call lands in each slot
            written = (source >= 0) & (source < count[:, None])
            source = tf.clip_by_value(source, 0, steps - 1)
            written = written[:, None, :, None]  # [B, 1, S, 1]
            bias = tf.where(slots <= positions[:, :, None], 0.0, -1e9)[:, None]  # causal, by position
            x = self.token_embedding(tokens) + self.position_embedding(tf.minimum(positions, CONTEXT - 1))
            layers = []
            for index, block in enumerate(self.blocks):
                x, keys, values = block(x, kv_cache[:, index, 0], kv_cache[:, index, 1], source, written, bias)
                layers.append(tf.stack([keys, values], axis=1))
            last = tf.einsum("bt,btd->bd", tf.one_hot(count - 1, steps), x)  # zeros where count is 0
            return {"logits": self.head(self.norm(last)), "kv_cache_out": tf.stack(layers, axis=1),
                    "position_out": position + count}

    return TinyLM
