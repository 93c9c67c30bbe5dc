"""Real public English and Hindi text for the notebooks: a local copy, else a download, else a
stand-in, so the same cells run on a laptop, on a cluster and offline under CI.

English is Tiny Shakespeare; Hindi is Premchand's stories from LTRC, IIIT Hyderabad (via
cltk/hindi_text_ltrc). A local copy is $LM_ENGLISH_TEXT / $LM_HINDI_TEXT or the data folder
$LM_DATA_DIR; offline, the Python standard library's source stands in for English and a short
built-in passage for Hindi.
"""

import os
import urllib.request

DATA_DIR = os.environ.get('LM_DATA_DIR', '/work/shared/data')
_LTRC = ('https://raw.githubusercontent.com/cltk/hindi_text_ltrc/'
         'be8d66f27b6a4efe9202916c05e0b725e694021c')
URLS = {
    'english': ['https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/'
                'input.txt'],
    'hindi': [f'{_LTRC}/premchand/kahAnI/{part}'
              for part in ('MS1/full.u', 'MS2/main.u', 'MS3/main.u')],
}
_LOCAL_NAMES = {'english': 'english/tinyshakespeare.txt', 'hindi': 'hindi/ltrc_classical_hindi.txt'}
HINDI_SAMPLE = '''भारत एक विशाल देश है और यहाँ अनेक भाषाएँ बोली जाती हैं।
हिंदी भारत में सबसे अधिक लोगों द्वारा बोली जाने वाली भाषा है।
गाँव के लोग सुबह जल्दी उठते हैं और खेतों में काम करने जाते हैं।
बच्चे विद्यालय में पढ़ते हैं, खेलते हैं और नई बातें सीखते हैं।
नदी के किनारे एक पुराना मंदिर है जहाँ हर साल मेला लगता है।
बरसात के मौसम में आकाश में काले बादल छा जाते हैं और ठंडी हवा चलती है।
मेरी माँ रसोई में स्वादिष्ट भोजन बनाती हैं और पिताजी बाज़ार से सब्ज़ियाँ लाते हैं।
पुस्तकें हमारी सबसे अच्छी मित्र होती हैं, वे हमें ज्ञान और आनंद देती हैं।
दिल्ली भारत की राजधानी है और यह एक ऐतिहासिक नगर है।
किसान देश का अन्नदाता है, उसकी मेहनत से हमें अनाज मिलता है।
सूरज पूरब में उगता है और पश्चिम में डूबता है।
हमें अपने बड़ों का आदर करना चाहिए और छोटों से प्रेम करना चाहिए।
'''


def real_text(language: str, download: bool = True) -> str | None:
  """Text from $LM_<LANGUAGE>_TEXT, the data folder, or (if `download`) the web; None if none."""
  path = (os.environ.get(f'LM_{language.upper()}_TEXT')
          or os.path.join(DATA_DIR, _LOCAL_NAMES[language]))
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      return f.read()
  if not download:
    return None
  try:
    return '\n'.join(urllib.request.urlopen(url, timeout=60).read().decode('utf-8')
                     for url in URLS[language])
  except OSError as e:
    print(f'could not download the {language} text ({e}); using the built-in stand-in')
    return None


def text_or_stand_in(language: str, download: bool = True) -> str:
  """real_text, or the stand-in: the standard library's source (English), HINDI_SAMPLE x 40."""
  text = real_text(language, download)
  if text:
    return text
  if language == 'hindi':
    return HINDI_SAMPLE * 40
  from lm import sources  # pylint: disable=g-import-not-at-top
  return ''.join(sources.iter_documents('stdlib', max_chars=1_000_000))


def write_split(directory: str, language: str, text: str, max_chars: int) -> tuple[str, str]:
  """Writes DIRECTORY/LANGUAGE.txt (training) and LANGUAGE_test.txt (the last tenth of the lines
  of text[:max_chars]); returns their paths."""
  lines = text[:max_chars].splitlines()
  cut = len(lines) * 9 // 10
  paths = tuple(os.path.join(directory, f'{language}{suffix}.txt') for suffix in ('', '_test'))
  for path, part in zip(paths, (lines[:cut], lines[cut:])):
    with open(path, 'w', encoding='utf-8') as f:
      f.write('\n'.join(part) + '\n')
  return paths
