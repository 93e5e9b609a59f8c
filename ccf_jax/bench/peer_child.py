"""One `bench peer` child: one system timed on one shape, in its own process (peer.run_child).

Why a module of its own: the child's peak RSS is what the peer table compares, so a child must
load its own system and nothing else. This module imports only the standard library and
ml_collections at the top; each system's packages are imported inside its function (the torch
child never loads JAX, which would add about 0.16 GB to torch's figure).
"""

from __future__ import annotations

import json
import pickle
import time

import ml_collections


def ccf_jax(cfg, steps: int) -> dict:
  """ccf_jax's real jitted train step (train/timing.py TrainTimer)."""
  import jax
  from ccf_jax.train import timing
  timer = timing.TrainTimer(cfg)  # Compiles and takes the warm-up step.
  c0 = time.process_time()
  block = timer.block(steps)
  cpu = (time.process_time() - c0) / steps
  rec = timer.record(block)
  return {'block_s': block, 'cpu_s': cpu, 'params': timer.params, 'compile_s': rec['compile_s'],
          'temp_bytes': rec.get('temp_bytes'), 'version': f'jax {jax.__version__}'}


def jax_plain(cfg, steps: int) -> dict:
  """The ~100-line plain-JAX step (plain_jax.py)."""
  from ccf_jax.bench import plain_jax
  return plain_jax.time_steps(cfg, steps)


def torch_step(cfg, phase=None):
  """transformers' LlamaForCausalLM (sdpa) with torch AdamW and gradient clipping, float32, on the
  shape cfg names: (step, parameters), where step() runs one training step and returns the loss
  tensor. `phase(name)`, a context manager, wraps each part of the step (forward, backward, clip,
  optimizer) when given: the labels bench profile reads from torch.profiler."""
  import contextlib
  import torch as pt
  from transformers import LlamaConfig, LlamaForCausalLM
  phase = phase or (lambda name: contextlib.nullcontext())
  m, t = cfg.model, cfg.train
  pt.manual_seed(0)
  llama = LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, hidden_act='silu',
      max_position_embeddings=max(m.max_position, cfg.data.seq_len), rms_norm_eps=m.norm_eps,
      rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std,
      use_cache=False, attn_implementation='sdpa')
  model = LlamaForCausalLM(llama).to(pt.float32).train()
  params = list(model.parameters())
  decay = [p for p in params if p.ndim >= 2]  # As ccf_jax's decay mask: no decay on norm scales.
  opt = pt.optim.AdamW([{'params': decay, 'weight_decay': t.weight_decay},
                        {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}],
                       lr=t.lr, betas=(t.b1, t.b2), eps=t.eps)
  gen = pt.Generator().manual_seed(0)
  tokens = pt.randint(0, m.vocab_size, (cfg.data.batch_size, cfg.data.seq_len), generator=gen)

  def step():
    opt.zero_grad(set_to_none=True)
    with phase('forward'):
      loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    with phase('backward'):
      loss.backward()
    if t.clip_norm > 0:
      with phase('clip'):
        pt.nn.utils.clip_grad_norm_(params, t.clip_norm)
    with phase('optimizer'):
      opt.step()
    return loss

  return step, params


def torch(cfg, steps: int) -> dict:
  """The torch peer's step (torch_step), timed."""
  import torch as pt
  import transformers
  t0 = time.time()
  step, params = torch_step(cfg)
  step().item()  # Warm-up.
  setup_s = time.time() - t0
  t0, c0 = time.time(), time.process_time()
  for _ in range(steps):
    loss = step()
  loss.item()
  block, cpu = (time.time() - t0) / steps, (time.process_time() - c0) / steps
  return {'block_s': block, 'cpu_s': cpu, 'params': sum(p.numel() for p in params),
          'compile_s': round(setup_s, 2), 'threads': pt.get_num_threads(),
          'version': f'torch {pt.__version__}, transformers {transformers.__version__}'}


SYSTEMS = {'ccf_jax': ccf_jax, 'torch': torch, 'jax_plain': jax_plain}


def main(spec_path: str, out_path: str) -> None:
  """Runs the system a spec names on its config, writes the JSON result."""
  with open(spec_path, 'rb') as f:
    spec = pickle.load(f)
  res = SYSTEMS[spec['system']](ml_collections.ConfigDict(spec['config']), spec['steps'])
  with open(out_path, 'w') as f:
    json.dump(res, f)
