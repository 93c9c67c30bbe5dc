"""Every notebook under notebooks/ runs top to bottom (as CI, with CI=true: shortened runs)."""

import glob
import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
  monkeypatch.setenv('CI', 'true')
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name='python3',
      resources={'metadata': {'path': str(tmp_path)}})
  client.execute()
  outputs = [o for cell in notebook.cells for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
