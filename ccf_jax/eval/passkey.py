"""Passkey retrieval over a grid of lengths x depths (ccf_jax.tasks.passkey documents).

Each cell is a batch of passkey documents of `length` tokens (a multiple of the segment length, so
the question and answer sit in the last segment) with the key statement at `depth` of the filler,
generated with the export's tokenizer (the key is spelt one token per digit, whatever the tokenizer:
`passkey.digit_ids`, so each answer token is one digit). Two
scores per cell, both answer-only:
  * teacher-forced per-digit accuracy and exact match (`passkey.score`): the model sees the true
    earlier digits;
  * greedy: the model generates the key after the question, digit after digit, each prediction fed
    back; per-digit accuracy and exact match of what it wrote.
Chance is 10% per digit and 10^-digits for the whole key.

Greedy decoding goes through the streaming inference of the generation issue
(`ccf_jax.inference.engine.Engine.generate`: the prompt is prefilled segment by segment into memory, the
key decoded with the KV cache). Preset option `greedy='fallback'` (or an absent inference module)
uses the fallback instead, labelled in the results: the whole window is re-run with
`ccf.arch.lm_logits` for each generated digit (a causal model's prediction at position i does not
depend on the tokens after i, so writing the digit in place and re-running is exact greedy
decoding, only slower than a KV cache). Both give the same tokens up to float ties.

Cells beyond a model's range are n/a with the reason, beyond its trained window labelled
(`eval_common.range_status`). For CCF the memory-off row is the control: with the key outside the
last segment it can only be at chance.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from ccf_jax import data as data_lib
from ccf_jax.eval import common as ec
from ccf_jax.ccf.arch import lm_logits
from ccf_jax.tasks import passkey

CHANCE_DIGIT = 0.1


def _teacher_forced_fn(model, memory: str, ratio):
  """jit (params, tokens [B, L], n, greedy) -> (teacher-forced predictions of the last n tokens
  [B, n], greedy tokens [B, n] or the same predictions when `greedy` is False).

  Greedy here is the fallback path: the whole window re-run with `lm_logits` per generated token
  (exact for a causal model, only slower than a KV cache)."""
  import functools

  import jax
  import jax.numpy as jnp

  cfg = model.config

  @functools.partial(ec.jit, static_argnums=(2, 3))
  def fn(params, tokens, n, greedy):
    b, length = tokens.shape
    batch = {'tokens': tokens, 'loss_mask': jnp.ones_like(tokens, jnp.float32),
             'num_valid_segments': jnp.full((b,), length // model.segment_len, jnp.int32)}
    start = length - n  # The answer occupies the last n tokens.

    def predict(buf):  # Argmax at the n positions that predict the answer tokens.
      logits = lm_logits(cfg, params, dict(batch, tokens=buf), memory, ratio)
      return jnp.argmax(logits[:, start - 1:length - 1], -1).astype(tokens.dtype)

    if not greedy:
      tf = predict(tokens)
      return tf, tf

    def body(j, carry):
      buf, tf = carry
      pred = predict(buf)
      tf = jnp.where(j == 0, pred, tf)  # Step 0 sees the true answer: teacher forcing.
      buf = jax.lax.dynamic_update_slice(buf, jax.lax.dynamic_slice(pred, (0, j), (b, 1)),
                                         (0, start + j))
      return buf, tf

    buf, tf = jax.lax.fori_loop(0, n, body, (tokens, jnp.zeros((b, n), tokens.dtype)))
    return tf, buf[:, start:]

  return fn


def _engine(model, memory: str, ratio):
  """The streaming inference engine (ccf_jax.inference) for greedy decoding, or None when that
  module is absent (then the fallback above decodes)."""
  try:
    from ccf_jax.inference import engine as inference  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return inference.Engine(model.config, model.params, ratio=ratio, memory=memory == 'on',
                          compiler_options=ec.COMPILER_OPTIONS, mesh=model.mesh)


def _score(pred: np.ndarray, batch: dict, n: int) -> dict:
  """passkey.score on predictions of the answer tokens (as one-hot logits of the answer slice)."""
  b = pred.shape[0]
  vocab = int(max(pred.max(), batch['tokens'].max())) + 1
  logits = np.zeros((b, n + 1, vocab), np.float32)
  logits[np.arange(b)[:, None], np.arange(n)[None], pred] = 1.0
  sliced = {'tokens': batch['tokens'][:, -n - 1:], 'loss_mask': batch['loss_mask'][:, -n - 1:]}
  out = passkey.score(logits, sliced)
  return {'per_digit_accuracy': out['per_digit_accuracy'], 'exact_match': out['exact_match']}


def settings(model, controls: bool, windows=(None,)) -> list:
  """(name, ratio, memory, memory_window) rows: each ratio at each memory window (None: the
  export's own), then the memory-off control."""
  if model.arch == 'ccf':
    rows = [(f'ccf {r}x' + ('' if w is None else f', memory_window={w}'), r, 'on', w)
            for r in model.ratios for w in windows]
    return rows + ([('ccf, memory off (control)', None, 'off', None)] if controls else [])
  return [(model.exported_arch, None, 'off', None)]


def with_memory_window(model, window):
  """The model read through `ccf.memory_window=window` (None: unchanged): memory rows of the
  `window` most recent segments only, so rotary positions stay bounded at any length."""
  if window is None:
    return model
  config = ml_collections.ConfigDict(model.config.to_dict())
  config.ccf.memory_window = int(window)
  return dataclasses.replace(model, config=config)


def run(model, p: dict) -> dict:
  """The passkey section with preset `p` (keys: length_segments, depths, batch, digits, seed;
  optional: controls, greedy ('engine' | 'fallback'), teacher_forced (False: greedy only, for
  lengths where a full teacher-forced pass costs too much), filler ('sentences' | 'corpus': the
  test split's text around the key), memory_windows (list of windows to read memory through,
  None = the export's))."""
  tok, l = model.tokenizer, model.segment_len
  filler = (data_lib.split_tokens(model.config, 'test', tok) if p.get('filler') == 'corpus'
            else None)
  teacher_forced = p.get('teacher_forced', True)
  encode = tok.encode
  n = len(passkey.key_tokens(encode, '0' * p['digits']))  # One token per digit.
  lengths = [m * l for m in p['length_segments']]
  out = {'lengths': lengths, 'depths': list(p['depths']), 'batch': p['batch'],
         'digits': p['digits'], 'answer_tokens': n, 'filler': p.get('filler', 'sentences'),
         'chance': {'per_digit_accuracy': CHANCE_DIGIT,
                    'exact_match': CHANCE_DIGIT ** p['digits']},
         'greedy_path': None,
         'rows': []}
  rows = settings(model, p.get('controls', False), p.get('memory_windows') or (None,))
  prog = ec.Progress('passkey', len(rows) * len(lengths) * len(p['depths']))
  base_model = model
  for name, ratio, memory, window in rows:
    model = with_memory_window(base_model, window)
    fn = _teacher_forced_fn(model, memory, ratio)
    engine = _engine(model, memory, ratio) if p.get('greedy', 'engine') == 'engine' else None
    if engine is None and not teacher_forced:
      raise ValueError('passkey teacher_forced=False needs the engine for greedy decoding.')
    out['greedy_path'] = ('ccf_jax.inference.engine.Engine.generate (streaming prefill + KV-cache decode)'
                          if engine is not None else
                          'fallback: lm_logits re-run over the window per generated digit')
    cells = {}
    for length in lengths:
      status, note = ec.range_status(model, length // l)
      if memory == 'off' and model.arch == 'ccf':
        status, note = 'ok', ''
      for di, depth in enumerate(p['depths']):
        key = f'{length}@{depth}'
        if status == 'na':
          cells[key] = ec.na(note)
          prog.update(f'{name} {key} n/a')
          continue
        try:
          batch = passkey.make_batch(encode, p['batch'], length // l, l, float(depth),
                                     seed=p['seed'] + 1000 * length + di, num_digits=p['digits'],
                                     bos_id=tok.bos_id if tok.bos_id >= 0 else None,
                                     filler_tokens=filler)
        except ValueError as e:  # The document cannot hold statement, question and answer.
          cells[key] = ec.na(str(e))
          prog.update(f'{name} {key} n/a')
          continue
        cell = {}
        if teacher_forced:
          tf, greedy = fn(model.params, batch['tokens'], n, engine is None)
          tf, greedy = np.asarray(tf), np.asarray(greedy)
          cell['teacher_forced'] = _score(tf, batch, n)
        if engine is not None:
          gen = engine.generate(list(batch['tokens'][:, :-n]), max_new_tokens=n, temperature=0.0)
          greedy = np.asarray(gen.tokens, np.int32)
        cell.update(greedy=_score(greedy, batch, n),
                    key_start_mean=float(batch['key_start'].mean()))
        if status == 'beyond':
          cell['beyond_trained'] = note
        cells[key] = cell
        prog.update(f"{name} {key} greedy {cell['greedy']['per_digit_accuracy']:.2f}")
    out['rows'].append({'name': name, 'ratio': ratio, 'memory': memory, 'memory_window': window,
                        'cells': cells})
  return out
