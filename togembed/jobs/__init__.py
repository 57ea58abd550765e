"""Corpus jobs (``togembed embed`` / ``togembed search``): input readers (``readers``) and output
writers (``writers``) of the file types in ``filetypes``, writes made durable (``durable``), the
durable job store and vector cache (``store``), dedup of texts (``textindex``), the output written
while the job runs (``output``), the job itself (``job``) and nearest-neighbour search over an
output (``nearest``).

May import: ``togembed.core`` and ``togembed.api``. Not the server or the CLI.
"""
