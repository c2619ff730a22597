""" torch.hub entrypoints: every model timm_coordatt registers with timm, generated from timm's registry.

    model = torch.hub.load('<checkout of this repository>', 'mobilenetv2_ca', pretrained=True, source='local')

Each entrypoint is `timm.create_model(<name>, pretrained=..., **kwargs)`, so `num_classes`,
`in_chans`, `pretrained_cfg_overlay`, `cache_dir` etc. work as with timm. The models are defined
only in the package: this file imports it (once per process, whatever torch.hub does with this
file), so no model is registered twice. torch.hub puts the checkout first on `sys.path`, so in a
process that has not imported `timm_coordatt` yet, the checkout's copy is the one imported, without
C kernels unless built there (`pip install -e <checkout>`); import the installed package first to use it.
"""
import timm as _timm

from timm_coordatt.pretrained import list_package_models as _list_package_models

dependencies = ['torch', 'timm', 'huggingface_hub', 'safetensors']


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        return _timm.create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = _timm.models.model_entrypoint(name).__doc__
    return entrypoint


globals().update({_name: _entrypoint(_name) for _name in _list_package_models()})
