""" Shared by the CLI tests: small image folders, a console runner, one thread per process. """
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tiny tensors: one thread each, in this process and the ones it starts (no stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('OMP_NUM_THREADS', '1')
        yield
    torch.set_num_threads(threads)


def make_image_folder(root, classes=('cat', 'dog', 'fox'), per_class=3, size=40, seed=0):
    """`root/<class>/<i>.png` with a class-dependent mean colour, so the classes are learnable."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            base = np.zeros(3)
            base[c % 3] = 200
            pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f'{i}.png'))
    return str(root)


def save_turned(upright, path):
    """Save the PIL image `upright` as a camera stores a portrait photo: turned on its side, with the EXIF
    orientation (6) that tells viewers to turn it back."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are to be turned 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes())


def digest(path):
    """Content hashes of every file under `path`."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, 'rb').read()).hexdigest()
    return out


def cli(*args):
    """`python -m timm_coordatt ARGS` in a fresh interpreter, as a user's shell would run it."""
    return subprocess.run(
        [sys.executable, '-m', 'timm_coordatt', *args], capture_output=True, text=True, timeout=600)


def torchrun(tmp_path, *args, wait: bool = True):
    """`torchrun --standalone --nproc_per_node=2 ARGS` on the CPU, its rendezvous folders (torchelastic_*, which
    it leaves behind) in the test's own temporary folder; finished, or with `wait=False` started (to signal it)."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop('CUDA_VISIBLE_DEVICES', None)
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
