"""Shared by the lm.eval tests: a tiny random HF Llama with a SentencePiece tokenizer, converted to
an lm checkpoint, and local lm-eval tasks over JSONL files (nothing is downloaded)."""

import dataclasses
import json
import os
import shutil

from lm import convert
from lm import data as data_lib
from lm import tokenizer as tokenizer_lib

VOCAB = 400  # The tokenizer's pieces; the HF model has exactly as many rows.
MAX_SEQ_LEN = 128


@dataclasses.dataclass
class TinyLlama:
  hf: str  # HF LlamaForCausalLM directory (safetensors, tokenizer.model).
  lm: str  # lm.convert hf-to-lm output.
  tokenizer: str  # The SentencePiece model.
  model: object  # The transformers model itself (fp32, eval mode).


def build_tiny_llama(directory: str, *, seed: int = 0) -> TinyLlama:
  """Random weights larger than the 0.02 init, so log-likelihoods are O(1) per token and differ."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  spm_path = os.path.join(directory, 'spm.model')
  if not os.path.exists(spm_path):
    texts = list(data_lib.iter_documents('stdlib', max_chars=100_000))
    tokenizer_lib.train_tokenizer(texts, VOCAB, spm_path, max_chars=100_000, seed=0)
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=MAX_SEQ_LEN,
      bos_token_id=tokenizer_lib.BOS_ID, eos_token_id=tokenizer_lib.EOS_ID,
      tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.15) if p.ndim == 2 else p.uniform_(0.5, 1.5)
  hf = os.path.join(directory, 'hf')
  model.save_pretrained(hf, safe_serialization=True)
  shutil.copyfile(spm_path, os.path.join(hf, 'tokenizer.model'))
  lm = os.path.join(directory, 'lm')
  convert.hf_to_lm(hf, lm)
  return TinyLlama(hf=hf, lm=lm, tokenizer=spm_path, model=model)


def without_tokenizer(checkpoint: str, directory: str) -> str:
  """A copy of `checkpoint` with no tokenizer anywhere (data.tokenizer names a missing file)."""
  shutil.copytree(checkpoint, directory)
  os.remove(os.path.join(directory, 'tokenizer.model'))
  path = os.path.join(directory, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config['data']['tokenizer'] = os.path.join(directory, 'gone.model')
  with open(path, 'w') as f:
    json.dump(config, f)
  return directory


# Local tasks: the harness's own task machinery (YAML, prompts, metrics) over files we write.
MC_QUESTIONS = [(f'What is {a} plus {b}?', [str(a + b), str(a + b + 1), str(a * b + 3)])
                for a, b in [(1, 2), (3, 4), (2, 7), (5, 5), (6, 1), (8, 3), (4, 4), (9, 2)]]
TRANSLATIONS = [('the cat sat on the mat', 'le chat'), ('good morning', 'bonjour'),
                ('thank you', 'merci'), ('the house is red', 'la maison est rouge')]
DOCUMENTS = [f'def f{i}(x):\n    return x + {i}\n' * (3 + 5 * i) for i in range(4)]


def write_tasks(directory: str) -> dict[str, str]:
  """Writes three tasks (multiple choice, translation with BLEU/chrF, rolling perplexity) into
  `directory` as YAML over JSONL files; returns {kind: task name}."""
  import yaml  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)

  def task(kind, rows, **fields):
    data = os.path.join(directory, f'{kind}.jsonl')
    with open(data, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
    spec = dict(task=f'local_{kind}', dataset_path='json',
                dataset_kwargs=dict(data_files=dict(test=data)), test_split='test', **fields)
    with open(os.path.join(directory, f'{kind}.yaml'), 'w') as f:
      yaml.safe_dump(spec, f)
    return spec['task']

  return {
      'mc': task('mc', [dict(question=q, choices=c, answer=0) for q, c in MC_QUESTIONS],
                 output_type='multiple_choice', doc_to_text='Question: {{question}}\nAnswer:',
                 doc_to_choice='{{choices}}', doc_to_target='{{answer}}',
                 metric_list=_metrics('acc', 'acc_norm')),
      'translate': task('translate', [dict(en=e, fr=f) for e, f in TRANSLATIONS],
                        output_type='generate_until', doc_to_text='English: {{en}}\nFrench:',
                        doc_to_target=' {{fr}}',
                        generation_kwargs=dict(until=['\n'], max_gen_toks=12, do_sample=False),
                        metric_list=_metrics('bleu', 'chrf')),
      'rolling': task('rolling', [dict(text=t) for t in DOCUMENTS],
                      output_type='loglikelihood_rolling', doc_to_text='',
                      doc_to_target='{{text}}',
                      metric_list=_metrics('bits_per_byte', 'word_perplexity')),
  }


def _metrics(*names):
  """metric_list entries with the harness's own aggregation and direction for each metric."""
  return [dict(metric=n, aggregation=_AGGREGATION[n], higher_is_better=_HIGHER_IS_BETTER[n])
          for n in names]


_AGGREGATION = dict(acc='mean', acc_norm='mean', bleu='bleu', chrf='chrf',
                    bits_per_byte='bits_per_byte', word_perplexity='weighted_perplexity')
_HIGHER_IS_BETTER = dict(acc=True, acc_norm=True, bleu=True, chrf=True, bits_per_byte=False,
                         word_perplexity=False)
