"""Numeric parity of an exported ONNX model against its torch source, on real images."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.errors import ParityError

logger = logging.getLogger(__name__)

#: Float32 CPU kernels of torch and ONNX Runtime agree to ~1e-6 on these models; 1e-4 leaves room without
#: letting a wrong graph (a missed BatchNorm fold, a wrong normalisation) through.
DEFAULT_BOUND = 1e-4


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    mean_abs_diff: float
    num_images: int
    bound: float


def cpu_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with a fixed thread count (reproducible timings, no oversubscription)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run the single-input model over ``x`` (N, C, H, W) in batches; returns the first output stacked."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs).astype(np.float32)


def run_onnx_outputs(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """Every output of the single-input model over ``x`` (N, C, H, W), each stacked over batches."""
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
    return [np.concatenate([p[k] for p in parts]).astype(np.float32) for k in range(len(parts[0]))]


def _torch_outputs(model: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """Every output of ``model`` (a tensor, or a tuple such as (logits, embedding)) over ``x``, stacked."""
    chunks: list[list[np.ndarray]] = []
    with torch.inference_mode():
        for i in range(0, len(x), 256):
            out = model(torch.from_numpy(x[i : i + 256]))
            outs = out if isinstance(out, tuple) else (out,)
            chunks.append([o.numpy() for o in outs])
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def check_parity(
    model: nn.Module, onnx_path: Path, x: np.ndarray, *, bound: float = DEFAULT_BOUND
) -> ParityReport:
    """Compare torch and ONNX Runtime outputs on preprocessed real images ``x`` (N, C, H, W) float32.

    Every output is compared (a model exported with its embedding has two). Raises ParityError when the
    largest absolute difference exceeds ``bound``.
    """
    if x.ndim != 4 or x.dtype != np.float32 or len(x) == 0:
        raise ValueError(f"parity needs a non-empty float32 batch (N, C, H, W), got {x.dtype} {x.shape}")
    model.eval()
    expected_all = _torch_outputs(model, x)
    got_all = run_onnx_outputs(cpu_session(onnx_path), x)
    if len(got_all) != len(expected_all):
        raise ParityError(
            f"the ONNX model has {len(got_all)} outputs, torch {len(expected_all)}; re-export the model"
        )
    for got, expected in zip(got_all, expected_all, strict=True):
        if got.shape != expected.shape:
            raise ParityError(
                f"ONNX output shape {got.shape} differs from torch {expected.shape}; re-export the model"
            )
    diff = np.concatenate([np.abs(g - e).ravel() for g, e in zip(got_all, expected_all, strict=True)])
    report = ParityReport(
        max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), num_images=len(x), bound=bound
    )
    logger.info("parity on %d images: max abs diff %.3g (bound %.1g)", len(x), report.max_abs_diff, bound)
    if not report.max_abs_diff <= bound:
        raise ParityError(
            f"ONNX Runtime differs from torch by up to {report.max_abs_diff:.3g} on {len(x)} real images "
            f"(bound {bound:.1g}); the export is wrong. Check the opset and unsupported layers, re-export"
        )
    return report
