"""Method registry: ``method.name`` in a config -> the method class (whose ``Config`` parses its section)."""

from kinship.methods.base import DataInfo, Method, Refresh, StepInfo, TrainData
from kinship.methods.byol import BYOL
from kinship.methods.clim import CLIM
from kinship.methods.cmsf import CMSF, MSF
from kinship.methods.coke import CoKe
from kinship.methods.fixmatch import FixMatch
from kinship.methods.mira import MIRA
from kinship.methods.mocov2 import MoCoV2
from kinship.methods.sscl import SsCL
from kinship.methods.supervised import Supervised
from kinship.methods.swav import SwAV

METHODS: dict[str, type[Method]] = {
    "byol": BYOL,
    "mocov2": MoCoV2,
    "msf": MSF,
    "cmsf": CMSF,
    "swav": SwAV,
    "mira": MIRA,
    "coke": CoKe,
    "clim": CLIM,
    "sscl": SsCL,
    "fixmatch": FixMatch,
    "supervised": Supervised,
}

__all__ = ["METHODS", "DataInfo", "Method", "Refresh", "StepInfo", "TrainData"]
