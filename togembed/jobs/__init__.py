"""Corpus jobs (``togembed embed`` / ``togembed search``): input readers (``readers``) and output
writers (``writers``) of the file types in ``filetypes``, writes made durable (``durable``), dedup
of texts (``textindex``); the durable job store (``store``: ``JobStore``, built on ``vectors``,
with the rooms ``jobfile``, ``vectorfile``, ``ids``, ``failures`` and ``reconcile``) and the vector
cache (``cache``); the output written while the job runs (``output``), the job itself (``job``)
and nearest-neighbour search over an output (``nearest``).

May import: ``togembed.core`` and ``togembed.api``. Not the server or the CLI.
"""
