"""Applications built on the library: the ``grouppo`` command line (``cli``), the main job
(``quickstart``), instruction-following evaluation (``evaluate``), the toy demo (``demo``) and the
speed and memory benchmark (``bench``)."""
