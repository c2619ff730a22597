""" `timm-coordatt publish`: upload a converted or fine-tuned model folder to a Hugging Face Hub repository.

    timm-coordatt publish mobilenetv2_ca.in1k/ <org>/mobilenetv2_ca.in1k
    HF_ENDPOINT=https://hub.example.com timm-coordatt publish my_finetune/ team/mobilenetv2_ca.flowers --private
"""
import argparse
import sys

from huggingface_hub.errors import HfHubHTTPError

from ..pretrained import PretrainedWeightsError
from ..publish import PublishError, publish


def run(args: argparse.Namespace) -> int:
    try:
        commit = publish(
            args.folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
            commit_message=args.message, create_pr=args.create_pr, dataset=args.dataset)
    except (PublishError, PretrainedWeightsError, HfHubHTTPError) as e:
        print(f'timm-coordatt publish: error: {e}', file=sys.stderr)
        return 2
    print(f'published {args.folder} to {commit.commit_url}')
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'publish',
        help='upload a model folder (config.json + model.safetensors) to a Hugging Face Hub repository',
        description='Check that FOLDER loads into a timm_coordatt model, write a model card into it if it has no '
                    'README.md, create the Hub repository REPO_ID if needed and upload config.json, '
                    'model.safetensors and README.md. The server is the one HF_ENDPOINT names (huggingface.co by '
                    'default); the token is --token, HF_TOKEN or the one saved by `hf auth login`.')
    parser.add_argument('folder', help='folder written by `timm-coordatt convert` or timm\'s save_for_hf')
    parser.add_argument('repo_id', help='Hub repository, <user or org>/<name>')
    parser.add_argument('--token', default=None, help='Hub token (default: HF_TOKEN or the saved login)')
    parser.add_argument('--private', action='store_true', help='create the repository as private')
    parser.add_argument('--revision', default=None, help='branch to upload to (default: main)')
    parser.add_argument('--message', default='Upload model with timm-coordatt', help='commit message')
    parser.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    parser.add_argument('--dataset', default=None, help='training dataset named in a generated model card')
    parser.set_defaults(func=run)
