"""T5's span corruption: lengths, noise masks, inputs and targets (lm/span_corruption.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import span_corruption as sc

FIRST, SENTINELS, EOS = 4, 20, 2  # As in the tokenizer the pipeline trains, with fewer sentinels.


def _t5_lengths(tokens_length, noise_density, mean_noise_span_length):
  """(inputs, targets) of T5's random_spans_helper, written out as the reference."""
  num_noise = int(round(tokens_length * noise_density))
  num_spans = int(round(num_noise / mean_noise_span_length))
  return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def _t5_tokens_length(inputs_length, noise_density, mean_noise_span_length):
  tokens_length = inputs_length - 1
  while _t5_lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length


def _runs(mask):
  """[(start, end, value)] of the runs of a 1-D bool array."""
  edges = np.flatnonzero(np.diff(mask.astype(int))) + 1
  bounds = np.concatenate([[0], edges, [len(mask)]])
  return [(int(a), int(b), bool(mask[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def _reference(tokens, mask):
  """(inputs, targets) built span by span from the row and its noise mask, T5's layout."""
  inputs, targets, k = [], [], 0
  for start, end, noise in _runs(mask):
    if noise:
      inputs.append(FIRST + k)
      targets += [FIRST + k] + tokens[start:end].tolist()
      k += 1
    else:
      inputs += tokens[start:end].tolist()
  return np.asarray(inputs + [EOS]), np.asarray(targets + [EOS])


def _masks(length, noise_density, mean, num_keys, seed=0):
  keys = jax.random.split(jax.random.key(seed), num_keys)
  draw = jax.jit(jax.vmap(lambda k: sc.noise_mask(k, length, noise_density, mean)))
  return np.asarray(draw(keys))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _row_masks(rng, B, T):
  """[B, T] the masks corrupt draws for rows 0 .. B-1, from fold_in(rng, b)."""
  return jax.vmap(lambda b: sc.noise_mask(jax.random.fold_in(rng, b), T))(jnp.arange(B))


# Jitted as in the train step (eagerly, each of its ops would compile on its own, slowly).
_corrupt = jax.jit(functools.partial(sc.corrupt, sentinel_first=FIRST, eos_id=EOS))


def _rows(B, T, seed=0):
  """Random rows over ids 0 .. 3 (EOS among them), just past the sentinels, and beyond."""
  rng = np.random.default_rng(seed)
  near = np.asarray([0, 1, EOS, FIRST - 1, FIRST + SENTINELS, FIRST + SENTINELS + 1])
  tokens = rng.integers(FIRST + SENTINELS, 1000, (B, T))
  return np.where(rng.random((B, T)) < 0.3, rng.choice(near, (B, T)), tokens).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Lengths.


def test_lengths_match_t5():
  assert sc.raw_length_for_inputs(512) == 568
  assert sc.lengths(568) == sc.Lengths(num_noise=85, num_spans=28, inputs=512, targets=114)
  assert sc.lengths(569).inputs == 513  # 568 is the longest that fits.
  for inputs_length in [8, 64, 100, 256, 512, 1024]:
    for density, mean in [(0.15, 3.0), (0.25, 2.0), (0.3, 1.0), (0.5, 8.0)]:
      raw = sc.raw_length_for_inputs(inputs_length, density, mean)
      n = sc.lengths(raw, density, mean)
      if n.num_spans == round(round(raw * density) / mean):  # T5's helper does not clip.
        assert raw == _t5_tokens_length(inputs_length, density, mean)
        assert (n.inputs, n.targets) == _t5_lengths(raw, density, mean)
      assert n.inputs <= inputs_length < sc.lengths(raw + 1, density, mean).inputs
  # T5's clipping and rounding (half to even): one noise token at least, one kept, one span.
  assert sc.lengths(2) == sc.Lengths(1, 1, 3, 3)
  assert sc.lengths(10).num_noise == 2 and sc.lengths(30).num_noise == 4  # 1.5 and 4.5.
  assert sc.lengths(4, 0.5, 1.0) == sc.Lengths(2, 2, 5, 5)
  # Where T5's helper rounds to no span, the mask still makes one (and so counts one sentinel).
  assert _t5_tokens_length(8, 0.15, 3.0) == 8 and sc.raw_length_for_inputs(8) == 7


def test_sentinel_pieces():
  assert sc.sentinel_pieces(3) == ('<extra_id_0>', '<extra_id_1>', '<extra_id_2>')
  assert sc.SENTINEL_PIECE.format(99) == '<extra_id_99>'


@pytest.mark.parametrize('call, message', [
    (lambda: sc.lengths(100, 0.0), 'noise_density=0.0'),
    (lambda: sc.lengths(100, 1.0), 'noise_density=1.0'),
    (lambda: sc.lengths(100, -0.1), 'noise_density=-0.1'),
    (lambda: sc.lengths(100, 0.15, 0.5), 'mean_noise_span_length=0.5'),
    (lambda: sc.lengths(1), 'length=1: a row needs at least 2 tokens'),
    (lambda: sc.lengths(10, 0.9, 1.0), 'length=10: 9 noise spans need as many kept spans'),
    (lambda: sc.noise_mask(jax.random.key(0), 1), 'length=1'),
    (lambda: sc.raw_length_for_inputs(2), 'inputs_length=2: no row corrupts to that few'),
    (lambda: sc.raw_length_for_inputs(64, 0.9, 1.0), 'inputs_length=64'),
    (lambda: sc.raw_length_for_inputs(64, 1.5), 'noise_density=1.5'),
    (lambda: _corrupt(jax.random.key(0), np.zeros((2, 1), np.int32)), 'length=1'),
    (lambda: _corrupt(jax.random.key(0), np.zeros((8,), np.int32)), r'tokens_BT of shape \(8,\)'),
])
def test_bad_arguments_raise(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# ---------------------------------------------------------------------------------------------
# Noise masks.


@pytest.mark.parametrize('length, density, mean', [
    (2, 0.15, 3.0), (3, 0.3, 1.0), (37, 0.15, 3.0), (100, 0.5, 2.0), (190, 0.15, 3.0),
    (64, 0.3, 1.0)])
def test_noise_mask_has_the_counts_and_alternates(length, density, mean):
  n = sc.lengths(length, density, mean)
  masks = _masks(length, density, mean, num_keys=200)
  assert masks.shape == (200, length) and masks.dtype == bool
  for mask in masks:
    runs = _runs(mask)
    assert mask.sum() == n.num_noise
    assert [noise for _, _, noise in runs] == [False, True] * n.num_spans  # Kept first, then noise.
  if length > 3:  # Shorter rows have a single mask.
    assert len({m.tobytes() for m in masks}) > 1


def test_noise_mask_span_lengths_are_t5s_distribution():
  """Noise and kept tokens are each cut uniformly over segmentations into non-empty spans: every
  span's mean length is num / num_spans, and the first span's length has the exact pmf
  C(n - l - 1, k - 2) / C(n - 1, k - 1)."""
  length, density, mean, draws = 80, 0.25, 4.0, 4000
  n = sc.lengths(length, density, mean)
  assert (n.num_noise, n.num_spans) == (20, 5)
  noise_lengths, kept_lengths = [], []
  for mask in _masks(length, density, mean, num_keys=draws, seed=1):
    runs = _runs(mask)
    noise_lengths.append([b - a for a, b, noise in runs if noise])
    kept_lengths.append([b - a for a, b, noise in runs if not noise])
  noise_lengths, kept_lengths = np.asarray(noise_lengths), np.asarray(kept_lengths)
  np.testing.assert_allclose(noise_lengths.mean(0), 20 / 5, atol=0.25)
  np.testing.assert_allclose(kept_lengths.mean(0), 60 / 5, atol=0.8)
  assert abs(noise_lengths.mean() - mean) < 0.1
  k, total = n.num_spans, n.num_noise
  pmf = np.asarray([math.comb(total - l - 1, k - 2) / math.comb(total - 1, k - 1)
                    for l in range(1, total - k + 2)])
  counts = np.bincount(noise_lengths[:, 0], minlength=total - k + 2)[1:]
  assert 0.5 * np.abs(counts / draws - pmf).sum() < 0.04  # Total variation.
  # T5's default rows: spans of mean about 3.
  assert abs(_masks(568, 0.15, 3.0, 8).sum(1).mean() / sc.lengths(568).num_spans - 3.0) < 0.1


# ---------------------------------------------------------------------------------------------
# Inputs and targets.


@pytest.mark.parametrize('T', [2, 3, 16, 64])
def test_corrupt_matches_t5_layout_and_reconstructs(T):
  B = 24
  tokens = _rows(B, T, seed=T)
  rng = jax.random.key(7)
  inputs, targets = map(np.asarray, _corrupt(rng, jnp.asarray(tokens)))
  n = sc.lengths(T)
  assert inputs.shape == (B, n.inputs) and targets.shape == (B, n.targets)
  assert inputs.dtype == targets.dtype == np.int32
  for b, mask in enumerate(np.asarray(_row_masks(rng, B, T))):
    want_inputs, want_targets = _reference(tokens[b], mask)
    np.testing.assert_array_equal(inputs[b], want_inputs)
    np.testing.assert_array_equal(targets[b], want_targets)
    # Each noise span, in order, right after its sentinel; no closing sentinel.
    spans = [tokens[b, s:e] for s, e, noise in _runs(mask) if noise]
    pieces = np.split(targets[b, :-1], np.flatnonzero((targets[b, :-1] >= FIRST)
                                                      & (targets[b, :-1] < FIRST + SENTINELS)))
    assert len(pieces[0]) == 0 and len(pieces) - 1 == n.num_spans
    for k, (span, piece) in enumerate(zip(spans, pieces[1:])):
      assert piece[0] == FIRST + k
      np.testing.assert_array_equal(piece[1:], span)
    np.testing.assert_array_equal(
        sc.reconstruct(inputs[b], targets[b], sentinel_first=FIRST, num_sentinels=SENTINELS,
                       eos_id=EOS), tokens[b])


def test_corrupt_follows_the_row_index():
  """Row b's mask comes from fold_in(rng, b): permuting the rows moves the tokens but leaves the
  masks where they were, and a batch's first rows are corrupted as a larger batch's are."""
  B, T = 8, 48
  tokens = jnp.asarray(_rows(B, T, seed=3))
  rng = jax.random.key(11)
  inputs, targets = _corrupt(rng, tokens)
  perm = np.asarray([3, 0, 7, 1, 6, 2, 5, 4])
  permuted = _corrupt(rng, tokens[perm])
  for b, mask in enumerate(np.asarray(_row_masks(rng, B, T))):
    want = _reference(np.asarray(tokens)[perm[b]], mask)
    np.testing.assert_array_equal(permuted[0][b], want[0])
    np.testing.assert_array_equal(permuted[1][b], want[1])
  assert not np.array_equal(permuted[0], inputs[perm])  # The masks did not move with the rows.
  prefix = _corrupt(rng, tokens[:3])
  np.testing.assert_array_equal(prefix[0], inputs[:3])
  np.testing.assert_array_equal(prefix[1], targets[:3])
  other = _corrupt(jax.random.key(12), tokens)
  assert not np.array_equal(other[0], inputs)
  # Legacy uint32 keys and other token dtypes give int32 outputs too.
  legacy = _corrupt(jax.random.PRNGKey(0), tokens.astype(jnp.uint16))
  assert legacy[0].dtype == legacy[1].dtype == jnp.int32


def test_reconstruct_rejects_rows_it_cannot_read():
  tokens = _rows(1, 32, seed=5)
  inputs, targets = map(np.asarray, _corrupt(jax.random.key(0), tokens))
  kwargs = dict(sentinel_first=FIRST, num_sentinels=SENTINELS, eos_id=EOS)
  with pytest.raises(ValueError, match='both end with EOS'):
    sc.reconstruct(inputs[0, :-1], targets[0], **kwargs)
  swapped = targets[0].copy()
  where = np.flatnonzero((swapped >= FIRST) & (swapped < FIRST + SENTINELS))[:2]
  swapped[where] = swapped[where[::-1]]
  with pytest.raises(ValueError, match=r'sentinels of the targets are \[1, 0'):
    sc.reconstruct(inputs[0], swapped, **kwargs)
  # A row holding a sentinel id is ambiguous, and refused rather than misread.
  tokens[0, 0] = FIRST
  inputs, targets = map(np.asarray, _corrupt(jax.random.key(0), tokens))
  with pytest.raises(ValueError, match='does the row hold sentinel ids'):
    sc.reconstruct(inputs[0], targets[0], **kwargs)
