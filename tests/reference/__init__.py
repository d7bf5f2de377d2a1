"""A small pure-Python reference model of KVM's x86 TDP MMU, used as a test oracle."""

from .model import RefError, RefHost, RefOOM

__all__ = ["RefError", "RefHost", "RefOOM"]
