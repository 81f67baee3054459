"""`tiny_lm`: a small decoder-only transformer over UTF-8 bytes, with a fixed-size K/V cache as
session state: the generative example for stateful signatures and continuous batching.

Keras layers with seeded random weights (untrained: the text it generates is noise, but every
number is reproducible), 2 layers, d_model 64, 4 heads of 16, learned position embeddings over a
2048-token context. The SavedModel has two signatures, each with a free batch dimension B, whose
rows are independent sessions at positions of their own:

    prefill  tokens int32 [B, 128]   up to CHUNK bytes of prompt, left-aligned
             count int32 [B]         how many of them are real (0..128)
             position int32 [B]      tokens already in the cache
             kv_cache float32 [B, 2, 2, 4, 2048, 16]   (layer, key/value, head, slot, head dim)
          -> logits float32 [B, 256] (after the last real token; zeros where count is 0),
             kv_new float32 [B, 2, 2, 4, 128, 16], position_out int32 [B]
    decode   token int32 [B], position int32 [B], kv_cache
          -> logits float32 [B, 256], kv_new float32 [B, 2, 2, 4, 1, 16], position_out int32 [B]

position_out is position + count (prefill) or position + 1 (decode), never clipped: a value over
CONTEXT means the call overflowed the cache and its results are garbage (the manifest records
CONTEXT as the position's capacity, and runtime.engines.base.state_after refuses such a row). A
long prompt is prefilled chunk by chunk. State pairing (STATE, given to `kiln compile --state`):
kv_cache <- kv_new, position <- position_out; a new session starts from zeros.

Neither signature writes the cache: kv_new holds only the call's own keys and values, entry t
belonging at slot position + t, and both signatures are APPENDED: the runtime writes kv_new into
the session's cache at the position itself, in place (dropping entries past the last slot). A
whole-cache output would read and write the whole cache (2 MiB a session) every call and make
the calls memory-bound, so continuous batching, which keeps the caches resident and decodes many
sessions a step, could not pay. Prefill's entries past count come from the padding tokens: they
land at or past position_out, where every later call masks them until it overwrites them, so a
row with count 0 changes nothing a caller sees.

Both signatures are the same computation, decode a prefill of one token. Each row attends on its
own (a loop over the rows): each of its tokens to the row's tokens up to itself, then to the
cache's slots before the row's position, read by a while loop over the row's filled 128-slot
blocks only, with an online softmax (running max, sum and weighted value). So a row costs what it
has filled, not the cache's size nor its batch-mates' positions, and its result does not depend on
them (bit for bit, in a given bucket); and a chunk's scores (4 heads x 128 tokens x 128 slots, 256
KiB a block) stay in the CPU's cache, where the whole batch's would not (8 MiB at 32 rows:
memory-bound, twice the time a row). The softmax starts from the call's own tokens, which always
include the token itself, so its running max is a real score from the start, and the slots at or
past the position in the last block, masked by -1e9, weigh exp(-1e9 - max) == 0 exactly.
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
BLOCK = 128  # cache slots attended to per loop iteration
CACHE_SHAPE = (LAYERS, 2, HEADS, CONTEXT, HEAD_DIM)
SEED = 0

STATE = {signature: {"kv_cache": "kv_new", "position": "position_out"} for signature in ("prefill", "decode")}
# kv_new holds only the call's entries, which the runtime writes into kv_cache at the position
APPENDED = {signature: ("kv_cache",) for signature in STATE}
# For examples/build.py: what `kiln compile` is told besides the SavedModel. Both signatures must
# compile ahead of time: a fallback to the saved-model engine fails the build instead.
COMPILE_OPTIONS = {"state": STATE, "positions": {signature: ("position", CONTEXT) for signature in STATE},
                   "appended": APPENDED, "engine": "xla-aot"}


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
        return model.decode(token, position, kv_cache)

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
        """Pre-norm attention over the call's tokens and the cache, then a GELU MLP, each with a residual."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-5)
            self.qkv = keras.layers.Dense(3 * D_MODEL)
            self.attention_out = keras.layers.Dense(D_MODEL)
            self.mlp_norm = keras.layers.LayerNormalization(epsilon=1e-5)
            self.mlp_in = keras.layers.Dense(MLP, activation="gelu")
            self.mlp_out = keras.layers.Dense(D_MODEL)

        def call(self, x, kv_cache, position, layer):
            """x [B, T, D]: each row's tokens at position [B] onward, attending a row at a time.
            Returns x, and the tokens' keys and values [B, H, T, Dh]."""
            batch, steps = tf.shape(x)[0], x.shape[1]
            qkv = tf.reshape(self.qkv(self.attention_norm(x)), [batch, steps, 3, HEADS, HEAD_DIM])
            query, key, value = (tf.transpose(qkv[:, :, i], [0, 2, 1, 3]) for i in range(3))  # [B, H, T, Dh]
            mixed = tf.map_fn(lambda row: _attend(*row, kv_cache, layer),
                              (tf.range(batch), position, query, key, value), fn_output_signature=tf.float32)
            mixed = tf.reshape(tf.transpose(mixed, [0, 2, 1, 3]), [batch, steps, D_MODEL])
            x = x + self.attention_out(mixed)
            return x + self.mlp_out(self.mlp_in(self.mlp_norm(x))), key, value

    def _attend(row, position, query, key, value, kv_cache, layer):
        """One row's attention, for its tokens at `position` onward (query, key, value [H, T, Dh]):
        each token's over the row's tokens up to itself, then over its cache kv_cache[row, layer]
        before the position, read a block at a time by a while loop over the filled blocks only,
        with an online softmax. Returns [H, T, Dh]."""
        query = query * HEAD_DIM ** -0.5  # a power of two: exact
        offsets = tf.range(query.shape[1])
        causal = tf.where(offsets[None] <= offsets[:, None], 0.0, -1e9)  # [T, T]: token t sees t' <= t
        scores = tf.einsum("htd,hsd->hts", query, key) + causal
        peak = tf.reduce_max(scores, axis=-1, keepdims=True)
        weights = tf.exp(scores - peak)

        def fold(start, peak, total, mixed):
            """Fold the cache's slots start..start+BLOCK-1 into the running values."""
            cached = tf.slice(kv_cache, [row, layer, 0, 0, start, 0], [1, 1, 2, HEADS, BLOCK, HEAD_DIM])[0, 0]
            scores = (tf.einsum("htd,hsd->hts", query, cached[0])
                      + tf.where(start + tf.range(BLOCK) < position, 0.0, -1e9))
            new_peak = tf.maximum(peak, tf.reduce_max(scores, axis=-1, keepdims=True))
            rescale, weights = tf.exp(peak - new_peak), tf.exp(scores - new_peak)
            return (start + BLOCK, new_peak, total * rescale + tf.reduce_sum(weights, axis=-1, keepdims=True),
                    mixed * rescale + tf.einsum("hts,hsd->htd", weights, cached[1]))

        filled = tf.minimum(position, CONTEXT)  # an overflowed row's result is garbage, but read in bounds
        _, _, total, mixed = tf.while_loop(lambda start, *_: start < filled, fold,
                                           (tf.constant(0), peak, tf.reduce_sum(weights, axis=-1, keepdims=True),
                                            tf.einsum("hts,hsd->htd", weights, value)))
        return mixed / total

    class TinyLM(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.token_embedding = keras.layers.Embedding(VOCAB, D_MODEL)
            self.position_embedding = keras.layers.Embedding(CONTEXT, D_MODEL)
            self.blocks = [Block() for _ in range(LAYERS)]
            self.norm = keras.layers.LayerNormalization(epsilon=1e-5)
            self.head = keras.layers.Dense(VOCAB)

        def step(self, tokens, count, position, kv_cache) -> dict[str, tf.Tensor]:
            """Run tokens[:, :count] at each row's position: the logits after its last real token,
            and the keys and values of all the tokens."""
            tokens, count, position = (tf.convert_to_tensor(t, tf.int32) for t in (tokens, count, position))
            kv_cache = tf.convert_to_tensor(kv_cache, tf.float32)
            steps = tokens.shape[1]
            positions = position[:, None] + tf.range(steps)  # [B, T]
            x = self.token_embedding(tokens) + self.position_embedding(tf.minimum(positions, CONTEXT - 1))
            layers = []
            for index, block in enumerate(self.blocks):
                x, key, value = block(x, kv_cache, position, layer=index)
                layers.append(tf.stack([key, value], axis=1))
            last = tf.einsum("bt,btd->bd", tf.one_hot(count - 1, steps), x)  # zeros where count is 0
            return {"logits": self.head(self.norm(last)), "kv_new": tf.stack(layers, axis=1),
                    "position_out": position + count}

        def decode(self, token, position, kv_cache) -> dict[str, tf.Tensor]:
            """One token a row: a prefill of one."""
            token = tf.convert_to_tensor(token, tf.int32)
            return self.step(token[:, None], tf.ones_like(token), position, kv_cache)

    return TinyLM
