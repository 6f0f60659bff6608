#!/usr/bin/env bash
# Fill .whl/ with what bench/gpu_check.sh needs on a CUDA PyTorch machine that cannot reach a
# package index (Python 3.12, x86-64): sdbatch's dependencies that such images lack. Ray's wheel
# is trimmed of its Java jar, dashboard client and libraries sdbatch does not use (rllib, serve,
# tune, train, llm), to 40 MB, so that the whole folder travels in well under 64 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$@"
}
download "diffusers==$(python3 -c 'import diffusers; print(diffusers.__version__)')" \
    torch-fidelity jsonschema jsonschema-specifications referencing rpds-py nvidia-ml-py
download "ray==$(python3 -c 'import ray; print(ray.__version__)')"
python3 - <<'PY'
import base64, hashlib, pathlib, zipfile

TRIM = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/serve/", "ray/tune/",
        "ray/train/", "ray/llm/")
wheel = next(pathlib.Path(".whl").glob("ray-*.whl"))
trimmed = wheel.with_suffix(".trimmed")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
    record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
    kept = [i for i in src.infolist() if not i.filename.startswith(TRIM) and i.filename != record]
    lines = []
    for info in kept:
        data = src.read(info)
        dst.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{info.filename},sha256={digest},{len(data)}")
    dst.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
trimmed.replace(wheel)
PY
du -sh .whl
