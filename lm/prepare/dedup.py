"""Exact and near deduplication across all tasks' documents, keeping the first of each group.

Three datatrove passes between the per-document stages and the final one:
  signatures  (tasks)  each document's exact hash (of its normalized words) and its place in the
                       input, in INDEX/RANK.jsonl; datatrove's MinhashDedupSignature writes its
                       MinHash signature, one file per LSH band;
  buckets     (bands)  datatrove's MinhashDedupBuckets: pairs of documents equal in some band;
  clusters    (1 task) Clusters below: groups, and the documents each group removes.
datatrove's own clustering keeps an arbitrary member of each cluster (union by size) and takes
every bucket collision as a duplicate; Clusters instead confirms each candidate pair by the exact
Jaccard similarity of the two documents' shingle sets (the shingles MinHash hashed), so
config.dedup.threshold is exact, and keeps the document earliest in the input, so the output does
not depend on how the input was split into tasks.
"""

from collections.abc import Iterator
import glob
import hashlib
import itertools
import json
import os
import struct

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import minhash
from datatrove.utils import hashing
from datatrove.utils import text as datatrove_text
import ml_collections

from lm.eval import contamination
from lm.prepare import records
from lm.prepare import words


def minhash_config(cfg: ml_collections.ConfigDict) -> minhash.MinhashConfig:
  """datatrove's MinHash settings from config.dedup. Unicode marks are kept in the normalized
  text (datatrove strips them by default), since they are letters' parts in Devanagari. Shingles
  are hashed with SHA-1 (as datasketch does): datatrove's default, xxhash, needs xxhash<4, which
  takes only bytes from version 4 on."""
  return minhash.MinhashConfig(
      n_grams=cfg.ngram_size, num_buckets=cfg.bands, hashes_per_bucket=cfg.rows, seed=cfg.seed,
      norm_config=datatrove_text.TextNormConfig(norm_unicode_diacritics=False),
      hash_config=hashing.HashConfig(precision=64, hash_fc='sha1'))


def minhash_signature(cfg: ml_collections.ConfigDict, folder: str) -> minhash.MinhashDedupSignature:
  return minhash.MinhashDedupSignature(folder, config=minhash_config(cfg),
                                       language=words.WordTokenizer())


def exact_hash(text: str) -> str:
  """Equal for documents with the same words after normalization (case, punctuation, NFKC)."""
  normalized = ' '.join(contamination.normalize_words(text)).encode('utf-8', 'surrogatepass')
  return hashlib.blake2b(normalized, digest_size=8).hexdigest()


class Signatures(PipelineStep):
  """Writes INDEX/RANK.jsonl, [order, id, exact hash, signature index] per document in the order
  of the rank's documents file, and, when near dedup is on, datatrove's MinHash signatures
  (signature index: the count of signed documents before; -1 for none). With exact dedup on,
  only documents whose exact hash is new to the task are signed: the others are removed anyway,
  and a corpus of many copies would make many LSH pairs."""

  type = 'lm.prepare'
  name = 'signatures'

  def __init__(self, index: str, signature: minhash.MinhashDedupSignature | None,
               skip_copies: bool):
    super().__init__()
    self.index, self.signature, self.skip_copies = index, signature, skip_copies

  def run(self, data, rank: int = 0, world_size: int = 1) -> None:
    with records.atomic_open(os.path.join(self.index, f'{rank:05d}.jsonl')) as f:
      def indexed() -> Iterator[Document]:
        seen, signatures = set(), 0
        for doc in data:
          digest = exact_hash(doc.text)
          signed = self.signature is not None and not (self.skip_copies and digest in seen)
          seen.add(digest)
          f.write(json.dumps([doc.metadata['order'], doc.id, digest, signatures if signed else -1],
                             ensure_ascii=False) + '\n')
          if signed:
            signatures += 1
            yield doc
      if self.signature is not None:
        self.signature.run(indexed(), rank, world_size)
      else:
        for _ in indexed():
          pass


MAX_GROUP = 64  # Documents sharing a band beyond which not every pair is compared.


def _groups(pairs: list[tuple]) -> list[list]:
  """The connected groups (union-find) of the keys in `pairs`, each sorted, of 2+ keys."""
  parent = {}

  def root(x):
    while parent.setdefault(x, x) != x:
      parent[x] = parent.get(parent[x], parent[x])
      x = parent[x]
    return x

  for a, b in pairs:
    ra, rb = root(a), root(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  groups = {}
  for key in parent:
    groups.setdefault(root(key), []).append(key)
  return [sorted(g) for g in groups.values() if len(g) > 1]


class Clusters(PipelineStep):
  """Groups duplicates and writes REMOVALS/{exact_dedup,near_dedup}/RANK.jsonl, {order, reason}
  for every document a group removes, and REMOVALS/clusters.json, the counts."""

  type = 'lm.prepare'
  name = 'clusters'

  def __init__(self, *, index: str, buckets: str | None, documents: str, removals: str,
               tasks: int, cfg: ml_collections.ConfigDict):
    super().__init__()
    self.index, self.buckets, self.documents, self.removals = index, buckets, documents, removals
    self.tasks, self.threshold, self.exact = tasks, cfg.threshold, cfg.exact
    self.shingler = minhash_signature(cfg, removals) if buckets else None

  def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:
    entries = {}  # (rank, index in the rank's file) -> (order, id, exact hash).
    signed = {}  # (rank, index among the rank's signatures) -> (rank, index in the rank's file).
    for task in range(self.tasks):
      with open(os.path.join(self.index, f'{task:05d}.jsonl'), encoding='utf-8') as f:
        for i, (order, doc_id, digest, signature) in enumerate(map(json.loads, f)):
          entries[task, i] = (tuple(order), doc_id, digest)
          if signature >= 0:
            signed[task, signature] = (task, i)

    # Exact: the earliest document of each hash represents it.
    first = {}
    for key in sorted(entries, key=lambda k: entries[k][0]):
      first.setdefault(entries[key][2], key)
    representative = {key: first[entries[key][2]] if self.exact else key for key in entries}
    removals = {'exact_dedup': {}, 'near_dedup': {}}
    for key, rep in representative.items():
      if rep != key:
        removals['exact_dedup'][key] = f'exact_duplicate: of {entries[rep][1]}'

    pairs = self._candidate_pairs(representative, signed)
    jaccard = self._jaccard(pairs)
    edges = {pair: j for pair, j in jaccard.items() if j >= self.threshold}
    parent = {}

    def root(x):
      while parent.get(x, x) != x:
        parent[x] = parent.get(parent[x], parent[x])
        x = parent[x]
      return x

    for a, b in sorted(edges):
      ra, rb = root(a), root(b)
      if ra != rb:  # The earlier document becomes the root, so each group's root is its first.
        ra, rb = sorted((ra, rb), key=lambda k: entries[k][0])
        parent[rb] = ra
    best = {}  # Each document's most similar confirmed neighbour.
    for (a, b), j in edges.items():
      for x, y in ((a, b), (b, a)):
        if x not in best or j > best[x][1]:
          best[x] = (y, j)
    groups = {}
    for key in parent:
      groups.setdefault(root(key), []).append(key)
    for keeper, members in groups.items():
      for key in members:
        if key != keeper:
          neighbour, j = best[key]
          removals['near_dedup'][key] = (
              f'near_duplicate: of {entries[keeper][1]} (group of {len(members) + 1}; Jaccard '
              f'{j:.3f} with {entries[neighbour][1]})')
    for name, removed in removals.items():
      for task in range(self.tasks):
        with records.atomic_open(os.path.join(self.removals, name, f'{task:05d}.jsonl')) as f:
          for key in sorted(k for k in removed if k[0] == task):
            f.write(json.dumps(dict(order=entries[key][0], reason=removed[key]),
                               ensure_ascii=False) + '\n')
    summary = dict(documents=len(entries), exact_duplicates=len(removals['exact_dedup']),
                   candidate_pairs=len(pairs), confirmed_pairs=len(edges),
                   near_duplicate_groups=len(groups),
                   near_duplicates=len(removals['near_dedup']))
    with records.atomic_open(os.path.join(self.removals, 'clusters.json')) as f:
      json.dump(summary, f)

  def _candidate_pairs(self, representative: dict, signed: dict) -> set[tuple]:
    """Pairs of distinct representatives that share a MinHash band (datatrove's .dups files:
    little-endian uint32 rank, signature index, rank, signature index).

    A .dups file lists only consecutive documents of each group sharing a band (enough for
    datatrove, which removes whole groups), so two near-duplicates with a less similar document
    between them would never be compared. Each file's pairs are joined into their groups and
    every pair within a group is a candidate; a group of more than MAX_GROUP documents (shared
    boilerplate) compares each member with its neighbours and with the group's first instead.
    """
    pairs = set()
    if self.buckets is None:
      return pairs
    for path in sorted(glob.glob(os.path.join(self.buckets, '*.dups'))):
      with open(path, 'rb') as f:
        data = f.read()
      listed = [(representative[signed[f1, d1]], representative[signed[f2, d2]])
                for f1, d1, f2, d2 in struct.iter_unpack('<4I', data)]
      for group in _groups(listed):
        if len(group) <= MAX_GROUP:
          pairs.update(itertools.combinations(group, 2))
        else:
          pairs.update(zip(group, group[1:]))
          pairs.update((group[0], key) for key in group[1:])
      pairs.update((min(a, b), max(a, b)) for a, b in listed if a != b)
    return pairs

  def _jaccard(self, pairs: set[tuple]) -> dict[tuple, float]:
    """Exact Jaccard similarity of each pair's shingle sets, reading only the documents in pairs."""
    wanted = {key for pair in pairs for key in pair}
    shingles = {}
    for task in sorted({key[0] for key in wanted}):
      path = os.path.join(self.documents, f'{task:05d}.jsonl')
      for i, doc in enumerate(records.read_documents(path)):
        if (task, i) in wanted:
          shingles[task, i] = set(self.shingler.get_shingles(doc.text).ravel().tolist())
    result = {}
    for a, b in pairs:
      union = len(shingles[a] | shingles[b])
      result[a, b] = len(shingles[a] & shingles[b]) / union if union else 1.0
    return result
