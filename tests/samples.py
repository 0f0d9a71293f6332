"""Where the tests find Istio's sample manifests and test certificates.

`tests/data/istio-samples/` holds unmodified copies of files from the Istio project
(Apache-2.0; see NOTICE and PROVENANCE.md there), so the repository stands alone.
"""

from __future__ import annotations

from pathlib import Path

ISTIO_SAMPLES_ROOT = Path(__file__).resolve().parent / "data" / "istio-samples"
# Paths below this mirror Istio's repository layout (`samples/bookinfo/...`).
ISTIO_SAMPLES = ISTIO_SAMPLES_ROOT / "samples"
