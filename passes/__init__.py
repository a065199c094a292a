"""Relax passes of the OHQ pipeline; each drops into ``tvm.transform.Sequential``."""
