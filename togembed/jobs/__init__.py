"""Corpus jobs (``togembed embed`` / ``togembed search``): embed every record of an input file
into an output file, durably, resumably; find an output's nearest records to a query.

The modules, from the bottom up (each imports only those above it):

Files
    ``durable``      transactions and fsyncs: writes that survive a kill or a power loss
    ``filetypes``    the input and output suffixes, ``CorpusError``, pyarrow on demand
    ``readers``      records of .txt/.jsonl/.csv/.parquet inputs; id-field detection, scanning
    ``writers``      .parquet/.npy/.jsonl outputs, written a block at a time (``OutputFile``)
    ``textindex``    the dedup key of a text (``text_hash``) and ``TextIndex``, in memory

The durable state of a job
    ``jobfile``      the job file: tables, format, lock, the settings check
    ``vectorfile``   the vectors file beside it: float32 rows, positional I/O
    ``ids``          the ids pre-pass (``DuplicateIdError``)
    ``failures``     inputs that failed for good: their table, ``OUTPUT.failures.jsonl``
    ``vectors``      the vectors table and file together: the commit protocol, reading back
    ``reconcile``    a changed input mapped onto the stored work, by id and text
    ``store``        ``JobStore``, what the job uses of all the above
    ``cache``        ``VectorCache``, vectors shared by every job (``--cache``)

Running a job
    ``output``       the output file, written while the job runs (``OutputFollower``)
    ``storewriter``  the writer thread: group commits, the output following the store
    ``types``        ``JobOptions``, ``JobProgress``, ``JobResult``
    ``admission``    the bound on paid inputs a kill can lose
    ``readahead``    input blocks read, hashed and looked up ahead of the sending
    ``sender``       what is sent, dedup, budgets, what the answers become
    ``job``          ``run_job``: a job from start to end

Searching
    ``nearest``      an output's vectors and how they were made; nearest neighbours

May import: ``togembed.core`` and ``togembed.api``. Not the server or the CLI.
"""
