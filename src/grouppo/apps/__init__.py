"""Applications built on the library: the ``grouppo`` command line (``cli``, one module per command
group), ``grouppo quickstart`` (``quickstart``: evaluate, train, evaluate), the toy demo (``demo``) and
the speed and memory measurements (``bench``, one module per measurement)."""
