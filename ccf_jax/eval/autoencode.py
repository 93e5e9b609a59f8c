"""Auto-encoding (information recovery, CCF_METHOD.md sec. 4): compress one held-out segment, then
reconstruct it from its memory alone.

The decoder sees the learned `repeat` vector followed by the segment, exactly as in the auto-
encoding objective (`ccf.arch.ae_sums`), and must reproduce the segment's first l - 1 tokens:
  * teacher-forced: `ae_sums` itself (cross-entropy and token accuracy with the true previous
    tokens as input);
  * greedy (free-running): the decoder writes the reconstruction token by token from the repeat
    vector, each argmax fed back; scored by token accuracy (position by position), exact-match rate
    (the whole segment right), ROUGE-L F1 on token ids and on the words of the decoded text, and
    corpus-level BLEU-4 on token ids (the paper reports BLEU-4 and ROUGE-L).

ROUGE-L is computed from its definition (Lin 2004): with LCS the longest common subsequence of a
candidate c and a reference r, P = LCS / |c|, R = LCS / |r|, and F = 2PR / (P + R) (beta = 1, the
convention of the `rouge-score` package). The LCS dynamic programme is vectorised per row: row i
of the table is the running maximum of max(prev[j], prev[j-1] + [c_i == r_j]), which equals the
textbook recursion because a match never lowers the table.

Segments: evenly spaced, segment-aligned l-token slices of held-out documents (not the first
segment, whose bos makes it atypical). Only CCF exports have a memory to reconstruct from; the
others get n/a. A model trained with `ccf.ae_mode='off'` is still measured, with that noted.
"""

from __future__ import annotations

import numpy as np

from ccf_jax.eval import common as ec
from ccf_jax.model import decoder as model_lib
from ccf_jax.ccf.arch import ae_sums
from ccf_jax.ccf.model import CCFModel, decode_segments, module_config


def lcs_length(a, b) -> int:
  """Length of the longest common subsequence of two sequences (vectorised row DP)."""
  a, b = (np.asarray(list(x) if isinstance(x, str) else x) for x in (a, b))
  if len(a) == 0 or len(b) == 0:
    return 0
  prev = np.zeros(len(b) + 1, np.int64)
  for x in a:
    cand = np.maximum(prev[1:], prev[:-1] + (b == x))
    prev = np.concatenate([[0], np.maximum.accumulate(cand)])
  return int(prev[-1])


def rouge_l(candidate, reference) -> dict:
  """ROUGE-L precision, recall and F1 of a candidate against a reference (token sequences)."""
  lcs = lcs_length(candidate, reference)
  p = lcs / len(candidate) if len(candidate) else 0.0
  r = lcs / len(reference) if len(reference) else 0.0
  f = 2 * p * r / (p + r) if p + r > 0 else 0.0
  return {'precision': p, 'recall': r, 'f1': f}


def _ngrams(seq, n: int) -> dict:
  out = {}
  for i in range(len(seq) - n + 1):
    g = tuple(seq[i:i + n])
    out[g] = out.get(g, 0) + 1
  return out


def bleu4(candidates, references) -> dict:
  """Corpus-level BLEU-4 (Papineni et al. 2002): modified n-gram precisions p_n (each candidate
  n-gram counted at most as often as in its reference), summed over the corpus for n = 1..4,
  their geometric mean times the brevity penalty exp(1 - r/c) when the candidates are shorter
  (c < r, total lengths). No smoothing: 0 when some p_n is 0."""
  import math
  hits, totals = [0] * 4, [0] * 4
  c_len = r_len = 0
  for cand, ref in zip(candidates, references):
    cand, ref = [int(x) if not isinstance(x, str) else x for x in cand], list(ref)
    c_len, r_len = c_len + len(cand), r_len + len(ref)
    for n in range(1, 5):
      cg, rg = _ngrams(cand, n), _ngrams(ref, n)
      hits[n - 1] += sum(min(k, rg.get(g, 0)) for g, k in cg.items())
      totals[n - 1] += max(len(cand) - n + 1, 0)
  precisions = [h / t if t else 0.0 for h, t in zip(hits, totals)]
  if min(precisions) == 0.0 or c_len == 0:
    return {'bleu4': 0.0, 'precisions': precisions}
  bp = 1.0 if c_len >= r_len else math.exp(1.0 - r_len / c_len)
  return {'bleu4': bp * math.exp(sum(math.log(p) for p in precisions) / 4),
          'precisions': precisions, 'brevity_penalty': bp}


def sample_segments(docs, segment_len: int, count: int) -> np.ndarray:
  """int32[count, l]: evenly spaced segment-aligned slices (skipping each document's first)."""
  pool = [(i, s) for i, d in enumerate(docs) for s in range(1, len(d) // segment_len)]
  if not pool:
    raise ValueError(f'no held-out document has two full segments of {segment_len} tokens.')
  picks = np.linspace(0, len(pool) - 1, min(count, len(pool))).round().astype(int)
  return np.stack([docs[pool[j][0]][pool[j][1] * segment_len:(pool[j][1] + 1) * segment_len]
                   for j in picks]).astype(np.int32)


def _fns(model):
  """jit (params, seg [B, l], span, valid [B]) -> teacher-forced (ce_sum, count, correct) over the
  valid rows and the greedy reconstructions [B, l - 1]."""
  import jax
  import jax.numpy as jnp

  cfg = model.config

  @ec.jit
  def fn(params, seg, span, valid):
    m = model_lib.bind(module_config(cfg), params, CCFModel)
    b, l = seg.shape
    pick = jnp.zeros((b,), jnp.int32)
    mem = m.compress(seg[:, None], span, valid[:, None], segments=pick[:, None])
    ce, n, ok = ae_sums(cfg, m, seg[:, None], jnp.ones((b, l), jnp.float32), pick, valid, span, mem)

    def body(i, buf):  # buf[:, 0] is replaced by the repeat vector; buf[:, i+1] <- argmax at i.
      logits = decode_segments(m.decoder, cfg.ccf, buf[:, None], span, pick[:, None],
                               pick[:, None] + 1, mem, first_input=m.adapter.repeat[...])
      nxt = jnp.argmax(jax.lax.dynamic_slice_in_dim(logits[:, 0], i, 1, axis=1), -1)
      return jax.lax.dynamic_update_slice(buf, nxt.astype(buf.dtype), (0, i + 1))

    buf = jax.lax.fori_loop(0, l - 1, body, jnp.zeros_like(seg))
    return ce, n, ok, buf[:, 1:]

  return fn


def run(model, p: dict) -> dict:
  """The ae section with preset `p` (keys: segments, docs, split, batch)."""
  if model.arch != 'ccf':
    return ec.na(f'{model.exported_arch} has no compressed memory to reconstruct from')
  import jax.numpy as jnp
  l, tok = model.segment_len, model.tokenizer
  docs = ec.documents(model, p['split'], p['docs'], min_tokens=2 * l)
  segs = sample_segments(docs, l, p['segments'])
  fn = _fns(model)
  out = {'segments': int(len(segs)), 'reconstructed_tokens': l - 1,
         'trained_with_ae': model.config.ccf.ae_mode != 'off',
         'rouge_l': 'F1 of LCS precision/recall (Lin 2004, beta=1), on token ids and on words',
         'rows': []}
  if not out['trained_with_ae']:
    out['note'] = 'ccf.ae_mode=off: the repeat vector was never trained'
  bsz = p['batch']
  prog = ec.Progress('ae', len(model.ratios) * -(-len(segs) // bsz))
  for r in model.ratios:
    ce = n = ok = 0.0
    hits, exact, rl_tok, rl_word, cands, refs = [], [], [], [], [], []
    for i in range(0, len(segs), bsz):
      seg = segs[i:i + bsz]
      used = len(seg)
      if used < bsz:
        seg = np.concatenate([seg, np.repeat(seg[:1], bsz - used, 0)])
      c, k, o, rec = fn(model.params, seg, jnp.full((bsz,), r, jnp.int32), np.arange(bsz) < used)
      ce, n, ok = ce + float(c), n + float(k), ok + float(o)
      rec, ref = np.asarray(rec)[:used], seg[:used, :l - 1]
      for cand, gold in zip(rec, ref):
        hits.append(float((cand == gold).mean()))
        exact.append(float((cand == gold).all()))
        rl_tok.append(rouge_l(cand, gold)['f1'])
        rl_word.append(rouge_l(tok.decode(cand).split(), tok.decode(gold).split())['f1'])
        cands.append(cand.tolist()), refs.append(gold.tolist())
      prog.update(f'{r}x')
    out['rows'].append({
        'name': f'ccf {r}x', 'ratio': r,
        'teacher_forced': {'loss': ce / n, 'ppl': ec.ppl(ce / n), 'token_accuracy': ok / n},
        'greedy': {'token_accuracy': float(np.mean(hits)), 'exact_match': float(np.mean(exact)),
                   'rouge_l_tokens': float(np.mean(rl_tok)),
                   'rouge_l_words': float(np.mean(rl_word)),
                   'bleu4_tokens': bleu4(cands, refs)['bleu4']}})
  return out
