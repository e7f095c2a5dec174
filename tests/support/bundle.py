"""Build a real signed test bundle: train the student on PneumoniaMNIST, export with int8, sign.

Usable from tests (``build_test_bundle(tmp_path)``) and from the command line in a hub-capable venv::

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.support.bundle build/dev-bundle

which writes ``build/dev-bundle/bundle`` (the bundle) and ``build/dev-bundle/hub.pub`` (the key to trust).
A bundle already there that verifies is kept (``--force`` rebuilds): ``make test`` does not retrain each time.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

#: Enough for a real model (test AUC ~0.95) in ~20 s on one thread.
EPOCHS = 3
MAX_TRAIN_SAMPLES = 2400
MODEL_VERSION = "1.0.0"


def build_test_bundle(
    out_dir: Path,
    *,
    epochs: int = EPOCHS,
    max_train_samples: int = MAX_TRAIN_SAMPLES,
    seed: int = 0,
    data_root: Path | None = None,
) -> tuple[Path, Path]:
    """Train, export (fp32 + gated int8, both with the embedding output) and sign a PneumoniaMNIST student
    bundle under ``out_dir``.

    Returns (bundle directory, public key path). ``out_dir`` also keeps the run (``run/``) and the key pair
    (``keys/hub.key``, ``keys/hub.pub``), so tests can re-sign altered manifests.
    """
    # Imported here, not at module level: edge-only environments (no torch) can still import this module
    # and skip, while hub-capable ones build the real thing.
    import torch
    from rich.console import Console

    from export.signing import create_keypair
    from hub.commands.export_bundle import build_bundle
    from hub.training.supervised import TrainConfig, train_supervised

    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        model="student_cnn_s",
        dataset="pneumoniamnist",
        epochs=epochs,
        seed=seed,
        max_train_samples=max_train_samples,
    )
    quiet = Console(stderr=True, quiet=True)
    result = train_supervised(config, out_dir / "run", console=quiet, data_root=data_root)
    private, public = create_keypair(out_dir / "keys")
    bundle_dir = out_dir / "bundle"
    build_bundle(
        result.best_path,
        private,
        bundle_dir,
        model_version=MODEL_VERSION,
        model_id="pneumonia-student",
        data_root=data_root,
    )
    pub = out_dir / "hub.pub"
    pub.write_bytes(public.read_bytes())
    return bundle_dir, pub


def existing_bundle(out_dir: Path) -> tuple[Path, Path] | None:
    """``out_dir``'s bundle and key when the bundle still verifies with that key and carries the embedding
    output the node's learners need (older bundles lack it and are rebuilt), else None."""
    from edge_node.protocol.bundle import verify_bundle
    from edge_node.protocol.errors import BundleError
    from edge_node.protocol.signing import load_public_keys

    bundle_dir, pub = out_dir / "bundle", out_dir / "hub.pub"
    if not (bundle_dir.is_dir() and pub.is_file()):
        return None
    try:
        verified = verify_bundle(bundle_dir, load_public_keys(pub))
    except BundleError:
        return None
    if verified.manifest.head is None:
        return None
    return bundle_dir, pub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder that gets bundle/, hub.pub, keys/ and run/")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if OUT_DIR holds a bundle that verifies"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    found = None if args.force else existing_bundle(args.out_dir)
    if found is not None:
        print(f"bundle: {found[0]} (exists and verifies; --force rebuilds)\npublic key: {found[1]}")
        return 0
    for name in ("bundle", "keys", "run", "hub.pub"):  # only what build_test_bundle itself writes
        path = args.out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    start = time.perf_counter()
    bundle, pub = build_test_bundle(args.out_dir, epochs=args.epochs)
    print(f"bundle: {bundle}\npublic key: {pub}\n({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
