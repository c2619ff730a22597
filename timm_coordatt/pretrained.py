""" Pretrained weights of this package's models: where they come from, and clear errors when they cannot load.

timm resolves `pretrained=True` from the model's pretrained config (`hf-hub:` / `local-dir:` model
names, then `state_dict`, `file`, `hf_hub_id`, `url`). Two things go wrong for a plugin:

- A config without a weight source fails with a message that does not say which models do have
  weights or how to bring your own.
- timm's Hub loader asks for `model.safetensors` and, on any `EntryNotFoundError`, falls back to
  `pytorch_model.bin`. In huggingface_hub >= 1.0 offline mode and unreachable servers raise a
  subclass of it, so the real cause is swallowed and the user sees a 404 for a file nobody published.

Every builder of this package therefore calls `prepare_pretrained` first. It raises for models
without weights and fetches Hub weights itself, with huggingface_hub's own download into the
normal Hub cache. The downloaded file is checked (sha256 against the server's ETag, safetensors
structure), bad copies are evicted from the cache, and timm gets the verified local file through
its `file` source; a filter reports weights of the wrong shapes or names in a few lines. Failures raise
`PretrainedWeightsError` naming the cause.
"""
import argparse
import contextlib
import hashlib
import os
import pickle
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import timm
from huggingface_hub import _CACHED_NO_EXIST, constants as hf_constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open
from timm.models import load_state_dict, model_entrypoint
from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, hf_split
import torch
from torch import nn

from .hub import HUB_ORG

__all__ = [
    'PretrainedWeightsError', 'list_package_models', 'prepare_pretrained', 'download_weights', 'read_weights',
    'load_error',
]

_PACKAGE = __name__.rpartition('.')[0]
_SHA256 = re.compile(r'[0-9a-f]{64}')
_SHOW = 5  # tensors listed per kind of problem in an error


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were requested but are not published, not reachable or not usable."""


def list_package_models(pretrained: bool = False) -> List[str]:
    """Names of the models this package registers with timm.

    With `pretrained=True`, the `arch.tag` names that have published weights instead.
    """
    names = timm.list_pretrained() if pretrained else timm.list_models()
    return [n for n in names if model_entrypoint(n.partition('.')[0]).__module__.startswith(_PACKAGE + '.')]


def _no_weights_error(variant: str, pretrained_cfg: Dict[str, Any]) -> PretrainedWeightsError:
    tag = pretrained_cfg.get('tag')
    name = f'{variant}.{tag}' if tag else variant
    available = ', '.join(list_package_models(pretrained=True)) or 'none'
    return PretrainedWeightsError(
        f"No pretrained weights are published for '{name}'. Models of {_PACKAGE} with weights: {available}. "
        f"To load weights of your own: "
        f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='path/model.safetensors')); "
        f"timm.create_model('hf-hub:<user>/<repo>', pretrained=True) for a Hub repository written by "
        f"`timm-coordatt publish` or timm's push_to_hf_hub; "
        f"or timm.create_model('{variant}', checkpoint_path='path/checkpoint.pth'). "
        f"Use pretrained=False to start from random weights.")


def prepare_pretrained(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Check and fetch the pretrained weights of `variant` before timm builds it; returns the builder kwargs.

    Call it in a model builder right before `build_model_with_cfg` (or timm's `_create_*` helper):
    `kwargs = prepare_pretrained(variant, pretrained, kwargs)`. Without `pretrained` the kwargs come
    back unchanged. A resolved pretrained config without any weight source raises
    `PretrainedWeightsError`; a Hub source is downloaded and verified by `download_weights` and
    handed to timm as a local `file`, so timm's loader (input-channel and classifier adaptation,
    strict load) runs without touching the network. A `pretrained_filter_fn` is added that reports
    tensors of the wrong shape, with their source, before timm's strict load does at length.
    """
    if not pretrained:
        return kwargs
    pretrained_cfg = resolve_pretrained_cfg(
        variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay')).to_dict()
    load_from, location = _resolve_pretrained_source(pretrained_cfg)
    if not load_from:
        raise _no_weights_error(variant, pretrained_cfg)
    kwargs = dict(kwargs)
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if load_from == 'hf-hub':
        if isinstance(location, (tuple, list)):
            hub_id, filenames = location[0], (location[1],)  # explicit `hf_hub_filename`: that file only
        else:
            hub_id, filenames = location, (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
        repo_id, revision = hf_split(hub_id)
        path = download_weights(repo_id, filenames, revision=revision, cache_dir=kwargs.get('cache_dir'))
        source = _describe(repo_id, os.path.basename(path), revision)
        # `source` is cleared so timm loads `file` instead of going back to the Hub
        overlay.update(file=path, source=None)
        load_from, location = 'file', path
    else:
        source = 'the given state_dict' if load_from == 'state_dict' else f'{load_from} {location}'
        if load_from == 'file' and not os.path.isfile(location):  # timm's own error is an empty FileNotFoundError
            raise PretrainedWeightsError(f'expected a weights file (safetensors or torch), got {location!r}, which '
                                         f'{"is not a file" if os.path.exists(location) else "does not exist"}')
        if load_from == 'file' and str(location).endswith('.safetensors'):
            try:  # timm's own error would not name the file
                with safe_open(location, framework='pt'):
                    pass
            except SafetensorError as e:
                raise PretrainedWeightsError(f'{location} is not a valid safetensors file ({e})') from None
    if 'num_classes' not in overlay:
        # timm drops a classifier whose size differs from the config's: weights of a fine-tuned head (a file, a
        # Hub repository given as `hf_hub_id`) would be replaced by a random head, or fail to load, while the
        # config says 1000; the weights' own head size is the config's then
        classes = _head_classes(load_from, location, pretrained_cfg)
        if classes is not None and classes != pretrained_cfg.get('num_classes'):
            overlay['num_classes'] = classes
    if overlay:
        kwargs['pretrained_cfg_overlay'] = overlay
    kwargs['pretrained_filter_fn'] = _shape_check(
        source, kwargs.get('pretrained_filter_fn'), strict=kwargs.get('pretrained_strict', True))
    return kwargs


def _head_classes(load_from: str, location: Any, pretrained_cfg: Dict[str, Any]) -> Optional[int]:
    """Outputs of the classifier in the weights a `file` or `state_dict` source holds; None where they have
    no classifier (or no weights are there)."""
    heads = _names(pretrained_cfg.get('classifier'))
    if not heads:
        return None
    key = f'{heads[0]}.weight'
    if load_from == 'state_dict':
        shape = tuple(location[key].shape) if key in location else None
    elif load_from == 'file' and os.path.isfile(location):
        if str(location).endswith('.safetensors'):
            with safe_open(location, framework='pt') as f:  # the header only
                shape = tuple(f.get_slice(key).get_shape()) if key in f.keys() else None
        else:
            try:
                weights = read_weights(location)
            except Exception as e:  # timm's loader would report it without the file's name
                raise PretrainedWeightsError(
                    f'cannot read pretrained weights file {location}: {load_error(e)}') from None
            shape = tuple(weights[key].shape) if key in weights else None
    else:
        return None
    return shape[0] if shape and len(shape) == 2 else None


def read_weights(path: Union[str, os.PathLike], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict of a safetensors or torch file, by timm's `load_state_dict` (EMA weights with
    `use_ema` where the file has them, wrappers and prefixes removed), never unpickling code.

    `weights_only=True` is given, whatever the installed timm's default (timm < 1.0.26: False); timm's own
    training checkpoints keep their arguments, an `argparse.Namespace`, beside the weights.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_state_dict(os.fspath(path), use_ema=use_ema, weights_only=True)


# what unpickling bytes that are no pickle raises (an image, text, an empty file)
_NOT_A_PICKLE = (pickle.UnpicklingError, EOFError, KeyError)


def load_error(e: Exception) -> str:
    """What made a torch file unreadable, in one line: torch's refusals under `weights_only=True` run to a
    paragraph of advice, on unpickling it with `weights_only=False` among it."""
    errors = (e,) if e.__cause__ is None else (e, e.__cause__)  # timm raises torch's refusal again, from it
    for error in errors:
        unsafe = re.search(r'Unsupported globals?: (?:GLOBAL )?([\w.]*\w)', str(error))  # torch's words, or timm's
        if unsafe:
            return f'it holds a {unsafe.group(1)}, which only unpickling arbitrary code could read'
    if any(isinstance(error, _NOT_A_PICKLE) for error in errors):
        return 'not a file torch.save wrote (or damaged)'
    return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'


def _names(value: Union[None, str, Sequence[str]]) -> Tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def _listing(items: Sequence[str]) -> str:
    more = len(items) - _SHOW
    return ', '.join(items[:_SHOW]) + (f' and {more} more' if more > 0 else '')


def _shape_check(source: str, filter_fn: Optional[Callable] = None, strict: bool = True) -> Callable:
    """A `pretrained_filter_fn` (after `filter_fn`, if given) raising if tensors do not fit the model's shapes
    or, for a strict load, the model has tensors the weights lack.

    The classifier (dropped by timm when `num_classes` differs) and the input channels of the first
    conv (adapted by timm to `in_chans`) are left to timm.
    """
    def check(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model)
        cfg = model.pretrained_cfg
        heads = {f'{c}.{p}' for c in _names(cfg.get('classifier')) for p in ('weight', 'bias')}
        stems = {f'{c}.weight' for c in _names(cfg.get('first_conv'))}
        own = model.state_dict()
        mismatched = []
        for key, value in own.items():  # in the model's order: the stem first
            if key in heads or key not in state_dict:
                continue
            theirs, ours = tuple(state_dict[key].shape), tuple(value.shape)
            if theirs != ours and not (key in stems and theirs[:1] + theirs[2:] == ours[:1] + ours[2:]):
                mismatched.append(f'{key} {theirs} (model {ours})')
        problems = [f'{len(mismatched)} tensors have other shapes: {_listing(mismatched)}'] if mismatched else []
        missing = [k for k in own if k not in heads and k not in state_dict]
        if strict and missing:  # timm's strict load would list every name, one per line
            # extra tensors in the weights are no error by themselves: timm loads a feature extractor (no head)
            # non-strictly from the whole model's weights
            unexpected = [k for k in state_dict if k not in heads and k not in own]
            problems.append(f"{len(missing)} of the model's {len(own)} tensors are missing: {_listing(missing)}")
            if unexpected:
                problems.append(f'{len(unexpected)} tensors are not the model\'s: {_listing(unexpected)}')
        if problems:
            hint = ''
            if any(k.startswith('features.') for k in state_dict) and not any(k.startswith('features.') for k in own):
                hint = (" If this is the authors' MobileNetV2 + CA checkpoint, convert it first: "
                        "`timm-coordatt convert mbv2_ca.pth OUT_DIR`, then load OUT_DIR/model.safetensors.")
            raise PretrainedWeightsError(
                f"The pretrained weights from {source} do not fit {cfg.get('architecture')}: {'; '.join(problems)}. "
                f"They were saved from another model or width; load them into that model, or use "
                f"pretrained=False.{hint}")
        return state_dict
    return check


def download_weights(
        repo_id: str,
        filenames: Union[str, Sequence[str]] = (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME),
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> str:
    """Download a weight file of Hub repository `repo_id` into the Hub cache, verify it, return its local path.

    `filenames` (a name or a sequence) are tried in order, moving on only when the server says a
    file does not exist (or, offline or out of reach, the Hub cache remembers it saying so). Everything
    else (offline without a cached copy, unknown repository or revision, server errors, incomplete or
    corrupt downloads) raises `PretrainedWeightsError` naming the cause. A cached file that fails
    verification is removed, so the next call downloads it again.
    """
    filenames = (filenames,) if isinstance(filenames, str) else tuple(filenames)
    for filename in filenames:
        try:
            path = hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, library_name=_PACKAGE)
        except RemoteEntryNotFoundError:
            continue
        except HFValidationError as e:
            raise PretrainedWeightsError(
                f"'{repo_id}' is not a valid Hub repository id ({e}); this package's weights are looked up under "
                f"the organisation '{HUB_ORG}' (TIMM_COORDATT_HUB_ORG).") from None
        except OSError as e:  # every huggingface_hub download error is one (HTTP, offline, size check)
            # offline or unreachable: the cache remembers whether the server said earlier that the file
            # does not exist (then a cached later one, e.g. pytorch_model.bin, loads as it did online)
            if try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision) is _CACHED_NO_EXIST:
                continue
            raise _download_error(e, repo_id, filename, revision, cache_dir) from e
        _verify_cached(path, _describe(repo_id, filename, revision), cache_dir)
        return path
    raise PretrainedWeightsError(
        f"Hub repository '{repo_id}'{_at(revision)} on {hf_constants.ENDPOINT} has no weight file: "
        f"looked for {' and '.join(repr(f) for f in filenames)}. Publish model.safetensors there "
        f"(`timm-coordatt publish`), or load a local file with pretrained_cfg_overlay=dict(file=...).")


def _at(revision: Optional[str]) -> str:
    return f" at revision '{revision}'" if revision else ''


def _describe(repo_id: str, filename: str, revision: Optional[str]) -> str:
    return f"'{filename}' of Hub repository '{repo_id}'{_at(revision)} on {hf_constants.ENDPOINT}"


def _cache_dir(cache_dir: Optional[Union[str, os.PathLike]]) -> str:
    return str(cache_dir or hf_constants.HF_HUB_CACHE)


def _download_error(
        error: OSError,
        repo_id: str,
        filename: str,
        revision: Optional[str],
        cache_dir: Optional[Union[str, os.PathLike]],
) -> PretrainedWeightsError:
    """The `PretrainedWeightsError` naming the cause of a failed `hf_hub_download`."""
    what = _describe(repo_id, filename, revision)
    if isinstance(error, GatedRepoError):
        return PretrainedWeightsError(
            f"Hub repository '{repo_id}' is gated: request access and pass a token with it (HF_TOKEN). ({error})")
    if isinstance(error, RepositoryNotFoundError):
        return PretrainedWeightsError(
            f"Hub repository '{repo_id}' was not found on {hf_constants.ENDPOINT} (or it is private and no valid "
            f"token was given, see HF_TOKEN). This package's weights are looked up under the organisation "
            f"'{HUB_ORG}' (TIMM_COORDATT_HUB_ORG) on the server set by HF_ENDPOINT.")
    if isinstance(error, RevisionNotFoundError):
        return PretrainedWeightsError(f"Revision '{revision}' does not exist in Hub repository '{repo_id}'.")
    # without a cached copy huggingface_hub raises LocalEntryNotFoundError from the real cause
    cause = error.__cause__ if isinstance(error, LocalEntryNotFoundError) and error.__cause__ is not None else error
    if isinstance(error, LocalEntryNotFoundError) and (
            hf_constants.HF_HUB_OFFLINE or isinstance(cause, OfflineModeIsEnabled)):
        return PretrainedWeightsError(
            f"Offline mode is on (HF_HUB_OFFLINE=1) and {what} is not in the Hub cache "
            f"{_cache_dir(cache_dir)}. Download it once while online, or load a local copy with "
            f"pretrained_cfg_overlay=dict(file=...).")
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        return PretrainedWeightsError(
            f"The Hub server answered HTTP {cause.response.status_code} while downloading {what}, and there is "
            f"no copy in the Hub cache {_cache_dir(cache_dir)}: {cause}")
    if isinstance(error, LocalEntryNotFoundError):
        return PretrainedWeightsError(
            f"Could not reach {hf_constants.ENDPOINT} to download {what}, and there is no copy in the Hub cache "
            f"{_cache_dir(cache_dir)}: {type(cause).__name__}: {cause}")
    # huggingface_hub's size check ("Consistency check failed"), a full disk, ...; it keeps no partial file
    return PretrainedWeightsError(f"Downloading {what} failed, nothing was cached: {error}")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_cached(path: str, what: str, cache_dir: Optional[Union[str, os.PathLike]]) -> None:
    """Raise (and evict the file from the cache) unless the cached `path` is intact.

    huggingface_hub checks the size of a download but not its content, and serves a cached blob
    forever once it is there. Blobs are named by the server's ETag, which is the sha256 of the file
    for LFS files, so the content can be checked against it; safetensors files are also parsed
    (header and data extent) to catch a file that was already broken on the server.
    """
    blob = os.path.realpath(path)
    etag = os.path.basename(blob) if os.path.basename(os.path.dirname(blob)) == 'blobs' else ''
    problem = ''
    if _SHA256.fullmatch(etag):
        digest = _sha256(blob)
        if digest != etag:
            problem = f'its sha256 {digest} differs from the sha256 {etag} the server announced'
    if not problem and path.endswith('.safetensors'):
        try:
            with safe_open(path, framework='pt'):
                pass
        except SafetensorError as e:
            problem = f'it is not a valid safetensors file ({e})'
    if problem:
        for p in {path, blob}:  # the snapshot link and the blob it points to
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        raise PretrainedWeightsError(
            f"The downloaded copy of {what} is corrupt: {problem}. It was removed from the Hub cache "
            f"{_cache_dir(cache_dir)}; loading again downloads it afresh.")
