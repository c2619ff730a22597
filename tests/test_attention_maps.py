""" Attention maps: the recorded gates are the real gates of the real blocks, Grad-CAM follows its
definition, the figures are PNGs of the documented size, and bad input gets a clear error. """
import io
import os
import signal
import subprocess
import sys
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import resolve_data_config

from cli_helpers import save_turned
from model_helpers import randomise_

import timm_coordatt  # noqa: F401  (registers the models)
from timm_coordatt import CoordAttention
from timm_coordatt.attention_maps import (
    GateMaps, attention_maps, default_blocks, grad_cam, load_image, plot_attention_maps, plot_grad_cam_comparison,
    record_gates, save_figure)
from timm_coordatt.cli import main
from timm_coordatt.training import create_model, export_model

CA_MODEL = 'mobilenetv2_050_ca'
PLAIN_MODEL = 'mobilenetv2_050'  # timm's, no attention
CELL, DPI = 2.2, 50  # documented default cell size (inches) of plot_attention_maps; dpi passed to the CLI


def reference_gates(block: CoordAttention, x: torch.Tensor):
    """Coordinate Attention gates written from the paper's definition (coordatt.md section 1), eval mode."""
    n, c, h, w = x.shape
    z_h = x.mean(dim=3, keepdim=True)  # (N, C, H, 1)
    z_w = x.mean(dim=2, keepdim=True).permute(0, 1, 3, 2)  # (N, C, W, 1)
    y = F.conv2d(torch.cat([z_h, z_w], dim=2), block.conv1.weight, block.conv1.bias)
    bn = block.bn1
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
    y = y * torch.clamp(y + 3, 0, 6) / 6  # hard-swish
    y_h, y_w = y[:, :, :h], y[:, :, h:].permute(0, 1, 3, 2)
    a_h = torch.sigmoid(F.conv2d(y_h, block.conv_h.weight, block.conv_h.bias))
    a_w = torch.sigmoid(F.conv2d(y_w, block.conv_w.weight, block.conv_w.bias))
    return a_h, a_w


@pytest.fixture(scope='module')
def ca_model():
    torch.manual_seed(0)
    # weights of a scale that gives logits of order one (at timm's initialisation every class scores about
    # the same), and the CA blocks' BatchNorm statistics and biases wider still, so a wrong normalisation
    # cannot pass
    model = randomise_(timm.create_model(CA_MODEL)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CoordAttention):
                m.bn1.running_mean.normal_(0, 0.5)
                m.bn1.running_var.uniform_(0.5, 2.0)
                m.bn1.weight.normal_(1, 0.3)
                m.bn1.bias.normal_(0, 0.3)
                m.conv_h.bias.normal_(0, 0.5)
                m.conv_w.bias.normal_(0, 0.5)
    return model


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / 'image.jpg'
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_maps_are_the_gates_each_block_multiplies_by(ca_model):
    # H != W so a transposed gate cannot pass
    x = torch.randn(2, 3, 96, 64)
    inputs, seen = {}, {}
    handles = []
    for n, m in ca_model.named_modules():
        if isinstance(m, CoordAttention):
            # a copy of the input: the models' blocks gate in place in inference
            handles.append(m.register_forward_pre_hook(lambda m, args, n=n: inputs.update({n: args[0].clone()})))
            handles.append(m.register_forward_hook(lambda m, args, out, n=n: seen.update({n: (inputs[n], out)})))
    ca_model.train()
    try:
        maps = attention_maps(ca_model, x, blocks='all')
    finally:
        for h in handles:
            h.remove()
    assert ca_model.training, 'the caller\'s train/eval mode must be restored'
    ca_model.eval()
    assert list(maps) == list(seen) and len(maps) == 16  # every expansion-6 block of MobileNetV2
    for name, (block_in, block_out) in seen.items():
        block = ca_model.get_submodule(name)
        m = maps[name]
        n, c, h, w = block_in.shape
        assert m.a_h.shape == (n, c, h, 1) and m.a_w.shape == (n, c, 1, w) and m.resolution == (h, w)
        ref_h, ref_w = reference_gates(block, block_in)
        torch.testing.assert_close(m.a_h, ref_h, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.a_w, ref_w, rtol=1e-4, atol=1e-5)
        # what the block really did to its input
        torch.testing.assert_close(block_out, block_in * m.a_h * m.a_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.product, m.a_h.expand(-1, -1, -1, w) * m.a_w.expand(-1, -1, h, -1))
        torch.testing.assert_close(m.mean(), m.product.sum(1) / c)


def test_default_blocks_are_the_last_ca_block_of_each_stage(ca_model):
    # MobileNetV2's first stage (expansion 1) has no CA
    expected = [f'blocks.{i}.{len(stage) - 1}.se' for i, stage in enumerate(ca_model.blocks) if i > 0]
    assert default_blocks(ca_model) == expected
    assert list(attention_maps(ca_model, torch.randn(1, 3, 64, 64))) == expected

    mobilenext = timm.create_model('mobilenext_050_ca')
    assert default_blocks(mobilenext) == [f'stages.{i}.{len(s) - 1}.attn' for i, s in enumerate(mobilenext.stages)]


def test_top_channels_are_the_most_position_selective(ca_model):
    m = attention_maps(ca_model, torch.randn(2, 3, 64, 64), blocks=['blocks.2.2.se'])['blocks.2.2.se']
    idx, top = m.top_channels(3)
    product = m.a_h * m.a_w
    for i in range(2):
        spread = [product[i, c].std().item() for c in range(product.shape[1])]
        assert sorted(idx[i].tolist()) == sorted(np.argsort(spread)[-3:].tolist())
        for k, c in enumerate(idx[i].tolist()):
            torch.testing.assert_close(top[i, k], product[i, c])
    with pytest.raises(ValueError, match='top_channels expected 1 <= k <= '):
        m.top_channels(0)


def test_grad_cam_follows_its_definition(ca_model):
    x = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    # independently: last-stage features of EfficientNet's forward, gradient of the target's score
    feats = ca_model.blocks(ca_model.bn1(ca_model.conv_stem(x)))
    logits = ca_model.forward_head(ca_model.bn2(ca_model.conv_head(feats)))

    def weighted_features(target: int) -> torch.Tensor:
        grads, = torch.autograd.grad(logits[:, target].sum(), feats, retain_graph=True)
        return (grads.mean(dim=(2, 3), keepdim=True) * feats).sum(1)

    def mixed(target: int) -> bool:
        """Evidence for and against the class in each image: the ReLU keeps only the former."""
        signs = weighted_features(target).flatten(1)
        return bool(((signs > 0).any(1) & (signs < 0).any(1)).all())

    target = next(t for t in logits.mean(0).argsort(descending=True).tolist() if mixed(t))
    cam = grad_cam(ca_model, x, target=target)
    expected = torch.relu(weighted_features(target))
    peaks = expected.amax(dim=(1, 2), keepdim=True)
    expected = expected / peaks
    assert cam.layer == 'blocks.6' and cam.cam.shape == (2, 4, 5)
    torch.testing.assert_close(cam.cam, expected.detach(), rtol=1e-4, atol=1e-5)
    assert cam.target.tolist() == [target, target]
    torch.testing.assert_close(cam.prob, logits.softmax(-1)[:, target].detach())
    # default target: each image's top class
    top = grad_cam(ca_model, x)
    assert top.target.tolist() == logits.argmax(-1).tolist()
    with pytest.raises(ValueError, match=r'class index in \[0, 1000\)'):
        grad_cam(ca_model, x, target=1000)


def test_grad_cam_under_no_grad_and_inference_mode(ca_model):
    x = torch.randn(1, 3, 64, 64)
    expected = grad_cam(ca_model, x)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            cam = grad_cam(ca_model, x)
        torch.testing.assert_close(cam.cam, expected.cam)


def test_calls_restore_each_modules_mode(ca_model):
    # fine-tuning with frozen BatchNorm: the model trains, its BN layers stay in eval mode
    ca_model.train()
    frozen = [m for m in ca_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in frozen:
        m.eval()
    modes = {name: m.training for name, m in ca_model.named_modules()}
    try:
        attention_maps(ca_model, torch.randn(1, 3, 32, 32))
        assert {name: m.training for name, m in ca_model.named_modules()} == modes
        grad_cam(ca_model, torch.randn(1, 3, 32, 32))
        assert {name: m.training for name, m in ca_model.named_modules()} == modes
    finally:
        ca_model.eval()
    assert frozen and modes[''] and not any(modes[n] for n, m in ca_model.named_modules() if m in frozen)


@pytest.mark.parametrize('name', [CA_MODEL, 'resnet10t'])
def test_grad_cam_with_gradient_checkpointing(name):
    # timm's checkpoint_seq calls a stage's blocks itself, past the hook on the stage
    torch.manual_seed(0)
    model = timm.create_model(name)
    x = torch.randn(1, 3, 64, 64)
    expected = grad_cam(model, x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(grad_cam(model, x).cam, expected.cam)
    assert model.grad_checkpointing  # switched back on


@pytest.mark.parametrize('context', [torch.enable_grad, torch.no_grad, torch.inference_mode])
def test_maps_can_be_edited_in_place(ca_model, context):
    with context():
        m = attention_maps(ca_model, torch.randn(1, 3, 32, 32), blocks=['blocks.2.2.se'])['blocks.2.2.se']
        cam = grad_cam(ca_model, torch.randn(1, 3, 32, 32))
    for t in (m.a_h, m.a_w, cam.cam, cam.prob):  # not inference tensors
        t.clamp_(0.25, 0.75)
        assert t.max() <= 0.75


def test_grad_cam_names_the_models_own_classes(tmp_path):
    torch.manual_seed(0)
    tuned = timm.create_model(CA_MODEL, num_classes=3)
    names = ['cat', 'dog', 'fox']
    export_model(tuned, str(tmp_path / 'run'), names, resolve_data_config(model=tuned))
    model = create_model(f'local-dir:{tmp_path / "run"}')
    cam = grad_cam(model, torch.randn(2, 3, 64, 64))
    assert cam.labels == tuple(names[i] for i in cam.target.tolist())
    # ImageNet's descriptions for an ImageNet head, 'class <i>' for a head without names
    cam = grad_cam(timm.create_model(CA_MODEL), torch.randn(1, 3, 64, 64), target=281)
    assert cam.labels == ('tabby, tabby cat',)
    cam = grad_cam(timm.create_model(CA_MODEL, num_classes=7), torch.randn(1, 3, 64, 64), target=5)
    assert cam.labels == ('class 5',)


def test_grad_cam_of_a_model_not_made_by_create_model():
    # a classifier built from its class (ByobNet from a config with attn_layer='ca', say) has no pretrained_cfg
    torch.manual_seed(0)
    model = timm.create_model(CA_MODEL, num_classes=5)
    del model.pretrained_cfg
    cam = grad_cam(model, torch.randn(1, 3, 64, 64), target=4)
    assert cam.labels == ('class 4',) and cam.cam.shape == (1, 2, 2)


def test_grad_cam_needs_a_classifier():
    with pytest.raises(ValueError, match=r'has no classifier \(num_classes=0\)'):
        grad_cam(timm.create_model(CA_MODEL, num_classes=0), torch.randn(1, 3, 32, 32))
    features = timm.create_model(CA_MODEL, features_only=True)
    with pytest.raises(ValueError, match=r'expected class scores \(N, classes\) from .*, got list'):
        grad_cam(features, torch.randn(1, 3, 32, 32), layer='blocks.6')
    with pytest.raises(ValueError, match=r"expected a \(N, C, H, W\) output from 'global_pool', got \(1, 1280\)"):
        grad_cam(timm.create_model(CA_MODEL), torch.randn(1, 3, 32, 32), layer='global_pool')


def test_top_channels_of_a_1x1_gate():
    # a gate over one position has no spread in any channel: all 0, without a degrees-of-freedom warning
    maps = GateMaps('head', torch.rand(1, 4, 1, 1), torch.rand(1, 4, 1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        idx, top = maps.top_channels(2)
    assert idx.shape == (1, 2) and top.shape == (1, 2, 1, 1)


def test_images_that_cannot_be_read_are_named(image_file, tmp_path):
    model = timm.create_model(CA_MODEL)
    with pytest.raises(IsADirectoryError, match=f'expected an image file, got the folder {tmp_path}'):
        load_image(tmp_path, model)
    with open(image_file, 'rb') as f:
        data = f.read()
    truncated = tmp_path / 'truncated.jpg'
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f'{truncated} could not be read: image file is truncated'):
        load_image(truncated, model)


def test_figures_leave_pyplot_alone(ca_model, tmp_path):
    # drawn on figures of their own: none left in pyplot's list, and no backend switched for the caller's
    x = torch.randn(1, 3, 64, 64)
    figures = plt.get_fignums()
    fig = plot_attention_maps(x, resolve_data_config(model=ca_model), attention_maps(ca_model, x))
    assert plt.get_fignums() == figures
    save_figure(fig, tmp_path / 'maps.png', dpi=20)
    with Image.open(tmp_path / 'maps.png') as img:
        assert img.format == 'PNG'
    code = ('import matplotlib, timm_coordatt.attention_maps, timm_coordatt.cli; timm_coordatt.cli.build_parser(); '
            'print(matplotlib.get_backend())')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MPLBACKEND='svg'))
    assert proc.returncode == 0 and proc.stdout.split() == ['svg'], proc.stderr


def test_figures_of_a_bfloat16_model(tmp_path):
    model = timm.create_model(CA_MODEL).eval().to(torch.bfloat16)
    config = resolve_data_config(model=model)
    x = torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)
    maps, cam = attention_maps(model, x), grad_cam(model, x)
    for i, fig in enumerate([plot_attention_maps(x, config, maps, cam),
                             plot_grad_cam_comparison({CA_MODEL: (x, config, cam)})]):
        save_figure(fig, tmp_path / f'{i}.png')
        with Image.open(tmp_path / f'{i}.png') as img:
            assert img.format == 'PNG'


def test_a_figure_that_cannot_be_written_is_named(ca_model, tmp_path):
    x = torch.randn(1, 3, 32, 32)
    fig = plot_attention_maps(x, resolve_data_config(model=ca_model), attention_maps(ca_model, x))
    out = tmp_path / ('x' * 300 + '.png')  # longer than a file name may be: the temporary file beside it fails
    with pytest.raises(OSError, match=f'cannot write {out}: File name too long'):
        save_figure(fig, out)


def test_16_bit_images_are_scaled_to_8_bits(tmp_path):
    model = timm.create_model(CA_MODEL)
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (256, 1))
    Image.fromarray(ramp).save(tmp_path / 'ramp16.png')
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / 'ramp8.png')
    with Image.open(tmp_path / 'ramp16.png') as img:
        assert img.mode.startswith('I')  # a 16-bit image as PIL reads it
    x16, _ = load_image(tmp_path / 'ramp16.png', model)
    x8, _ = load_image(tmp_path / 'ramp8.png', model)
    torch.testing.assert_close(x16, x8, atol=0.02, rtol=0)  # the same picture, within rounding
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / 'float.tif')
    with pytest.raises(ValueError, match=r'expected an 8- or 16-bit image, got floating-point pixels'):
        load_image(tmp_path / 'float.tif', model)
    # 32-bit integers (mode I): 16-bit data as older Pillows read 16-bit PNGs, else refused
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / 'ramp32.tif')
    with Image.open(tmp_path / 'ramp32.tif') as img:
        assert img.mode == 'I'
    torch.testing.assert_close(load_image(tmp_path / 'ramp32.tif', model)[0], x8, atol=0.02, rtol=0)
    Image.fromarray(ramp.astype(np.int32) * 16).save(tmp_path / 'wide32.tif')
    with pytest.raises(ValueError, match=r'got 32-bit integer pixels \(PIL mode I\) from 0 to 1048560, beyond'):
        load_image(tmp_path / 'wide32.tif', model)


def test_photos_are_read_upright_as_their_exif_orientation_says(tmp_path):
    """A portrait photo stored on its side with its EXIF orientation is pictured upright, as viewers show it."""
    model = timm.create_model(CA_MODEL)
    portrait = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    portrait.save(tmp_path / 'upright.png')
    save_turned(portrait, tmp_path / 'turned.png')
    with Image.open(tmp_path / 'turned.png') as img:
        assert img.size == (300, 200)
    x_turned, _ = load_image(tmp_path / 'turned.png', model)
    x_upright, _ = load_image(tmp_path / 'upright.png', model)
    assert torch.equal(x_turned, x_upright)
    # and 16-bit photos too (scaled to 8 bits after turning)
    gray = np.asarray(portrait.convert('L')).astype(np.uint16) * 257
    Image.fromarray(gray).save(tmp_path / 'upright16.png')
    save_turned(Image.fromarray(gray), tmp_path / 'turned16.png')
    turned16, upright16 = (load_image(tmp_path / f'{name}16.png', model)[0] for name in ('turned', 'upright'))
    assert torch.equal(turned16, upright16)


def test_record_gates_refuses_training_mode(ca_model):
    ca_model.train()
    try:
        with record_gates(ca_model), pytest.raises(RuntimeError, match='eval mode'):
            ca_model(torch.randn(1, 3, 32, 32))
    finally:
        ca_model.eval()


def test_api_errors(ca_model):
    with pytest.raises(ValueError, match='mobilenetv2_050 has no CoordAttention blocks'):
        attention_maps(timm.create_model(PLAIN_MODEL), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match='not CoordAttention blocks of this model: blocks.1.0.conv_pw'):
        attention_maps(ca_model, torch.randn(1, 3, 32, 32), blocks=['blocks.1.0.conv_pw'])
    with pytest.raises(ValueError, match="'all' picks every CoordAttention block and goes alone, got it with blocks"):
        attention_maps(ca_model, torch.randn(1, 3, 32, 32), blocks=['all', 'blocks.2.2.se'])


def test_cli_figure_is_a_png_of_the_documented_size(image_file, tmp_path):
    out = tmp_path / 'maps.png'
    assert main(['attention', image_file, '--model', CA_MODEL, '--out', str(out), '--top-channels', '2',
                 '--dpi', str(DPI)]) == 0
    with Image.open(out) as img:
        assert img.format == 'PNG'
        # (3 + top channels) columns, a row for the input and one per default block (6 CA stages)
        assert img.size == (round(CELL * (3 + 2) * DPI), round(CELL * (1 + 6) * DPI))
    assert [p.name for p in tmp_path.iterdir() if p.suffix == '.png'] == ['maps.png']  # no temp file left


@pytest.mark.parametrize('stdout', ['file', 'pipe'])
def test_cli_figure_to_stdout(stdout, image_file, tmp_path):
    """`--out /dev/stdout > maps.png` or `| ...`: the figure alone on stdout (matplotlib's PNG writer seeks, which a
    pipe cannot), the status line on stderr."""
    command = [sys.executable, '-m', 'timm_coordatt', 'attention', image_file, '--model', CA_MODEL, '--out',
               '/dev/stdout', '--dpi', str(DPI)]
    if stdout == 'file':
        with open(tmp_path / 'maps.png', 'wb') as f:
            proc = subprocess.run(command, stdout=f, stderr=subprocess.PIPE, timeout=600)
        figure = (tmp_path / 'maps.png').read_bytes()
    else:
        proc = subprocess.run(command, capture_output=True, timeout=600)
        figure = proc.stdout
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stderr.decode().endswith('wrote /dev/stdout\n')
    with Image.open(io.BytesIO(figure)) as img:
        assert img.format == 'PNG' and img.size == (round(CELL * 3 * DPI), round(CELL * (1 + 6) * DPI))
        img.load()


STOP_WHILE_WRITING = """
import os, signal, sys
from matplotlib.figure import Figure
savefig = Figure.savefig
def save_then_stop(self, fname, **kwargs):
    savefig(self, fname, **kwargs)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
Figure.savefig = save_then_stop
from timm_coordatt.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize('stop', ['SIGINT', 'SIGTERM'])
def test_cli_stopped_while_writing_leaves_nothing(stop, image_file, tmp_path):
    """Ctrl-C or SIGTERM (`kill`, `timeout`) with the figure half written: no temporary file is left, Ctrl-C
    shows no traceback, and the exit status is the shell's for the signal."""
    proc = subprocess.run([sys.executable, '-c', STOP_WHILE_WRITING, stop, 'attention', image_file, '--model', CA_MODEL,
                           '--out', str(tmp_path / 'maps.png')], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + getattr(signal, stop), proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ['image.jpg']


def test_cli_compare_grad_cams(image_file, tmp_path, capsys):
    out = tmp_path / 'compare.png'
    weights = tmp_path / 'ca.safetensors'
    safetensors.torch.save_file(timm.create_model(CA_MODEL).state_dict(), weights)
    assert main(['attention', image_file, '--compare', PLAIN_MODEL, f'{CA_MODEL}={weights}', '--out', str(out),
                 '--dpi', str(DPI)]) == 0
    with Image.open(out) as img:
        assert img.format == 'PNG' and img.size == (3 * 2 * DPI, 3 * DPI)  # documented: 3 inches per model
    # as predict and validate say: pictures of random weights mean nothing
    warnings = [line for line in capsys.readouterr().err.splitlines() if 'random weights' in line]
    assert warnings == [f'warning: {PLAIN_MODEL} has random weights (no --pretrained, --checkpoint, local-dir: or '
                        f'hf-hub:)']


@pytest.mark.parametrize('case, message', [
    ('missing', 'image not found'),
    ('missing_image_and_checkpoint', 'image not found'),  # the image first: before weights are read or downloaded
    ('not_image', 'is not an image file'),
    ('no_ca', 'has no CoordAttention blocks'),
    ('unknown_model', "unknown model 'mobilenetv2_ca_typo'"),
    ('missing_checkpoint', 'nope.safetensors does not exist'),
    ('other_architecture', 'does not fit mobilenetv2_050_ca'),
    ('too_many_channels', 'top_channels expected 0 <= k <= '),
    ('no_out_folder', 'no folder'),
    # a folder no one can write in (Linux's /proc): refused before the checkpoint is looked at
    ('unwritable_out_folder', '--out /proc/maps.png: cannot write in /proc ('),
    ('unknown_format', 'expected a file name ending in one of'),
    ('too_many_pixels', 'expected at most 100,000,000 pixels, got'),
    ('decompression_bomb', 'decompression bomb'),
])
def test_cli_errors(case, message, image_file, tmp_path, capsys):
    image, model, extra = image_file, CA_MODEL, []
    if case.startswith('missing_image'):
        image = str(tmp_path / 'nope.jpg')
        extra = ['--checkpoint', str(tmp_path / 'nope.safetensors')]
    if case == 'missing':
        image = str(tmp_path / 'nope.jpg')
    elif case == 'not_image':
        image = str(tmp_path / 'text.jpg')
        (tmp_path / 'text.jpg').write_text('not an image')
    elif case == 'no_ca':
        model = PLAIN_MODEL
    elif case == 'unknown_model':
        model = 'mobilenetv2_ca_typo'
    elif case in ('missing_checkpoint', 'unwritable_out_folder'):
        extra = ['--checkpoint', str(tmp_path / 'nope.safetensors')]
    elif case == 'other_architecture':
        extra = ['--checkpoint', _saved_weights(timm.create_model('resnet18', num_classes=4), tmp_path)]
    elif case == 'too_many_channels':
        extra = ['--top-channels', '100000']  # more than any block has: refused before the figure is built
    elif case == 'too_many_pixels':
        extra = ['--dpi', '5000']  # refused before it is drawn: tens of GB
    elif case == 'decompression_bomb':
        image = str(tmp_path / 'bomb.png')  # more pixels than PIL's limit, in a small file
        Image.new('L', (20000, 9000)).save(image)
    out = tmp_path / {'no_out_folder': 'nope/maps.png', 'unknown_format': 'maps.xyz',
                      'unwritable_out_folder': '/proc/maps.png'}.get(case, 'maps.png')
    figures = plt.get_fignums()
    assert main(['attention', image, '--model', model, '--out', str(out)] + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and plt.get_fignums() == figures  # nothing written, no figure left open
    assert not list(tmp_path.rglob('*.tmp*'))


def _saved_weights(model, directory) -> str:
    path = str(directory / 'weights.safetensors')
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_cli_draws_a_fine_tuned_checkpoint_and_run_directory(image_file, tmp_path, capsys):
    # a `train` run's model: another number of classes than the architecture's default, and its run directory
    torch.manual_seed(0)
    tuned = timm.create_model(CA_MODEL, num_classes=9)
    checkpoint = _saved_weights(tuned, tmp_path)
    export_model(tuned, str(tmp_path / 'run'), [f'class{i}' for i in range(9)], resolve_data_config(model=tuned))
    for extra in (['--model', CA_MODEL, '--checkpoint', checkpoint], ['--model', f'local-dir:{tmp_path / "run"}'],
                  ['--compare', f'{CA_MODEL}={checkpoint}']):
        out = tmp_path / 'maps.jpg'
        assert main(['attention', image_file, *extra, '--out', str(out), '--dpi', str(DPI)]) == 0, capsys.readouterr()
        with Image.open(out) as img:
            assert img.format == 'JPEG'  # the format of the extension
        out.unlink()
    # the Grad-CAM explains the checkpoint's classes: its top class is the tuned model's own top class
    model = create_model(CA_MODEL, checkpoint=checkpoint).eval()
    x, _ = load_image(image_file, model)
    assert model.num_classes == 9 and grad_cam(model, x).target[0] == tuned.eval()(x).argmax().item()


@pytest.mark.parametrize('out, message', [
    ('{tmp}', 'expected the name of an image file, got a folder'),
    ('', 'expected the name of an image file, got an empty name'),
    ('{tmp}/nope/maps.png', 'no folder'),
    ('{tmp}/maps.xyz', 'expected a file name ending in one of'),
])
def test_cli_checks_out_before_the_model_is_built(out, message, image_file, tmp_path, capsys):
    # the model's name is checked as it is built: a bad --out is reported instead, so before that
    assert main(['attention', image_file, '--model', 'mobilenetv2_ca_typo', '--out', out.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and 'unknown model' not in err


def test_cli_compare_a_run_folder_with_an_equals_sign(image_file, tmp_path):
    torch.manual_seed(0)
    tuned = timm.create_model(CA_MODEL, num_classes=3)
    export_model(tuned, str(tmp_path / 'lr=0.1'), ['a', 'b', 'c'], resolve_data_config(model=tuned))
    out = tmp_path / 'compare.png'
    assert main(['attention', image_file, '--compare', f'local-dir:{tmp_path / "lr=0.1"}', CA_MODEL,
                 '--out', str(out), '--dpi', str(DPI)]) == 0
    assert out.is_file()


@pytest.mark.parametrize('options, message', [
    (['--compare', CA_MODEL, '--top-channels', '2'], '--checkpoint, --blocks and --top-channels go with --model'),
    (['--compare', f'{CA_MODEL}='], "--compare expected NAME or NAME=CHECKPOINT, got 'mobilenetv2_050_ca='"),
    (['--compare', '=w.pth'], "--compare expected NAME or NAME=CHECKPOINT, got '=w.pth'"),
    (['--compare', CA_MODEL, CA_MODEL], '--compare expected different models'),
])
def test_cli_rejects_bad_compare_options(options, message, image_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(['attention', image_file, *options, '--out', str(tmp_path / 'x.png')])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_compare_titles_name_the_checkpoint_file():
    from timm_coordatt.cli.attention import _titles
    assert _titles(['a', 'a=/runs/x/best.pth', 'b=/y/w.safetensors']) == ['a', 'a\nbest.pth', 'b\nw.safetensors']
    # two checkpoints of one name: the whole specs
    assert _titles(['a=/1/w.pth', 'a=/2/w.pth']) == ['a=/1/w.pth', 'a=/2/w.pth']
