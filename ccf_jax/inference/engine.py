"""Streaming inference: compress-as-you-read prefill, a KV cache (memory rows + raw tail), decoding.

One engine serves every architecture, so CCF and its baselines are measured on the same code path:
  * 'ccf' (memory on): complete segments are folded into memory; the cache holds their projected,
    rotated per-layer memory K/V (c rows per segment, `CCFModel.compress`, exactly what training
    feeds the decoder) plus the raw K/V of the current segment (at most l rows). When the raw tail
    reaches l tokens (prompt or generated), that segment is compressed and its raw K/V dropped.
  * 'local' (`segment_local`, or a CCF model with memory=False): the same, with no memory: the raw
    tail is simply reset at each segment boundary (each segment sees itself only, base positions).
  * 'full' (`decoder`, `full_attention`): the raw K/V of every token, no segments.

Cache layout (`Cache`): one K and one V buffer [layers, B, mem_cap + raw_cap, kv_heads, head_dim],
memory rows first, raw rows after. Queries attend to the whole buffer through `Block`'s key/value
prefix with a mask (memory rows of visible segments, raw rows already written), so the layer code is
the training code (`Decoder.run_layers`) and the streaming logits equal the training forward. The
new tokens' K/V are re-projected from the normed inputs `run_layers` returns (`project_kv`, a tiny
cost) and scattered into the buffer; rows a batch element does not own are dropped (`mode='drop'`),
which is what lets prompts of different lengths share one batch.

Positions are those of training (`masks.raw_positions`, `masks.memory_positions`: memory rotated
once at fixed positions). With `ccf.memory_window = W` the memory is a ring of W segments (segment s
in slot s mod W), so the cache stays bounded at any length.

Compilation: every jitted function is compiled ahead of time once per input shape signature and
counted (`Engine.compile_counts`, logged). Capacities grow in buckets (memory: powers of two of
segments, capped at W; raw rows of 'full': powers of two, at least l), so decoding compiles once
per bucket, never per token, and short contexts do not pay for a maximum-size cache. The encoder is
compiled separately from the cache writes, so it does not recompile when the memory bucket grows.

Host side: the engine knows every element's length without asking the device (each step adds one
token), so it decides when to grow the cache and when a segment fills with no device sync. Shapes
are static, so a compression encodes every row's tail and commits only the filled ones: a batch
whose elements fill segments at different steps pays up to B encoder passes per l tokens.

Public API (token level; `ccf_jax.generate.Generator` adds text):
    engine = Engine(config, params, ratio=None, memory=True, memory_window=None)
    state, last_logits = engine.prefill(prompts)        # list of int token sequences
    state, next_tokens, logits = engine.decode(state, tokens, temperature=..., top_k=..., top_p=...)
    out = engine.generate(prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed)
    engine.logits(docs) / engine.token_logprobs(docs)     # teacher-forced, streamed segment-wise
    engine.cache_bytes(state), engine.compile_counts, engine.synthetic_state(batch, context)
A `State` passed to `decode` is consumed (its buffers are donated); use the returned one.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ccf_jax import registry as arch_lib
from ccf_jax.model import decoder as model_lib
from ccf_jax.ccf import masks
from ccf_jax.ccf.model import memory_kwargs
from ccf_jax.model.layers import DTYPES

ARCH_MODES = {'ccf': 'ccf', 'segment_local': 'local', 'full_attention': 'full', 'decoder': 'full'}


class InferenceError(ValueError):
  """Input the engine cannot serve (empty prompt, unknown token, unsupported length); the message
  names the option that fixes it."""


class Cache(NamedTuple):
  k: jax.Array  # [layers, B, mem_cap + raw_cap, kv_heads, head_dim]: memory rows, then raw rows.
  v: jax.Array
  mem_segment: jax.Array  # int32[B, mem_cap]: segment summarised by each memory row (-1: empty).
  mem_valid: jax.Array  # bool[B, mem_cap]: a real row at this ratio.
  raw_len: jax.Array  # int32[B]: raw rows written (tokens of the current segment, or all for full).
  segment: jax.Array  # int32[B]: segments compressed so far (= index of the current segment).
  tail: jax.Array  # int32[B, l]: tokens of the current segment (what is compressed when it fills).
  span: jax.Array  # int32[B]: tokens per memory slot (the compression ratio).


@dataclasses.dataclass
class State:
  """A batch's cache plus the host's copy of each element's length (tokens read so far)."""
  cache: Cache
  lengths: np.ndarray


@dataclasses.dataclass
class Generation:
  tokens: list  # Per prompt: generated ids (stop token excluded).
  finish_reason: list  # 'stop' | 'length'.
  stats: dict


def pow2_at_least(n: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def sample_tokens(logits, key, temperature, top_k, top_p):
  """int32[B] from logits [B, V]: greedy when temperature <= 0, else a sample at that temperature
  from the top_k tokens (0 = all) whose cumulative probability first reaches top_p (nucleus).
  All three are traced values: changing them never recompiles."""
  v = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  x = logits / jnp.maximum(temperature, 1e-6)
  srt = -jnp.sort(-x, axis=-1)
  rank = jnp.arange(v)[None]
  in_k = rank < jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  srt = jnp.where(in_k, srt, -jnp.inf)
  p = jax.nn.softmax(srt, axis=-1)
  keep = in_k & ((jnp.cumsum(p, axis=-1) - p) < top_p)  # The token crossing top_p is kept.
  threshold = jnp.take_along_axis(srt, jnp.sum(keep, -1, keepdims=True) - 1, axis=-1)
  sampled = jax.random.categorical(key, jnp.where(x >= threshold, x, -jnp.inf), axis=-1)
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits, -1)).astype(jnp.int32)


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
    key = tuple((getattr(a, 'shape', ()), str(getattr(a, 'dtype', type(a))))
                for a in jax.tree.leaves(shaped))
    exe = self._exe.get(key)
    if exe is None:
      t = time.perf_counter()
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
               prefill_chunk: int = 1024, prefill_segments: int = 32, compiler_options=None):
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
    self.vocab_size = cfg.model.vocab_size
    self.prefill_chunk, self.prefill_segments = prefill_chunk, prefill_segments
    self.params = jax.device_put(params)
    self.compile_counts, self.compile_seconds, self.grow_calls = collections.Counter(), 0.0, 0
    self._sampling_args, self._key0 = {}, jax.random.key(0)
    fn = lambda name, f, donate=(): _Compiled(name, f, self, donate, compiler_options)
    self._extend_all = fn('extend_all', lambda p, c, t, n: self._extend(p, c, t, n, True), (1,))
    self._extend_last = fn('extend_last', lambda p, c, t, n: self._extend(p, c, t, n, False), (1,))
    self._decode = fn('decode', self._decode_step, (1,))
    self._encode = fn('encode', self._encode_segments)
    self._store = fn('store', self._store_memory, (0,))
    self._store_tail = fn('store_tail', lambda c, m: self._store_memory(
        c, m, c.segment[:, None], (c.raw_len == self.l)[:, None], True), (0,))
    self._reset_tail = fn('reset_tail', self._reset_full_tail, (0,))
    self._sample = fn('sample', sample_tokens)
    self._logprobs = fn('logprobs', lambda lg, t: jnp.take_along_axis(
        jax.nn.log_softmax(lg, -1), t[..., None], -1)[..., 0])

  # ------------------------------------------------------------------------------ traced pieces
  def _bind(self, params):
    module = model_lib.bind(self._module_cfg, params, self.arch.module_cls)
    return (module, module.decoder) if self.arch.name == 'ccf' else (None, module)

  def _extend(self, params, cache: Cache, tokens, num_new, all_logits: bool):
    """Appends tokens [B, Lq] (the first num_new[b] of row b) after the cache; returns the new
    cache and logits [B, Lq, V] (all_logits) or [B, 1, V] at each row's last new token."""
    module, decoder = self._bind(params)
    b, lq = tokens.shape
    mem_cap, cap = cache.mem_segment.shape[1], cache.k.shape[2]
    i = jnp.arange(lq, dtype=jnp.int32)
    if self.mode == 'ccf':
      base = masks.raw_positions(self.ccf, cache.span, cache.segment[:, None])[:, 0, 0]
      lo, hi = masks.visible_range(self.ccf, cache.segment[:, None])
      mem_vis = cache.mem_valid & (cache.mem_segment >= lo) & (cache.mem_segment < hi)
    else:
      base, mem_vis = jnp.zeros((b,), jnp.int32), cache.mem_valid
    positions = base[:, None] + cache.raw_len[:, None] + i[None]
    raw_vis = jnp.arange(cap - mem_cap)[None] < cache.raw_len[:, None]
    prefix = jnp.concatenate([mem_vis, raw_vis], axis=1)[:, None]
    mask = jnp.concatenate([jnp.broadcast_to(prefix, (b, lq, cap)),
                            jnp.broadcast_to(model_lib.causal_mask(lq), (b, lq, lq))], axis=-1)
    gate = module.read_gate() if self.mode == 'ccf' else None
    x, hs = decoder.run_layers(decoder.embed_tokens(tokens), positions, mask,
                               xs=((cache.k, cache.v), gate),
                               block_kwargs=lambda xs: memory_kwargs(xs, mem_cap))
    k, v = layer_kv(decoder, hs, positions)
    fresh = i[None] < num_new[:, None]
    at = cache.raw_len[:, None] + i[None]
    bi = jnp.broadcast_to(jnp.arange(b)[:, None], (b, lq))
    rows = jnp.where(fresh, mem_cap + at, cap)  # Out of range: dropped.
    put = lambda buf, new: buf.at[:, bi, rows].set(new.astype(buf.dtype), mode='drop')
    tail = cache.tail.at[bi, jnp.where(fresh, at, cache.tail.shape[1])].set(tokens, mode='drop')
    cache = cache._replace(k=put(cache.k, k), v=put(cache.v, v), tail=tail,
                           raw_len=cache.raw_len + num_new)
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

  def _store_memory(self, cache: Cache, mem, segments, commit, advance: bool = False):
    """Writes the c rows of each committed segment [B, k] into its slot (s mod W with a memory
    window); `advance` also drops the raw tail of those rows and moves them to the next segment."""
    b, k = segments.shape
    mem_cap = cache.mem_segment.shape[1]
    slot = segments % self.window if self.window else segments
    rows = slot[:, :, None] * self.c + jnp.arange(self.c)
    rows = jnp.where(commit[:, :, None], rows, cache.k.shape[2]).reshape(b, k * self.c)
    bi = jnp.broadcast_to(jnp.arange(b)[:, None], rows.shape)
    put = lambda buf, new: buf.at[:, bi, rows].set(new.astype(buf.dtype), mode='drop')
    at = jnp.minimum(rows, mem_cap)  # mem_cap: out of range of the row metadata, dropped too.
    cache = cache._replace(k=put(cache.k, mem.k), v=put(cache.v, mem.v),
                           mem_segment=cache.mem_segment.at[bi, at].set(mem.segment, mode='drop'),
                           mem_valid=cache.mem_valid.at[bi, at].set(mem.valid, mode='drop'))
    return self._reset_full_tail(cache) if advance else cache

  def _reset_full_tail(self, cache: Cache):
    full = cache.raw_len == self.l
    return cache._replace(raw_len=jnp.where(full, 0, cache.raw_len),
                          segment=cache.segment + full.astype(jnp.int32))

  # ------------------------------------------------------------------------------ host: checks
  def max_tokens(self) -> int | None:
    """The longest context the model supports with these options (None: any length)."""
    m, l, c = self.model_cfg.max_position, self.l, self.c
    if self.mode != 'ccf':
      return m if self.mode == 'full' else None
    fit = (m - l) // c + 1 if self.ccf.memory_positions == 'sequential' else m // l  # Segments.
    return None if 0 < self.window < fit else max(fit, 0) * l

  def check_length(self, total: int):
    limit = self.max_tokens()
    if limit is None or total <= limit:
      return
    m = self.model_cfg.max_position
    if self.mode == 'full':
      raise InferenceError(
          f'a context of {total} tokens exceeds model.max_position={m} of this '
          f'{self.model_cfg.arch} model. Fix: a shorter prompt or max_new_tokens, or raise '
          'model.max_position (Engine/Generator max_position=, --max_position) if the model '
          'extrapolates.')
    l = self.l
    raise InferenceError(
        f'a context of {total} tokens ({math.ceil(total / l)} segments of ccf.segment_len={l}) '
        f'needs rotary positions beyond model.max_position={m} (memory_positions='
        f"'{self.ccf.memory_positions}'); this model reads at most {limit} tokens with "
        f'ccf.memory_window={self.window}. Fix: bound the memory with ccf.memory_window='
        f'{max(limit // l - 1, 1)} (Engine/Generator memory_window=, --memory_window), which '
        'supports any length, or shorten the prompt / max_new_tokens.')

  def check_prompts(self, prompts, reserve: int = 0) -> list:
    """int32 arrays of prompts (each a non-empty sequence of ids < vocab), length-checked with
    `reserve` more tokens to come."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
      prompts = list(prompts)
    if not isinstance(prompts, (list, tuple)) or not prompts:
      raise InferenceError('no prompts: pass a non-empty list of token-id sequences.')
    out = []
    for i, p in enumerate(prompts):
      a = np.asarray(p)
      if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise InferenceError(f'prompt {i} is not a 1-D sequence of integer token ids '
                             f'(shape {a.shape}, dtype {a.dtype}).')
      if a.size == 0:
        raise InferenceError(f'prompt {i} is empty. Fix: give at least one token (e.g. bos for '
                             'unconditional generation).')
      self._check_ids(a, f'prompt {i}')
      out.append(a.astype(np.int32))
    self.check_length(max(len(a) for a in out) + reserve)
    return out

  def _check_ids(self, a: np.ndarray, what: str):
    bad = a[(a < 0) | (a >= self.vocab_size)]
    if bad.size:
      raise InferenceError(f'{what} has token id {int(bad[0])} outside the vocabulary '
                           f'[0, {self.vocab_size}) (model.vocab_size). Fix: encode with the '
                           "model's own tokenizer (the export's tokenizer.model).")

  # ------------------------------------------------------------------------------ host: cache
  def _mem_rows(self, segments: int) -> int:
    """Memory capacity (rows) for `segments` compressed segments: a power of two of segments,
    at most the window's W."""
    if self.mode != 'ccf' or segments <= 0:
      return 0
    cap = pow2_at_least(segments)
    return (min(cap, self.window) if self.window else cap) * self.c

  def _raw_rows(self, tokens: int) -> int:
    """Raw capacity: one segment (ccf/local); a power of two >= l of tokens (full; 0 if none)."""
    if self.mode != 'full':
      return self.l
    return 0 if tokens <= 0 else max(self.l, pow2_at_least(tokens))

  def new_cache(self, batch: int, mem_rows: int, raw_rows: int, segment=None) -> Cache:
    m = self.model_cfg
    shape = (m.num_layers, batch, mem_rows + raw_rows, m.num_kv_heads, m.head_dim)
    seg = np.zeros(batch, np.int32) if segment is None else np.asarray(segment, np.int32)
    return Cache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                 jnp.full((batch, mem_rows), -1, jnp.int32), jnp.zeros((batch, mem_rows), bool),
                 jnp.zeros((batch,), jnp.int32), jnp.asarray(seg),
                 jnp.zeros((batch, self.l if self.mode != 'full' else 0), jnp.int32),
                 jnp.full((batch,), self.span, jnp.int32))

  def _grow(self, state: State, segments: int, tokens: int) -> State:
    """Re-lays the cache out at the buckets holding `segments` memory segments and `tokens` raw
    tokens when the current capacity is too small (rare: once per bucket)."""
    c = state.cache
    old_mem, cap = c.mem_segment.shape[1], c.k.shape[2]
    mem, raw = old_mem, cap - old_mem
    kept = min(segments, self.window) if self.window else segments  # Segments in the ring.
    if self.mode == 'ccf' and kept * self.c > mem:
      mem = self._mem_rows(segments)
    if self.mode == 'full' and tokens > raw:
      raw = self._raw_rows(tokens)
    if (mem, raw) == (old_mem, cap - old_mem):
      return state

    def pad(a, fill=0):
      z = lambda n: jnp.full(a.shape[:2] + (n,) + a.shape[3:], fill, a.dtype)
      return jnp.concatenate([a[:, :, :old_mem], z(mem - old_mem), a[:, :, old_mem:],
                              z(raw - cap + old_mem)], axis=2)

    self.grow_calls += 1
    mpad = lambda a, fill: jnp.concatenate(
        [a, jnp.full((a.shape[0], mem - old_mem), fill, a.dtype)], axis=1)
    return State(c._replace(k=pad(c.k), v=pad(c.v), mem_segment=mpad(c.mem_segment, -1),
                            mem_valid=mpad(c.mem_valid, False)), state.lengths)

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
    c = state.cache
    m = self.model_cfg
    row = m.num_layers * 2 * m.num_kv_heads * m.head_dim * jnp.dtype(self.dtype).itemsize
    if self.mode == 'full':
      mem_rows, raw = np.zeros_like(state.lengths), state.lengths
    else:
      segs = state.lengths // self.l
      mem_rows = (np.minimum(segs, self.window) if self.window else segs) * self.c
      mem_rows = mem_rows if self.mode == 'ccf' else 0 * segs
      raw = state.lengths % self.l
    return {'allocated_bytes': int(c.k.nbytes + c.v.nbytes),
            'used_bytes': int((mem_rows + raw).sum() * row), 'memory_rows': int(np.sum(mem_rows)),
            'raw_rows': int(np.sum(raw)), 'bytes_per_row': int(row)}

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
      state = State(self.new_cache(b, 0, 0), np.zeros(b, np.int64))
      last = None
      for start, chunk, num, logits, state in self._chunks(state, prompts, n, self._extend_last):
        ends = jnp.asarray((n > start) & (n <= start + chunk))[:, None]
        last = logits[:, 0] if last is None else jnp.where(ends, logits[:, 0], last)
      return state, last
    first = (n - 1) // l  # Complete segments before each prompt's last one.
    state = State(self.new_cache(b, self._mem_rows(int(n.max()) // l), l, first), n)
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
    cache = self.new_cache(len(docs), self._mem_rows((total - 1) // self.l), self._raw_rows(0))
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
      if not (temperature >= 0 and int(top_k) == top_k and top_k >= 0 and 0 < top_p <= 1):
        raise InferenceError(f'sampling needs temperature >= 0 (0 = greedy), an integer top_k >= '
                             f'0 (0 = off) and 0 < top_p <= 1; got {temperature}, {top_k}, '
                             f'{top_p}.')
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
      self._check_ids(tokens, 'the decoded tokens')
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
    segs = 0 if self.mode == 'full' else context // self.l
    raw = capacity or self._raw_rows(context + 1)
    cache = self.new_cache(batch, self._mem_rows(segs), raw, np.full(batch, segs))
    kk, kv = jax.random.split(jax.random.key(seed))
    cache = cache._replace(k=jax.random.normal(kk, cache.k.shape, self.dtype),
                           v=jax.random.normal(kv, cache.v.shape, self.dtype),
                           raw_len=jnp.full((batch,), context - segs * self.l, jnp.int32))
    if self.mode == 'ccf' and segs:
      kept = np.arange(max(0, segs - self.window) if self.window else 0, segs)
      slot = kept % self.window if self.window else kept
      seg = np.full(cache.mem_segment.shape[1], -1, np.int32)
      for s, at in zip(kept, slot):
        seg[at * self.c:(at + 1) * self.c] = s
      valid = (seg >= 0) & (np.arange(seg.size) % self.c < self.l // self.span)
      cache = cache._replace(mem_segment=jnp.asarray(np.broadcast_to(seg, (batch, seg.size))),
                             mem_valid=jnp.asarray(np.broadcast_to(valid, (batch, seg.size))))
    return State(cache, np.full(batch, context, np.int64))
