"""The Llama-family decoder (Flax NNX) with stacked, scanned layers, and its functional wrappers.

Layers are created with `nnx.vmap` so every block parameter has a leading `layers` axis, and applied
with `jax.lax.scan` (compile time flat in depth; with remat this is what saves activation memory on
XLA:CPU, see JAX_NOTES). `scan_layers=False` runs the same stacked parameters in a Python loop, which
is what the FLOP check needs (XLA's cost analysis counts a scan body once).

Parameters leave the module as plain nested dicts (`to_pure` / `from_pure`): the train state,
checkpoints, exports and the Hugging Face converter all speak dicts, and the NNX graph is rebuilt
inside jit from the static graphdef at no runtime cost.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import jax
import ml_collections
import jax.numpy as jnp
from flax import nnx

from ccf_jax.core import config_lib, sharding
from ccf_jax.model import spans
from ccf_jax.model.layers import DTYPES, Block, RMSNorm, dense

REMAT_POLICIES = {  # The names config_lib.REMAT_POLICIES validates.
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
assert tuple(REMAT_POLICIES) == config_lib.REMAT_POLICIES


def causal_mask(length: int) -> jax.Array:
  """bool [1, L, L], True where a query may attend (the dense form of `spans.causal`)."""
  i = jnp.arange(length)
  return (i[:, None] >= i[None, :])[None]


def unstack(tree, n: int) -> list:
  """The n slices of every leaf's leading axis, as n trees: one `lax.split` per leaf, whose
  gradient is one concatenate. Indexing a[i] per layer instead has a pad of the whole stack as
  each slice's gradient, and the n pads are summed: at 30 layers (SmolLM2-135M's shape) those
  sums were about a tenth of the train step on XLA:CPU."""
  leaves, treedef = jax.tree.flatten(tree)
  parts = [[p.reshape(p.shape[1:]) for p in jax.lax.split(a, [1] * n, axis=0)] for a in leaves]
  return [jax.tree.unflatten(treedef, [p[i] for p in parts]) for i in range(n)]


def latent_blocks(num_layers: int) -> int:
  """Blocks the CCF encoder computes in full (`run_layers(latents_from=...)`): the last block's
  attention and MLP are skipped when at least two blocks remain. With a single scanned trip left
  (L=2) XLA:CPU's temp memory grew instead (`bench memory`'s L=2 model: 141 -> 186 MB for
  full_remat at T=32, k=T; cause not found), so L <= 2 keeps the full scan."""
  return num_layers - 1 if num_layers >= 3 else num_layers


@jax.custom_vjp
def head_matmul(x, w):
  """x [B, L, d] @ w [d, V] in their (compute) dtype with float32 products out: bfloat16 logits of
  a large vocabulary would round the loss. Autodiff of a float32-output product would run both
  backward matmuls in float32 on upcast operands (the largest matmuls of a small model); here the
  cotangent is cast to the operands' dtype first, so they run at bfloat16 cost too."""
  return dense(x, w, preferred_element_type=jnp.float32)


def _head_fwd(x, w):
  return head_matmul(x, w), (x, w)


def _head_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  rows = lambda a: a.reshape(-1, a.shape[-1])  # 2-D products, as `dense` runs them (its doc).
  dx = jax.lax.dot_general(rows(g), w, (((1,), (1,)), ((), ()))).reshape(x.shape)
  dw = jax.lax.dot_general(rows(x), rows(g), (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


head_matmul.defvjp(_head_fwd, _head_bwd)


class Decoder(nnx.Module):
  """Embedding -> scanned blocks -> final RMSNorm -> LM head (optionally tied)."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    cfg = ml_collections.FrozenConfigDict(cfg)
    self.cfg = cfg
    pd = DTYPES[cfg.param_dtype]
    self.embed = nnx.Param(
        jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), pd) * cfg.init_std,
        out_sharding=('vocab', 'embed'))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_layers(r):
      return Block(cfg, r)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, DTYPES[cfg.dtype])
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(
          jax.random.normal(rngs.params(), (cfg.d_model, cfg.vocab_size), pd) * cfg.init_std,
          out_sharding=('embed', 'vocab'))

  # ---------------------------------------------------------------------------------------------
  @jax.named_scope('embed')
  def embed_tokens(self, tokens):
    # Gather from an explicitly all-gathered table (the FSDP step, and the vocab shards under
    # tensor parallelism): a lookup into the sharded table leaves the partitioner no efficient way
    # from the table's (vocab, embed) sharding to the activations' (batch) one, and it falls back
    # to an "involuntary full rematerialization". The cotangent is reduce-scattered back.
    table = sharding.constrain(self.embed[...], (None, None))
    x = jnp.take(table, tokens, axis=0).astype(DTYPES[self.cfg.dtype])
    return sharding.constrain(x, ('batch', 'length', 'embed'))

  def run_layers(self, x, positions, mask, xs: Any = None,
                 block_kwargs: Callable[[Any], dict] | None = None, remat_policy: str | None = None,
                 latents_from: int | None = None, constant_weights: bool = False):
    """Applies all blocks. Returns (x, hs) with hs[layer] the normed attention input ([L, B, len, d]).

    xs: an optional pytree with a leading `layers` axis, sliced per layer and turned into extra
    block arguments by `block_kwargs(xs_slice)` (CCF passes per-layer memory K/V and LoRA weights).
    latents_from: the CCF encoder, which keeps only hs at positions latents_from.. (the memory
    tokens): hs holds just those positions, and (see `latent_blocks`) the last block's attention
    and MLP, whose output nothing reads, are skipped (only its input norm runs; x is then the last
    block's input). XLA cannot drop that work itself: a scan's last trip is the same body as every
    other, and its backward runs too, on a zero cotangent. It saves 1/L of the encoder.
    constant_weights: the blocks' own weights are read as constants (their gradient is cut; x
    and xs still receive theirs): the CCF encoder under `ccf.encoder_trains_base=False`.
    """
    cfg = self.cfg
    gdef, lstate = nnx.split(self.layers)
    if constant_weights:
      lstate = jax.lax.stop_gradient(lstate)
    policy_name = cfg.remat_policy if remat_policy is None else remat_policy

    def body(carry, inp):
      layer_state, xs_i = inp
      block = nnx.merge(gdef, layer_state)
      kwargs = block_kwargs(xs_i) if block_kwargs is not None else {}
      y, h = block(carry, positions, mask, **kwargs)
      return y, (h if latents_from is None else h[:, latents_from:])

    if policy_name != 'none':
      body = jax.checkpoint(body, policy=REMAT_POLICIES[policy_name], prevent_cse=not cfg.scan_layers)
    n = cfg.num_layers if latents_from is None else latent_blocks(cfg.num_layers)
    skip_last = n < cfg.num_layers
    if cfg.scan_layers:
      stack = jax.tree.map(lambda a: a[:n], (lstate, xs)) if skip_last else (lstate, xs)
      x, hs = jax.lax.scan(body, x, stack, length=n)
      last_state = jax.tree.map(lambda a: a[n], lstate) if skip_last else None
    else:
      layers = unstack(lstate, cfg.num_layers)
      layer_xs = unstack(xs, cfg.num_layers)
      hs = []
      for i in range(n):
        x, h = body(x, (layers[i], layer_xs[i]))
        hs.append(h)
      hs = jnp.stack(hs)
      last_state = layers[n] if skip_last else None
    if skip_last:
      last = nnx.merge(gdef, last_state)
      hs = jnp.concatenate([hs, last.attn_norm(x[:, latents_from:])[None]])
    return x, hs

  def head_inputs(self, x):
    """(final-normed x, head weight [d, vocab]), both in the compute dtype: what the LM head
    multiplies (`logits`, and `head_loss.head_ce_sums` without whole logits)."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return self.final_norm(x), w.astype(DTYPES[self.cfg.dtype])

  @jax.named_scope('logits')
  def logits(self, x):
    """float32 logits [B, L, vocab] (`head_matmul`: compute-dtype matmuls, float32 results)."""
    return sharding.constrain(head_matmul(*self.head_inputs(x)), ('batch', 'length', 'vocab'))

  def hidden(self, tokens, positions=None, mask=None):
    """Plain causal LM: tokens int32[B, L] -> the last block's output [B, L, d]; the default mask
    is causal, within `model.sliding_window` keys when that is set (get(): exports made before
    the field existed)."""
    length = tokens.shape[-1]
    if positions is None:
      positions = jnp.arange(length)[None]
    if mask is None:
      mask = spans.causal(length, int(self.cfg.get('sliding_window', 0)))
    return self.run_layers(self.embed_tokens(tokens), positions, mask)[0]

  def __call__(self, tokens, positions=None, mask=None):
    """tokens int32[B, L] -> float32 logits [B, L, vocab] (`hidden`, then `logits`)."""
    return self.logits(self.hidden(tokens, positions, mask))


# ------------------------------------------------------------------------------------------------
# Functional wrappers: abstract shapes, shardings, pure-dict params.


def _unsharded():
  """Builds modules with no mesh in scope: NNX would otherwise read the logical names in the
  parameter metadata as mesh axes. Shardings are applied by us, through config.mesh.rules."""
  stack = contextlib.ExitStack()
  stack.enter_context(nnx.use_eager_sharding(False))
  stack.enter_context(jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())))
  return stack


def abstract_module(model_cfg, module_cls=Decoder):
  """The module built abstractly (no allocation)."""
  with _unsharded():
    return nnx.eval_shape(lambda: module_cls(model_cfg, nnx.Rngs(0)))


def logical_specs(model_cfg, module_cls=Decoder):
  """Pure dict of logical PartitionSpecs for every parameter."""
  _, state = nnx.split(abstract_module(model_cfg, module_cls))
  return nnx.to_pure_dict(nnx.get_partition_spec(state))


def abstract_params(model_cfg, module_cls=Decoder):
  """Pure dict of ShapeDtypeStructs for every parameter."""
  _, state = nnx.split(abstract_module(model_cfg, module_cls))
  return nnx.to_pure_dict(state)


def init_params(model_cfg, seed: int, module_cls=Decoder):
  """Real parameters as a pure dict (call under jit with out_shardings to allocate sharded)."""
  with _unsharded():
    module = module_cls(model_cfg, nnx.Rngs(seed))
  return nnx.to_pure_dict(nnx.state(module))


@functools.lru_cache(maxsize=32)
def _graph(model_cfg_json: str, module_cls):
  import ml_collections
  cfg = ml_collections.ConfigDict(__import__('json').loads(model_cfg_json))
  module = abstract_module(cfg, module_cls)
  gdef, state = nnx.split(module)
  return gdef, state


def bind(model_cfg, params, module_cls=Decoder):
  """Rebuilds the NNX module from a pure params dict (trace-time only inside jit)."""
  gdef, template = _graph(model_cfg.to_json(), module_cls)
  leaves = jax.tree.leaves(params)
  treedef = jax.tree.structure(template)
  if treedef.num_leaves != len(leaves):
    raise ValueError(f'params have {len(leaves)} leaves but the model expects {treedef.num_leaves}')
  return nnx.merge(gdef, jax.tree.unflatten(treedef, leaves))


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
