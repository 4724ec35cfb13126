"""The reference client SDK: what a mobile app does against an im58d server."""

from .cache import Cache, Group, User
from .client import DELIVERED, FAILED, SENT, STORED, Client, LoginFailed, Message, Outgoing
from .report import Reporter, ReportFile, ReportState
from .state import ClientState, FileState
from .sync import Sync, SyncError

__all__ = [
    "DELIVERED",
    "FAILED",
    "SENT",
    "STORED",
    "Cache",
    "Client",
    "ClientState",
    "FileState",
    "Group",
    "LoginFailed",
    "Message",
    "Outgoing",
    "ReportFile",
    "ReportState",
    "Reporter",
    "Sync",
    "SyncError",
    "User",
]
