""" `timm-coordatt attention`: draw what the CA blocks of a model do on one image, or compare Grad-CAMs.

    timm-coordatt attention cat.jpg --model mobilenetv2_ca --pretrained --out maps.png --top-channels 3
    timm-coordatt attention cat.jpg --compare mobilenetv2_100 efficientnet_b0 mobilenetv2_ca=ca.pth \
        --pretrained --out compare.png
"""
import argparse
import os
import sys
from typing import List, Sequence, Tuple

from . import add_model_kwargs


def run(args: argparse.Namespace) -> int:
    # imported here: matplotlib, which the other commands do not need (it writes a cache under $HOME)
    from ..attention_maps import (
        attention_maps, figure_format, grad_cam, model_input, plot_attention_maps, plot_grad_cam_comparison,
        read_image, save_figure)
    from ..pretrained import PretrainedWeightsError
    # timm names, local-dir: and hf-hub: sources; a checkpoint's head (a fine-tuned model's classes) kept
    from ..training import (
        UsageError, check_can_create, check_model_kwargs, create_model, warn_of_random_weights, written_in_place)
    try:
        figure_format(args.out)  # before the models run
        if not written_in_place(args.out):
            check_can_create(args.out, '--out')
        check_model_kwargs(args.model_kwargs, 'attention', classes_from="the weights' number of classes")
        image = read_image(args.image)  # before any model is made (or its weights downloaded)
        if args.compare:
            views = {}
            for spec, title in zip(args.compare, _titles(args.compare)):
                name, checkpoint = _split(spec)
                model = create_model(
                    name, pretrained=args.pretrained, checkpoint=checkpoint or None, **args.model_kwargs)
                warn_of_random_weights(name, args.pretrained, checkpoint)
                x, config = model_input(image, model)
                views[title] = (x, config, grad_cam(model, x, target=args.target))
            fig = plot_grad_cam_comparison(views)
        else:
            model = create_model(
                args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **args.model_kwargs)
            warn_of_random_weights(args.model, args.pretrained, args.checkpoint)
            x, config = model_input(image, model)
            maps = attention_maps(model, x, args.blocks)
            fig = plot_attention_maps(
                x, config, maps, grad_cam(model, x, target=args.target),
                top_channels=args.top_channels, title=args.model)
        save_figure(fig, args.out, dpi=args.dpi)
    except (OSError, ValueError, PretrainedWeightsError, UsageError) as e:  # missing files, network, bad input
        print(f'timm-coordatt attention: error: {e}', file=sys.stderr)
        return 2
    # not into the figure's own stream (`--out /dev/stdout | ...`)
    print(f'wrote {args.out}', file=sys.stderr if written_in_place(args.out) else sys.stdout)
    return 0


def _titles(specs: Sequence[str]) -> List[str]:
    """Panel titles: the model name and the checkpoint's file name (whole specs where those coincide)."""
    titles = []
    for spec in specs:
        name, checkpoint = _split(spec)
        titles.append(f'{name}\n{os.path.basename(checkpoint)}' if checkpoint else name)
    return titles if len(set(titles)) == len(titles) else list(specs)


def _split(spec: str) -> Tuple[str, str]:
    """NAME[=CHECKPOINT] as (NAME, CHECKPOINT or ''); a `local-dir:` run folder whose path has a '=' is a NAME."""
    if spec.startswith('local-dir:') and os.path.isdir(spec[len('local-dir:'):]):
        return spec, ''
    name, _, checkpoint = spec.partition('=')
    return name, checkpoint


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'attention',
        help='draw the CA gates of a model on an image, or compare Grad-CAMs of several models',
        description='Draw, for chosen Coordinate Attention blocks, the height gate a_h, the width gate a_w and '
                    'their product (averaged over channels, optionally the most position-selective channels) '
                    'over the image, with a Grad-CAM of the last stage; or, with --compare, the Grad-CAMs '
                    'of several models (CA, SE, none) side by side. The image is preprocessed with each '
                    "model's own data config.")
    parser.add_argument('image', help='image file')
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument('--model', help='model with CoordAttention blocks, e.g. mobilenetv2_ca, local-dir:RUN_DIR or '
                       'hf-hub:ID')
    which.add_argument(
        '--compare', nargs='+', metavar='NAME[=CHECKPOINT]',
        help='models whose Grad-CAMs to put side by side, each optionally with a checkpoint file')
    parser.add_argument('--checkpoint', help='checkpoint file for --model (timm loader: .safetensors or .pth)')
    parser.add_argument('--pretrained', action='store_true', help='load the published weights')
    add_model_kwargs(parser, example="block_args={'attn_layer': 'ca'} for a model trained with them")
    parser.add_argument('--out', required=True, help='image file to write: PNG, or the format its extension names')
    parser.add_argument(
        '--blocks', nargs='+', metavar='NAME',
        help='CA module names (e.g. blocks.3.3.se) or "all"; default: the last CA block of each stage')
    parser.add_argument(
        '--top-channels', type=int, default=0, metavar='K',
        help='also draw the K channels whose a_h * a_w varies most over the image (default: 0)')
    parser.add_argument(
        '--target', type=int, metavar='CLASS', help='class index Grad-CAM explains (default: the top class)')
    parser.add_argument('--dpi', type=int, default=100, help='figure resolution (default: 100)')
    parser.set_defaults(func=_checked_run(parser))


def _checked_run(parser: argparse.ArgumentParser):
    def func(args: argparse.Namespace) -> int:
        if args.compare and (args.checkpoint or args.blocks or args.top_channels):
            parser.error('--checkpoint, --blocks and --top-channels go with --model; '
                         'give checkpoints to --compare as NAME=CHECKPOINT')
        if args.top_channels < 0:
            parser.error(f'--top-channels expected a count >= 0, got {args.top_channels}')
        if args.dpi < 1:
            parser.error(f'--dpi expected a positive integer, got {args.dpi}')
        for spec in args.compare or ():
            name, checkpoint = _split(spec)
            if not name or (spec != name and not checkpoint):
                parser.error(f'--compare expected NAME or NAME=CHECKPOINT, got {spec!r}')
        if args.compare and len(set(args.compare)) < len(args.compare):
            parser.error(f'--compare expected different models, got {" ".join(args.compare)}')
        return run(args)
    return func
