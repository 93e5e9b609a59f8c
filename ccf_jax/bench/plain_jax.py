"""The plain-JAX peer of `bench peer`: the Llama train step as a user would write it in ~100 lines.

Why: the torch peer says whether ccf_jax is slow for the machine; this one says whether ccf_jax's
layers (logical sharding, NNX modules, the attention switch, the CCF hooks) cost anything over the
same model written directly in jnp, on the same JAX and XLA. It is deliberately the obvious code:
[B, L, H*D] projections, `jnp.repeat` for grouped kv heads, a dense causal softmax over the whole
[B, H, L, L] score array, an unrolled Python loop over layers, optax AdamW with global-norm
clipping, `jax.jit` with the state donated. Same model, loss and update as ccf_jax's plain
decoder; the learning-rate schedule is a constant (a scalar per step either way). Weights are in
its own layout; `from_ccf_jax` maps ccf_jax's parameters into it (tests/test_bench_peer.py checks
the two losses and gradients agree).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def init(m, key) -> dict:
  """Parameters of model config `m`: normal with std `init_std` (the residual outputs wo and w_down
  scaled by 1/sqrt(2 * layers), as ccf_jax's), ones for norm scales."""
  d, h, k, hd, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
  keys = iter(jax.random.split(key, 7 * m.num_layers + 2))
  w = lambda *shape, s=1.0: jax.random.normal(next(keys), shape, jnp.float32) * m.init_std * s
  out = 1.0 / math.sqrt(2 * m.num_layers)
  layers = [dict(attn_norm=jnp.ones(d), wq=w(d, h * hd), wk=w(d, k * hd), wv=w(d, k * hd),
                 wo=w(h * hd, d, s=out), mlp_norm=jnp.ones(d), w_gate=w(d, f), w_up=w(d, f),
                 w_down=w(f, d, s=out)) for _ in range(m.num_layers)]
  p = dict(embed=w(m.vocab_size, d), layers=layers, final_norm=jnp.ones(d))
  if not m.tie_embeddings:
    p['head'] = w(d, m.vocab_size)
  return p


def from_ccf_jax(m, params) -> dict:
  """ccf_jax's decoder parameters (stacked layers, [d, heads, head_dim] projections) in this
  module's layout."""
  lay, d = params['layers'], m.d_model

  def att(name, i):  # [d, heads, head_dim] -> [d, heads * head_dim]; wo the other way round.
    w = lay['attn'][name][i]
    return w.reshape(-1, d) if name == 'wo' else w.reshape(d, -1)

  layers = [dict(attn_norm=lay['attn_norm']['scale'][i], mlp_norm=lay['mlp_norm']['scale'][i],
                 **{n: att(n, i) for n in ('wq', 'wk', 'wv', 'wo')},
                 **{n: lay['mlp'][n][i] for n in ('w_gate', 'w_up', 'w_down')})
            for i in range(m.num_layers)]
  p = dict(embed=params['embed'], layers=layers, final_norm=params['final_norm']['scale'])
  if not m.tie_embeddings:
    p['head'] = params['lm_head']
  return p


def _rms(x, scale, eps):
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _rope(x, theta):  # x [B, L, H, D], positions 0..L-1, half-split rotation.
  d = x.shape[-1]
  ang = jnp.arange(x.shape[1])[:, None] * (1.0 / theta ** (jnp.arange(0, d, 2) / d))
  cos, sin = jnp.cos(ang)[:, None], jnp.sin(ang)[:, None]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def loss_fn(m, p, tokens):
  """Mean next-token cross-entropy of tokens int32[B, L]."""
  b, length = tokens.shape
  h, k, hd = m.num_heads, m.num_kv_heads, m.head_dim
  causal = jnp.tril(jnp.ones((length, length), bool))
  x = p['embed'][tokens]
  for lp in p['layers']:
    a = _rms(x, lp['attn_norm'], m.norm_eps)
    q = _rope((a @ lp['wq']).reshape(b, length, h, hd), m.rope_theta)
    kk = jnp.repeat(_rope((a @ lp['wk']).reshape(b, length, k, hd), m.rope_theta), h // k, 2)
    v = jnp.repeat((a @ lp['wv']).reshape(b, length, k, hd), h // k, 2)
    s = jnp.einsum('bqhd,bkhd->bhqk', q, kk) / math.sqrt(hd)
    probs = jax.nn.softmax(jnp.where(causal, s, jnp.finfo(s.dtype).min), axis=-1)
    x = x + jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, length, h * hd) @ lp['wo']
    a = _rms(x, lp['mlp_norm'], m.norm_eps)
    x = x + (jax.nn.silu(a @ lp['w_gate']) * (a @ lp['w_up'])) @ lp['w_down']
  x = _rms(x, p['final_norm'], m.norm_eps)
  logits = x @ (p['embed'].T if m.tie_embeddings else p['head'])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  return ce.mean()


def optimizer(t) -> optax.GradientTransformation:
  """AdamW (no decay on norm scales, as ccf_jax's mask) after global-norm clipping."""
  decay = lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)
  adamw = optax.adamw(t.lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay)
  return optax.chain(optax.clip_by_global_norm(t.clip_norm), adamw) if t.clip_norm > 0 else adamw


def make_step(cfg):
  """(init_state(key), step(state, tokens) -> (state, loss)), the step jitted with state donated."""
  m, tx = cfg.model, optimizer(cfg.train)

  def init_state(key):
    p = init(m, key)
    return p, tx.init(p)

  def _step(state, tokens):
    p, opt = state
    loss, g = jax.value_and_grad(lambda p: loss_fn(m, p, tokens))(p)
    updates, opt = tx.update(g, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  return init_state, jax.jit(_step, donate_argnums=0)


def time_steps(cfg, steps: int) -> dict:
  """bench peer's child: compile and warm up, then time one block of `steps` steps. A model this
  loop does not write (biases, a sliding window, scaled rotary) is refused, not timed as another."""
  m = cfg.model
  extra = [f for f in ('qkv_bias', 'sliding_window', 'rope_scaling') if m.get(f)]
  if extra:
    raise ValueError(f'jax_plain writes the plain Llama block only; model.{extra[0]} is set. Fix: '
                     'leave jax_plain out (--peer_systems=ccf_jax,torch) for this config.')
  init_state, step = make_step(cfg)
  t0 = time.time()
  state = jax.jit(init_state)(jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.model.vocab_size,
                                    (cfg.data.batch_size, cfg.data.seq_len)), jnp.int32)
  state, loss = step(state, tokens)  # Compile + warm-up.
  loss.block_until_ready()
  setup_s = time.time() - t0
  t0, c0 = time.time(), time.process_time()
  for _ in range(steps):
    state, loss = step(state, tokens)
  loss.block_until_ready()
  return {'block_s': (time.time() - t0) / steps, 'cpu_s': (time.process_time() - c0) / steps,
          'params': sum(int(a.size) for a in jax.tree.leaves(state[0])),
          'compile_s': round(setup_s, 2), 'version': f'jax {jax.__version__} (plain loop)'}
