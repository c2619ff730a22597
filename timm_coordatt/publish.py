""" Publish a converted or fine-tuned model folder to a Hugging Face Hub repository.

A publishable folder is what `timm-coordatt convert` or timm's `save_for_hf(...,
safe_serialization=True)` writes: `config.json` + `model.safetensors`, optionally `README.md`.
`publish` checks that the folder loads into one of this package's models, adds a model card if
there is none (parameters, MACs, the paper's results, licence, citation, usage with
`import timm_coordatt`), then creates the repository and uploads the folder with huggingface_hub.
"""
import re
import sys
from pathlib import Path
from typing import Optional, Union

import timm
from huggingface_hub import CommitInfo, HfApi, constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from timm.models._hub import HF_SAFE_WEIGHTS_NAME, generate_readme
from torch import nn

from .complexity import count_complexity
from .coordinate_attention import CoordAttention
from .paper import CA_PAPER, PAPERS
from .pretrained import list_package_models
from .training import num_classes_once, write_text

__all__ = ['PublishError', 'model_card', 'publish']

UPLOAD_FILES = ('config.json', HF_SAFE_WEIGHTS_NAME, 'README.md')

# ImageNet-1k, 224x224, as reported in the CA paper (coordatt.md section 3)
PAPER_TABLE = """\
ImageNet-1k results reported in the Coordinate Attention paper (224x224 input):

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

With transformers (its timm wrapper builds the model with timm, so the same import comes first; without it
transformers reports the architecture as "not supported in your version of timm", where the import is what
is missing):

```python
import timm_coordatt  # registers the Coordinate Attention models with timm
from transformers import pipeline

classifier = pipeline('image-classification', model='{repo_id}')
print(classifier('image.jpg'))
```
"""


# what the card's front matter lists as datasets: Hub dataset ids (a free-form name goes into the text only)
_DATASET_ID = re.compile(r'[A-Za-z0-9][\w.-]*(/[\w.-]+)?')
# the Hub repositories a model card tells its readers to load
_LOADED_REPOS = re.compile(r"""create_model\(\s*['"]hf-hub:([^'"@]+)""")


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
    with_ca = any(isinstance(m, CoordAttention) for m in model.modules())
    paper_ids = cfg.get('paper_ids') or (CA_PAPER if with_ca else ())
    papers = [PAPERS[i] for i in ((paper_ids,) if isinstance(paper_ids, str) else paper_ids) if i in PAPERS]
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
    }
    if papers:
        details['Papers'] = {paper.title: paper.url for paper in papers}
    if dataset:
        details['Dataset' if _DATASET_ID.fullmatch(dataset) else 'Training data'] = dataset
    if cfg.get('origin_url'):
        details['Original code'] = cfg['origin_url']
    card = dict(
        # no `transformers` tag (timm's default): the Hub's transformers snippet would leave out the import
        tags=['image-classification', 'timm', 'timm-coordatt'] + (['coordinate-attention'] if with_ca else []),
        license=cfg.get('license') or 'mit',
        description=description or (
            f'`{arch}`: an image classification model{" with Coordinate Attention" if with_ca else ""} for timm.'),
        details=details,
        usage=USAGE.replace('{repo_id}', repo_id),
        comparison=PAPER_TABLE,
        citation=[paper.bibtex for paper in papers] + [TIMM_CITATION],
    )
    return generate_readme(card, repo_id.split('/')[-1])


def repo_id_error(repo_id: str) -> Optional[str]:
    """Why `repo_id` is not a Hub model repository id <user or org>/<name>, or None where it is one."""
    try:
        validate_repo_id(repo_id)
        if repo_id.count('/') != 1:
            raise HFValidationError('expected <user or org>/<name>')
    except HFValidationError as e:
        return f'expected a Hub repository id <user or org>/<name>, got {repo_id!r} ({e})'
    return None


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
    it first (edit it and publish again to change it), and a config.json that repeats `num_classes` in
    `model_args` is rewritten with it once (`num_classes_once`). Only the files above are uploaded. The Hub
    server is huggingface_hub's (`HF_ENDPOINT`), the token `token` or the saved/`HF_TOKEN` one.
    """
    folder = Path(folder)
    error = repo_id_error(repo_id)  # before anything is written or sent: the model card names the repository
    if error:
        raise PublishError(error)
    if token == '':  # huggingface_hub would send it as an illegal header
        raise PublishError('expected a Hub token (hf_...), got an empty one; leave it out to use HF_TOKEN or the '
                           'saved login')
    if not folder.is_dir():
        raise PublishError(f'{folder} is not a folder; expected a folder written by `timm-coordatt convert` or '
                           f"timm's save_for_hf(model, folder, safe_serialization=True).")
    readme = folder / 'README.md'
    if readme.is_file():  # written for another repository (say, by an earlier publish or convert's default)
        other = sorted({r for r in _LOADED_REPOS.findall(readme.read_text(encoding='utf-8', errors='replace'))
                        if r.lower() != repo_id.lower()})
        if other:
            raise PublishError(
                f"{readme} tells its readers to load 'hf-hub:{other[0]}', but the folder is being published to "
                f"'{repo_id}': edit it, delete it to have a model card written for '{repo_id}', or convert again "
                f"with --repo-id {repo_id}.")
        if dataset is not None:
            print(f'warning: {readme} exists and is published as it is: the dataset {dataset!r} goes only into a '
                  f'model card that publish writes (edit the card, or delete it to have one written)', file=sys.stderr)
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

    num_classes_once(folder / 'config.json')  # as timm >= 1.0.31's save_for_hf repeats it, for transformers
    api = HfApi(token=token, library_name='timm_coordatt')
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
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
