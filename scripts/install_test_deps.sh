#!/usr/bin/env bash
# The browser test drives Debian's chromium through playwright (which cannot download its own browser
# here). Install it when it is missing and we may (root, apt available); say so when we cannot: the test
# then skips with that reason.
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "install_test_deps: apt-get could not install chromium; the dashboard browser test will be skipped" >&2
else
  echo "install_test_deps: chromium is not installed and apt-get is not available to root here;" \
       "the dashboard browser test will be skipped (apt-get install -y chromium)" >&2
fi
exit 0
