"""pinlab.common: standard-library-only modules shared by the host and the guest.

The guest receives this package next to ``pinlab.guest`` under
:data:`pinlab.common.vocab.GUEST_HOME`, so both sides import it the same way
(``from pinlab.common import vocab``)."""
