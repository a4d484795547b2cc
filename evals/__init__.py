"""Eval client programs: they talk to a server only over HTTP, through clients/."""
