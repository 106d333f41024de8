#!/usr/bin/env bash
# Regenerate the exact pins (requirements.lock, requirements-dev.lock) from the hand-edited requirements*.txt
# with pip-tools in a throwaway venv; existing pins are kept unless an input asks otherwise (--upgrade-package X
# or -U passed here upgrades). Run it after editing requirements*.txt; commit both lock files.
set -euo pipefail; cd "$(dirname "$0")/.."; tools="${TMPDIR:-/tmp}/xray-pip-tools"
[ -x "$tools/bin/pip-compile" ] || { python3.11 -m venv "$tools" && "$tools/bin/pip" install -q pip-tools==7.6.2; }
opts=(-q --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host "$@")
"$tools/bin/pip-compile" "${opts[@]}" -o requirements.lock requirements.txt
"$tools/bin/pip-compile" "${opts[@]}" -c requirements.lock -o requirements-dev.lock requirements-dev.txt
