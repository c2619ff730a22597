#!/usr/bin/env bash
# timm's own model tests (tests/test_models.py of the installed timm's source distribution),
# run on this package's models only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
version=$(python -c 'import timm; print(timm.__version__)')
pip download -q --no-deps --no-binary :all: "timm==$version" -d "$work"
tar -xzf "$work/timm-$version.tar.gz" -C "$work"
mkdir "$work/suite"
cp "$work/timm-$version/tests/test_models.py" "$work/suite/"
cp "$here/timm_tests_conftest.py" "$work/suite/conftest.py"
cd "$work/suite"
python -m pytest -q -p no:cacheprovider -o addopts="" --disable-warnings test_models.py "$@"
