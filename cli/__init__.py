"""The command line: `obliviate` (cli.main), the top floor; nothing imports it."""
