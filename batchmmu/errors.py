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

    ``applied`` (bool array over the batch) marks the accesses that took effect before it.
    """

    applied = None


def einval(field, value, why):
    return BatchMMUError(f"{field}={value!r}: {why} (EINVAL)", field=field, value=value,
                         errno=_errno.EINVAL)


def bad(field, value, why):
    return BatchMMUError(f"{field}={value!r}: {why}", field=field, value=value)
