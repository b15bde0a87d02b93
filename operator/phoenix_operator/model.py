"""Only for ``facts.py`` until the merge: the CRD's types moved to ``phoenixjob``.

``facts.py`` is being rewritten in another branch and still imports ``.model``; the
integrator points it at ``.phoenixjob`` and deletes this file. Nothing else imports it.
"""
from .phoenixjob import JobSpec, parse_ts

__all__ = ["JobSpec", "parse_ts"]
