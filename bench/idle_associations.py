"""CPU a real edge node spends holding idle DICOM associations open (read from /proc/PID/stat, no psutil).

Starts ``fedclinic-edge serve``, opens N associations that then say nothing, and reports the node's CPU
(user + system) over a window, as a percentage of one core, next to the same node with none open.

    python bench/idle_associations.py --associations 50 --seconds 10 [--transport native|pynetdicom]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pynetdicom import AE

EDGE_BIN = Path(sys.executable).parent / "fedclinic-edge"
_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    # Fields 14 and 15 (utime, stime) after the command name, which is in parentheses and may hold spaces.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_percent(pid: int, seconds: float) -> float:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--transport", choices=["native", "pynetdicom"], default="native")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        config = root / "edge.toml"
        room = args.associations + 5
        config.write_text(
            f'ae_title = "EDGE"\nport = {port}\ndata_dir = "{root / "data"}"\nlog_level = "WARNING"\n'
            f"max_associations = {room}\nmax_associations_per_peer = {room}\n"
            "network_timeout_s = 600\ndimse_timeout_s = 600\n"
            f'receive_transport = "{args.transport}"\n'
            # No clinician page: its fixed default port may be taken on a shared machine.
            "page_enabled = false\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLINIC_EDGE_")}
        log = (root / "edge.log").open("wb")
        proc = subprocess.Popen(
            [str(EDGE_BIN), "serve", "--config", str(config)], stdout=log, stderr=log, env=env
        )
        ae = AE(ae_title="IDLESCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assocs = []
        try:
            deadline = time.time() + 60
            while True:
                probe = ae.associate("127.0.0.1", port, ae_title="EDGE")
                if probe.is_established:
                    probe.release()
                    break
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit(
                        "the edge node did not start: " + (root / "edge.log").read_text()[-2000:]
                    )
                time.sleep(0.2)
            time.sleep(2.0)
            base = cpu_percent(proc.pid, args.seconds)
            for _ in range(args.associations):
                assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
                if not assoc.is_established:
                    raise SystemExit("an association was refused")
                # Our own side idles slowly, so that it takes little of the cores the node is measured on.
                assoc.dul._run_loop_delay = 0.2
                assocs.append(assoc)
            time.sleep(1.0)
            idle = cpu_percent(proc.pid, args.seconds)
        finally:
            for assoc in assocs:
                assoc.release()
            proc.terminate()
            proc.wait(60)
            log.close()
    result = {
        "associations": args.associations,
        "receive_transport": args.transport,
        "window_s": args.seconds,
        "node_cpu_percent_no_association": round(base, 1),
        "node_cpu_percent_idle_associations": round(idle, 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
