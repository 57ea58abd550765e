"""The user API: ``AsyncClient``, the sync ``Client`` and the models listing.

Owns what users call and configure; turns their arguments into the core's settings.
May import: ``togembed.core``. Not the jobs, the server or the CLI.
"""
