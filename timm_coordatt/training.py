""" The fine-tuning loop behind `timm-coordatt train` and the helpers `validate` / `predict` share.

Everything is assembled from timm's own parts: `create_model` / `load_pretrained` for weights,
`ImageDataset` / `ReaderImageFolder` / `create_transform` / `resolve_data_config` for data, `create_optimizer_v2`,
`create_scheduler_v2`, `LabelSmoothingCrossEntropy`, `ModelEmaV3`, `accuracy` / `AverageMeter`,
`freeze`, `group_modules`, `distribute_bn` and timm's distributed setup.

A run directory holds:
    config.json, model.safetensors   latest weights, loadable as `timm.create_model('local-dir:RUN')`
    ema/                             the EMA of the weights (with --model-ema), same layout
    best/                            the best epoch's weights (by validation top-1), same layout
    training_state.pt                everything `--resume` needs (tensors and plain containers only,
                                     loadable with `torch.load(..., weights_only=True)`)
    metrics.jsonl                    one JSON record per finished epoch
Every file is written to a temporary name and moved into place, so an interrupted write never
leaves a broken file behind. `training_state.pt` is self-contained (it holds the weights too), so
it is always consistent with itself whatever else was interrupted.
"""
import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import random
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import unicodedata
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from huggingface_hub import constants as hf_constants, try_to_load_from_cache
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image, ImageOps
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import Compose
from tqdm import tqdm

import timm
from timm.data import (
    ImageDataset, ImageNetInfo, create_transform, get_img_extensions, infer_imagenet_subset, resolve_data_config)
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.layers import convert_sync_batchnorm
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import group_modules, load_pretrained, parse_model_name
from timm.models._hub import hf_split, save_config_for_hf
from timm.models._pretrained import filter_pretrained_cfg
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import (
    AverageMeter, ModelEmaV3, accuracy, dispatch_clip_grad, distribute_bn, freeze, natural_key, random_seed)
from timm.utils.distributed import init_distributed_device_so

from .datasets import DEFAULT_IMG_SIZE as GRID_IMG_SIZE, GridShapes
from .pretrained import load_error, read_weights
from .recompute import recompute_ca_outputs, set_recompute_ca_outputs

__all__ = [
    'UsageError', 'atomic_write', 'check_can_create', 'written_in_place', 'write_text', 'use_default_mode',
    'save_weights', 'export_model',
    'check_image_folder', 'create_model', 'warn_of_random_weights', 'label_names', 'to_rgb', 'upright', 'evaluate',
    'fit',
    'STATE_FILE', 'METRICS_FILE', 'WEIGHTS_FILE', 'CONFIG_FILE',
]

WEIGHTS_FILE = 'model.safetensors'
EMA_DIR = 'ema'  # a folder of its own: a local-dir holds one model (config.json, model.safetensors)
CONFIG_FILE = 'config.json'
STATE_FILE = 'training_state.pt'
METRICS_FILE = 'metrics.jsonl'
BEST_DIR = 'best'
STATE_VERSION = 2  # 2: progress records the steps an epoch; --amp's precision is recorded
_STATE_KEYS = ('args', 'model', 'model_ema', 'optimizer', 'scheduler', 'scaler', 'progress', 'rng', 'class_names')

_TRAIN_DIRS = ('train', 'training')  # timm's split names, in any case
_VAL_DIRS = ('validation', 'val', 'valid', 'eval', 'evaluation')
# beyond timm's folder extensions (png, jpg, jpeg): formats a phone or camera export often holds, which PIL reads
_MORE_IMAGE_EXTENSIONS = {'.bmp', '.gif', '.tif', '.tiff', '.webp'}
# options that may differ from the interrupted run's when resuming (recompute_ca only trades
# memory for time: its gradients are bit-identical; data_dir, the data moved: its class folders are checked)
RESUME_OVERRIDES = ('epochs', 'workers', 'device', 'recompute_ca', 'data_dir', 'resume', 'output')


class UsageError(Exception):
    """Bad input or an impossible request: reported as one message and a non-zero exit, no traceback."""


def _print(*args, **kwargs) -> None:
    # through tqdm so that messages do not tear an active progress bar
    tqdm.write(' '.join(str(a) for a in args), file=kwargs.get('file', sys.stderr))


# how often a progress bar is redrawn into a file or pipe (a log): each redraw stays in it
_LOG_REFRESH_S = 30.0


def _progress_bar(iterable: Optional[Iterable] = None, **kwargs) -> tqdm:
    """A transient progress bar on stderr, redrawn every 0.1 s on a terminal and every `_LOG_REFRESH_S`
    into a log. Set its postfix with `refresh=False`: the next timed redraw shows it."""
    interval = 0.1 if sys.stderr.isatty() else _LOG_REFRESH_S
    # maxinterval: tqdm's monitor thread redraws a bar not redrawn for that long (10 s by default)
    return tqdm(iterable, leave=False, dynamic_ncols=True, mininterval=interval, maxinterval=max(interval, 10.),
                **kwargs)


# ---------------------------------------------------------------------------------------------
# files

def _umask() -> int:
    mask = os.umask(0o022)  # read by setting it: there is no other way
    os.umask(mask)
    return mask


# the permissions of a new file under the user's umask; safetensors writes its files readable by their owner only
_FILE_MODE = 0o666 & ~_umask()


def use_default_mode(path: Union[str, os.PathLike]) -> None:
    """Give the file at `path` the permissions of a new file under the user's umask."""
    os.chmod(path, _FILE_MODE)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then move the finished file onto `path` in one step, with the permissions of
    a new file under the user's umask. Through a symbolic link the file it points to is replaced, not the
    link; what is not a regular file (`/dev/stdout`, a FIFO) is written as it is: there is no file to replace,
    but the content is made first, whole (writers that seek cannot write into a pipe), and follows what this
    process printed to its own descriptors."""
    if written_in_place(path):
        with tempfile.TemporaryDirectory() as folder:
            tmp = os.path.join(folder, os.path.basename(path))
            write(tmp)
            _write_through(path, tmp)
        return
    path = os.path.realpath(path)
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        use_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _own_descriptor(path: str) -> Optional[int]:
    """The descriptor of this process that `path` names (`/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`), if any."""
    path = os.path.abspath(path)
    named = {'/dev/stdout': 1, '/dev/stderr': 2}
    if path in named:
        return named[path]
    match = re.fullmatch(rf'/(?:dev/fd|proc/(?:self|{os.getpid()})/fd)/(\d+)', path)
    return int(match[1]) if match else None


def _write_through(path: str, tmp: str) -> None:
    # the process's own descriptor written at its offset: opened again by name, a file the shell opened
    # (`> out`) would be truncated, losing what was printed before, and overwritten by what is printed after
    descriptor = _own_descriptor(path)
    sys.stdout.flush()
    sys.stderr.flush()
    target = open(path, 'wb') if descriptor is None else os.fdopen(descriptor, 'wb', closefd=False)
    with open(tmp, 'rb') as source, target:
        shutil.copyfileobj(source, target)


def check_can_create(path: str, option: str) -> None:
    """UsageError unless a new file can be made where `path` goes (through a link: where the file it points
    to is), as writing it atomically will: checked before work whose result it is to hold."""
    folder = os.path.dirname(os.path.realpath(path))
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f'{option} {path}: cannot write in {folder} ({e.strerror or e})') from None


def written_in_place(path: str) -> bool:
    """Devices, FIFOs, the process's own descriptors (`/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`, which lead to
    a file the shell opened: replacing it by name would leave the shell's descriptor on the old one)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a new file (or a link to one), or one that cannot be: the folder says why
        return False
    return not stat.S_ISREG(mode) or os.path.abspath(path).startswith(('/dev/', '/proc/'))


def write_text(path: str, text: str) -> None:
    """`text` into `path`, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))


def save_weights(model: nn.Module, path: str) -> None:
    """The model's state dict as safetensors, written atomically."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={'format': 'pt'}))


def num_classes_once(config_path: Union[str, Path]) -> None:
    """Leaves `num_classes` in a timm Hub `config.json` at its top level only, where timm >= 1.0.31 repeats it
    in `model_args`: transformers' timm wrapper passes the top-level one to `timm.create_model` with
    `model_args` and fails on the repeat ("got multiple values for keyword argument 'num_classes'"); timm
    reads the top-level one."""
    config = json.loads(Path(config_path).read_text(encoding='utf-8'))
    if config.get('model_args', {}).get('num_classes') == config['num_classes']:
        del config['model_args']['num_classes']
        write_text(str(config_path), json.dumps(config, indent=2))


_DATA_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


def export_model(model: nn.Module, directory: str, class_names: Sequence[str], data_config: Dict[str, Any]) -> None:
    """`config.json` + `model.safetensors` in timm's Hub layout (`timm.create_model('local-dir:DIR')` loads it)."""
    # The whole pretrained_cfg is given (timm merges it into the model's): the fine-tuned model's data config
    # and head replace those of the weights it started from.
    pretrained_cfg = filter_pretrained_cfg(model.pretrained_cfg, remove_source=True, remove_null=True)
    resized = tuple(data_config['input_size']) != tuple(pretrained_cfg.get('input_size', ()))
    pretrained_cfg.update({k: data_config[k] for k in _DATA_KEYS if k in data_config})
    pretrained_cfg.update(
        tag='finetuned',  # the source weights' tag (e.g. in1k) no longer describes these
        num_classes=model.num_classes, test_input_size=None, test_crop_pct=None)
    if resized:
        pretrained_cfg['pool_size'] = None

    def write_config(tmp: str) -> None:
        save_config_for_hf(
            model, Path(tmp), model_config={'label_names': list(class_names), 'pretrained_cfg': pretrained_cfg})
        num_classes_once(tmp)

    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, CONFIG_FILE), write_config)
    save_weights(model, os.path.join(directory, WEIGHTS_FILE))


def _load_training_state(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f'cannot resume: {path} does not exist (expected the run directory of an earlier `train`; '
                         f'a run stopped before its first checkpoint has none: start it again)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UsageError(f'cannot resume: {path} is not a readable training state ({load_error(e)})') from None
    if not isinstance(state, dict) or state.get('version') != STATE_VERSION:
        raise UsageError(f'cannot resume: {path} is not a training state of this version of timm-coordatt')
    missing = [key for key in _STATE_KEYS if key not in state]
    if not missing and not isinstance(state['progress'], dict):
        missing = ['progress']
    elif not missing:
        missing = [f'progress.{f.name}' for f in dataclasses.fields(_Progress) if f.name not in state['progress']]
    if missing:
        raise UsageError(f'cannot resume: {path} is damaged (no {", ".join(missing)})')
    return state


# ---------------------------------------------------------------------------------------------
# data

def _split_dir(root: str, names: Sequence[str]) -> Optional[str]:
    """The folder of `root` named as the first of `names` that one is, in any case (`Train/`, `VAL/`)."""
    folders = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir():
            folders.setdefault(entry.name.lower(), entry.path)
    return next((folders[name] for name in names if name in folders), None)


def _image_extensions() -> Set[str]:
    return get_img_extensions(as_set=True) | _MORE_IMAGE_EXTENSIONS


def _is_data(name: str) -> bool:
    """Whether a file or folder named `name` may hold data: hidden ones (`.ipynb_checkpoints`, macOS's
    `._photo.jpg` resource files) and the `__MACOSX` folder of a zip made on macOS do not."""
    return not name.startswith('.') and name != '__MACOSX'


def check_image_folder(root: str) -> List[str]:
    """Class names of the ImageFolder tree `root/<class>/<image>`; UsageError naming what is wrong.

    Classes are in timm's order (`natural_key`: `2` before `10`, case ignored), the order timm's own
    scripts give an ImageFolder's outputs. Each image's header is read and checked (PIL `verify`; a JPEG
    without its end marker is decoded), so a corrupt, truncated or non-image file is reported before
    training starts instead of failing (or being skipped) in the middle of an epoch. Images in folders
    below a class folder are refused: timm labels an image by the folder it is in. Hidden files and
    folders and `__MACOSX` are no data (`_is_data`).
    """
    if not os.path.exists(root):
        raise UsageError(f'data directory {root} does not exist')
    if not os.path.isdir(root):
        raise UsageError(f'data directory {root} is not a directory')
    extensions = _image_extensions()
    classes = sorted((e.name for e in os.scandir(root) if e.is_dir() and _is_data(e.name)), key=natural_key)
    if not classes:
        raise UsageError(
            f'data directory {root} has no class folders: expected {root}/<class name>/<image> '
            f'with images ending in {", ".join(sorted(extensions))}')
    empty, nested, bad, count, direct = [], [], [], 0, 0
    for name in classes:
        class_dir = os.path.join(root, name)
        files = []
        for d, dirs, fs in os.walk(class_dir, followlinks=True):
            dirs[:] = [sub for sub in dirs if _is_data(sub)]
            images = [os.path.join(d, f) for f in sorted(fs)
                      if _is_data(f) and os.path.splitext(f)[1].lower() in extensions]
            if images and d != class_dir:
                nested.append(os.path.relpath(d, root))
            elif d == class_dir:
                direct += len(images)
            files += images
        if not files:
            empty.append(name)
        for path in files:
            try:
                _check_image(path)
            except Exception as e:
                bad.append(f'{path} ({type(e).__name__}: {e})')
        count += len(files)
    if empty:
        raise UsageError(
            f'class folder(s) with no images in {root}: {", ".join(empty)} '
            f'(expected files ending in {", ".join(sorted(extensions))})')
    if nested and not direct:
        raise UsageError(
            f'the folders of {root} hold folders of images, no images ({", ".join(nested[:5])}'
            f'{", ..." if len(nested) > 5 else ""}): expected {root}/<class name>/<image>. Is the dataset a '
            f'level down (--data-dir {os.path.join(root, classes[0])})? A split is read from folders named '
            f'{" or ".join(_TRAIN_DIRS)} and {", ".join(_VAL_DIRS)}, in any case')
    if nested:
        raise UsageError(
            f'{root} has images in folders below its class folders ({", ".join(nested[:5])}'
            f'{", ..." if len(nested) > 5 else ""}); expected {root}/<class name>/<image>: move them up into '
            f'their class folder')
    if bad:
        shown = '\n  '.join(bad[:10])
        more = f'\n  ... and {len(bad) - 10} more' if len(bad) > 10 else ''
        raise UsageError(f'{len(bad)} of {count} image files in {root} cannot be read:\n  {shown}{more}')
    return classes


def _names(names: Sequence[str], shown: int = 10) -> str:
    return ', '.join(names[:shown]) + (f', ... ({len(names)} in all)' if len(names) > shown else '')


# PIL modes of more than 8 bits a channel, which PIL's `convert('RGB')` clips at 255
_INTEGER_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB, with 16-bit images scaled to 8 bits (where `convert('RGB')` alone would clip
    them, leaving most of a 16-bit photo white); ValueError for pixels of no fixed range (floating point,
    32-bit integers beyond 16 bits)."""
    if img.mode in _INTEGER_MODES:
        pixels = np.asarray(img)
        # mode I holds 32-bit integers: 16-bit PNGs as older Pillows read them, or wider data with no fixed range
        if img.mode == 'I' and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ValueError(f'expected an 8- or 16-bit image, got 32-bit integer pixels (PIL mode I) from '
                             f'{pixels.min()} to {pixels.max()}, beyond the 16-bit range 0-65535')
        img = Image.fromarray((pixels.astype(np.float32) / 257).clip(0, 255).round().astype(np.uint8))
    elif img.mode == 'F':
        raise ValueError('expected an 8- or 16-bit image, got floating-point pixels (PIL mode F), which have no '
                         'fixed range to scale to 8 bits')
    return img.convert('RGB')


def upright(img: Image.Image) -> Image.Image:
    """`img`, turned in place as its EXIF orientation says. Cameras store a photo as the sensor read it and
    tag how to turn it for viewing: viewers apply the tag, timm's loader does not (a portrait phone photo
    would reach the model on its side)."""
    ImageOps.exif_transpose(img, in_place=True)
    return img


def _upright_first(transform: Callable) -> Compose:
    """`transform` (timm's, for the RGB images timm's loader reads from files) after `upright`."""
    return Compose([upright, transform])


def _check_image(path: str) -> None:
    """Raise if the image file `path` is corrupt or one timm's loader would read wrong. `verify` checks a PNG
    whole but decodes no JPEG data, so a JPEG is also decoded where its end-of-image marker is missing (as in
    a truncated download)."""
    with Image.open(path) as img:
        if img.mode in _INTEGER_MODES + ('F',):
            # timm's data loader converts with convert('RGB'), which clips these
            raise ValueError(f'expected an 8-bit image, got PIL mode {img.mode}, which timm\'s loader clips at '
                             f'255; convert the images to 8 bits (timm-coordatt predict and attention scale them)')
        if img.format == 'JPEG':
            img.fp.seek(-min(32, os.path.getsize(path)), os.SEEK_END)
            if b'\xff\xd9' not in img.fp.read():
                img.fp.seek(0)
                img.load()
                return
        img.verify()


def _image_folder(root: str, class_map: Dict[str, int]) -> ImageDataset:
    """timm's dataset of the images of `root/<class>/` that `check_image_folder` checked: of every format
    `predict` reads, none hidden (timm's reader alone would label the images of `root/.backup/dog/` as dogs)."""
    reader = ReaderImageFolder(root, class_map=class_map, input_key=';'.join(sorted(_image_extensions())))
    reader.samples = [(path, target) for path, target in reader.samples
                      if all(_is_data(name) for name in Path(os.path.relpath(path, root)).parts)]
    return ImageDataset(root, reader=reader)


def _indices(class_names: Sequence[str]) -> Dict[str, int]:
    return {name: i for i, name in enumerate(class_names)}


def _composed(name: str) -> str:
    """`name` in Unicode's composed form (NFC), in which class names are compared: macOS and zips made there
    may spell `café` decomposed, which looks the same."""
    return unicodedata.normalize('NFC', name)


def _matching(folders: Iterable[str], names: Sequence[str]) -> Dict[str, int]:
    """Folder name -> index in `names` of the name it is (`_composed`), for the folders that are one."""
    index = {_composed(name): i for i, name in enumerate(names)}
    return {folder: index[_composed(folder)] for folder in folders if _composed(folder) in index}


@dataclasses.dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    class_names: List[str]
    description: str


def _grid_task(split: str, num_samples: int, img_size: int, grid: int) -> GridShapes:
    """The embedded task's `split`; UsageError for a size it cannot draw."""
    if img_size < 8 * grid:
        raise UsageError(f'the embedded task draws a {grid}x{grid} grid of shapes at 8 px or more a cell: it needs '
                         f'--img-size >= {8 * grid}, got {img_size}')
    return GridShapes(split, num_samples, img_size=img_size, grid=grid)


def find_data(args: argparse.Namespace, class_order: Optional[Sequence[str]] = None) -> DataSplits:
    """The train / validation datasets (no transforms yet) and class names that `args` asks for; in the order
    `class_order` (a resumed run's outputs) where the data has those classes."""
    if args.data_dir is None:
        train = _grid_task('train', args.grid_samples, args.img_size, args.grid)
        val = _grid_task('validation', args.grid_val_samples, args.img_size, args.grid)
        return DataSplits(train, val, train.classes, f'embedded GridShapes task ({args.grid}x{args.grid} grid)')

    root = args.data_dir
    train_dir = _split_dir(root, _TRAIN_DIRS) if os.path.isdir(root) else None
    val_dir = _split_dir(root, _VAL_DIRS) if train_dir else None
    class_names = check_image_folder(train_dir or root)
    recorded = _matching(class_names, class_order or ())
    if class_order is not None and len(class_order) == len(class_names) == len(recorded):
        class_names = sorted(class_names, key=recorded.get)
    if len(class_names) < 2:
        raise UsageError(f'{train_dir or root} has one class folder ({class_names[0]}): a classifier needs two or more')
    if val_dir:
        val_classes = check_image_folder(val_dir)
        val_indices = _matching(val_classes, class_names)
        unknown = [name for name in val_classes if name not in val_indices]
        if unknown:
            raise UsageError(f'{val_dir} has classes that {train_dir} lacks: {", ".join(unknown[:10])}')
        return DataSplits(
            _image_folder(train_dir, _indices(class_names)), _image_folder(val_dir, val_indices), class_names,
            f'{train_dir} / {val_dir}')

    if not 0. < args.val_fraction < 1.:
        raise UsageError(
            f'{root} has no validation folder ({"/".join(_VAL_DIRS)}), so --val-fraction must be in (0, 1) '
            f'to hold out part of it, got {args.val_fraction}')
    dataset = _image_folder(train_dir or root, _indices(class_names))
    n = len(dataset)
    n_val = max(1, round(n * args.val_fraction))
    if n_val >= n:
        raise UsageError(f'{train_dir or root} has only {n} images: too few to hold out {args.val_fraction:.0%}')
    # a fixed split, independent of --seed, so runs with different seeds validate on the same images
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    val = ImageDataset(train_dir or root, reader=dataset.reader)  # the same files, its own transform
    return DataSplits(
        Subset(dataset, order[n_val:]), Subset(val, order[:n_val]), class_names,
        f'{train_dir or root} ({n - n_val} train / {n_val} held-out images)')


def _set_transform(dataset: Dataset, transform: Callable) -> None:
    (dataset.dataset if isinstance(dataset, Subset) else dataset).transform = transform


# ---------------------------------------------------------------------------------------------
# models

def _check_model_name(model_name: str) -> None:
    source, name = parse_model_name(model_name)
    if source:
        return  # `local-dir:` / `hf-hub:` configs name their architecture; create_model checks it
    arch = name.split('.')[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f'; did you mean {", ".join(close)}?' if close else ' (see `timm.list_models()`)'
        raise UsageError(f'unknown model {model_name!r}{hint}')


def _classifier_keys(model: nn.Module) -> List[str]:
    classifier = model.pretrained_cfg.get('classifier') or []
    return [classifier] if isinstance(classifier, str) else list(classifier)


def _check_fits(model: nn.Module, state_dict: Dict[str, torch.Tensor], skip: Sequence[str], source: str) -> None:
    """UsageError describing how `state_dict` differs from the model's, ignoring keys under `skip`."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(skip))}
    theirs = {k: v for k, v in state_dict.items() if not k.startswith(tuple(skip))}
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [
        f'{k}: {tuple(theirs[k].shape)} vs {tuple(own[k].shape)}' for k in own
        if k in theirs and theirs[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f'{len(missing)} missing (e.g. {", ".join(missing[:3])})')
        if unexpected:
            problems.append(f'{len(unexpected)} unexpected (e.g. {", ".join(unexpected[:3])})')
        if shapes:
            problems.append(f'{len(shapes)} of another shape (checkpoint vs model: {"; ".join(shapes[:3])})')
        arch = model.pretrained_cfg.get('architecture', type(model).__name__)
        raise UsageError(
            f'{source} does not fit {arch}: {", ".join(problems)} tensors; is it a checkpoint of another architecture?')


def create_model(
        model_name: str,
        num_classes: Optional[int] = None,
        pretrained: bool = False,
        checkpoint: Optional[str] = None,
        use_ema: bool = False,
        **kwargs,
) -> nn.Module:
    """`timm.create_model` with clear errors, optionally loading a local checkpoint.

    `model_name` may be any timm name, `local-dir:DIR` (a run directory of `train`) or `hf-hub:ID`.
    `checkpoint` (safetensors or a torch file, read with `weights_only=True`) is loaded like
    pretrained weights: with `num_classes` given and different from the checkpoint's, its
    classifier is dropped (fine-tuning); with `num_classes=None` the head takes the checkpoint's
    number of classes. Of a checkpoint holding an EMA of the weights too (timm's `state_dict_ema`,
    `train`'s `model_ema`), the plain weights are loaded, or with `use_ema` the EMA (as timm's `validate.py`).
    """
    _check_model_name(model_name)
    if checkpoint is not None and os.path.isdir(checkpoint):
        raise UsageError(f'checkpoint {checkpoint} is a folder; expected a weights file (a run directory '
                         f'of `train` is a model: local-dir:{checkpoint})')
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UsageError(f'checkpoint {checkpoint} does not exist')
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    # a run directory's config.json names the architecture, its weights sit beside it
    pretrained = pretrained or parse_model_name(model_name)[0] is not None
    try:
        model = timm.create_model(model_name, pretrained=pretrained and checkpoint is None, **kwargs)
    except UsageError:
        raise
    except LocalEntryNotFoundError as e:
        # offline, huggingface_hub's message says to check the connection
        why = (f'offline mode is on (HF_HUB_OFFLINE=1) and its files are not in the Hub cache '
               f'{hf_constants.HF_HUB_CACHE}' if hf_constants.HF_HUB_OFFLINE else f'{type(e).__name__}: {e}')
        raise UsageError(f'cannot create model {model_name!r}: {why}') from None
    except json.JSONDecodeError as e:
        source, name = parse_model_name(model_name)
        config = None
        if source == 'hf-hub':  # a damaged copy in the Hub cache is read again on every load: name it
            repo_id, revision = hf_split(name)
            config = try_to_load_from_cache(repo_id, 'config.json', revision=revision)
        where = f'the cached {config}' if isinstance(config, str) else 'its config.json'
        raise UsageError(f'cannot create model {model_name!r}: {where} is not valid JSON ({e}); delete it to '
                         f'download it again') from None
    except Exception as e:  # the Hub, a missing file, a bad config: all reported the same way
        raise UsageError(f'cannot create model {model_name!r}: {type(e).__name__}: {e}') from None
    if checkpoint is None:
        return model

    try:
        state_dict = read_weights(checkpoint, use_ema=use_ema)
    except Exception as e:
        raise UsageError(f'cannot read checkpoint {checkpoint}: {load_error(e)}') from None
    heads = _classifier_keys(model)
    head_weight = state_dict.get(f'{heads[0]}.weight') if heads else None
    # a backbone's weights (saved with num_classes=0) for a model with a head: fine-tuning gives it a new one
    headless = head_weight is None and bool(heads) and f'{heads[0]}.weight' in model.state_dict()
    ckpt_classes = 0 if headless else (
        head_weight.shape[0] if head_weight is not None and head_weight.ndim >= 1 else model.num_classes)
    if num_classes is None and not headless and ckpt_classes != model.num_classes:
        model.reset_classifier(ckpt_classes)
    _check_fits(model, state_dict, heads if ckpt_classes != model.num_classes else (), f'checkpoint {checkpoint}')
    if headless and num_classes is None:
        raise UsageError(f'checkpoint {checkpoint} has no classifier ({heads[0]}.weight), only the weights before '
                         f'it; expected a checkpoint with its classifier (train --initial-checkpoint fine-tunes '
                         f'from it with a new one)')
    # timm's loader: drops the classifier when the number of classes differs
    cfg = {**model.pretrained_cfg, 'state_dict': state_dict, 'num_classes': ckpt_classes}
    load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes, in_chans=kwargs.get('in_chans', 3))
    return model


def label_names(model: nn.Module, descriptions: bool = False) -> Optional[List[str]]:
    """Class names of the model's outputs: its config's `label_names`, else ImageNet's by head size.

    ImageNet names are WordNet synsets (the folder names of ImageNet), or with `descriptions` their
    readable lemmas.
    """
    # any classifier: a model built without timm.create_model has no pretrained_cfg
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    if names and len(names) == getattr(model, 'num_classes', None):
        return list(names)
    subset = infer_imagenet_subset(model)
    if subset:
        info = ImageNetInfo(subset)
        if descriptions:
            return [info.index_to_description(i) for i in range(info.num_classes())]
        return list(info.label_names())
    return None


# ---------------------------------------------------------------------------------------------
# distributed, precision, interruption

@dataclasses.dataclass
class _Dist:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def primary(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    try:
        info = init_distributed_device_so(device=device)
        device = torch.device(info['device'])
    except (AssertionError, RuntimeError) as e:
        raise UsageError(f'cannot use device {device!r}: {e}') from None
    return _Dist(device, info['global_rank'], info['world_size'], info['distributed'])


def _default_amp_dtype(device: torch.device) -> str:
    """`--amp`'s precision where `--amp-dtype` is not given."""
    return 'float16' if device.type == 'cuda' else 'bfloat16'


def _autocast(device: torch.device, amp: bool, amp_dtype: Optional[str]):
    """(autocast context factory, GradScaler) for `--amp` in `--amp-dtype`: by default fp16 + loss scaling
    on CUDA, bf16 elsewhere."""
    if amp_dtype and not amp:
        raise UsageError(f'--amp-dtype {amp_dtype} goes with --amp, which was not given')
    if not amp:
        return contextlib.nullcontext, torch.amp.GradScaler(device.type, enabled=False)
    dtype = getattr(torch, amp_dtype or _default_amp_dtype(device))
    if device.type == 'cuda' and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError('--amp-dtype bfloat16: this GPU does not support bfloat16; use --amp-dtype float16')
    return (partial(torch.autocast, device_type=device.type, dtype=dtype),
            torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


class _GracefulStop:
    """Turns the first SIGINT / SIGTERM into a request to stop after the current step.

    The training loop checks `requested()` between steps, so weights and optimizer state are never
    saved half-updated. A second signal interrupts at once.
    """

    def __init__(self, ctx: _Dist):
        self.ctx = ctx
        self.flag = False
        self._previous = {}

    def __enter__(self):
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked data loader worker: the training process stops it
            return
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        if self.ctx.primary:
            _print(f'\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint '
                   f'(send it again to abort without saving)')

    def requested(self) -> bool:
        if not self.ctx.distributed:
            return self.flag
        # every rank must stop at the same step (each may have seen the signal at another time)
        flag = torch.tensor([float(self.flag)], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    # each epoch's randomness depends only on (seed, epoch, rank), so resuming at an epoch
    # boundary repeats it exactly whatever happened before
    derived = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    random_seed(derived, 0)


def _rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _probe_generator_owner(optimizer: torch.optim.Optimizer) -> Optional[torch.optim.Optimizer]:
    # timm's Adahessian draws the random probes of its Hessian estimate from a generator of its own, which its
    # state_dict leaves out (also when wrapped by Lookahead)
    base = getattr(optimizer, '_base_optimizer', optimizer)
    return base if isinstance(getattr(base, 'generator', None), torch.Generator) else None


def _probe_generator_state(optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
    owner = _probe_generator_owner(optimizer)
    return None if owner is None else {'device': str(owner.generator.device), 'state': owner.generator.get_state()}


def _set_probe_generator_state(optimizer: torch.optim.Optimizer, state: Optional[Dict[str, Any]],
                               device: torch.device) -> None:
    owner = _probe_generator_owner(optimizer)
    # on another device the optimizer seeds a generator there anyway: the run goes on, not bit-exactly
    if owner is not None and state is not None and torch.device(state['device']).type == device.type:
        owner.generator = torch.Generator(state['device'])
        owner.generator.set_state(state['state'])


# ---------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Iterable,
        device: torch.device,
        autocast: Callable = contextlib.nullcontext,
        channels_last: bool = False,
        ctx: Optional[_Dist] = None,
        desc: str = 'validate',
        stop: Optional[_GracefulStop] = None,
) -> Optional[Dict[str, float]]:
    """Loss, top-1 and top-5 (%) of `model` over `loader`, summed over all ranks; None if stopped."""
    model.eval()
    meters = {k: AverageMeter() for k in ('loss', 'top1', 'top5')}
    show = ctx is None or ctx.primary
    with _progress_bar(loader, desc=desc, disable=not show) as bar:
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                output = model(x)
            loss = nn.functional.cross_entropy(output.float(), y)
            top1, top5 = accuracy(output, y, topk=(1, 5))
            for k, v in (('loss', loss), ('top1', top1), ('top5', top5)):
                meters[k].update(v.item(), x.shape[0])
            bar.set_postfix(loss=f'{meters["loss"].avg:.3f}', top1=f'{meters["top1"].avg:.1f}', refresh=False)
            if stop is not None and stop.flag:
                break
    if stop is not None and stop.requested():
        return None
    sums = torch.tensor([meters[k].sum for k in meters] + [meters['loss'].count], dtype=torch.float64)
    if ctx is not None and ctx.distributed:
        sums = sums.to(ctx.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    count = sums[-1].item()
    if count == 0:
        raise UsageError('the validation set is empty')
    return {k: sums[i].item() / count for i, k in enumerate(meters)} | {'images': int(count)}


# ---------------------------------------------------------------------------------------------
# training

def _default_output(args: argparse.Namespace) -> str:
    name = args.model.replace('/', '_').replace(':', '_')
    return os.path.join('output', 'train', f'{time.strftime("%Y%m%d-%H%M%S")}-{name}')


def _check_minimums(args: argparse.Namespace, minimums: Dict[str, float]) -> None:
    """UsageError for the first option below its minimum (options not given, None, are not checked)."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UsageError(f'--{name.replace("_", "-")} must be >= {minimum}, got {value}')


# the options `validate` and `predict` share (`cli.validate.add_model_arguments`), and their least values
_EVAL_MINIMUMS = {'batch_size': 1, 'img_size': 1}


def _check_options(args: argparse.Namespace, ctx: _Dist) -> None:
    """UsageError for option values and combinations that cannot work."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
            raise UsageError(f'--{name.replace("_", "-")} must be a finite number, got {value}')
    _check_minimums(args, {
        'epochs': 1, 'batch_size': 1, 'grid': 2, 'grid_samples': 1, 'grid_val_samples': 1, 'img_size': 1,
        'workers': 0, 'weight_decay': 0, 'momentum': 0, 'warmup_lr': 0, 'min_lr': 0})
    if args.lr <= 0:
        raise UsageError(f'--lr must be > 0, got {args.lr}')
    if not 0 <= args.seed < 2 ** 32:  # numpy's range, which timm's random_seed seeds too
        raise UsageError(f'--seed must be in [0, 2**32), got {args.seed}')
    for name in ('layer_decay', 'clip_grad'):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f'--{name.replace("_", "-")} must be > 0, got {value}')
    if not 0. <= args.smoothing < 1.:
        raise UsageError(f'--smoothing must be in [0, 1), got {args.smoothing}')
    if args.warmup_epochs is None:
        args.warmup_epochs = 1 if args.epochs > 1 and args.sched != 'none' else 0
    if args.warmup_epochs != 0 and args.sched == 'none':
        raise UsageError(f'--sched none keeps --lr throughout, with no warm-up; got --warmup-epochs '
                         f'{args.warmup_epochs} (--sched constant warms up, then keeps the rate)')
    if args.warmup_epochs != 0 and not 0 < args.warmup_epochs < args.epochs:
        whose = ' (the resumed run\'s warm-up: --epochs must stay above it)' if args.resume else ''
        raise UsageError(
            f'--warmup-epochs must be in [0, --epochs) = [0, {args.epochs}), got {args.warmup_epochs}{whose}')
    if args.pretrained and args.initial_checkpoint:
        raise UsageError('--pretrained and --initial-checkpoint both give starting weights; pass one of them')
    if args.sync_bn and not ctx.distributed:
        raise UsageError('--sync-bn needs distributed training (launch with torchrun --nproc_per_node=N)')
    if args.sync_bn and ctx.device.type == 'cpu':
        raise UsageError('--sync-bn: PyTorch has SyncBatchNorm for GPUs only, not for --device cpu')
    if args.model_ema and not 0. < args.model_ema_decay < 1.:
        raise UsageError(f'--model-ema-decay must be in (0, 1), got {args.model_ema_decay}')
    if args.freeze < 0:
        raise UsageError(f'--freeze must be >= 0, got {args.freeze}')
    check_model_kwargs(args.model_kwargs, 'train', classes_from="the data's number of classes")


def warn_of_random_weights(name: str, pretrained: bool, checkpoint: Optional[str]) -> None:
    """A warning on stderr where `create_model(name, ...)` gives a model as initialised: what it computes means
    nothing."""
    if not (pretrained or checkpoint or parse_model_name(name)[0]):
        print(f'warning: {name} has random weights (no --pretrained, --checkpoint, local-dir: or hf-hub:)',
              file=sys.stderr)


def check_model_kwargs(model_kwargs: Dict[str, Any], command: str, classes_from: str) -> None:
    """UsageError for a `--model-kwargs` key that `command` sets itself: the weights (--pretrained), the
    head (`classes_from`), the input channels (images are read as RGB); or for a drop rate that is not a
    probability (the model would take it and fail, or do nothing, only in its forward)."""
    reserved = {'pretrained': '--pretrained', 'num_classes': classes_from, 'in_chans': '3, RGB'}
    clash = sorted(set(model_kwargs) & set(reserved))
    if clash:
        raise UsageError(f'--model-kwargs {clash[0]}: {command} sets it itself ({reserved[clash[0]]})')
    for key in ('drop_rate', 'drop_path_rate', 'drop_block_rate'):
        value = model_kwargs.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UsageError(f'--model-kwargs {key} expected a probability in [0, 1), got {value!r}')


def _resume_args(args: argparse.Namespace, saved: Dict[str, Any], defaults: Dict[str, Any]) -> argparse.Namespace:
    """The interrupted run's options, with the few that may change (`RESUME_OVERRIDES`) taken from `args`."""
    merged = argparse.Namespace(**saved)
    conflicts = []
    for key, value in vars(args).items():
        given = key not in defaults or value != defaults[key]  # on the command line (or not an option)
        if key not in saved or (key in RESUME_OVERRIDES and given):
            setattr(merged, key, value)
        elif given and value != saved[key]:
            conflicts.append(f'--{key.replace("_", "-")} {value} (the run used {saved[key]})')
    if conflicts:
        changeable = ', '.join(f'--{k.replace("_", "-")}' for k in RESUME_OVERRIDES[:5])
        raise UsageError(f'a resumed run keeps its options, only {changeable} may change; got ' + '; '.join(conflicts))
    return merged


def _freeze_groups(model: nn.Module, groups: int) -> List[str]:
    """Freeze the first `groups` layer groups of `model.group_matcher` (stem first); returns the frozen names."""
    if not hasattr(model, 'group_matcher'):
        raise UsageError(f'--freeze: {type(model).__name__} has no group_matcher, so it has no layer groups')
    layers = group_modules(model, model.group_matcher(coarse=True))
    # the last group holds the classifier, which must stay trainable
    if groups >= len(layers):
        raise UsageError(
            f'--freeze {groups}: this model has {len(layers)} layer groups and the last holds the classifier, '
            f'so --freeze must be in [0, {len(layers) - 1}]')
    names = [name for g in sorted(layers)[:groups] for name in layers[g]]
    # BN statistics are kept fixed by eval mode (see `_train_mode`) rather than by swapping in frozen
    # BN modules, so the saved state dict keeps the architecture's own keys
    freeze(model, names, include_bn_running_stats=False)
    return names


def _train_mode(model: nn.Module, frozen: Sequence[nn.Module]) -> None:
    model.train()
    for module in frozen:
        module.eval()


@dataclasses.dataclass
class _Progress:
    epoch: int = 0  # epochs finished (training and validation)
    step: int = 0  # batches finished in epoch `epoch`
    steps: int = 0  # batches an epoch has (per process: the data's images, --batch-size, the processes)
    num_updates: int = 0  # the schedule's position (epochs of `steps`, where a resumed run's steps changed)
    train_sums: Tuple[float, float, float] = (0., 0., 0.)  # loss sum, top-1 sum, images of the current epoch
    best_top1: float = -1.
    best_epoch: int = 0


def _resumed_progress(progress: _Progress, steps: int, stopped_processes: int, ctx: _Dist) -> _Progress:
    """The saved `progress` for an epoch of `steps` batches. A run stopped mid-training continues its epoch's
    data order, which needs the same batches and processes; one stopped between epochs (or in validation)
    may go on with other processes or images (the schedule keeps its place: the same fraction of the epochs)."""
    mid_training = 0 < progress.step < progress.steps
    if mid_training and (progress.steps != steps or stopped_processes != ctx.world_size):
        raise UsageError(
            f'the run was interrupted mid-epoch, after {progress.step} of its {progress.steps} batches an epoch with '
            f'{stopped_processes} process(es); now an epoch has {steps} batches with {ctx.world_size}: resume it '
            f'with as many processes and the same images')
    if progress.steps != steps:
        progress.step = steps if progress.step else 0
        progress.num_updates = progress.epoch * steps + progress.step
        progress.steps = steps
    return progress


def fit(args: argparse.Namespace, defaults: Optional[Dict[str, Any]] = None) -> int:
    """Train as `args` (the `train` subcommand's options) says; returns the exit code."""
    ctx = _init_distributed(args.device)
    try:
        return _fit(args, defaults or {}, ctx)
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _fit(args: argparse.Namespace, defaults: Dict[str, Any], ctx: _Dist) -> int:
    # -- everything that can be wrong with the request is checked before anything is written
    resume = None
    if args.resume:
        out_dir, out_existed = args.resume, True
        if args.output and os.path.abspath(args.output) != os.path.abspath(out_dir):
            raise UsageError('--resume continues in the run directory it names; drop --output or make them equal')
        resume = _load_training_state(os.path.join(out_dir, STATE_FILE))
        args = _resume_args(args, resume['args'], defaults)
        if resume['progress']['epoch'] >= args.epochs:
            _print(f'{out_dir} already finished {resume["progress"]["epoch"]} epochs; pass a larger --epochs to '
                   f'train on')
            return 0
    else:
        out_dir = args.output or _default_output(args)
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            if not os.path.exists(os.path.join(out_dir, STATE_FILE)):
                raise UsageError(f'output directory {out_dir} is not empty and holds no {STATE_FILE} to resume (a run '
                                 f'stopped before its first checkpoint, or another folder); remove it or choose '
                                 f'another --output')
            raise UsageError(f'output directory {out_dir} is not empty; pass --resume {out_dir} to continue that run '
                             f'or choose another --output')
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise UsageError(f'--output {out_dir} exists and is not a directory')
        _check_creatable(out_dir)
        out_existed = os.path.isdir(out_dir)
    # the run records them: a resumed run reads them wherever it is resumed from
    if args.data_dir is not None:
        args.data_dir = os.path.abspath(args.data_dir)
    source, name = parse_model_name(args.model)
    if source == 'local-dir':
        args.model = f'local-dir:{os.path.abspath(name)}'
    _check_options(args, ctx)
    if args.amp and args.amp_dtype is None:
        # recorded: a run resumed on another --device keeps its precision (and its loss scaler's state)
        args.amp_dtype = _default_amp_dtype(ctx.device)
    if args.img_size is None and args.data_dir is None:
        args.img_size = GRID_IMG_SIZE
    splits = find_data(args, resume.get('class_names') if resume else None)
    num_classes = len(splits.class_names)
    if resume is not None and ([_composed(name) for name in resume.get('class_names', splits.class_names)]
                               != [_composed(name) for name in splits.class_names]):
        raise UsageError(
            f'cannot resume {out_dir}: its classes were {_names(resume["class_names"])}, the data now has '
            f'{_names(splits.class_names)} (a class added, removed or renamed changes what each output means)')

    random_seed(args.seed, 0)  # the same initial weights on every rank
    # a resumed run's weights come from its state: no download or checkpoint read for weights replaced anyway;
    # a `local-dir:` / `hf-hub:` model's architecture from the run directory's config, written with every state,
    # so the source folder may be gone or the Hub out of reach
    architecture = args.model if resume is None or parse_model_name(args.model)[0] is None else f'local-dir:{out_dir}'
    model = create_model(
        architecture, num_classes=num_classes, pretrained=args.pretrained and resume is None,
        checkpoint=args.initial_checkpoint if resume is None else None, **args.model_kwargs)
    if resume is not None:
        _check_fits(model, resume['model'], (), f'training state in {out_dir}')
    data_config = resolve_data_config({'img_size': args.img_size}, model=model)
    if args.data_dir is None:
        data_config['crop_pct'] = 1.0  # no crop: the label is where the target is in the full image
        data_config['input_size'] = (3, args.img_size, args.img_size)
    if args.recompute_ca is False:
        set_recompute_ca_outputs(model, False)
    frozen_names = _freeze_groups(model, args.freeze) if args.freeze else []
    if args.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AttributeError, AssertionError, NotImplementedError) as e:
            raise UsageError(f'--grad-checkpointing: {args.model} does not support it ({e})') from None

    device = ctx.device
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn:
        model = convert_sync_batchnorm(model)
    frozen = [model.get_submodule(name) for name in frozen_names]  # after SyncBN conversion replaced modules
    autocast, scaler = _autocast(device, args.amp, args.amp_dtype)

    try:
        optimizer = create_optimizer_v2(
            model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
            layer_decay=args.layer_decay)
    except (ValueError, AssertionError, RuntimeError) as e:
        raise UsageError(f'cannot create optimizer {args.opt!r}: {e}') from None
    if getattr(optimizer, 'is_second_order', False) and (args.compile or ctx.distributed):
        # torch.compile's autograd has no double backward; DDP's gradient reduction writes the gradients in place
        cannot = 'torch.compile' if args.compile else 'distributed training (DistributedDataParallel)'
        raise UsageError(f'--opt {args.opt} differentiates the gradients again (a second-order optimizer), which '
                         f'{cannot} does not support; train without {"--compile" if args.compile else "torchrun"}')
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None

    # -- data
    # the embedded task's labels are positions: flips and crops would change them
    no_aug = args.no_aug or args.data_dir is None
    _set_transform(splits.train, _upright_first(create_transform(**data_config, is_training=True, no_aug=no_aug)))
    _set_transform(splits.val, _upright_first(create_transform(**data_config, is_training=False)))
    sampler = DistributedSampler(
        splits.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed, drop_last=True)
    loader_kwargs = dict(num_workers=args.workers, pin_memory=device.type == 'cuda')
    train_loader = DataLoader(
        splits.train, batch_size=args.batch_size, sampler=sampler, drop_last=True, **loader_kwargs)
    steps = len(train_loader)
    if steps == 0:
        raise UsageError(
            f'the training set has {len(splits.train)} images, fewer than one batch '
            f'(--batch-size {args.batch_size} x {ctx.world_size} processes)')
    # each rank validates its own slice; the sums are reduced, so every image counts exactly once
    val_loader = DataLoader(
        Subset(splits.val, range(ctx.rank, len(splits.val), ctx.world_size)), batch_size=args.batch_size,
        shuffle=False, **loader_kwargs)

    try:
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=steps)
    except (ValueError, AssertionError) as e:
        reason = str(e) or type(e).__name__
        if args.sched == 'wsd':  # timm's message names its decay_epochs, which train does not expose
            reason = (f'{(args.epochs - args.warmup_epochs) * steps:g} updates after the warm-up ({steps} an epoch) '
                      f'are too few for its decay phase; train longer')
        raise UsageError(f'cannot create scheduler {args.sched!r}: {reason}') from None
    num_epochs = round(num_epochs)  # timm counts in float where the warm-up is a float (wsd with --warmup-epochs 0.5)
    if scheduler is None and args.sched != 'none' and (args.sched != 'constant' or args.warmup_epochs):
        # older timm returns no scheduler for a name it does not know (1.0.26: 'wsd', 'constant'), which would
        # train at a fixed --lr; 'constant' without a warm-up is just that
        raise UsageError(f'--sched {args.sched}: this timm ({timm.__version__}) has no such schedule; upgrade timm '
                         f'or choose another --sched')
    if scheduler is None:  # timm's schedulers apply --layer-decay's per-group scales; without one, set them once
        for group in optimizer.param_groups:
            group['lr'] *= group.get('lr_scale', 1.)
    train_loss_fn = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()

    # -- restore an interrupted run
    progress = _Progress(steps=steps)
    rng_state = None
    if resume is not None:
        progress = _resumed_progress(_Progress(**resume['progress']), steps, len(resume['rng']), ctx)
        try:
            model.load_state_dict(resume['model'])
            optimizer.load_state_dict(resume['optimizer'])
            _set_probe_generator_state(optimizer, resume.get('probe_generator'), device)
            if scheduler is not None:
                if resume['scheduler'] is not None and resume['args']['epochs'] == args.epochs and \
                        resume['progress']['steps'] == steps:
                    scheduler.load_state_dict(resume['scheduler'])
                # else rebuilt above for the new length: its rate where the run stopped
                scheduler.step_update(num_updates=progress.num_updates)
            scaler.load_state_dict(resume['scaler'])
            if model_ema is not None:
                model_ema.load_state_dict(resume['model_ema'])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:  # another run's state, or edited
            raise UsageError(f'cannot resume: {os.path.join(out_dir, STATE_FILE)} is not the state of a {args.model} '
                             f'run with these options ({str(e).splitlines()[0]})') from None
        if 0 < progress.step < steps:  # stopped mid-training (not in validation): its RNG goes on
            rng_state = resume['rng'][ctx.rank]
            if model_ema is not None and resume.get('model_ema_buffers'):  # absent in states of earlier versions
                with torch.no_grad():
                    for name, buffer in model_ema.module.named_buffers():
                        buffer.copy_(resume['model_ema_buffers'][ctx.rank][name])

    train_model = model
    if ctx.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
    if args.compile:
        train_model = torch.compile(train_model)

    # -- from here on files are written (rank 0 only)
    if ctx.distributed:
        dist.barrier()  # every rank has checked the output directory before rank 0 fills it
    if ctx.primary:
        try:
            # created here unless it existed at the start: of two runs started into one new directory, one stops
            os.makedirs(out_dir, exist_ok=out_existed)
        except FileExistsError:
            raise UsageError(f'output directory {out_dir} was created by another run meanwhile') from None
        except OSError as e:
            raise UsageError(f'cannot create the run directory {out_dir}: {e.strerror or e}') from None
        metrics_path = os.path.join(out_dir, METRICS_FILE)
        if resume is not None:
            _truncate_metrics(metrics_path, progress.epoch)
            if progress.best_epoch and not os.path.isdir(os.path.join(out_dir, BEST_DIR)):
                _print(f'note: {os.path.join(out_dir, BEST_DIR)} (epoch {progress.best_epoch}, the best so far) is '
                       f'missing; it is written again only when a later epoch does better')
        _print(f'training {args.model} on {splits.description}: {len(splits.train)} train / {len(splits.val)} '
               f'validation images, {num_classes} classes, {data_config["input_size"][1]}px, {num_epochs} epochs '
               f'of {steps} steps x {args.batch_size * ctx.world_size} images; writing to {out_dir}')

    def save(stopped_mid_epoch: bool) -> None:
        rng = [_rng_state()] if stopped_mid_epoch else []
        ema_buffers = []  # of each process: until the epoch's end averages them, each EMA's follow its own batches
        if ctx.distributed and stopped_mid_epoch:
            rng = [None] * ctx.world_size
            dist.all_gather_object(rng, _rng_state())
            if model_ema is not None:
                ema_buffers = [None] * ctx.world_size
                dist.all_gather_object(ema_buffers, {k: b.cpu() for k, b in model_ema.module.named_buffers()})
        if not ctx.primary:
            return
        export_model(model, out_dir, splits.class_names, data_config)
        if model_ema is not None:
            export_model(model_ema.module, os.path.join(out_dir, EMA_DIR), splits.class_names, data_config)
        state = {
            'version': STATE_VERSION,
            'args': {k: v for k, v in vars(args).items() if k not in ('func',)},
            'model': model.state_dict(),
            'model_ema': model_ema.state_dict() if model_ema is not None else None,
            'optimizer': optimizer.state_dict(),
            'probe_generator': _probe_generator_state(optimizer),
            'scheduler': scheduler.state_dict() if scheduler is not None else None,
            'scaler': scaler.state_dict(),
            'progress': dataclasses.asdict(progress),
            'rng': rng,
            'model_ema_buffers': ema_buffers,
            'class_names': splits.class_names,
        }
        atomic_write(os.path.join(out_dir, STATE_FILE), lambda tmp: torch.save(state, tmp))

    with _GracefulStop(ctx) as stop:
        for epoch in range(progress.epoch, num_epochs):
            if progress.step < steps:
                stopped = _train_epoch(
                    train_model, model, frozen, train_loader, sampler, epoch, num_epochs, progress, rng_state, args,
                    ctx, optimizer, scheduler, scaler, autocast, train_loss_fn, model_ema, stop)
                rng_state = None
                if stopped:
                    save(stopped_mid_epoch=True)
                    return _interrupted(out_dir, epoch, progress, steps, ctx)

            if ctx.distributed and not args.sync_bn:
                distribute_bn(model, ctx.world_size, reduce=True)
                if model_ema is not None:  # its statistics follow each rank's own batches too
                    distribute_bn(model_ema.module, ctx.world_size, reduce=True)
            eval_kwargs = dict(device=device, autocast=autocast, channels_last=args.channels_last, ctx=ctx, stop=stop)
            metrics = evaluate(model, val_loader, desc=f'epoch {epoch + 1}/{num_epochs} validate', **eval_kwargs)
            ema_metrics = None
            if metrics is not None and model_ema is not None:
                ema_metrics = evaluate(
                    model_ema.module, val_loader, desc=f'epoch {epoch + 1}/{num_epochs} validate EMA', **eval_kwargs)
            if metrics is None or (model_ema is not None and ema_metrics is None):
                # stopped during validation: training of this epoch is kept, validation redone on resume
                save(stopped_mid_epoch=True)
                return _interrupted(out_dir, epoch, progress, steps, ctx)

            loss_sum, top1_sum, count = progress.train_sums
            record = {
                'epoch': epoch + 1,
                'lr': _lr(optimizer),
                'train_loss': loss_sum / count,
                'train_top1': top1_sum / count,
                **{f'val_{k}': v for k, v in metrics.items()},
                **({f'ema_val_{k}': v for k, v in ema_metrics.items()} if ema_metrics else {}),
            }
            scored = ema_metrics or metrics
            improved = scored['top1'] > progress.best_top1
            if improved:
                progress.best_top1, progress.best_epoch = scored['top1'], epoch + 1
            progress.epoch, progress.step, progress.train_sums = epoch + 1, 0, (0., 0., 0.)
            if ctx.primary:
                if improved:
                    export_model(model_ema.module if ema_metrics else model, os.path.join(out_dir, BEST_DIR),
                                 splits.class_names, data_config)
                _append_line(metrics_path, json.dumps(record))
                summary = (f'epoch {epoch + 1}/{num_epochs}: train loss {record["train_loss"]:.4f} '
                           f'top-1 {record["train_top1"]:.2f}% | val loss {metrics["loss"]:.4f} '
                           f'top-1 {metrics["top1"]:.2f}% top-5 {metrics["top5"]:.2f}%')
                if ema_metrics:
                    summary += f' | EMA top-1 {ema_metrics["top1"]:.2f}%'
                _print(summary)
            save(stopped_mid_epoch=False)

    if ctx.primary:
        best = os.path.join(out_dir, BEST_DIR)
        _print(f'done: best validation top-1 {progress.best_top1:.2f}% at epoch {progress.best_epoch}; '
               f'weights in {best} (use --model local-dir:{best})')
    return 0


def _lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the unscaled groups (with --layer-decay, the head's; group 0 is the stem's)."""
    return max(group['lr'] for group in optimizer.param_groups)


def _check_creatable(directory: str) -> None:
    """UsageError unless `directory`, or where it does not exist its nearest existing parent, is a writable
    directory."""
    parent = os.path.abspath(directory)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        problem = 'not a directory' if not os.path.isdir(parent) else 'not writable'
        raise UsageError(f'cannot create the run directory {directory}: {parent} is {problem}')


def _interrupted(out_dir: str, epoch: int, progress: _Progress, steps: int, ctx: _Dist) -> int:
    if ctx.primary:
        _print(f'interrupted in epoch {epoch + 1} after {progress.step}/{steps} steps; checkpoint saved in {out_dir}; '
               f'continue with: timm-coordatt train --resume {out_dir}')
    return 130


def _append_line(path: str, line: str) -> None:
    """`line` added to the text file `path`, atomically: the file is written anew (one line an epoch)."""
    existing = Path(path).read_text(encoding='utf-8') if os.path.isfile(path) else ''
    write_text(path, existing + line + '\n')


def _truncate_metrics(path: str, epochs_done: int) -> None:
    """Drop records of epochs the resumed state has not finished (written just before an interruption)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                epoch = int(json.loads(line)['epoch'])
            except (ValueError, TypeError, KeyError):
                raise UsageError(f'cannot resume: line {number} of {path} is not an epoch\'s record '
                                 f'({line.strip()[:80]!r}; expected JSON with an "epoch"): remove it') from None
            if epoch <= epochs_done:
                kept.append(line)
    write_text(path, ''.join(kept))


def _train_epoch(
        train_model, model, frozen, loader, sampler, epoch, num_epochs, progress, rng_state, args, ctx,
        optimizer, scheduler, scaler, autocast, loss_fn, model_ema, stop) -> bool:
    """One epoch from `progress.step` on; True if stopped early (progress then says where)."""
    _seed_epoch(args.seed, epoch, ctx.rank)
    sampler.set_epoch(epoch)
    if hasattr(loader.dataset, 'set_epoch'):
        loader.dataset.set_epoch(epoch)  # the embedded task draws new images every epoch
    _train_mode(train_model, frozen)
    steps = len(loader)
    batches = iter(loader)
    # resuming mid-epoch: the same batches, drawn and discarded, then the RNG as it was at the stop,
    # so the remaining steps see exactly the data and randomness they would have seen
    for _ in range(progress.step):
        next(batches)
    if rng_state is not None:
        _set_rng_state(rng_state)

    loss_sum, top1_sum, count = progress.train_sums
    global_batch = args.batch_size * ctx.world_size
    # compiled graphs recompute on their own terms
    recompute_ca = bool(args.recompute_ca) and not args.compile
    desc = f'epoch {epoch + 1}/{num_epochs} train'
    with _progress_bar(total=steps, initial=progress.step, desc=desc, disable=not ctx.primary) as bar:
        rate = AverageMeter()
        for step in range(progress.step, steps):
            start = time.perf_counter()
            x, y = next(batches)
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(), recompute_ca_outputs() if recompute_ca else contextlib.nullcontext():
                output = train_model(x)
                loss = loss_fn(output, y)
            loss_value = loss.item()  # one device sync per step, shared by the check and the statistics
            if not math.isfinite(loss_value):
                raise UsageError(f'the training loss is {loss_value} at epoch {epoch + 1} step {step + 1}; '
                                 f'try a lower --lr')
            optimizer.zero_grad(set_to_none=True)
            # second-order optimizers (adahessian) differentiate the gradients again, as in timm's train.py
            scaler.scale(loss).backward(create_graph=getattr(optimizer, 'is_second_order', False))
            if args.clip_grad is not None:
                scaler.unscale_(optimizer)
                dispatch_clip_grad(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            progress.num_updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=progress.num_updates)
            if model_ema is not None:
                model_ema.update(model, step=progress.num_updates)

            # the step's statistics and the stop flag in one reduction: every rank logs global numbers
            # and all stop at the same step, whichever of them got the signal
            top1 = accuracy(output.detach(), y, topk=(1,))[0]
            stats = torch.tensor([loss_value * x.shape[0], top1.item() * x.shape[0], x.shape[0], stop.flag],
                                 dtype=torch.float64)
            if ctx.distributed:
                stats = stats.to(ctx.device)
                dist.all_reduce(stats)
                stats = stats.cpu()
            loss_sum, top1_sum, count = loss_sum + stats[0].item(), top1_sum + stats[1].item(), count + stats[2].item()
            progress.step = step + 1
            progress.train_sums = (loss_sum, top1_sum, count)
            rate.update(global_batch / (time.perf_counter() - start))
            bar.set_postfix(loss=f'{loss_sum / count:.3f}', top1=f'{top1_sum / count:.1f}',
                            img_s=f'{rate.avg:.0f}', lr=f'{_lr(optimizer):.2e}', refresh=False)
            bar.update(1)
            if stats[3] > 0:
                return True
    return False


# ---------------------------------------------------------------------------------------------
# validate / predict

def _eval_model(args: argparse.Namespace) -> Tuple[nn.Module, torch.device]:
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f'--device {args.device!r}: {e}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {args.device}: CUDA is not available')
    if args.pretrained and args.checkpoint:
        raise UsageError('--pretrained and --checkpoint both give weights; pass one of them')
    if args.use_ema and not args.checkpoint:
        raise UsageError('--use-ema picks the EMA weights of a --checkpoint file, and no --checkpoint was given')
    check_model_kwargs(args.model_kwargs, args.command, classes_from="the weights' number of classes")
    model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, use_ema=args.use_ema,
                         **args.model_kwargs)
    classes = getattr(model, 'num_classes', None)
    if not classes:  # features_only in --model-kwargs; a headless local-dir: model
        raise UsageError(f'{args.command} needs class scores, but {args.model} has no classifier '
                         f'({"a features_only model" if classes is None else "num_classes=0"}); '
                         f'expected a model with a head')
    warn_of_random_weights(args.model, args.pretrained, args.checkpoint)
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, device


def _eval_data_config(model: nn.Module, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """The model's eval data config at `--img-size`; UsageError for a size the model cannot take (a ViT's fixed
    patch grid, say), found by one forward of a blank image rather than a traceback in the first batch."""
    data_config = resolve_data_config({'img_size': args.img_size}, model=model)
    if args.img_size is not None:
        try:
            with torch.no_grad():
                model(torch.zeros(1, *data_config['input_size'], device=device))
        except (AssertionError, RuntimeError, ValueError) as e:
            raise UsageError(f'{args.model} cannot take --img-size {args.img_size} '
                             f'({type(e).__name__}: {e}); expected a size the model accepts') from None
    return data_config


def _class_map(model: nn.Module, classes: Sequence[str], root: str) -> Dict[str, int]:
    """Folder name -> output index: by the model's label names when they name the folders, else in order (a
    model with class names of its own must have some of the folders')."""
    names = label_names(model)
    indices = _matching(classes, names or ())
    if indices and len(indices) == len(classes):
        return indices
    if indices:
        unknown = [name for name in classes if name not in indices]
        raise UsageError(f'class folders of {root} that the model has no output for: {", ".join(unknown[:10])}')
    if names and model.pretrained_cfg.get('label_names'):  # named classes of its own (a `train` run's), not ImageNet's
        raise UsageError(f'none of the class folders of {root} ({_names(list(classes))}) is a class of the model '
                         f'({_names(list(names))})')
    if len(classes) > model.num_classes:
        raise UsageError(
            f'{root} has {len(classes)} class folders but the model has {model.num_classes} outputs')
    return _indices(classes)


def validate(args: argparse.Namespace) -> Dict[str, Any]:
    """Loss, top-1 and top-5 of a model on an ImageFolder (or the embedded task), as `validate` reports them."""
    _check_minimums(args, {**_EVAL_MINIMUMS, 'grid': 2, 'grid_val_samples': 1, 'workers': 0})
    root = classes = None
    if args.data_dir is not None:  # the data first: checking it is cheaper than building the model
        root = _split_dir(args.data_dir, _VAL_DIRS) if os.path.isdir(args.data_dir) else None
        train_dir = None if root else _split_dir(args.data_dir, _TRAIN_DIRS) if os.path.isdir(args.data_dir) else None
        if train_dir:
            raise UsageError(f'{args.data_dir} has a training folder ({train_dir}) but no validation folder '
                             f'({"/".join(_VAL_DIRS)}); pass --data-dir the folder of the images to validate on')
        root = root or args.data_dir
        classes = check_image_folder(root)
    model, device = _eval_model(args)
    data_config = _eval_data_config(model, args, device)
    img_size = data_config['input_size'][-1]
    if args.data_dir is None:
        if model.num_classes != args.grid ** 2:
            raise UsageError(
                f'the embedded {args.grid}x{args.grid} grid task has {args.grid ** 2} classes but the model has '
                f'{model.num_classes} outputs; pass --data-dir or a model trained on the task')
        dataset = _grid_task('validation', args.grid_val_samples, img_size, args.grid)
        data_config['crop_pct'] = 1.0  # the label is where the target is in the full image
    else:
        dataset = _image_folder(root, _class_map(model, classes, root))
    dataset.transform = _upright_first(create_transform(**data_config, is_training=False))
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=device.type == 'cuda')
    autocast, _ = _autocast(device, args.amp, args.amp_dtype)
    metrics = evaluate(model, loader, device, autocast=autocast, channels_last=args.channels_last)
    return {'model': args.model, 'checkpoint': args.checkpoint, 'img_size': img_size,
            'crop_pct': data_config['crop_pct'], 'interpolation': data_config['interpolation'], **metrics}


# what predict finds in a folder besides the formats of timm's image folders (.png, .jpg, .jpeg)
def _image_files(paths: Sequence[str]) -> List[str]:
    extensions = _image_extensions()
    files, missing = [], []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path)
                            if _is_data(f) and os.path.splitext(f)[1].lower() in extensions)
        elif os.path.isfile(path):
            files.append(path)
        else:
            missing.append(path)
    if missing:
        raise UsageError(f'no such file or directory: {", ".join(missing)}')
    if not files:
        raise UsageError(f'no image files in {", ".join(paths)}: expected files ending in '
                         f'{", ".join(sorted(extensions))} (a folder\'s own, not those of the folders in it)')
    return files


def predict(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Top-k (label, probability) for each image file (or each image in a directory) of `args.images`.

    Images are read a batch at a time; an unreadable one is reported with the others at the end (no results).
    """
    _check_minimums(args, {**_EVAL_MINIMUMS, 'topk': 1})
    files = _image_files(args.images)
    model, device = _eval_model(args)
    data_config = _eval_data_config(model, args, device)
    transform = create_transform(**data_config, is_training=False)
    names = label_names(model, descriptions=True)
    k = min(args.topk, model.num_classes)
    autocast, _ = _autocast(device, args.amp, args.amp_dtype)
    results, bad = [], []
    with torch.no_grad():
        for start in range(0, len(files), args.batch_size):
            batch_files, images = [], []
            for path in files[start:start + args.batch_size]:
                try:
                    with Image.open(path) as img:
                        images.append(transform(to_rgb(upright(img))))
                    batch_files.append(path)
                except Exception as e:
                    bad.append(f'{path} ({type(e).__name__}: {e})')
            if bad:  # no more inference: the run ends in an error
                continue
            x = torch.stack(images).to(device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                probs = model(x).float().softmax(dim=-1)
            top = probs.topk(k, dim=-1)
            for i, (p, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                results.append({'file': batch_files[i], 'predictions': [
                    {'index': j, 'label': names[j] if names else str(j), 'probability': q} for q, j in zip(p, idx)]})
    if bad:
        raise UsageError('cannot read image file(s):\n  ' + '\n  '.join(bad))
    return results
