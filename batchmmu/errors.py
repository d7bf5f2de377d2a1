"""Errors raised by batchmmu."""

import errno as _errno


class BatchMMUError(ValueError):
    """Bad input or a request KVM would refuse.

    ``errno`` carries KVM's errno where the same call on a real KVM fails
    (``errno.EINVAL``, ``errno.EEXIST`` ...), else ``None``.  ``field`` names the
    argument at fault.
    """

    def __init__(self, message, *, field=None, value=None, errno=None):
        super().__init__(message)
        self.field = field
        self.value = value
        self.errno = errno


class HostMemoryExhausted(BatchMMUError):
    """The host memory budget cannot back the next guest page.

    From a batch (``access``, ``store``): ``applied`` (bool array over the batch) marks the events that
    took effect, exactly as without the error; ``outcome`` and ``error_code`` hold their results (0 for
    the others).  The event it stopped at and every later one changed nothing.  From
    ``write_guest_memory`` / ``touch_host_memory``: nothing changed (``applied`` None).
    """

    applied = None
    outcome = None
    error_code = None


class InvalidationInProgress(BatchMMUError):
    """A memslot change while an MMU-notifier invalidation of the VM is in progress.

    KVM makes the change wait (kvm_swap_active_memslots sleeps until mn_active_invalidate_count
    drops to 0); a single-threaded simulator cannot wait for the invalidation_range_end the caller
    has yet to issue, so it refuses instead and changes nothing.  ``errno`` is None: KVM's ioctl
    does not fail, it blocks.
    """


def einval(field, value, why):
    return BatchMMUError(f"{field}={value!r}: {why} (EINVAL)", field=field, value=value,
                         errno=_errno.EINVAL)


def bad(field, value, why):
    return BatchMMUError(f"{field}={value!r}: {why}", field=field, value=value)
