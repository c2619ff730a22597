""" conftest for timm's own `tests/test_models.py`: registers this package before collection and
keeps only the tests parametrised with one of its models. """
import timm

import timm_coordatt  # noqa: F401  (registers the models and the 'ca' layer)

OURS = {
    name for name in timm.list_models()
    if timm.models.model_entrypoint(name).__module__.startswith('timm_coordatt')}


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        (keep if params.get('model_name') in OURS else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
