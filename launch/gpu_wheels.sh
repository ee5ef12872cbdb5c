#!/usr/bin/env bash
# Here, before a GPU check: the Python packages the device machine lacks (DeepSpeed and what it needs beyond the
# machine's image: pydantic, pydantic-core, annotated-types, typing-inspection, hjson), as py3.12 manylinux wheels
# in .whl/ (ignored by git; carried with `carry: [".whl"]`, about 5 MB of the 64 MiB that may travel). DeepSpeed has
# no wheel on PyPI: it is built here as a pure-Python wheel (DS_BUILD_OPS=0; the check uses torch's AdamW, no op).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 hjson==3.1.0
if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
fi
du -sh .whl
