"""Public constants: access kinds, outcomes, memslot flags, backings."""

from .kernels import state as _s

# Access kinds (PFERR-style bit flags; 0 = supervisor read)
ACC_READ = 0x0
ACC_WRITE = 0x2
ACC_USER = 0x4
ACC_FETCH = 0x10
ACC_VALID_MASK = ACC_WRITE | ACC_USER | ACC_FETCH

# Outcomes of an access
HIT = _s.OUT_HIT
FIXED = _s.OUT_FIXED
SPURIOUS = _s.OUT_SPURIOUS
MMIO = _s.OUT_MMIO
EMULATED = _s.OUT_EMULATED
GUEST_FAULT = _s.OUT_GUEST_FAULT
RING_FULL = _s.OUT_RING_FULL
RETRY = _s.OUT_RETRY
L1_EXIT = _s.OUT_L1_EXIT
OUTCOME_NAMES = _s.OUTCOME_NAMES

# Architectural page-fault error code bits
PFERR_PRESENT = 0x1
PFERR_WRITE = 0x2
PFERR_USER = 0x4
PFERR_RSVD = 0x8
PFERR_FETCH = 0x10
PFERR_PK = 0x20

# KVM_SET_USER_MEMORY_REGION flags
MEM_LOG_DIRTY_PAGES = _s.KVM_MEM_LOG_DIRTY_PAGES
MEM_READONLY = _s.KVM_MEM_READONLY

BACKINGS = _s.BACKING_NAMES
STAT_NAMES = _s.STAT_NAMES
