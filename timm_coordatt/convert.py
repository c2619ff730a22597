""" Convert the authors' MobileNetV2 + Coordinate Attention checkpoint into a timm Hub folder.

The authors' `mbv2_ca.py` names modules by position (`features.<i>.conv.<k>`), timm's
`mobilenetv2_ca` by role. The mapping is derived from the timm model's structure: `features.0`
is the stem (`conv_stem`, `bn1`), `features.1..17` are timm's blocks in order (the expansion-1
block is a `DepthwiseSeparableConv`, the others `InvertedResidual` with CA as `se`), `conv` is the
head (`conv_head`, `bn2`) and `classifier.1` the classifier.

`convert` refuses a checkpoint that does not map completely, verifies the converted model against
a forward pass written directly on the checkpoint in the authors' layout, and writes
`model.safetensors`, `config.json` (timm's `save_for_hf` format, loadable with `hf-hub:` and
`local-dir:`) and a model card into a new folder with a single rename.
"""
import argparse
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Union

import timm
import torch
import torch.nn.functional as F
from timm.models import save_for_hf
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models._helpers import clean_state_dict

from .hub import hub_id
from .pretrained import list_package_models, load_error
from .publish import model_card, repo_id_error
from .training import num_classes_once, use_default_mode

__all__ = ['ConversionError', 'load_checkpoint', 'authors_to_timm', 'convert']

# one block of the authors' model -> timm's names (the indices skip the parameter-free ReLU6s)
_DS_LAYOUT = {'conv.0': 'conv_dw', 'conv.1': 'bn1', 'conv.3': 'conv_pw', 'conv.4': 'bn2'}
_IR_LAYOUT = {
    'conv.0': 'conv_pw', 'conv.1': 'bn1', 'conv.3': 'conv_dw', 'conv.4': 'bn2',
    'conv.6.conv1': 'se.conv1', 'conv.6.bn1': 'se.bn1', 'conv.6.conv2': 'se.conv_h', 'conv.6.conv3': 'se.conv_w',
    'conv.7': 'conv_pwl', 'conv.8': 'bn3',
}
_STEM_HEAD = {
    'features.0.0': 'conv_stem', 'features.0.1': 'bn1', 'conv.0': 'conv_head', 'conv.1': 'bn2',
    'classifier.1': 'classifier',
}
# stride of features.1..17: the `s` of the authors' (t, c, n, s) table on the first block of each stage
_AUTHORS_STRIDES = (1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1)
_BN_EPS = 1e-5  # PyTorch's default, which the authors' model uses
_SHOW = 10  # keys listed per kind of problem in an error
# where training scripts keep the weights (timm's train.py, torchvision's references, the authors' script)
_WEIGHT_KEYS = ('state_dict', 'model')
_EMA_KEYS = ('state_dict_ema', 'model_ema')


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message says what was expected and what was found."""


def load_checkpoint(path: Union[str, Path], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The authors' state dict from `path` (bare, or under 'state_dict' / 'model', or with `use_ema` its EMA
    under 'state_dict_ema' / 'model_ema'; 'module.' prefixes removed).

    Loaded with `torch.load(weights_only=True)`, so a checkpoint that needs arbitrary unpickling is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f'Checkpoint {path} does not exist or is not a file.')
    try:
        # training scripts (timm's, the authors' ImageNet script) keep their arguments as a Namespace beside
        # the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # what a file that is not a checkpoint raises varies (KeyError, EOFError, ...)
        raise ConversionError(
            f'{path} is not a PyTorch checkpoint that torch.load(weights_only=True) can read (a state dict '
            f'of tensors, possibly wrapped in a dict of plain values): {load_error(e)}') from e
    expected = "a state dict of tensors, bare or under 'state_dict' / 'model' (an EMA of the weights under " \
               "'state_dict_ema' / 'model_ema', with --use-ema)"
    if not isinstance(checkpoint, dict):
        raise ConversionError(f'{path} holds a {type(checkpoint).__name__}, expected {expected}.')
    keys = _EMA_KEYS if use_ema else _WEIGHT_KEYS
    found = next((key for key in keys if isinstance(checkpoint.get(key), dict)), None)
    if found is None and use_ema:
        raise ConversionError(f"{path} holds no EMA weights ('state_dict_ema' / 'model_ema'); its top-level keys: "
                              f"{_shown([repr(k) for k in checkpoint])}. Convert its weights without --use-ema.")
    if found is not None:
        checkpoint = checkpoint[found]
    others = [k for k, v in checkpoint.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if others:
        raise ConversionError(f'{path} holds a dict whose entries {_shown([repr(k) for k in others])} are not tensors '
                              f'under names, expected {expected}.')
    return clean_state_dict(checkpoint)  # timm's: strips DDP 'module.' and torch.compile '_orig_mod.'


def _module_names(model: torch.nn.Module) -> Dict[str, str]:
    """Authors' module name -> timm module name, for every module of `model` with a state."""
    names = dict(_STEM_HEAD)
    blocks = [(f'blocks.{i}.{j}', block) for i, stage in enumerate(model.blocks) for j, block in enumerate(stage)]
    for index, (name, block) in enumerate(blocks, start=1):
        if isinstance(block, DepthwiseSeparableConv):
            layout = _DS_LAYOUT
        elif isinstance(block, InvertedResidual):
            layout = _IR_LAYOUT
        else:
            raise ConversionError(f"{name} of the target model is a {type(block).__name__}, which has no "
                                  "counterpart in the authors' model.")
        names.update({f'features.{index}.{a}': f'{name}.{b}' for a, b in layout.items()})
    return names


def _shown(items: List[str]) -> str:
    return ', '.join(items[:_SHOW]) + (f' and {len(items) - _SHOW} more' if len(items) > _SHOW else '')


def _listing(kind: str, items: List[str]) -> str:
    return f'{len(items)} {kind}: {_shown(items)}'


def authors_to_timm(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Rename the authors' `state_dict` to the names of `model` (a timm `mobilenetv2_*_ca`).

    Raises `ConversionError` listing missing keys, unexpected keys and shape mismatches (in the
    authors' names) unless every tensor of `model` gets exactly one tensor of the right shape.
    """
    names = _module_names(model)
    expected = model.state_dict()
    mapped, origin, unexpected = {}, {}, []
    for key, value in state_dict.items():
        module, _, param = key.rpartition('.')
        target = f'{names[module]}.{param}' if module in names else None
        if target not in expected:
            unexpected.append(key)
            continue
        mapped[target], origin[target] = value, key
    authors_names = {v: k for k, v in names.items()}
    missing = []
    for key in expected:
        if key not in mapped:
            module, _, param = key.rpartition('.')
            missing.append(f'{authors_names[module]}.{param}' if module in authors_names else key)
    mismatched = [
        f'{origin[k]} {tuple(v.shape)} (expected {tuple(expected[k].shape)})'
        for k, v in mapped.items() if v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = [
            _listing(kind, items) for kind, items in
            (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', mismatched)) if items]
        raise ConversionError(
            f"The checkpoint does not map completely onto timm's {model.pretrained_cfg['architecture']}: "
            f"{'; '.join(problems)}. Expected the state dict of the authors' MobileNetV2 + CA (mbv2_ca.py) "
            f"of the same width.")
    return mapped


def _bn(x: torch.Tensor, sd: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.batch_norm(
        x, sd[f'{name}.running_mean'], sd[f'{name}.running_var'], sd[f'{name}.weight'], sd[f'{name}.bias'],
        training=False, eps=_BN_EPS)


def _coord_attention(x: torch.Tensor, sd: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    y = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)
    y = F.hardswish(_bn(F.conv2d(y, sd[f'{name}.conv1.weight'], sd[f'{name}.conv1.bias']), sd, f'{name}.bn1'))
    y_h, y_w = torch.split(y, [h, w], dim=2)
    a_h = torch.sigmoid(F.conv2d(y_h, sd[f'{name}.conv2.weight'], sd[f'{name}.conv2.bias']))
    a_w = torch.sigmoid(F.conv2d(y_w.transpose(2, 3), sd[f'{name}.conv3.weight'], sd[f'{name}.conv3.bias']))
    return x * a_w * a_h


def _authors_forward(sd: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of the authors' MobileNetV2 + CA (eval mode) computed directly on their state dict."""
    def dw(x, weight, stride):
        return F.conv2d(x, weight, stride=stride, padding=1, groups=weight.shape[0])

    x = F.relu6(_bn(F.conv2d(x, sd['features.0.0.weight'], stride=2, padding=1), sd, 'features.0.1'))
    for index, stride in enumerate(_AUTHORS_STRIDES, start=1):
        p = f'features.{index}.conv'
        if f'{p}.6.conv1.weight' in sd:  # expansion block: pw, dw, CA, pw-linear
            y = F.relu6(_bn(F.conv2d(x, sd[f'{p}.0.weight']), sd, f'{p}.1'))
            y = F.relu6(_bn(dw(y, sd[f'{p}.3.weight'], stride), sd, f'{p}.4'))
            y = _bn(F.conv2d(_coord_attention(y, sd, f'{p}.6'), sd[f'{p}.7.weight']), sd, f'{p}.8')
        else:  # expansion 1: dw, pw-linear
            y = F.relu6(_bn(dw(x, sd[f'{p}.0.weight'], stride), sd, f'{p}.1'))
            y = _bn(F.conv2d(y, sd[f'{p}.3.weight']), sd, f'{p}.4')
        x = x + y if stride == 1 and x.shape[1] == y.shape[1] else y
    x = F.relu6(_bn(F.conv2d(x, sd['conv.0.weight']), sd, 'conv.1'))
    return F.linear(x.mean((2, 3)), sd['classifier.1.weight'], sd['classifier.1.bias'])


@torch.no_grad()
def _self_check(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Raise unless `model` (in eval mode) and the authors' layout give the same logits for two input sizes."""
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    gen = torch.Generator().manual_seed(0)
    for size in ((112, 112), (96, 128)):  # small, non-square: every weight and both CA directions take part
        x = torch.randn(1, 3, *size, generator=gen)
        out, ref = model(x), _authors_forward(state_dict, x)
        diff = (out - ref).abs().max().item()
        # float32 rounding of the two formulations stays near 1e-6 of the logits' scale; a wrong mapping is O(1)
        if not diff <= 1e-4 * max(1.0, ref.abs().max().item()):
            raise ConversionError(
                f'Self-check failed: the converted model and the authors\' layout differ by {diff:.3g} in the '
                f'logits for a {size[0]}x{size[1]} input; the mapping does not fit this checkpoint.')


def convert(
        checkpoint: Union[str, Path],
        out_dir: Union[str, Path],
        model_name: str = 'mobilenetv2_ca',
        repo_id: Optional[str] = None,
        use_ema: bool = False,
) -> Path:
    """Convert the authors' checkpoint into a new folder `out_dir` for timm's `model_name`; returns `out_dir`.

    The folder gets `model.safetensors`, `config.json` and `README.md` (a model card whose usage
    names `repo_id`, by default, for an ImageNet-1k head, this package's Hub repository for
    `<model_name>.in1k`; other heads need `repo_id`). With `use_ema`, the checkpoint's EMA weights are
    converted. The folder is written to a temporary folder beside `out_dir` and renamed into place, so
    a failure leaves nothing.
    """
    out_dir = Path(out_dir)
    convertible = [n for n in list_package_models() if n.startswith('mobilenetv2_')]
    if model_name not in convertible:
        raise ConversionError(f"Expected model_name to be one of {', '.join(convertible)}, got '{model_name}'.")
    if out_dir.exists():
        raise ConversionError(f'{out_dir} already exists; give a new folder to write the converted model to.')
    error = None if repo_id is None else repo_id_error(repo_id)  # the model card names it
    if error:
        raise ConversionError(error)
    # where the folder goes, checked before the conversion: a folder made in its nearest existing parent
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as e:
        raise ConversionError(f'cannot create {out_dir}: cannot write in {parent} ({e.strerror or e})') from None
    state_dict = load_checkpoint(checkpoint, use_ema=use_ema)
    classifier = state_dict.get('classifier.1.weight')
    num_classes = classifier.shape[0] if classifier is not None and classifier.dim() == 2 else 1000
    if repo_id is None and num_classes != 1000:
        raise ConversionError(
            f"The checkpoint's classifier has {num_classes} classes, not ImageNet-1k's 1000: give the Hub repository "
            f"its model card will load it from (repo_id, --repo-id <user or org>/<name>).")
    model = timm.create_model(model_name, num_classes=num_classes).eval()
    model.load_state_dict(authors_to_timm(state_dict, model))
    _self_check(model, state_dict)
    # a checkpoint in the authors' layout, not necessarily their released weights
    card = model_card(
        model, repo_id or hub_id(f'{model_name}.in1k'), dataset='ImageNet-1k' if num_classes == 1000 else None,
        description=(
            f"MobileNetV2 with Coordinate Attention as timm's `{model_name}`, converted with `timm-coordatt convert` "
            f"from a checkpoint of the authors' `mbv2_ca.py` (their released ImageNet-1k weights are reported at "
            f"74.3% top-1 for width 1.0); the conversion checks that both give the same logits."))

    tmp = out_dir.parent / f'.{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp'
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # not mkdtemp: the folder keeps the user's umask once renamed into place
    except OSError as e:
        raise ConversionError(f'cannot create {out_dir}: {e.strerror or e}') from e
    try:
        save_for_hf(model, tmp, safe_serialization=True)
        num_classes_once(tmp / 'config.json')
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        for path in tmp.iterdir():
            use_default_mode(path)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
