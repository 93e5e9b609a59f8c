"""Sanity figures for an imported pretrained export: perplexity on a held-out English passage and
a greedy continuation, printed as one JSON line.

    python launch/recipes/lm_check.py EXPORT [--prompt="..."] [--new_tokens=40]

Why: an import can produce logits of the right shape that are wrong (a transposed projection, an
unpermuted q/k, a wrong norm epsilon); a perplexity near the one transformers reports for the
same model and a fluent continuation catch that at once. The passage was written for this check
(it is in no training corpus). Perplexity is computed with the plain decoder's forward over the
whole passage (`model.decoder.bind`); the continuation goes through `inference.Engine`, the path
`ccf_jax.generate` uses. Text is encoded with the export's tokenizer.json (`tokenizers`).
"""

import json
import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from ccf_jax.checkpoint import export as export_lib  # pylint: disable=wrong-import-position
from ccf_jax.inference import engine as engine_lib  # pylint: disable=wrong-import-position
from ccf_jax.model import decoder as model_lib  # pylint: disable=wrong-import-position

PASSAGE = (
    "The lighthouse on the northern headland was built in 1871, after a winter in which three "
    "cargo ships ran aground within sight of the harbour. The town council argued for two years "
    "about who should pay for it, and in the end the money came from a tax on every barrel of "
    "fish landed at the quay. The tower is made of local granite and stands a little over thirty "
    "metres tall. Its first lamp burned paraffin, and the keeper had to climb the spiral stairs "
    "every four hours through the night to trim the wick and wind the clockwork that turned the "
    "lens. In 1923 the lamp was replaced by an electric one, and in 1987 the light was automated, "
    "so that the last keeper and his family moved into the village. Today the keeper's cottage "
    "is a small museum. Visitors can see the logbooks, which record the weather, the ships that "
    "passed and, occasionally, the keeper's complaints about the cost of coal. On clear evenings "
    "the beam can still be seen from the hills twenty kilometres inland, sweeping across the "
    "water once every twelve seconds, as it has for more than a century. Most people in the "
    "town no longer notice it, but fishermen coming home late say that the first sight of the "
    "light is still the moment they feel the trip is over.")

_PROMPT = flags.DEFINE_string('prompt', 'The capital of France is', 'Prompt for the greedy '
                              'continuation.')
_NEW = flags.DEFINE_integer('new_tokens', 40, 'Tokens to generate greedily.')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: lm_check.py EXPORT [--prompt=...] [--new_tokens=N]')
  from tokenizers import Tokenizer
  export = argv[1]
  params, config, _ = export_lib.load_export(export)
  info = json.load(open(os.path.join(export, export_lib.INFO_JSON)))
  tok = Tokenizer.from_file(os.path.join(export, info['tokenizer']['file']))
  eos = info['tokenizer']['eos_id']
  ids = np.asarray(tok.encode(PASSAGE, add_special_tokens=False).ids, np.int32)
  cfg = ml_collections.ConfigDict(config).model
  t0 = time.perf_counter()
  logits = jax.jit(lambda p, t: model_lib.bind(cfg, p)(t))(params, ids[None])
  logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), -1)
  nll = -float(jnp.take_along_axis(logp, ids[1:, None], -1).mean())
  forward_s = time.perf_counter() - t0
  engine = engine_lib.Engine(config, params)
  prompt = tok.encode(_PROMPT.value, add_special_tokens=False).ids
  out = engine.generate([prompt], max_new_tokens=_NEW.value, stop_tokens=[eos])
  print(json.dumps({'export': export, 'passage_tokens': int(ids.size),
                    'ppl': round(float(np.exp(nll)), 2), 'forward_s': round(forward_s, 2),
                    'prompt': _PROMPT.value, 'greedy': tok.decode(out.tokens[0])}), flush=True)


if __name__ == '__main__':
  app.run(main)
