"""Exact and MinHash near-dedup through `lm.prepare`, measured against exact Jaccard similarity on
a corpus of real sentences (the standard library's docstrings) with planted near-duplicates."""

import ast
import itertools
import json
import random
import re
import struct

from lm import sources
from lm.prepare import config as config_lib
from lm.prepare import dedup
from lm.prepare import pipeline


def _sentences(files: int = 160) -> list[str]:
  """Distinct docstring sentences of 6 to 40 words from the first stdlib files."""
  out = []
  for path in sources.stdlib_files()[:files]:
    with open(path, encoding='utf-8', errors='replace') as f:
      try:
        tree = ast.parse(f.read())
      except SyntaxError:
        continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        for sentence in re.split(r'(?<=[.!?])\s+', ' '.join((ast.get_docstring(node) or '').split())):
          if 6 <= len(sentence.split()) <= 40:
            out.append(sentence)
  return list(dict.fromkeys(out))


def _corpus(rng: random.Random) -> tuple[list[dict], set[str]]:
  """Base documents of 10 sentences each, and for each a planted variant: word edits, an inserted
  sentence, swapped sentences, all three, an exact copy (case and spacing changed), and a heavy
  rewrite (30% of words) that is not a near-duplicate. Returns (records, ids of exact copies)."""
  pool = _sentences()
  rng.shuffle(pool)
  spare = pool[1200:]
  bases = [pool[i:i + 10] for i in range(0, 1200, 10)]
  vocabulary = sorted({w for s in spare for w in s.split()})

  def edit(sentences, share):
    text = ' '.join(sentences).split()
    for i in rng.sample(range(len(text)), max(1, round(share * len(text)))):
      text[i] = rng.choice(vocabulary)
    return ' '.join(text)

  def insert(sentences):
    out = list(sentences)
    out.insert(rng.randrange(len(out) + 1), rng.choice(spare))
    return out

  def swap(sentences):
    out = list(sentences)
    i, j = rng.sample(range(len(out)), 2)
    out[i], out[j] = out[j], out[i]
    return out

  records, copies = [], set()
  for b, sentences in enumerate(bases):
    records.append(dict(id=f'b{b}', text=' '.join(sentences)))
    kind = ['edit', 'insert', 'swap', 'all', 'copy', 'rewrite'][b % 6]
    variant = {'edit': lambda: edit(sentences, 0.02),
               'insert': lambda: ' '.join(insert(sentences)),
               'swap': lambda: ' '.join(swap(sentences)),
               'all': lambda: edit(swap(insert(sentences)), 0.01),
               'copy': lambda: '  '.join(sentences).upper(),
               'rewrite': lambda: edit(sentences, 0.3)}[kind]()
    records.append(dict(id=f'b{b}-{kind}', text=variant))
    if kind == 'copy':
      copies.add(f'b{b}-{kind}')
  rng.shuffle(records)
  return records, copies


def test_near_dedup_against_exact_jaccard(tmp_path):
  records, copies = _corpus(random.Random(0))
  path = tmp_path / 'corpus.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  config = config_lib.base_config()
  config.source = f'jsonl:{path}'
  config.language.enabled = False
  config.quality.gopher.enabled = config.quality.repetition.enabled = False
  config.quality.c4.enabled = config.pii.enabled = config.tokenize.enabled = False
  report = pipeline.prepare(config, str(tmp_path / 'out'))

  decisions = [json.loads(line) for line in open(tmp_path / 'out' / 'decisions.jsonl')]
  assert [d['id'] for d in decisions] == [r['id'] for r in records]
  keeper = {d['id']: re.match(r'\w+: of (\S+)', d['reason']).group(1)
            for d in decisions if not d['kept']}

  def group(doc_id):
    while doc_id in keeper:
      doc_id = keeper[doc_id]
    return doc_id

  shingler = dedup.minhash_signature(config.dedup, str(tmp_path))
  shingles = {r['id']: set(shingler.get_shingles(r['text']).ravel().tolist()) for r in records}

  def jaccard(a, b):
    return len(shingles[a] & shingles[b]) / len(shingles[a] | shingles[b])

  similar = [(a, b) for a, b in itertools.combinations(shingles, 2) if jaccard(a, b) >= 0.8]
  found = [(a, b) for a, b in similar if group(a) == group(b)]
  removed = [d for d in decisions if d['stage'] == 'near_dedup']
  right = [d for d in removed if any(jaccard(d['id'], other) >= 0.8 for other in shingles
                                     if other != d['id'] and group(other) == group(d['id']))]
  kinds = {kind: sum(i.endswith(kind) for i in shingles) for kind in ('edit', 'insert', 'swap')}
  assert len(similar) >= 70 and min(kinds.values()) >= 20, (len(similar), kinds)
  assert len(found) / len(similar) >= 0.95, (len(found), len(similar))  # Recall.
  assert len(right) / len(removed) >= 0.95, (len(right), len(removed))  # Precision.
  # Exact copies are always caught, as exact duplicates, the later one in the input removed;
  # heavy rewrites and distinct documents are never merged.
  position = {r['id']: i for i, r in enumerate(records)}
  assert {d['id'] for d in decisions if d['stage'] == 'exact_dedup'} == {
      max(c, c.split('-')[0], key=position.get) for c in copies}
  assert not any(group(i) == group(i.split('-')[0]) for i in shingles if i.endswith('-rewrite'))
  bases = [i for i in shingles if '-' not in i]
  assert len({group(i) for i in bases}) == len(bases)
  assert report['dedup']['confirmed_pairs'] <= report['dedup']['candidate_pairs']
  print(f'{len(similar)} pairs with Jaccard >= 0.8, recall {len(found) / len(similar):.3f}; '
        f'{len(removed)} near-duplicates removed, precision {len(right) / len(removed):.3f}')


def test_documents_sharing_a_band_are_all_compared(tmp_path):
  """datatrove's .dups files list consecutive documents of a band's group only: A-B, B-C. A and C
  are still a candidate pair, so a less similar B between them cannot hide them from each other."""
  keys = [(0, i) for i in range(5)]
  listed = [(0, 1), (1, 2), (3, 4)]  # (A, B), (B, C) in one band; (D, E) in another.
  with open(tmp_path / '00000.dups', 'wb') as f:
    for a, b in listed:
      f.write(struct.pack('<4I', *keys[a], *keys[b]))
  clusters = dedup.Clusters.__new__(dedup.Clusters)
  clusters.buckets = str(tmp_path)
  identity = {k: k for k in keys}
  pairs = clusters._candidate_pairs(identity, identity)
  assert pairs == {(keys[0], keys[1]), (keys[0], keys[2]), (keys[1], keys[2]), (keys[3], keys[4])}
  big = [(0, i) for i in range(dedup.MAX_GROUP + 10)]
  with open(tmp_path / '00000.dups', 'wb') as f:
    for a, b in zip(big, big[1:]):
      f.write(struct.pack('<4I', *a, *b))
  identity = {k: k for k in big}
  pairs = clusters._candidate_pairs(identity, identity)  # Neighbours and the first: linear.
  assert len(pairs) == 2 * (len(big) - 1) - 1
