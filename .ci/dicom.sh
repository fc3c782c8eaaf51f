#!/usr/bin/env bash
# CI: make real DICOM servers available to tests/app/test_receive.py and
# tests/app/test_dicomweb.py.
#
# Installs Debian's dcmtk (storescu, storescp), orthanc and orthanc-dicomweb when
# missing, then checks that they work here: dcmtk's own storescu answers (pynetdicom
# installs Python scripts of the same names, so the check asks for dcmtk's), and a
# private Orthanc with the DICOMweb plugin starts on a loopback port with a
# throw-away configuration and storage (tests/dicomnet.py: Orthanc), answers a QIDO-RS
# request and is stopped again.  Nothing is left running and /etc is not configured.
#
# Exit 0: they work here -- export FLOW_REQUIRE_DICOM=1 so that those tests fail
# rather than skip.  Exit 1: they cannot (not root, no apt-get, Orthanc does not
# start); the tests then skip with the reason.
#
#   bash .ci/dicom.sh && export FLOW_REQUIRE_DICOM=1
set -uo pipefail
cd "$(dirname "$0")/.."

say() { echo "dicom.sh: $*" >&2; }
have_all() {
    [ -x /usr/bin/storescu ] && [ -x /usr/bin/storescp ] \
        && { command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } \
        && { [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
             || [ -e /usr/lib/orthanc/libOrthancDicomWeb.so ]; }
}

if ! have_all; then
    if [ "$(id -u)" != 0 ]; then say "not root: cannot install dcmtk, orthanc, orthanc-dicomweb"; exit 1; fi
    if ! command -v apt-get >/dev/null 2>&1; then say "no apt-get: install dcmtk, orthanc and orthanc-dicomweb"; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    pkgs="dcmtk orthanc orthanc-dicomweb"
    # the orthanc package's service is not started (no init system in CI; and the
    # tests start their own): policy-rc.d refuses, which apt reports and goes on
    timeout 300 apt-get install -y --no-install-recommends $pkgs >/dev/null 2>&1 \
        || { timeout 300 apt-get update -q >/dev/null \
             && timeout 300 apt-get install -y --no-install-recommends $pkgs; } \
        || { say "apt-get install $pkgs failed"; exit 1; }
fi
if ! have_all; then say "still missing some of dcmtk, orthanc, orthanc-dicomweb"; exit 1; fi

timeout 120 python - <<'PY' || { say "the DICOM tools do not work here"; exit 1; }
import sys, tempfile
from pathlib import Path
sys.path.insert(0, ".")
from tests.dicomnet import Orthanc, dcmtk
exe = dcmtk("storescu")
if not exe:
    print("dicom.sh: no dcmtk storescu on PATH (only pynetdicom's?)", file=sys.stderr)
    sys.exit(1)
with tempfile.TemporaryDirectory(prefix="orthanc-check-") as tmp:
    with Orthanc(Path(tmp)) as o:
        r = o.get("/dicom-web/studies")
        print(f"dicom.sh: {exe}; Orthanc on {o.url}: QIDO-RS {r.status_code}", file=sys.stderr)
        sys.exit(0 if r.status_code == 200 else 1)
PY
