""" `timm-coordatt train`: run directory, exact resume, Ctrl-C, freezing, DDP. """
import argparse
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import timm
import timm_coordatt  # noqa: F401  registers the models
from timm.data import resolve_data_config
from timm.models import register_model, save_for_hf
from timm.scheduler import create_scheduler_v2
from timm.utils import random_seed
from timm_coordatt import training
from timm_coordatt.cli import main
from timm_coordatt.recompute import recompute_active

from cli_helpers import digest, make_image_folder, one_thread, torchrun  # noqa: F401  (one_thread: an autouse fixture)
from hub_server import HubServer
from model_helpers import create_as_transformers_does

MODEL = 'mobilenetv2_050_ca'
# small, fast, and on the embedded task: a handful of steps per epoch at 32 px
TINY = ['--img-size', '32', '--workers', '0', '--grid-val-samples', '16']
# bit-for-bit comparisons of two runs: on the CPU (on a GPU cuDNN's and atomic-add reductions vary run to run)
EXACT = ['--device', 'cpu']


def read_metrics(run):
    with open(os.path.join(run, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def load_weights(path):
    return safetensors.torch.load_file(path)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'


def test_train_on_image_folder_writes_a_loadable_run(tmp_path):
    data = tmp_path / 'data'
    make_image_folder(data / 'train', per_class=4)
    make_image_folder(data / 'val', per_class=2, seed=1)
    run = str(tmp_path / 'run')
    rc = main(['train', '--data-dir', str(data), '--model', MODEL, '--epochs', '2', '--batch-size', '4',
               '--img-size', '32', '--workers', '0', '--model-ema', '--output', run])
    assert rc == 0
    assert sorted(os.listdir(run)) == sorted(
        ['best', 'config.json', 'ema', 'metrics.jsonl', 'model.safetensors', 'training_state.pt'])
    assert sorted(os.listdir(os.path.join(run, 'ema'))) == ['config.json', 'model.safetensors']
    assert sorted(os.listdir(os.path.join(run, 'best'))) == ['config.json', 'model.safetensors']

    records = read_metrics(run)
    assert [r['epoch'] for r in records] == [1, 2]
    for r in records:
        assert r['val_images'] == 6 and 0 <= r['val_top1'] <= r['val_top5'] <= 100 and r['val_loss'] > 0
        assert 'ema_val_top1' in r and r['train_loss'] > 0

    # the resumable state loads without unpickling arbitrary objects and holds the latest weights
    state = torch.load(os.path.join(run, 'training_state.pt'), weights_only=True)
    assert state['progress']['epoch'] == 2
    assert_same_tensors(load_weights(os.path.join(run, 'model.safetensors')),
                        {k: v for k, v in state['model'].items()})

    # timm itself loads the run directory: architecture, head size, class names and data config
    config = json.load(open(os.path.join(run, 'config.json')))
    assert config['architecture'] == MODEL and config['label_names'] == ['cat', 'dog', 'fox']
    model = timm.create_model(f'local-dir:{run}', pretrained=True)
    assert model.num_classes == 3
    assert_same_tensors(model.state_dict(), state['model'])
    assert_same_tensors(create_as_transformers_does(run).state_dict(), state['model'])  # transformers too
    data_config = resolve_data_config(model=model)
    assert tuple(data_config['input_size']) == (3, 32, 32)
    # the EMA weights load the same way and are the training state's EMA
    ema = timm.create_model(f'local-dir:{run}/ema', pretrained=True)
    assert_same_tensors(ema.state_dict(), {k[len('module.'):]: v for k, v in state['model_ema'].items()})
    # and they are an average of the steps: moved from the initialisation (BN running means start at exactly
    # zero), not the final weights
    ema_state = ema.state_dict()
    assert all(ema_state[k].abs().sum() > 0 for k in ema_state if k.endswith('running_mean'))
    assert not torch.equal(ema_state['conv_stem.weight'], state['model']['conv_stem.weight'])


def test_resume_at_epoch_boundary_is_exact(tmp_path):
    # a schedule that does not depend on the number of epochs, so 1 + 1 epochs must equal 2
    common = ['--model', MODEL, '--grid-samples', '32', '--batch-size', '8', '--sched', 'constant',
              '--warmup-epochs', '0', *TINY, *EXACT]
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    assert main(['train', *common, '--epochs', '2', '--output', straight]) == 0
    assert main(['train', *common, '--epochs', '1', '--output', split]) == 0
    # the resumed epoch recomputes CA outputs in backward (a memory option a resume may change)
    assert main(['train', '--resume', split, '--epochs', '2', '--recompute-ca']) == 0
    assert_same_tensors(load_weights(os.path.join(straight, 'model.safetensors')),
                        load_weights(os.path.join(split, 'model.safetensors')))
    assert read_metrics(straight) == read_metrics(split)


FORWARD_MODES = []  # (training, recompute active) of each forward of the probe model below


@register_model
def probe_recompute_mobilenetv2(pretrained=False, **kwargs):
    """`mobilenetv2_050_ca` that records whether its forwards ran in a `recompute_ca_outputs()` scope."""
    model = timm.create_model(MODEL, **kwargs)
    model.register_forward_pre_hook(lambda m, args: FORWARD_MODES.append((m.training, recompute_active())))
    return model


def test_recompute_ca_trains_the_same_weights(tmp_path):
    common = ['--model', 'probe_recompute_mobilenetv2', '--grid-samples', '32', '--batch-size', '8', '--epochs', '1',
              *TINY, *EXACT]
    runs = {}
    for label, flags in (('held', ['--no-recompute-ca']), ('lean', [])):  # the registered CA models: on
        FORWARD_MODES.clear()
        runs[label] = str(tmp_path / label)
        assert main(['train', *common, *flags, '--output', runs[label]]) == 0
        # training forwards inside a recompute scope (or not), validation ones outside
        assert set(FORWARD_MODES) == {(True, label == 'lean'), (False, False)}
    assert_same_tensors(load_weights(os.path.join(runs['held'], 'model.safetensors')),
                        load_weights(os.path.join(runs['lean'], 'model.safetensors')))


def test_ctrl_c_leaves_a_checkpoint_that_resumes_exactly(tmp_path):
    common = ['--model', MODEL, '--grid-samples', '64', '--batch-size', '8', '--epochs', '2', *TINY, *EXACT]
    straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
    assert main(['train', *common, '--output', straight]) == 0

    proc = subprocess.Popen(
        [sys.executable, '-m', 'timm_coordatt', 'train', *common, '--output', interrupted],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(interrupted, 'metrics.jsonl')
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and read_metrics(interrupted)) and proc.poll() is None:
        assert time.time() < deadline, 'the first epoch did not finish in time'
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends; epoch 2 is still to go
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert 'Traceback' not in stderr and '--resume' in stderr

    state = torch.load(os.path.join(interrupted, 'training_state.pt'), weights_only=True)
    assert state['progress']['epoch'] == 1  # stopped in epoch 2 (in training or validation)
    # usable as it is: the weights load into the architecture
    model = timm.create_model(f'local-dir:{interrupted}', pretrained=True)
    assert_same_tensors(model.state_dict(), state['model'])

    assert main(['train', '--resume', interrupted]) == 0
    assert_same_tensors(load_weights(os.path.join(straight, 'model.safetensors')),
                        load_weights(os.path.join(interrupted, 'model.safetensors')))
    assert read_metrics(straight) == read_metrics(interrupted)
    assert not [f for f in os.listdir(interrupted) if '.tmp' in f]


def test_ctrl_c_in_validation_resumes_exactly(tmp_path, monkeypatch):
    # an image folder: its augmentations draw from the global RNG, which the resumed epochs must not
    # take from the interrupted one
    data = tmp_path / 'data'
    make_image_folder(data / 'train', per_class=6)
    make_image_folder(data / 'val', per_class=2, seed=1)
    common = ['--data-dir', str(data), '--model', MODEL, '--batch-size', '6', '--epochs', '2', '--img-size', '32',
              '--workers', '0', *EXACT]
    straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
    assert main(['train', *common, '--output', straight]) == 0
    evaluate = training.evaluate

    def ctrl_c_then_evaluate(*args, **kwargs):  # Ctrl-C as epoch 1's validation starts
        monkeypatch.setattr(training, 'evaluate', evaluate)
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, 'evaluate', ctrl_c_then_evaluate)
    assert main(['train', *common, '--output', interrupted]) == 130
    assert not os.path.exists(os.path.join(interrupted, 'metrics.jsonl'))  # stopped before epoch 1 was recorded
    assert main(['train', '--resume', interrupted]) == 0
    assert read_metrics(straight) == read_metrics(interrupted)
    assert_same_tensors(load_weights(os.path.join(straight, 'model.safetensors')),
                        load_weights(os.path.join(interrupted, 'model.safetensors')))


def test_resume_needs_no_source_model(tmp_path):
    """A run fine-tuning a `local-dir:` model resumes after that folder is gone: its architecture is in the run
    directory (the weights, the state's)."""
    common = ['--grid-samples', '16', '--batch-size', '8', '--sched', 'constant', '--warmup-epochs', '0', *TINY,
              *EXACT]
    source, straight, split = str(tmp_path / 'source'), str(tmp_path / 'straight'), str(tmp_path / 'split')
    assert main(['train', '--model', MODEL, *common, '--epochs', '1', '--output', source]) == 0
    tuned = ['train', '--model', f'local-dir:{source}', '--model-kwargs', 'drop_rate=0.1', *common]
    assert main([*tuned, '--epochs', '2', '--output', straight]) == 0
    assert main([*tuned, '--epochs', '1', '--output', split]) == 0
    shutil.rmtree(source)
    assert main(['train', '--resume', split, '--epochs', '2']) == 0
    assert_same_tensors(load_weights(os.path.join(straight, 'model.safetensors')),
                        load_weights(os.path.join(split, 'model.safetensors')))
    assert read_metrics(straight) == read_metrics(split)


def test_resume_of_a_hub_model_needs_no_hub(tmp_path):
    """A run fine-tuning an `hf-hub:` model resumes with the Hub out of reach and its files gone from the cache
    (huggingface_hub reads HF_ENDPOINT at import: the runs are processes of their own)."""
    torch.manual_seed(0)
    save_for_hf(timm.create_model(MODEL), tmp_path / 'hub' / 'me' / 'small', safe_serialization=True)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / 'cache'), HF_HUB_DISABLE_TELEMETRY='1')
    common = ['--grid-samples', '16', '--batch-size', '8', '--sched', 'constant', '--warmup-epochs', '0', *TINY,
              *EXACT]
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')

    def train(*args):
        proc = subprocess.run([sys.executable, '-m', 'timm_coordatt', 'train', *args], capture_output=True, text=True,
                              timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    with HubServer(tmp_path / 'hub') as server:
        env['HF_ENDPOINT'] = server.url
        train('--model', 'hf-hub:me/small', *common, '--epochs', '2', '--output', straight)
        train('--model', 'hf-hub:me/small', *common, '--epochs', '1', '--output', split)
    shutil.rmtree(tmp_path / 'cache')
    train('--resume', split, '--epochs', '2')  # the server stopped: nothing listens at HF_ENDPOINT
    assert_same_tensors(load_weights(os.path.join(straight, 'model.safetensors')),
                        load_weights(os.path.join(split, 'model.safetensors')))


def test_resume_refuses_options_it_cannot_honour(tmp_path, capsys):
    run = str(tmp_path / 'run')
    common = ['--model', MODEL, '--grid-samples', '16', '--batch-size', '8', *TINY]
    assert main(['train', *common, '--epochs', '2', '--lr', '0.01', '--smoothing', '0', '--output', run]) == 0
    capsys.readouterr()
    # changed to train's own defaults, given on the command line: refused like any other change
    for option, value, used in (('--lr', '0.003', '0.01'), ('--smoothing', '0.1', '0.0')):
        assert main(['train', '--resume', run, '--epochs', '3', option, value]) == 2
        assert f'{option} {float(value)} (the run used {used})' in capsys.readouterr().err
    # the same values as the run's: fine (a finished run with fewer epochs asked for: nothing to do, said so)
    assert main(['train', '--resume', run, '--epochs', '1', '--lr', '0.01']) == 0
    assert 'already finished 2 epochs' in capsys.readouterr().err


def test_resume_refuses_an_optimizer_state_of_another_model(tmp_path, capsys):
    """A training state whose optimizer state is another model's (pieced together from two run folders): one line
    naming it, nothing written (its weights are checked as every checkpoint's are)."""
    runs = {name: str(tmp_path / name) for name in (MODEL, 'mobilenetv2_050')}
    for name, run in runs.items():
        assert main(['train', '--model', name, '--grid-samples', '16', '--batch-size', '8', *TINY, '--epochs', '1',
                     '--output', run]) == 0
    path = os.path.join(runs[MODEL], 'training_state.pt')
    state = torch.load(path, weights_only=True)
    other = torch.load(os.path.join(runs['mobilenetv2_050'], 'training_state.pt'), weights_only=True)
    state['optimizer'] = other['optimizer']
    torch.save(state, path)
    before = digest(runs[MODEL])
    capsys.readouterr()
    assert main(['train', '--resume', runs[MODEL], '--epochs', '2']) == 2
    assert f'cannot resume: {path} is not the state of a {MODEL} run with these options (' in capsys.readouterr().err
    assert digest(runs[MODEL]) == before


def test_smoothing_changes_the_training_loss(tmp_path):
    """From the same start, `--smoothing` trains on another loss: the smoothed targets' cross-entropy."""
    common = ['train', '--model', MODEL, '--epochs', '1', '--grid-samples', '16', '--batch-size', '8', *TINY, *EXACT]
    losses = []
    for smoothing in ('0', '0.4'):
        run = str(tmp_path / smoothing)
        assert main([*common, '--smoothing', smoothing, '--output', run]) == 0
        losses.append(read_metrics(run)[0]['train_loss'])
    assert abs(losses[0] - losses[1]) > 1e-3, losses


def test_resume_refuses_changed_classes(tmp_path, capsys):
    data = tmp_path / 'data'
    make_image_folder(data / 'train', per_class=2)
    make_image_folder(data / 'val', per_class=1, seed=1)
    run = str(tmp_path / 'run')
    assert main(['train', '--data-dir', str(data), '--model', MODEL, '--batch-size', '3', '--epochs', '1',
                 '--img-size', '32', '--workers', '0', '--output', run]) == 0
    for split in ('train', 'val'):  # dog -> wolf: the same number of classes, another order
        os.rename(data / split / 'dog', data / split / 'wolf')
    capsys.readouterr()
    assert main(['train', '--resume', run, '--epochs', '2']) == 2
    err = capsys.readouterr().err
    assert 'its classes were cat, dog, fox, the data now has cat, fox, wolf' in err
    assert read_metrics(run)[-1]['epoch'] == 1


def test_resume_from_another_directory_and_with_moved_data(tmp_path, monkeypatch, capsys):
    """Relative --data-dir and local-dir: paths are recorded absolute: the run resumes from any working
    directory, not on another ./data; data that moved is given anew with --data-dir."""
    project, elsewhere = tmp_path / 'project', tmp_path / 'elsewhere'
    make_image_folder(project / 'data' / 'train', per_class=2)
    make_image_folder(project / 'data' / 'val', per_class=1, seed=1)
    make_image_folder(elsewhere / 'data' / 'train', classes=('ant', 'bee', 'cow'), per_class=2)
    make_image_folder(elsewhere / 'data' / 'val', classes=('ant', 'bee', 'cow'), per_class=1)
    monkeypatch.chdir(project)
    common = ['--batch-size', '3', '--img-size', '32', '--workers', '0']
    assert main(['train', '--data-dir', 'data', '--model', MODEL, *common, '--epochs', '1', '--output', 'run']) == 0
    assert main(['train', '--data-dir', 'data', '--model', 'local-dir:run/best', *common, '--epochs', '1',
                 '--output', 'tuned']) == 0
    monkeypatch.chdir(elsewhere)  # its ./data has other classes: resuming must not read it
    for run in ('run', 'tuned'):
        assert main(['train', '--resume', str(project / run), '--epochs', '2']) == 0, capsys.readouterr().err
        assert read_metrics(str(project / run))[-1]['epoch'] == 2
    os.rename(project / 'data', tmp_path / 'moved')
    assert main(['train', '--resume', str(project / 'run'), '--epochs', '3']) == 2
    assert 'does not exist' in capsys.readouterr().err
    moved = str(tmp_path / 'moved')
    assert main(['train', '--resume', str(project / 'run'), '--epochs', '3', '--data-dir', moved]) == 0
    assert read_metrics(str(project / 'run'))[-1]['epoch'] == 3


CTRL_C_ON_TRAINING_FORWARD = []  # set to [True] to have the probe model below send itself one Ctrl-C


@register_model
def probe_ctrl_c_mobilenetv2(pretrained=False, **kwargs):
    """`mobilenetv2_050_ca` that sends SIGINT (Ctrl-C) in its next training forward when asked to."""
    model = timm.create_model(MODEL, **kwargs)

    def ctrl_c(module, args):
        if module.training and CTRL_C_ON_TRAINING_FORWARD:
            CTRL_C_ON_TRAINING_FORWARD.clear()
            os.kill(os.getpid(), signal.SIGINT)

    model.register_forward_pre_hook(ctrl_c)
    return model


def test_resume_with_more_images_keeps_the_schedule_and_refuses_mid_epoch(tmp_path, capsys):
    data = tmp_path / 'data'
    make_image_folder(data / 'train', per_class=2)
    make_image_folder(data / 'val', per_class=1, seed=1)
    common = ['--data-dir', str(data), '--batch-size', '3', '--img-size', '32', '--workers', '0', '--min-lr', '1e-5']
    finished, interrupted = str(tmp_path / 'finished'), str(tmp_path / 'interrupted')
    assert main(['train', '--model', MODEL, *common, '--epochs', '1', '--output', finished]) == 0
    CTRL_C_ON_TRAINING_FORWARD.append(True)  # stops after the first of the epoch's 2 steps
    assert main(['train', '--model', 'probe_ctrl_c_mobilenetv2', *common, '--epochs', '2',
                 '--output', interrupted]) == 130
    make_image_folder(data / 'train', per_class=4, seed=2)  # the same classes, twice the images: 4 steps an epoch
    capsys.readouterr()

    # between epochs: the new epochs' steps, and the cosine schedule still ends at --min-lr after the last one
    assert main(['train', '--resume', finished, '--epochs', '2']) == 0
    assert read_metrics(finished)[-1]['lr'] == pytest.approx(1e-5)
    progress = torch.load(os.path.join(finished, 'training_state.pt'), weights_only=True)['progress']
    assert progress['num_updates'] == 2 * 4  # the schedule's position: two epochs of the new 4 steps
    # mid-epoch: the epoch's data order cannot go on over other batches
    assert main(['train', '--resume', interrupted]) == 2
    assert 'interrupted mid-epoch, after 1 of its 2 batches an epoch with 1 process(es); now an epoch has 4' in \
        capsys.readouterr().err


def test_train_records_the_amp_precision_and_no_warm_up_without_a_schedule(tmp_path, capsys):
    run = str(tmp_path / 'run')
    assert main(['train', '--model', MODEL, '--epochs', '2', '--grid-samples', '16', '--batch-size', '8', '--amp',
                 '--sched', 'none', '--output', run, *TINY, *EXACT]) == 0
    saved = torch.load(os.path.join(run, 'training_state.pt'), weights_only=True)['args']
    # what --amp resolved to on this device: a resume on another --device keeps it (and its loss scaler)
    assert saved['amp_dtype'] == 'bfloat16' and saved['warmup_epochs'] == 0
    assert [r['lr'] for r in read_metrics(run)] == [3e-3, 3e-3]
    capsys.readouterr()
    assert main(['train', '--model', MODEL, '--sched', 'none', '--warmup-epochs', '1', '--output',
                 str(tmp_path / 'refused'), *TINY]) == 2
    assert '--sched none keeps --lr throughout, with no warm-up; got --warmup-epochs 1' in capsys.readouterr().err


@pytest.mark.parametrize('warmup', ['0', '0.5'])
def test_wsd_with_a_warm_up_of_part_of_an_epoch(warmup, tmp_path, capsys):
    """--warmup-epochs takes fractions: the run trains --epochs epochs on every schedule."""
    run = str(tmp_path / 'run')
    rc = main(['train', '--model', MODEL, '--epochs', '2', '--grid-samples', '16', '--batch-size', '4', '--sched',
               'wsd', '--warmup-epochs', warmup, '--output', run, *TINY])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    if create_scheduler_v2(optimizer, sched='wsd', num_epochs=10)[0] is None:  # timm 1.0.26 has no wsd
        assert rc == 2 and '--sched wsd: this timm' in capsys.readouterr().err
    else:
        assert rc == 0
        assert [r['epoch'] for r in read_metrics(run)] == [1, 2]


def test_second_order_optimizer(tmp_path, capsys):
    """adahessian differentiates the gradients again (`is_second_order`): backward builds their graph, through the
    CA blocks' kernels and their recomputed outputs too, also under grad checkpointing; a resumed run draws the
    Hessian probes it would have drawn (Adahessian's own generator, outside its state_dict); torch.compile,
    which cannot differentiate twice, is refused."""
    common = ['--model', MODEL, '--grid-samples', '16', '--batch-size', '8', '--opt', 'adahessian', '--sched',
              'constant', '--warmup-epochs', '0', '--grad-checkpointing', *TINY, *EXACT]
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    assert main(['train', *common, '--epochs', '2', '--output', straight]) == 0
    assert all(math.isfinite(r['train_loss']) for r in read_metrics(straight))
    assert main(['train', *common, '--epochs', '1', '--output', split]) == 0
    assert main(['train', '--resume', split, '--epochs', '2']) == 0
    assert_same_tensors(load_weights(os.path.join(straight, 'model.safetensors')),
                        load_weights(os.path.join(split, 'model.safetensors')))
    capsys.readouterr()
    assert main(['train', *common, '--epochs', '1', '--compile', '--output', str(tmp_path / 'compiled')]) == 2
    assert ('--opt adahessian differentiates the gradients again (a second-order optimizer), which torch.compile '
            'does not support; train without --compile') in capsys.readouterr().err


def _paper_recipe_command():
    """The first command of docs/training.md's section on the paper's ImageNet training, as its arguments."""
    docs = (Path(__file__).parent.parent / 'docs' / 'training.md').read_text()
    section = docs.split("## The paper's ImageNet training")[1]
    block = section.split('```bash\n')[1].split('```')[0]
    words = shlex.split(block.replace('\\\n', ' '))
    return words[words.index('train') + 1:]


def test_the_documented_paper_recipe_sets_up_the_papers_training(tmp_path):
    """What docs/training.md says its paper-recipe command does: SGD with momentum 0.9 (not Nesterov's), weight
    decay 4e-5 but not on biases and norm weights, 0.05 for the global batch unscaled, cosine to 0 with no warm-up,
    no label smoothing, dropout 0.1 before the classifier."""
    args = _paper_recipe_command()
    assert args[args.index('--epochs') + 1] == '200' and args[args.index('--model') + 1] == 'mobilenetv2_ca'
    data = tmp_path / 'data'
    make_image_folder(data / 'train', classes=('a', 'b'), per_class=4)
    make_image_folder(data / 'val', classes=('a', 'b'), per_class=2, seed=1)
    args[args.index('--data-dir') + 1] = str(data)
    args[args.index('--epochs') + 1] = '1'
    args[args.index('--batch-size') + 1] = '4'
    run = str(tmp_path / 'run')
    assert main(['train', *args, '--output', run, '--img-size', '32', '--workers', '0']) == 0

    state = torch.load(os.path.join(run, 'training_state.pt'), weights_only=True)
    groups = state['optimizer']['param_groups']
    assert sorted(g['weight_decay'] for g in groups) == [0.0, 4e-5]
    for group in groups:
        assert group['initial_lr'] == 0.05 and group['momentum'] == 0.9 and group['nesterov'] is False
    no_decay = next(g for g in groups if g['weight_decay'] == 0.0)
    model = timm.create_model('mobilenetv2_ca', **state['args']['model_kwargs'])
    assert len(no_decay['params']) == sum(p.ndim <= 1 for p in model.parameters())  # biases and norm weights
    assert model.drop_rate == 0.1
    schedule = state['scheduler']
    assert schedule['lr_min'] == 0.0 and schedule['warmup_t'] == 0 and schedule['t_initial'] == 2  # steps
    assert state['args']['smoothing'] == 0.0
    assert read_metrics(run)[0]['lr'] == 0.0  # cosine to the end of its single epoch


def test_train_errors_name_the_problem(tmp_path, capsys):
    def refused(*args):
        capsys.readouterr()
        assert main(['train', *args]) == 2
        return capsys.readouterr().err

    one_class = make_image_folder(tmp_path / 'one', classes=('cat',), per_class=4)
    assert f'{one_class} has one class folder (cat): a classifier needs two or more' in refused(
        '--data-dir', one_class, '--output', str(tmp_path / 'r1'), *TINY)
    # wsd's decay phase is the last fifth of the updates after the warm-up: none in 2 updates; a timm without wsd
    # (1.0.26 returns no scheduler for it) must not train at a fixed rate instead
    wsd = refused('--model', MODEL, '--epochs', '1', '--grid-samples', '16', '--batch-size', '8', '--sched', 'wsd',
                  '--output', str(tmp_path / 'r2'), *TINY)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    if create_scheduler_v2(optimizer, sched='wsd', num_epochs=10)[0] is None:
        assert f'--sched wsd: this timm ({timm.__version__}) has no such schedule' in wsd
    else:
        assert "cannot create scheduler 'wsd': 2 updates after the warm-up (2 an epoch) are too few for its " \
            "decay phase" in wsd

    run = str(tmp_path / 'run')  # 2 epochs, warm-up 1 (the default); resumed with --epochs 1, which leaves no room
    state_file = os.path.join(run, 'training_state.pt')
    CTRL_C_ON_TRAINING_FORWARD.append(True)
    assert main(['train', '--model', 'probe_ctrl_c_mobilenetv2', '--epochs', '2', '--grid-samples', '16',
                 '--batch-size', '8', '--output', run, *TINY]) == 130
    assert "got 1 (the resumed run's warm-up: --epochs must stay above it)" in refused('--resume', run, '--epochs', '1')

    state = torch.load(state_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != 'optimizer'}, state_file)
    assert f'cannot resume: {state_file} is damaged (no optimizer)' in refused('--resume', run)
    torch.save({**state, 'progress': {k: v for k, v in state['progress'].items() if k != 'steps'}}, state_file)
    assert 'is damaged (no progress.steps)' in refused('--resume', run)
    open(state_file, 'wb').close()
    assert f'{state_file} is not a readable training state (not a file torch.save wrote' in refused('--resume', run)
    # one that only unpickling code could read: named in one line, without torch's advice to unpickle it
    torch.save({**state, 'progress': argparse.Namespace(epoch=1)}, state_file)
    err = refused('--resume', run)
    assert f'{state_file} is not a readable training state (it holds a argparse.Namespace, which only ' in err
    assert 'weights_only=False' not in err and len(err.strip().splitlines()) == 1


def test_resume_names_a_damaged_metrics_file_and_a_missing_best(tmp_path, capsys):
    run = str(tmp_path / 'run')
    common = ['--model', MODEL, '--grid-samples', '16', '--batch-size', '8', '--sched', 'constant', *TINY]
    assert main(['train', *common, '--epochs', '1', '--output', run]) == 0
    metrics = os.path.join(run, 'metrics.jsonl')
    good = open(metrics).read()
    with open(metrics, 'a') as f:
        f.write('{"epoch": 1, "lr": 0.003\n')  # a line cut short
    capsys.readouterr()
    assert main(['train', '--resume', run, '--epochs', '2']) == 2
    assert f'cannot resume: line 2 of {metrics} is not an epoch\'s record' in capsys.readouterr().err
    with open(metrics, 'w') as f:
        f.write(good)
    shutil.rmtree(os.path.join(run, 'best'))
    assert main(['train', '--resume', run, '--epochs', '2']) == 0
    assert f'{os.path.join(run, "best")} (epoch 1, the best so far) is missing' in capsys.readouterr().err


def test_two_runs_started_into_one_new_directory(tmp_path, monkeypatch, capsys):
    run = tmp_path / 'run'
    find_data = training.find_data

    def another_run_starts_meanwhile(*args):
        os.makedirs(run / 'best')
        return find_data(*args)

    monkeypatch.setattr(training, 'find_data', another_run_starts_meanwhile)
    assert main(['train', '--model', MODEL, '--epochs', '1', '--grid-samples', '16', '--batch-size', '8', '--output',
                 str(run), *TINY]) == 2
    assert f'output directory {run} was created by another run meanwhile' in capsys.readouterr().err
    assert os.listdir(run) == ['best']


def test_layer_decay_without_a_schedule(tmp_path):
    run = str(tmp_path / 'run')
    assert main(['train', '--model', MODEL, '--epochs', '1', '--grid-samples', '16', '--batch-size', '8', '--sched',
                 'none', '--warmup-epochs', '0', '--layer-decay', '0.5', '--output', run, *TINY]) == 0
    groups = torch.load(os.path.join(run, 'training_state.pt'), weights_only=True)['optimizer']['param_groups']
    scales = sorted({g['lr_scale'] for g in groups})
    assert scales[0] < 0.01 and scales[-1] == 1.0
    for group in groups:  # each layer group at its own rate, as timm's schedules set them
        assert group['lr'] == pytest.approx(3e-3 * group['lr_scale'])
    assert read_metrics(run)[0]['lr'] == pytest.approx(3e-3)  # the head's (unscaled) rate


def test_freeze_keeps_the_first_groups_unchanged(tmp_path):
    run = str(tmp_path / 'run')
    groups = 3  # stem and the first two stages of blocks
    assert main(['train', '--model', MODEL, '--freeze', str(groups), '--epochs', '1', '--grid-samples', '16',
                 '--batch-size', '8', '--output', run, *TINY]) == 0
    random_seed(42, 0)  # train's default --seed: the same initial weights
    initial = timm.create_model(MODEL, num_classes=9).state_dict()
    trained = load_weights(os.path.join(run, 'model.safetensors'))
    frozen_prefixes = ('conv_stem.', 'bn1.', 'blocks.0.', 'blocks.1.')
    for key, value in trained.items():
        if key.startswith(frozen_prefixes):
            assert torch.equal(value, initial[key]), f'{key} changed although frozen'
    for key in ('blocks.2.0.conv_pw.weight', 'blocks.2.0.bn1.running_mean', 'classifier.weight'):
        assert not torch.equal(trained[key], initial[key]), f'{key} did not train'


def test_freeze_out_of_range_is_an_error(tmp_path, capsys):
    rc = main(['train', '--model', MODEL, '--freeze', '99', '--output', str(tmp_path / 'run'), *TINY])
    assert rc == 2
    err = capsys.readouterr().err
    assert '--freeze 99' in err and 'layer groups' in err
    assert not os.path.exists(tmp_path / 'run')


def test_progress_bars_into_a_log_are_redrawn_rarely(tmp_path, capsys):
    # stderr captured by pytest is not a terminal, as in `timm-coordatt train > log 2>&1`: each redraw
    # stays in the log, so the bars must not redraw at every step (16 training and 4 validation steps)
    run = str(tmp_path / 'run')
    assert main(['train', '--model', MODEL, '--grid-samples', '128', '--batch-size', '8', '--epochs', '1',
                 '--output', run, *TINY]) == 0
    err = capsys.readouterr().err
    assert 'epoch 1/1: train loss' in err
    # each bar: drawn when it opens, cleared when it closes (and redrawn once should a run take 30 s)
    assert err.count('\r') <= 8, err


def test_every_run_file_is_moved_into_place(tmp_path, monkeypatch):
    # written under a temporary name and renamed (os.replace), so an interruption never leaves half a file
    placed = []
    replace = os.replace
    monkeypatch.setattr(os, 'replace', lambda src, dst: (placed.append(os.path.abspath(dst)), replace(src, dst)))
    run = tmp_path / 'run'
    assert main(['train', '--model', MODEL, '--grid-samples', '32', '--batch-size', '8', '--epochs', '2',
                 '--model-ema', '--output', str(run), *TINY]) == 0
    files = {str(p) for p in run.rglob('*') if p.is_file()}
    assert str(run / 'metrics.jsonl') in files and str(run / 'ema' / 'model.safetensors') in files
    assert files <= set(placed), sorted(files - set(placed))
    assert [r['epoch'] for r in read_metrics(str(run))] == [1, 2]


def test_progress_bars_redraw_every_tenth_of_a_second_on_a_terminal_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, 'stderr', Terminal())
    with training._progress_bar(range(3)) as terminal_bar:
        assert terminal_bar.mininterval == 0.1
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    with training._progress_bar(range(3)) as log_bar:
        # and tqdm's monitor thread, which redraws a bar left alone for maxinterval, waits as long
        assert log_bar.mininterval == log_bar.maxinterval == training._LOG_REFRESH_S


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # GroupNorm: no batch statistics, so the gradient of the global batch is the mean of the two
    # processes' gradients and one plain SGD step (timm's 'momentum' optimizer with momentum 0, no
    # Nesterov) must land on the same weights
    common = ['--model', 'test_efficientnet_gn', '--grid-samples', '8', '--epochs', '1', '--opt', 'momentum',
              '--momentum', '0', '--weight-decay', '0', '--sched', 'constant', '--warmup-epochs', '0',
              '--lr', '0.5', '--device', 'cpu', *TINY]
    single, ddp = str(tmp_path / 'single'), str(tmp_path / 'ddp')
    assert main(['train', *common, '--batch-size', '8', '--output', single]) == 0
    proc = torchrun(tmp_path, '-m', 'timm_coordatt', 'train', *common, '--batch-size', '4', '--output', ddp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone writes: one run directory, one record per epoch, no stray files
    assert sorted(os.listdir(ddp)) == ['best', 'config.json', 'metrics.jsonl', 'model.safetensors',
                                       'training_state.pt']
    assert len(read_metrics(ddp)) == 1
    assert read_metrics(ddp)[0]['val_images'] == 16  # each validation image counted once across ranks
    a, b = load_weights(os.path.join(single, 'model.safetensors')), load_weights(os.path.join(ddp, 'model.safetensors'))
    random_seed(42, 0)
    initial = timm.create_model('test_efficientnet_gn', num_classes=9)
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], initial.state_dict()[k])]
    assert moved, 'the step did not change the weights'
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    # DDP reduces the gradients in place: a second-order optimizer, which differentiates them, is refused
    proc = torchrun(tmp_path, '-m', 'timm_coordatt', 'train', *common, '--batch-size', '4', '--opt', 'adahessian',
                    '--output', str(tmp_path / 'second_order'))
    assert proc.returncode != 0  # torchrun's own report of a failed process follows the processes' message
    assert ('--opt adahessian differentiates the gradients again (a second-order optimizer), which distributed '
            'training (DistributedDataParallel) does not support; train without torchrun') in proc.stderr


@pytest.mark.slow
def test_ddp_ema_batch_norm_statistics_agree_across_processes(tmp_path):
    # each process validates half of the images with its own EMA: the recorded EMA metrics are those of
    # the saved EMA (rank 0's) only if the processes' EMA batch-norm statistics were averaged too
    run = str(tmp_path / 'run')
    proc = torchrun(tmp_path, '-m', 'timm_coordatt', 'train', '--model', MODEL, '--grid-samples', '32',
                    '--batch-size', '4', '--epochs', '1', '--model-ema', '--model-ema-decay', '0.5', '--device', 'cpu',
                    '--output', run, *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = read_metrics(run)[0]
    results = tmp_path / 'ema.json'
    assert main(['validate', '--model', f'local-dir:{run}/ema', '--img-size', '32', '--grid-val-samples', '16',
                 '--workers', '0', '--results-file', str(results)]) == 0
    ema = json.loads(results.read_text())
    assert ema['loss'] == pytest.approx(recorded['ema_val_loss'], rel=1e-5)  # 2.4e-4 apart before averaging them


@pytest.mark.slow
def test_ddp_ema_interrupted_mid_epoch_resumes_exactly(tmp_path):
    """Each process's EMA follows its own batches' BN statistics until the epoch's end averages them: a run
    stopped mid-epoch keeps every process's, so the resumed run ends with the straight run's EMA."""
    common = ['--model', MODEL, '--grid-samples', '256', '--batch-size', '4', '--epochs', '2', '--model-ema',
              '--device', 'cpu', *TINY]  # the default decay: a difference at the stop lasts to the end
    straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
    proc = torchrun(tmp_path, '-m', 'timm_coordatt', 'train', *common, '--output', straight)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = torchrun(tmp_path, '-m', 'timm_coordatt', 'train', *common, '--output', interrupted, wait=False)
    deadline = time.time() + 300
    while not (os.path.exists(os.path.join(interrupted, 'metrics.jsonl')) and read_metrics(interrupted)):
        assert proc.poll() is None and time.time() < deadline, 'the first epoch did not finish in time'
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # early in epoch 2's 32 training steps
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and '--resume' in stderr, stderr[-3000:]
    state = torch.load(os.path.join(interrupted, 'training_state.pt'), weights_only=True)
    assert state['progress']['epoch'] == 1 and 0 < state['progress']['step'] < 32, state['progress']

    proc = torchrun(tmp_path, '-m', 'timm_coordatt', 'train', '--resume', interrupted)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for part in ('model.safetensors', 'ema/model.safetensors'):
        assert_same_tensors(load_weights(os.path.join(straight, part)), load_weights(os.path.join(interrupted, part)))
    assert read_metrics(straight) == read_metrics(interrupted)


def _train_with(tmp_path, *options):
    run = str(tmp_path / 'run')
    assert main(['train', '--model', MODEL, '--epochs', '1', '--grid-samples', '16', '--batch-size', '8',
                 '--output', run, *TINY, *options]) == 0
    random_seed(42, 0)
    initial = timm.create_model(MODEL, num_classes=9).state_dict()
    trained = load_weights(os.path.join(run, 'model.safetensors'))
    assert all(torch.isfinite(v).all() for v in trained.values())
    moved = [k for k in initial if initial[k].is_floating_point() and not torch.equal(initial[k], trained[k])]
    assert len(moved) > len(initial) // 2, 'training did not update the weights'
    return read_metrics(run)


def test_speed_and_memory_options_train(tmp_path):
    records = _train_with(tmp_path, '--channels-last', '--amp', '--amp-dtype', 'bfloat16', '--grad-checkpointing',
                          '--clip-grad', '1.0', '--layer-decay', '0.8', '--opt', 'sgd', '--model-ema')
    assert records[0]['train_loss'] > 0 and 'ema_val_top1' in records[0]


@pytest.mark.slow
def test_compiled_training(tmp_path):
    records = _train_with(tmp_path, '--compile')
    assert records[0]['train_loss'] > 0
