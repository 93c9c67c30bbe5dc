"""`lm`: a JAX/Flax codebase for training and studying transformer language models."""

import setuptools

setuptools.setup(
    name='lm',
    version='0.1.0',
    description='Transformer language models in JAX/Flax: training, tokenizers, scaling studies.',
    packages=setuptools.find_packages(include=['lm', 'lm.*', 'launch', 'launch.*']),
    python_requires='>=3.10',
    install_requires=[
        # Lower bounds are the versions this code is tested with.
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'grain>=0.2.18',
        'sentencepiece>=0.2.1',
        'ml-collections>=1.1.0',
        'tensorflow-datasets>=4.9.10',
        'absl-py>=2.1',
        'numpy>=2.0',
        'tqdm>=4.66',
        'tensorboardX>=2.6.2',
        'matplotlib>=3.9',
        'protobuf>=5',  # SentencePiece's ModelProto, edited by `lm.tokenizer merge`.
        'scipy>=1.17',  # The Chinchilla fits in lm/scaling.py.
        'safetensors>=0.4',  # HuggingFace checkpoints (lm/convert.py), read without PyTorch.
        # EleutherAI's lm-evaluation-harness: tasks, few-shot prompts and metrics for lm.eval
        # (sacrebleu and rouge-score come with it).
        'lm-eval>=0.4.13',
    ],
    extras_require={
        # torch, transformers and peft: the reference that tests/test_convert.py checks lm's
        # logits against (a CPU wheel at exactly this version; a bare 'torch' pulls a CUDA build);
        # trl: the reference post-training losses (tests/test_post_*.py); the prepare extra for
        # tests/test_prepare*.py; datasketch for bench/prepare.py --smoke
        # (tests/test_bench_prepare.py).
        'test': ['pytest>=8', 'pytest-xdist>=3.6', 'nbclient>=0.10', 'nbformat>=5.10',
                 'ipykernel>=6.29', 'ray>=2.50', 'torch==2.13.0', 'transformers>=5.0',
                 'peft>=0.21', 'trl>=1.16', 'datatrove>=0.10.1', 'py3langid>=0.4.0',
                 'datasketch>=2.0'],
        # Data preparation (python -m lm.prepare): datatrove, the engine (its Gopher, C4 and
        # MinHash steps and executors), and py3langid, language identification with its model
        # in the package.
        'prepare': ['datatrove>=0.10.1', 'py3langid>=0.4.0'],
        # The sweep launcher's Ray backend (python -m launch.sweep --backend ray).
        'ray': ['ray>=2.50'],
        # The PyTorch peer of bench/train_throughput.py (a CPU wheel at exactly this version).
        # datasketch: the MinHash baseline lm.prepare's near-dedup is timed against.
        'bench': ['torch==2.13.0', 'transformers>=5.0', 'peft>=0.21', 'trl>=1.16',
                  'datasketch>=2.0'],
    },
)
