"""One module per operation, each reading top to bottom as the protocol it implements.

:mod:`.suspend`, :mod:`.resume`, :mod:`.checkpoint`, :mod:`.save`,
:mod:`.restore`, :mod:`.migrate`, :mod:`.recover` (with ``status`` and
``list``).  Each function takes the :class:`~torpor.orchestrator.Orchestrator`
it runs on as ``orch`` and uses its engine (:mod:`torpor.engine`): the
per-domain claim, hook dispatch, the event-driven wait, phases, intent
records.  The orchestrator's public methods are these functions.
"""
