"""How many of each clinic's test images fall outside a model's input envelope (the bundle's check).

The envelope is fitted with the exporter's functions (``export.envelope.fit_envelope``) on the model's
embeddings of the pooled validation split of the clinics that trained: the images the model was checked on,
as a federated envelope would hold them. Each
clinic's test images, the unseen clinic's and every panel profile's are then counted inside or outside,
so the share outside can be set beside the AUC there. The envelope's intensity part is fitted on the same
images' grey values (``export.envelope.fit_intensity_envelope``; the bench's images are the model input in
[0, 1]). Per place: ``outside`` as a node counts it (outside either part), and apart ``embedding``,
``intensity`` and ``negative`` (outside the intensity part and looking like a negative). No label is read:
the counts are what a node's drift monitor sees. ``thresholds`` holds both parts' thresholds.

``hub`` holds the same counts for the envelope fitted on the hub's own validation split (raw images, no
clinic's profile), which is what ``fedclinic-hub export`` ships today: the hub holds no clinic's images.
Its grey-value part is widened by the exporter's augmented copies; the pooled one is not (it already spans
the clinics' scanners, and copies on top of it take in inverted displays: docs/benchmarks.md, "The envelope
the product ships").

``federated`` holds them for the envelope the two envelope rounds fit over the wire
(``edge_node.protocol.envelope_rounds``): each trained clinic is a node whose images are its validation
split; it sends per-fold sums, the hub adds them up and sends back the held-out envelopes, each node counts
its held-out distances in the fixed histogram, and the hub reads the thresholds from the summed histograms.
A clinic with fewer than ``MIN_FOLD_IMAGES`` validation images sends nothing, as a node would refuse;
``nodes`` counts the clinics that sent sums. Over the same images the fit equals the pooled one (the sums
add up) but for the folds (hashed per node here, the row index there) and the histogram's bin width.

``traffic`` holds them for the same rounds over each trained clinic's analysed images
(``BenchData.traffic_x``: up to 120 validation images rendered with its own profile), which is what a node
answers from in the product: every clinic takes part, however few labeled images it holds.

Each place's images are embedded, and their grey-value features taken, once; every envelope judges them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edge_node.protocol.envelope import EnvelopeCheck, IntensityCheck, intensity_features
from edge_node.protocol.envelope_moments import MIN_FOLD_IMAGES
from edge_node.protocol.envelope_rounds import (
    EMBEDDING,
    INTENSITY,
    MIN_FITTED,
    EnvelopeRounds,
    added_up,
    fitted_envelope,
    held_out_params,
    node_histograms,
    node_moments,
)
from edge_node.protocol.manifest import InputEnvelope
from export.envelope import (
    DEFAULT_QUANTILE,
    FOLDS,
    INTENSITY_COPIES,
    INTENSITY_LEVELS,
    fit_envelope,
    fit_intensity_envelope,
)
from harness.flbench.datasets import BenchData
from hub.models.fl_cnn import FlCnn
from hub.rounds.envelope_influence import audit_answers, thresholds_of

__all__ = ["Embedder", "FederatedFit", "envelope_rates", "feature_embedder", "federated_envelope"]

#: How much wider than its features the hostile node of ``traffic_hostile`` answers (see ``stretch``).
HOSTILE_STRETCH = 3.0

#: (N, 1, H, W) normalised images → (N, D) embeddings (the input of the model's final linear layer).
Embedder = Callable[[torch.Tensor], np.ndarray]


def feature_embedder(model: FlCnn, batch_size: int = 512) -> Embedder:
    """The CNN's features (what its head reads), in eval mode, as the exported embedding output."""

    def embed(x: torch.Tensor) -> np.ndarray:
        model.eval()
        with torch.inference_mode():
            parts = [model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat(parts).numpy().astype(np.float64) if parts else np.zeros((0, model.head.in_features))

    return embed


@dataclass(frozen=True)
class FederatedFit:
    """The envelope the two rounds fit over the clinics' validation images, and who took part."""

    #: None when the clinics that sent sums hold fewer than ``MIN_FITTED`` images (the hub fits nothing).
    envelope: InputEnvelope | None
    #: The clinics that sent sums (those with at least ``MIN_FOLD_IMAGES`` validation images).
    nodes: tuple[str, ...]
    #: How many images their sums cover.
    images: int
    #: Per node, what `envelope build` shows of it (``hub.rounds.envelope_influence``): per part, the
    #: threshold with its counts over the threshold without them (``threshold``) and the fit's spread with
    #: its sums over that without them (``spread``); None where none can be read without them.
    influence: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    #: The nodes `envelope build` would warn about (``AnswerAudit.named``).
    warned: tuple[str, ...] = ()
    #: The nodes that answered stretched (``stretch``).
    hostile: tuple[str, ...] = ()


def federated_envelope(
    embeddings: Mapping[str, np.ndarray],
    images: Mapping[str, torch.Tensor],
    quantile: float = DEFAULT_QUANTILE,
    stretch: Mapping[str, float] | None = None,
) -> FederatedFit:
    """Both envelope rounds with each clinic a node: ``embeddings`` (N_c, D) and ``images`` (N_c, 1, H, W)
    (the model input in [0, 1]) of each clinic's validation split, image i keyed ``f"{clinic}/{i}"``.
    ``stretch`` makes clinics hostile: each answers both rounds, consistently, as if its features lay that
    many times farther from their mean than they do (sums that pass the hub's checks, meant to widen the
    envelope so that the drift alarm stays quiet)."""
    dim = next(iter(embeddings.values())).shape[1]
    rounds = EnvelopeRounds(
        model_id="bench", model_version="0.0.0", embedding_dim=dim, levels=INTENSITY_LEVELS, folds=FOLDS
    )
    sending: dict[str, tuple[list[str], dict[str, np.ndarray]]] = {}
    for clinic, e in embeddings.items():
        if len(e) < MIN_FOLD_IMAGES:
            continue  # a node refuses: no sum over fewer than MIN_FOLD_IMAGES images leaves it
        features = {EMBEDDING: e, INTENSITY: intensity_features(images[clinic][:, 0].numpy(), rounds.levels)}
        factor = (stretch or {}).get(clinic)
        if factor is not None:
            features = {part: f.mean(axis=0) + factor * (f - f.mean(axis=0)) for part, f in features.items()}
        sending[clinic] = ([f"{clinic}/{i}" for i in range(len(e))], features)
    nodes = tuple(sending)
    n = sum(len(keys) for keys, _ in sending.values())
    if n < MIN_FITTED:
        return FederatedFit(None, nodes, n)
    # Round one: each node's per-fold sums; the hub adds them up and fits each fold's held-out envelope.
    sums = {c: node_moments(f, keys, rounds) for c, (keys, f) in sending.items()}
    moments = added_up(list(sums.values()))
    params = held_out_params(moments, rounds)
    # Round two: each node counts its held-out distances; the hub adds the histograms up.
    counts = {c: node_histograms(f, keys, rounds, params) for c, (keys, f) in sending.items()}
    envelope = fitted_envelope(moments, added_up(list(counts.values())), rounds, quantile)
    # What `envelope build` shows the operator: how far each node's counts alone move each threshold.
    audit = audit_answers(sums, counts, rounds, quantile)
    with_all = thresholds_of(envelope)
    influence = {
        node.node_id: {"threshold": node.moves(with_all), "spread": node.widens} for node in audit.influence
    }
    hostile = tuple(c for c in nodes if c in (stretch or {}))
    return FederatedFit(envelope, nodes, n, influence, tuple(audit.named(with_all)), hostile)


@dataclass(frozen=True)
class _Envelope:
    check: EnvelopeCheck
    grey: IntensityCheck

    def thresholds(self) -> dict[str, float]:
        return {"embedding": self.check.threshold, "intensity": self.grey.check.threshold}


@dataclass(frozen=True)
class _Place:
    """A place's test images as every envelope sees them: embedded once, grey-value features taken once."""

    n: int
    embedding: np.ndarray
    #: levels → (features of the images, of their inverses) (``IntensityCheck.features_and_inverse``).
    grey: dict[tuple[float, ...], tuple[np.ndarray, np.ndarray]]

    def count(self, envelope: _Envelope) -> dict[str, int]:
        embedding = envelope.check.outside(self.embedding)
        seen = envelope.grey.judge_features(*self.grey[envelope.grey.levels])
        grey_outside, negative = seen.outside, seen.negative
        return {
            "outside": int((embedding | grey_outside).sum()),
            "n": self.n,
            "embedding": int(embedding.sum()),
            "intensity": int(grey_outside.sum()),
            "negative": int(negative.sum()),
        }


def envelope_rates(data: BenchData, embed: Embedder, quantile: float = DEFAULT_QUANTILE) -> dict[str, Any]:
    """Counts outside the envelope per trained clinic (its test split), the unseen clinic and the panel."""
    # The pooled validation split, embedded once: the pooled fit, and each clinic's rows for the rounds.
    val_x, _ = data.pooled_val()
    val_e = embed(val_x)
    pooled = _fitted(val_e, val_x, quantile, copies=0)
    envelopes: dict[str, _Envelope] = {"pooled": pooled}
    if data.hub_val_x is not None:
        # The envelope the product ships today: fitted on the hub's own (raw) validation split.
        envelopes["hub"] = _fitted(embed(data.hub_val_x), data.hub_val_x, quantile, copies=INTENSITY_COPIES)
    sizes = [len(c.val_x) for c in data.clinics.values()]
    per_clinic = dict(zip(data.clinics, np.split(val_e, np.cumsum(sizes)[:-1]), strict=True))
    fits = {
        "federated": federated_envelope(per_clinic, {c: d.val_x for c, d in data.clinics.items()}, quantile)
    }
    if data.traffic_x:
        # The same rounds over what each clinic analysed (``BenchData.traffic_x``), as a node answers them.
        traffic_e = {c: embed(x) for c, x in data.traffic_x.items()}
        fits["traffic"] = federated_envelope(traffic_e, data.traffic_x, quantile)
        # One hostile node, the clinic that analysed the most images: it answers as if its features were
        # spread HOSTILE_STRETCH times wider, to keep everyone's drift alarm quiet.
        largest = max(sorted(traffic_e), key=lambda c: len(traffic_e[c]))
        fits["traffic_hostile"] = federated_envelope(
            traffic_e, data.traffic_x, quantile, stretch={largest: HOSTILE_STRETCH}
        )
    for name, fit in fits.items():
        if fit.envelope is not None and fit.envelope.intensity is not None:  # the rounds fit both parts
            envelopes[name] = _Envelope(
                EnvelopeCheck.of(fit.envelope), IntensityCheck.of(fit.envelope.intensity)
            )

    # One intensity check per set of levels (all share the exporter's): each place's features taken once.
    levels = {e.grey.levels: e.grey for e in envelopes.values()}
    inputs = {f"clinics/{c}": data.clinics[c].test_x for c in data.names}
    inputs["unseen"] = data.unseen_x
    inputs.update({f"panel/{n}": x for n, x in data.panel.items()})
    places = {key: _place(embed, x, levels) for key, x in inputs.items()}

    out: dict[str, Any] = {"quantile": quantile, **_counts(data, places, pooled)}
    out["thresholds"] = pooled.thresholds()
    if "hub" in envelopes:
        out["hub"] = _counts(data, places, envelopes["hub"])
    for name, fit in fits.items():
        counted: dict[str, Any] = {
            "nodes": len(fit.nodes),
            "images": fit.images,
            "influence": fit.influence,
            "warned": list(fit.warned),
        }
        if fit.hostile:
            (counted["hostile"],) = fit.hostile
        if name in envelopes:
            counted.update(_counts(data, places, envelopes[name]))
            counted["thresholds"] = envelopes[name].thresholds()
        out[name] = counted
    return out


def _fitted(e: np.ndarray, x: torch.Tensor, quantile: float, *, copies: int) -> _Envelope:
    """The envelope fitted by the exporter on embeddings ``e`` of images ``x`` (both parts; ``copies``
    augmented copies of each image in the grey-value part)."""
    grey = fit_intensity_envelope(x[:, 0].numpy(), quantile=quantile, copies=copies)
    return _Envelope(EnvelopeCheck.of(fit_envelope(e, quantile=quantile)), IntensityCheck.of(grey))


def _place(embed: Embedder, x: torch.Tensor, levels: Mapping[tuple[float, ...], IntensityCheck]) -> _Place:
    grey = x[:, 0].numpy()
    features = {lv: check.features_and_inverse(grey) for lv, check in levels.items()}
    return _Place(n=len(x), embedding=embed(x), grey=features)


def _counts(data: BenchData, places: Mapping[str, _Place], envelope: _Envelope) -> dict[str, Any]:
    """Counts per place (trained clinics, the unseen clinic, the panel) for one envelope."""
    out: dict[str, Any] = {
        "clinics": {c: places[f"clinics/{c}"].count(envelope) for c in data.names},
        "unseen": places["unseen"].count(envelope),
    }
    if data.panel:
        out["panel"] = {n: places[f"panel/{n}"].count(envelope) for n in data.panel}
    return out
