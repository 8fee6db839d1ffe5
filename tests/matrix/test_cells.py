"""The matrix's cells as Avocado tests, made from the event registry when this module is
imported (orchestrator/celltest.py): class ``Kernel<k>`` per kernel, method
``test_<mode>__<backing>__<event>`` per cell. Avocado lists and selects them through the
``pinlab-matrix`` resolver plugin (``CellResolver``); nothing here is generated."""

from pinlab.orchestrator.celltest import cell_test_classes

globals().update(cell_test_classes(__name__))
