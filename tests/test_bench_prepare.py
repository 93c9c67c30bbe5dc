"""bench/prepare.py --smoke: lm.prepare end to end with 1 and 2 workers on the planted corpus, and
its near dedup against datasketch's; every section of the report is there and its counts agree
with each other and with what the corpus planted."""

import json
import os
import subprocess
import sys

import pytest

from requirements import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  for name in ('datatrove', 'py3langid', 'datasketch'):
    require(name)
  directory = tmp_path_factory.mktemp('bench_prepare')
  out = directory / 'prepare.json'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'prepare.py'), '--smoke', '--out', str(out)],
      cwd=directory, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'peak RSS MB (tree/wait4)' in result.stdout and 'cand. prec.' in result.stdout
  return json.loads(out.read_text())


def test_every_section_is_there(report):
  assert {'machine', 'versions', 'settings', 'corpus', 'end_to_end', 'near_dedup',
          'bench_rusage_mb', 'wall_s'} <= set(report)
  assert report['versions']['datatrove'] and report['versions']['datasketch']
  assert report['settings']['mb'] == 0.5 and report['wall_s'] > 0
  corpus = report['corpus']
  assert sum(corpus['planted'].values()) == corpus['documents']
  assert 0.5 <= corpus['mb'] < 0.52  # Built until the size is reached.
  assert {'en', 'hi', 'exact_copy', 'rewrite', 'other_language', 'empty'} <= set(corpus['planted'])


def test_end_to_end_counts_agree(report):
  e2e, documents = report['end_to_end'], report['corpus']['documents']
  runs = e2e['runs']
  # The same documents removed for the same reasons whatever the workers; a near duplicate's
  # reason also names its most similar neighbour found, which may differ.
  assert set(runs) == {'1', '2'} and e2e['same_removals']
  for workers, r in runs.items():
    assert r['workers'] == int(workers)
    assert r['documents_in'] == documents == r['decisions']['documents']
    assert r['decisions']['kept'] == r['documents_out'] < documents
    assert r['documents_per_s'] == pytest.approx(documents / r['wall_s'])
    assert r['mb_per_s'] == pytest.approx(r['mb_in'] / r['wall_s']) and r['mb_per_s'] > 0
    assert r['passes_total_s'] == pytest.approx(sum(r['passes_s'].values()))
    assert r['passes_total_s'] < r['wall_s']  # The command also starts Python and writes reports.
    assert r['tokens_out'] > r['documents_out']
    stages = r['stages']
    assert stages[0]['documents_in'] == documents and stages[-1]['documents_out'] == (
        r['documents_out'])
    for before, after in zip(stages, stages[1:]):
      assert before['documents_out'] == after['documents_in'], after['name']
    for s in stages:
      assert s['documents_in'] - s['documents_out'] == sum(s['removed'].values()), s['name']
    assert r['decisions_bytes_per_million_documents'] == pytest.approx(
        r['decisions_bytes'] / documents * 1e6)
    rss = r['peak_rss_mb']
    assert rss['wait4'] > 50 and rss['tree_sampled'] >= rss['largest_process_sampled'] > 50
  assert runs['1']['speedup'] == 1.0
  assert runs['2']['speedup'] == pytest.approx(runs['1']['wall_s'] / runs['2']['wall_s'])

  planted, outcomes = report['corpus']['planted'], e2e['outcomes_by_planted_kind']
  assert {kind: sum(row.values()) for kind, row in outcomes.items()} == planted
  assert outcomes['empty'] == {'read: empty': planted['empty']}
  assert outcomes['other_language'] == {'language: other_language': planted['other_language']}
  assert outcomes['rewrite'] == {'kept': planted['rewrite']}  # 30% of words changed: distinct.
  # An exact copy or its base goes (whichever comes second), and nothing else is an exact copy.
  copies = e2e['exact_copies']
  assert copies['planted'] == planted['exact_copy']
  assert copies['removed'] == copies['reaching_dedup'] and 0 < copies['reaching_dedup'] <= (
      copies['planted'])
  pii = e2e['pii']
  assert pii['found']['emails'] == pii['planted_reaching_pii']['emails'] > 0
  # Every planted phone number and address is scrubbed, as one or the other.
  assert (pii['found']['phones'] + pii['found']['ips'] == pii['planted_reaching_pii']['phones']
          + pii['planted_reaching_pii']['ips'])


def test_near_dedup_both_sides(report):
  near, planted = report['near_dedup'], report['corpus']['planted']
  assert near['documents'] == report['corpus']['documents'] - planted['empty']
  assert near['settings']['permutations'] == near['settings']['bands'] * near['settings']['rows']
  families = near['planted']
  assert 0 < families['pairs_similar'] < families['pairs']  # Rewrites (and 3% edits) are not.
  jaccard = near['planted']['median_jaccard_to_base']
  assert jaccard['exact_copy'] == 1.0 and jaccard['templated_near'] > 0.9
  assert jaccard['rewrite'] < 0.3 and 0.6 < jaccard['templated'] < 0.8
  for name in ('lm_prepare', 'datasketch'):
    r = near[name]
    assert r['total_s'] == pytest.approx(sum(r['seconds'].values())) and r['total_s'] > 0
    assert r['documents_per_s'] == pytest.approx(near['documents'] / r['total_s'])
    assert r['documents_per_s_before_confirmation'] > r['documents_per_s'] > 0
    assert r['candidate_pairs'] >= r['confirmed_pairs'] > 0
    assert r['candidate_precision'] == pytest.approx(r['confirmed_pairs'] / r['candidate_pairs'])
    # Near duplicates of J >= 0.8 are candidates with probability 1 - (1 - 0.8^5)^20 > 0.999.
    assert r['recall'] == 1.0 and r['precision'] == 1.0, (name, r)
    assert 0 < r['groups'] <= r['removed']
  assert near['speed_ratio'] == pytest.approx(near['lm_prepare']['documents_per_s']
                                              / near['datasketch']['documents_per_s'])
  assert 0 < near['same_removals'] <= 1
