"""lm.prune: exact sparsities, 2:4 groups, Wanda's formula and input norms, untouched leaves, a
pruned checkpoint that loads everywhere, errors that name the flag; pruning while training
(config.prune): the cubic schedule, zeros kept through updates, lm.prune's masks kept."""

import dataclasses
import functools
import json
import math
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import data as data_lib
from lm import generate
from lm import lora
from lm import model as model_lib
from lm import moe as moe_lib
from lm import prune
from lm import tokenizer as tokenizer_lib
from lm import vocab

import loop_config

CFG = model_lib.ModelConfig(vocab_size=400, d_model=16, num_layers=2, num_heads=2,
                            num_kv_heads=1, d_ff=32, max_seq_len=64, dtype='float32')
PROJECTIONS = [('attention', 'w_q'), ('attention', 'w_k'), ('attention', 'w_v'),
               ('attention', 'w_o'), ('mlp', 'w_up'), ('mlp', 'w_gate'), ('mlp', 'w_down')]
TEXT = ('def read(self, path):\n    """Return the value of the file at path."""\n'
        '    with open(path) as f:\n        return f.read()\n\n')


def _random_params(cfg, seed=0, decimals=None):
  """Params of cfg drawn from N(0, 0.5) (ones for vectors), quicker than compiling init; rounded
  to `decimals` they hold many ties."""
  rng = np.random.default_rng(seed)
  def draw(x):
    value = rng.normal(0, 0.5, x.shape) if x.ndim > 1 else np.ones(x.shape)
    return (value if decimals is None else value.round(decimals)).astype(x.dtype)
  return jax.tree.map(draw, jax.eval_shape(lambda: model_lib.init_params(cfg, 0)))


def _matrices(w, lead):
  """A stacked leaf as [matrices, entries]."""
  return np.asarray(w).reshape(math.prod(w.shape[:lead]), -1)


# ---------------------------------------------------------------------------------------------
# Masks.


def test_magnitude_prunes_exactly_the_sparsity_of_each_matrix_and_of_all_of_them():
  params = _random_params(CFG, decimals=1)  # Ties everywhere: the counts must stay exact.
  masks = prune.magnitude_masks(params, 0.3)
  for module, name in PROJECTIONS:
    w, keep = params['blocks'][module][name], masks['blocks'][module][name]
    for w_N, keep_N in zip(_matrices(w, 1), _matrices(keep, 1)):
      assert (~keep_N).sum() == round(0.3 * w_N.size)
      assert np.abs(w_N[~keep_N]).max() <= np.abs(w_N[keep_N]).min()  # The smallest went.
  report = prune.sparsity_report(params, masks)
  assert report['leaves']['blocks/attention/w_o']['per_matrix'] == [
      round(round(0.3 * 256) / 256, 6)] * 2

  masks = prune.magnitude_masks(params, 0.3, scope='global')
  kept = np.concatenate([np.abs(params['blocks'][m][n])[masks['blocks'][m][n]]
                         for m, n in PROJECTIONS])
  gone = np.concatenate([np.abs(params['blocks'][m][n])[~masks['blocks'][m][n]]
                         for m, n in PROJECTIONS])
  total = kept.size + gone.size
  assert gone.size == round(0.3 * total) and gone.max() <= kept.min()
  per_matrix = [s for leaf in prune.sparsity_report(params, masks)['leaves'].values()
                for s in leaf['per_matrix']]
  assert len(set(per_matrix)) > 1  # One threshold: the matrices end up unequally sparse.
  for sparsity in (0.0, 0.5):
    report = prune.sparsity_report(params, prune.magnitude_masks(params, sparsity, 'global'))
    assert report['pruned_params'] == round(sparsity * report['prunable_params'])


def test_2_4_keeps_exactly_two_of_every_four_inputs_of_each_output():
  cfg = dataclasses.replace(CFG, moe_num_experts=2, moe_top_k=1, num_layers=2,
                            moe_every_n_layers=2)
  params = _random_params(cfg)
  masks = prune.nm_masks(params, 2, 4)
  for module, name in PROJECTIONS:
    w, keep = params['blocks'][module][name], masks['blocks'][module][name]
    n_in = lora.INPUT_AXES[name]
    shape = w.shape  # [L, inputs..., outputs...]
    inputs, outputs = math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:])
    groups_LGMO = np.asarray(keep).reshape(shape[0], inputs // 4, 4, outputs)
    assert (groups_LGMO.sum(axis=2) == 2).all()
    w_LGMO = np.abs(np.asarray(w)).reshape(groups_LGMO.shape)
    smallest_kept = np.where(groups_LGMO, w_LGMO, np.inf).min(2)
    assert (smallest_kept >= np.where(groups_LGMO, -1, w_LGMO).max(2)).all()  # The two largest.
  w_up = np.asarray(masks['moe_blocks']['mlp']['w_up'])  # [L, E, D, F]
  assert (w_up.reshape(1, 2, 4, 4, 32).sum(axis=3) == 2).all()
  assert prune.sparsity_report(params, masks)['sparsity'] == 0.5
  keep_1_of_8 = prune.nm_masks(params, 1, 8)['blocks']['mlp']['w_down']  # [L, F, D]
  assert (np.asarray(keep_1_of_8).reshape(1, 4, 8, 16).sum(axis=2) == 1).all()
  with pytest.raises(ValueError,
                     match=r"m=3: params\['blocks'\]\['attention'\]\['w_k'\] has 16 inputs"):
    prune.nm_masks(params, 2, 3)


def test_wanda_equals_its_formula_on_a_constructed_layer():
  # One layer's w_up [D=4 inputs, F=3 outputs]; the inputs' norms weigh the inputs unequally.
  w_DF = np.array([[1.0, -4.0, 0.5],
                   [-2.0, 1.0, 3.0],
                   [3.0, 0.5, -1.0],
                   [0.5, 2.0, 2.0]], np.float32)
  x_ND = np.array([[3.0, 0.0, 1.0, 0.0],
                   [4.0, 1.0, 0.0, 2.0]], np.float32)  # Two calibration tokens.
  norms_D = np.sqrt((x_ND ** 2).sum(0))  # [5, 1, 1, 2]
  # |W| * ||X||: column 0 [5, 2, 3, 1], column 1 [20, 1, 0.5, 4], column 2 [2.5, 3, 1, 4].
  expected_DF = np.array([[True, True, False],
                          [False, False, True],
                          [True, False, False],
                          [False, True, True]])
  params = {'blocks': {'mlp': {'w_up': w_DF[None]}, 'mlp_norm': {'scale': np.ones((1, 4))}}}
  masks = prune.wanda_masks(params, {'blocks': {'mlp': {'w_up': norms_D[None]}}}, 0.5)
  np.testing.assert_array_equal(masks['blocks']['mlp']['w_up'][0], expected_DF)
  assert masks['blocks']['mlp_norm']['scale'] is None
  # Magnitude alone would keep rows 1 and 2 of column 0 instead: the norms decide.
  by_magnitude = prune.magnitude_masks({'blocks': {'mlp': {'w_up': w_DF[None, :, :1]}}}, 0.5)
  np.testing.assert_array_equal(by_magnitude['blocks']['mlp']['w_up'][0, :, 0],
                                [False, True, True, False])
  with pytest.raises(ValueError, match=r"input_norms\['blocks'\]\['mlp'\]\['w_up'\] is \(1, 3\)"):
    prune.wanda_masks(params, {'blocks': {'mlp': {'w_up': norms_D[None, :3]}}}, 0.5)


def test_input_norms_are_those_of_what_each_projection_reads():
  """With w_o and w_down the identity (H * Q = F = D), attention's and the MLP's outputs are
  w_o's and w_down's inputs, so running the block's pieces by hand shows what was read."""
  cfg = dataclasses.replace(CFG, num_layers=1, d_ff=16)
  params = _random_params(cfg, seed=1)
  blocks = params['blocks']
  blocks['attention']['w_o'] = np.eye(16, dtype=np.float32).reshape(1, 2, 8, 16)
  blocks['mlp']['w_down'] = np.eye(16, dtype=np.float32)[None]
  tokens_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
  batch = data_lib.make_batch(np.concatenate([tokens_BT, tokens_BT[:, :1]], 1), bos_id=-1)
  graphdef = model_lib.graphdef(cfg)
  norms = prune.collect_input_norms(graphdef, params, [batch, batch], include_embed=True)

  model = nnx.merge(graphdef, params)
  graph, _ = nnx.split(model.blocks)
  block = nnx.merge(graph, jax.tree.map(lambda p: p[0], params['blocks']))
  x_BTD = jnp.take(params['embed'], tokens_BT, axis=0)
  h_BTD = block.attention_norm(x_BTD)
  attention_BTD, _ = block.attention(h_BTD, batch['segment_ids'], batch['positions'])
  x_BTD = x_BTD + attention_BTD
  mlp_in_BTD = block.mlp_norm(x_BTD)
  hidden_BTF = block.mlp(mlp_in_BTD)
  final_BTD = model.final_norm(x_BTD + hidden_BTF)
  two_batches = lambda a: np.sqrt(2 * (np.asarray(a, np.float64) ** 2).sum((0, 1)))
  expected = {'w_q': h_BTD, 'w_k': h_BTD, 'w_v': h_BTD, 'w_up': mlp_in_BTD,
              'w_gate': mlp_in_BTD, 'w_down': hidden_BTF}
  for name, inputs in expected.items():
    module = 'attention' if name.startswith(('w_q', 'w_k', 'w_v')) else 'mlp'
    np.testing.assert_allclose(norms['blocks'][module][name][0], two_batches(inputs),
                               rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(norms['blocks']['attention']['w_o'][0],
                             two_batches(attention_BTD).reshape(2, 8), rtol=1e-5)
  np.testing.assert_allclose(norms['unembed'], two_batches(final_BTD), rtol=1e-5)
  np.testing.assert_array_equal(norms['embed'], np.ones(16))  # Untied: only looked up.


def test_moe_experts_norms_count_only_the_tokens_routed_to_them():
  cfg = dataclasses.replace(CFG, num_layers=1, moe_num_experts=4, moe_top_k=2,
                            moe_capacity_factor=4.0)  # Room for every token: none dropped.
  params = _random_params(cfg, seed=2)
  tokens_BT = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
  batch = data_lib.make_batch(np.concatenate([tokens_BT, tokens_BT[:, :1]], 1), bos_id=-1)
  capacity = prune.collect_input_norms(model_lib.graphdef(cfg), params, [batch])
  dropless_cfg = dataclasses.replace(cfg, moe_capacity_factor=0.0)
  dropless = prune.collect_input_norms(model_lib.graphdef(dropless_cfg), params, [batch])
  assert capacity['moe_blocks']['mlp']['w_down'].shape == (1, 4, 32)  # [L, E, F]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), capacity, dropless)

  model = nnx.merge(model_lib.graphdef(cfg), params)
  graph, _ = nnx.split(model.moe_blocks)
  block = nnx.merge(graph, jax.tree.map(lambda p: p[0], params['moe_blocks']))
  x_BTD = jnp.take(params['embed'], tokens_BT, axis=0)
  x_BTD = x_BTD + block.attention(block.attention_norm(x_BTD), batch['segment_ids'],
                                  batch['positions'])[0]
  h_ND = np.asarray(block.mlp_norm(x_BTD)).reshape(-1, 16)
  _, experts_BTK, _ = moe_lib.route(h_ND[None], params['moe_blocks']['mlp']['w_router'][0], 2,
                                    np.ones((1, 16), bool))
  experts = params['moe_blocks']['mlp']
  for e in range(4):
    routed_ND = h_ND[(np.asarray(experts_BTK[0]) == e).any(-1)]
    gate_NF, up_NF = routed_ND @ experts['w_gate'][0, e], routed_ND @ experts['w_up'][0, e]
    hidden_NF = jax.nn.silu(gate_NF) * up_NF
    np.testing.assert_allclose(capacity['moe_blocks']['mlp']['w_up'][0, e],
                               np.sqrt((routed_ND ** 2).sum(0)), rtol=1e-5)
    np.testing.assert_allclose(capacity['moe_blocks']['mlp']['w_down'][0, e],
                               np.sqrt((np.asarray(hidden_NF) ** 2).sum(0)), rtol=1e-4)


def test_embeddings_norms_biases_and_routers_are_untouched_by_default():
  cfg = dataclasses.replace(CFG, block='gpt2', num_layers=2, moe_num_experts=2,
                            moe_every_n_layers=2)
  params = _random_params(cfg)
  never = {('embed',), ('pos_embed',), ('unembed',), ('final_norm', 'scale'),
           ('final_norm', 'bias')}
  for masks in (prune.magnitude_masks(params, 0.5), prune.nm_masks(params, 2, 4),
                prune.magnitude_masks(params, 0.5, 'global')):
    pruned = set(prune.leaves_by_path(masks))
    assert pruned == {(stack, m, n) for stack in ('blocks', 'moe_blocks')
                      for m, n in PROJECTIONS if n != 'w_gate'}
    assert not pruned & never
    pruned_params = prune.apply_masks(params, masks)
    for path in [('embed',), ('pos_embed',), ('unembed',)]:
      assert pruned_params[path[0]] is params[path[0]]
    for stack in ('blocks', 'moe_blocks'):
      for module in ('attention_norm', 'mlp_norm'):
        for name in ('scale', 'bias'):
          assert pruned_params[stack][module][name] is params[stack][module][name]
      for name in ('b_q', 'b_o'):
        assert pruned_params[stack]['attention'][name] is params[stack]['attention'][name]
    assert pruned_params['moe_blocks']['mlp']['w_router'] is params['moe_blocks']['mlp']['w_router']
    assert pruned_params['moe_blocks']['mlp']['b_up'] is params['moe_blocks']['mlp']['b_up']
  with_embed = prune.nm_masks(params, 2, 4, include_embed=True)
  for name in ('embed', 'pos_embed'):  # [rows, D]: 2 of every 4 along D in each row.
    assert (np.asarray(with_embed[name]).reshape(-1, 4, 4).sum(-1) == 2).all()
  assert (np.asarray(with_embed['unembed']).reshape(4, 4, -1).sum(1) == 2).all()  # [D, V]
  assert with_embed['final_norm']['scale'] is None


def test_apply_masks_zeroes_exactly_the_masked_weights_and_keeps_dtypes():
  params = {'w': jnp.arange(1, 7, dtype=jnp.bfloat16).reshape(2, 3), 'v': jnp.ones(3)}
  keep = np.array([[True, False, True], [False, True, True]])
  for masks in ({'w': keep, 'v': None}, {'w': keep}):  # None or absent: left as it is.
    out = jax.jit(prune.apply_masks)(params, masks)
    assert out['w'].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out['w'], np.where(keep, params['w'], 0))
    np.testing.assert_array_equal(out['v'], params['v'])
  with pytest.raises(ValueError, match=r"the mask of params\['w'\] is \(3,\)"):
    prune.apply_masks(params, {'w': keep[0]})
  with pytest.raises(ValueError, match=r"params\['x'\], which params lack"):
    prune.apply_masks(params, {'x': keep})


# ---------------------------------------------------------------------------------------------
# Checkpoints and the command.


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tokenizer') / 'spm.model')
  texts = list(data_lib.iter_documents('stdlib', max_chars=60_000))
  tokenizer_lib.train_tokenizer(texts, CFG.vocab_size, path, max_chars=60_000, seed=0)
  return path


def _save_checkpoint(directory, cfg, params, tokenizer_path, **config_overrides):
  """A checkpoint as lm.vocab and lm.convert write one: params/, config.json, tokenizer.model."""
  config = config_lib.base_config()
  config.model.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                       if f.name in config.model})
  config.data.seq_len = 16
  for field, value in config_overrides.items():
    section, key = field.split('.')
    config[section][key] = value
  config.init_from = str(directory)
  config.data.tokenizer = os.path.join(directory, 'tokenizer.model')
  checkpoint_lib.save_params(str(directory), params)
  vocab.write_checkpoint_config(str(directory), config)
  with open(tokenizer_path, 'rb') as src, open(config.data.tokenizer, 'wb') as dst:
    dst.write(src.read())
  return str(directory)


@pytest.fixture(scope='module')
def calibration(tmp_path_factory):
  directory = tmp_path_factory.mktemp('calibration')
  for i in range(3):
    (directory / f'doc{i}.txt').write_text(f'# {i}\n' + TEXT * 4)
  return f'text:{directory}/*.txt'


def _stored(checkpoint):
  return checkpoint_lib.restore_params(checkpoint, checkpoint_lib.params_shapes(checkpoint))


def test_the_command_writes_a_pruned_checkpoint_that_loads_everywhere(
    tokenizer_path, calibration, tmp_path):
  cfg = dataclasses.replace(CFG, num_layers=1)
  params = _random_params(cfg)
  source = _save_checkpoint(tmp_path / 'source', cfg, params, tokenizer_path)
  out = tmp_path / 'pruned'
  prune.main(['--checkpoint', source, '--method', 'wanda', '--sparsity', '0.5', '--out', str(out),
              '--calibration', calibration, '--calibration_tokens', '48'])
  assert sorted(os.listdir(out)) == ['checkpoints', 'config.json', 'config.py', 'masks.npz',
                                     'prune_report.json', 'tokenizer.model']

  graphdef, loaded, tokenizer, config = generate.load_checkpoint(str(out), dtype='float32')
  masks = prune.load_masks(str(out / 'masks.npz'), loaded)
  assert masks['embed'] is None and masks['blocks']['attention_norm']['scale'] is None
  expected = prune.apply_masks(params, masks)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), expected)
  stored = prune.leaves_by_path(jax.device_get(loaded))
  for path, keep in prune.leaves_by_path(masks).items():
    assert (stored[path][~keep] == 0).all() and keep.mean() == 0.5, path
  assert tokenizer.path == str(out / 'tokenizer.model')
  assert config.init_from == str(out) and config.lora.rank == 0
  logits = model_lib.apply(graphdef, loaded, np.array([[1, 5, 9]], np.int32))
  assert np.isfinite(np.asarray(logits)).all()

  report = json.loads((out / 'prune_report.json').read_text())
  assert report['method'] == 'wanda' and report['sparsity'] == 0.5
  assert report['calibration_tokens'] == 48 and report['achieved_sparsity'] == 0.5
  assert report['report']['leaves']['blocks/mlp/w_down']['per_matrix'] == [0.5]
  assert report['total_params'] == model_lib.count_params(params)
  # config.init_from=OUT and `--config.mode=sample --workdir OUT` read it too.
  jax.tree.map(np.testing.assert_array_equal, _stored(str(out)), expected)
  _, sampled, _ = generate.load(config_lib.base_config(), str(out))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(sampled), expected)
  assert config_lib.config_from_checkpoint(str(out)).data.tokenizer == str(out / 'tokenizer.model')


def test_a_lora_checkpoint_is_merged_before_pruning(tokenizer_path, tmp_path):
  cfg = dataclasses.replace(CFG, num_layers=1, lora_rank=2, lora_targets=('w_q', 'w_up'))
  params = _random_params(cfg)
  source = _save_checkpoint(tmp_path / 'lora', cfg, params, tokenizer_path,
                            **{'lora.rank': 2, 'lora.targets': 'q,up', 'train.trainable': 'lora'})
  out = tmp_path / 'pruned'
  prune.main(['--checkpoint', source, '--method', 'magnitude', '--sparsity', '0.25',
              '--scope', 'global', '--out', str(out)])
  merged = lora.merge(params, cfg)
  stored = _stored(str(out))
  assert 'w_q_lora_a' not in stored['blocks']['attention']
  masks = prune.load_masks(str(out / 'masks.npz'), stored)
  jax.tree.map(np.testing.assert_array_equal, stored, prune.apply_masks(merged, masks))
  config = config_lib.config_from_json(str(out / 'config.json'))
  assert config.lora.rank == 0 and config.train.trainable == 'all'
  config_lib.validate(config)
  report = json.loads((out / 'prune_report.json').read_text())
  assert report['lora_merged'] and report['pruned_params'] == round(
      0.25 * report['prunable_params'])


@pytest.mark.parametrize('flags, message', [
    (['--method', 'magnitude', '--sparsity', '1.0'], r'--sparsity=1\.0: must be in \[0, 1\)'),
    (['--method', 'wanda', '--sparsity', '-0.1', '--calibration', 'stdlib'],
     r'--sparsity=-0\.1: must be in \[0, 1\)'),
    (['--method', 'magnitude'], r'--method=magnitude needs --sparsity'),
    (['--method', 'nm', '--n', '4', '--m', '4'], r'--n=4 --m=4: N:M keeps n of every m'),
    (['--method', 'nm', '--sparsity', '0.3'], r'--sparsity=0\.3 with --method=nm'),
    (['--method', 'wanda', '--sparsity', '0.5'], r'--method=wanda needs --calibration'),
    (['--method', 'wanda', '--sparsity', '0.5', '--calibration', 'stdlib',
      '--calibration_tokens', '0'], r'--calibration_tokens=0: must be >= 1'),
    (['--method', 'wanda', '--sparsity', '0.5', '--calibration', 'stdlib',
      '--calibration_batch_size', '0'], r'--calibration_batch_size=0: must be >= 1'),
    (['--method', 'magnitude', '--sparsity', '0.5', '--checkpoint', 'MISSING'],
     r'--checkpoint=.*MISSING: no such directory'),
])
def test_bad_input_fails_clearly_naming_the_flag(flags, message, tmp_path):
  source = tmp_path / 'source'
  source.mkdir()
  flags = flags if '--checkpoint' in flags else flags + ['--checkpoint', str(source)]
  flags = [str(tmp_path / f) if f == 'MISSING' else f for f in flags]
  with pytest.raises(SystemExit, match=f'^python -m lm.prune: error: {message}'):
    prune.main(flags + ['--out', str(tmp_path / 'out')])
  assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------
# Pruning while training (config.prune).


def test_the_schedule_rises_along_the_cubic_to_its_target():
  schedule = prune.Schedule(sparsity=0.8, start_step=10, end_step=50, every=10)
  targets = [float(schedule.sparsity_at(t)) for t in (0, 10, 20, 30, 50, 90)]
  np.testing.assert_allclose(targets, [0, 0, 0.8 * (1 - 0.75 ** 3), 0.8 * (1 - 0.5 ** 3), 0.8,
                                       0.8], rtol=1e-6)
  updates = [t for t in range(100) if bool(schedule.updates_at(t))]
  assert updates == [10, 20, 30, 40, 50]
  uneven = prune.Schedule(sparsity=0.5, start_step=0, end_step=25, every=10)
  assert [t for t in range(40) if bool(uneven.updates_at(t))] == [0, 10, 20, 25]


def test_keep_pruned_holds_zeros_and_prunes_each_matrix_exactly_at_update_steps():
  params = _random_params(CFG)
  schedule = prune.Schedule(sparsity=0.5, start_step=0, end_step=4, every=2)
  step = jax.jit(functools.partial(prune.keep_pruned, schedule=schedule))
  masks = prune.magnitude_masks(params, 0.25)
  old = prune.apply_masks(params, masks)
  moved = jax.tree.map(lambda w: w + 0.01, old)  # An update that moves every weight.
  kept, sparsity = step(old, moved, 1)  # Not an update step: the zeros come back, nothing more.
  for module, name in PROJECTIONS:
    w, keep = kept['blocks'][module][name], masks['blocks'][module][name]
    assert np.all(np.asarray(w)[~np.asarray(keep)] == 0)
    np.testing.assert_array_equal(np.asarray(w)[np.asarray(keep)],
                                  np.asarray(moved['blocks'][module][name])[np.asarray(keep)])
  np.testing.assert_allclose(float(sparsity), 0.25, atol=0.01)
  for vector in ('final_norm',):  # Untouched leaves pass through with the update.
    np.testing.assert_array_equal(kept[vector]['scale'], moved[vector]['scale'])
  target = float(schedule.sparsity_at(2))
  further, sparsity = step(kept, kept, 2)  # An update step: each matrix to the target, exactly.
  for module, name in PROJECTIONS:
    for w_N in _matrices(further['blocks'][module][name], 1):
      assert (w_N == 0).sum() == math.floor(target * w_N.size + 0.5)
  assert float(sparsity) > 0.25


def _pruned_run(tokenizer, **prune_fields):
  config = loop_config.small_run(tokenizer, steps=10, eval_every=10, checkpoint_every=5)
  config.prune.update(prune_fields)
  return config


def test_a_run_prunes_on_schedule_and_pruned_weights_stay_zero(tmp_path, stdlib_tokenizer):
  from lm import train as train_lib  # pylint: disable=g-import-not-at-top
  config = _pruned_run(stdlib_tokenizer, sparsity=0.5, start_step=2, end_step=6, every=2)
  state, _ = train_lib.train(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl') if '"sparsity"' in line]
  assert rows[0]['sparsity'] < 0.01 and abs(rows[-1]['sparsity'] - 0.5) < 0.01, rows
  for module, name in PROJECTIONS:  # Steps 7-10 trained on, and each matrix is still at 50%.
    for w_N in _matrices(state.params['blocks'][module][name], 1):
      assert (w_N == 0).sum() == math.floor(0.5 * w_N.size + 0.5)
  # lm.prune's 2:4 masks (over the 50% run), kept through a fine-tuning run from its output.
  out = str(tmp_path / 'pruned')
  prune.prune_checkpoint(str(tmp_path), out, 'nm', n=2, m=4)
  pruned = checkpoint_lib.restore_params(out, checkpoint_lib.params_shapes(out))
  tuned = _pruned_run(stdlib_tokenizer, masks=os.path.join(out, 'masks.npz'))
  tuned.init_from = out
  tuned.train.steps = 4
  state, metrics = train_lib.train(tuned, str(tmp_path / 'tuned'))
  for module, name in PROJECTIONS:  # Zeros stay zero; the rest trained.
    before = np.asarray(pruned['blocks'][module][name])
    after = np.asarray(state.params['blocks'][module][name])
    np.testing.assert_array_equal(after == 0, before == 0)
    assert not np.array_equal(after, before)
  w = np.asarray(state.params['blocks']['mlp']['w_up'])  # [L, D, F]: groups of 4 along D.
  assert np.all((w != 0).reshape(w.shape[0], w.shape[1] // 4, 4, w.shape[2]).sum(2) <= 2)
  assert metrics['sparsity'] > 0.5
  with pytest.raises(config_lib.ConfigError, match='config.prune.end_step=60'):
    config_lib.validate(_pruned_run(stdlib_tokenizer, sparsity=0.5, start_step=2, end_step=60))
  with pytest.raises(config_lib.ConfigError, match='config.prune.masks=.*no such file'):
    config_lib.validate(_pruned_run(stdlib_tokenizer, masks=str(tmp_path / 'none.npz')))
