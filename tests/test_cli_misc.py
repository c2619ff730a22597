""" `timm-coordatt validate / predict / run`, the embedded dataset, and bad input for every command. """
import argparse
import json
import os
import re
import stat
import subprocess
import sys
import threading
import unicodedata

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import timm
import timm_coordatt  # noqa: F401  registers the models
from timm.data import ImageNetInfo, create_dataset, create_transform, resolve_data_config
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm_coordatt.cli import main
from timm_coordatt.datasets import GridShapes

from cli_helpers import (  # noqa: F401  (one_thread: autouse)
    cli, digest, make_image_folder, one_thread, save_turned, torchrun)
from model_helpers import randomise_

MODEL = 'mobilenetv2_050_ca'


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A finished 1-epoch run on a 3-class folder (shared by the validate / predict tests)."""
    root = tmp_path_factory.mktemp('trained')
    data = make_image_folder(root / 'data')
    run = str(root / 'run')
    assert main(['train', '--data-dir', data, '--val-fraction', '0.34', '--model', MODEL, '--epochs', '1',
                 '--batch-size', '3', '--img-size', '32', '--workers', '0', '--output', run]) == 0
    return run, data


# ---------------------------------------------------------------------------------------------
# the embedded dataset

def test_grid_shapes_is_deterministic_and_splits_differ():
    a, b = GridShapes('train', 8, img_size=48), GridShapes('train', 8, img_size=48)
    for i in range(8):
        (ia, la), (ib, lb) = a[i], b[i]
        assert la == lb and np.array_equal(np.asarray(ia), np.asarray(ib))
    val = GridShapes('validation', 8, img_size=48)
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(val[0][0]))
    assert a.classes == ['r0c0', 'r0c1', 'r0c2', 'r1c0', 'r1c1', 'r1c2', 'r2c0', 'r2c1', 'r2c2']


def test_grid_shapes_label_is_the_cell_of_the_only_shape():
    # without distractors the drawn pixels (far from the noisy background) must all lie in the label's cell
    ds = GridShapes('train', 40, img_size=60, grid=3, max_distractors=0)
    labels = []
    for i in range(len(ds)):
        img, label = ds[i]
        pixels = np.asarray(img).astype(int)
        background = np.median(pixels.reshape(-1, 3), axis=0)
        ys, xs = np.nonzero(np.abs(pixels - background).min(axis=-1) > 60)  # shapes differ in every channel
        assert len(ys) > 0
        row, col = divmod(label, 3)
        assert ys.min() >= row * 20 and ys.max() < (row + 1) * 20, (i, label)
        assert xs.min() >= col * 20 and xs.max() < (col + 1) * 20, (i, label)
        labels.append(label)
    assert len(set(labels)) >= 7  # every cell is a possible answer


def test_grid_shapes_rejects_bad_arguments():
    with pytest.raises(ValueError, match='split'):
        GridShapes('test')
    with pytest.raises(ValueError, match='img_size'):
        GridShapes(img_size=16, grid=3)
    # checked when made, not when the first image is drawn (in a DataLoader worker)
    for contrast in ((48, 24), (0, 0), (-10, 5), (24, 400), (24.5, 48)):
        with pytest.raises(ValueError, match=r'distractor_contrast must be integers 0 <= low < high <= 256'):
            GridShapes(distractor_contrast=contrast)
    with pytest.raises(ValueError, match='seed must be an integer >= 0, got -1'):
        GridShapes(seed=-1)


# ---------------------------------------------------------------------------------------------
# validate / predict

def test_validate_matches_an_independent_evaluation(run_dir, tmp_path, capsys):
    run, data = run_dir
    results_file = str(tmp_path / 'results.json')
    assert main(['validate', '--model', f'local-dir:{run}', '--data-dir', data, '--workers', '0',
                 '--results-file', results_file]) == 0
    results = json.load(open(results_file))
    assert f'top-1 {results["top1"]:.3f}%' in capsys.readouterr().out

    # the same evaluation written directly against timm
    model = timm.create_model(f'local-dir:{run}', pretrained=True).eval()
    config = resolve_data_config(model=model)
    assert results['img_size'] == config['input_size'][-1] == 32
    dataset = create_dataset('', root=data, transform=create_transform(**config))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(x)
    assert results['images'] == 9
    assert results['top1'] == pytest.approx((logits.argmax(1) == y).float().mean().item() * 100)
    assert results['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def test_predict_uses_the_run_label_names(run_dir, capsys):
    run, data = run_dir
    images = [os.path.join(data, 'dog', '0.png'), os.path.join(data, 'fox', '1.png')]
    # on the CPU, as the reference below (a GPU's convolutions round differently)
    assert main(['predict', '--model', f'local-dir:{run}', '--device', 'cpu', '--topk', '3', '--json', *images]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r['file'] for r in results] == images

    model = timm.create_model(f'local-dir:{run}', pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=model))
    for result, path in zip(results, images):
        with torch.no_grad():
            probs = model(transform(Image.open(path).convert('RGB'))[None]).softmax(-1)[0]
        order = probs.argsort(descending=True).tolist()
        names = ['cat', 'dog', 'fox']
        assert [p['label'] for p in result['predictions']] == [names[i] for i in order]
        assert [p['probability'] for p in result['predictions']] == pytest.approx(probs[order].tolist(), abs=1e-6)


def test_main_runs_off_the_main_thread(run_dir, capsys):
    """`main` called from a worker thread (a notebook's, a job runner's) runs the command: Python installs signal
    handlers from the main thread only, so the host's handling stays."""
    run, data = run_dir
    image = os.path.join(data, 'dog', '0.png')
    results = []
    worker = threading.Thread(target=lambda: results.append(
        main(['predict', '--model', f'local-dir:{run}', '--device', 'cpu', '--json', image])))
    worker.start()
    worker.join()
    assert results == [0]
    assert [r['file'] for r in json.loads(capsys.readouterr().out)] == [image]


def test_predict_names_imagenet_classes_for_a_1000_class_head(tmp_path, capsys):
    image = tmp_path / 'x.jpg'
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    assert main(['predict', '--model', MODEL, '--img-size', '32', '--topk', '2', '--json', str(image)]) == 0
    predictions = json.loads(capsys.readouterr().out)[0]['predictions']
    descriptions = ImageNetInfo().label_descriptions()
    assert [descriptions[p['index']] for p in predictions] == [p['label'] for p in predictions]


# ---------------------------------------------------------------------------------------------
# run

USER_SCRIPT = '''
import sys
import timm
model = timm.create_model('mobilenetv2_ca', num_classes=7)
rank = __import__('os').environ.get('RANK', '-')
print(f'rank={rank} name={__name__} argv={sys.argv[1:]} classes={model.num_classes}')
sys.exit(int(sys.argv[1]))
'''


def test_run_executes_a_script_with_the_models_registered(tmp_path):
    script = tmp_path / 'user_train.py'
    script.write_text(USER_SCRIPT)
    proc = cli('run', str(script), '3', '--model', 'mobilenetv2_ca')
    assert proc.returncode == 3, proc.stderr  # the script's own exit status
    assert "name=__main__ argv=['3', '--model', 'mobilenetv2_ca'] classes=7" in proc.stdout
    # without the package imported first, timm does not know the model
    plain = subprocess.run([sys.executable, str(script), '0'], capture_output=True, text=True, timeout=300)
    assert plain.returncode != 0 and 'Unknown model' in plain.stderr


POOL_SCRIPT = '''
import multiprocessing, sys, timm
def knows(name):
    return timm.is_model(name)
if __name__ == '__main__':
    with multiprocessing.get_context(sys.argv[1]).Pool(1) as pool:
        print('worker knows the model:', pool.apply(knows, ('mobilenetv2_ca',)))
'''


@pytest.mark.skipif('forkserver' not in __import__('multiprocessing').get_all_start_methods(), reason='POSIX only')
@pytest.mark.parametrize('start_method', ['fork', 'forkserver'])
def test_run_workers_of_the_script_know_the_models(start_method, tmp_path):
    # forkserver: Python 3.14's default on Linux; its server process imports the package before it forks workers
    script = tmp_path / 'pool_user.py'
    script.write_text(POOL_SCRIPT)
    proc = cli('run', str(script), start_method)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split('\n')[0] == 'worker knows the model: True'


ECHO_SCRIPT = '''
import os, sys
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a script finding its files after a chdir
print(repr(sys.argv[1:]), os.path.basename(sys.argv[0]), os.path.isfile(__file__))
'''


def test_run_is_python_script(tmp_path, monkeypatch, capsys):
    """`run SCRIPT ARGS` gives the script what `python SCRIPT ARGS` would: every argument after SCRIPT (a
    `--` too), `__file__` absolute (a script finds its files after a chdir), and a folder with a `__main__.py`
    runs that."""
    (tmp_path / 'app').mkdir()
    (tmp_path / 'app' / 'echo.py').write_text(ECHO_SCRIPT)
    (tmp_path / 'app' / '__main__.py').write_text(ECHO_SCRIPT)
    args = ['--', '--x', 'a', '--', 'b']
    for script, expected in ((os.path.join('app', 'echo.py'), f"{args!r} echo.py True"), ('app', f'{args!r} app')):
        monkeypatch.chdir(tmp_path)
        python = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300)
        assert python.returncode == 0, python.stderr
        monkeypatch.chdir(tmp_path)
        assert main(['run', script, *args]) == 0
        out = capsys.readouterr().out
        assert out.startswith(expected) and python.stdout.startswith(expected)


@pytest.mark.slow
def test_run_under_torchrun(tmp_path):
    script = tmp_path / 'user_train.py'
    script.write_text(USER_SCRIPT)
    proc = torchrun(tmp_path, '-m', 'timm_coordatt', 'run', str(script), '0')
    assert proc.returncode == 0, proc.stderr[-3000:]
    # anywhere in the output, which the two processes share (under load, one CI run had no line starting with
    # rank 0's); the output itself goes into the message should it fail
    assert sorted(re.findall(r'rank=(\d) name=__main__', proc.stdout)) == ['0', '1'], proc.stdout + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# bad input: a clear message, exit status 2, no traceback, nothing written or lost

def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert 'error:' in err and 'Traceback' not in err
    return err


def test_missing_data_dir(tmp_path, capsys):
    err = _error(capsys, ['train', '--data-dir', str(tmp_path / 'nope'), '--output', str(tmp_path / 'run')])
    assert 'does not exist' in err and str(tmp_path / 'nope') in err
    assert not os.path.exists(tmp_path / 'run')


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / 'data').mkdir()
    err = _error(capsys, ['train', '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path / 'run')])
    assert 'no class folders' in err


def test_class_folder_without_images(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data')
    os.makedirs(os.path.join(data, 'empty_class'))
    open(os.path.join(data, 'empty_class', 'notes.txt'), 'w').write('no images here')
    err = _error(capsys, ['train', '--data-dir', data, '--output', str(tmp_path / 'run')])
    assert 'empty_class' in err and 'no images' in err


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'truncated_jpeg'])
def test_corrupt_image(tmp_path, capsys, damage):
    data = make_image_folder(tmp_path / 'data')
    bad = os.path.join(data, 'dog', '1.png')
    if damage == 'garbage':
        open(bad, 'wb').write(b'this is not a png')
    else:
        if damage == 'truncated_jpeg':  # a JPEG's header reads fine: only decoding it finds the missing data
            os.remove(bad)
            bad = os.path.join(data, 'dog', '1.jpg')
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(bad)
        content = open(bad, 'rb').read()
        open(bad, 'wb').write(content[:len(content) // 2])
    err = _error(capsys, ['train', '--data-dir', data, '--output', str(tmp_path / 'run')])
    assert bad in err and 'cannot be read' in err
    err = _error(capsys, ['validate', '--model', MODEL, '--data-dir', data])
    assert bad in err
    err = _error(capsys, ['predict', '--model', MODEL, bad])
    assert bad in err


def test_16_bit_images(tmp_path, capsys):
    """timm's loader would clip a 16-bit image at 255 (nearly all white): train and validate refuse it,
    predict scales it to 8 bits."""
    data = make_image_folder(tmp_path / 'data')
    with Image.open(os.path.join(data, 'dog', '1.png')) as img:
        gray8 = np.asarray(img.convert('L'))
    deep = os.path.join(data, 'dog', '1.png')
    Image.fromarray(gray8.astype(np.uint16) * 257).save(deep)
    err = _error(capsys, ['train', '--data-dir', data, '--output', str(tmp_path / 'run')])
    assert deep in err and "expected an 8-bit image, got PIL mode I" in err
    err = _error(capsys, ['validate', '--model', MODEL, '--data-dir', data])
    assert "expected an 8-bit image, got PIL mode I" in err
    shallow = str(tmp_path / 'gray8.png')
    Image.fromarray(gray8).save(shallow)
    assert main(['predict', '--model', MODEL, '--img-size', '32', '--json', deep, shallow]) == 0
    deep_result, shallow_result = json.loads(capsys.readouterr().out)
    assert deep_result['predictions'] == shallow_result['predictions']


def test_photos_are_read_upright_as_their_exif_orientation_says(tmp_path, capsys):
    """A camera stores a portrait photo on its side with an EXIF tag saying how to turn it: train, validate and
    predict see each photo as viewers show it, the same as its upright copy without the tag (timm's loader
    alone reads it on its side)."""
    data = make_image_folder(tmp_path / 'data')
    folders = {'upright': str(tmp_path / 'upright'), 'turned': str(tmp_path / 'turned')}
    for cls in ('cat', 'dog', 'fox'):
        for folder in folders.values():
            os.makedirs(os.path.join(folder, cls))
        for i in range(3):
            with Image.open(os.path.join(data, cls, f'{i}.png')) as img:
                portrait = img.crop((0, 0, 28, 40))  # taller than wide: turned, the centre crop would differ
            portrait.save(os.path.join(folders['upright'], cls, f'{i}.png'))
            save_turned(portrait, os.path.join(folders['turned'], cls, f'{i}.png'))
    with Image.open(os.path.join(folders['turned'], 'cat', '0.png')) as img:
        assert img.size == (40, 28)  # stored on its side

    def read(path):
        with open(path) as f:
            return [json.loads(line) for line in f]

    metrics, validated, predicted = {}, {}, {}
    for name, folder in folders.items():
        run = str(tmp_path / f'run_{name}')
        assert main(['train', '--data-dir', folder, '--val-fraction', '0.34', '--model', MODEL, '--epochs', '1',
                     '--batch-size', '3', '--img-size', '32', '--workers', '0', '--output', run]) == 0
        metrics[name] = read(os.path.join(run, 'metrics.jsonl'))
        results_file = str(tmp_path / f'{name}.json')
        assert main(['validate', '--model', f'local-dir:{tmp_path / "run_upright"}', '--data-dir', folder,
                     '--workers', '0', '--results-file', results_file]) == 0
        with open(results_file) as f:
            validated[name] = json.load(f)
        capsys.readouterr()
        assert main(['predict', '--model', f'local-dir:{tmp_path / "run_upright"}', '--device', 'cpu', '--topk', '3',
                     '--json', os.path.join(folder, 'dog'), os.path.join(folder, 'fox', '1.png')]) == 0
        predicted[name] = [r['predictions'] for r in json.loads(capsys.readouterr().out)]
    assert metrics['turned'] == metrics['upright']
    assert validated['turned']['loss'] == pytest.approx(validated['upright']['loss'], rel=1e-6)
    assert validated['turned']['top1'] == validated['upright']['top1']
    assert len(predicted['upright']) == 4
    for turned, upright in zip(predicted['turned'], predicted['upright']):
        assert [p['index'] for p in turned] == [p['index'] for p in upright]
        assert [p['probability'] for p in turned] == pytest.approx([p['probability'] for p in upright], abs=1e-6)


def test_images_below_class_folders(tmp_path, capsys):
    """timm labels an image by the folder it is in: images in sub-folders would be dropped or mislabelled."""
    data = make_image_folder(tmp_path / 'data')
    os.makedirs(os.path.join(data, 'cat', 'indoor'))
    os.replace(os.path.join(data, 'cat', '0.png'), os.path.join(data, 'cat', 'indoor', '0.png'))
    os.makedirs(os.path.join(data, 'dog', 'fox'))  # would count as fox
    os.replace(os.path.join(data, 'dog', '0.png'), os.path.join(data, 'dog', 'fox', '0.png'))
    os.makedirs(os.path.join(data, 'fox', '.thumbnails'))  # hidden: not data, as for timm
    os.replace(os.path.join(data, 'fox', '0.png'), os.path.join(data, 'fox', '.thumbnails', '0.png'))
    err = _error(capsys, ['train', '--data-dir', data, '--output', str(tmp_path / 'run')])
    assert 'below its class folders (cat/indoor, dog/fox)' in err
    assert 'below its class folders' in _error(capsys, ['validate', '--model', MODEL, '--data-dir', data])
    assert not (tmp_path / 'run').exists()


def test_classes_in_timms_order(tmp_path, capsys):
    """An ImageFolder's outputs are in timm's class order (`2` before `10`, case ignored), so a checkpoint of
    timm's own train.py validates right, and a `train` run's label names are timm's order."""
    names = ('10', '2', '1', 'banana', 'Apple')
    data = make_image_folder(tmp_path / 'data', classes=names, per_class=2)
    timms_order = list(ReaderImageFolder(data).class_to_idx)  # what timm's train.py / validate.py use
    assert timms_order == ['1', '2', '10', 'Apple', 'banana']
    run = str(tmp_path / 'run')
    assert main(['train', '--data-dir', data, '--val-fraction', '0.5', '--model', MODEL, '--epochs', '1',
                 '--batch-size', '5', '--img-size', '32', '--workers', '0', '--output', run]) == 0
    with open(os.path.join(run, 'config.json')) as f:
        assert json.load(f)['label_names'] == timms_order

    # a checkpoint without label names (timm's train.py writes none): outputs in timm's order
    model = randomise_(timm.create_model(MODEL, num_classes=len(names)))
    checkpoint = str(tmp_path / 'timm_train_py.pth')
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    results_file = str(tmp_path / 'results.json')
    assert main(['validate', '--model', MODEL, '--checkpoint', checkpoint, '--data-dir', data, '--img-size', '32',
                 '--workers', '0', '--results-file', results_file]) == 0
    with open(results_file) as f:
        loss = json.load(f)['loss']
    dataset = create_dataset('', root=data, transform=create_transform(input_size=(3, 32, 32)))  # timm's
    x, y = torch.stack([image for image, _ in dataset]), torch.tensor([label for _, label in dataset])
    with torch.no_grad():
        assert loss == pytest.approx(torch.nn.functional.cross_entropy(model.eval()(x), y).item(), rel=1e-5)


def test_a_resumed_run_keeps_its_class_order(tmp_path, capsys):
    """A run recorded its classes in another order (a run of a version that sorted them as strings): resumed,
    its outputs keep their meaning."""
    data = make_image_folder(tmp_path / 'data', classes=('2', '10'), per_class=3)
    run = str(tmp_path / 'run')
    common = ['--val-fraction', '0.34', '--model', MODEL, '--batch-size', '2', '--img-size', '32', '--workers', '0']
    assert main(['train', '--data-dir', data, '--epochs', '1', '--output', run, *common]) == 0
    state_file = os.path.join(run, 'training_state.pt')
    state = torch.load(state_file, weights_only=True)
    assert state['class_names'] == ['2', '10']
    state['class_names'] = ['10', '2']
    torch.save(state, state_file)
    assert main(['train', '--resume', run, '--epochs', '2']) == 0
    with open(os.path.join(run, 'config.json')) as f:
        assert json.load(f)['label_names'] == ['10', '2']


def test_class_names_spelt_decomposed_are_the_same_classes(tmp_path, capsys):
    """macOS (and zips made there) may spell `café` decomposed (NFD): the same class as the composed `café`
    to train's validation folder, validate, and a resumed run."""
    composed = ('café', 'thé')
    decomposed = tuple(unicodedata.normalize('NFD', name) for name in composed)
    assert decomposed != composed
    data = tmp_path / 'data'
    make_image_folder(data / 'train', classes=composed, per_class=3)
    make_image_folder(data / 'val', classes=decomposed, per_class=2)
    run = str(tmp_path / 'run')
    assert main(['train', '--data-dir', str(data), '--model', MODEL, '--epochs', '1', '--batch-size', '2',
                 '--img-size', '32', '--workers', '0', '--output', run]) == 0
    results = {}
    for name, folder in (('composed', data / 'train'), ('decomposed', tmp_path / 'decomposed')):
        if name == 'decomposed':
            make_image_folder(folder, classes=decomposed, per_class=3)  # train's images, spelt otherwise
        results_file = str(tmp_path / f'{name}.json')
        assert main(['validate', '--model', f'local-dir:{run}', '--data-dir', str(folder), '--workers', '0',
                     '--results-file', results_file]) == 0
        with open(results_file) as f:
            results[name] = json.load(f)
    assert results['decomposed'] == results['composed']
    for name, other in zip(composed, decomposed):
        os.rename(data / 'train' / name, data / 'train' / other)
    assert main(['train', '--resume', run, '--epochs', '2']) == 0


def test_what_is_not_data_in_a_users_folder(tmp_path, capsys):
    """Hidden files and folders and macOS's `__MACOSX` are no data (timm's reader alone would label
    `.backup/dog/*` as dogs and fail on macOS's `._*` resource files); bmp, gif, tif and webp images are, as
    for `predict`."""
    clean = make_image_folder(tmp_path / 'clean')
    data = make_image_folder(tmp_path / 'data')  # the same pictures, one of each class in another format
    for cls, ext in (('cat', 'webp'), ('dog', 'bmp'), ('fox', 'tif')):
        os.remove(os.path.join(data, cls, '0.png'))
        with Image.open(os.path.join(clean, cls, '0.png')) as img:
            img.save(os.path.join(data, cls, f'0.{ext}'), **({'lossless': True} if ext == 'webp' else {}))
    make_image_folder(os.path.join(data, '.backup'), classes=('dog',), seed=1)  # would be dogs to timm
    for folder in (os.path.join(data, '__MACOSX', 'cat'), os.path.join(data, 'cat')):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, '._1.png'), 'wb') as f:
            f.write(b'\x00\x05\x16\x07' + bytes(60))  # an AppleDouble file: no image
    results = {}
    for name, folder in (('clean', str(clean)), ('data', data)):
        results_file = str(tmp_path / f'{name}.json')
        if name == 'clean':
            assert main(['train', '--data-dir', folder, '--val-fraction', '0.34', '--model', MODEL, '--epochs',
                         '1', '--batch-size', '3', '--img-size', '32', '--workers', '0',
                         '--output', str(tmp_path / 'run')]) == 0
        assert main(['validate', '--model', f'local-dir:{tmp_path / "run"}', '--data-dir', folder, '--workers', '0',
                     '--results-file', results_file]) == 0
        with open(results_file) as f:
            results[name] = json.load(f)
    assert results['data']['images'] == results['clean']['images'] == 9
    assert results['data']['loss'] == pytest.approx(results['clean']['loss'], rel=1e-6)
    capsys.readouterr()
    assert main(['train', '--data-dir', data, '--val-fraction', '0.34', '--model', MODEL, '--epochs', '1',
                 '--batch-size', '3', '--img-size', '32', '--workers', '0', '--output', str(tmp_path / 'run2')]) == 0
    assert '(6 train / 3 held-out images)' in capsys.readouterr().err
    assert main(['predict', '--model', MODEL, '--img-size', '32', '--json', os.path.join(data, 'cat')]) == 0
    files = [os.path.basename(r['file']) for r in json.loads(capsys.readouterr().out)]
    assert files == ['0.webp', '1.png', '2.png']


@pytest.mark.parametrize('layout', ['one level too high', 'split folders in capitals'])
def test_folder_layouts_users_have(layout, tmp_path, capsys):
    root = tmp_path / 'download'
    if layout == 'one level too high':
        make_image_folder(root / 'flowers', classes=('daisy', 'rose'), per_class=2)
        for command in (['train', '--output', str(tmp_path / 'run')], ['validate', '--model', MODEL]):
            err = _error(capsys, [*command, '--data-dir', str(root)])
            assert (f'the folders of {root} hold folders of images, no images (flowers/daisy, flowers/rose): '
                    f'expected {root}/<class name>/<image>. Is the dataset a level down (--data-dir '
                    f'{root / "flowers"})?') in err
    else:
        make_image_folder(root / 'Train', classes=('daisy', 'rose'), per_class=3)
        make_image_folder(root / 'VAL', classes=('daisy', 'rose'), per_class=1)
        assert main(['train', '--data-dir', str(root), '--model', MODEL, '--epochs', '1', '--batch-size', '2',
                     '--img-size', '32', '--workers', '0', '--output', str(tmp_path / 'run')]) == 0
        assert f'{root / "Train"} / {root / "VAL"}' in capsys.readouterr().err


def test_validate_needs_folders_it_can_match(run_dir, tmp_path, capsys):
    run, _ = run_dir  # classes cat, dog, fox
    train_only = tmp_path / 'train_only'
    make_image_folder(train_only / 'train')
    err = _error(capsys, ['validate', '--model', f'local-dir:{run}', '--data-dir', str(train_only)])
    assert 'no validation folder' in err and str(train_only / 'train') in err
    other = make_image_folder(tmp_path / 'other', classes=('x', 'y', 'z'))
    err = _error(capsys, ['validate', '--model', f'local-dir:{run}', '--data-dir', other])
    assert 'none of the class folders' in err and '(x, y, z)' in err and '(cat, dog, fox)' in err


def test_unknown_model(tmp_path, capsys):
    err = _error(capsys, ['train', '--model', 'mobilenetv2_ca_typo', '--output', str(tmp_path / 'run')])
    assert "unknown model 'mobilenetv2_ca_typo'" in err and 'mobilenetv2_ca' in err
    _error(capsys, ['validate', '--model', 'no_such_model'])
    _error(capsys, ['predict', '--model', 'no_such_model', __file__])


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    ckpt = str(tmp_path / 'resnet.safetensors')
    import safetensors.torch
    safetensors.torch.save_file(timm.create_model('resnet10t', num_classes=9).state_dict(), ckpt)
    err = _error(capsys, ['train', '--model', MODEL, '--initial-checkpoint', ckpt, '--output', str(tmp_path / 'run')])
    assert 'does not fit mobilenetv2_050_ca' in err and 'missing' in err
    err = _error(capsys, ['validate', '--model', MODEL, '--checkpoint', ckpt])
    assert 'does not fit' in err


def test_impossible_option_combinations(tmp_path, capsys):
    out = str(tmp_path / 'run')
    assert '--sync-bn' in _error(capsys, ['train', '--sync-bn', '--output', out])
    ckpt = str(tmp_path / 'w.safetensors')
    err = _error(capsys, ['train', '--pretrained', '--initial-checkpoint', ckpt, '--output', out])
    assert '--pretrained' in err and '--initial-checkpoint' in err
    assert '--warmup-epochs' in _error(capsys, ['train', '--epochs', '2', '--warmup-epochs', '2', '--output', out])
    assert not os.path.exists(out)


@pytest.mark.parametrize('command, option, value, message', [
    ('train', '--grid', '1', '--grid must be >= 2, got 1'),
    ('train', '--img-size', '10', 'needs --img-size >= 24, got 10'),
    ('train', '--img-size', '-5', '--img-size must be >= 1, got -5'),
    ('train', '--workers', '-1', '--workers must be >= 0, got -1'),
    ('train', '--min-lr', '-1', '--min-lr must be >= 0, got -1.0'),
    ('train', '--weight-decay', '-1', '--weight-decay must be >= 0, got -1.0'),
    ('train', '--seed', '-1', '--seed must be in [0, 2**32), got -1'),
    ('train', '--seed', str(2 ** 32), f'--seed must be in [0, 2**32), got {2 ** 32}'),
    ('train', '--layer-decay', '-1', '--layer-decay must be > 0, got -1.0'),
    ('train', '--clip-grad', '0', '--clip-grad must be > 0, got 0.0'),
    ('train', '--device', 'nonsense', "cannot use device 'nonsense'"),
    ('train', '--weight-decay', 'nan', '--weight-decay must be a finite number, got nan'),
    ('train', '--layer-decay', 'nan', '--layer-decay must be a finite number, got nan'),
    ('train', '--lr', 'inf', '--lr must be a finite number, got inf'),
    ('train', '--warmup-lr', 'nan', '--warmup-lr must be a finite number, got nan'),
    ('validate', '--batch-size', '0', '--batch-size must be >= 1, got 0'),
    ('validate', '--workers', '-1', '--workers must be >= 0, got -1'),
    ('validate', '--grid-val-samples', '0', '--grid-val-samples must be >= 1, got 0'),
    ('validate', '--img-size', '0', '--img-size must be >= 1, got 0'),
    ('predict', '--batch-size', '-1', '--batch-size must be >= 1, got -1'),
    ('predict', '--img-size', '-4', '--img-size must be >= 1, got -4'),
])
def test_option_values_out_of_range(command, option, value, message, tmp_path, capsys):
    out = tmp_path / 'run'
    argv = {'train': ['train', '--output', str(out)], 'validate': ['validate', '--model', MODEL],
            'predict': ['predict', '--model', MODEL, __file__]}[command]
    assert message in _error(capsys, argv + [option, value])
    assert not out.exists()


@pytest.mark.parametrize('item', ['num_classes=5', 'pretrained=True', 'in_chans=1'])
def test_model_kwargs_train_sets_itself(item, tmp_path, capsys):
    err = _error(capsys, ['train', '--model-kwargs', item, '--output', str(tmp_path / 'run')])
    assert f'--model-kwargs {item.split("=")[0]}: train sets it itself' in err
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('command', ['validate', 'predict', 'attention'])
@pytest.mark.parametrize('item', ['num_classes=5', 'pretrained=True', 'in_chans=1'])
def test_model_kwargs_the_command_sets_itself(command, item, tmp_path, capsys):
    argv = {'validate': ['validate'], 'predict': ['predict', __file__],
            'attention': ['attention', __file__, '--out', str(tmp_path / 'maps.png')]}[command]
    err = _error(capsys, argv + ['--model', MODEL, '--model-kwargs', item])
    assert f'--model-kwargs {item.split("=")[0]}: {command} sets it itself' in err


@pytest.mark.parametrize('command', ['train', 'predict', 'attention'])
@pytest.mark.parametrize('item', ['drop_rate=abc', 'drop_path_rate=-5', 'drop_rate=1.5'])
def test_model_kwargs_drop_rates_are_probabilities(command, item, tmp_path, capsys):
    """Which the model would take, then fail on in its forward (a string) or ignore."""
    argv = {'train': ['train', '--output', str(tmp_path / 'run')], 'predict': ['predict', __file__, '--model', MODEL],
            'attention': ['attention', __file__, '--model', MODEL, '--out', str(tmp_path / 'maps.png')]}[command]
    err = _error(capsys, argv + ['--model-kwargs', item])
    assert f'--model-kwargs {item.split("=")[0]} expected a probability in [0, 1), got' in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('command', ['validate', 'predict'])
def test_evaluation_needs_a_classifier_and_a_size_the_model_takes(command, capsys):
    argv = {'validate': ['validate'], 'predict': ['predict', __file__]}[command]
    err = _error(capsys, argv + ['--model', MODEL, '--model-kwargs', 'features_only=True'])
    assert f'{command} needs class scores, but {MODEL} has no classifier (a features_only model)' in err
    # a ViT's patch grid is fixed at its default size
    err = _error(capsys, argv + ['--model', 'vit_tiny_patch16_224', '--img-size', '96'])
    assert "vit_tiny_patch16_224 cannot take --img-size 96 (AssertionError: Input height (96) doesn't match" in err


def test_model_kwargs_rebuild_the_architecture_of_a_checkpoint(tmp_path, capsys):
    # a model trained with timm's train.py --model-kwargs (CA in a ResNet's blocks): its checkpoint fits only the
    # architecture those arguments build
    kwargs = "block_args={'attn_layer': 'ca'}"
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=9, block_args={'attn_layer': 'ca'})
    checkpoint = str(tmp_path / 'resnet10t_ca.safetensors')
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint)
    assert 'does not fit resnet10t' in _error(capsys, ['validate', '--model', 'resnet10t', '--checkpoint', checkpoint])
    image = tmp_path / 'image.png'
    Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(image)
    out = tmp_path / 'maps.png'
    for argv in (['validate', '--grid-val-samples', '8', '--img-size', '48'], ['predict', str(image), '--json'],
                 ['attention', str(image), '--out', str(out), '--dpi', '20']):
        assert main(argv + ['--model', 'resnet10t', '--checkpoint', checkpoint, '--model-kwargs', kwargs]) == 0
        captured = capsys.readouterr()
        assert 'error' not in captured.err, captured.err
    assert out.is_file()


def test_output_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / 'afile').write_text('')
    err = _error(capsys, ['train', '--output', str(tmp_path / 'afile' / 'run')])
    afile = tmp_path / 'afile'
    assert f'cannot create the run directory {afile / "run"}: {afile} is not a directory' in err


def test_model_kwargs_without_a_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(['train', '--model-kwargs', 'drop_rate', '--output', str(tmp_path / 'run')])
    assert e.value.code == 2
    assert '--model-kwargs expected KEY=VALUE items, got drop_rate' in capsys.readouterr().err


def test_results_file_that_cannot_be_written_is_refused_before_evaluating(run_dir, tmp_path, capsys):
    run, data = run_dir
    argv = ['validate', '--model', f'local-dir:{run}', '--data-dir', data, '--workers', '0', '--results-file']
    assert 'is a directory' in _error(capsys, argv + [str(tmp_path)])
    blocker = tmp_path / 'file'
    blocker.write_text('')
    assert 'cannot create its folder' in _error(capsys, argv + [str(blocker / 'results.json')])
    assert capsys.readouterr().out == ''  # refused before the evaluation printed its results
    if sys.platform == 'linux':  # a folder no one can write in, root included
        assert 'results.json: cannot write in /proc (' in _error(capsys, argv + ['/proc/results.json'])
        assert capsys.readouterr().out == ''
    results = tmp_path / 'new' / 'results.json'
    assert main(argv + [str(results)]) == 0
    assert json.loads(results.read_text())['images'] > 0


def test_results_file_through_a_link_or_into_a_pipe(run_dir, tmp_path, capsys):
    """Through a symbolic link the file it points to is written; a FIFO and the process's own stdout (`/dev/fd/1`,
    as `/dev/stdout`) are written as they are: none is replaced by a file."""
    run, data = run_dir
    argv = ['validate', '--model', f'local-dir:{run}', '--data-dir', data, '--workers', '0', '--results-file']
    target, link = tmp_path / 'real.json', tmp_path / 'link.json'
    target.write_text('old results')
    link.symlink_to(target)
    assert main(argv + [str(link)]) == 0
    assert link.is_symlink() and json.loads(target.read_text())['images'] > 0
    fifo = tmp_path / 'fifo.json'
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, so that the writer does not wait; the pipe holds it
    try:
        assert main(argv + [str(fifo)]) == 0
        assert json.loads(os.read(reader, 1 << 16))['images'] > 0
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    proc = cli(*argv, '/dev/fd/1')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout[proc.stdout.index('{'):])['images'] > 0
    # stdout a file the shell opened (`> out`): the summary printed first is kept, the results follow it
    with open(tmp_path / 'out', 'w') as out:
        proc = subprocess.run([sys.executable, '-m', 'timm_coordatt', *argv, '/dev/stdout'], stdout=out,
                              stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary, results = (tmp_path / 'out').read_text().split('\n', 1)
    assert 'top-1' in summary and json.loads(results)['images'] > 0


@pytest.mark.parametrize('command', ['train', 'validate', 'predict'])
def test_help_gives_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert '(default: None)' not in text and '(default: {})' not in text
    # a default the help states in words is not stated again; the others are added
    assert "(default: the model's" in text and ") (default:" not in text.split("(default: the model's")[1][:80]
    assert '--channels-last channels-last memory layout (default: False)' in text


def test_run_files_follow_the_umask(run_dir):
    umask = os.umask(0o022)
    os.umask(umask)
    run, _ = run_dir
    modes = {os.path.relpath(os.path.join(d, f), run): oct(os.stat(os.path.join(d, f)).st_mode & 0o777)
             for d, _, files in os.walk(run) for f in files}
    assert 'model.safetensors' in modes and 'best/model.safetensors' in modes
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


@pytest.mark.parametrize('argv, message', [
    (['run', str(os.path.join('no', 'such', 'script.py'))], 'no such script'),
    (['run', os.path.dirname(__file__)], 'is a folder without a __main__.py; expected a Python script'),
    (['run', '-m', 'no_such_module_of_timm_coordatt'], 'no module named no_such_module_of_timm_coordatt'),
    (['run', '-m', 'no_such_package.module'], 'no module named no_such_package.module'),
])
def test_run_without_its_script(argv, message, capsys):
    assert message in _error(capsys, argv)


def test_nothing_written_is_lost(run_dir, tmp_path, capsys):
    run, data = run_dir
    before = digest(run)
    # a new run into a used directory, and a resume that changes the run's options: both refused
    assert 'not empty; pass --resume' in _error(capsys, ['train', '--data-dir', data, '--output', run])
    err = _error(capsys, ['train', '--resume', run, '--lr', '0.5'])
    assert '--lr 0.5' in err
    assert digest(run) == before


def test_a_run_stopped_before_its_first_checkpoint_is_named(tmp_path, capsys):
    """A run interrupted twice before its first checkpoint leaves some files but nothing to resume."""
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'config.json').write_text('{}')
    err = _error(capsys, ['train', '--output', str(out)])
    assert f'output directory {out} is not empty and holds no training_state.pt to resume' in err


def test_bad_input_from_the_console_has_no_traceback(tmp_path):
    proc = cli('train', '--data-dir', str(tmp_path / 'missing'), '--output', str(tmp_path / 'run'))
    assert proc.returncode == 2
    assert 'error:' in proc.stderr and 'Traceback' not in proc.stderr


def test_run_module_shows_the_import_error_of_its_package(tmp_path, monkeypatch):
    # a package that exists but fails to import: its own error, as `python -m` shows it
    (tmp_path / 'broken_pkg').mkdir()
    (tmp_path / 'broken_pkg' / '__init__.py').write_text('import a_dependency_that_is_not_installed\n')
    (tmp_path / 'broken_pkg' / 'mod.py').write_text('print("ran")\n')
    monkeypatch.chdir(tmp_path)
    proc = cli('run', '-m', 'broken_pkg.mod')
    assert proc.returncode == 1 and "No module named 'a_dependency_that_is_not_installed'" in proc.stderr
    assert 'no module named broken_pkg.mod' not in proc.stderr


# ---------------------------------------------------------------------------------------------
# predict and validate: images, weights

def test_predict_reads_a_batch_of_images_at_a_time(tmp_path, capsys, monkeypatch):
    for i in range(6):
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(tmp_path / f'{i}.png')
    opened, at_first_forward = [], []
    original_open = Image.open
    monkeypatch.setattr(Image, 'open', lambda *a, **k: opened.append(a[0]) or original_open(*a, **k))

    def first_forward(module, args):  # of the model (torchvision's transforms are modules too) on the images
        # (not on the blank image that checks --img-size)
        if isinstance(module, timm.models.EfficientNet) and args[0].shape[0] == 2 and not at_first_forward:
            at_first_forward.append(len(opened))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(first_forward)
    try:
        assert main(['predict', '--model', MODEL, '--img-size', '32', '-b', '2', '--json', str(tmp_path)]) == 0
    finally:
        handle.remove()
    assert at_first_forward == [2] and len(opened) == 6
    assert [r['file'] for r in json.loads(capsys.readouterr().out)] == [str(tmp_path / f'{i}.png') for i in range(6)]


def test_predict_finds_the_image_formats_pil_reads_in_a_folder(tmp_path, capsys):
    for ext in ('png', 'webp', 'bmp', 'tif'):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / f'image.{ext}')
    (tmp_path / 'notes.txt').write_text('not an image')
    assert main(['predict', '--model', MODEL, '--img-size', '32', '--json', str(tmp_path)]) == 0
    files = [os.path.basename(r['file']) for r in json.loads(capsys.readouterr().out)]
    assert files == ['image.bmp', 'image.png', 'image.tif', 'image.webp']
    # a dataset's root: its images are in the folders in it
    err = _error(capsys, ['predict', '--model', MODEL, make_image_folder(tmp_path / 'data')])
    assert (f'no image files in {tmp_path / "data"}: expected files ending in .bmp, .gif, .jpeg, .jpg, .png, .tif, '
            f'.tiff, .webp (a folder\'s own, not those of the folders in it)') in err


def test_predict_warns_of_random_weights(tmp_path, capsys):
    image = tmp_path / 'x.png'
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    assert main(['predict', '--model', MODEL, '--img-size', '32', str(image)]) == 0
    assert f'warning: {MODEL} has random weights' in capsys.readouterr().err
    weights = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(timm.create_model(MODEL).state_dict(), weights)
    assert main(['predict', '--model', MODEL, '--checkpoint', str(weights), '--img-size', '32', str(image)]) == 0
    assert 'random weights' not in capsys.readouterr().err


def test_amp_is_a_flag_with_its_dtype_apart(tmp_path, capsys):
    image = tmp_path / 'x.png'
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    # `--amp IMAGE` once read the image as --amp's value
    assert main(['predict', '--model', MODEL, '--img-size', '32', '--json', '--amp', str(image)]) == 0
    assert json.loads(capsys.readouterr().out)[0]['file'] == str(image)
    assert main(['predict', '--model', MODEL, '--img-size', '32', '--amp', '--amp-dtype', 'bfloat16', str(image)]) == 0
    capsys.readouterr()
    assert '--amp-dtype float16 goes with --amp' in _error(
        capsys, ['predict', '--model', MODEL, '--amp-dtype', 'float16', str(image)])


def _checkpoint_with_ema(path, **extra):
    """A timm train.py-style checkpoint: plain and EMA weights that differ, and the script's arguments."""
    torch.manual_seed(0)
    plain, ema = timm.create_model(MODEL, num_classes=4), timm.create_model(MODEL, num_classes=4)
    torch.save({'state_dict': plain.state_dict(), 'state_dict_ema': ema.state_dict(), **extra}, path)
    return plain.state_dict(), ema.state_dict()


def test_checkpoint_plain_weights_unless_use_ema(tmp_path, capsys):
    from timm_coordatt.training import create_model
    path = tmp_path / 'checkpoint.pth.tar'
    plain, ema = _checkpoint_with_ema(path, args=argparse.Namespace(lr=0.1, model=MODEL))  # as timm's train.py
    for use_ema, expected in ((False, plain), (True, ema)):
        loaded = create_model(MODEL, checkpoint=str(path), use_ema=use_ema).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    image = tmp_path / 'x.png'
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    assert '--use-ema picks the EMA weights of a --checkpoint' in _error(
        capsys, ['predict', '--model', MODEL, '--use-ema', str(image)])


class _Payload:
    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoint_is_never_unpickled(tmp_path, capsys):
    """Whatever timm's default (timm < 1.0.26's load_state_dict unpickles anything unless told not to)."""
    from timm_coordatt.training import UsageError, create_model
    payload = _Payload()
    payload.marker = str(tmp_path / 'code_ran')
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': timm.create_model(MODEL).state_dict(), 'extra': payload}, path)
    with pytest.raises(UsageError, match=r'holds a \S*mkdir, which only unpickling arbitrary code could read'):
        create_model(MODEL, checkpoint=str(path))
    assert not os.path.exists(payload.marker)


@pytest.mark.parametrize('content', [b'', b'not a checkpoint\n', None], ids=['empty', 'text', 'png'])
def test_a_file_that_is_no_checkpoint_is_named_so(tmp_path, content):
    """Not a refusal of unsafe globals, whatever the unpickler raised on the bytes (timm raises torch's
    refusal again as a RuntimeError)."""
    from timm_coordatt.training import UsageError, create_model
    path = tmp_path / 'weights.pth'
    if content is None:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format='PNG')
    else:
        path.write_bytes(content)
    with pytest.raises(UsageError) as info:
        create_model(MODEL, checkpoint=str(path))
    assert str(info.value) == f'cannot read checkpoint {path}: not a file torch.save wrote (or damaged)'


def test_backbone_checkpoint_fine_tunes_with_a_new_head_and_predicts_nothing(tmp_path):
    """Weights saved from a model without a classifier (num_classes=0): fine-tuning loads them under a new head,
    while a model to predict with needs the checkpoint's own."""
    from timm_coordatt.training import UsageError, create_model
    backbone = timm.create_model(MODEL, num_classes=0)
    path = tmp_path / 'backbone.safetensors'
    safetensors.torch.save_file(backbone.state_dict(), path)
    model = create_model(MODEL, num_classes=5, checkpoint=str(path))
    assert model.get_classifier().out_features == 5
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in backbone.state_dict().items())
    with pytest.raises(UsageError, match=r'has no classifier \(classifier\.weight\), only the weights before it'):
        create_model(MODEL, checkpoint=str(path))


def test_checkpoint_folder_is_refused_with_a_hint(run_dir, capsys):
    run, data = run_dir
    err = _error(capsys, ['predict', '--model', MODEL, '--checkpoint', run, os.path.join(data, 'dog', '0.png')])
    assert f'checkpoint {run} is a folder' in err and f'local-dir:{run}' in err


def test_hf_hub_model_offline_without_a_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from timm_coordatt.training import UsageError, create_model
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    with pytest.raises(UsageError, match=r'offline mode is on \(HF_HUB_OFFLINE=1\) and its files are not in the Hub '
                                         r'cache .*empty-cache'):
        create_model('hf-hub:someone/some-model')


@pytest.mark.parametrize('revision', ['', '@main'])
def test_hf_hub_model_with_a_damaged_cached_config_names_the_file(tmp_path, monkeypatch, revision):
    from huggingface_hub import constants
    from timm_coordatt.training import UsageError, create_model
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    # the Hub cache's layout: the branch's commit, and that commit's snapshot of the file
    repo = tmp_path / 'cache' / 'models--someone--some-model'
    config = repo / 'snapshots' / ('0' * 40) / 'config.json'
    config.parent.mkdir(parents=True)
    config.write_text('{"architecture": "mobilenetv2_050_ca", "num_cl')  # cut short
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('0' * 40)
    with pytest.raises(UsageError, match=f'the cached {re.escape(str(config))} is not valid JSON .*; delete it'):
        create_model(f'hf-hub:someone/some-model{revision}')


def test_only_attention_imports_matplotlib():
    # matplotlib writes a cache under $HOME, and warns on stderr where it cannot: not for `models`, `train`, ...
    code = 'import sys; from timm_coordatt.cli import build_parser; build_parser(); print("matplotlib" in sys.modules)'
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ['False'], proc.stderr


def test_output_to_a_closed_pipe_ends_quietly():
    """`timm-coordatt models | head`: the reader may stop before the output ends (here: before it starts)."""
    proc = subprocess.Popen([sys.executable, '-m', 'timm_coordatt', 'models'], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 1 and err == ''
