"""The node's outbound C-STORE round trip per SR, beside dcmtk's ``storescu`` to the same Orthanc, same run.

Builds ``--results`` SRs of one-image CR studies (``fedclinic-hub data dicomize``, highdicom), then stores
them in a fresh Orthanc over one association three ways: ``storescu`` (one process, one association), the
node's ``StoreLink`` alone, and ``StoreLink`` while ``--busy`` Python threads keep the GIL busy, as the
worker's threads do during a burst (building SRs, preprocessing). Milliseconds per SR and the ratios.

    OMP_NUM_THREADS=1 FEDCLINIC_TEST_BUNDLE=build/test-bundle .venv/bin/python bench/store_round_trip.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))
from bench_burst import _floor_results, _storescu, _wait_count  # noqa: E402

from harness.demo.orthanc import Orthanc  # noqa: E402


def _busy(stop: threading.Event) -> None:
    # Pure-Python work that never releases the GIL by itself, like building and encoding datasets.
    n = 0
    while not stop.is_set():
        for i in range(2000):
            n += i * i
        n %= 1_000_003


def _link_ms(files: list[Path], busy: int) -> float:
    import pydicom

    from edge_node.analysis.result_file import ResultFile
    from edge_node.delivery.destination import Destination
    from edge_node.delivery.store_scu import StoreLink

    results = []
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        results.append(
            ResultFile(
                path,
                str(meta.MediaStorageSOPClassUID),
                str(meta.MediaStorageSOPInstanceUID),
                str(meta.TransferSyntaxUID),
            )
        )
    stop = threading.Event()
    threads = [threading.Thread(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
    for t in threads:
        t.start()
    try:
        with Orthanc(workdir=Path(tempfile.mkdtemp(prefix="rt-orthanc-"))) as orthanc:
            dest = Destination(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
            link = StoreLink(dest, "EDGE")
            try:
                t0 = time.perf_counter()
                for r in results:
                    link.store(r)
                elapsed = time.perf_counter() - t0
            finally:
                link.close()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return 1000 * elapsed / len(results)


def _storescu_ms(files: list[Path]) -> float:
    with Orthanc(workdir=Path(tempfile.mkdtemp(prefix="rt-orthanc-"))) as orthanc:
        t0 = time.perf_counter()
        _storescu(orthanc.dicom_port, orthanc.aet, files)
        t1 = _wait_count(orthanc, len(files), 120.0, lambda: True)
    return 1000 * (t1 - t0) / len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=100)
    parser.add_argument("--busy", type=int, default=1, help="GIL-holding threads in the loaded run")
    args = parser.parse_args(argv)

    from hub.data.dicomize import dicomize_images
    from hub.data.medmnist import load_medmnist

    work = Path(tempfile.mkdtemp(prefix="store-rt-"))
    data_env = os.environ.get("FEDCLINIC_DATA")
    data_root = Path(data_env) if data_env else REPO_ROOT.parent / "shared" / "data"
    images = load_medmnist("pneumoniamnist", "test", root=data_root).images
    studies = dicomize_images(
        images, work / "cr", dataset="pneumoniamnist", split="test", indices=range(args.results)
    )
    _floor_results([s.path for s in studies], work / "floor-sr")
    files = sorted((work / "floor-sr").iterdir())

    storescu = _storescu_ms(files)
    alone = _link_ms(files, 0)
    loaded = _link_ms(files, args.busy)
    result = {
        "results": len(files),
        "storescu_ms_per_sr": round(storescu, 2),
        "store_link_ms_per_sr": round(alone, 2),
        "store_link_busy_ms_per_sr": round(loaded, 2),
        "busy_threads": args.busy,
        "ratio_alone": round(alone / storescu, 2),
        "ratio_busy": round(loaded / storescu, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
