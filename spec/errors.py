"""Named exceptions for everything a user or a hostile image can cause.

Every message says what is wrong and where (file offset, field, guest range),
so the CLI can print it on one line without a traceback.
"""


class LaminaError(Exception):
    """Base of every error Lamina reports to a user."""


class FormatError(LaminaError):
    """The bytes of an image do not follow the format."""


class BadMagic(FormatError):
    """A structure does not start with its magic bytes: not a Lamina image, or a damaged copy."""


class UnsupportedVersion(FormatError):
    """The image was written by a format version this reader does not know."""


class UnknownIncompatibleFeature(FormatError):
    """An incompatible feature bit this reader does not know is set: refusing to open."""


class BadChecksum(FormatError):
    """A CRC32C over a structure does not match its contents."""


class FieldOutOfRange(FormatError):
    """A declared field holds a value the format does not admit."""


class NoValidCopy(FormatError):
    """Neither copy of a replicated structure verifies: the image cannot be read safely."""


class CommittingWithoutBase(FormatError):
    """The root is marked committing (a commit into the base in progress) but the image has no base."""


class CommittingIntoSnapshot(FormatError):
    """The root is marked committing into a base that is a frozen layer (a snapshot), which never changes."""


class ImageTooLarge(LaminaError):
    """The requested virtual size exceeds the format's maximum or the host file system's limit."""


class ImageLocked(LaminaError):
    """Another open of the image holds a lock that conflicts: one writer, or any number of readers (R11)."""


class CounterExhausted(LaminaError):
    """A counter (a generation or the next snapshot id) is at the format's bound: the step that increments it is refused."""


class InvalidArgument(LaminaError):
    """A caller passed a value the operation does not accept (size, offset, cluster size...)."""


class OutOfBounds(LaminaError):
    """A guest request reaches past the virtual size of the image."""


class ReadOnlyImage(LaminaError):
    """A write was attempted on an image opened read-only."""


class ImageClosed(LaminaError):
    """An operation was attempted on an image that was already closed."""


class PatternMismatch(LaminaError):
    """`lamina io read -P` found bytes that differ from the expected pattern."""


class UnsafeFile(LaminaError):
    """A name the tools will not open or remove: a symbolic link where none may be, a FIFO, a device, a directory."""
