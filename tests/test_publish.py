""" The model card and the checks `publish` makes before it uploads (the upload itself is tested
against the Hub stand-in in test_pretrained.py). """
import argparse
import re

import pytest
import timm
from safetensors.torch import save_file
from timm.models import save_for_hf

import timm_coordatt  # noqa: F401  registers the models
from timm_coordatt.cli import COMMANDS
from timm_coordatt.cli import publish as publish_cli
from timm_coordatt.publish import PublishError, model_card, publish


def _front_matter(card: str) -> dict:
    assert card.startswith('---\n')
    meta, key = {}, None
    for line in card.split('---\n')[1].splitlines():
        if line.startswith('- '):
            meta[key].append(line[2:])
        else:
            key, _, value = line.partition(':')
            meta[key] = value.strip() or []
    return meta


@pytest.fixture(scope='module')
def card():
    return model_card(timm.create_model('mobilenetv2_ca'), 'org/mobilenetv2_ca.in1k', dataset='ImageNet-1k')


def test_card_metadata(card):
    meta = _front_matter(card)
    assert meta['license'] == 'mit'
    assert meta['library_name'] == 'timm'
    assert 'timm' in meta['tags'] and 'image-classification' in meta['tags']
    assert 'transformers' not in meta['tags']  # the Hub's transformers snippet would leave out the import
    assert meta['datasets'] == ['imagenet-1k']


def test_card_stats_match_the_paper_counts(card):
    # coordatt.md section 3: 3,950,648 params, 306.7M MACs, 310.5M with the CA products
    assert '  - Params (M): 3.95\n' in card
    assert '  - MACs (M): 306.7\n' in card
    assert '  - MACs + CA products (M): 310.5\n' in card
    assert '  - Image size: 224 x 224\n' in card


def test_card_usage_table_and_citation(card):
    assert 'import timm_coordatt' in card
    assert "timm.create_model('hf-hub:org/mobilenetv2_ca.in1k', pretrained=True)" in card
    assert '| **MobileNetV2 + CA** | 3.95M | 310M | **74.3** |' in card
    assert '| **MobileNeXt + CA** | 4.09M | 330M | **75.2** |' in card
    assert '@inproceedings{hou2021coordinate' in card
    assert 'author={Hou, Qibin and Zhou, Daquan and Feng, Jiashi}' in card


CA_BIBTEX, MOBILENEXT_BIBTEX = '@inproceedings{hou2021coordinate', '@inproceedings{zhou2020rethinking'


@pytest.mark.parametrize('name, ca, papers', [
    ('mobilenetv2_050_ca', True, ['2103.02907']),
    ('mobilenext_050', False, ['2007.02269']),
    ('mobilenext_050_ca', True, ['2007.02269', '2103.02907']),
])
def test_card_names_and_cites_the_model_s_own_papers(name, ca, papers):
    card = model_card(timm.create_model(name), f'me/{name}')
    assert ('coordinate-attention' in _front_matter(card)['tags']) == ca
    assert ('with Coordinate Attention' in card.split('## Model Details')[0]) == ca
    assert sorted(re.findall(r'https://arxiv.org/abs/(\d+\.\d+)', card)) == papers
    assert (CA_BIBTEX in card) == ('2103.02907' in papers)
    assert (MOBILENEXT_BIBTEX in card) == ('2007.02269' in papers)
    assert 'author={Zhou, Daquan and Hou, Qibin and Chen, Yunpeng and Feng, Jiashi and Yan, Shuicheng}' in card \
        or '2007.02269' not in papers
    assert '- **Original code:** https://github.com/' in card  # the architecture's code, not the weights' origin


@pytest.mark.parametrize('dataset, listed', [
    ('ImageNet-1k', ['imagenet-1k']),
    ('nateraw/oxford-flowers', ['nateraw/oxford-flowers']),
    ('Oxford Flowers-102', None),  # not a Hub dataset id: in the text only
    ('CUB-200: birds #2011', None),  # would have been YAML syntax in the front matter
])
def test_card_front_matter_lists_hub_dataset_ids_only(dataset, listed):
    card = model_card(timm.create_model('mobilenetv2_050_ca'), 'me/m', dataset=dataset)
    assert _front_matter(card).get('datasets') == listed
    assert f'- **{"Dataset" if listed else "Training data"}:** {dataset}\n' in card


def test_publish_refuses_a_model_card_for_another_repository(tmp_path):
    save_for_hf(timm.create_model('mobilenetv2_050_ca'), tmp_path, safe_serialization=True)
    card = model_card(timm.create_model('mobilenetv2_050_ca'), 'timm-coordatt/mobilenetv2_050_ca.in1k')
    (tmp_path / 'README.md').write_text(card)
    with pytest.raises(PublishError, match="tells its readers to load 'hf-hub:timm-coordatt/mobilenetv2_050_ca.in1k', "
                                           "but the folder is being published to 'me/flowers'"):
        publish(tmp_path, 'me/flowers')
    assert (tmp_path / 'README.md').read_text() == card


def test_publish_refuses_incomplete_folder(tmp_path):
    (tmp_path / 'config.json').write_text('{}')
    with pytest.raises(PublishError, match='lacks model.safetensors'):
        publish(tmp_path, 'me/model')


def test_publish_refuses_a_folder_that_is_not_there(tmp_path):
    with pytest.raises(PublishError, match='nope is not a folder; expected a folder written by'):
        publish(tmp_path / 'nope', 'me/model')


def test_publish_refuses_other_architectures(tmp_path):
    save_for_hf(timm.create_model('resnet10t'), tmp_path, safe_serialization=True)
    with pytest.raises(PublishError, match="holds a 'resnet10t', not a model of timm_coordatt"):
        publish(tmp_path, 'me/model')
    assert not (tmp_path / 'README.md').exists()


def test_publish_refuses_weights_that_do_not_load(tmp_path):
    save_for_hf(timm.create_model('mobilenetv2_ca'), tmp_path, safe_serialization=True)
    save_file(timm.create_model('mobilenetv2_050_ca').state_dict(), tmp_path / 'model.safetensors')
    with pytest.raises(PublishError, match='does not load with timm.*do not fit mobilenetv2_ca'):
        publish(tmp_path, 'me/model')


def test_cli_reports_errors(tmp_path, capsys):
    assert 'publish' in COMMANDS
    parser = argparse.ArgumentParser(prog='timm-coordatt')
    publish_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(['publish', str(tmp_path), 'me/model', '--private'])
    assert args.private and args.repo_id == 'me/model'
    assert args.func(args) == 2
    assert 'lacks config.json and model.safetensors' in capsys.readouterr().err


@pytest.mark.parametrize('repo_id', ['noslash', 'a/b/c', 'me/bad name!'])
def test_publish_refuses_bad_repo_ids_before_writing_anything(repo_id, tmp_path):
    save_for_hf(timm.create_model('mobilenetv2_050_ca'), tmp_path, safe_serialization=True)
    with pytest.raises(PublishError, match='expected a Hub repository id <user or org>/<name>'):
        publish(tmp_path, repo_id)
    assert not (tmp_path / 'README.md').exists()  # a card naming a repository that is not there


@pytest.mark.parametrize('damage', ['config_not_json', 'config_empty', 'weights_garbage', 'weights_truncated'])
def test_publish_reports_broken_folders(damage, tmp_path):
    save_for_hf(timm.create_model('mobilenetv2_050_ca'), tmp_path, safe_serialization=True)
    config, weights = tmp_path / 'config.json', tmp_path / 'model.safetensors'
    if damage == 'config_not_json':
        config.write_text('{oops')
    elif damage == 'config_empty':
        config.write_text('{}')
    elif damage == 'weights_garbage':
        weights.write_bytes(b'\xff' * 3000)
    else:
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(PublishError, match=f'{tmp_path} does not load with timm: '):
        publish(tmp_path, 'me/model')
    assert not (tmp_path / 'README.md').exists()


def test_publish_refuses_an_empty_token_before_writing_anything(tmp_path):
    save_for_hf(timm.create_model('mobilenetv2_050_ca'), tmp_path, safe_serialization=True)
    with pytest.raises(PublishError, match=r'expected a Hub token \(hf_...\), got an empty one'):
        publish(tmp_path, 'me/model', token='')
    assert not (tmp_path / 'README.md').exists()


def test_publish_says_a_dataset_does_not_change_an_existing_card(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')  # the discard port: nothing listens
    save_for_hf(timm.create_model('mobilenetv2_050_ca'), tmp_path, safe_serialization=True)
    card = model_card(timm.create_model('mobilenetv2_050_ca'), 'me/model')
    (tmp_path / 'README.md').write_text(card)
    with pytest.raises(PublishError, match='cannot publish'):
        publish(tmp_path, 'me/model', token='hf_test', dataset='imagenet-1k')
    assert f"warning: {tmp_path / 'README.md'} exists and is published as it is: the dataset 'imagenet-1k' goes " \
           f"only into a model card that publish writes" in capsys.readouterr().err
    assert (tmp_path / 'README.md').read_text() == card


def test_publish_reports_an_unreachable_server(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')  # the discard port: nothing listens
    save_for_hf(timm.create_model('mobilenetv2_050_ca'), tmp_path, safe_serialization=True)
    parser = argparse.ArgumentParser(prog='timm-coordatt')
    publish_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(['publish', str(tmp_path), 'me/model', '--token', 'hf_test'])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert 'cannot publish to http://127.0.0.1:9' in err and 'Traceback' not in err
    assert not (tmp_path / 'README.md').exists()
