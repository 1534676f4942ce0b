#!/usr/bin/env bash
# Install everything the pipeline needs on a fresh machine; `--test` adds the test tools.
# torch is installed first and pinned: any other version pulls gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# apt_install PACKAGE...: Debian packages, when this is a Debian machine and we are root.
apt_updated=""
apt_install() {
  command -v apt-get >/dev/null || return 1
  if [ "$(id -u)" != 0 ]; then
    echo "install: not root: skipping apt-get install $*" >&2
    return 1
  fi
  if [ -z "$apt_updated" ]; then
    apt-get update -qq || return 1
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Offline copy of Fashion-MNIST (Debian package); the download stage falls back to the
# public mirrors when it is absent, so a machine without apt or root still works.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  apt_install dataset-fashion-mnist \
    || echo "install: dataset-fashion-mnist unavailable; download will use the mirrors" >&2
fi

python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".${extras}"

# The page template .dvc/config names for `dvc plots show/diff`: vega, vega-lite and
# vega-embed (pinned with hashes in scripts/plots/package-lock.json) inlined, so plots draw
# offline. Without npm it loads them from DVC's CDN instead; without any template DVC fails.
if ! command -v npm >/dev/null; then
  apt_install nodejs npm || true
fi
if command -v npm >/dev/null \
  && (cd scripts/plots && npm ci --silent --no-audit --no-fund --ignore-scripts); then
  python3 scripts/plots/make_template.py
else
  echo "install: no npm or \`npm ci\` failed: plot pages load vega from a CDN (blank offline)" >&2
  python3 scripts/plots/make_template.py --cdn
fi

# Headless chromium for tests/test_plots_browser.py, which skips without it.
if [ -n "$extras" ] && ! command -v chromium >/dev/null; then
  apt_install chromium || echo "install: chromium unavailable; the browser test will skip" >&2
fi
