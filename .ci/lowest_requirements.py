"""Print each requirement of setup.cfg (install_requires and the test extra) pinned to the lowest version it
allows, for CI's run of the suite on the oldest dependencies. torch and torchvision are left out: CI installs
the pair it tests (2.14.1 and 0.29.1) before these."""
import configparser
import re
import sys

INSTALLED_APART = {'torch', 'torchvision'}

cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
requirements = cfg['options']['install_requires'].split() + cfg['options.extras_require']['test'].split()
for requirement in requirements:
    match = re.fullmatch(r'([A-Za-z0-9_.-]+)>=([^,]+)(,.*)?', requirement)
    if match is None:
        sys.exit(f'expected a requirement of the form name>=version[,...] in setup.cfg, got {requirement!r}')
    name, lowest = match.group(1), match.group(2)
    if name not in INSTALLED_APART:
        print(f'{name}=={lowest}')
