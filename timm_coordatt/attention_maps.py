""" What Coordinate Attention looks at: the gates of CA blocks and a Grad-CAM view, as tensors and as a figure.

`attention_maps(model, x)` returns, for chosen CoordAttention blocks, the height gate `a_h`, the width gate
`a_w` and their product: exactly what each block multiplies its input by. They are read with forward
hooks; the model's forward is not changed. `grad_cam(model, x)` weighs the last stage's features by the
gradient of the top class (Grad-CAM, Selvaraju et al. 2017), which works for any CNN, so CA, SE and
no-attention models can be compared on the same image as the CA paper does.

    model = timm.create_model('mobilenetv2_ca', pretrained=True)
    x, config = load_image('cat.jpg', model)
    maps = attention_maps(model, x)          # {'blocks.1.1.se': GateMaps, ...}
    cam = grad_cam(model, x)
    fig = plot_attention_maps(x, config, maps, cam, top_channels=3)
    save_figure(fig, 'maps.png')
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from torch import nn

from timm.data import create_transform, resolve_data_config
from timm.models._manipulate import group_with_matcher

from ._modes import eval_mode, no_grad_checkpointing
from .coordinate_attention import CoordAttention
from .training import atomic_write, label_names, to_rgb, upright

__all__ = [
    'GateMaps', 'GradCam', 'ca_blocks', 'default_blocks', 'record_gates', 'attention_maps', 'grad_cam',
    'figure_format', 'load_image', 'model_input', 'read_image', 'plot_attention_maps', 'plot_grad_cam_comparison',
    'save_figure',
]

ALL_BLOCKS = 'all'


@dataclass(frozen=True)
class GateMaps:
    """The gates one CoordAttention block applied to a batch: its output is `x * a_h * a_w`."""
    name: str
    a_h: torch.Tensor  # (N, C, H, 1)
    a_w: torch.Tensor  # (N, C, 1, W)

    @property
    def resolution(self) -> Tuple[int, int]:
        return self.a_h.shape[-2], self.a_w.shape[-1]

    @property
    def product(self) -> torch.Tensor:
        """`a_h * a_w`, (N, C, H, W)."""
        return self.a_h * self.a_w

    def mean(self) -> torch.Tensor:
        """The product averaged over channels, (N, H, W)."""
        return self.product.mean(1)

    def top_channels(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The `k` channels whose product varies most over the image (largest spatial standard deviation).

        A channel with a nearly constant gate says nothing about position, so these are the most
        telling ones. Returns the channel indices (N, k) and their product maps (N, k, H, W).
        """
        num_chs = self.a_h.shape[1]
        if not 1 <= k <= num_chs:
            raise ValueError(f'top_channels expected 1 <= k <= {num_chs} (channels of {self.name}), got {k}')
        product = self.product
        idx = product.flatten(2).std(-1, correction=0).topk(k, dim=1).indices  # 1x1 gates: all 0, no warning
        return idx, product.gather(1, idx[..., None, None].expand(-1, -1, *product.shape[-2:]))


@dataclass(frozen=True)
class GradCam:
    """Grad-CAM of one layer: `relu(sum_c w_c * A_c)` with `w_c` the spatial mean of d score / d A_c."""
    layer: str
    cam: torch.Tensor  # (N, H, W), scaled to [0, 1] per image
    target: torch.Tensor  # (N,) class explained
    prob: torch.Tensor  # (N,) its softmax probability
    labels: Tuple[str, ...]  # (N,) its name (the model's label names, ImageNet's), or 'class <i>'


def ca_blocks(model: nn.Module) -> Dict[str, CoordAttention]:
    """Every CoordAttention module of `model` by module name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CoordAttention)}


def default_blocks(model: nn.Module) -> List[str]:
    """The last CoordAttention block of each stage.

    Stages are the coarse block groups of the model's `group_matcher` (timm's layer-decay grouping,
    e.g. `blocks.<i>` in EfficientNets, `stages.<i>` in MobileNeXt); a model without one gets every block.
    """
    names = list(ca_blocks(model))
    if not hasattr(model, 'group_matcher'):
        return names
    groups = group_with_matcher(((n, None) for n in names), model.group_matcher(coarse=True))
    return [group[-1] for _, group in sorted(groups.items())]


def _model_name(model: nn.Module) -> str:
    return getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__


def _resolve_blocks(model: nn.Module, blocks: Optional[Union[str, Sequence[str]]]) -> Dict[str, CoordAttention]:
    available = ca_blocks(model)
    if not available:
        raise ValueError(
            f'{_model_name(model)} has no CoordAttention blocks, so there are no CA maps to show; '
            f'grad_cam() (CLI: --compare) works for any CNN')
    names = [blocks] if isinstance(blocks, str) else blocks
    if names is None:
        names = default_blocks(model)
    elif list(names) == [ALL_BLOCKS]:
        names = list(available)
    elif ALL_BLOCKS in names:
        raise ValueError(f'{ALL_BLOCKS!r} picks every CoordAttention block and goes alone, got it with '
                         f'{", ".join(n for n in names if n != ALL_BLOCKS)}')
    else:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(
                f'not CoordAttention blocks of this model: {", ".join(unknown)}; '
                f'expected names among: {", ".join(available)}')
    return {n: available[n] for n in names}


@contextmanager
def record_gates(
        model: nn.Module,
        blocks: Optional[Union[str, Sequence[str]]] = None,
) -> Iterator[Dict[str, GateMaps]]:
    """Record the gates of CA blocks during the forward passes run inside the `with` block.

    Args:
        model: Any model with CoordAttention modules, in eval mode.
        blocks: Module names, `'all'`, or None for `default_blocks(model)`.

    Yields a dict, filled by each forward pass, of `GateMaps` by block name (the last pass wins).
    """
    maps: Dict[str, GateMaps] = {}

    def hook(name: str):
        # before the block runs: an in-place block (`inplace=True`) overwrites its input
        def fn(module: CoordAttention, args):
            if module.training:
                # recomputing the gates in training mode would update BatchNorm statistics a second time
                raise RuntimeError('record_gates needs the model in eval mode (call model.eval())')
            with torch.no_grad():
                a_h, a_w = module.gates(args[0])  # the block's own computation on its own input
            maps[name] = GateMaps(name, a_h, a_w)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in _resolve_blocks(model, blocks).items()]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


def attention_maps(
        model: nn.Module,
        x: torch.Tensor,
        blocks: Optional[Union[str, Sequence[str]]] = None,
) -> Dict[str, GateMaps]:
    """Gates of the chosen CA blocks for the batch `x` (N, 3, H, W), by block name in forward order.

    `blocks`: module names, `'all'`, or None for the last CA block of each stage (`default_blocks`).
    """
    # ordinary tensors, which the caller may edit in place, also when called in inference mode
    with eval_mode(model), record_gates(model, blocks) as maps, torch.inference_mode(False), torch.no_grad():
        model(x)
    return maps


def last_stage(model: nn.Module) -> str:
    """Module name of the model's deepest feature level (`feature_info[-1]`)."""
    feature_info = getattr(model, 'feature_info', None)
    if not feature_info:
        raise ValueError(f'{_model_name(model)} has no feature_info; pass the layer for Grad-CAM explicitly')
    return feature_info[-1]['module']


def grad_cam(
        model: nn.Module,
        x: torch.Tensor,
        target: Optional[int] = None,
        layer: Optional[str] = None,
) -> GradCam:
    """Grad-CAM of `layer` (default: the last stage) for class `target` (default: each image's top class).

    Works inside `torch.no_grad()` and `torch.inference_mode()` too: it turns gradients on for itself.
    """
    if getattr(model, 'num_classes', None) == 0:
        raise ValueError(f'Grad-CAM explains a class score, but {_model_name(model)} has no classifier '
                         f'(num_classes=0); expected a model with a classification head')
    layer = layer or last_stage(model)
    module = model.get_submodule(layer)
    store = {}
    handle = module.register_forward_hook(lambda m, args, output: store.update(features=output))
    # an input that needs grad keeps the graph even when the weights are frozen
    with eval_mode(model), no_grad_checkpointing(model), torch.inference_mode(False), torch.enable_grad():
        try:
            logits = model(x.detach().clone().requires_grad_())
        finally:
            handle.remove()
        if 'features' not in store:
            raise ValueError(f'Grad-CAM expected {layer!r} to run in the forward pass of {_model_name(model)}, '
                             f'but it was not called')
        features = store['features']
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f'Grad-CAM expected a (N, C, H, W) output from {layer!r}, got {got}')
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f'Grad-CAM expected class scores (N, classes) from {_model_name(model)}, got {got}')
        num_classes = logits.shape[-1]
        if target is None:
            targets = logits.argmax(-1)
        elif 0 <= target < num_classes:
            targets = torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
        else:
            raise ValueError(f'Grad-CAM target must be a class index in [0, {num_classes}), got {target}')
        score = logits.gather(1, targets[:, None]).sum()
        grads, = torch.autograd.grad(score, features)
        cam = F.relu((grads.mean((2, 3), keepdim=True) * features).sum(1)).detach()
        cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        prob = logits.detach().softmax(-1).gather(1, targets[:, None])[:, 0]
    names = label_names(model, descriptions=True)
    return GradCam(layer, cam, targets, prob, tuple(names[i] if names else f'class {i}' for i in targets.tolist()))


def read_image(path: Union[str, os.PathLike]) -> Image.Image:
    """The image file `path` as 8-bit RGB, upright as its EXIF orientation says; FileNotFoundError,
    IsADirectoryError or ValueError naming what cannot be read."""
    if os.path.isdir(path):
        raise IsADirectoryError(f'expected an image file, got the folder {path}')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image not found: {path}')
    try:
        with Image.open(path) as img:
            return to_rgb(upright(img))
    except UnidentifiedImageError as e:
        raise ValueError(f'{path} is not an image file PIL can read') from e
    except Image.DecompressionBombError as e:
        raise ValueError(f'{path}: {e}') from e
    except OSError as e:  # a damaged file (truncated, bad data)
        raise ValueError(f'{path} could not be read: {e}') from e


def model_input(img: Image.Image, model: nn.Module) -> Tuple[torch.Tensor, Dict]:
    """The RGB image `img` preprocessed as `model` expects (its own data config, eval transform): the
    (1, 3, H, W) input tensor and the data config used."""
    config = resolve_data_config(model=model)
    return create_transform(**config)(img).unsqueeze(0), config


def load_image(path: Union[str, os.PathLike], model: nn.Module) -> Tuple[torch.Tensor, Dict]:
    """`read_image(path)` preprocessed as `model` expects: the (1, 3, H, W) input tensor and the data config
    used."""
    return model_input(read_image(path), model)


def _display_image(x: torch.Tensor, config: Mapping) -> torch.Tensor:
    """Undo the normalisation of one (3, H, W) input: (H, W, 3) in [0, 1]."""
    mean = torch.tensor(config['mean'])[:, None, None]
    std = torch.tensor(config['std'])[:, None, None]
    return (x.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


def _overlay(ax, image: torch.Tensor, heat: torch.Tensor, title: str, scale: bool = True) -> None:
    """Show `heat` (h, w), upsampled to the image, over the image; min-max scaled unless `scale` is False."""
    heat = heat.detach().float().cpu()
    lo, hi = heat.min().item(), heat.max().item()
    if scale:
        heat = (heat - lo) / max(hi - lo, 1e-12)
    heat = F.interpolate(heat[None, None], size=image.shape[:2], mode='bilinear', align_corners=False)[0, 0]
    ax.imshow(image.numpy())
    ax.imshow(heat.numpy(), cmap='jet', alpha=0.5, vmin=0, vmax=1)
    # the spread too: a nearly constant map is drawn at full contrast, and its ends round alike
    ax.set_title(f'{title}\n[{lo:.4g}, {hi:.4g}] spread {hi - lo:.2g}' if scale else title, fontsize=8)
    ax.set_axis_off()


def _short(label: str) -> str:
    """First name of a WordNet-style description ('tabby, tabby cat' -> 'tabby'), cut to fit a title."""
    return label.split(',')[0][:28]


def plot_attention_maps(
        x: torch.Tensor,
        config: Mapping,
        maps: Mapping[str, GateMaps],
        cam: Optional[GradCam] = None,
        top_channels: int = 0,
        title: str = '',
        cell_size: float = 2.2,
) -> Figure:
    """One figure: a row per CA block with `a_h`, `a_w` and `a_h * a_w` averaged over channels, then the
    `top_channels` most position-selective channels of the product; a first row with the input and,
    if given, the Grad-CAM. Every map is min-max scaled over the image (its range is in the title).

    The figure is `cell_size * (3 + top_channels)` by `cell_size * (1 + len(maps))` inches.
    Only the first image of the batch is drawn.
    """
    if not maps:
        raise ValueError('plot_attention_maps expected at least one block of gate maps, got none')
    channels = min(m.a_h.shape[1] for m in maps.values())
    if not 0 <= top_channels <= channels:  # before a figure of 3 + top_channels columns is built
        raise ValueError(f'top_channels expected 0 <= k <= {channels} (the fewest channels of the blocks drawn), '
                         f'got {top_channels}')
    image = _display_image(x[0], config)
    ncols, nrows = 3 + top_channels, 1 + len(maps)
    # a Figure of its own, not pyplot's: files only, and no backend chosen for the caller's other figures
    fig = Figure(figsize=(cell_size * ncols, cell_size * nrows), layout='constrained')
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes[0]:
        ax.set_axis_off()
    axes[0, 0].imshow(image.numpy())
    axes[0, 0].set_title(f'input {image.shape[0]}x{image.shape[1]}', fontsize=8)
    if cam is not None:
        _overlay(axes[0, 1], image, cam.cam[0],
                 f'Grad-CAM {cam.layer}\n{_short(cam.labels[0])} ({cam.prob[0]:.2f})', scale=False)
    for row, (name, m) in zip(axes[1:], maps.items()):
        h, w = m.resolution
        head = f'{name} {h}x{w}'
        _overlay(row[0], image, m.a_h[0].mean(0), f'{head}\na_h (mean of {m.a_h.shape[1]} ch)')
        _overlay(row[1], image, m.a_w[0].mean(0), 'a_w (channel mean)')
        _overlay(row[2], image, m.mean()[0], 'a_h * a_w (channel mean)')
        if top_channels:
            idx, top = m.top_channels(top_channels)
            for ax, c, heat in zip(row[3:], idx[0].tolist(), top[0]):
                _overlay(ax, image, heat, f'a_h * a_w channel {c}')
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_grad_cam_comparison(
        views: Mapping[str, Tuple[torch.Tensor, Mapping, GradCam]],
        cell_size: float = 3.0,
) -> Figure:
    """Grad-CAM of several models side by side, one panel per model.

    `views`: model name -> (its preprocessed input, its data config, its `GradCam`). Each panel shows the
    model's own view of the image. The figure is `cell_size * len(views)` by `cell_size` inches.
    """
    if not views:
        raise ValueError('plot_grad_cam_comparison expected at least one model, got none')
    fig = Figure(figsize=(cell_size * len(views), cell_size), layout='constrained')
    axes = fig.subplots(1, len(views), squeeze=False)
    for ax, (name, (x, config, cam)) in zip(axes[0], views.items()):
        _overlay(ax, _display_image(x[0], config), cam.cam[0],
                 f'{name}\nGrad-CAM {cam.layer}\n{_short(cam.labels[0])} ({cam.prob[0]:.2f})', scale=False)
    return fig


MAX_PIXELS = 100_000_000  # a figure's raster at most: a mistyped dpi must not take all memory


def figure_format(path: Union[str, os.PathLike]) -> str:
    """The format a figure written to `path` takes (its extension's, PNG without one); ValueError or
    FileNotFoundError saying why no figure can be written there, before one is drawn."""
    path = os.fspath(path)
    if not path or os.path.isdir(path):
        raise ValueError(f'cannot write {path!r}: expected the name of an image file, got '
                         + ('a folder' if path else 'an empty name'))
    ext = os.path.splitext(path)[1][1:].lower() or 'png'
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise ValueError(f'cannot write {path}: expected a file name ending in one of '
                         f'{", ".join("." + f for f in sorted(formats))}, got .{ext}')
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f'cannot write {path}: no folder {directory}')
    return ext


def save_figure(fig: Figure, path: Union[str, os.PathLike], dpi: int = 100) -> None:
    """Write `fig` (figure size x dpi pixels, at most `MAX_PIXELS`) atomically, in the format
    `figure_format(path)` names."""
    path = os.fspath(path)
    ext = figure_format(path)
    width, height = (fig.get_size_inches() * dpi).round().astype(int).tolist()
    if width * height > MAX_PIXELS:
        raise ValueError(f'cannot write {path}: expected at most {MAX_PIXELS:,} pixels, got {width}x{height} '
                         f'at dpi {dpi}; use a lower dpi')
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=ext, dpi=dpi))
    except RuntimeError as e:  # a format whose backend needs a missing program (pgf: LaTeX)
        raise ValueError(f'cannot write {path}: {e}') from e
    except OSError as e:  # named after the file asked for, not the temporary one beside it
        raise type(e)(f'cannot write {path}: {e.strerror or e}') from e
