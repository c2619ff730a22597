""" `timm-coordatt convert`: turn the authors' MobileNetV2 + CA checkpoint into a timm Hub folder.

    timm-coordatt convert mbv2_ca.pth mobilenetv2_ca.in1k/
    timm-coordatt publish mobilenetv2_ca.in1k/ <org>/mobilenetv2_ca.in1k
"""
import argparse
import sys

from ..convert import ConversionError, convert


def run(args: argparse.Namespace) -> int:
    try:
        out_dir = convert(args.checkpoint, args.out_dir, model_name=args.model, repo_id=args.repo_id,
                          use_ema=args.use_ema)
    except ConversionError as e:
        print(f'timm-coordatt convert: error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {out_dir} (config.json, model.safetensors, README.md); the converted model reproduces the '
          f"authors' logits")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'convert',
        help="convert the authors' MobileNetV2 + CA checkpoint (mbv2_ca.pth) to timm's format",
        description="Map the authors' MobileNetV2 + Coordinate Attention checkpoint (a state dict, bare or under "
                    "'state_dict' / 'model', with or without 'module.'; its EMA with --use-ema) onto timm's "
                    "mobilenetv2_ca, check that both give the same logits, and write config.json, model.safetensors "
                    "and a model card into a new folder, loadable with timm.create_model('local-dir:OUT_DIR', "
                    "pretrained=True) after `import timm_coordatt`.")
    parser.add_argument('checkpoint', help="the authors' checkpoint (.pth), read with torch.load(weights_only=True)")
    parser.add_argument('out_dir', help='folder to create (must not exist)')
    parser.add_argument('--model', default='mobilenetv2_ca', help='timm model to convert to (default: %(default)s)')
    parser.add_argument('--repo-id', default=None,
                        help="Hub repository the model card's usage names (default, for a 1000-class head: this "
                             "package's repository for MODEL.in1k; other heads need it)")
    parser.add_argument('--use-ema', action='store_true',
                        help="convert the checkpoint's EMA weights ('state_dict_ema' / 'model_ema')")
    parser.set_defaults(func=run)
