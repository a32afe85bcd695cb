"""Routers for one LoRA module: SEQR and the baselines it is measured against."""

from seqr_core.routing.arrow import ArrowRouter
from seqr_core.routing.base import Router
from seqr_core.routing.brute_force import BruteForceRouter
from seqr_core.routing.seqr import SeqrRouter
from seqr_core.routing.spectr import SpectrRouter

__all__ = ["ArrowRouter", "BruteForceRouter", "Router", "SeqrRouter", "SpectrRouter"]
