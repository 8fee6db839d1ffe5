"""The error every kernel source, config or build problem derives from: ``pinlab validate``
and ``pinlab bisect`` treat it as bad input or an infrastructure failure, never as a
kernel behaviour."""


class KernelBuildError(RuntimeError):
    """A kernel could not be had: source, patch, config fragment or compile failure."""
