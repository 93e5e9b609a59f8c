"""What the inference engine refuses before any device work, each refusal naming its fix.

A bad prompt or option would otherwise surface as a shape error inside a compiled function or,
worse, as silently wrong logits (a token id past the vocabulary gathers a clamped row; a context
past `model.max_position` rotates with positions the model never saw). These checks run on the
host, from the config and the inputs alone, so they cost nothing and need no model.
"""

from __future__ import annotations

import math

import numpy as np


class InferenceError(ValueError):
  """Input the engine cannot serve (empty prompt, unknown token, unsupported length); the message
  names the option that fixes it."""


def max_tokens(mode: str, model_cfg, ccf) -> int | None:
  """The longest context a model supports in this mode with these options (None: any length)."""
  m, l, c, window = model_cfg.max_position, ccf.segment_len, ccf.num_memory, ccf.memory_window
  if mode != 'ccf':
    return m if mode == 'full' else None
  fit = (m - l) // c + 1 if ccf.memory_positions == 'sequential' else m // l  # Segments.
  return None if 0 < window < fit else max(fit, 0) * l


def check_length(total: int, mode: str, model_cfg, ccf):
  limit = max_tokens(mode, model_cfg, ccf)
  if limit is None or total <= limit:
    return
  m = model_cfg.max_position
  if mode == 'full':
    raise InferenceError(
        f'a context of {total} tokens exceeds model.max_position={m} of this '
        f'{model_cfg.arch} model. Fix: a shorter prompt or max_new_tokens, or raise '
        'model.max_position (Engine/Generator max_position=, --max_position) if the model '
        'extrapolates.')
  l = ccf.segment_len
  raise InferenceError(
      f'a context of {total} tokens ({math.ceil(total / l)} segments of ccf.segment_len={l}) '
      f'needs rotary positions beyond model.max_position={m} (memory_positions='
      f"'{ccf.memory_positions}'); this model reads at most {limit} tokens with "
      f'ccf.memory_window={ccf.memory_window}. Fix: bound the memory with ccf.memory_window='
      f'{max(limit // l - 1, 1)} (Engine/Generator memory_window=, --memory_window), which '
      'supports any length, or shorten the prompt / max_new_tokens.')


def check_prompts(prompts, vocab_size: int) -> list:
  """int32 arrays of prompts, each a non-empty sequence of ids < vocab_size (length unchecked)."""
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
    check_ids(a, f'prompt {i}', vocab_size)
    out.append(a.astype(np.int32))
  return out


def check_ids(a: np.ndarray, what: str, vocab_size: int):
  bad = a[(a < 0) | (a >= vocab_size)]
  if bad.size:
    raise InferenceError(f'{what} has token id {int(bad[0])} outside the vocabulary '
                         f'[0, {vocab_size}) (model.vocab_size). Fix: encode with the '
                         "model's own tokenizer (ccf_jax.data.load_tokenizer on the export).")


def check_sampling(temperature, top_k, top_p):
  if not (temperature >= 0 and int(top_k) == top_k and top_k >= 0 and 0 < top_p <= 1):
    raise InferenceError(f'sampling needs temperature >= 0 (0 = greedy), an integer top_k >= '
                         f'0 (0 = off) and 0 < top_p <= 1; got {temperature}, {top_k}, '
                         f'{top_p}.')
