"""pinlab.guest: the code the guest runs (standard library only, Python 3.11+).

Pushed into every guest under :data:`pinlab.common.vocab.GUEST_HOME` together with
``pinlab.common`` and run as ``python3 -m pinlab.guest.<module>`` there
(:func:`pinlab.common.vocab.guest_python`). The same modules import on the host
(``tests/unit/test_agent.py`` runs the agent here)."""
