""" Pretrained weights: every way of loading them, and every way the Hub download can fail.

The Hub tests run the real huggingface_hub + timm client against `hub_server.HubServer` on
127.0.0.1. huggingface_hub reads `HF_ENDPOINT` / `HF_HUB_OFFLINE` once, at import, so the client
runs in a subprocess: this file itself, run as a script (`python test_pretrained.py online|offline
...`). It starts the server, sets `HF_ENDPOINT`, only then imports timm, plays the scenarios and
writes one JSON record per scenario, which the tests below check. Hence timm is imported through
fixtures here, never at module level.

Weights are compared bit for bit through a digest of the whole state dict (names, dtypes, shapes
and bytes).
"""
import hashlib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
ORG = 'timm-coordatt'  # the package's default Hub organisation (TIMM_COORDATT_HUB_ORG unset)
REPO = f'{ORG}/mobilenetv2_ca.in1k'
MIRROR = 'mirror-org/mobilenetv2_ca.in1k'  # the same weights where TIMM_COORDATT_HUB_ORG=mirror-org points
WEIGHTS = 'model.safetensors'
BIN_ONLY = 'me/bin-only'  # a repository with pytorch_model.bin only


def _digest(state_dict: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].contiguous()
        h.update(f'{key}|{t.dtype}|{tuple(t.shape)}|'.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _backbone(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if not k.startswith('classifier.')}


def _summary(model: torch.nn.Module) -> dict:
    state = model.state_dict()
    return dict(digest=_digest(state), backbone=_digest(_backbone(state)), classes=model.num_classes)


def _cache_files(cache: Path):
    """Files of a Hub cache that hold content (blobs, snapshot entries, partial downloads)."""
    if not cache.is_dir():
        return []
    return sorted(
        p.relative_to(cache).as_posix() for p in cache.rglob('*')
        if (p.is_file() or p.is_symlink()) and '.locks' not in p.parts and p.name != 'CACHEDIR.TAG'
        and 'refs' not in p.parts and '.no_exist' not in p.parts)


# --- the client subprocess ---------------------------------------------------------------------

def _scenario_runner(results: dict, cache: Path) -> Callable:
    def run(name: str, fn: Callable, cache_dir: Path = cache) -> None:
        start = time.perf_counter()
        try:
            record = dict(ok=True, **(fn() or {}))
        except Exception as e:  # recorded for the tests to judge
            record = dict(ok=False, type=type(e).__name__, error=str(e))
        record.update(seconds=time.perf_counter() - start, cache=_cache_files(cache_dir))
        results[name] = record
    return run


def _client_online(root: Path, work: Path, out: Path) -> None:
    from hub_server import HubServer

    server = HubServer(root, lifetime=300).start()
    os.environ['HF_ENDPOINT'] = server.url  # before huggingface_hub is imported, by timm below
    import timm
    import timm_coordatt  # noqa: F401  registers the models
    from timm_coordatt.publish import publish

    cache = Path(os.environ['HF_HUB_CACHE'])
    results: dict = {}
    run = _scenario_runner(results, cache)

    def load(name='mobilenetv2_ca', **kwargs):
        return lambda: _summary(timm.create_model(name, pretrained=True, **kwargs))

    def hub(repo_id, **kwargs):
        return load(pretrained_cfg_overlay=dict(hf_hub_id=repo_id), **kwargs)

    def fix(repo_id):  # the repository gets the good weights: a new commit
        shutil.copyfile(work / 'good.safetensors', server.repo_dir(repo_id) / WEIGHTS)

    def weight_requests():
        return [r for r in server.requests if r.startswith('GET ') and WEIGHTS in r]

    run('first_download', load())
    results['first_download']['weight_gets'] = len(weight_requests())
    run('tag', load('mobilenetv2_ca.in1k'))
    run('hf_hub_prefix', load(f'hf-hub:{REPO}'))
    results['downloads_after_three_loads'] = len(weight_requests())
    run('mirror_hf_hub_prefix', load(f'hf-hub:{MIRROR}'))  # cached for the offline client

    def torch_hub():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            model = torch.hub.load(str(REPO_ROOT), 'mobilenetv2_ca', pretrained=True, source='local')
        return dict(digest=_digest(model.state_dict()), warnings=[str(w.message) for w in caught])
    run('torch_hub', torch_hub)
    run('num_classes', load(num_classes=10))
    run('in_chans', load(in_chans=1))

    run('bin_only', hub(BIN_ONLY))  # timm's fallback, when the server says there is no model.safetensors
    run('missing_repo', hub('nobody/missing'))
    run('missing_file', hub('me/no-weights'))
    fix('me/no-weights')
    run('missing_file_fixed', hub('me/no-weights'))
    run('broken_in_repo', hub('me/broken'))
    fix('me/broken')
    run('broken_in_repo_fixed', hub('me/broken'))
    run('wrong_shape', hub('me/wrong-shape'))
    fix('me/wrong-shape')
    run('wrong_shape_fixed', hub('me/wrong-shape'))
    for fault in ('error', 'truncate', 'corrupt'):  # each from a cold cache of its own
        cache_dir = work / f'cache-{fault}'
        server.faults[(REPO, WEIGHTS)] = fault
        run(f'fault_{fault}', load(cache_dir=cache_dir), cache_dir)
        del server.faults[(REPO, WEIGHTS)]
        run(f'fault_{fault}_fixed', load(cache_dir=cache_dir), cache_dir)

    def publish_and_load():
        commit = publish(work / 'publish', 'me/published')
        model = timm.create_model('hf-hub:me/published', pretrained=True)
        return dict(digest=_digest(model.state_dict()), commit_url=commit.commit_url,
                    published=sorted(p.name for p in server.repo_dir('me/published').iterdir()))
    run('publish', publish_and_load)

    server.stop()
    run('server_stopped', load())
    run('server_stopped_hf_hub_prefix', load(f'hf-hub:{REPO}'))
    run('server_stopped_bin_only', hub(BIN_ONLY))
    out.write_text(json.dumps(results, indent=1))


def _client_offline(work: Path, out: Path) -> None:
    import timm
    import timm_coordatt  # noqa: F401

    cache = Path(os.environ['HF_HUB_CACHE'])
    results: dict = {}
    run = _scenario_runner(results, cache)

    def load(name='mobilenetv2_ca', **kwargs):
        return lambda: _summary(timm.create_model(name, pretrained=True, **kwargs))

    # this client runs with TIMM_COORDATT_HUB_ORG=mirror-org
    results['hf_hub_id'] = timm.create_model('mobilenetv2_ca').pretrained_cfg['hf_hub_id']
    run('warm', load())
    run('warm_hf_hub_prefix', load(f'hf-hub:{REPO}'))
    run('cold', load(cache_dir=work / 'cache-cold'), work / 'cache-cold')
    run('warm_bin_only', load(pretrained_cfg_overlay=dict(hf_hub_id=BIN_ONLY)))
    out.write_text(json.dumps(results, indent=1))


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def timm():
    import timm
    import timm_coordatt  # noqa: F401  registers the models
    return timm


@pytest.fixture(scope='module')
def hub(tmp_path_factory, timm):
    """A Hub tree with the package's repository and faulty ones, and the files to fix them."""
    from timm.models import save_for_hf

    work = tmp_path_factory.mktemp('hub')
    torch.manual_seed(0)
    good = timm.create_model('mobilenetv2_ca')
    repo = work / 'root' / REPO
    save_for_hf(good, repo, safe_serialization=True)
    shutil.copyfile(repo / WEIGHTS, work / 'good.safetensors')
    shutil.copytree(repo, work / 'root' / MIRROR)
    for name in ('me/no-weights', 'me/broken', 'me/wrong-shape'):
        (work / 'root' / name).mkdir(parents=True)
        shutil.copyfile(repo / 'config.json', work / 'root' / name / 'config.json')
    data = (repo / WEIGHTS).read_bytes()
    (work / 'root' / 'me/broken' / WEIGHTS).write_bytes(data[:len(data) // 3])  # broken on the server itself
    save_file(timm.create_model('mobilenetv2_050_ca').state_dict(), work / 'root' / 'me/wrong-shape' / WEIGHTS)
    (work / 'root' / BIN_ONLY).mkdir(parents=True)
    shutil.copyfile(repo / 'config.json', work / 'root' / BIN_ONLY / 'config.json')
    torch.save(good.state_dict(), work / 'root' / BIN_ONLY / 'pytorch_model.bin')
    # a fine-tuned model of an architecture without published weights, for publishing
    save_for_hf(timm.create_model('mobilenetv2_050_ca', num_classes=5), work / 'publish', safe_serialization=True)
    return work


def _client(mode: str, work: Path, cache: Path, **extra_env) -> dict:
    """Run this file as the client script; its directory (with hub_server.py) is first on its sys.path."""
    out = work / f'{mode}.json'
    # none of the caller's Hub settings (TRANSFORMERS_OFFLINE=1 turns huggingface_hub offline too)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HF_', 'HUGGINGFACE_', 'TRANSFORMERS_')) and k != 'TIMM_COORDATT_HUB_ORG'}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY='1', HF_TOKEN='hf_stand_in', **extra_env)
    env['HF_HUB_DISABLE_XET'] = '1'  # uploads take the LFS path the stand-in speaks
    proc = subprocess.run(
        [sys.executable, __file__, mode, str(work), str(out)], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope='module')
def online(hub):
    return _client('online', hub, hub / 'cache')


@pytest.fixture(scope='module')
def offline(hub, online):  # runs on the cache the online client filled
    return _client('offline', hub, hub / 'cache', HF_HUB_OFFLINE='1', TIMM_COORDATT_HUB_ORG='mirror-org')


@pytest.fixture(scope='module')
def expected(hub) -> Dict[str, torch.Tensor]:
    return load_file(hub / 'good.safetensors')


def _assert_failed(record: dict, *needles: str) -> None:
    assert not record['ok'], record
    for needle in needles:
        assert needle in record['error'], (needle, record['error'])


def _no_weights_cached(record: dict, repo_id: str) -> None:
    folder = f"models--{repo_id.replace('/', '--')}/"
    assert not [f for f in record['cache'] if f.startswith(folder) and (f.endswith(WEIGHTS) or '/blobs/' in f)], record


# --- loading the published weights ---------------------------------------------------------------

def test_first_download_then_cache(online, expected):
    assert online['first_download']['ok'], online['first_download']
    assert online['first_download']['digest'] == _digest(expected)
    assert online['first_download']['weight_gets'] == 1
    assert online['downloads_after_three_loads'] == 1  # the tag and hf-hub: loads were served from the cache


@pytest.mark.parametrize('scenario', ['tag', 'hf_hub_prefix', 'torch_hub'])
def test_every_hub_route_loads_the_same_weights(online, expected, scenario):
    assert online[scenario]['ok'], online[scenario]
    assert online[scenario]['digest'] == _digest(expected)


def test_torch_hub_registers_nothing_twice(online):
    assert not [w for w in online['torch_hub']['warnings'] if 'Overwriting' in w]


def test_local_file_and_local_dir_load_the_same_weights(timm, hub, expected):
    via_file = timm.create_model(
        'mobilenetv2_ca', pretrained=True, pretrained_cfg_overlay=dict(file=str(hub / 'good.safetensors')))
    via_dir = timm.create_model(f'local-dir:{hub / "root" / REPO}', pretrained=True)
    assert _digest(via_file.state_dict()) == _digest(via_dir.state_dict()) == _digest(expected)


def test_num_classes_and_in_chans_adapt_as_timm_does(online, expected):
    # a new head on the published backbone
    assert online['num_classes']['ok'], online['num_classes']
    assert online['num_classes']['classes'] == 10
    assert online['num_classes']['backbone'] == _digest(_backbone(expected))
    # one input channel: timm sums the RGB filters of the stem
    assert online['in_chans']['ok'], online['in_chans']
    gray = dict(expected, **{'conv_stem.weight': expected['conv_stem.weight'].sum(dim=1, keepdim=True)})
    assert online['in_chans']['digest'] == _digest(gray)


def test_server_stopped_loads_from_cache(online, expected):
    for scenario in ('server_stopped', 'server_stopped_hf_hub_prefix'):
        assert online[scenario]['ok'], online[scenario]
        assert online[scenario]['digest'] == _digest(expected)
    assert online['server_stopped']['seconds'] < 10


def test_offline_warm_cache(offline, expected):
    for scenario in ('warm', 'warm_hf_hub_prefix'):
        assert offline[scenario]['ok'], offline[scenario]
        assert offline[scenario]['digest'] == _digest(expected)


def test_a_repository_of_pytorch_model_bin_only_loads_from_the_cache_too(online, offline, expected):
    # online through the fallback; then, with the server gone or offline, from the cache, which remembers
    # that the server has no model.safetensors
    for record in (online['bin_only'], online['server_stopped_bin_only'], offline['warm_bin_only']):
        assert record['ok'], record
        assert record['digest'] == _digest(expected)


def test_hub_org_variable_points_the_package_elsewhere(online, offline):
    assert online['mirror_hf_hub_prefix']['ok'], online['mirror_hf_hub_prefix']
    assert offline['hf_hub_id'] == MIRROR
    assert MIRROR in offline['cold']['error']


def test_offline_cold_cache_fails_fast_and_clearly(offline):
    _assert_failed(offline['cold'], 'Offline mode is on (HF_HUB_OFFLINE=1)', 'not in the Hub cache')
    assert offline['cold']['type'] == 'PretrainedWeightsError'
    assert offline['cold']['seconds'] < 5


# --- failures: a clear cause, nothing broken cached, a retry after the fix works ----------------------

def test_missing_repo(online):
    _assert_failed(online['missing_repo'], "Hub repository 'nobody/missing' was not found")
    _no_weights_cached(online['missing_repo'], 'nobody/missing')


def test_missing_file_then_fixed(online, expected):
    _assert_failed(online['missing_file'], "'me/no-weights'", 'has no weight file', "'model.safetensors'")
    _no_weights_cached(online['missing_file'], 'me/no-weights')
    assert 'pytorch_model.bin' in online['missing_file']['error']  # both names are reported, not just the last
    assert online['missing_file_fixed']['ok'], online['missing_file_fixed']
    assert online['missing_file_fixed']['digest'] == _digest(expected)


@pytest.mark.parametrize('fault, needles', [
    ('error', ['answered HTTP 500', REPO, 'no copy in the Hub cache']),
    ('truncate', ['Consistency check failed', REPO, 'nothing was cached']),
    ('corrupt', ['is corrupt', 'differs from the sha256', 'removed from the Hub cache']),
])
def test_download_faults_then_fixed(online, expected, fault, needles):
    record = online[f'fault_{fault}']
    _assert_failed(record, *needles)
    assert record['type'] == 'PretrainedWeightsError'
    assert 'pytorch_model.bin' not in record['error']  # not timm's misleading fallback
    assert record['seconds'] < 30  # bounded retries
    _no_weights_cached(record, REPO)
    fixed = online[f'fault_{fault}_fixed']
    assert fixed['ok'], fixed
    assert fixed['digest'] == _digest(expected)


def test_file_broken_on_the_server_then_fixed(online, expected):
    _assert_failed(online['broken_in_repo'], 'is corrupt', 'not a valid safetensors file', "'me/broken'")
    _no_weights_cached(online['broken_in_repo'], 'me/broken')
    assert online['broken_in_repo_fixed']['ok'], online['broken_in_repo_fixed']
    assert online['broken_in_repo_fixed']['digest'] == _digest(expected)


def test_wrong_shaped_checkpoint_then_fixed(online, expected):
    _assert_failed(online['wrong_shape'], "'model.safetensors' of Hub repository 'me/wrong-shape'",
                   'do not fit mobilenetv2_ca', 'conv_stem.weight (16, 3, 3, 3) (model (32, 3, 3, 3))')
    assert online['wrong_shape']['type'] == 'PretrainedWeightsError'
    assert online['wrong_shape_fixed']['ok'], online['wrong_shape_fixed']
    assert online['wrong_shape_fixed']['digest'] == _digest(expected)


def test_publish_round_trip(online, hub):
    from model_helpers import create_as_transformers_does  # imports timm, as `hub` has

    record = online['publish']
    assert record['ok'], record
    assert record['published'] == ['README.md', 'config.json', WEIGHTS]
    assert '/me/published/commit/' in record['commit_url']
    assert record['digest'] == _digest(load_file(hub / 'publish' / WEIGHTS))  # bit for bit
    card = (hub / 'publish' / 'README.md').read_text()  # written by publish, since the folder had none
    assert "timm.create_model('hf-hub:me/published', pretrained=True)" in card
    assert "pipeline('image-classification', model='me/published')" in card
    # the folder's config, as timm's save_for_hf wrote it, rewritten for transformers' timm wrapper before upload
    assert create_as_transformers_does(hub / 'publish').num_classes == 5


# --- models without weights, and torch.hub entrypoints ----------------------------------------

def test_no_weights_is_a_clear_error(timm):
    from timm_coordatt.pretrained import PretrainedWeightsError, list_package_models

    with_weights = list_package_models(pretrained=True)
    assert with_weights == ['mobilenetv2_ca.in1k']
    without = [n for n in list_package_models() if not any(w.startswith(f'{n}.') for w in with_weights)]
    assert {'mobilenetv2_050_ca', 'efficientnet_b0_ca', 'mobilenext_ca'} <= set(without)
    for name in without:
        with pytest.raises(PretrainedWeightsError) as info:
            timm.create_model(name, pretrained=True)
        message = str(info.value)
        for needle in (f"'{name}", 'mobilenetv2_ca.in1k', 'pretrained_cfg_overlay=dict(file=', 'hf-hub:',
                       'checkpoint_path='):
            assert needle in message, (name, needle)


def test_no_weights_model_loads_an_explicit_file(timm, tmp_path):
    source = timm.create_model('mobilenetv2_050_ca')
    save_file(source.state_dict(), tmp_path / 'mine.safetensors')
    model = timm.create_model(
        'mobilenetv2_050_ca', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'mine.safetensors')))
    assert _digest(model.state_dict()) == _digest(source.state_dict())


@pytest.mark.parametrize('suffix', ['safetensors', 'pth'])
def test_a_fine_tuned_head_comes_with_its_file(timm, tmp_path, suffix):
    """timm drops a classifier whose size differs from the config's (1000): a file's own head must not be
    replaced by a random one (with num_classes=10) or fail to load (without)."""
    torch.manual_seed(0)
    source = timm.create_model('mobilenetv2_050_ca', num_classes=10)
    path = tmp_path / f'fine-tuned.{suffix}'
    if suffix == 'safetensors':
        save_file(source.state_dict(), path)
    else:
        torch.save({'state_dict': source.state_dict(), 'epoch': 3}, path)
    overlay = dict(file=str(path))
    for kwargs in ({}, dict(num_classes=10)):
        model = timm.create_model('mobilenetv2_050_ca', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        assert model.num_classes == 10
        assert _digest(model.state_dict()) == _digest(source.state_dict())
    # another number of classes: a new head on the file's backbone
    model = timm.create_model('mobilenetv2_050_ca', pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3)
    assert model.classifier.out_features == 3
    assert torch.equal(model.conv_head.weight, source.conv_head.weight)


@pytest.mark.parametrize('org, expected', [
    ('', "hf_hub_id timm-coordatt/mobilenetv2_ca.in1k"),  # set but empty: the default
    ('my org', "PretrainedWeightsError 'my org/mobilenetv2_ca.in1k' is not a valid Hub repository id"),
])
def test_hub_org_variable_empty_or_invalid(org, expected):
    script = ('import timm, timm_coordatt\n'
              "print('hf_hub_id', timm.create_model('mobilenetv2_ca').pretrained_cfg['hf_hub_id'])\n"
              'try:\n'
              "    timm.create_model('mobilenetv2_ca', pretrained=True)\n"
              'except Exception as e:\n'
              '    print(type(e).__name__, e)\n')
    env = dict(os.environ, TIMM_COORDATT_HUB_ORG=org, HF_HUB_OFFLINE='1', HF_HUB_CACHE=os.devnull)
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expected in proc.stdout, proc.stdout
    if org:
        assert '(TIMM_COORDATT_HUB_ORG)' in proc.stdout


def test_wrong_shaped_file_names_tensors_and_shapes(timm, tmp_path):
    from timm_coordatt.pretrained import PretrainedWeightsError

    save_file(timm.create_model('mobilenetv2_050_ca').state_dict(), tmp_path / 'narrow.safetensors')
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model(
            'mobilenetv2_ca', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'narrow.safetensors')))
    message = str(info.value)
    assert f"file {tmp_path / 'narrow.safetensors'}" in message
    assert 'bn1.weight (16,) (model (32,))' in message and 'more' in message
    assert len(message) < 1000  # a summary, not one line per tensor


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_broken_local_safetensors_file_is_named(timm, tmp_path, damage):
    from timm_coordatt.pretrained import PretrainedWeightsError

    path = tmp_path / 'weights.safetensors'
    save_file(timm.create_model('mobilenetv2_ca').state_dict(), path)
    data = path.read_bytes()
    path.write_bytes({'truncated': data[:len(data) // 2], 'garbage': b'\xff' * 3000, 'empty': b''}[damage])
    with pytest.raises(PretrainedWeightsError, match=f'{path} is not a valid safetensors file'):
        timm.create_model('mobilenetv2_ca', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('kind', ['missing', 'folder', 'text'])
def test_local_weights_file_that_cannot_be_read_is_named(timm, tmp_path, kind):
    """A `file` that is not there, a folder, or a torch file that is no pickle: named, not timm's empty
    FileNotFoundError or the unpickler's KeyError."""
    from timm_coordatt.pretrained import PretrainedWeightsError

    path = tmp_path / ('weights' if kind == 'folder' else 'weights.pth')
    if kind == 'folder':
        path.mkdir()
    elif kind == 'text':
        path.write_text('not weights\n')
    expected = {'missing': f"got '{path}', which does not exist", 'folder': f"got '{path}', which is not a file",
                'text': f'cannot read pretrained weights file {path}: not a file torch.save wrote'}[kind]
    with pytest.raises(PretrainedWeightsError, match=re.escape(expected)):
        timm.create_model('mobilenetv2_ca', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_weights_of_other_names_are_summarised(timm, tmp_path):
    from timm_coordatt.pretrained import PretrainedWeightsError

    # the authors' checkpoint layout (features.N..., classifier.1), loaded without converting it first
    authors = {'features.0.0.weight': torch.zeros(32, 3, 3, 3), 'features.0.1.weight': torch.zeros(32),
               'classifier.1.weight': torch.zeros(1000, 1280), 'classifier.1.bias': torch.zeros(1000)}
    save_file(authors, tmp_path / 'authors.safetensors')
    own = len(timm.create_model('mobilenetv2_ca').state_dict())
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model(
            'mobilenetv2_ca', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'authors.safetensors')))
    message = str(info.value)
    # every tensor but the classifier's (left to timm) is missing; the authors' four are not the model's
    assert f"{own - 2} of the model's {own} tensors are missing: conv_stem.weight, bn1.weight" in message
    assert "4 tensors are not the model's: classifier.1.bias, classifier.1.weight, features.0.0.weight" in message
    assert 'timm-coordatt convert' in message and len(message) < 1200
    # a non-strict load asks for what the checkpoint has, no more: nothing to report (MobileNeXt: timm's
    # EfficientNet builder may set pretrained_strict itself)
    model = timm.create_model('mobilenext_ca', pretrained=True, pretrained_strict=False,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'authors.safetensors')))
    assert model.num_classes == 1000


def test_feature_extractor_loads_weights_with_a_head(timm, tmp_path):
    # timm builds MobileNetV2's features_only model without the head and loads the full weights non-strictly
    torch.manual_seed(0)
    full = timm.create_model('mobilenetv2_ca')
    save_file(full.state_dict(), tmp_path / 'full.safetensors')
    backbone = timm.create_model('mobilenetv2_ca', pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / 'full.safetensors')))
    assert torch.equal(backbone.state_dict()['conv_stem.weight'], full.state_dict()['conv_stem.weight'])


def test_hubconf_lists_every_model_of_the_package(timm):
    spec = importlib.util.spec_from_file_location('hubconf', REPO_ROOT / 'hubconf.py')
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # what torch.hub offers: the public callables of hubconf.py
    entrypoints = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith('_')}
    # timm's per-module index over the package's modules (timm keys a module by its last name)
    import timm_coordatt
    registered = {n for m in pkgutil.iter_modules(timm_coordatt.__path__) for n in timm.list_models(module=m.name)}
    assert entrypoints == registered
    assert {'mobilenetv2_ca', 'efficientnet_b0_ca', 'mobilenext_ca'} <= entrypoints
    assert {'torch', 'timm'} <= set(hubconf.dependencies)
    assert all(importlib.util.find_spec(dep) for dep in hubconf.dependencies)


def test_torch_hub_load_adapts_and_warns_nothing(timm):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a second registration would warn "Overwriting"
        model = torch.hub.load(str(REPO_ROOT), 'mobilenetv2_050_ca', source='local', num_classes=7, in_chans=1)
        torch.hub.load(str(REPO_ROOT), 'mobilenetv2_050_ca', source='local')
    assert model.num_classes == 7 and model.conv_stem.in_channels == 1


if __name__ == '__main__':
    _mode, _work, _out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if _mode == 'online':
        _client_online(_work / 'root', _work, _out)
    else:
        _client_offline(_work, _out)
