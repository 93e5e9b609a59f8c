"""One export's evaluation at the SmolLM2 recipe's sizes (launch/recipes/smollm2_ccf_eval.sh):
the `quick` preset of `ccf_jax.eval.runner` with its contexts widened to what the issue asks of a
real model, i.e. the last segment given K up to 16 segments and passkey at 16 and 32 segments.

    python launch/recipes/smollm2_ccf_eval.py EXPORT OUT_DIR [DOCS]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from ccf_jax.eval import runner  # pylint: disable=wrong-import-position


def main(export, out, docs=4):
  with open(os.path.join(export, 'config.json')) as f:
    plain = json.load(f)['model']['arch'] == 'decoder'
  overrides = {
      # Training windows: CCF's 1,024 tokens; none for the base (its range is 8,192 tokens).
      'ppl': dict(docs=int(docs), n_tail_segments=1, k_max_segments=16, stream_segments=16,
                  doc_batch=1, window_batches=0 if plain else int(docs)),
      'passkey': dict(length_segments=[16, 32], depths=[0.0, 0.5, 1.0], batch=2),
  }
  runner.run(export, out, only=('ppl', 'passkey'), preset='quick', overrides=overrides)


if __name__ == '__main__':
  main(*sys.argv[1:])
