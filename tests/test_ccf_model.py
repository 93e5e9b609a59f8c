"""The CCF model against an independent naive reference and the method's invariants.

The reference below is written from CCF_METHOD.md alone: a Python loop over windows, segments,
layers and memory slots, its own RMSNorm / rotary / attention, and the released code's position
scheme (memory rows of the visible segments at 0, 1, ... and the raw tokens after them, recomputed
for every query segment). The production path encodes all segments in one batched pass, rotates the
memory once at fixed positions and decodes every segment at once with a block mask.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccf_jax import registry as arch_lib
from ccf_jax.core import config_lib
from ccf_jax.model import decoder as model_lib
from ccf_jax.ccf import arch as ccf_arch, masks
from ccf_jax.ccf.model import module_config
from tests import ccf_testing
from tests.ccf_testing import B, C, L_SEG, jit

T = 3


def small_cfg(**ccf):
  return ccf_testing.small_cfg(T, **ccf)



@functools.lru_cache(maxsize=None)
def _random_params_fn(cfg_json):
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  arch = arch_lib.get_arch(cfg)

  def init(key):
    params = model_lib.init_params(arch.module_config(cfg), key, arch.module_cls)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 100), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape, a.dtype)
                                     for a, k in zip(leaves, keys)])
  return jit(init)


def random_params(cfg, seed=0):
  """Fresh params with every leaf perturbed (LoRA B and norm scales would otherwise hide bugs)."""
  return _random_params_fn(cfg.to_json())(jax.random.key(seed))


def make_batch(cfg, seed=0, num_valid=(T, 2)):
  rng = np.random.default_rng(seed)
  w = cfg.ccf.num_segments * cfg.ccf.segment_len
  tokens = rng.integers(0, cfg.model.vocab_size, (B, w)).astype(np.int32)
  mask = np.ones((B, w), np.float32)
  mask[0, 3] = 0.0  # A masked target inside a valid segment.
  return {'tokens': tokens, 'loss_mask': mask, 'num_valid_segments': np.array(num_valid, np.int32)}


# ------------------------------------------------------------------------------------------------
# The naive reference.


def _rms(x, w, eps):
  return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, pos, theta):  # x [n, heads, D], pos: list of ints
  half = x.shape[-1] // 2
  inv = 1.0 / (theta ** (np.arange(half) * 2.0 / x.shape[-1]))
  ang = np.asarray(pos, np.float64)[:, None] * inv[None]
  cos, sin = jnp.asarray(np.cos(ang))[:, None], jnp.asarray(np.sin(ang))[:, None]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _attention(m, q, k, v, allowed):
  """q [nq, H, D]; k, v [nk, K, D]; allowed: numpy bool [nq, nk]."""
  group = m.num_heads // m.num_kv_heads
  k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
  s = jnp.einsum('qhd,khd->hqk', q, k) / np.sqrt(m.head_dim)
  s = jnp.where(allowed[None], s, -1e30)
  a = jax.nn.softmax(s, -1)
  return jnp.einsum('hqk,khd->qhd', a, v)


def _lora(x, pair, scale):
  return jnp.einsum('nd,dr,rhk->nhk', x, pair['a'], pair['b']) * scale


def _mlp(lp, x, m):
  h = _rms(x, lp['mlp_norm']['scale'], m.norm_eps)
  return (jax.nn.silu(h @ lp['mlp']['w_gate']) * (h @ lp['mlp']['w_up'])) @ lp['mlp']['w_down']


def naive_latents(p, cfg, seg_tokens, span, enc=None):
  """Encoder of one segment: list over layers of [c, d] latents (own loops, own mask)."""
  m, x = cfg.model, cfg.ccf
  l, c = x.segment_len, x.num_memory
  scale = x.lora_alpha / x.lora_rank
  ad = p['adapter']
  mem = jnp.broadcast_to(ad['memory'], (c, m.d_model))
  base = p if enc is None else enc  # enc: the encoder's weights held as constants (see VARIANTS).
  h = jnp.concatenate([base['decoder']['embed'][seg_tokens], mem], 0)
  pos = list(range(l)) + [min((j + 1) * span, l) for j in range(c)]
  allowed = np.zeros((l + c, l + c), bool)
  for q in range(l):
    allowed[q, :q + 1] = True
  for j in range(c):
    allowed[l + j, :(l if x.mask == 'plain' else min((j + 1) * span, l))] = True
    allowed[l + j, l + j] = True
  layers = base['encoder']['layers'] if 'encoder' in base else base['decoder']['layers']
  zs = []
  for li in range(m.num_layers):
    lp = jax.tree.map(lambda a: a[li], layers)
    lo = jax.tree.map(lambda a: a[li], ad)
    n = _rms(h, lp['attn_norm']['scale'], m.norm_eps)
    zs.append(n[l:])
    q = jnp.einsum('nd,dhk->nhk', n, lp['attn']['wq']) + _lora(n, lo['enc_q'], scale)
    k = jnp.einsum('nd,dhk->nhk', n, lp['attn']['wk'])
    v = jnp.einsum('nd,dhk->nhk', n, lp['attn']['wv']) + _lora(n, lo['enc_v'], scale)
    out = _attention(m, _rope(q, pos, m.rope_theta), _rope(k, pos, m.rope_theta), v, allowed)
    h = h + jnp.einsum('nhk,hkd->nd', out, lp['attn']['wo'])
    h = h + _mlp(lp, h, m)
  return zs


def naive_decode(p, cfg, seg_tokens, memories, first_input=None):
  """Decoder of one segment given memories: list of (segment index, [c_r, d] latents per layer),
  oldest first. Positions as the released code (or text positions for 'segment')."""
  m, x = cfg.model, cfg.ccf
  l = x.segment_len
  scale = x.lora_alpha / x.lora_rank
  dp, ad = p['decoder'], p['adapter']
  h = dp['embed'][seg_tokens]
  if first_input is not None:
    h = h.at[0].set(first_input)
  rows = sum(z[0].shape[0] for _, z in memories)
  if x.memory_positions == 'sequential':
    mem_pos, raw_pos = list(range(rows)), [rows + i for i in range(l)]
  else:
    query_seg = memories[-1][0] + 1 if memories else 0
    mem_pos = [s * l + (j + 1) * (l // z[0].shape[0]) - 1 for s, z in memories
               for j in range(z[0].shape[0])]
    raw_pos = [query_seg * l + i for i in range(l)]
  allowed = np.concatenate([np.ones((l, rows), bool), np.tril(np.ones((l, l), bool))], 1)
  for li in range(m.num_layers):
    lp = jax.tree.map(lambda a: a[li], dp['layers'])
    lo = jax.tree.map(lambda a: a[li], ad)
    n = _rms(h, lp['attn_norm']['scale'], m.norm_eps)
    q = _rope(jnp.einsum('nd,dhk->nhk', n, lp['attn']['wq']), raw_pos, m.rope_theta)
    k = _rope(jnp.einsum('nd,dhk->nhk', n, lp['attn']['wk']), raw_pos, m.rope_theta)
    v = jnp.einsum('nd,dhk->nhk', n, lp['attn']['wv'])
    if rows:
      z = jnp.concatenate([zl[li] for _, zl in memories], 0)
      mk = jnp.einsum('nd,dhk->nhk', z, lp['attn']['wk']) + _lora(z, lo['mem_k'], scale)
      mv = jnp.einsum('nd,dhk->nhk', z, lp['attn']['wv']) + _lora(z, lo['mem_v'], scale)
      k = jnp.concatenate([_rope(mk, mem_pos, m.rope_theta), k], 0)
      v = jnp.concatenate([mv, v], 0)
    if rows and 'memory_gate' in ad:  # Its own softmax over the memory rows, added gated.
      out = (_attention(m, q, k[rows:], v[rows:], allowed[:, rows:])
             + jnp.tanh(lo['memory_gate'])[:, None] * _attention(m, q, k[:rows], v[:rows],
                                                                 allowed[:, :rows]))
    else:
      out = _attention(m, q, k, v, allowed)
    h = h + jnp.einsum('nhk,hkd->nd', out, lp['attn']['wo'])
    h = h + _mlp(lp, h, m)
  return _rms(h, dp['final_norm']['scale'], m.norm_eps) @ dp['lm_head']


def naive_window_logits(p, cfg, tokens, num_valid, span, memory=True, enc=None):
  """[T*l, vocab] logits of one window, segment by segment (padded segments: zeros, unscored)."""
  x, m = cfg.ccf, cfg.model
  l = x.segment_len
  c_r = l // span
  segs = [tokens[t * l:(t + 1) * l] for t in range(len(tokens) // l)]
  latents = [[z[:c_r] for z in naive_latents(p, cfg, s, span, enc)] if t < num_valid else None
             for t, s in enumerate(segs)]
  out = []
  for t, seg in enumerate(segs):
    if t >= num_valid:
      out.append(jnp.zeros((l, m.vocab_size)))
      continue
    first = max(0, t - x.memory_window) if x.memory_window else 0
    visible = [(s, latents[s]) for s in range(first, t)] if memory else []
    out.append(naive_decode(p, cfg, seg, visible))
  return jnp.concatenate(out, 0)


def naive_scored(cfg, loss_mask, num_valid):
  l = cfg.ccf.segment_len
  keep = np.array([(i // l) < num_valid and (cfg.ccf.score_first_token or i % l > 0) for i in
                   range(len(loss_mask))], np.float32)
  return loss_mask * keep


def naive_lm_loss(p, cfg, batch, spans, memory=True, enc=None):
  total, count = 0.0, 0.0
  for b in range(len(batch['tokens'])):
    logits = naive_window_logits(p, cfg, batch['tokens'][b], int(batch['num_valid_segments'][b]),
                                 int(spans[b]), memory, enc)
    w = naive_scored(cfg, batch['loss_mask'][b], int(batch['num_valid_segments'][b]))[1:]
    logp = jax.nn.log_softmax(logits[:-1], -1)
    ce = -jnp.take_along_axis(logp, batch['tokens'][b][1:, None], -1)[:, 0]
    total, count = total + (ce * w).sum(), count + w.sum()
  return total, count


def naive_ae_loss(p, cfg, batch, picks, spans, enc=None):
  """Auto-encoding: segment picks[b] compressed alone, then reconstructed after `repeat`."""
  l = cfg.ccf.segment_len
  total = 0.0
  for b, s in enumerate(picks):
    if s >= batch['num_valid_segments'][b]:
      continue
    seg = batch['tokens'][b][s * l:(s + 1) * l]
    zs = [z[:l // spans[b]] for z in naive_latents(p, cfg, seg, int(spans[b]), enc)]
    inputs = np.concatenate([[0], seg[:-1]])
    logits = naive_decode(p, cfg, inputs, [(s, zs)], first_input=p['adapter']['repeat'])
    w = batch['loss_mask'][b][s * l:(s + 1) * l][:-1]
    logp = jax.nn.log_softmax(logits[:-1], -1)
    total = total + (-jnp.take_along_axis(logp, seg[:-1, None], -1)[:, 0] * w).sum()
  return total


# ------------------------------------------------------------------------------------------------
# Tests. Compiled programs are shared between tests where the shapes allow.

CFG = small_cfg()
PARAMS = random_params(CFG, 3)


@functools.lru_cache(maxsize=None)
def logits_fn(memory: str, arch: str = 'ccf'):
  cfg = small_cfg()
  cfg.model.arch = arch
  return jit(lambda p, b: ccf_arch.lm_logits(cfg, p, b, memory).reshape(B, T, L_SEG, -1))


def value_and_grad(loss_fn):
  """jit(value_and_grad) of a loss returning (loss_sum, count, ...): one compilation."""
  return jit(jax.value_and_grad(lambda p: tuple(loss_fn(p)[:2]), has_aux=True))


VARIANTS = {  # Between them, every option of the mechanism.
    'sequential_window_distinct_ratios_ae': dict(
        memory_window=1, distinct_memory_tokens=True, ratios=(4, 8), ae_mode='extra',
        ae_weight=0.5),
    'segment_positions_plain_separate_unscored_first': dict(
        memory_positions='segment', mask='plain', score_first_token=False, shared_weights=False,
        memory_gate='tanh'),
    # The reference reads the encoder's (shared) weights from a constant copy of the params.
    'encoder_constant_base_gated_ae': dict(
        encoder_trains_base=False, memory_gate='tanh', ae_mode='extra', ae_weight=0.5),
}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_loss_and_grads_match_naive_reference(variant):
  """The training objective (LM, + auto-encoding of one given segment per window in the first
  variant) and its gradients against the naive loops."""
  cfg = small_cfg(**VARIANTS[variant])
  params = random_params(cfg)
  batch = make_batch(cfg)
  spans = np.array([4, 8] if cfg.ccf.ratios else [4, 4], np.int32)
  if cfg.ccf.ratios:
    batch['ratio'] = spans  # One window at 4x, one at 8x (2 of the c = 2 slots vs 1).
  batch['ae_segment'] = np.array([2, 1], np.int32)
  w = cfg.ccf.ae_weight
  enc = None if cfg.ccf.encoder_trains_base else jax.tree.map(np.asarray, params)

  def naive(p):
    lm, n = naive_lm_loss(p, cfg, batch, spans, enc=enc)
    if cfg.ccf.ae_mode == 'off':
      return lm, n
    ae_n = 2 * (L_SEG - 1)  # Target 3 of window 0 is masked but lies in segment 0.
    return lm + w * naive_ae_loss(p, cfg, batch, batch['ae_segment'], spans, enc), n + w * ae_n

  (loss, n), grads = value_and_grad(
      lambda p: ccf_arch.ccf_loss(cfg, p, batch, jax.random.key(0)))(params)
  (ref_loss, ref_n), ref_grads = value_and_grad(naive)(params)
  np.testing.assert_allclose(float(n), float(ref_n))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    np.testing.assert_allclose(g, flat_ref[path], rtol=2e-4, atol=2e-6, err_msg=str(path))
  # Not vacuous: the memory (encoder, adapter) and the repeat vector receive gradient.
  assert float(jnp.abs(grads['adapter']['mem_k']['b']).max()) > 0
  assert float(jnp.abs(grads['adapter']['memory']).max()) > 0
  assert (float(jnp.abs(grads['adapter']['repeat']).max()) > 0) == (cfg.ccf.ae_mode != 'off')


def test_alternating_objective_is_lm_or_auto_encoding():
  """ae_mode='alternate' runs the LM step (ae_weight=0) or the auto-encoding step (ae_weight=1,
  which encodes only the picked segment) of ae_mode='extra' (checked above)."""
  batch = make_batch(CFG, 2, num_valid=(T, T))
  batch['ae_segment'] = np.array([0, 2], np.int32)
  loss = lambda cfg: jit(lambda p, b: ccf_arch.ccf_loss(cfg, p, b, jax.random.key(1)))(
      PARAMS, batch)
  extra = loss(small_cfg(ae_mode='extra', ae_weight=1.0))
  lm_only = loss(small_cfg(ae_mode='alternate', ae_weight=0.0))
  ae_only = loss(small_cfg(ae_mode='alternate', ae_weight=1.0))
  np.testing.assert_allclose(float(lm_only[0] + ae_only[0]), float(extra[0]), rtol=1e-5)
  np.testing.assert_allclose(float(lm_only[1] + ae_only[1]), float(extra[1]))
  assert float(ae_only[1]) == 2 * (L_SEG - 1) - 1  # Target 3 of window 0 is masked.


def test_memory_off_and_first_segment_equal_the_base_decoder():
  batch = make_batch(CFG, 3)
  base = jit(lambda p, t: model_lib.bind(CFG.model, p)(t))
  segs = batch['tokens'].reshape(B, T, L_SEG)
  ref = np.stack([np.asarray(base(PARAMS['decoder'], segs[:, t])) for t in range(T)], 1)
  off = np.asarray(logits_fn('off')(PARAMS, batch))
  on = np.asarray(logits_fn('on')(PARAMS, batch))
  np.testing.assert_allclose(off, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(on[:, 0], ref[:, 0], rtol=1e-5, atol=1e-5)
  assert np.abs(on[:, 1:] - ref[:, 1:]).max() > 1e-3  # Later segments do use the memory.
  # Off equals the segment_local arch on the same (decoder) weights.
  sl = np.asarray(logits_fn('off', 'segment_local')(PARAMS['decoder'], batch))
  np.testing.assert_allclose(sl, off, rtol=1e-6, atol=1e-6)


def test_nested_mask_gradient_support():
  cfg = small_cfg(num_memory=4)  # span 2: memory j covers tokens 0 .. 2j+1.
  params = random_params(cfg, 4)
  model = model_lib.bind(module_config(cfg), params, arch_lib.get_arch(cfg).module_cls)
  x = model.decoder.embed_tokens(jnp.asarray(make_batch(cfg)['tokens'][:1, :L_SEG]))
  jac = jit(jax.jacrev(lambda e: model.encode(e, jnp.array([2]))[:, 0]))(x)  # [L, c, d, 1, l, d]
  size = np.asarray(jnp.sqrt((jac ** 2).sum(axis=(2, 3, 5))))  # [L, c, l]
  for layer in range(cfg.model.num_layers):
    for j in range(4):
      for k in range(L_SEG):
        if layer == 0 or k > (j + 1) * 2 - 1:
          assert size[layer, j, k] == 0.0, (layer, j, k)
        else:
          assert size[layer, j, k] > 1e-6, (layer, j, k)


def test_causality_across_segments():
  batch = make_batch(CFG, 5, num_valid=(T, T))
  f = logits_fn('on')
  ref = np.asarray(f(PARAMS, batch))
  for t in range(T):
    changed = dict(batch, tokens=batch['tokens'].copy())
    span = slice(t * L_SEG, (t + 1) * L_SEG)
    changed['tokens'][:, span] = (changed['tokens'][:, span] + 1) % CFG.model.vocab_size
    got = np.asarray(f(PARAMS, changed))
    np.testing.assert_allclose(got[:, :t], ref[:, :t], rtol=1e-6, atol=1e-6)
    if t + 1 < T:  # The next segment sees segment t through its memory only.
      assert np.abs(got[:, t + 1] - ref[:, t + 1]).max() > 1e-4


def test_padded_segments_produce_no_memory_and_no_loss():
  batch = make_batch(CFG, 6, num_valid=(T, 1))
  changed = dict(batch, tokens=batch['tokens'].copy())
  changed['tokens'][1, L_SEG:] = 0
  a = np.asarray(logits_fn('on')(PARAMS, batch))
  b = np.asarray(logits_fn('on')(PARAMS, changed))
  np.testing.assert_allclose(a[1, 0], b[1, 0], rtol=1e-6, atol=1e-6)
  scored = np.asarray(masks.scored_mask(CFG.ccf, batch['loss_mask'], batch['num_valid_segments']))
  assert scored[1, L_SEG:].sum() == 0 and scored[0].sum() == T * L_SEG - 1
  # Padded rows of the memory are never visible, even to later segments.
  def valid_rows(params, b):
    model = model_lib.bind(module_config(CFG), params, arch_lib.get_arch(CFG).module_cls)
    return model.compress(b['tokens'].reshape(B, T, L_SEG), jnp.full((B,), 4),
                          jnp.arange(T)[None] < b['num_valid_segments'][:, None]).valid
  np.testing.assert_array_equal(jit(valid_rows)(PARAMS, batch)[1], np.arange(T * C) < C)


def test_masks_and_positions_follow_the_rules():
  span = jnp.array([2, 4])
  pos, mask = masks.encoder_layout(span, 8, 4)
  np.testing.assert_array_equal(pos[0, 8:], [2, 4, 6, 8])
  np.testing.assert_array_equal(pos[1, 8:], [4, 8, 8, 8])
  np.testing.assert_array_equal(mask[0, 8 + 1, :8], [1, 1, 1, 1, 0, 0, 0, 0])
  assert not mask[0, :8, 8:].any() and bool(mask[0, 9, 9]) and not mask[0, 9, 8]
  np.testing.assert_array_equal(masks.memory_valid(span, 8, 4), [[1, 1, 1, 1], [1, 1, 0, 0]])
  cfg = small_cfg(memory_window=2).ccf
  lo, hi = masks.visible_range(cfg, jnp.arange(5)[None])
  np.testing.assert_array_equal(lo, [[0, 0, 0, 1, 2]])
  assert config_lib.max_relative_position(cfg, 100) == 2 * C + L_SEG
