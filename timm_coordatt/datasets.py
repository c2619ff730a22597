""" An embedded, offline image-classification task whose labels depend on *where* things are.

`GridShapes` draws a `grid` x `grid` layout of cells. One cell holds the target, a plus sign in a
colour far from the background's; up to `grid**2 - 1` other cells hold faint distractors (a disc,
a circle, a square, a diagonal cross, a bar) in colours close to the background's, over a noisy
background of a random colour. Sizes and positions inside the cells are random. The label is the
index of the target's cell, row-major: a classifier has to find the target and know *where* it
is, which the global pooling of a classification network throws away.

Every image is a pure function of `(seed, split, epoch, index)`: the dataset needs no files or
network, is identical on every machine and process, and `set_epoch` draws fresh training images
every epoch (an endless supply, so the task is learnt rather than memorised).
"""
import numbers
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch.utils.data
from PIL import Image, ImageDraw

__all__ = ['GridShapes', 'DEFAULT_IMG_SIZE']

DEFAULT_IMG_SIZE = 48

_SPLITS = ('train', 'validation')
SHAPES = ('plus', 'disc', 'cross', 'square', 'circle', 'bar')


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour, width: int):
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == 'plus':
        draw.line((cx - r, cy, cx + r, cy), fill=colour, width=width)
        draw.line((cx, cy - r, cx, cy + r), fill=colour, width=width)
    elif shape == 'disc':
        draw.ellipse(box, fill=colour)
    elif shape == 'cross':
        draw.line(box, fill=colour, width=width)
        draw.line((cx - r, cy + r, cx + r, cy - r), fill=colour, width=width)
    elif shape == 'square':
        draw.rectangle(box, outline=colour, width=width)
    elif shape == 'circle':
        draw.ellipse(box, outline=colour, width=width)
    elif shape == 'bar':
        draw.line((cx - r, cy, cx + r, cy), fill=colour, width=width)
    else:
        raise ValueError(f'unknown shape {shape!r}')


class GridShapes(torch.utils.data.Dataset):
    """Find the bright plus sign among faint distractors: `grid**2` classes, one per cell (row-major).

    Args:
        split: 'train' or 'validation' (disjoint random streams).
        num_samples: Number of images in the split.
        img_size: Side of the square RGB images, in pixels.
        grid: Cells per side; the number of classes is `grid**2`.
        max_distractors: Each image has between 0 and this many distractors (uniformly), in random
            cells other than the target's; None for up to `grid**2 - 1`. Images with few distractors
            make the task learnable from scratch: they teach where things are before what the target is.
        target: The shape whose cell is the label, one of `SHAPES`.
        distractors: Shapes drawn as distractors, from `SHAPES` other than `target`.
        distractor_contrast: Range `[low, high)` of the distractors' difference from the background
            in every channel, integers with `0 <= low < high <= 256` (the target's is [80, 176)); the
            background noise has std 16.
        seed: Base seed; the same seed gives the same images everywhere.
        transform: Applied to each PIL image (e.g. timm's `create_transform`).
    """

    def __init__(
            self,
            split: str = 'train',
            num_samples: int = 6000,
            img_size: int = DEFAULT_IMG_SIZE,
            grid: int = 3,
            max_distractors: Optional[int] = None,
            target: str = 'plus',
            distractor_contrast: Tuple[int, int] = (24, 48),
            distractors: Sequence[str] = ('disc', 'circle', 'square', 'cross', 'bar'),
            seed: int = 0,
            transform: Optional[Callable] = None,
    ):
        if split not in _SPLITS:
            raise ValueError(f'GridShapes split must be one of {_SPLITS}, got {split!r}')
        if num_samples < 1:
            raise ValueError(f'GridShapes needs num_samples >= 1, got {num_samples}')
        if grid < 2:
            raise ValueError(f'GridShapes needs grid >= 2, got {grid}')
        if img_size < 8 * grid:
            raise ValueError(f'GridShapes needs img_size >= 8 * grid = {8 * grid} px to draw shapes, got {img_size}')
        if max_distractors is None:
            max_distractors = grid * grid - 1
        if not 0 <= max_distractors < grid * grid:
            raise ValueError(f'GridShapes needs 0 <= max_distractors < grid**2 = {grid * grid}, got {max_distractors}')
        if target not in SHAPES:
            raise ValueError(f'GridShapes target must be one of {SHAPES}, got {target!r}')
        if not distractors or any(d not in SHAPES or d == target for d in distractors):
            raise ValueError(
                f'GridShapes distractors must be shapes of {SHAPES} other than the target {target!r}, '
                f'got {distractors}')
        low, high = distractor_contrast
        if not all(isinstance(v, numbers.Integral) for v in (low, high)) or not 0 <= low < high <= 256:
            raise ValueError(f'GridShapes distractor_contrast must be integers 0 <= low < high <= 256 (levels from '
                             f'the background), got {tuple(distractor_contrast)}')
        if not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f'GridShapes seed must be an integer >= 0, got {seed}')
        self.split = split
        self.num_samples = num_samples
        self.img_size = img_size
        self.grid = grid
        self.max_distractors = max_distractors
        self.target = target
        self.distractor_contrast = tuple(distractor_contrast)
        self.distractors = tuple(distractors)
        self.seed = seed
        self.transform = transform
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a new set of `num_samples` images for `epoch`: training sees fresh images every epoch."""
        self.epoch = epoch

    @property
    def classes(self) -> List[str]:
        """Class names, `r{row}c{col}`, in label order."""
        return [f'r{r}c{c}' for r in range(self.grid) for c in range(self.grid)]

    @property
    def num_classes(self) -> int:
        return self.grid * self.grid

    def __len__(self) -> int:
        return self.num_samples

    def render(self, index: int) -> Tuple[Image.Image, int]:
        """The image and label of sample `index`, before `transform`."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f'GridShapes index {index} out of range for {self.num_samples} samples')
        rng = np.random.default_rng((self.seed, _SPLITS.index(self.split), self.epoch, index))
        size, grid = self.img_size, self.grid
        cell = size / grid

        background = rng.integers(0, 256, 3)
        # noise so that flat colour statistics carry no signal
        pixels = np.clip(background + rng.normal(0., 16., (size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, 'RGB')
        draw = ImageDraw.Draw(img)

        label = int(rng.integers(grid * grid))
        others = [k for k in range(grid * grid) if k != label]
        count = int(rng.integers(self.max_distractors + 1))
        cells = {label: self.target}
        for k in rng.choice(others, count, replace=False):
            cells[int(k)] = self.distractors[rng.integers(len(self.distractors))]
        width = max(1, round(cell / 10))
        for k, shape in cells.items():
            # a random size and a jitter inside the cell, so that only the cell is informative
            room = cell / 2 - width  # the largest half-size that stays inside the cell
            r = room * rng.uniform(0.55, 0.9)
            slack = room - r
            cx = (k % grid + 0.5) * cell + rng.uniform(-slack, slack)
            cy = (k // grid + 0.5) * cell + rng.uniform(-slack, slack)
            low, high = (80, 176) if shape == self.target else self.distractor_contrast
            offset = rng.integers(low, high, 3)
            # `low` to `high - 1` levels brighter or darker than the background in every channel,
            # in whichever direction(s) stay in range (wrapping round when neither does)
            up, down = background + offset <= 255, background - offset >= 0
            sign = np.where(up & down, rng.choice((-1, 1), 3), np.where(up | ~down, 1, -1))
            colour = (background + sign * offset) % 256
            _draw_shape(draw, shape, cx, cy, r, tuple(int(c) for c in colour), width)
        return img, label

    def __getitem__(self, index: int):
        img, label = self.render(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, label
