"""Repository tools: the test plan behind ``make test`` and the one-command GPU check (``make gpu-check``)."""
