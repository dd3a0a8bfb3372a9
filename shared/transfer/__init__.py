"""KV data planes: how a request's KV rows travel from a prefill worker to a decode worker.

One interface (`base.py`), several backends registered by name in `planes.py`, built by `registry.py` and
imported only when chosen.
"""
