"""Data, FSDP and tensor parallelism on 8 fake CPU devices equal the single-device run."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lm import config as config_lib
from lm import model as model_lib
from lm import sharding
from lm import train as train_lib

CFG = model_lib.ModelConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
    max_seq_len=16)

# name: (mesh sizes, number of devices)
STRATEGIES = {
    'data': (dict(data=8, fsdp=1, tensor=1), 8),
    'fsdp': (dict(data=1, fsdp=8, tensor=1), 8),
    'tensor': (dict(data=1, fsdp=1, tensor=2), 2),
    'data2_fsdp2_tensor2': (dict(data=2, fsdp=2, tensor=2), 8),
}


def _mesh(sizes, num_devices):
  sizes = ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1, **sizes})
  return sharding.make_mesh(sizes, jax.devices()[:num_devices])


def _batches(n, B=16, T=16):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    segment_ids = np.where(np.arange(T) < 6, 1, 2).astype(np.int32)[None].repeat(B, 0)
    positions = np.concatenate([np.arange(6), np.arange(T - 6)]).astype(np.int32)
    out.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': segment_ids,
                'positions': positions[None].repeat(B, 0),
                'loss_mask': (np.arange(T) != 5).astype(np.float32)[None].repeat(B, 0)})
  return out


def _train_config(**overrides):
  t = config_lib.base_config().train
  t.update({'steps': 10, 'warmup_steps': 1, 'learning_rate': 1e-2, 'batch_size': 16,
            **overrides})
  return t


def _run(mesh, steps=3, cfg=CFG, **train_overrides):
  """Trains `steps` steps on the mesh; returns (losses, final params, grads at a new batch)."""
  t = _train_config(**train_overrides)
  optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(cfg))
  shardings = train_lib.state_shardings(cfg, optimizer, mesh, sharding.RULES)
  batch_sharding = sharding.batch_sharding(mesh, sharding.RULES)
  step_fn = train_lib.sharded_train_step(cfg, t, optimizer, shardings, batch_sharding)
  state = jax.jit(functools.partial(train_lib.init_state, cfg, optimizer, 0),
                  out_shardings=shardings)()
  *train_batches, probe = _batches(steps + 1)
  graphdef = model_lib.graphdef(cfg)

  def loss(params, batch):
    objective, sums = train_lib.loss_sums(params, batch, graphdef=graphdef)
    return objective / sums['tokens']

  grad_fn = jax.jit(jax.grad(loss), in_shardings=(shardings.params, batch_sharding),
                    out_shardings=shardings.params)
  losses = []
  with sharding.active(mesh, sharding.RULES):
    for batch in train_batches:
      state, metrics = step_fn(state, jax.device_put(batch, batch_sharding))
      losses.append(float(metrics['loss']))
    grads = grad_fn(state.params, jax.device_put(probe, batch_sharding))
  return losses, state, grads


@pytest.fixture(scope='module')
def single_device():
  return _run(_mesh(dict(data=1, fsdp=1, tensor=1), 1))


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize('name', STRATEGIES)
def test_strategy_matches_the_single_device_run(name, single_device):
  losses, state, grads = _run(_mesh(*STRATEGIES[name]))
  base_losses, base_state, base_grads = single_device
  np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
  _assert_trees_close(grads, base_grads)
  _assert_trees_close(state.params, base_state.params)


MOE_CFG = model_lib.ModelConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=32,
    max_seq_len=16, moe_num_experts=8, moe_top_k=2, moe_capacity_factor=1.0)
MOE_STRATEGIES = {
    'expert4_data2': dict(expert=4, data=2),
    'expert2_fsdp2_tensor2': dict(expert=2, fsdp=2, tensor=2),
}


@pytest.fixture(scope='module')
def single_device_moe():
  return _run(_mesh({}, 1), cfg=MOE_CFG)


@pytest.mark.parametrize('name', MOE_STRATEGIES)
def test_expert_parallel_moe_matches_the_single_device_run(name, single_device_moe):
  """Experts split over the mesh (tokens moved to them by all-to-all, which capacity mode's
  dispatch einsum lowers to) train exactly as on one device, drops included (capacity 1.0)."""
  base_losses, base_state, base_grads = single_device_moe
  mesh = _mesh(MOE_STRATEGIES[name], 8)
  losses, state, grads = _run(mesh, cfg=MOE_CFG)
  np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
  _assert_trees_close(grads, base_grads)
  _assert_trees_close(state.params, base_state.params)
  t = _train_config()
  shardings = train_lib.state_shardings(
      MOE_CFG, train_lib.make_optimizer(t, model_lib.logical_axes(MOE_CFG)), mesh, sharding.RULES)
  experts = shardings.params['moe_blocks']['mlp']
  assert experts['w_up'].spec[1] == 'expert' and experts['w_down'].spec[1] == 'expert'
  assert sharding.batch_sharding(mesh, sharding.RULES).spec[0] == tuple(
      a for a in ('data', 'fsdp', 'expert') if mesh.shape[a] > 1)


def test_expert_parallel_dispatch_is_an_all_to_all():
  mesh = _mesh(MOE_STRATEGIES['expert4_data2'], 8)
  t = _train_config()
  optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(MOE_CFG))
  shardings = train_lib.state_shardings(MOE_CFG, optimizer, mesh, sharding.RULES)
  batch_sharding = sharding.batch_sharding(mesh, sharding.RULES)
  step_fn = train_lib.sharded_train_step(MOE_CFG, t, optimizer, shardings, batch_sharding)
  abstract = jax.eval_shape(functools.partial(train_lib.init_state, MOE_CFG, optimizer, 0))
  batch = jax.tree.map(jnp.asarray, _batches(1)[0])
  with sharding.active(mesh, sharding.RULES):
    hlo = step_fn.lower(abstract, batch).compile().as_text()
  assert 'all-to-all' in hlo


def test_gradient_accumulation_on_a_2x2x2_mesh_matches_one_device(single_device):
  losses, state, _ = _run(_mesh(*STRATEGIES['data2_fsdp2_tensor2']), grad_accum_steps=2)
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
  _assert_trees_close(state.params, single_device[1].params)


def test_every_parameter_is_sharded_as_the_rules_say():
  mesh = _mesh(*STRATEGIES['data2_fsdp2_tensor2'])
  t = _train_config()
  optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(CFG))
  shardings = train_lib.state_shardings(CFG, optimizer, mesh, sharding.RULES)
  specs = jax.tree.map(lambda s: s.spec, shardings.params)
  assert specs['embed'] == P('tensor', 'fsdp')
  assert specs['unembed'] == P('fsdp', 'tensor')
  assert specs['blocks']['attention']['w_q'] == P(None, 'fsdp', 'tensor', None)
  assert specs['blocks']['attention']['w_k'] == P(None, 'fsdp', 'tensor', None)
  assert specs['blocks']['attention']['w_o'] == P(None, 'tensor', None, 'fsdp')
  assert specs['blocks']['mlp']['w_gate'] == P(None, 'fsdp', 'tensor')
  assert specs['blocks']['mlp']['w_down'] == P(None, 'tensor', 'fsdp')
  assert specs['blocks']['mlp_norm']['scale'] == P(None, 'fsdp')
  # Every leaf, generically: the spec is the rules applied to its logical axes.
  axes = model_lib.logical_axes(CFG)
  expected = jax.tree.map(lambda a: sharding.spec(a, sharding.RULES, mesh), axes,
                          is_leaf=lambda x: isinstance(x, tuple))
  assert specs == expected
  # Adam's moments live where their parameters do.
  adam = shardings.opt_state[1][0]
  assert jax.tree.map(lambda s: s.spec, adam.mu) == specs


def test_fsdp_divides_the_bytes_each_device_holds():
  t = _train_config()
  optimizer = train_lib.make_optimizer(t, model_lib.logical_axes(CFG))

  def held(sizes):
    mesh = _mesh(sizes, 8)
    shardings = train_lib.state_shardings(CFG, optimizer, mesh, sharding.RULES)
    state = jax.jit(functools.partial(train_lib.init_state, CFG, optimizer, 0),
                    out_shardings=shardings)()
    return sharding.bytes_per_device((state.params, state.opt_state))

  replicated, fsdp4, fsdp8 = held(dict(data=8)), held(dict(data=2, fsdp=4)), held(dict(fsdp=8))
  # Scalars (Adam's step count) stay replicated: a few bytes on top of an exact division.
  assert replicated / 4 <= fsdp4 < replicated / 4 + 64
  assert replicated / 8 <= fsdp8 < replicated / 8 + 64


def test_a_split_that_does_not_divide_names_the_parameter_and_axis():
  mesh = _mesh(dict(data=2, fsdp=1, tensor=3), 6)
  optimizer = train_lib.make_optimizer(_train_config(), model_lib.logical_axes(CFG))
  message = r'blocks.attention.w_k: dimension 2 \(kv_heads=2\) is not divisible by tensor=3'
  with pytest.raises(sharding.ShardingError, match=message):
    train_lib.state_shardings(CFG, optimizer, mesh, sharding.RULES)


@pytest.mark.parametrize('sizes, message', [
    (dict(data=3, fsdp=1, tensor=1), 'the product 3 is not the device count 8'),
    (dict(data=-1, fsdp=-1, tensor=1), 'at most one -1'),
    (dict(data=-1, fsdp=3, tensor=1), '8 devices are not divisible by 3'),
])
def test_a_mesh_that_does_not_fit_the_devices_is_a_clear_error(sizes, message):
  with pytest.raises(sharding.ShardingError, match=message):
    sharding.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, **sizes}))


def test_rules_can_be_overridden_from_the_config():
  rules = sharding.parse_rules('vocab=,mlp=tensor+fsdp')
  assert rules['vocab'] == () and rules['mlp'] == ('tensor', 'fsdp')
  with pytest.raises(sharding.ShardingError, match='not one of'):
    sharding.parse_rules('mlp=model')
  with pytest.raises(sharding.ShardingError, match='LOGICAL=MESH_AXES'):
    sharding.parse_rules('mlps=tensor')


# -------------------------------------------------------------------------------------------
# The full training loop on a mesh, and checkpoints that move between meshes.


def _loop_config(tokenizer, sizes, **train):
  config = config_lib.base_config()
  config.model.update(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      d_ff=128, max_seq_len=64, dtype='float32')
  config.train.update({'steps': 8, 'batch_size': 16, 'learning_rate': 3e-3, 'warmup_steps': 2,
                       'log_every': 2, 'eval_every': 4, 'eval_batches': 2,
                       'checkpoint_every': 4, **train})
  config.data.update(seq_len=64, max_chars=300_000, tokenizer=tokenizer)
  config.mesh.update({'data': 1, 'fsdp': 1, 'tensor': 1, **sizes})
  return config


@pytest.fixture(scope='module')
def loop_on_2x2x2(tmp_path_factory, stdlib_tokenizer):
  """(state, metrics) of the training loop on a data 2 x fsdp 2 x tensor 2 mesh."""
  return train_lib.train(_loop_config(stdlib_tokenizer, dict(data=2, fsdp=2, tensor=2)),
                         str(tmp_path_factory.mktemp('loop_2x2x2')))


def test_train_loop_on_2x2x2_matches_pure_data_parallel(tmp_path, stdlib_tokenizer,
                                                        loop_on_2x2x2):
  state_a, metrics_a = train_lib.train(
      _loop_config(stdlib_tokenizer, dict(data=8)), str(tmp_path / 'a'))
  state_b, metrics_b = loop_on_2x2x2
  assert metrics_a['eval_loss'] == pytest.approx(metrics_b['eval_loss'], rel=1e-5)
  _assert_trees_close(state_a.params, state_b.params)


def test_checkpoint_saved_on_one_mesh_resumes_on_another(tmp_path, stdlib_tokenizer,
                                                         loop_on_2x2x2):
  straight, _ = loop_on_2x2x2
  train_lib.train(_loop_config(stdlib_tokenizer, dict(fsdp=8), steps_per_run=4),
                  str(tmp_path / 'moved'))
  resumed, _ = train_lib.train(
      _loop_config(stdlib_tokenizer, dict(data=2, fsdp=2, tensor=2)), str(tmp_path / 'moved'))
  assert int(resumed.step) == 8
  _assert_trees_close(resumed.params, straight.params)
  spec = resumed.params['blocks']['attention']['w_q'].sharding.spec
  assert spec == P(None, 'fsdp', 'tensor', None)
