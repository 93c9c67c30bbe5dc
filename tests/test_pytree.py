import jax

from lm import pytree

TREE = {'blocks': {'attention': {'w_q': 1, 'w_k': 2}, 'mlp': {'w_up': 3}}, 'embed': 4}


def test_subtree_and_union_split_and_rejoin_a_tree():
  paths = pytree.leaf_paths(TREE)
  assert paths == [('blocks', 'attention', 'w_q'), ('blocks', 'attention', 'w_k'),
                   ('blocks', 'mlp', 'w_up'), ('embed',)]
  some = pytree.subtree(TREE, [('embed',), ('blocks', 'mlp', 'w_up')])
  assert some == {'blocks': {'mlp': {'w_up': 3}}, 'embed': 4}
  rest = pytree.subtree(TREE, [p for p in paths if p not in pytree.leaf_paths(some)])
  assert pytree.union(some, rest) == TREE


def test_unflatten_keeps_tuple_leaves_and_paths_print_dotted():
  axes = pytree.unflatten({('blocks', 'w_q'): ('layers', 'embed'), ('embed',): ('vocab', 'embed')})
  assert axes == {'blocks': {'w_q': ('layers', 'embed')}, 'embed': ('vocab', 'embed')}
  flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=pytree.is_axes)[0]
  assert [pytree.dotted(path) for path, _ in flat] == ['blocks.w_q', 'embed']
  assert pytree.keys(flat[0][0]) == ('blocks', 'w_q')
