"""Routers for one LoRA module: SEQR and the baselines it is measured against."""

from seqr.core.routing.arrow import ArrowRouter
from seqr.core.routing.base import Router
from seqr.core.routing.brute_force import BruteForceRouter
from seqr.core.routing.seqr import SeqrRouter
from seqr.core.routing.spectr import SpectrRouter

__all__ = ["ArrowRouter", "BruteForceRouter", "Router", "SeqrRouter", "SpectrRouter"]
