"""Perplexity protocols of the evaluation (CCF_METHOD.md sec. 8): last-N given K, streaming
perplexity vs position, and held-out windows as in training.

All three are token-level next-token perplexities with the export's tokenizer (never compare them
across tokenizers), on held-out documents tokenised as `[bos] + ids + [eos]`.

1. Last N given K (the AutoCompressor protocol). The final N tokens of a document (N a multiple of
   the segment length l, aligned to the document's end) are scored given the K tokens before them,
   K = 0 then doubling from l. The scored targets are the N - 1 predictions made inside those N
   tokens (the first of them has no predictor at K = 0), the same targets at every K, so a row
   reads as "what K tokens of context buy".
     * CCF: the K context tokens are compressed. Segments never see each other in the encoder, so
       a document's last Kmax + N tokens are compressed once, and the tail segments are decoded
       once per K seeing only the memory of the K/l segments before them (`lo` of
       `decode_segments`). Rotary scores depend only on position differences, so this equals
       running the model on the window of the last K + N tokens (checked in tests/test_evaluate.py
       against `ccf.arch.lm_logits` on that window) at a fraction of the cost.
     * memory off / segment_local: the tail segments alone; independent of K by construction.
     * full_attention: one causal pass over the last K + N raw tokens, only within the positions
       it was trained on (beyond: n/a with the reason).
2. Streaming: whole documents (up to a preset length) processed segment by segment with the memory
   of every earlier segment, which is what the streaming prefill computes; the loss per segment
   index gives perplexity as a function of position, at each ratio the checkpoint supports, with
   memory off as the flat reference. Segments beyond the model's position range are not scored
   (the limit is recorded); beyond the trained window they are labelled.
3. Windows: the training pipeline's held-out windows (`make_train_iter(config, 'test')`) with the
   architecture's eval loss, and memory off for CCF: the number the trainer logs.
"""

from __future__ import annotations

import math

import numpy as np

from ccf_jax.eval import common as ec
from ccf_jax import data as data_lib
from ccf_jax.ccf.arch import lm_loss
from ccf_jax.model import decoder as model_lib
from ccf_jax.model.arch import decoder_loss
from ccf_jax.ccf import masks
from ccf_jax.ccf.model import CCFModel, decode_segments, module_config


# ------------------------------------------------------------------------------------------------
# Jitted pieces (built once per model; jit caches per shape).


class _Fns:
  """Jitted compress / decode / full-attention scorers of one model. Every scorer returns
  per-segment (loss_sum, count) [B, n] of next-token CE against explicit targets and weights."""

  def __init__(self, model: ec.EvalModel):
    import jax.numpy as jnp
    import optax

    cfg, l = model.config, model.segment_len

    def sums(logits, targets, weights):
      b = targets.shape[0]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits.reshape(b, -1, logits.shape[-1]),
                                                           targets)
      w = weights.astype(jnp.float32)
      return (ce * w).reshape(b, -1, l).sum(-1), w.reshape(b, -1, l).sum(-1)

    def ccf_model(params):
      return model_lib.bind(module_config(cfg), params, CCFModel)

    def compress(params, tokens, span, valid):
      return ccf_model(params).compress(tokens, span, valid)

    def decode(params, tokens, span, lo, hi, mem, targets, weights):
      decoder = (ccf_model(params).decoder if cfg.model.arch == 'ccf'
                 else model_lib.bind(cfg.model, params, model_lib.Decoder))
      return sums(decode_segments(decoder, cfg.ccf, tokens, span, lo, hi, mem), targets, weights)

    def full(params, tokens, targets, weights):
      return sums(model_lib.bind(cfg.model, params, model_lib.Decoder)(tokens), targets, weights)

    self.compress = ec.jit(compress)
    self.decode = ec.jit(decode)
    self.full = ec.jit(full)
    self.visible_range = lambda segments: masks.visible_range(cfg.ccf, segments, True)
    self.spans = lambda b, ratio: masks.spans(cfg.ccf, b, ratio=ratio)


def _fns(model) -> _Fns:
  if not hasattr(model, '_ppl_fns'):
    model._ppl_fns = _Fns(model)
  return model._ppl_fns


def _groups(docs, size):
  """Batches of `size` documents; the last is completed with copies of doc 0 marked unused."""
  for i in range(0, len(docs), size):
    group = docs[i:i + size]
    yield group + [docs[0]] * (size - len(group)), len(group)


def _add(acc, s, n, used):
  """Appends the per-document sums of a batch (segments summed) to acc = (losses, counts)."""
  acc[0].extend(np.asarray(s).sum(1)[:used])
  acc[1].extend(np.asarray(n).sum(1)[:used])


def _cell(loss_sums, counts, status='ok', note='') -> dict:
  """Aggregate of per-document sums: token-level loss/ppl, and the stderr of per-doc losses."""
  total, n = float(np.sum(loss_sums)), float(np.sum(counts))
  per_doc = np.asarray(loss_sums) / np.maximum(counts, 1)
  cell = {'loss': total / n, 'ppl': ec.ppl(total / n), 'tokens': int(n), 'docs': len(counts),
          'ppl_stderr_docs': ec.stderr(per_doc),
          'doc_losses': [round(float(x), 6) for x in per_doc]}  # For paired comparisons.
  if status == 'beyond':
    cell['beyond_trained'] = note
  return cell


# ------------------------------------------------------------------------------------------------
# 1. Last N given K.


def cut_prefixes(docs, min_tokens: int, n_tail: int, per_doc: int) -> list:
  """Up to `per_doc` prefixes of each document, every one at least `min_tokens` long, whose last
  `n_tail` tokens (the scored tail) do not overlap: the document itself, then ends spread evenly
  back to `min_tokens`. A few long held-out documents then give many scored tails, so the paired
  differences between models have a standard error worth quoting."""
  out = []
  for d in docs:
    room = len(d) - min_tokens  # How far back the end can move.
    step = max(n_tail, room // max(per_doc - 1, 1))
    ends = [len(d) - i * step for i in range(per_doc) if i * step <= room]
    out.extend(d[:e] for e in ends)
  return out


def k_sweep(segment_len: int, max_k: int) -> list:
  """0, then l, 2l, 4l, ... up to max_k tokens."""
  ks, k = [0], segment_len
  while k <= max_k:
    ks.append(k)
    k *= 2
  return ks


def tail_targets(tail: np.ndarray, segment_len: int, score_first_token: bool = True):
  """(targets, weights) [B, N] of the N - 1 predictions inside tails [B, N]: position p predicts
  tail[p + 1]; without `score_first_token` a segment's first token is not scored (as in
  training)."""
  targets = np.concatenate([tail[:, 1:], np.zeros_like(tail[:, :1])], axis=1)
  weights = np.ones(tail.shape, np.float32)
  weights[:, -1] = 0.0
  if not score_first_token:
    weights[:, (np.arange(tail.shape[1]) + 1) % segment_len == 0] = 0.0
  return targets, weights


def last_n_given_k(model, docs, n_tail: int, ks, ratio=None, memory: str = 'on',
                   doc_batch: int = 4, progress=None) -> dict:
  """{K: cell} for one model setting. `docs` must each hold at least max(ks) + n_tail tokens;
  every document contributes its last max(ks) + n_tail tokens."""
  import jax.numpy as jnp
  fns, l, cfg = _fns(model), model.segment_len, model.config
  if n_tail % l or any(k % l for k in ks):
    raise ValueError(f'N={n_tail} and every K={ks} must be multiples of segment_len={l}.')
  nt = n_tail // l
  with_context = model.arch == 'full_attention' or (model.arch == 'ccf' and memory == 'on')
  status = {k: ec.range_status(model, k // l + nt) if with_context else ('ok', '') for k in ks}
  kmax = max([k for k in ks if status[k][0] != 'na'] or [0])  # Never compress unused context.
  t = kmax // l + nt
  sums = {k: ([], []) for k in ks}
  for group, used in _groups(docs, doc_batch):
    windows = np.stack([d[-t * l:] for d in group])
    tail = windows[:, -n_tail:]
    targets, weights = tail_targets(tail, l, bool(cfg.ccf.score_first_token))
    b = len(group)
    if model.arch == 'full_attention':
      for k in ks:
        if status[k][0] == 'na':
          continue
        ctx = windows[:, windows.shape[1] - n_tail - k:]
        pad_t = np.concatenate([np.zeros((b, k), np.int32), targets], 1)
        pad_w = np.concatenate([np.zeros((b, k), np.float32), weights], 1)
        s, n = fns.full(model.params, ctx, pad_t, pad_w)
        _add(sums[k], s, n, used)
    else:
      span = fns.spans(b, ratio)
      q = jnp.asarray(tail.reshape(b, nt, l))
      hi = jnp.broadcast_to(jnp.arange(t - nt, t, dtype=jnp.int32), (b, nt))
      if memory == 'on' and model.arch == 'ccf':
        mem = fns.compress(model.params, windows.reshape(b, t, l), span, np.ones((b, t), bool))
        lo_model, _ = fns.visible_range(hi)
        results = {}
        for k in ks:
          if status[k][0] != 'na':
            lo = jnp.maximum(lo_model, t - nt - k // l)
            results[k] = fns.decode(model.params, q, span, lo, hi, mem, targets, weights)
      else:  # The tail segments alone (memory off / segment_local): the same for every K.
        zero = jnp.zeros_like(hi)
        one = fns.decode(model.params, q, span, zero, zero, None, targets, weights)
        results = {k: one for k in ks}
      for k, (s, n) in results.items():
        _add(sums[k], s, n, used)
    if progress:
      progress.update(f'docs {min(len(sums[0][1]), len(docs))}/{len(docs)}')
  return {k: (ec.na(status[k][1]) if status[k][0] == 'na' else _cell(*sums[k], *status[k]))
          for k in ks}


# ------------------------------------------------------------------------------------------------
# 2. Streaming perplexity vs position.


def streaming(model, docs, max_tokens: int, ratio=None, memory: str = 'on', doc_batch: int = 4,
              scores_budget_bytes: float = 2.5e8, progress=None) -> dict:
  """Per-segment-index loss over whole documents (up to `max_tokens`), every segment seeing the
  memory of all earlier ones (memory 'on'), none ('off'), or one raw pass (full attention)."""
  import jax.numpy as jnp
  fns, l, cfg = _fns(model), model.segment_len, model.config
  t = -(-min(max(len(d) for d in docs), max_tokens) // l)
  limit_note = ''
  if model.arch != 'segment_local' and not (model.arch == 'ccf' and memory == 'off'):
    while t > 1 and ec.range_status(model, t)[0] == 'na':
      t -= 1
      limit_note = ec.range_status(model, t + 1)[1]
  trained = (cfg.ccf.num_segments if model.arch == 'ccf' else model.trained_tokens // l)
  h = cfg.model.num_heads
  r_rows = t * cfg.ccf.num_memory if model.arch == 'ccf' and memory == 'on' else 0
  chunk = max(1, int(scores_budget_bytes // (doc_batch * l * (r_rows + l) * h * 4)))
  chunk = min(chunk, t)
  t_pad = -(-t // chunk) * chunk
  loss, count = np.zeros(t_pad), np.zeros(t_pad)
  for group, used in _groups(docs, doc_batch):
    b = len(group)
    tokens = np.zeros((b, t_pad * l + 1), np.int32)
    weights = np.zeros((b, t_pad * l), np.float32)
    for i, d in enumerate(group[:used]):
      n = min(len(d), t * l + 1)
      tokens[i, :n] = d[:n]
      weights[i, :n - 1] = 1.0
    if not cfg.ccf.score_first_token:
      weights[:, (np.arange(t_pad * l) + 1) % l == 0] = 0.0
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if model.arch == 'full_attention':
      s, n = fns.full(model.params, inputs[:, :t * l], targets[:, :t * l], weights[:, :t * l])
      s, n = (np.pad(np.asarray(a), ((0, 0), (0, t_pad - t))) for a in (s, n))
    else:
      span = fns.spans(b, ratio)
      segs = inputs.reshape(b, t_pad, l)
      mem = None
      if model.arch == 'ccf' and memory == 'on':
        valid = (weights.reshape(b, t_pad, l).sum(-1) > 0) | (np.arange(t_pad) < 1)[None]
        mem = fns.compress(model.params, segs, span, valid)
      s_all, n_all = [], []
      for c0 in range(0, t_pad, chunk):
        hi = jnp.broadcast_to(jnp.arange(c0, c0 + chunk, dtype=jnp.int32), (b, chunk))
        lo, hi = fns.visible_range(hi) if mem is not None else (jnp.zeros_like(hi),) * 2
        sl = slice(c0 * l, (c0 + chunk) * l)
        s, n = fns.decode(model.params, segs[:, c0:c0 + chunk], span, lo, hi, mem,
                          targets[:, sl], weights[:, sl])
        s_all.append(np.asarray(s)), n_all.append(np.asarray(n))
      s, n = np.concatenate(s_all, 1), np.concatenate(n_all, 1)
    loss += s[:used].sum(0)
    count += n[:used].sum(0)
    if progress:
      progress.update()
  loss, count = loss[:t], count[:t]
  keep = count > 0
  return {'positions': (np.arange(t) * l)[keep].tolist(),
          'loss': (loss[keep] / count[keep]).tolist(), 'tokens': count[keep].astype(int).tolist(),
          'ppl_total': ec.ppl(loss.sum() / max(count.sum(), 1)), 'tokens_total': int(count.sum()),
          'trained_tokens': int(trained * l), 'scored_up_to': int(t * l),
          'limit': limit_note, 'docs': len(docs)}


# ------------------------------------------------------------------------------------------------
# 3. Held-out windows (the trainer's eval loss).


def heldout_windows(model, max_batches: int, memory: str = 'on') -> dict:
  """Token-level loss over up to `max_batches` batches of the test split's training windows."""
  import jax

  cfg = model.config
  if model.exported_arch == 'decoder':
    step = ec.jit(lambda p, b: decoder_loss(cfg, p, b, None))
  else:
    step = ec.jit(lambda p, b: lm_loss(cfg, p, b, memory))
  if model.exported_arch == 'decoder':  # The packed pipeline of its training.
    cfg = cfg.copy_and_resolve_references()
    cfg.model.arch = 'decoder'
  total = count = correct = 0.0
  for i, batch in enumerate(data_lib.make_train_iter(cfg, 'test', 0, 1)):
    if i >= max_batches:
      break
    s, n, aux = jax.device_get(step(model.params, dict(batch)))
    total, count, correct = total + float(s), count + float(n), correct + float(aux['correct'])
  if count == 0:
    return ec.na('the test split yields no scored tokens')
  return {'loss': total / count, 'ppl': ec.ppl(total / count), 'accuracy': correct / count,
          'tokens': int(count)}


# ------------------------------------------------------------------------------------------------
# The section.


def settings(model) -> list:
  """(row name, ratio, memory) of every setting this export is measured in."""
  if model.arch == 'ccf':
    rows = [(f'ccf {r}x', r, 'on') for r in model.ratios]
    return rows + [('ccf, memory off (segment-local, same weights)', None, 'off')]
  return [(model.exported_arch, None, 'off')]


def run(model, p: dict) -> dict:
  """The ppl section with preset `p` (keys: docs, n_tail, k_max, stream_tokens, doc_batch,
  window_batches, and optionally tails_per_doc: scored tails cut from each document)."""
  l = model.segment_len
  n_tail = p['n_tail_segments'] * l
  docs = ec.documents(model, p['split'], p['docs'], min_tokens=n_tail + l)
  k_max = min(p['k_max'], min(len(d) for d in docs) - n_tail)
  ks = k_sweep(l, k_max)
  tails = cut_prefixes(docs, max(ks) + n_tail, n_tail, int(p.get('tails_per_doc', 1)))
  rows = settings(model)
  out = {'tokenizer': model.tokenizer.model_path, 'split': p['split'],
         'corpus': str(model.config.data.corpus), 'docs': len(docs),
         'doc_tokens': [int(len(d)) for d in docs], 'n_tail': n_tail, 'ks': ks,
         'tails': len(tails), 'tail_ends': [int(len(d)) for d in tails],
         'targets_per_doc': n_tail - 1, 'last_n': [], 'streaming': []}
  groups = math.ceil(len(tails) / p['doc_batch'])
  prog = ec.Progress('ppl last-N given K', groups * len(rows))
  for name, ratio, memory in rows:
    cells = last_n_given_k(model, tails, n_tail, ks, ratio, memory, p['doc_batch'], prog)
    out['last_n'].append({'name': name, 'ratio': ratio, 'memory': memory,
                          'cells': {str(k): v for k, v in cells.items()}})
  prog = ec.Progress('ppl streaming', math.ceil(len(docs) / p['doc_batch']) * len(rows))
  for name, ratio, memory in rows:
    res = streaming(model, docs, p['stream_tokens'], ratio, memory, p['doc_batch'], progress=prog)
    out['streaming'].append({'name': name, 'ratio': ratio, 'memory': memory, **res})
  out['windows'] = {'test': heldout_windows(model, p['window_batches'])}
  if model.arch == 'ccf':
    out['windows']['test_memory_off'] = heldout_windows(model, p['window_batches'], 'off')
  return out
