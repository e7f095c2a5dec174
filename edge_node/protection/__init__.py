"""What leaves a clinic is protected: clipping, calibrated noise, compression, masking, floor and ledger."""

from edge_node.protection.errors import LedgerError, ProtectionError, TaskRefused
from edge_node.protection.floor import PrivacyFloor
from edge_node.protection.gate import PrivacyGate
from edge_node.protection.ledger import LEDGER_FILE, LedgerEntry, PrivacyLedger
from edge_node.protection.masking import SecAggClient
from edge_node.protection.mechanism import add_gaussian_noise, clip_l2, l2_norm
from edge_node.protection.pipeline import Masker, ProtectedUpdate, ProtectionPipeline

__all__ = [
    "LEDGER_FILE",
    "LedgerEntry",
    "LedgerError",
    "Masker",
    "PrivacyFloor",
    "PrivacyGate",
    "PrivacyLedger",
    "ProtectedUpdate",
    "ProtectionError",
    "ProtectionPipeline",
    "SecAggClient",
    "TaskRefused",
    "add_gaussian_noise",
    "clip_l2",
    "l2_norm",
]
