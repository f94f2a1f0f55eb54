"""Shoal's composition root: the ``shoal`` command (``python -m shoal``) and
``shoal up``. It sits above every package and is imported by none."""
