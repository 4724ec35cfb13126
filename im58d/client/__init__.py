"""The reference client SDK: what a mobile app does against an im58d server
(contract version 2)."""

from .cache import Cache, Group, User
from .client import (
    DELIVERED,
    DISABLED,
    EXPIRED,
    FAILED,
    NO_CREDENTIALS,
    REPLACED,
    RESUME_REFUSED,
    SENT,
    SIGNED_OUT,
    STORED,
    THROTTLED,
    UNAUTHORIZED,
    Client,
    LoginFailed,
    Message,
    Outgoing,
)
from .report import Reporter, ReportFile, ReportState
from .state import ClientState, FileState
from .sync import Sync, SyncError

__all__ = [
    "DELIVERED",
    "DISABLED",
    "EXPIRED",
    "FAILED",
    "NO_CREDENTIALS",
    "REPLACED",
    "RESUME_REFUSED",
    "SENT",
    "SIGNED_OUT",
    "STORED",
    "THROTTLED",
    "UNAUTHORIZED",
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
