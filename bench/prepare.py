"""lm.prepare end to end on a synthetic web corpus: throughput with 1 and 2 workers, near-dedup
against datasketch, peak memory and the size of the audit trail.

  pip install -e '.[prepare,bench]'   # datatrove, py3langid; datasketch
  python bench/prepare.py [--mb 64] [--seed 0] [--workers 1,2] [--skip_datasketch]
  python bench/prepare.py --smoke   # seconds (tests/test_bench_prepare.py runs it)

The corpus (build_corpus, deterministic in --seed, about --mb megabytes of UTF-8 JSON lines) is
made from English and Hindi grammars of a few hundred words each, so that distinct documents
share almost no 5-grams, as distinct web pages do: 55% English and 45% Hindi documents of 2 to 8
paragraphs (a title line first in half of them, which C4's line rule removes), and planted
  exact copies   3% of documents: another's text with its whitespace changed and lower-cased;
  near copies    12%: another's with 1% or 3% of its words replaced, a sentence inserted, two
                 swapped, or a share-this footer appended; a tenth of the bases get two or three;
  rewrites       2%: another's with 30% of its words replaced (not near duplicates);
  templated      every 250th document on: a page, a dozen variants with 3.5% of its words
                 replaced (Jaccard ~0.75 to it, ~0.6 to each other: not near duplicates) and one
                 with 0.4% replaced (~0.96: a near duplicate), as pages of one site template;
  junk           9%: navigation menus, one line repeated, JavaScript, lorem ipsum, hashtag spam,
                 bullet lists, one-line pages;
  other languages 3% French and German; empty 0.5%;
  PII            emails, phone numbers and public IPv4 addresses in 12% of the good documents
                 (and in their copies).
Which documents are which is known to the benchmark (never to lm.prepare: its input is only
{id, text} lines), and counted in the report beside what lm.prepare removed.

Three sections, each a part of the JSON report (--out):

1. End to end: `python -m lm.prepare --config configs/prepare/default.py` on the corpus, a fresh
   process per --workers value (every stage on, a tokenizer of --vocab_size pieces trained on
   the kept documents), timed from the command's start to its exit (imports, datatrove's worker
   processes, writing decisions.jsonl and report.json included): input documents and MB (of
   text, UTF-8) per second, and the ratio to the first --workers value. The report's own
   figures are kept too: each pass's wall seconds (clusters and tokenizer are one task whatever
   the workers; with more than one worker every pass starts a new pool of processes that import
   lm.prepare again), and each stage's seconds spent deciding, summed over tasks (so its
   documents/s are per worker). Also checked: the runs' decisions agree (same_removals; the
   neighbour a near duplicate's reason names may differ, since datatrove's candidate pairs
   depend on how the input is split into tasks: see section 2), exact copies removed against
   those planted whose copy and base both passed the filters, and PII found against planted.
2. Near dedup: lm.prepare's MinHash (datatrove's MinhashDedupSignature and MinhashDedupBuckets,
   then lm.prepare.dedup.Clusters confirming candidates by exact Jaccard) against datasketch's
   MinHash and MinHashLSH, on the same documents (the whole corpus, every other stage off, exact
   dedup too, so exact copies are near duplicates of Jaccard 1) with the same settings: word
   5-grams of the same normalized words (datatrove's simplify_text and lm.prepare.words'
   tokenizer), bands x rows = 20 x 5 = 100 permutations (MinHashLSH's params=(b, r)), threshold
   0.8, one process each. datasketch's side runs in memory: shingles, MinHash.update_batch,
   MinHashLSH.insert, a query per document for its candidate pairs, then the same exact-Jaccard
   confirmation and first-in-input grouping as lm.prepare's. It is like for like in the hashing
   work (SHA-1 of every shingle to 64 bits, bands x rows universal hashes, the same banding;
   datasketch's scheme='affine64', datatrove's permutations mod 2^61-1, so each side's
   candidates are a different random sample of the similar pairs) and in the decisions made
   from candidates. It is not in I/O: lm.prepare's passes read and write their documents,
   signatures and buckets as files (what lets them run as separate tasks, resume, and scale
   past memory), so its side also pays for JSON and disk; its seconds are the pipeline's
   signatures, buckets and clusters passes. Nor in the candidates themselves: a MinHashLSH
   query returns every document sharing a band, while datatrove's buckets list, for each run of
   documents with one band signature, only consecutive pairs (enough for its own union of all
   pairs, not for pair-by-pair confirmation), hence fewer candidate pairs on lm.prepare's side.
   Both are scored against exact Jaccard similarity of the shingle sets: recall is the share of
   planted pairs (two documents of one planted family) with Jaccard >= threshold that end in
   one group; precision the share of removed documents with Jaccard >= threshold to some
   document of their group; candidate precision the share of candidate pairs that confirmation
   keeps.
3. Memory and audit size: each run's peak resident memory, two ways. os.wait4 on the command's
   process gives its ru_maxrss, which takes in (as RUSAGE_CHILDREN would) its descendants that
   it reaped itself, but not datatrove's workers: they are children of multiprocessing's
   forkserver, which outlives the command unreaped, so with more than one worker this is the
   parent process alone. The process tree's summed RSS, sampled every 0.1 s from /proc
   (shared pages counted in each process), is the peak of them all together, and the largest
   single process's beside it. The benchmark's own getrusage (self and children) is reported
   too. decisions.jsonl's bytes per input document, times a million, is its size for a million
   documents, extrapolated linearly from this run (a line's length depends on the id and the
   reason, not on the document's length).
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from bench import train_throughput as tt  # pylint: disable=wrong-import-position

_machine_busy_s = tt._machine_busy_s  # pylint: disable=protected-access

SMOKE = dict(mb=0.5, workers='1,2', vocab_size=512)

# ---------------------------------------------------------------------------------------------
# The corpus: English and Hindi grammars, and what is planted in it.

_EN = dict(
    det=('the', 'a', 'this', 'that', 'every', 'our', 'their', 'her', 'his', 'one', 'each',
         'another'),
    adj=('old', 'young', 'quiet', 'busy', 'small', 'large', 'careful', 'tired', 'cheerful',
         'local', 'famous', 'new', 'patient', 'honest', 'clever', 'wooden', 'distant', 'bright',
         'narrow', 'ancient', 'modern', 'friendly', 'nervous', 'generous', 'curious', 'gentle',
         'proud', 'strange', 'simple', 'heavy', 'green', 'northern', 'southern', 'empty',
         'crowded', 'silent', 'rusty', 'fresh', 'humble', 'eager'),
    agent=('farmer', 'teacher', 'doctor', 'baker', 'student', 'driver', 'nurse', 'engineer',
           'painter', 'writer', 'librarian', 'carpenter', 'fisherman', 'merchant', 'soldier',
           'gardener', 'musician', 'scientist', 'mayor', 'neighbour', 'child', 'grandmother',
           'captain', 'shopkeeper', 'tailor', 'potter', 'weaver', 'priest', 'lawyer', 'reporter',
           'council', 'committee', 'company', 'family', 'team', 'orchestra', 'newspaper',
           'volunteer', 'nephew', 'stranger', 'guide', 'pilot', 'judge', 'clerk', 'cook'),
    noun=('village', 'school', 'hospital', 'museum', 'factory', 'river', 'bridge', 'garden',
          'market', 'library', 'station', 'harbour', 'temple', 'festival', 'bakery', 'railway',
          'tractor', 'boat', 'lantern', 'letter', 'recipe', 'map', 'painting', 'song', 'book',
          'well', 'road', 'roof', 'window', 'field', 'forest', 'hill', 'lake', 'machine',
          'bicycle', 'clock', 'fence', 'basket', 'drum', 'kite', 'ladder', 'wagon', 'statue',
          'fountain', 'photograph', 'engine', 'carpet', 'violin', 'telescope', 'shed'),
    verb=('repair', 'visit', 'paint', 'clean', 'describe', 'carry', 'study', 'open', 'follow',
          'watch', 'help', 'move', 'collect', 'deliver', 'discover', 'explain', 'finish',
          'improve', 'measure', 'notice', 'offer', 'order', 'plant', 'prepare', 'protect',
          'reach', 'record', 'remember', 'replace', 'return', 'save', 'share', 'test', 'train',
          'wash', 'welcome', 'answer', 'check', 'count', 'cover', 'decorate', 'invite', 'join',
          'lift', 'mention', 'pack', 'pull', 'push', 'rescue', 'search', 'serve', 'support',
          'guard', 'borrow', 'inspect', 'photograph', 'celebrate', 'restore', 'sketch'),
    prep=('in', 'near', 'behind', 'across', 'beside', 'along', 'outside', 'inside', 'towards',
          'around', 'beyond', 'under', 'above', 'past'),
    place=('the market', 'the harbour', 'the old bridge', 'the railway station', 'the hospital',
           'the village square', 'the school yard', 'the river bank', 'the main road',
           'the temple', 'the bus stop', 'the post office', 'the library', 'the factory gate',
           'the football ground', 'the hills', 'the forest', 'the lake', 'the fields',
           'the city hall', 'the museum', 'the bakery', 'the town', 'the valley',
           'the orchard', 'the mill', 'the beach', 'the airport', 'the canal', 'the castle'),
    time=('last week', 'on Monday morning', 'after the storm', 'before dawn', 'in early spring',
          'during the festival', 'late at night', 'on a cold evening', 'after lunch',
          'in the summer of 1998', 'two years ago', 'every Saturday', 'at the end of March',
          'before the election', 'after the harvest', 'in the rainy season', 'yesterday',
          'on her birthday', 'that afternoon', 'for the first time', 'once a month',
          'soon after sunrise', 'in the winter', 'on the way home', 'at midnight'),
    tail=('because the weather was bad', 'so that everyone could see it',
          'while the others were asleep', 'and nobody said a word', 'although it was raining',
          'as the mayor had asked', 'and the children cheered', 'before anyone noticed',
          'with great care', 'without any help', 'for almost an hour',
          'to the surprise of many'),
    said=('said', 'wrote', 'explained', 'reported', 'remembered', 'believed', 'announced'),
    title=('News', 'Report', 'Notes', 'Letter', 'Story', 'Update', 'Diary', 'Review', 'Guide'),
)

_HI = dict(
    subject=('किसान', 'शिक्षक', 'डॉक्टर', 'दुकानदार', 'लेखक', 'पत्रकार', 'मज़दूर', 'विद्यार्थी',
             'कलाकार', 'सैनिक', 'व्यापारी', 'ड्राइवर', 'माली', 'पुजारी', 'मंत्री', 'वकील',
             'बुनकर', 'कुम्हार', 'नाविक', 'चित्रकार', 'संगीतकार', 'वैज्ञानिक', 'इंजीनियर',
             'माँ', 'दादी', 'बहन', 'अध्यापिका', 'नर्स', 'सरपंच', 'डाकिया'),
    adj=('मेहनती', 'ईमानदार', 'बुद्धिमान', 'प्रसिद्ध', 'गरीब', 'अमीर', 'युवा', 'समझदार', 'दयालु',
         'नेक', 'शांत', 'होशियार', 'बहादुर', 'चतुर', 'ग़रीब', 'अनुभवी'),
    object=('बच्चे', 'लड़के', 'मेहमानों', 'यात्रियों', 'पड़ोसियों', 'मज़दूरों', 'गाय', 'बकरी',
            'घोड़े', 'दोस्तों', 'विद्यार्थियों', 'रोगी', 'बूढ़े आदमी', 'छोटी लड़की', 'ग्राहकों',
            'अधिकारियों', 'गाँव वालों', 'किसानों', 'शिक्षकों', 'कुत्ते', 'बेटे', 'बेटी', 'भाई',
            'पुलिस', 'नेताओं', 'खिलाड़ियों'),
    verb=('बुलाया', 'देखा', 'समझाया', 'पढ़ाया', 'सिखाया', 'बचाया', 'रोका', 'पहचाना', 'खोजा',
          'भेजा', 'पुकारा', 'सराहा', 'मनाया', 'जगाया', 'उठाया', 'पकड़ा', 'संभाला', 'ढूँढा',
          'याद किया', 'आमंत्रित किया', 'सम्मानित किया', 'प्रोत्साहित किया', 'सूचित किया',
          'शामिल किया', 'धन्यवाद दिया', 'रास्ता दिखाया', 'खाना खिलाया', 'पानी पिलाया'),
    place=('बाज़ार में', 'खेत में', 'विद्यालय में', 'मंदिर के पास', 'नदी के किनारे',
           'रेलवे स्टेशन पर', 'अस्पताल में', 'पुस्तकालय में', 'गाँव की चौपाल पर', 'शहर के बीच',
           'पुराने किले में', 'पहाड़ी के ऊपर', 'घर के आँगन में', 'सड़क के किनारे', 'मेले में',
           'डाकघर के सामने', 'बस अड्डे पर', 'कारखाने में', 'बगीचे में', 'तालाब के पास',
           'पंचायत भवन में', 'खेल के मैदान में', 'कुएँ के पास', 'पुल के नीचे'),
    time=('आज सुबह', 'कल शाम', 'पिछले हफ्ते', 'बारिश के बाद', 'दिवाली से पहले',
          'गर्मी की छुट्टियों में', 'हर रविवार', 'सुबह जल्दी', 'दोपहर के समय', 'रात को',
          'पिछले साल', 'त्योहार के दिन', 'परीक्षा से पहले', 'चुनाव के बाद', 'सर्दियों में',
          'फसल कटने के बाद', 'होली के दिन', 'सन 1998 में', 'महीने के अंत में', 'उस दिन'),
    plural=('गाँव के लोग', 'बच्चे', 'किसान', 'मज़दूर', 'विद्यार्थी', 'यात्री', 'व्यापारी', 'सैनिक',
            'बुज़ुर्ग', 'खिलाड़ी', 'कारीगर', 'मछुआरे'),
    activity=('रोज़ काम करते', 'अक्सर बातें करते', 'मिलकर खाना बनाते', 'हर शाम खेलते',
              'ध्यान से पढ़ते', 'पुराने गीत गाते', 'नए पेड़ लगाते', 'सब्ज़ियाँ बेचते',
              'पानी भरते', 'कहानियाँ सुनाते', 'नाव चलाते', 'मेले की तैयारी करते'),
    tail=('क्योंकि मौसम बहुत खराब था', 'ताकि सब लोग समय पर पहुँच सकें',
          'और सबने उसकी बहुत तारीफ़ की', 'और फिर सब अपने घर लौट गए',
          'लेकिन किसी ने कुछ नहीं कहा', 'जिससे सबको बहुत खुशी हुई',
          'और यह खबर पूरे गाँव में फैल गई', 'क्योंकि सड़क बंद थी', 'जबकि बाकी लोग सो रहे थे',
          'और सभी ने तालियाँ बजाईं'),
    said=('का कहना है', 'ने बताया', 'ने लिखा', 'को लगता है', 'ने कहा', 'को याद है'),
    helpers=('लोग उनकी मदद करते हैं', 'परिवार वहीं रहते हैं', 'बच्चे रोज़ आते हैं',
             'दुकानें सुबह खुलती हैं', 'नावें किनारे पर बँधी हैं', 'गायें पास में चरती हैं'),
    title=('समाचार', 'कहानी', 'रिपोर्ट', 'डायरी', 'चिट्ठी', 'लेख', 'जानकारी'),
)

_FR = ("Le comité s'est réuni mardi pour discuter du budget des écoles de la région.",
       'Les parents ont demandé plus de professeurs et de meilleures cantines.',
       'La mairie a promis une réponse avant la fin du mois prochain.',
       'Le marché du samedi attire des visiteurs de toutes les villes voisines.',
       'Les agriculteurs vendent leurs légumes frais sur la place de l’église.',
       'Un nouveau pont sera construit au-dessus de la rivière cet été.',
       'La bibliothèque municipale ouvre désormais ses portes le dimanche matin.',
       'Les enfants du quartier ont planté des arbres dans le jardin public.')
_DE = ('Der Gemeinderat hat am Dienstag über den neuen Haushalt der Schulen beraten.',
       'Die Eltern wünschen sich mehr Lehrer und bessere Mahlzeiten für die Kinder.',
       'Der Bürgermeister versprach eine Antwort bis zum Ende des nächsten Monats.',
       'Am Samstag kommen Besucher aus allen Nachbarorten auf den Wochenmarkt.',
       'Die Bauern verkaufen ihr frisches Gemüse auf dem Platz vor der Kirche.',
       'Im Sommer wird eine neue Brücke über den Fluss gebaut.',
       'Die Stadtbibliothek ist jetzt auch am Sonntagmorgen geöffnet.',
       'Die Kinder aus der Nachbarschaft haben im Park Bäume gepflanzt.')
_FOOTER = {'en': 'Share this article with your friends and family. Follow us for more stories '
                 'like this one. All rights reserved by the publisher.',
           'hi': 'इस लेख को अपने दोस्तों और परिवार के साथ साझा करें। ऐसी और कहानियों के लिए हमें '
                 'फ़ॉलो करें। सभी अधिकार प्रकाशक के पास सुरक्षित हैं।'}
_NAMES = ('asha', 'ravi', 'priya', 'john', 'mary', 'amit', 'neha', 'david', 'sara', 'vikram',
          'info', 'contact', 'editor', 'support', 'office')
_DOMAINS = ('example.com', 'mail.example.org', 'news.example.in', 'example.net')

# Shares of the corpus's documents (the rest are good English and Hindi documents).
SHARES = dict(exact_copy=0.03, near_copy=0.12, rewrite=0.02, junk=0.09, other_language=0.03,
              empty=0.005)
NEAR_KINDS = ('edit1', 'edit3', 'insert', 'swap', 'footer')
JUNK_KINDS = ('nav', 'repeated', 'code', 'lorem', 'hashtags', 'bullets', 'one_line')
PII_SHARE = 0.12
# Templated pages, a family every TEMPLATED_EVERY documents from the TEMPLATED_FIRST-th on: a page
# of 350 words or more and (share of its words replaced, kind, how many) variants of it: a dozen
# similar to it and to each other but below the threshold (Jaccard ~0.75 and ~0.6), and one near
# duplicate (~0.96).
TEMPLATED_FIRST, TEMPLATED_EVERY = 40, 250
TEMPLATED = ((0.035, 'templated', 12), (0.004, 'templated_near', 1))


def _a(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _past(verb: str) -> str:
  if verb.endswith('e'):
    return verb + 'd'
  if verb.endswith('y') and verb[-2] not in 'aeiou':
    return verb[:-1] + 'ied'
  return verb + 'ed'


def _plural(noun: str) -> str:
  if noun.endswith('y') and noun[-2] not in 'aeiou':
    return noun[:-1] + 'ies'
  return noun + ('es' if noun.endswith(('ch', 'sh', 's', 'x')) else 's')


def _english_sentence(rng: random.Random) -> str:
  w = _EN

  def np(nouns='noun'):
    det, noun = rng.choice(w['det']), rng.choice(w[nouns] if nouns else w['agent'] + w['noun'])
    adj = rng.choice(w['adj']) if rng.random() < 0.6 else ''
    det = _a(adj or noun) if det == 'a' else det
    return ' '.join(x for x in (det, adj, noun) if x)

  pp = lambda: f'{rng.choice(w["prep"])} {rng.choice(w["place"])}'
  verb = lambda: _past(rng.choice(w['verb']))
  tail = lambda: f' {rng.choice(w["tail"])}' if rng.random() < 0.3 else ''
  who = lambda: np('agent')
  what = lambda: np('')
  form = rng.randrange(6)
  if form == 0:
    s = f'{rng.choice(w["time"])}, {who()} {verb()} {what()} {pp()}{tail()}.'
  elif form == 1:
    s = f'{who()} {verb()} {what()} {pp()} {rng.choice(w["time"])}{tail()}.'
  elif form == 2:
    s = f'{who()} {verb()} {what()}, and {who()} {verb()} {what()} {pp()}.'
  elif form == 3:
    s = f'{who()} {rng.choice(w["said"])} that {who()} had {verb()} {what()} {pp()}{tail()}.'
  elif form == 4:
    s = f'why did {who()} {rng.choice(w["verb"])} {what()} {pp()} {rng.choice(w["time"])}?'
  else:
    s = (f'{who()} {verb()} {rng.randint(2, 40)} {_plural(rng.choice(w["noun"]))} {pp()}, and '
         f'{who()} {verb()} them {rng.choice(w["time"])}.')
  return s[0].upper() + s[1:]


def _hindi_sentence(rng: random.Random) -> str:
  w = _HI
  subject = lambda: (f'{rng.choice(w["adj"])} ' if rng.random() < 0.5 else '') + rng.choice(
      w['subject'])
  tail = lambda: f' {rng.choice(w["tail"])}' if rng.random() < 0.3 else ''
  form = rng.randrange(4)
  if form == 0:
    return (f'{rng.choice(w["time"])} {subject()} ने {rng.choice(w["place"])} '
            f'{rng.choice(w["object"])} को {rng.choice(w["verb"])}{tail()}।')
  if form == 1:
    return (f'{subject()} ने {rng.choice(w["time"])} {rng.choice(w["object"])} को '
            f'{rng.choice(w["verb"])} और {rng.choice(w["place"])} {rng.choice(w["object"])} को '
            f'भी {rng.choice(w["verb"])}।')
  if form == 2:
    tense = rng.choice(('हैं', 'थे'))
    return (f'{rng.choice(w["time"])} {rng.choice(w["plural"])} {rng.choice(w["place"])} '
            f'{rng.choice(w["activity"])} {tense}{tail()}।')
  return (f'{subject()} {rng.choice(w["said"])} कि {rng.choice(w["plural"])} '
          f'{rng.choice(w["place"])} {rng.choice(w["activity"])} हैं और {rng.randint(2, 40)} '
          f'{rng.choice(w["helpers"])}।')


SENTENCE = {'en': _english_sentence, 'hi': _hindi_sentence}


def _paragraphs(rng: random.Random, language: str) -> list[list[str]]:
  """2 to 8 paragraphs of 3 to 7 sentences."""
  return [[SENTENCE[language](rng) for _ in range(rng.randint(3, 7))]
          for _ in range(rng.randint(2, 8))]


def _text(paragraphs: list[list[str]], title: str = '') -> str:
  body = '\n\n'.join(' '.join(p) for p in paragraphs)
  return f'{title}\n\n{body}' if title else body


def _title(rng: random.Random, language: str) -> str:
  if language == 'en':
    return (f'{rng.choice(_EN["adj"]).title()} {rng.choice(_EN["agent"] + _EN["noun"]).title()} '
            f'{rng.choice(_EN["title"])}')
  return f'{rng.choice(_HI["subject"])} {rng.choice(_HI["title"])}'


def _pii(rng: random.Random, language: str) -> tuple[str, list[tuple[str, str]]]:
  """A sentence holding an email and a phone number, or an IPv4 address, and [(kind, string)]
  of what it holds."""
  import ipaddress  # pylint: disable=g-import-not-at-top
  email = f'{rng.choice(_NAMES)}.{rng.randint(1, 999)}@{rng.choice(_DOMAINS)}'
  phone = rng.choice((f'+91 {rng.randint(60000, 99999)} {rng.randint(10000, 99999)}',
                      f'({rng.randint(200, 999)}) {rng.randint(200, 999)}-'
                      f'{rng.randint(1000, 9999)}'))
  while True:
    ip = f'{rng.choice((23, 34, 52, 64, 81, 104, 142, 151, 185))}.{rng.randint(0, 255)}.' \
         f'{rng.randint(0, 255)}.{rng.randint(1, 254)}'
    if ipaddress.ip_address(ip).is_global:
      break
  if rng.random() < 0.3:
    if language == 'en':
      return f'The server at {ip} was moved to a new building last night.', [('ips', ip)]
    return f'पुराना सर्वर {ip} अब नए भवन में चला गया है।', [('ips', ip)]
  if language == 'en':
    return (f'For more details, write to {email} or call {phone} after ten in the morning.',
            [('emails', email), ('phones', phone)])
  return (f'अधिक जानकारी के लिए {email} पर लिखें या {phone} पर फ़ोन करें।',
          [('emails', email), ('phones', phone)])


def _replace_words(rng: random.Random, text: str, share: float, language: str) -> str:
  """`text` with `share` of its words (at least one) replaced by words of the same grammar."""
  lines = [line.split(' ') for line in text.split('\n')]
  places = [(i, j) for i, line in enumerate(lines) for j, word in enumerate(line) if word]
  pool = (_EN['noun'] + _EN['adj']) if language == 'en' else (_HI['subject'] + _HI['adj'])
  for i, j in rng.sample(places, max(1, round(share * len(places)))):
    end = lines[i][j][-1] if lines[i][j][-1] in '.,?!।' else ''
    lines[i][j] = rng.choice(pool) + end
  return '\n'.join(' '.join(line) for line in lines)


def _junk(rng: random.Random, kind: str, language: str) -> str:
  sentence = SENTENCE[language]
  if kind == 'nav':
    items = ['Home', 'About us', 'Contact', 'Login | Register', 'Privacy', 'Careers', 'Blog',
             'Shop', 'Help', 'FAQ', 'Sitemap']
    rng.shuffle(items)
    return '\n'.join(items[:rng.randint(5, 11)] + [f'Copyright {rng.randint(2005, 2025)}'])
  if kind == 'repeated':
    line = sentence(rng)
    return '\n'.join([line] * rng.randint(8, 20) + [sentence(rng) for _ in range(3)])
  if kind == 'code':
    name = rng.choice(_EN['noun'])
    return (f'<script type="text/javascript">\nfunction show_{name}(x) {{\n  var n = x * '
            f'{rng.randint(2, 99)};\n  document.getElementById("{name}").innerHTML = n;\n}}\n'
            '</script>\nPlease enable JavaScript to view this page.')
  if kind == 'lorem':
    return _text(_paragraphs(rng, language)[:3]) + (
        '\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.')
  if kind == 'hashtags':
    tags = [f'#{rng.choice(_EN["adj"])}{rng.choice(_EN["noun"])}' for _ in range(60)]
    return sentence(rng) + ' ' + ' '.join(tags)
  if kind == 'bullets':
    return '\n'.join(f'• {sentence(rng)}' for _ in range(rng.randint(10, 20)))
  return sentence(rng)  # one_line: a page of one sentence.


def build_corpus(megabytes: float, seed: int) -> tuple[list[dict], dict]:
  """(records {id, text}, truth): a shuffled corpus of about `megabytes` MB of JSON lines, and
  what was planted: truth['kind'][id], truth['family'][id] (the base a copy or rewrite was made
  from), truth['pii'] (PII strings per kind, over all documents), truth['pii_of'][id] (those of
  one document), truth['counts'] (documents per kind)."""
  rng = random.Random(seed)
  target = megabytes * 1e6
  records, kind, family, planted = [], {}, {}, {}  # planted: base id -> [(PII kind, string)].
  good, size = [], 0  # good: (id, language, paragraphs, title) of the base documents.

  def add(doc_id: str, text: str, what: str, base: str = ''):
    nonlocal size
    records.append(dict(id=doc_id, text=text))
    kind[doc_id] = what
    if base:
      family[doc_id] = base
    size += len(json.dumps(records[-1], ensure_ascii=False).encode('utf-8')) + 1

  share, used, templated = SHARES, {}, TEMPLATED_FIRST
  while size < target:
    r, n = rng.random(), len(records)
    if n >= templated:
      templated += TEMPLATED_EVERY
      language = rng.choice(('en', 'hi'))
      paragraphs = []
      while sum(len(' '.join(p).split()) for p in paragraphs) < 350:
        paragraphs += _paragraphs(rng, language)
      base = f'{language}-{n}'
      add(base, _text(paragraphs), language)
      good.append((base, language, paragraphs, ''))
      for share_changed, what, count in TEMPLATED:
        for _ in range(count):
          add(f'{base}-{what}{len(records)}', _replace_words(
              rng, _text(paragraphs), share_changed, language), what, base)
      continue
    if r < share['exact_copy'] and good:
      base, language, paragraphs, title = rng.choice(good)
      text = _text(paragraphs, title).lower().replace('. ', '.  ').replace('\n\n', ' \n\n')
      add(f'{base}-copy{n}', text, 'exact_copy', base)
      continue
    r -= share['exact_copy']
    if r < share['near_copy'] and good:
      base, language, paragraphs, title = rng.choice(good)
      kinds = [k for k in NEAR_KINDS if k not in used.setdefault(base, set())]
      for near in rng.sample(kinds, min(len(kinds), rng.choice((2, 3)) if rng.random() < 0.1
                                        else 1)):
        used[base].add(near)  # Two footers of one base would be exact copies.
        ps = [list(p) for p in paragraphs]
        if near == 'insert':
          p = rng.randrange(len(ps))
          ps[p].insert(rng.randint(0, len(ps[p])), SENTENCE[language](rng))
        elif near == 'swap':
          flat = [(i, j) for i, p in enumerate(ps) for j in range(len(p))]
          (a, b), (c, d) = rng.sample(flat, 2)
          ps[a][b], ps[c][d] = ps[c][d], ps[a][b]
        elif near == 'footer':
          ps.append([_FOOTER[language]])
        text = _text(ps, title)
        if near.startswith('edit'):
          text = _replace_words(rng, text, int(near[-1]) / 100, language)
        add(f'{base}-{near}{len(records)}', text, f'near_{near}', base)
      continue
    r -= share['near_copy']
    if r < share['rewrite'] and good:
      base, language, paragraphs, title = rng.choice(good)
      add(f'{base}-rewrite{n}', _replace_words(rng, _text(paragraphs, title), 0.3, language),
          'rewrite', base)
      continue
    r -= share['rewrite']
    language = 'en' if rng.random() < 0.55 else 'hi'
    if r < share['junk']:
      junk = rng.choice(JUNK_KINDS)
      add(f'junk-{junk}-{n}', _junk(rng, junk, language), f'junk_{junk}')
      continue
    r -= share['junk']
    if r < share['other_language']:
      pool, code = (_FR, 'fr') if rng.random() < 0.5 else (_DE, 'de')
      sentences = rng.sample(pool, rng.randint(4, len(pool)))
      add(f'{code}-{n}', ' '.join(sentences), 'other_language')
      continue
    r -= share['other_language']
    if r < share['empty']:
      add(f'empty-{n}', rng.choice(('', ' ', '\n\n', ' \t ')), 'empty')
      continue
    paragraphs = _paragraphs(rng, language)
    doc_id = f'{language}-{n}'
    if rng.random() < PII_SHARE:
      sentence, planted[doc_id] = _pii(rng, language)
      paragraphs[-1].append(sentence)
    title = _title(rng, language) if rng.random() < 0.5 else ''
    add(doc_id, _text(paragraphs, title), language)
    good.append((doc_id, language, paragraphs, title))
  order = list(range(len(records)))
  rng.shuffle(order)
  records = [records[i] for i in order]
  counts, pii, pii_of = {}, dict(emails=0, phones=0, ips=0), {}
  for record in records:
    counts[kind[record['id']]] = counts.get(kind[record['id']], 0) + 1
    # Copies carry their base's PII, unless an edit replaced it.
    for what, string in planted.get(family.get(record['id'], record['id']), ()):
      found = record['text'].count(string)
      pii[what] += found
      if found:
        pii_of.setdefault(record['id'], {})[what] = found
  return records, dict(kind=kind, family=family, pii=pii, pii_of=pii_of,
                       counts=dict(sorted(counts.items())))


def write_jsonl(records: list[dict], path: str) -> int:
  """Writes {id, text} lines; returns the file's bytes."""
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + '\n')
  return os.path.getsize(path)


# ---------------------------------------------------------------------------------------------
# 1 and 3. lm.prepare as a command, timed, with its memory.


def _tree_sample(root: int) -> tuple[int, int, dict[int, float]]:
  """(sum, largest) of the resident bytes of `root` and its descendants, from /proc (shared pages
  count in every process that maps them), and each one's CPU seconds so far."""
  children, stats = {}, {}
  for name in os.listdir('/proc'):
    if name.isdigit():
      try:
        with open(f'/proc/{name}/stat', encoding='utf-8') as f:
          fields = f.read().rsplit(')', 1)[1].split()
      except (OSError, IndexError):
        continue
      stats[int(name)] = fields
      children.setdefault(int(fields[1]), []).append(int(name))
  page, tick = os.sysconf('SC_PAGE_SIZE'), os.sysconf('SC_CLK_TCK')
  total, largest, cpu, stack = 0, 0, {}, [root]
  while stack:
    pid = stack.pop()
    if pid in stats:  # stat's fields 14, 15 (utime, stime) and 24 (rss); fields[0] is its 3rd.
      fields = stats[pid]
      rss = int(fields[21]) * page
      total, largest = total + rss, max(largest, rss)
      cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    stack += children.get(pid, [])
  return total, largest, cpu


def run_prepare(corpus: str, workdir: str, workers: int, overrides: list[str]) -> dict:
  """`python -m lm.prepare` on `corpus` into `workdir`, in a fresh process: its wall time, peak
  memory (os.wait4's ru_maxrss, and the process tree's sampled every 0.1 s), the CPU share other
  processes took meanwhile, and its report.json."""
  command = [sys.executable, '-m', 'lm.prepare', '--config',
             os.path.join(_ROOT, 'configs', 'prepare', 'default.py'), '--workdir', workdir,
             f'--config.source=jsonl:{corpus}', f'--config.workers={workers}', *overrides]
  log = workdir + '.log'
  peak, cpu, done = [0, 0], {}, threading.Event()
  busy, own, start = _machine_busy_s(), time.process_time(), time.perf_counter()
  with open(log, 'w', encoding='utf-8') as out:
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=_ROOT)

    def sample():
      while not done.is_set():
        total, largest, seconds = _tree_sample(process.pid)
        peak[0], peak[1] = max(peak[0], total), max(peak[1], largest)
        cpu.update(seconds)
        done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
  # The tree's CPU time: the command's own (exact) and its other processes' last samples; and
  # this process's, sampling.
  cpu[process.pid] = usage.ru_utime + usage.ru_stime
  sampling = time.process_time() - own
  others = _machine_busy_s() - busy - sum(cpu.values()) - sampling
  if process.returncode:
    with open(log, encoding='utf-8') as f:
      raise SystemExit(f'lm.prepare failed (exit {process.returncode}): {" ".join(command)}\n'
                       + f.read()[-3000:])
  with open(os.path.join(workdir, 'report.json'), encoding='utf-8') as f:
    report = json.load(f)
  decisions = os.path.getsize(os.path.join(workdir, 'decisions.jsonl'))
  n, mb = report['documents_in'], report['bytes_in'] / 1e6
  passes = report['wall_seconds']
  return {
      'workers': workers, 'wall_s': wall, 'cpu_s': sum(cpu.values()), 'sampling_cpu_s': sampling,
      'documents_in': n, 'documents_out': report['documents_out'], 'mb_in': mb,
      'tokens_out': report.get('tokens_out', 0),
      'documents_per_s': n / wall, 'mb_per_s': mb / wall,
      'passes_s': passes, 'passes_total_s': sum(passes.values()),
      'stages': [{key: s[key] for key in ('name', 'documents_in', 'documents_out', 'bytes_in',
                                          'seconds', 'documents_per_second', 'mb_per_second')}
                 | {'removed': {rule: r['documents'] for rule, r in s['removed'].items()}}
                 for s in report['stages']],
      'counters': {s['name']: s['counters'] for s in report['stages'] if s['counters']},
      'dedup': report.get('dedup', {}), 'decisions': report['decisions'],
      'decisions_bytes': decisions,
      'decisions_bytes_per_million_documents': decisions / n * 1e6,
      'peak_rss_mb': {'wait4': usage.ru_maxrss / 1024, 'tree_sampled': peak[0] / 2**20,
                      'largest_process_sampled': peak[1] / 2**20},
      'others_cpu_share': max(others, 0.0) / (wall * os.cpu_count()),
  }


# Passes run as one task whatever config.workers is (lm/prepare/pipeline.py).
SINGLE_TASK_PASSES = ('clusters', 'tokenizer')


def removals_by_kind(workdir: str, truth: dict) -> dict:
  """{planted kind: {'kept' or 'STAGE: RULE': documents}} from decisions.jsonl."""
  table = {}
  with open(os.path.join(workdir, 'decisions.jsonl'), encoding='utf-8') as f:
    for d in map(json.loads, f):
      outcome = 'kept' if d['kept'] else f'{d["stage"]}: {d["reason"].split(": ")[0]}'
      row = table.setdefault(truth['kind'][d['id']], {})
      row[outcome] = row.get(outcome, 0) + 1
  return dict(sorted(table.items()))


def end_to_end(corpus: str, directory: str, truth: dict, args) -> dict:
  overrides = [f'--config.tokenize.vocab_size={args.vocab_size}']
  runs = {}
  for workers in args.worker_counts:
    runs[str(workers)] = run_prepare(corpus, os.path.join(directory, f'workers{workers}'),
                                     workers, overrides)
  first = str(args.worker_counts[0])
  base = runs[first]
  parallel = lambda r: sum(s for name, s in r['passes_s'].items()
                           if name not in SINGLE_TASK_PASSES)
  for r in runs.values():
    r['speedup'] = base['wall_s'] / r['wall_s']
    r['speedup_passes'] = base['passes_total_s'] / r['passes_total_s']
    r['speedup_parallel_passes'] = parallel(base) / parallel(r)
  outputs = {}
  for workers in runs:
    with open(os.path.join(directory, f'workers{workers}', 'decisions.jsonl'), 'rb') as f:
      outputs[workers] = f.read()
  removed = {s['name']: s['removed'] for s in base['stages']}
  with open(os.path.join(directory, f'workers{first}', 'decisions.jsonl'), encoding='utf-8') as f:
    decisions = {d['id']: d for d in map(json.loads, f)}
  # Which documents reached the PII and dedup stages (none of the earlier ones removed them).
  names = [s['name'] for s in base['stages']]
  before_pii = set(names[:names.index('pii')]) if 'pii' in names else set(names)
  before_exact = before_pii | {'pii'}
  reached = lambda doc, before: decisions[doc]['stage'] not in before
  copies = [doc for doc, what in truth['kind'].items() if what == 'exact_copy']
  return {
      'runs': runs, 'baseline_workers': int(first),
      # Byte for byte, and up to the neighbour a near duplicate's reason names (module docstring).
      'same_decisions': len(set(outputs.values())) == 1,
      'same_removals': len({_removals(o) for o in outputs.values()}) == 1,
      'planted': truth['counts'],
      'outcomes_by_planted_kind': removals_by_kind(os.path.join(directory, f'workers{first}'),
                                                   truth),
      'pii': {'planted': truth['pii'],
              'planted_reaching_pii': {k: sum(found.get(k, 0) for doc, found in
                                              truth['pii_of'].items() if reached(doc, before_pii))
                                       for k in truth['pii']},
              'found': {k: base['counters'].get('pii', {}).get(k, 0) for k in truth['pii']}},
      'exact_copies': {
          'planted': len(copies),
          'reaching_dedup': sum(reached(doc, before_exact)
                                and reached(truth['family'][doc], before_exact) for doc in copies),
          'removed': removed.get('exact_dedup', {}).get('exact_duplicate', 0)},
  }


def _removals(decisions: bytes) -> tuple:
  """decisions.jsonl without the part of a near duplicate's reason after its keeper."""
  return tuple((d['id'], d['kept'], d['stage'], (d['reason'] or '').split(' (group of')[0])
               for d in map(json.loads, decisions.decode('utf-8').splitlines()))


# ---------------------------------------------------------------------------------------------
# 2. Near dedup: lm.prepare's MinHash (datatrove) against datasketch's.


def _groups(removed_of: dict[str, str]) -> dict[str, str]:
  """{document: its group's keeper} from {removed document: the keeper it names}."""
  keeper = {}
  for doc in removed_of:
    root = doc
    while root in removed_of:
      root = removed_of[root]
    keeper[doc] = root
  return keeper


def _score(removed_of: dict[str, str], families: list[list[str]], similar, jaccard,
           threshold: float) -> dict:
  """Recall of the planted similar pairs, precision of the removals (module docstring)."""
  keeper = _groups(removed_of)
  group = lambda doc: keeper.get(doc, doc)
  pairs = [(a, b) for family in families for i, a in enumerate(family) for b in family[i + 1:]]
  found = [p for p in pairs if similar[p] and group(p[0]) == group(p[1])]
  merged_below = [p for p in pairs if not similar[p] and group(p[0]) == group(p[1])
                  and jaccard(*p) < threshold]
  members = {}
  for doc, root in keeper.items():
    members.setdefault(root, [root]).append(doc)
  right = sum(any(jaccard(doc, other) >= threshold for other in members[keeper[doc]]
                  if other != doc) for doc in removed_of)
  n_similar = sum(similar[p] for p in pairs)
  return {'removed': len(removed_of), 'groups': len(members),
          'recall': len(found) / n_similar if n_similar else None,
          'precision': right / len(removed_of) if removed_of else None,
          'planted_pairs_below_threshold_in_one_group': len(merged_below)}


def _lm_prepare_near(corpus: str, workdir: str, cfg) -> tuple[dict, dict]:
  """lm.prepare with every stage but near dedup off, one worker, in this process (its logs to
  WORKDIR.log)."""
  # pylint: disable-next=g-import-not-at-top
  from datatrove.utils import logging as datatrove_logging
  from lm.prepare import config as config_lib, pipeline
  config = config_lib.base_config()
  config.source = f'jsonl:{corpus}'
  config.language.enabled = config.pii.enabled = config.tokenize.enabled = False
  config.quality.gopher.enabled = config.quality.repetition.enabled = False
  config.dedup.update(cfg)
  config.quality.c4.enabled = config.dedup.exact = False
  with open(workdir + '.log', 'w', encoding='utf-8') as log:
    try:
      with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        datatrove_logging.setup_default_logger()  # Its sink is the sys.stderr of when it is set.
        report = pipeline.prepare(config, workdir)
    finally:
      datatrove_logging.setup_default_logger()
  removed_of = {}
  with open(os.path.join(workdir, 'decisions.jsonl'), encoding='utf-8') as f:
    for d in map(json.loads, f):
      if d['stage'] == 'near_dedup':
        removed_of[d['id']] = d['reason'].split(': of ', 1)[1].split(' ', 1)[0]
  seconds = {name: report['wall_seconds'][name] for name in ('signatures', 'buckets', 'clusters')}
  return report, {'seconds': seconds, 'removed_of': removed_of,
                  'candidate_pairs': report['dedup']['candidate_pairs'],
                  'confirmed_pairs': report['dedup']['confirmed_pairs']}


def _datasketch_near(records: list[dict], cfg, shingle_strings) -> dict:
  """datasketch's MinHash and MinHashLSH over the same shingles, then lm.prepare's confirmation
  (exact Jaccard >= threshold) and grouping (the earliest document of a group kept)."""
  from datasketch import MinHash, MinHashLSH  # pylint: disable=g-import-not-at-top
  permutations = cfg['bands'] * cfg['rows']
  seconds = dict(minhash=0.0, lsh_insert=0.0, query=0.0, confirm=0.0)
  lsh = MinHashLSH(threshold=cfg['threshold'], num_perm=permutations,
                   params=(cfg['bands'], cfg['rows']))
  signatures, shingles = {}, {}
  template = MinHash(num_perm=permutations, seed=cfg['seed'], scheme='affine64')
  for record in records:
    start = time.perf_counter()
    strings = shingle_strings(record['text'])
    if not strings:
      continue
    m = MinHash(num_perm=permutations, seed=cfg['seed'], scheme='affine64',
                permutations=template.permutations)
    m.update_batch([s.encode('utf-8') for s in strings])
    middle = time.perf_counter()
    lsh.insert(record['id'], m)
    seconds['minhash'] += middle - start
    seconds['lsh_insert'] += time.perf_counter() - middle
    signatures[record['id']], shingles[record['id']] = m, strings
  start = time.perf_counter()
  candidates = set()
  for doc, m in signatures.items():
    for other in lsh.query(m):
      if other != doc:
        candidates.add((min(doc, other), max(doc, other)))
  seconds['query'] = time.perf_counter() - start

  start = time.perf_counter()
  sets = {doc: set(s) for doc, s in shingles.items()}
  edges = [(a, b) for a, b in sorted(candidates)
           if len(sets[a] & sets[b]) / len(sets[a] | sets[b]) >= cfg['threshold']]
  position = {record['id']: i for i, record in enumerate(records)}
  parent = {}

  def root(x):
    while parent.get(x, x) != x:
      x = parent[x]
    return x

  for a, b in edges:
    ra, rb = sorted((root(a), root(b)), key=position.get)
    if ra != rb:
      parent[rb] = ra
  removed_of = {doc: root(doc) for doc in parent if root(doc) != doc}
  seconds['confirm'] = time.perf_counter() - start
  return {'seconds': seconds, 'removed_of': removed_of, 'candidate_pairs': len(candidates),
          'confirmed_pairs': len(edges), 'documents_signed': len(signatures)}


def near_dedup(records: list[dict], corpus: str, directory: str, truth: dict, args) -> dict:
  # pylint: disable-next=g-import-not-at-top
  from datatrove.utils import text as datatrove_text
  from lm.prepare import config as config_lib, dedup
  cfg = config_lib.base_config().dedup.to_dict()
  threshold = cfg['threshold']
  report, lm_side = _lm_prepare_near(corpus, os.path.join(directory, 'near_dedup'), cfg)
  signature = dedup.minhash_signature(config_lib.base_config().dedup, directory)

  def shingle_strings(text: str) -> list[str]:
    """What datatrove's get_shingles hashes: word n-grams of the simplified text."""
    words = signature.word_tokenizer.word_tokenize(
        datatrove_text.simplify_text(text, signature.config.norm_config))
    n = cfg['ngram_size']
    return [' '.join(words[i:i + n]) for i in range(len(words) - n + 1)]

  sides = {'lm_prepare': lm_side}
  if not args.skip_datasketch:
    sides['datasketch'] = _datasketch_near(records, cfg, shingle_strings)

  text = {r['id']: r['text'] for r in records}
  cache = {}

  def shingles(doc):
    if doc not in cache:
      cache[doc] = set(signature.get_shingles(text[doc]).ravel().tolist())
    return cache[doc]

  def jaccard(a, b):
    union = len(shingles(a) | shingles(b))
    return len(shingles(a) & shingles(b)) / union if union else 0.0

  members = {}
  for doc, base in truth['family'].items():
    members.setdefault(base, [base]).append(doc)
  families = [sorted(f) for f in members.values()]
  similar = {}
  for family in families:
    for i, a in enumerate(family):
      for b in family[i + 1:]:
        similar[a, b] = jaccard(a, b) >= threshold
  by_kind = {}
  for doc, base in truth['family'].items():
    by_kind.setdefault(truth['kind'][doc], []).append(jaccard(doc, base))
  documents = sum(bool(r['text'].strip()) for r in records)
  out = {'settings': {**{k: cfg[k] for k in ('ngram_size', 'bands', 'rows', 'threshold', 'seed')},
                      'permutations': cfg['bands'] * cfg['rows']},
         'documents': documents,
         'planted': {'families': len(families), 'pairs': len(similar),
                     'pairs_similar': sum(similar.values()),
                     'median_jaccard_to_base': {
                         kind: sorted(js)[len(js) // 2] for kind, js in sorted(by_kind.items())}}}
  for name, side in sides.items():
    total = sum(side['seconds'].values())
    confirm = side['seconds']['clusters' if name == 'lm_prepare' else 'confirm']
    out[name] = {
        'seconds': side['seconds'], 'total_s': total,
        'documents_per_s': documents / total,
        'documents_per_s_before_confirmation': documents / (total - confirm),
        'candidate_pairs': side['candidate_pairs'], 'confirmed_pairs': side['confirmed_pairs'],
        'candidate_precision': (side['confirmed_pairs'] / side['candidate_pairs']
                                if side['candidate_pairs'] else None),
        **_score(side['removed_of'], families, similar, jaccard, threshold)}
  if 'datasketch' in out:
    lm_side, ds = out['lm_prepare'], out['datasketch']
    out['speed_ratio'] = lm_side['documents_per_s'] / ds['documents_per_s']
    out['speed_ratio_before_confirmation'] = (lm_side['documents_per_s_before_confirmation']
                                              / ds['documents_per_s_before_confirmation'])
    a, b = set(sides['lm_prepare']['removed_of']), set(sides['datasketch']['removed_of'])
    out['same_removals'] = len(a & b) / len(a | b) if a | b else 1.0
    out['removed_by_one_side_only'] = {'lm_prepare': sorted(a - b)[:20],
                                       'datasketch': sorted(b - a)[:20]}
  out['lm_prepare']['passes_s'] = report['wall_seconds']
  return out


# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
  """/proc/cpuinfo's model name (lm.flops has the same, but importing it starts JAX)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _versions() -> dict:
  versions = {}
  for name in ('datatrove', 'py3langid', 'datasketch', 'sentencepiece', 'numpy'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def _print(report: dict) -> None:
  corpus, e2e = report['corpus'], report['end_to_end']
  print(f'\ncorpus: {corpus["documents"]:,} documents, {corpus["mb"]:.1f} MB of JSON lines '
        f'(seed {corpus["seed"]}); {report["machine"]["cores_available"]} cores')
  header = (f'{"workers":>7} {"wall s":>7} {"docs/s":>7} {"MB/s":>6} {"speedup":>7} '
            f'{"passes s":>8} {"kept":>7} {"peak RSS MB (tree/wait4)":>25} {"others":>6}')
  print(header + '\n' + '-' * len(header))
  for r in e2e['runs'].values():
    rss = r['peak_rss_mb']
    print(f'{r["workers"]:>7} {r["wall_s"]:>7.1f} {r["documents_per_s"]:>7.0f} '
          f'{r["mb_per_s"]:>6.2f} {r["speedup"]:>7.2f} {r["passes_total_s"]:>8.1f} '
          f'{r["documents_out"]:>7,} {rss["tree_sampled"]:>15.0f} / {rss["wait4"]:>7.0f} '
          f'{r["others_cpu_share"]:>6.0%}')
  for r in e2e['runs'].values():
    print(f'passes, {r["workers"]} worker(s): ' + ', '.join(
        f'{name} {s:.1f}' for name, s in r['passes_s'].items()) + ' s')
  base = e2e['runs'][str(e2e['baseline_workers'])]
  print(f'\nstages ({base["workers"]} worker): seconds deciding, documents/s and MB/s per worker')
  for s in base['stages']:
    rate = (f'{s["documents_per_second"]:>9,.0f} {s["mb_per_second"]:>7.2f}'
            if s['seconds'] else f'{"":>9} {"":>7}')
    removed = ', '.join(f'{rule} {n}' for rule, n in s['removed'].items())
    print(f'  {s["name"]:<18} {s["documents_in"]:>7,} -> {s["documents_out"]:>7,} '
          f'{s["seconds"]:>7.2f} s {rate}  {removed}')
  copies, pii = e2e['exact_copies'], e2e['pii']
  print(f'same decisions with every worker count: {e2e["same_decisions"]} (removals: '
        f'{e2e["same_removals"]}); exact copies planted {copies["planted"]} (both it and its base '
        f'past the filters: {copies["reaching_dedup"]}), removed {copies["removed"]}; PII in '
        f'documents past the filters {pii["planted_reaching_pii"]}, found {pii["found"]}')
  print(f'decisions.jsonl: {base["decisions_bytes"] / 1e6:.2f} MB, '
        f'{base["decisions_bytes_per_million_documents"] / 1e6:.0f} MB per million input '
        'documents (extrapolated)')

  near = report['near_dedup']
  s = near['settings']
  print(f'\nnear dedup, {near["documents"]:,} documents, {s["ngram_size"]}-grams, '
        f'{s["bands"]} bands x {s["rows"]} rows, threshold {s["threshold"]}; planted: '
        f'{near["planted"]["pairs"]} '
        f'pairs in {near["planted"]["families"]} families, {near["planted"]["pairs_similar"]} '
        'of them similar')
  header = (f'{"side":<11} {"docs/s":>7} {"(no conf.)":>10} {"candidates":>10} {"confirmed":>9} '
            f'{"cand. prec.":>11} {"removed":>7} {"recall":>6} {"precision":>9}')
  print(header + '\n' + '-' * len(header))
  for name in ('lm_prepare', 'datasketch'):
    if name in near:
      r = near[name]
      print(f'{name:<11} {r["documents_per_s"]:>7,.0f} '
            f'{r["documents_per_s_before_confirmation"]:>10,.0f} {r["candidate_pairs"]:>10,} '
            f'{r["confirmed_pairs"]:>9,} '
            f'{r["candidate_precision"] or 0:>11.3f} {r["removed"]:>7,} {r["recall"] or 0:>6.3f} '
            f'{r["precision"] or 0:>9.3f}')
      print(f'{"":<11} seconds: ' + ', '.join(f'{k} {v:.2f}' for k, v in r['seconds'].items()))
  if 'speed_ratio' in near:
    print(f'lm.prepare / datasketch documents/s: {near["speed_ratio"]:.2f} (before confirmation '
          f'{near["speed_ratio_before_confirmation"]:.2f}); removals in common (Jaccard of the '
          f'sets): {near["same_removals"]:.3f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mb', type=float, default=64, help='corpus size in MB of JSON lines')
  parser.add_argument('--seed', type=int, default=0, help='of the corpus')
  parser.add_argument('--workers', default='1,2',
                      help='comma-separated config.workers values, each a run; the first is the '
                      'baseline of the speedups')
  parser.add_argument('--vocab_size', type=int, default=2048,
                      help='config.tokenize.vocab_size of the tokenizer trained on the kept text '
                      "(the grammars' few hundred words give BPE about 4,000 pieces at most)")
  parser.add_argument('--skip_datasketch', action='store_true',
                      help='time only lm.prepare in the near-dedup section')
  parser.add_argument('--keep', default='', help='write the corpus and workdirs here and keep '
                      'them (default: a temporary folder, removed)')
  parser.add_argument('--smoke', action='store_true', help=f'tiny sizes that finish in seconds: '
                      f'{SMOKE}')
  parser.add_argument('--out', default=os.path.join(_ROOT, 'bench', 'results', 'prepare.json'))
  args = parser.parse_args()
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
  try:
    args.worker_counts = [int(w) for w in args.workers.split(',') if w]
  except ValueError:
    args.worker_counts = []
  if not args.worker_counts or min(args.worker_counts) < 1:
    parser.error(f'--workers={args.workers!r}: expected comma-separated counts of at least 1')
  if args.mb <= 0:
    parser.error(f'--mb={args.mb}: expected a positive size')
  if not args.skip_datasketch and importlib.util.find_spec('datasketch') is None:
    parser.error("the near-dedup baseline needs datasketch: pip install -e '.[bench]' (or "
                 '--skip_datasketch)')
  start = time.perf_counter()
  directory = args.keep or tempfile.mkdtemp(prefix='bench_prepare_')
  os.makedirs(directory, exist_ok=True)
  report = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': {'cpu': _cpu_model(), 'cores': os.cpu_count(),
                  'cores_available': len(os.sched_getaffinity(0)),
                  'platform': platform.platform(), 'load_avg_at_start': os.getloadavg()},
      'versions': _versions(), 'settings': vars(args),
  }
  try:
    generate = time.perf_counter()
    records, truth = build_corpus(args.mb, args.seed)
    corpus = os.path.join(directory, 'corpus.jsonl')
    size = write_jsonl(records, corpus)
    report['corpus'] = {'documents': len(records), 'mb': size / 1e6, 'seed': args.seed,
                        'planted': truth['counts'], 'pii': truth['pii'],
                        'build_s': time.perf_counter() - generate}
    report['end_to_end'] = end_to_end(corpus, directory, truth, args)
    report['near_dedup'] = near_dedup(records, corpus, directory, truth, args)
  finally:
    if not args.keep:
      shutil.rmtree(directory, ignore_errors=True)
  report['bench_rusage_mb'] = {
      'self': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      'children': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
  _print(report)
  tt.finish_report(report, args.out, start)


if __name__ == '__main__':
  main()
