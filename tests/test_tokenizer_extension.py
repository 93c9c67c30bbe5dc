"""Tests of lm/tokenizer_tools.py: train, merge Hindi pieces into an English base, fertility.

The base is trained here as Llama-2's was (BPE, byte fallback, identity normaliser, digits split),
at 4,000 pieces instead of 32,000 for speed; bench/tokenizer.py runs the full size on real text.
"""

import glob
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import types

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

import lm
from lm import tokenizer as tokenizer_lib
from lm import tokenizer_tools

Piece = model_pb2.ModelProto.SentencePiece
proto = tokenizer_lib.read_model_proto
HINDI_SENTENCES = (
    'भारत एक विशाल देश है।', 'यहाँ अनेक भाषाएँ बोली जाती हैं।',
    'हिंदी भारत की राजभाषा है और करोड़ों लोग इसे बोलते हैं।', 'ज़िंदगी में पढ़ाई बहुत ज़रूरी है।',
    'मेरा नाम राहुल है और मैं दिल्ली में रहता हूँ।',
    'आज मौसम बहुत अच्छा है, चलो बाहर घूमने चलते हैं।',
    'बच्चे मैदान में क्रिकेट खेल रहे हैं।', 'माँ रसोई में खाना बना रही है।',
    'क्या आप मुझे स्टेशन का रास्ता बता सकते हैं?', 'गंगा नदी हिमालय से निकलती है।',
    'किसान सुबह जल्दी उठकर खेत में काम करते हैं।', 'पुस्तकालय में हज़ारों किताबें रखी हुई हैं।',
    'हमें पानी बचाना चाहिए क्योंकि यह बहुत कीमती है।', 'दीवाली रोशनी और खुशियों का त्योहार है।',
    'शिक्षक ने छात्रों को गणित का नया पाठ पढ़ाया।', 'रेलगाड़ी समय पर स्टेशन पहुँच गई।',
    'बाज़ार में ताज़ी सब्ज़ियाँ और फल बिक रहे हैं।', 'मुझे संगीत सुनना और कविताएँ पढ़ना पसंद है।',
    'डॉक्टर ने मरीज़ को आराम करने की सलाह दी।', 'सूरज पूरब में उगता है और पश्चिम में डूबता है।',
    'हमारे गाँव में एक पुराना मंदिर है।', 'वह हर रोज़ सुबह योग करती है।',
    'कल रात बहुत तेज़ बारिश हुई थी।', 'सरकार ने नई सड़क बनाने का फ़ैसला किया है।',
    'मेरे दादाजी हमें पुरानी कहानियाँ सुनाते थे।', 'विज्ञान ने हमारे जीवन को आसान बना दिया है।',
    'परीक्षा के लिए अच्छी तैयारी करनी चाहिए।', 'पेड़ों से हमें ऑक्सीजन और छाया मिलती है।',
    'उसने अपने दोस्त को जन्मदिन पर एक घड़ी दी।', 'शहर की सड़कों पर बहुत भीड़ रहती है।',
    'हम सबको मिलजुलकर रहना चाहिए।', 'चिड़िया पेड़ की डाल पर बैठकर गाना गा रही है।',
    'इस साल फ़सल बहुत अच्छी हुई है।', 'मैंने कल एक दिलचस्प फ़िल्म देखी।',
    'समुद्र के किनारे ठंडी हवा चल रही थी।', 'अस्पताल में डॉक्टर और नर्सें दिन रात काम करते हैं।',
    'बच्चों को खेलकूद में भी भाग लेना चाहिए।', 'नदी के पार एक छोटा सा गाँव बसा है।',
    'सच बोलना सबसे बड़ा गुण है।', 'पिताजी ने बाज़ार से मिठाई खरीदी।',
    'हमारी टीम ने फ़ाइनल मैच जीत लिया।', 'पहाड़ों पर सर्दियों में बर्फ़ गिरती है।',
    'वे लोग शाम को पार्क में टहलने जाते हैं।', 'यह किताब हिंदी साहित्य के इतिहास के बारे में है।',
)
ENGLISH = ('The quick brown fox jumps over the lazy dog. Numbers like 12345 are split into digits.',
           '    return x  # indented code keeps its spaces', 'Tabs\tand "quotes" (brackets), too!')


def english_docstrings() -> list[str]:
  """Lines of the triple-quoted strings of the stdlib's top-level modules: ~1 MB of English."""
  texts = []
  for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '*.py'))):
    with open(path, encoding='utf-8', errors='replace') as f:
      texts += re.findall(r'"""(.*?)"""', f.read(), re.S)
  return [line for text in texts for line in text.splitlines() if line.strip()]


def write_lines(path, lines) -> str:
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> dict:
  """Text files: English to train the base on and held out, Hindi shuffled into paragraphs."""
  root = tmp_path_factory.mktemp('text')
  english = english_docstrings()
  rng = random.Random(0)
  hindi = []
  for _ in range(20):
    sentences = rng.sample(HINDI_SENTENCES, len(HINDI_SENTENCES))
    hindi += [' '.join(sentences[i:i + 3]) for i in range(0, len(sentences), 3)]
  return dict(english=write_lines(root / 'en.txt', english[:-2000]),
              english_held_out=write_lines(root / 'en_held_out.txt', english[-2000:]),
              hindi=write_lines(root / 'hi.txt', hindi))


@pytest.fixture(scope='module')
def models(files, tmp_path_factory) -> dict:
  """A Llama-2-style English base, a Hindi BPE model and a Hindi unigram model (.model paths)."""
  root = tmp_path_factory.mktemp('models')
  base = tokenizer_tools.train_model([files['english']], 4000, str(root / 'base'))
  hindi = tokenizer_tools.train_model([files['hindi']], 700, str(root / 'hindi'))
  unigram = tokenizer_tools.train_model([files['hindi']], 350, str(root / 'unigram'),
                                        model_type='unigram')
  return dict(base=base['model'], hindi=hindi['model'], unigram=unigram['model'])


@pytest.fixture(scope='module')
def merged(models, files, tmp_path_factory) -> tuple[str, dict]:
  path = str(tmp_path_factory.mktemp('merged') / 'merged.model')
  return path, tokenizer_tools.merge_models(models['base'], models['hindi'], path,
                                            check=files['english'])


def hand_made_model(path, pieces) -> str:
  """A model file: <unk> <s> </s>, the 256 bytes, then (piece, score[, type]) as given."""
  model = model_pb2.ModelProto()
  model.trainer_spec.model_type = model_pb2.TrainerSpec.BPE
  model.trainer_spec.byte_fallback = True
  model.normalizer_spec.name = 'identity'
  model.normalizer_spec.add_dummy_prefix = True
  model.normalizer_spec.remove_extra_whitespaces = False
  model.normalizer_spec.escape_whitespaces = True
  model.pieces.add(piece='<unk>', type=Piece.UNKNOWN)
  model.pieces.add(piece='<s>', type=Piece.CONTROL)
  model.pieces.add(piece='</s>', type=Piece.CONTROL)
  for byte in range(256):
    model.pieces.add(piece=f'<0x{byte:02X}>', type=Piece.BYTE)
  for piece, score, *piece_type in pieces:
    model.pieces.add(piece=piece, score=score, type=piece_type[0] if piece_type else Piece.NORMAL)
  path.write_bytes(model.SerializeToString())
  return str(path)


def nothing_written(path) -> bool:
  return not os.path.exists(path) and not glob.glob(os.path.join(os.path.dirname(path), '.tmp-*'))


# train


def test_base_is_llama2_style(models):
  model = proto(models['base'])
  spec, norm = model.trainer_spec, model.normalizer_spec
  assert spec.model_type == spec.BPE and len(model.pieces) == 4000
  assert (spec.byte_fallback, spec.split_digits, spec.allow_whitespace_only_pieces) == (True,) * 3
  assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, -1)
  assert (norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces) == ('identity', True,
                                                                               False)
  assert [p.piece for p in model.pieces[:4]] == ['<unk>', '<s>', '</s>', '<0x00>']  # As Llama-2.
  assert all(p.type == p.BYTE for p in model.pieces[3:259])


def test_train_command_writes_model_and_vocab(tmp_path, capsys):
  text = write_lines(tmp_path / 'hi.txt', HINDI_SENTENCES)
  tokenizer_lib.main(['train', '--input', text, '--vocab_size', '350', '--out',
                      str(tmp_path / 'out' / 'hi'), '--control_symbols', '<hi>'])
  assert 'vocab_size  350' in capsys.readouterr().out
  vocab = (tmp_path / 'out' / 'hi.vocab').read_text(encoding='utf-8').splitlines()
  assert len(vocab) == 350 and vocab[3] == '<hi>\t0'  # Control symbols follow </s>.
  tok = tokenizer_lib.Tokenizer(str(tmp_path / 'out' / 'hi.model'))
  assert tok.decode(tok.encode(HINDI_SENTENCES[0])) == HINDI_SENTENCES[0]
  assert sorted(os.listdir(tmp_path / 'out')) == ['hi.model', 'hi.vocab']  # No temporary files.


def test_train_on_word_frequencies(tmp_path):
  """A `word<TAB>count` file counts each word `count` times: frequent words become pieces."""
  words = sorted(set(' '.join(HINDI_SENTENCES).replace('।', '').split()))
  counts = write_lines(tmp_path / 'words.tsv', [f'{w}\t{1000 if w == "पुस्तकालय" else 1}'
                                                for w in words])
  summary = tokenizer_tools.train_model([counts], 330, str(tmp_path / 'freq'), input_format='tsv')
  sp = spm.SentencePieceProcessor(model_file=summary['model'])
  assert sp.EncodeAsPieces('पुस्तकालय') == ['▁पुस्तकालय']
  assert len(sp.EncodeAsPieces('दिलचस्प')) > 1  # Seen once: not a piece at this size.


@pytest.mark.parametrize('line, error', [
    (b'word', r'words\.tsv:2: expected "text<TAB>count"'),
    (b'word\tmany', r'words\.tsv:2: expected'),
    (b'caf\xe9\t2', r'words\.tsv is not UTF-8 text: line 2'),
])
def test_train_bad_inputs(tmp_path, line, error):
  path = tmp_path / 'words.tsv'
  path.write_bytes(b'ok\t3\n' + line)
  with pytest.raises(ValueError, match=error):
    tokenizer_tools.train_model([str(path)], 300, str(tmp_path / 'm'), input_format='tsv')
  assert nothing_written(str(tmp_path / 'm.model')) and not os.path.exists(tmp_path / 'm.vocab')


def test_train_command_errors(tmp_path):
  with pytest.raises(SystemExit, match=r'train: error: Input file .*nope\.txt.* does not exist'):
    tokenizer_lib.main(['train', '--input', str(tmp_path / 'nope.txt'), '--vocab_size', '300',
                        '--out', str(tmp_path / 'm')])
  text = write_lines(tmp_path / 'hi.txt', HINDI_SENTENCES[:2])
  with pytest.raises(SystemExit, match=r'vocab_size=5000 does not fit .*at most \d+'):
    tokenizer_lib.main(['train', '--input', text, '--vocab_size', '5000', '--out',
                        str(tmp_path / 'm')])
  with pytest.raises(SystemExit, match=r'could not train on .*hi\.txt: .*no_such_option'):
    tokenizer_lib.main(['train', '--input', text, '--vocab_size', '300', '--out',
                        str(tmp_path / 'm'), '--spm', 'no_such_option=1'])
  assert nothing_written(str(tmp_path / 'm.model'))


# merge


def test_merge_keeps_every_base_piece(models, merged):
  base, result = proto(models['base']), proto(merged[0])
  assert result.pieces[:len(base.pieces)] == base.pieces  # Same piece, score and type at each id.
  assert (result.normalizer_spec, result.trainer_spec.model_type) == (
      base.normalizer_spec, base.trainer_spec.model_type)


def test_merge_appends_new_pieces_below_base_in_merge_order(models, merged):
  base, hindi, result = proto(models['base']), proto(models['hindi']), proto(merged[0])
  base_pieces = {p.piece for p in base.pieces}
  expected = [p for p in hindi.pieces if p.type == p.NORMAL and p.piece not in base_pieces]
  added = result.pieces[len(base.pieces):]
  assert [p.piece for p in added] == [p.piece for p in expected]
  assert all(p.type == p.NORMAL for p in added)
  assert max(p.score for p in added) < min(p.score for p in base.pieces)
  assert np.allclose(np.diff([p.score for p in added]), np.diff([p.score for p in expected]))


def test_merge_summary_counts(models, merged):
  base, hindi = proto(models['base']), proto(models['hindi'])
  base_pieces = {p.piece for p in base.pieces}
  duplicates = [p.piece for p in hindi.pieces if p.type == p.NORMAL and p.piece in base_pieces]
  summary = merged[1]
  assert {'▁', ',', '?'} <= set(duplicates)  # Hindi shares some pieces with English.
  assert summary['skipped_duplicates'] == len(duplicates)
  assert summary['skipped_special'] == 3 + 256  # <unk> <s> </s> and the bytes.
  assert summary['base_size'] == 4000
  assert summary['base_size'] + summary['added'] == summary['final_size'] == len(
      proto(merged[0]).pieces)
  assert summary['added'] + summary['skipped_duplicates'] + summary['skipped_special'] + (
      summary['skipped_in_check_text']) == len(hindi.pieces)
  assert summary['check'].endswith('tokens)') and 'unchanged on all' in summary['check']


def test_english_tokenized_as_before(models, files, merged):
  base, result = tokenizer_lib.Tokenizer(models['base']), tokenizer_lib.Tokenizer(merged[0])
  held_out = open(files['english_held_out'], encoding='utf-8').read().splitlines()
  texts = held_out + list(ENGLISH)
  assert result.encode_batch(texts) == base.encode_batch(texts)


def test_hindi_needs_far_fewer_tokens(models, files, merged):
  rows = tokenizer_tools.fertility(dict(base=models['base'], merged=merged[0]),
                                   dict(hi=files['hindi']))
  before, after = rows
  assert before['byte_fallback_share'] > 0.8 and after['byte_fallback_share'] == 0
  assert after['tokens_per_word'] < before['tokens_per_word'] / 4


@pytest.mark.parametrize('text', [
    HINDI_SENTENCES[2], ' '.join(HINDI_SENTENCES[::7]), ENGLISH[0], ENGLISH[1],
    'mixed हिंदी and English, 2024 😀 漢字\twith tabs  ', '',
], ids=['hindi', 'hindi_paragraph', 'english', 'code', 'mixed', 'empty'])
def test_merged_round_trip(merged, text):
  tok = tokenizer_lib.Tokenizer(merged[0])
  assert tok.decode(tok.encode(text)) == text


def test_merge_special_and_user_defined_pieces(tmp_path):
  base = hand_made_model(tmp_path / 'base.model', [('▁', -1), ('a', -2), ('b', -3)])
  add = hand_made_model(tmp_path / 'add.model', [
      ('<hi>', 0, Piece.CONTROL), ('<user>', 0, Piece.USER_DEFINED), ('<unused>', 0, Piece.UNUSED),
      ('▁क', -1), ('a', -2), ('क', -3), ('b', -4)])
  out = str(tmp_path / 'merged.model')
  summary = tokenizer_tools.merge_models(base, add, out)
  added = [(p.piece, p.score, p.type) for p in proto(out).pieces[262:]]
  # Below the base's lowest score (-3), with the added model's gaps; user-defined stays so.
  assert added == [('<user>', -4, Piece.USER_DEFINED), ('▁क', -5, Piece.NORMAL),
                   ('क', -7, Piece.NORMAL)]
  assert (summary['added'], summary['added_user_defined'], summary['skipped_duplicates'],
          summary['skipped_special']) == (3, 1, 2, 3 + 256 + 2)
  sp = spm.SentencePieceProcessor(model_file=out)
  assert sp.EncodeAsPieces('a<user> क') == ['▁', 'a', '<user>', '▁क']


def test_merge_check_protects_text_that_added_pieces_would_change(tmp_path, monkeypatch):
  """Added pieces act only after every base merge, yet may still join two base tokens, as '),'."""
  base = hand_made_model(tmp_path / 'base.model',
                         [('▁a', -1), ('▁', -2), ('a', -3), (')', -4), (',', -5)])
  add = hand_made_model(tmp_path / 'add.model', [('),', -1), ('▁क', -2), ('क', -3)])
  check = write_lines(tmp_path / 'english.txt', ['a), a'])
  unprotected = str(tmp_path / 'unprotected.model')
  tokenizer_tools.merge_models(base, add, unprotected)
  assert spm.SentencePieceProcessor(model_file=unprotected).EncodeAsPieces('a),') == ['▁a', '),']
  out = str(tmp_path / 'merged.model')
  summary = tokenizer_tools.merge_models(base, add, out, check=check)
  assert (summary['added'], summary['skipped_in_check_text']) == (2, 1)
  assert summary['check'] == f'{check}: unchanged on all 1 lines (4 tokens)'
  # The verification stands on its own: without the protection, it refuses to write.
  monkeypatch.setattr(tokenizer_tools, '_normalized_lines', lambda proto, path: '')
  with pytest.raises(ValueError, match=r'tokenizes 1 of the 1 lines of .*english\.txt'):
    tokenizer_tools.merge_models(base, add, str(tmp_path / 'bad.model'), check=check)
  assert nothing_written(str(tmp_path / 'bad.model'))


def test_merge_refuses_bad_inputs(models, merged, tmp_path):
  out = str(tmp_path / 'out.model')
  corrupt = tmp_path / 'corrupt.model'
  corrupt.write_bytes(b'\x00 not a model')
  cases = [
      ((models['base'], models['unigram']), ValueError, r'unigram\.model is a UNIGRAM model but '
                                                        r'.*base\.model is BPE'),
      ((models['base'], models['base']), ValueError, 'is the same model as .*nothing to add'),
      ((merged[0], models['hindi']), ValueError, 'has no piece that .* lacks .*nothing to add'),
      ((str(tmp_path / 'nope.model'), models['hindi']), FileNotFoundError, r'nope\.model'),
      ((models['base'], str(corrupt)), ValueError, r'corrupt\.model.* not a valid'),
  ]
  for (base, add), error, message in cases:
    with pytest.raises(error, match=message):
      tokenizer_tools.merge_models(base, add, out)
    assert nothing_written(out)


def test_merge_command(models, files, tmp_path, capsys):
  out = str(tmp_path / 'merged.model')
  tokenizer_lib.main(['merge', '--base', models['base'], '--add', models['hindi'], '--out', out,
                      '--check', files['english_held_out']])
  printed = capsys.readouterr().out
  for line in ('base_size ', 'added ', 'skipped_duplicates ', 'final_size ', 'check '):
    assert line in printed
  assert 'unchanged on all 2000 lines' in printed
  with pytest.raises(SystemExit, match=r'merge: error: .*is a UNIGRAM model'):
    tokenizer_lib.main(['merge', '--base', models['base'], '--add', models['unigram'], '--out',
                        str(tmp_path / 'never.model')])
  assert nothing_written(str(tmp_path / 'never.model'))


# fertility


def test_fertility_by_hand(tmp_path):
  model = hand_made_model(tmp_path / 'm.model', [('▁a', 0), ('▁ab', -1), ('▁', -2), ('a', -3),
                                                 ('b', -4)])
  text = tmp_path / 't.txt'
  text.write_text('ab ab\n\nbé\n', encoding='utf-8')
  [row] = tokenizer_tools.fertility(dict(m=model), dict(t=str(text)))
  # 'ab ab' -> ▁ab ▁ab; 'bé' -> ▁ b <0xC3> <0xA9>: 6 tokens, 2 of them bytes, for 3 words,
  # 7 characters and 8 bytes.
  assert row == dict(model='m', text='t', words=3, chars=7, bytes=8, tokens=6,
                     tokens_per_word=2.0, tokens_per_char=6 / 7, bytes_per_token=8 / 6,
                     byte_fallback_share=2 / 6)


def test_fertility_command(models, merged, files, tmp_path, capsys):
  out = tmp_path / 'report'
  tokenizer_lib.main(['fertility', '--model', f'base={models["base"]}', f'merged={merged[0]}',
                      '--text', f'hi={files["hindi"]}', files['english_held_out'],
                      '--out', str(out)])
  printed = capsys.readouterr().out
  assert 'tokens/word' in printed and 'en_held_out' in printed
  rows = json.loads((out / 'fertility.json').read_text())
  assert [(r['model'], r['text']) for r in rows] == [
      ('base', 'hi'), ('base', 'en_held_out'), ('merged', 'hi'), ('merged', 'en_held_out')]
  assert rows[1]['tokens'] == rows[3]['tokens']
  assert (out / 'fertility.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('content, message', [
    (b'', r'empty\.txt is empty'), (b' \n\n', r'empty\.txt is empty'),
    (b'caf\xe9\n', r'empty\.txt is not UTF-8 text'),
], ids=['empty', 'blank', 'latin1'])
def test_fertility_bad_text(models, tmp_path, content, message):
  (tmp_path / 'empty.txt').write_bytes(content)
  with pytest.raises(ValueError, match=message):
    tokenizer_tools.fertility(dict(base=models['base']), dict(x=str(tmp_path / 'empty.txt')))
  with pytest.raises(SystemExit, match=r'fertility: error: .*' + message):
    tokenizer_lib.main(['fertility', '--model', models['base'], '--text',
                        str(tmp_path / 'empty.txt'), '--out', str(tmp_path / 'report')])
  assert not os.path.exists(tmp_path / 'report')


# The command line's old spelling, and the functions once in lm/tokenizer.py


def test_extend_checkpoint_forwards_to_lm_vocab(monkeypatch):
  """`python -m lm.tokenizer extend-checkpoint` runs lm.vocab's command (faked: JAX is slow)."""
  calls = []
  fake = types.SimpleNamespace(main=calls.append)
  monkeypatch.setitem(sys.modules, 'lm.vocab', fake)
  monkeypatch.setattr(lm, 'vocab', fake, raising=False)
  flags = ['extend-checkpoint', '--checkpoint', 'ckpt', '--base', 'b.model', '--out', 'new']
  tokenizer_lib.main(flags)
  assert calls == [flags]


def test_the_tools_are_still_found_in_lm_tokenizer():
  for name in ('train_model', 'merge_models', 'fertility', 'format_fertility', 'plot_fertility'):
    assert getattr(tokenizer_lib, name) is getattr(tokenizer_tools, name)
  with pytest.raises(AttributeError, match='no attribute .*_normalized_lines'):
    getattr(tokenizer_lib, '_normalized_lines')


def test_tokenizer_tools_do_not_import_jax():
  code = 'import sys, lm.tokenizer_tools; print(sorted({"jax", "flax"} & set(sys.modules)))'
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.stdout.strip() == '[]'
