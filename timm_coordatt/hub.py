""" Where this package's pretrained weights live on the Hugging Face Hub.

Every model's `pretrained_cfg['hf_hub_id']` is `f'{HUB_ORG}/{arch}.{tag}'`. Point the whole package
at a mirror or a private organisation with `TIMM_COORDATT_HUB_ORG=<org>` (read at import), and at
another Hub server with huggingface_hub's own `HF_ENDPOINT`. A repository of your own (say, a
fine-tuned model published with `timm-coordatt publish`) loads with `hf-hub:<user>/<repo>`.
"""
import os

__all__ = ['HUB_ORG', 'hub_id']

HUB_ORG = os.environ.get('TIMM_COORDATT_HUB_ORG') or 'timm-coordatt'  # set but empty: the default


def hub_id(model_name: str) -> str:
    """Hub repository id of `model_name` (`arch.tag`) in this package's organisation."""
    return f'{HUB_ORG}/{model_name}'
