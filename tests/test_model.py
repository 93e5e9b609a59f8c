"""The decoder against an independent naive reference (plain jnp, unscanned, unsharded)."""

import zlib

import jax
import jax.extend.core
import numpy as np
import pytest

from ccf_jax.model import decoder as model_lib
from experiments import tiny


def tiny_cfg(**kw):
  cfg = tiny.get_config().model
  cfg.vocab_size = 97
  cfg.d_model = 32
  cfg.num_layers = 3
  cfg.num_heads = 4
  cfg.num_kv_heads = 2
  cfg.head_dim = 8
  cfg.mlp_dim = 48
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def naive_forward(p, cfg, tokens):
  """Textbook Llama forward, one layer and one head at a time, no einsum tricks (with Qwen2's
  q/k/v biases and Mistral's sliding window when the config has them)."""
  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

  def rope(x, pos):  # x [L, D]
    half = cfg.head_dim // 2
    inv = 1.0 / (cfg.rope_theta ** (np.arange(half) * 2.0 / cfg.head_dim))
    ang = pos[:, None] * inv[None]
    x1, x2 = x[:, :half], x[:, half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  length = tokens.shape[0]
  pos = np.arange(length, dtype=np.float64)
  x = p['embed'][tokens]
  group = cfg.num_heads // cfg.num_kv_heads
  i = np.arange(length)
  visible = (i[:, None] >= i[None]) & (
      (i[:, None] - i[None] < cfg.sliding_window) if cfg.sliding_window else True)
  bias = lambda lp, name, head: lp['attn'][name][head] if cfg.qkv_bias else 0.0
  for li in range(cfg.num_layers):
    lp = jax.tree.map(lambda a: a[li], p['layers'])
    h = rms(x, lp['attn_norm']['scale'])
    out = np.zeros_like(x)
    for head in range(cfg.num_heads):
      kvh = head // group
      q = rope(h @ lp['attn']['wq'][:, head] + bias(lp, 'bq', head), pos)
      k = rope(h @ lp['attn']['wk'][:, kvh] + bias(lp, 'bk', kvh), pos)
      v = h @ lp['attn']['wv'][:, kvh] + bias(lp, 'bv', kvh)
      s = q @ k.T / np.sqrt(cfg.head_dim)
      s = np.where(visible, s, -np.inf)
      a = np.exp(s - s.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      out += (a @ v) @ lp['attn']['wo'][head]
    x = x + out
    h = rms(x, lp['mlp_norm']['scale'])
    g = h @ lp['mlp']['w_gate']
    x = x + ((g / (1 + np.exp(-g))) * (h @ lp['mlp']['w_up'])) @ lp['mlp']['w_down']
  x = rms(x, p['final_norm']['scale'])
  head = p['embed'].T if cfg.tie_embeddings else p['lm_head']
  return x @ head


@pytest.mark.parametrize('tie,scan,window,bias', [(False, True, 0, False), (True, False, 0, False),
                                                   (False, True, 4, True)])
def test_decoder_matches_naive_reference(tie, scan, window, bias):
  """Also a sliding window of 4 keys on 11 tokens and q/k/v biases (Mistral, Qwen2)."""
  cfg = tiny_cfg(tie_embeddings=tie, scan_layers=scan, sliding_window=window, qkv_bias=bias)
  params = model_lib.init_params(cfg, seed=1)
  # Perturb norm scales and biases so they are not all ones / zeros (a bug ignoring them would
  # pass otherwise).
  perturb = lambda path: any(k in str(path) for k in ("'scale'", "'bq'", "'bk'", "'bv'"))
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.1 * jax.random.normal(jax.random.key(zlib.crc32(str(path).encode())),
                                                  a.shape)
      if perturb(path) else a, params)
  tokens = np.array(jax.random.randint(jax.random.key(0), (2, 11), 0, cfg.vocab_size))
  logits = jax.jit(lambda p, t: model_lib.bind(cfg, p)(t))(params, tokens)
  for b in range(2):
    ref = naive_forward(params, cfg, tokens[b])
    np.testing.assert_allclose(np.asarray(logits[b]), ref, rtol=2e-4, atol=2e-4)


def test_unrolled_layers_gradient_is_one_concatenate_per_stacked_weight():
  """The LM loss's gradient with unrolled layers (scan_layers=False) equals the scanned layers',
  and its jaxpr has no pad: the per-layer weight gradients are gathered with concatenates, not
  pads of the whole stack summed over layers (what indexing each layer's slice gives, O(layers^2)
  work), and the loss shifts its targets rather than slicing the logits (whose gradient would be
  a pad of the [B, L, vocab] array)."""
  from ccf_jax.model import arch
  batch = {'tokens': np.array(jax.random.randint(jax.random.key(0), (2, 11), 0, 97)),
           'loss_mask': np.ones((2, 11), np.float32)}

  def grads(scan):
    cfg = tiny.get_config()
    cfg.model = tiny_cfg(scan_layers=scan)
    loss = lambda p: arch.decoder_loss(cfg, p, batch, None)[0]
    return jax.grad(loss), model_lib.init_params(cfg.model, seed=1)

  (g_scan, params), (g_unrolled, _) = grads(True), grads(False)
  for a, b in zip(jax.tree.leaves(jax.jit(g_scan)(params)),
                  jax.tree.leaves(jax.jit(g_unrolled)(params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  counts = {'pad': 0, 'concatenate': 0}  # Of arrays of rank >= 3 (the targets' shift pads [B, L]).

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in counts and eqn.outvars[0].aval.ndim >= 3:
        counts[eqn.primitive.name] += 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(g_unrolled)(params).jaxpr)
  assert counts['pad'] == 0 and counts['concatenate'] >= len(jax.tree.leaves(params['layers']))


def test_bind_roundtrip_keeps_paths():
  cfg = tiny_cfg()
  params = model_lib.init_params(cfg, seed=0)
  module = model_lib.bind(cfg, params)
  from flax import nnx
  back = nnx.to_pure_dict(nnx.state(module))
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_stacked_params_have_layer_axis_and_logical_names():
  cfg = tiny_cfg()
  specs = model_lib.logical_specs(cfg)
  assert tuple(specs['layers']['attn']['wq']) == ('layers', 'embed', 'heads', 'head_dim')
  assert tuple(specs['embed']) == ('vocab', 'embed')
  shapes = model_lib.abstract_params(cfg)
  assert shapes['layers']['mlp']['w_gate'].shape == (3, 32, 48)


@pytest.mark.parametrize('tie,dtype', [(False, 'float32'), (True, 'bfloat16')])
def test_fused_head_loss_equals_the_whole_logits(tie, dtype):
  """`model.loss_chunk` (model/head_loss.py: gradients made in the forward, chunk by chunk) against
  the naive reference's loss and autodiff through whole logits: chunks of 4 over 11 positions
  (the last one padded), a loss mask with holes, tied and untied heads, bfloat16 compute."""
  import jax.numpy as jnp
  import optax
  from ccf_jax.model import arch
  cfg = tiny.get_config()
  cfg.model = tiny_cfg(tie_embeddings=tie, dtype=dtype)
  params = model_lib.init_params(cfg.model, seed=2)
  r = np.random.default_rng(0)
  tokens = jnp.asarray(r.integers(0, cfg.model.vocab_size, (2, 11)), jnp.int32)
  batch = {'tokens': tokens, 'loss_mask': jnp.asarray(r.random((2, 11)) < 0.7, jnp.float32)}

  def loss(chunk):
    c = cfg.copy_and_resolve_references()
    c.model.loss_chunk = chunk
    # Scaled, so that the backward's cotangent is not 1.
    fn = lambda p: (lambda s, n, aux: (0.37 * s, (n, aux['correct'])))(
        *arch.decoder_loss(c, p, batch, None))
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (whole, (n0, ok0)), g0 = loss(0)
  (fused, (n1, ok1)), g1 = loss(4)
  tol = 2e-2 if dtype == 'bfloat16' else 1e-5
  np.testing.assert_allclose(fused, whole, rtol=tol)
  assert float(n1) == float(n0) and float(ok1) == float(ok0)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.abs(b).max()))
  if dtype == 'float32':
    w = np.asarray(batch['loss_mask'])[:, 1:]
    ref = sum((optax.softmax_cross_entropy_with_integer_labels(
        naive_forward(params, cfg.model, np.asarray(tokens[b]))[:-1],
        np.asarray(tokens[b, 1:])) * w[b]).sum() for b in range(2))
    np.testing.assert_allclose(fused, 0.37 * ref, rtol=1e-4)


def test_fused_head_loss_needs_the_batch_on_one_device():
  """Its head gradient accumulates in a replicated carry: a batch split over devices would
  all-reduce all of it once per chunk, so such a mesh is refused with the fix."""
  from ccf_jax.core import config_lib
  cfg = tiny.get_config()
  cfg.model.loss_chunk = 64
  config_lib.validate(cfg, 1)
  with pytest.raises(config_lib.ConfigError,
                     match=r'split it over 8.*Fix: --config.model.loss_chunk=0'):
    config_lib.validate(cfg, 8)
