import os

# tests/multidevice needs 8 fake CPU devices, which must be set before JAX starts; the main
# suite runs on one device, so test_multidevice.py runs that folder in its own pytest process.
if os.environ.get('LM_MULTIDEVICE') != '1':
  collect_ignore = ['multidevice']
