"""pinlab: what a kernel does when a device keeps DMA-ing into pinned user pages."""

__version__ = "0.1.0"
