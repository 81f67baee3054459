"""Generating tokens with a stateful servable, its state kept per session (runtime.sessions), so any
instance can continue any session without processing its context again.

A generative servable (examples/tiny_lm.py) has two signatures over the same state (a K/V cache and
its position, paired in the manifest):
  prefill  tokens int32 [B, CHUNK], count int32 [B] (real tokens in the chunk), state -> logits, state
  decode   token int32 [B], state -> logits, state
Its tokens are UTF-8 bytes. POST /v1/models/NAME[/versions/N]:generate takes
  {"prompt": TEXT | "tokens": [ids], "max_tokens": N, "temperature": T (0: greedy), "seed": S,
   "session": ID (optional: none starts a new session)}
and answers the generated tokens, their text, their log-probabilities (under the model, before
temperature) and the session id (also in the X-Kiln-Session header); with "stream": true, each token
as a server-sent event as it is made, then a last event once the session is stored. A continued
session sends only its new text: the prompt is prefilled onto the stored state, each generated token is decoded into
it, and the state goes back to the store by compare-and-set (a session advanced meanwhile by
another request answers 409). A session whose stored state is missing, expired, corrupt or from
another servable version is rebuilt from its token history.

Continuous batching: a session takes a seat in its servable version's decode loop
(runtime.sessions.decode_loop) with its state as stored, and every prefill chunk and decode step runs there: the
calls of all sessions generating at the same moment run as one batch over state kept resident
between them; new sessions join, and finished ones leave, between steps.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from runtime.codecs.tfserving import loads, row_shape
from runtime.core import Core
from runtime.errors import DeadlineExceeded, InvalidInput, shown
from runtime.exchange import Exchange
from runtime.repository import ServableHandle
from runtime.sessions.decode_loop import DecodeLoop, Seat

MAX_TOKENS = 4096
SHORT_CHUNK = 8  # prompt tokens fed through decode rather than as a prefill chunk: fewer than this


@dataclass(frozen=True)
class GenerateRequest:
    tokens: list[int]
    max_tokens: int
    temperature: float
    seed: int | None
    session: str | None
    stream: bool = False


def read_generate(body: bytes) -> GenerateRequest:
    request = loads(body)
    if not isinstance(request, dict):
        raise InvalidInput("the request body must be a JSON object")
    if ("prompt" in request) == ("tokens" in request):
        raise InvalidInput("give exactly one of 'prompt' (text) and 'tokens' (a list of token ids)")
    if "prompt" in request:
        if not isinstance(request["prompt"], str):
            raise InvalidInput("'prompt' must be a string")
        tokens = list(request["prompt"].encode())
    else:
        tokens = request["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise InvalidInput("'tokens' must be a list of integer token ids")
    max_tokens, temperature = request.get("max_tokens", 16), request.get("temperature", 0)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 0 <= max_tokens <= MAX_TOKENS:
        raise InvalidInput(f"'max_tokens' must be an integer from 0 to {MAX_TOKENS}, got {shown(max_tokens)}")
    try:  # float(): an int of 10**400 has no float, and math.isfinite would raise for it
        number = (
            float(temperature)
            if isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            else math.nan
        )
    except OverflowError:
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise InvalidInput(f"'temperature' must be a finite number of 0 or more, got {shown(temperature)}")
    seed, session = request.get("seed"), request.get("session")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise InvalidInput(f"'seed' must be a non-negative integer, got {shown(seed)}")
    if session is not None and not isinstance(session, str):
        raise InvalidInput("'session' must be a string")
    if not tokens and max_tokens:
        raise InvalidInput("nothing to generate from: the prompt is empty")
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidInput("'stream' must be true or false")
    return GenerateRequest(tokens, max_tokens, number, seed, session, stream)


def session_of(app: Core, tenant: str, request: GenerateRequest) -> str:
    """The request's session id, checked against its tenant, or a new one."""
    ids = app.sessions.ids
    return ids.new(tenant) if request.session is None else ids.check(tenant, request.session)


async def generate(
    app: Core, handle: ServableHandle, request: GenerateRequest, tenant: str, session: str, exchange: Exchange
) -> dict:
    """The whole answer to a generate request (see the module's documentation)."""
    tokens, logprobs = [], []
    async for event in events(app, handle, request, tenant, session, exchange):
        if "token" in event:
            tokens.append(event["token"])
            logprobs.append(event["logprob"])
    return {
        "session": session,
        "tokens": tokens,
        "text": bytes(tokens).decode(errors="replace"),
        "logprobs": logprobs,
        "model_version": str(handle.version),
    }


async def events(
    app: Core, handle: ServableHandle, request: GenerateRequest, tenant: str, session: str, exchange: Exchange
) -> AsyncIterator[dict]:
    """Each generated token as it comes ({"token", "text", "logprob"}), then, once the session's new
    state is stored, {"done": true, "session", "tokens"}."""
    from runtime.errors import SessionLost

    engine = handle.engine
    exchange.model, exchange.version = handle.name, str(handle.version)
    prefill, decode = engine.signature("prefill"), engine.signature("decode")
    if not (decode.state and prefill.state and decode.batched and prefill.batched):
        raise InvalidInput(
            f"model {handle.name!r} has no batched stateful prefill and decode signatures to generate with"
        )
    vocabulary = row_shape(decode.outputs[[o.name for o in decode.outputs].index("logits")])[-1]
    if any(not 0 <= t < vocabulary for t in request.tokens):
        raise InvalidInput(f"token ids must be from 0 to {vocabulary - 1}")
    store = app.sessions.store()
    fingerprint = app.sessions.fingerprint(handle)
    stored, history, version = None, None, 0
    if request.session is not None:
        try:
            loaded = await store.load(tenant, session, fingerprint)
            stored, history, version = loaded.tensors, loaded.history, loaded.version
        except SessionLost as lost:
            if lost.history is None:
                raise
            history, version = lost.history, lost.version
    kept = request.session is None or history is not None  # a session begun by :predict keeps none
    context: list[int] = [] if history is None else history.tolist()  # the tokens before this request's
    decoder = app.sessions.decoder(handle, app.runner.observe)
    try:
        seat = await decoder.join(stored)
    except SessionLost:  # stored whole, but not for this model's state: rebuilt like a lost one
        if not context:
            raise
        stored, seat = None, await decoder.join(None)
    seated = Seated(decoder, seat, exchange.deadline)
    rng = np.random.default_rng(request.seed)
    generated = []
    try:
        if request.session is not None and stored is None:
            await seated.prefill(prefill, context)
        logits = await seated.prefill(prefill, request.tokens)
        for _ in range(request.max_tokens):
            assert logits is not None  # read_generate refuses an empty prompt with tokens to generate
            token, logprob = _sample(logits, request.temperature, rng)
            generated.append(token)
            yield {"token": token, "text": bytes([token]).decode(errors="replace"), "logprob": logprob}
            logits = await seated.decode(token)
    finally:
        state = await decoder.leave(seat)
    await store.save(
        tenant, session, version, state, context + request.tokens + generated if kept else None, fingerprint
    )
    yield {"done": True, "session": session, "tokens": generated}


@dataclass(frozen=True)
class Seated:
    """A session seated in its decode loop for one request, whose calls keep to its deadline."""

    decoder: DecodeLoop
    seat: Seat
    deadline: float | None

    async def call(self, key: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.deadline is None:
            return await self.decoder.run(self.seat, key, inputs)
        try:
            return await asyncio.wait_for(
                self.decoder.run(self.seat, key, inputs), max(0.0, self.deadline - time.monotonic())
            )
        except TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed while it was generating; nothing of it was stored"
            ) from None

    async def decode(self, token: int) -> np.ndarray:
        """The logits after feeding one token."""
        return (await self.call("decode", {"token": np.array([token], np.int32)}))["logits"][0]

    async def prefill(self, signature, tokens: list[int]) -> np.ndarray | None:
        """Feed `tokens` in chunks of the signature's width, a last chunk of fewer than SHORT_CHUNK
        tokens one by one through decode (a chunk costs its whole width against the cache, a
        decode step one token: a continued session's few new tokens are cheaper so): the logits
        after the last one (None for no tokens)."""
        width = signature.input("tokens").shape[1]
        logits = None
        for start in range(0, len(tokens), width):
            chunk = tokens[start : start + width]
            if len(chunk) < SHORT_CHUNK:
                for token in chunk:
                    logits = await self.decode(token)
                break
            padded = np.zeros((1, width), np.int32)
            padded[0, : len(chunk)] = chunk
            outputs = await self.call("prefill", {"tokens": padded, "count": np.array([len(chunk)], np.int32)})
            logits = outputs["logits"][0]
        return logits


def _sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> tuple[int, float]:
    """A token (greedy at temperature 0) and its log-probability under the model."""
    logits = np.asarray(logits, np.float64)
    logprobs = logits - logits.max()
    logprobs -= np.log(np.exp(logprobs).sum())
    if temperature == 0:
        token = int(np.argmax(logits))
    else:
        scaled = (logits - logits.max()) / temperature
        probabilities = np.exp(scaled) / np.exp(scaled).sum()
        token = int(rng.choice(len(probabilities), p=probabilities))
    return token, float(logprobs[token])
