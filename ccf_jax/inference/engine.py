"""Streaming inference: compress-as-you-read prefill, a KV cache (memory rows + raw tail), decoding.

One engine serves every architecture, so CCF and its baselines are measured on the same code path:
  * 'ccf' (memory on): complete segments are folded into memory; the cache holds their projected,
    rotated per-layer memory K/V (c rows per segment, `CCFModel.compress`, exactly what training
    feeds the decoder) plus the raw K/V of the current segment (at most l rows). When the raw tail
    reaches l tokens (prompt or generated), that segment is compressed and its raw K/V dropped.
  * 'local' (`segment_local`, or a CCF model with memory=False): the same, with no memory: the raw
    tail is simply reset at each segment boundary (each segment sees itself only, base positions).
  * 'full' (`decoder`, `full_attention`): the raw K/V of every token, no segments.

The cache (K/V of memory rows + raw rows, capacity buckets, the mask a query reads it through)
is `ccf_jax.inference.cache`, token selection `ccf_jax.inference.sampling`, and the input checks
`ccf_jax.inference.checks`. The layer code is the training code (`Decoder.run_layers`), so the
streaming logits equal the training forward; the new tokens' K/V are re-projected from the normed
inputs `run_layers` returns (`project_kv`, a tiny cost).

Compilation: every jitted function is compiled ahead of time once per input shape signature and
counted (`Engine.compile_counts`, logged). The cache grows in buckets (`cache.Layout.grow`), so
decoding compiles once per bucket, never per token. The encoder is compiled separately from the
cache writes, so it does not recompile when the memory bucket grows.

Host side: the engine knows every element's length without asking the device (each step adds one
token), so it decides when to grow the cache and when a segment fills with no device sync. Shapes
are static, so a compression encodes every row's tail and commits only the filled ones: a batch
whose elements fill segments at different steps pays up to B encoder passes per l tokens.

Public API (token level; `ccf_jax.inference.generator.Generator` adds text):
    engine = Engine(config, params, ratio=None, memory=True, memory_window=None, mesh=None)
    state, last_logits = engine.prefill(prompts)        # list of int token sequences
    state, next_tokens, logits = engine.decode(state, tokens, temperature=..., top_k=..., top_p=...)
    out = engine.generate(prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed)
    engine.logits(docs) / engine.token_logprobs(docs)     # teacher-forced, streamed segment-wise
    engine.cache_bytes(state), engine.compile_counts, engine.synthetic_state(batch, context)
A `State` passed to `decode` is consumed (its buffers are donated); use the returned one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ccf_jax import registry as arch_lib
from ccf_jax.core import sharding
from ccf_jax.model import decoder as model_lib
from ccf_jax.ccf import masks
from ccf_jax.ccf.model import memory_kwargs
from ccf_jax.model.layers import DTYPES
from ccf_jax.inference import cache as cache_lib
from ccf_jax.inference import checks
from ccf_jax.inference.checks import InferenceError
from ccf_jax.inference.cache import Cache, State, pow2_at_least
from ccf_jax.inference.sampling import sample_tokens

ARCH_MODES = {'ccf': 'ccf', 'segment_local': 'local', 'full_attention': 'full', 'decoder': 'full'}


@dataclasses.dataclass
class Generation:
  tokens: list  # Per prompt: generated ids (stop token excluded).
  finish_reason: list  # 'stop' | 'length'.
  stats: dict


def layer_kv(decoder, hs, positions):
  """Rotated raw keys/values [layers, B, L, K, D] of the normed layer inputs hs [layers, B, L, d]
  (what `run_layers` returns): each layer's own `project_kv`, as inside `Attention`."""
  gdef, state = nnx.split(decoder.layers)
  return jax.vmap(lambda s, h: nnx.merge(gdef, s).attn.project_kv(h, positions))(state, hs)


class _Compiled:
  """`jax.jit(fn)` compiled ahead of time once per input signature, with the count logged."""

  def __init__(self, name, fn, engine, donate=(), options=None):
    self.name, self.engine = name, engine
    self._jit = jax.jit(fn, donate_argnums=donate, compiler_options=options)
    self._exe = {}

  def __call__(self, *args):
    shaped = args[1:] if args[0] is self.engine.params else args  # Params never change shape.
    key = tuple((getattr(a, 'shape', ()), str(getattr(a, 'dtype', type(a))),
                 getattr(a, 'sharding', None) if getattr(a, 'committed', False) else None)
                for a in jax.tree.leaves(shaped))
    exe = self._exe.get(key)
    if exe is None:
      t = time.perf_counter()
      with self.engine.mesh_context():
        exe = self._exe[key] = self._jit.lower(*args).compile()
      dt = time.perf_counter() - t
      self.engine.compile_counts[self.name] += 1
      self.engine.compile_seconds += dt
      logging.info('inference: compiled %s #%d in %.2fs', self.name,
                   self.engine.compile_counts[self.name], dt)
    return exe(*args)


class Engine:
  """Streaming prefill, cache and decoding for one model (see the module doc)."""

  def __init__(self, config, params, *, ratio: int | None = None, memory: bool = True,
               memory_window: int | None = None, max_position: int | None = None,
               prefill_chunk: int = 1024, prefill_segments: int = 32, compiler_options=None,
               mesh: jax.sharding.Mesh | None = None):
    cfg = ml_collections.ConfigDict(config.to_dict() if hasattr(config, 'to_dict') else config)
    if cfg.model.arch not in ARCH_MODES:
      raise InferenceError(f'model.arch={cfg.model.arch!r} has no inference path; one of '
                           f'{sorted(ARCH_MODES)}.')
    if memory_window is not None:
      cfg.ccf.memory_window = int(memory_window)
    if max_position is not None:
      cfg.model.max_position = int(max_position)
    self.config, self.model_cfg, self.ccf = cfg, cfg.model, cfg.ccf
    self.mode = ARCH_MODES[cfg.model.arch]
    if self.mode == 'ccf' and not memory:
      self.mode = 'local'
    self.arch = arch_lib.get_arch(cfg)
    self._module_cfg = self.arch.module_config(cfg)
    self.l, self.c, self.window = self.ccf.segment_len, self.ccf.num_memory, self.ccf.memory_window
    self.span = masks.default_ratio(self.ccf) if ratio is None else int(ratio)
    allowed = tuple(self.ccf.ratios) or (masks.default_ratio(self.ccf),)
    if self.mode == 'ccf' and self.span not in allowed:
      raise InferenceError(f'ratio={ratio} is not one this model was built for (ccf.ratios / '
                           f'segment_len / num_memory allow {allowed}).')
    self.dtype = DTYPES[cfg.model.dtype]
    sliding = int(cfg.model.get('sliding_window', 0))
    if sliding and self.mode != 'full':
      raise InferenceError(f'model.sliding_window={sliding} is implemented for the plain decoder '
                           f'only (model.arch={cfg.model.arch!r}). Fix: set model.sliding_window=0 '
                           "in the export's config.json, or use a model.arch='decoder' export.")
    self.layout = cache_lib.Layout(self.mode, self.l, self.c, self.window, self.span,
                                   cfg.model.num_layers, cfg.model.num_kv_heads,
                                   cfg.model.head_dim, self.dtype, sliding)
    self.vocab_size = cfg.model.vocab_size
    self.prefill_chunk, self.prefill_segments = prefill_chunk, prefill_segments
    self.mesh = mesh
    # On a mesh the parameters are placed with the training rules (config.mesh.rules: FSDP,
    # tensor), so an export too large for one device is read sharded; activations and the cache
    # follow by GSPMD propagation.
    self.params = jax.device_put(params, None if mesh is None else
                                 arch_lib.param_shardings(cfg, mesh))
    self.compile_counts, self.compile_seconds, self.grow_calls = collections.Counter(), 0.0, 0
    self._sampling_args, self._key0 = {}, jax.random.key(0)
    fn = lambda name, f, donate=(): _Compiled(name, f, self, donate, compiler_options)
    self._extend_all = fn('extend_all', lambda p, c, t, n: self._extend(p, c, t, n, True), (1,))
    self._extend_last = fn('extend_last', lambda p, c, t, n: self._extend(p, c, t, n, False), (1,))
    self._decode = fn('decode', self._decode_step, (1,))
    self._encode = fn('encode', self._encode_segments)
    self._store = fn('store', self.layout.store_memory, (0,))
    self._store_tail = fn('store_tail', lambda c, m: self.layout.store_memory(
        c, m, c.segment[:, None], (c.raw_len == self.l)[:, None], True), (0,))
    self._reset_tail = fn('reset_tail', self.layout.reset_full_tail, (0,))
    self._sample = fn('sample', sample_tokens)
    self._logprobs = fn('logprobs', lambda lg, t: jnp.take_along_axis(
        jax.nn.log_softmax(lg, -1), t[..., None], -1)[..., 0])

  def mesh_context(self):
    """The mesh and logical rules compiled functions trace under (nothing without a mesh)."""
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding.use_mesh(self.mesh, self.config.mesh.rules)

  # ------------------------------------------------------------------------------ traced pieces
  def _bind(self, params):
    module = model_lib.bind(self._module_cfg, params, self.arch.module_cls)
    return (module, module.decoder) if self.arch.name == 'ccf' else (None, module)

  def _extend(self, params, cache: Cache, tokens, num_new, all_logits: bool):
    """Appends tokens [B, Lq] (the first num_new[b] of row b) after the cache; returns the new
    cache and logits [B, Lq, V] (all_logits) or [B, 1, V] at each row's last new token."""
    module, decoder = self._bind(params)
    mem_cap = cache.mem_segment.shape[1]
    positions, mask = self.layout.read_view(self.ccf, cache, tokens.shape[1])
    gate = module.read_gate() if self.mode == 'ccf' else None
    x, hs = decoder.run_layers(decoder.embed_tokens(tokens), positions, mask,
                               xs=((cache.k, cache.v), gate),
                               block_kwargs=lambda xs: memory_kwargs(xs, mem_cap))
    k, v = layer_kv(decoder, hs, positions)
    cache = cache_lib.append_raw(cache, k, v, tokens, num_new)
    if not all_logits:
      x = jnp.take_along_axis(x, jnp.maximum(num_new - 1, 0)[:, None, None], axis=1)
    return cache, decoder.logits(x)

  def _decode_step(self, params, cache, token, key, temperature, top_k, top_p):
    cache, logits = self._extend(params, cache, token[:, None], jnp.ones_like(token), False)
    logits = logits[:, 0]
    return cache, sample_tokens(logits, key, temperature, top_k, top_p), logits

  def _encode_segments(self, params, tokens, span, valid, segments):
    """Memory of segments tokens [B, k, l] (training's `CCFModel.compress`)."""
    return self._bind(params)[0].compress(tokens, span, valid, segments)

  # ------------------------------------------------------------------------------ host: checks
  def max_tokens(self) -> int | None:
    """The longest context the model supports with these options (None: any length)."""
    return checks.max_tokens(self.mode, self.model_cfg, self.ccf)

  def check_length(self, total: int):
    checks.check_length(total, self.mode, self.model_cfg, self.ccf)

  def check_prompts(self, prompts, reserve: int = 0) -> list:
    """int32 arrays of prompts (each a non-empty sequence of ids < vocab), length-checked with
    `reserve` more tokens to come."""
    out = checks.check_prompts(prompts, self.vocab_size)
    self.check_length(max(len(a) for a in out) + reserve)
    return out

  # ------------------------------------------------------------------------------ host: cache
  def _grow(self, state: State, segments: int, tokens: int) -> State:
    """The state at the capacity buckets for `segments` memory segments and `tokens` raw tokens."""
    grown = self.layout.grow(state, segments, tokens)
    if grown is None:
      return state
    self.grow_calls += 1
    return grown

  def _close_segments(self, state: State, filled: np.ndarray) -> State:
    """Compresses (or, without memory, resets) the tails that just reached l tokens (`filled`)."""
    if self.mode == 'full' or not np.any(filled):
      return state
    if self.mode == 'local':
      return State(self._reset_tail(state.cache), state.lengths)
    state = self._grow(state, int(state.lengths.max()) // self.l, 0)
    c = state.cache
    mem = self._encode(self.params, c.tail[:, None], c.span, (c.raw_len == self.l)[:, None],
                       c.segment[:, None])
    return State(self._store_tail(c, mem), state.lengths)

  def cache_bytes(self, state: State) -> dict:
    """Allocated bytes of the K/V buffers and the bytes of rows in use (summed over the batch)."""
    return self.layout.nbytes(state)

  # ------------------------------------------------------------------------------ host: reading
  def prefill(self, prompts, reserve: int = 0):
    """Reads prompts (token-id sequences of any lengths) into a fresh cache. CCF: every complete
    segment before a prompt's last one is encoded (batched over segments, `prefill_segments` at a
    time; only the last W with a memory window) and stored as memory, then the last segment is
    decoded over it and kept raw (compressed at once if full). Full attention: the prompt is
    decoded in chunks of `prefill_chunk` tokens. `reserve`: tokens still to come (length check).
    Returns (State, logits float32[B, V] at each prompt's last token)."""
    prompts = self.check_prompts(prompts, reserve)
    n = np.array([len(p) for p in prompts], np.int64)
    b, l = len(prompts), self.l
    if self.mode == 'full':
      state = State(self.layout.new(b, 0, 0), np.zeros(b, np.int64))
      last = None
      for start, chunk, num, logits, state in self._chunks(state, prompts, n, self._extend_last):
        ends = jnp.asarray((n > start) & (n <= start + chunk))[:, None]
        last = logits[:, 0] if last is None else jnp.where(ends, logits[:, 0], last)
      return state, last
    first = (n - 1) // l  # Complete segments before each prompt's last one.
    state = State(self.layout.new(b, self.layout.mem_rows(int(n.max()) // l), l, first), n)
    if self.mode == 'ccf':
      state = self._compress_prompts(state, prompts, first)
    num = n - first * l
    tail = np.zeros((b, l), np.int32)
    for i, p in enumerate(prompts):
      tail[i, :num[i]] = p[first[i] * l:]
    cache, logits = self._extend_last(self.params, state.cache, jnp.asarray(tail),
                                      jnp.asarray(num, jnp.int32))
    return self._close_segments(State(cache, n), n % l == 0), logits[:, 0]

  def _compress_prompts(self, state: State, prompts, first) -> State:
    b, l, k_max = len(prompts), self.l, self.prefill_segments
    start = np.maximum(first - self.window, 0) if self.window else np.zeros_like(first)
    lo, hi = int(start.min()), int(first.max())
    k = min(k_max, pow2_at_least(hi - lo))
    cache = state.cache
    for s0 in range(lo, hi, k):
      seg = s0 + np.arange(k)
      valid = (seg[None] >= start[:, None]) & (seg[None] < first[:, None])
      if not valid.any():
        continue
      tokens = np.zeros((b, k, l), np.int32)
      for i, j in zip(*np.nonzero(valid)):
        tokens[i, j] = prompts[i][seg[j] * l:(seg[j] + 1) * l]
      segs = jnp.asarray(np.broadcast_to(seg, (b, k)), jnp.int32)
      mem = self._encode(self.params, jnp.asarray(tokens), cache.span, jnp.asarray(valid), segs)
      cache = self._store(cache, mem, segs, jnp.asarray(valid))
    return State(cache, state.lengths)

  def _chunks(self, state: State, docs, n, extend):
    """Feeds docs through `extend` in aligned chunks (one segment for ccf/local, prefill_chunk
    tokens for full), closing filled segments between chunks. Yields (start, chunk, num_new,
    logits, state)."""
    total, b = int(n.max()), len(docs)
    chunk = self.l if self.mode != 'full' else min(self.prefill_chunk, pow2_at_least(total))
    for start in range(0, total, chunk):
      num = np.clip(n - start, 0, chunk)
      state = self._grow(state, 0, int((state.lengths + num).max()))  # Full: capacity by bucket.
      tokens = np.zeros((b, chunk), np.int32)
      for i, d in enumerate(docs):
        tokens[i, :num[i]] = d[start:start + num[i]]
      cache, logits = extend(self.params, state.cache, jnp.asarray(tokens),
                             jnp.asarray(num, jnp.int32))
      lengths = state.lengths + num
      state = State(cache, lengths)
      if start + chunk < total:
        state = self._close_segments(state, (num > 0) & (lengths % self.l == 0))
      yield start, chunk, num, logits, state

  def _stream(self, docs):
    """Teacher-forced reading of whole documents (the streaming path of evaluation)."""
    docs = self.check_prompts(docs)
    n = np.array([len(d) for d in docs], np.int64)
    total = int(n.max())
    layout = self.layout
    cache = layout.new(len(docs), layout.mem_rows((total - 1) // self.l), layout.raw_rows(0))
    return docs, n, self._chunks(State(cache, np.zeros(len(docs), np.int64)), docs, n,
                                 self._extend_all)

  def logits(self, docs) -> list:
    """Teacher-forced logits float32[n_b, V] of each document, read by the streaming path (CCF:
    segment by segment, each over the memory of the earlier ones, then compressed)."""
    docs, n, chunks = self._stream(docs)
    parts = [[] for _ in docs]
    for start, _, num, logits, _ in chunks:
      logits = np.asarray(logits)
      for i in np.nonzero(num)[0]:
        parts[i].append(logits[i, :num[i]])
    return [np.concatenate(p) for p in parts]

  def token_logprobs(self, docs) -> list:
    """float32[n_b - 1] log p(token i+1 | tokens <= i) of each document (streaming, on device)."""
    docs, n, chunks = self._stream(docs)
    parts = [[] for _ in docs]
    for start, chunk, num, logits, _ in chunks:
      targets = np.zeros((len(docs), chunk), np.int32)
      for i, d in enumerate(docs):
        nxt = d[start + 1:start + chunk + 1]
        targets[i, :len(nxt)] = nxt
      lp = np.asarray(self._logprobs(logits, jnp.asarray(targets)))
      for i in range(len(docs)):
        parts[i].append(lp[i, :max(0, min(chunk, n[i] - 1 - start))])
    return [np.concatenate(p) for p in parts]

  # ------------------------------------------------------------------------------ host: decoding
  def _sampling(self, temperature, top_k, top_p):
    """Device scalars of the sampling options (made once per setting: decode runs per token)."""
    got = self._sampling_args.get((temperature, top_k, top_p))
    if got is None:
      checks.check_sampling(temperature, top_k, top_p)
      got = self._sampling_args[temperature, top_k, top_p] = (
          jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    return got

  def decode(self, state: State, tokens, *, key=None, temperature=0.0, top_k=0, top_p=1.0):
    """Appends one token per element (ids, or the array a previous call returned) and returns
    (state, next tokens int32[B] sampled from the new logits, logits float32[B, V]). A segment that
    fills is compressed before returning. `state` is consumed (its buffers are donated)."""
    if not isinstance(tokens, jax.Array):
      tokens = np.asarray(tokens, np.int64)
      if tokens.shape != state.lengths.shape:
        raise InferenceError(f'decode takes one token per element: shape {state.lengths.shape}, '
                             f'got {tokens.shape}.')
      checks.check_ids(tokens, 'the decoded tokens', self.vocab_size)
    self.check_length(int(state.lengths.max()) + 1)
    state = self._grow(state, 0, int(state.lengths.max()) + 1)
    key = self._key0 if key is None else key
    cache, nxt, logits = self._decode(self.params, state.cache, jnp.asarray(tokens, jnp.int32),
                                      key, *self._sampling(temperature, top_k, top_p))
    lengths = state.lengths + 1
    return self._close_segments(State(cache, lengths), lengths % self.l == 0), nxt, logits

  def generate(self, prompts, max_new_tokens: int = 64, *, temperature=0.0, top_k=0, top_p=1.0,
               stop_tokens: Sequence[int] = (), seed: int = 0, check_every: int = 8) -> Generation:
    """Generates up to max_new_tokens per prompt. Each element stops at its first stop token
    (excluded from the output); the batch stops when all have (checked every `check_every` steps,
    so the host syncs rarely)."""
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
      raise InferenceError(f'max_new_tokens={max_new_tokens} must be a positive integer.')
    sampling = self._sampling(temperature, top_k, top_p)
    stop = np.asarray(list(stop_tokens), np.int64)
    if ((stop < 0) | (stop >= self.vocab_size)).any():
      raise InferenceError(f'stop tokens {stop.tolist()} must be ids in [0, {self.vocab_size}).')
    compile0, t0 = self.compile_seconds, time.perf_counter()
    state, logits = self.prefill(prompts, reserve=max_new_tokens)
    key = jax.random.key(seed)
    tok = self._sample(logits, jax.random.fold_in(key, 0), *sampling)
    out, done = [tok], np.zeros(len(state.lengths), bool)
    prefill_s = time.perf_counter() - t0
    for step in range(1, max_new_tokens):
      if stop.size and step % check_every == 0:
        done |= np.isin(np.asarray(jnp.stack(out[-check_every:], 1)), stop).any(1)
        if done.all():
          break
      state, tok, _ = self.decode(state, tok, key=jax.random.fold_in(key, step),
                                  temperature=temperature, top_k=top_k, top_p=top_p)
      out.append(tok)
    ids = np.asarray(jnp.stack(out, 1))
    total_s = time.perf_counter() - t0
    tokens, reasons = [], []
    for row in ids:
      hit = np.nonzero(np.isin(row, stop))[0] if stop.size else []
      tokens.append(row[:hit[0]].tolist() if len(hit) else row.tolist())
      reasons.append('stop' if len(hit) else 'length')
    stats = {'prompt_tokens': [len(p) for p in prompts], 'steps': len(out),
             'prefill_s': round(prefill_s, 4), 'decode_s': round(total_s - prefill_s, 4),
             'compile_s': round(self.compile_seconds - compile0, 3),
             'compiles': dict(self.compile_counts), 'cache_grows': self.grow_calls,
             **self.cache_bytes(state)}
    return Generation(tokens, reasons, stats)

  def synthetic_state(self, batch: int, context: int, capacity: int | None = None,
                      seed: int = 0) -> State:
    """A state as if `context` tokens had been read, with random K/V: for timing decoding where a
    real prefill would not fit (the benchmark). `capacity`: raw rows of 'full' (default bucket)."""
    self.check_length(context)
    return self.layout.synthetic(batch, context, capacity, seed)
