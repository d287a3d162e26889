"""Tool subcommands of the ``ldm`` command (``ldm shards ...``)."""
