"""The reference client SDK: what a mobile app does against an im58d server."""

from .client import DELIVERED, FAILED, SENT, STORED, Client, LoginFailed, Message, Outgoing
from .state import ClientState, FileState

__all__ = [
    "DELIVERED",
    "FAILED",
    "SENT",
    "STORED",
    "Client",
    "ClientState",
    "FileState",
    "LoginFailed",
    "Message",
    "Outgoing",
]
