""" Publish a converted or fine-tuned model folder to a Hugging Face Hub repository.

A publishable folder is what `timm-coordatt convert` or timm's `save_for_hf(...,
safe_serialization=True)` writes: `config.json` + `model.safetensors`, optionally `README.md`.
`publish` checks that the folder loads into one of this package's models, adds a model card if
there is none (parameters, MACs, the paper's results, licence, citation, usage with
`import timm_coordatt`), then creates the repository and uploads the folder with huggingface_hub.
"""
from pathlib import Path
from typing import Optional, Union

import timm
from huggingface_hub import CommitInfo, HfApi, constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from timm.models._hub import HF_SAFE_WEIGHTS_NAME, generate_readme
from torch import nn

from .complexity import count_complexity
from .pretrained import list_package_models
from .training import write_text

__all__ = ['PublishError', 'model_card', 'publish']

UPLOAD_FILES = ('config.json', HF_SAFE_WEIGHTS_NAME, 'README.md')

# ImageNet-1k, 224x224, as reported in the paper (coordatt.md section 3)
PAPER_TABLE = """\
ImageNet-1k results reported in the paper (224x224 input):

| Model | Params | M-Adds | Top-1 (%) |
|---|---|---|---|
| MobileNetV2 1.0 | 3.5M | 300M | 72.3 |
| MobileNetV2 + SE (r=24) | 3.89M | 300M | 73.5 |
| MobileNetV2 + CBAM | 3.89M | 300M | 73.6 |
| **MobileNetV2 + CA** | 3.95M | 310M | **74.3** |
| MobileNeXt 1.0 | 3.5M | 300M | 74.0 |
| MobileNeXt + SE | 3.89M | 300M | 74.7 |
| **MobileNeXt + CA** | 4.09M | 330M | **75.2** |
"""

CITATION = """\
@inproceedings{hou2021coordinate,
  title={Coordinate Attention for Efficient Mobile Network Design},
  author={Hou, Qibin and Zhou, Daquan and Feng, Jiashi},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={13713--13722},
  year={2021}
}"""

TIMM_CITATION = """\
@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}"""

USAGE = """\
The architecture comes from the `timm-coordatt` package: install it and import it before timm
builds the model (timm has no plugin discovery, so `hf-hub:` alone fails with `Unknown model`).

```python
import timm
import timm_coordatt  # registers the Coordinate Attention models with timm
import torch
from PIL import Image

model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))

img = Image.open('image.jpg').convert('RGB')
with torch.inference_mode():
    top5_prob, top5_idx = model(transform(img).unsqueeze(0)).softmax(-1).topk(5)
```
"""


class PublishError(ValueError):
    """The folder cannot be published; the message says what was expected and what was found."""


def model_card(
        model: nn.Module,
        repo_id: str,
        description: Optional[str] = None,
        dataset: Optional[str] = None,
) -> str:
    """README.md for `model` published as `repo_id`: metadata, stats, usage, the paper's table, citations."""
    cfg = model.pretrained_cfg
    arch = cfg['architecture']
    input_size = tuple(cfg['input_size'])
    stats = count_complexity(model, input_size)
    details = {
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': {
            'Params (M)': f'{stats.params / 1e6:.2f}',
            'MACs (M)': f'{stats.macs / 1e6:.1f}',
            'MACs + CA products (M)': f'{stats.macs_with_muls / 1e6:.1f}',
            'Image size': f'{input_size[1]} x {input_size[2]}',
            'Classes': str(model.num_classes),
        },
        'Papers': {cfg.get('paper_name') or 'Coordinate Attention for Efficient Mobile Network Design':
                   'https://arxiv.org/abs/2103.02907'},
    }
    if dataset:
        details['Dataset'] = dataset
    if cfg.get('origin_url'):
        details['Original'] = cfg['origin_url']
    card = dict(
        # no `transformers` tag (timm's default): transformers cannot build this architecture
        tags=['image-classification', 'timm', 'timm-coordatt', 'coordinate-attention'],
        license=cfg.get('license') or 'mit',
        description=description or f'`{arch}`: an image classification model with Coordinate Attention for timm.',
        details=details,
        usage=USAGE.replace('{repo_id}', repo_id),
        comparison=PAPER_TABLE,
        citation=[CITATION, TIMM_CITATION],
    )
    return generate_readme(card, repo_id.split('/')[-1])


def publish(
        folder: Union[str, Path],
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Upload model with timm-coordatt',
        create_pr: bool = False,
        dataset: Optional[str] = None,
) -> CommitInfo:
    """Upload `folder` (config.json, model.safetensors, README.md) to the Hub repository `repo_id`.

    The repository is created if needed. A folder without README.md gets a model card written into
    it first (edit it and publish again to change it). Only the files above are uploaded. The Hub
    server is huggingface_hub's (`HF_ENDPOINT`), the token `token` or the saved/`HF_TOKEN` one.
    """
    folder = Path(folder)
    try:  # before anything is written or sent: the model card names the repository
        validate_repo_id(repo_id)
        if repo_id.count('/') != 1:
            raise HFValidationError('expected <user or org>/<name>')
    except HFValidationError as e:
        raise PublishError(f'expected a Hub repository id <user or org>/<name>, got {repo_id!r} ({e})') from None
    if not folder.is_dir():
        raise PublishError(f'{folder} is not a folder; expected a folder written by `timm-coordatt convert` or '
                           f"timm's save_for_hf(model, folder, safe_serialization=True).")
    missing = [name for name in UPLOAD_FILES[:2] if not (folder / name).is_file()]
    if missing:
        raise PublishError(
            f"{folder} lacks {' and '.join(missing)}; expected a folder written by `timm-coordatt convert` or "
            f"timm's save_for_hf(model, folder, safe_serialization=True).")
    # load it as a user will, which proves the files fit an architecture of this package
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    except Exception as e:  # a broken config.json or weights file, an unknown architecture, weights that do not fit
        raise PublishError(f'{folder} does not load with timm: {type(e).__name__}: {e}') from e
    arch = model.pretrained_cfg['architecture']
    if arch not in list_package_models():
        raise PublishError(
            f"{folder} holds a '{arch}', not a model of timm_coordatt; publish it with timm's push_to_hf_hub.")

    api = HfApi(token=token, library_name='timm_coordatt')
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        readme = folder / 'README.md'
        if not readme.exists():  # once the repository exists, under the id the Hub gave it
            write_text(str(readme), model_card(model, repo_id, dataset=dataset))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=list(UPLOAD_FILES),
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
        )
    except HfHubHTTPError:
        raise  # the server's answer, which says what went wrong
    except Exception as e:  # the server not reached (the HTTP client's own errors, which vary by version)
        raise PublishError(f'cannot publish to {hf_constants.ENDPOINT}: {type(e).__name__}: {e}') from e
